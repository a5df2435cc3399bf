"""Helpers shared by the ComfyUI tests (the in-process host is the pack's own, also behind the demo)."""
from quant_expand.inprocess import CAPTURED, ComfyHost, TEST_NODES, sample_direct, sampling_graph  # noqa: F401


def rel_err(a, b) -> float:
    """Relative L2 error of whole tensors, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def quantized_hash(host, patcher) -> str:
    """Digest of every quantized byte of a loaded model, through the pack's module as ComfyUI loaded it."""
    return host.pack_module("quant_expand.layers").quantized_digest(patcher.model.diffusion_model)
