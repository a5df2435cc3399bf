"""Writing a pre-quantized FLUX file: the stored bytes as they are, with metadata saying what they are."""
from __future__ import annotations

import os

import torch

from .stored import FORMAT_NAME, FORMAT_VERSION, StoredKind, StoredLinear


def file_metadata(linears: dict[str, StoredLinear], source: str = "") -> dict[str, str]:
    """``format: bnb-flux`` metadata naming the scheme of a file being written."""
    quantized = [s for s in linears.values() if s.kind is not StoredKind.FLOAT]
    types = sorted({s.quant_state.quant_type if s.kind is StoredKind.FOUR_BIT else "int8" for s in quantized})
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "quant_type": types[0] if len(types) == 1 else ("mixed:" + ",".join(types) if types else "none"),
            "quantized_layers": str(len(quantized)), "linear_layers": str(len(linears))}
    four = [s.quant_state for s in quantized if s.kind is StoredKind.FOUR_BIT]
    if four:
        sizes = sorted({qs.blocksize for qs in four})
        nested = {qs.nested for qs in four}
        meta["blocksize"] = ",".join(str(b) for b in sizes)
        meta["double_quant"] = "true" if nested == {True} else "false" if nested == {False} else "mixed"
        meta["layout"] = "bnb 4-bit, lllyasviel/Forge keys (weight.absmax, weight.quant_map, weight.quant_state...)"
    if any(s.kind is StoredKind.INT8 for s in quantized):
        meta["layout"] = (meta.get("layout", "") + "; " if four else "") + "bnb LLM.int8 (weight, SCB, weight_format)"
    if source:
        meta["source"] = source
    return meta


def save_flux_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    save_file(tensors, path, metadata=metadata)
    return path
