"""A quantized layer's stored state as tensors: for byte-for-byte checks and dequantized references."""
from __future__ import annotations

import torch

from .layers import QLinear4bit, QuantLinear


def quantized_bytes(module) -> dict[str, torch.Tensor]:
    """Every tensor that holds a quantized layer's stored state (for byte-for-byte checks)."""
    param = module.weight
    out = {"weight": param.data}
    if isinstance(module, QLinear4bit):
        qs = param.quant_state
        out["absmax"] = qs.absmax
        out["code"] = qs.code
        if qs.nested:
            out["nested_absmax"] = qs.state2.absmax
            out["nested_code"] = qs.state2.code
            out["offset"] = torch.as_tensor(qs.offset)
    else:
        out["SCB"] = param.SCB
    return out


def dequantized_state_dict(root: torch.nn.Module, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The module's weights as plain tensors (quantized layers dequantized, zero padding included):
    what a full-precision model holding exactly the quantized values looks like."""
    out = {}
    quantized = {name: m for name, m in root.named_modules() if isinstance(m, QuantLinear)}
    for name, m in quantized.items():
        out[f"{name}.weight"] = m.dequantize(torch.device("cpu"), dtype)
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach().to("cpu", dtype)
    for name, p in root.named_parameters():
        owner = name.rpartition(".")[0]
        if owner in quantized:
            continue
        out[name] = p.detach().to("cpu", dtype)
    return out


def quantized_digest(root: torch.nn.Module) -> str:
    """SHA-256 over the stored state of every quantized layer under ``root`` (names included): equal
    digests mean no quantized byte changed."""
    import hashlib

    h = hashlib.sha256()
    for name, m in sorted(root.named_modules(), key=lambda item: item[0]):
        if isinstance(m, QuantLinear):
            for key, t in sorted(quantized_bytes(m).items()):
                h.update(f"{name}.{key}".encode())
                h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
