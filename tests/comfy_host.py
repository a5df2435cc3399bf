"""Tests use the pack's in-process ComfyUI host (also behind ``python -m quant_expand.cli demo``)."""
from quant_expand.inprocess import CAPTURED, ComfyHost, TEST_NODES, sample_direct, sampling_graph  # noqa: F401
