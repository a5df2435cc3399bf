"""Weights other tools quantized, read as float32: ComfyUI's scaled fp8 and mixed-precision layers.

Read (each Linear's stored values times its scales, exactly as ComfyUI's loader dequantizes them, then
quantized to the bitsandbytes type the node asks for):

* **scaled fp8** (Comfy-Org ``*_fp8_scaled.safetensors``): a ``scaled_fp8`` marker tensor beside the model,
  fp8 weights and a per-layer ``scale_weight`` (``scale_input`` is an activation scale: not used).
* **ComfyUI mixed precision** (``comfy_quant``, ComfyUI 0.33's ``comfy.ops.mixed_precision_ops``): a per-layer
  ``comfy_quant`` JSON tensor (or the file's ``_quantization_metadata``) naming the format:
  ``float8_e4m3fn`` / ``float8_e5m2`` (``weight_scale``), ``int8_tensorwise`` (``weight_scale``),
  ``mxfp8`` (e8m0 scales per 32 values, cuBLAS tile order), ``nvfp4`` (e2m1 pairs, fp8 scales per 16
  values in cuBLAS tile order, ``weight_scale_2`` per tensor; an AWQ ``pre_quant_scale`` is folded in).

Refused with the format named (use ComfyUI's Load Diffusion Model or the tool that made them): the other
``comfy_quant`` formats (ConvRot, W4A8) and the layouts of GPTQ/AWQ, nunchaku SVDQuant, optimum-quanto,
torchao and GGUF.

Pure torch: never imports ComfyUI or comfy-kitchen (a plain file never reaches this code's math).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import BnbFluxError

SCALED_FP8_MARKER = "scaled_fp8"
QUANT_METADATA = "_quantization_metadata"
# per-layer tensors of the formats read here, besides weight and bias
LAYER_TENSORS = ("comfy_quant", "scale_weight", "scale_input", "weight_scale", "weight_scale_2", "input_scale",
                 "pre_quant_scale")
READ_FORMATS = ("float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "mxfp8", "nvfp4")
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
USE_INSTEAD = "load it with ComfyUI's Load Diffusion Model instead, or use a bf16/fp8 FLUX file with Load BnB Flux"


@dataclass(frozen=True)
class ScaledLayer:
    """How one Linear's weight is stored by another tool: ``format`` (one of :data:`READ_FORMATS`, or
    ``scaled_fp8``) and the file keys of its weight and scales."""

    format: str
    module: str                                   # file module key (prefix included)
    scale: Optional[str] = None                   # weight_scale / scale_weight key
    scale_2: Optional[str] = None                 # nvfp4's per-tensor weight_scale_2
    pre_quant_scale: Optional[str] = None         # AWQ input smoothing (nvfp4 from ModelOpt)

    def logical_shape(self, stored_shape: tuple) -> tuple[int, int]:
        if len(stored_shape) != 2:
            raise BnbFluxError(f"{self.module}.weight has shape {list(stored_shape)}; a Linear weight is 2-D")
        rows, cols = stored_shape
        return (rows, cols * 2) if self.format == "nvfp4" else (rows, cols)

    def describe(self) -> str:
        return {"scaled_fp8": "scaled fp8 (weight x scale_weight)",
                "float8_e4m3fn": "fp8 e4m3 x weight_scale", "float8_e5m2": "fp8 e5m2 x weight_scale",
                "int8_tensorwise": "int8 x weight_scale", "mxfp8": "MXFP8 (fp8, e8m0 scale per 32)",
                "nvfp4": "NVFP4 (e2m1, fp8 scale per 16 and a tensor scale)"}[self.format]


def _layer_conf(tensors, key: str, name: str) -> dict:
    raw = tensors.get(key)
    try:
        conf = json.loads(bytes(raw.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BnbFluxError(f"{name}: {key} is not ComfyUI quantization JSON ({e}); the file is damaged: "
                           f"download it again") from e
    if not isinstance(conf, dict) or not isinstance(conf.get("format"), str):
        raise BnbFluxError(f"{name}: {key} names no quantization format; the file is damaged: download it again")
    return conf


def _refuse_foreign_layout(keys: list[str], metadata: dict, name: str):
    """Quantized layouts of other tools, told apart by their tensor and metadata names (never by free
    text, which a file name in a ``source`` field could trip): refused naming the tool."""
    suffixes = {k.rpartition(".")[2] for k in keys}
    found = None
    if "qweight" in suffixes and "wscales" in suffixes:
        found = "nunchaku SVDQuant (qweight, wscales): load it with ComfyUI-nunchaku"
    elif "qweight" in suffixes and ("qzeros" in suffixes or "scales" in suffixes):
        found = "GPTQ/AWQ (qweight, qzeros, scales; AutoGPTQ, AutoAWQ, optimum)"
    elif any(k.endswith((".weight._data", ".weight._scale")) for k in keys):
        found = "optimum-quanto (weight._data, weight._scale)"
    elif "tensor_names" in metadata or any(k.endswith(("_qdata", ":qdata")) for k in keys):
        found = "torchao tensor subclasses (qdata)"
    elif any(k.startswith(("general.", "gguf")) for k in metadata):
        found = "GGUF (llama.cpp-style blocks): load it with ComfyUI-GGUF"
    if found:
        raise BnbFluxError(f"{name}: quantized in the {found} layout, which Load BnB Flux does not read; "
                           f"{USE_INSTEAD}")


def scaled_layers(tensors, keys: list[str], prefix: str, name: str) -> dict[str, ScaledLayer]:
    """File module key -> :class:`ScaledLayer` for every Linear stored in a format of another tool
    (scaled fp8, ``comfy_quant``); raises naming the format for one that is not read."""
    metadata = getattr(tensors, "metadata", {}) or {}
    _refuse_foreign_layout(keys, metadata, name)
    keyset = set(keys)
    layers: dict[str, ScaledLayer] = {}
    confs: dict[str, dict] = {}
    if QUANT_METADATA in metadata:
        try:
            layer_map = json.loads(metadata[QUANT_METADATA])["layers"]
            confs.update({m: c for m, c in layer_map.items() if isinstance(c, dict)})
        except (ValueError, KeyError, TypeError) as e:
            raise BnbFluxError(f"{name}: its {QUANT_METADATA} metadata is not ComfyUI quantization JSON ({e}); "
                               f"the file is damaged: download it again") from e
    for k in keys:
        if k.endswith(".comfy_quant"):
            confs[k[: -len(".comfy_quant")]] = _layer_conf(tensors, k, name)
    if f"{prefix}{SCALED_FP8_MARKER}" in keyset:
        for k in keys:
            if k.endswith(".scale_weight") and k.startswith(prefix):
                module = k[: -len(".scale_weight")]
                layers[module] = ScaledLayer("scaled_fp8", module, scale=k)
    for module, conf in confs.items():
        if f"{module}.weight" not in keyset and f"{prefix}{module}.weight" in keyset:
            module = prefix + module  # _quantization_metadata may name layers without the file's prefix
        fmt = conf["format"]
        if fmt not in READ_FORMATS:
            raise BnbFluxError(f"{name}: {module} is stored as ComfyUI's {fmt!r} quantization, which Load BnB Flux "
                               f"does not read (it reads {', '.join(READ_FORMATS)}); {USE_INSTEAD}")
        if fmt == "int8_tensorwise" and (conf.get("convrot") or (conf.get("params") or {}).get("convrot")):
            raise BnbFluxError(f"{name}: {module} is stored as ComfyUI's ConvRot int8 (Hadamard-rotated), which "
                               f"Load BnB Flux does not read; {USE_INSTEAD}")

        def present(suffix):
            key = f"{module}.{suffix}"
            return key if key in keyset else None

        scale = present("weight_scale")
        if scale is None:
            raise BnbFluxError(f"{name}: {module} is {fmt} but {module}.weight_scale is missing; the file is "
                               f"incomplete: download it again")
        scale_2 = present("weight_scale_2")
        if fmt == "nvfp4" and scale_2 is None:
            raise BnbFluxError(f"{name}: {module} is nvfp4 but {module}.weight_scale_2 is missing; the file is "
                               f"incomplete: download it again")
        layers[module] = ScaledLayer(fmt, module, scale=scale, scale_2=scale_2, pre_quant_scale=present("pre_quant_scale"))
    for module in layers:
        if f"{module}.weight" not in keyset:
            raise BnbFluxError(f"{name}: tensor {module}.weight is missing beside its quantization scales; the file "
                               f"is incomplete: download it again")
    return layers


def consumed_keys(tensors_keys, layers: dict[str, ScaledLayer], prefix: str) -> set[str]:
    """The keys the scaled layers account for (their scales and JSON), and the scaled fp8 marker."""
    keys = set(tensors_keys)
    out = {f"{prefix}{SCALED_FP8_MARKER}"} & keys
    for module in layers:
        out.update(k for k in (f"{module}.{s}" for s in LAYER_TENSORS) if k in keys)
    return out


def _from_blocked(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Scales in cuBLAS' tiled layout (128 x 4 tiles, padded) back to ``[rows, cols]``."""
    row_blocks, col_blocks = -(-rows // 128), -(-cols // 4)
    need = row_blocks * 128 * col_blocks * 4
    if blocked.numel() != need:
        raise ValueError(f"{blocked.numel()} block scales, the tiled layout of {rows} x {cols} scales has {need}")
    tiles = blocked.reshape(-1, 32, 4, 4).transpose(1, 2).reshape(row_blocks, col_blocks, 128, 4)
    return tiles.permute(0, 2, 1, 3).reshape(row_blocks * 128, col_blocks * 4)[:rows, :cols]


def _e8m0(codes: torch.Tensor) -> torch.Tensor:
    exponent = codes.view(torch.uint8).to(torch.int32)
    return torch.where(exponent == 0, 0, exponent << 23).view(torch.float32)


def dequantize(layer: ScaledLayer, tensors, name: str) -> torch.Tensor:
    """The layer's weight as float32 ``[out, in]``: stored values times their scales, as ComfyUI computes it
    in float32 (``comfy_kitchen``'s eager dequantize, same products in the same order)."""
    weight_key = f"{layer.module}.weight"
    try:
        q = tensors.get(weight_key)
        scale = tensors.get(layer.scale).to(torch.float32) if layer.scale else None
        fmt = layer.format
        if fmt in ("scaled_fp8", "float8_e4m3fn", "float8_e5m2", "int8_tensorwise"):
            if fmt in ("float8_e4m3fn", "float8_e5m2") and q.dtype == torch.uint8:  # fp8 bytes kept as uint8
                q = q.view(getattr(torch, fmt))
            expected = {"int8_tensorwise": (torch.int8,)}.get(fmt, (torch.float8_e4m3fn, torch.float8_e5m2))
            if q.dtype not in expected:
                raise ValueError(f"weight is {q.dtype}, {fmt} stores {' or '.join(map(str, expected))}")
            w = q.to(torch.float32) * scale  # broadcast as ComfyUI does: per tensor, or per row ([out, 1])
        elif fmt == "mxfp8":
            if q.dtype == torch.uint8:
                q = q.view(torch.float8_e4m3fn)
            rows, cols = q.shape
            if cols % 32:
                raise ValueError(f"{cols} inputs are not whole blocks of 32")
            block = _e8m0(_from_blocked(tensors.get(layer.scale).view(torch.uint8), rows, cols // 32))
            w = (q.to(torch.float32).reshape(rows, cols // 32, 32) * block.unsqueeze(-1)).reshape(rows, cols)
        else:  # nvfp4: two e2m1 codes per byte, high nibble first
            if q.dtype != torch.uint8:
                raise ValueError(f"weight is {q.dtype}, nvfp4 packs two values per uint8")
            rows, half = q.shape
            cols = half * 2
            codes = torch.stack([q >> 4, q & 0x0F], dim=-1).reshape(rows, cols).long()
            values = _E2M1[codes]
            block = _from_blocked(tensors.get(layer.scale).view(torch.float8_e4m3fn), rows, cols // 16)
            total = tensors.get(layer.scale_2).to(torch.float32) * block.to(torch.float32)
            w = (values.reshape(rows, cols // 16, 16) * total.unsqueeze(-1)).reshape(rows, cols)
            if layer.pre_quant_scale:
                # ComfyUI multiplies the input by it; on the weight's columns it is the same linear map
                w = w * tensors.get(layer.pre_quant_scale).to(torch.float32).reshape(1, -1)
    except BnbFluxError:
        raise
    except (ValueError, RuntimeError, TypeError) as e:
        raise BnbFluxError(f"{name}: {weight_key} cannot be read as {layer.describe()} ({e}); the file is "
                           f"damaged: download it again") from e
    if tuple(w.shape) != layer.logical_shape(tuple(q.shape)):
        raise BnbFluxError(f"{name}: the scales of {weight_key} do not fit its shape {list(q.shape)}; the file is "
                           f"damaged: download it again")
    if not bool(torch.isfinite(w).all()):
        raise BnbFluxError(f"{name}: {weight_key} times its scales is not finite (NaN or inf); the file is damaged: "
                           f"download it again")
    return w


def describe_formats(layers: dict[str, ScaledLayer]) -> str:
    counts: dict[str, int] = {}
    for layer in layers.values():
        counts[layer.describe()] = counts.get(layer.describe(), 0) + 1
    return ", ".join(f"{n} x {what}" for what, n in counts.items())


def stored_bytes(tensors, layer: ScaledLayer) -> int:
    keys = [f"{layer.module}.weight", layer.scale, layer.scale_2, layer.pre_quant_scale]
    return sum(tensors.nbytes(k) for k in keys if k)
