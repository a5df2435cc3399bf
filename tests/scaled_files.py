"""FLUX files in ComfyUI's own quantized layouts, written with ComfyUI's code (ComfyUI tests only).

* ``comfy_quant`` files: every quantized Linear is a ``comfy.ops.mixed_precision_ops`` Linear holding a
  ``comfy.quant_ops.QuantizedTensor`` made by ComfyUI's layout classes, and its ``state_dict`` (ComfyUI's
  writer) gives the tensors: ``weight``, ``weight_scale`` (``weight_scale_2``), ``comfy_quant`` JSON.
* scaled fp8 (Comfy-Org's older files): fp8 weights from ComfyUI's fp8 layout with a per-layer
  ``scale_weight`` and the ``scaled_fp8`` marker, the keys ``comfy.utils.convert_old_quants`` reads.

The weights are chosen so that what ComfyUI dequantizes survives NF4 exactly: every 64-value block of a
row holds only {-v, 0, v} with v reached, and v differs from row to row and from block to block (scales
neither uniform nor powers of two where the format allows it), so reading a scale on the wrong axis or
in the wrong tile order cannot go unseen.
"""
from __future__ import annotations

import torch

from quant_expand.testing.synthetic import TinyFluxConfig, make_tiny_flux

def quantized_linears(sd: dict, txt_in: bool = True) -> list[str]:
    """The block Linears (and txt_in): what the quantize-on-load default quantizes too."""
    return [k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2
            and (k.startswith(("double_blocks.", "single_blocks.")) or (txt_in and k == "txt_in.weight"))]


def ternary(out_features: int, in_features: int, g: torch.Generator) -> torch.Tensor:
    """Values in {-1, 0, 1}; each 16-value group reaches +-1 (so every nvfp4/mxfp8/NF4 block does)."""
    t = torch.randint(-1, 2, (out_features, in_features), generator=g).float()
    groups = t.view(out_features, -1, 16)
    groups[..., 0] = torch.where(torch.rand(groups.shape[:-1], generator=g) < 0.5, -1.0, 1.0)
    return t


def block_values(out_features: int, in_features: int, g: torch.Generator, choices: torch.Tensor) -> torch.Tensor:
    """One magnitude per (row, 64-column block), drawn from ``choices``: [out, in // 64]."""
    idx = torch.randint(0, len(choices), (out_features, in_features // 64), generator=g)
    return choices[idx]


def _fp8_values(lo: float, hi: float) -> torch.Tensor:
    """Every e4m3 value in [lo, hi) that is not a power of two."""
    v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    v = v[torch.isfinite(v) & (v >= lo) & (v < hi)]
    return v[torch.log2(v) != torch.log2(v).round()]


def comfy_quant_flux(fmt: str, cfg: TinyFluxConfig, seed: int = 0, pre_quant_scale: bool = False) -> tuple[dict, dict]:
    """A tiny FLUX whose block Linears are stored in ComfyUI format ``fmt`` (``float8_e4m3fn``,
    ``float8_e5m2``, ``int8_tensorwise``, ``mxfp8``, ``nvfp4``) by ComfyUI's own writer. Returns the
    file's tensors and the float32 weights the layers compute with (ComfyUI's dequantized weight; with
    ``pre_quant_scale``, ModelOpt's AWQ input scale per column — powers of two, constant per 64 columns,
    which ComfyUI multiplies into the input — folded into its columns)."""
    sd = make_tiny_flux(cfg, seed=seed, exact_for="nf4")  # the Linears left unquantized survive NF4 too
    # ComfyUI's model detection reads txt_in's packed width as the context width: nvfp4 files keep it bf16
    return comfy_quant_linears(sd, quantized_linears(sd, txt_in=fmt != "nvfp4"), fmt, seed, pre_quant_scale)


def comfy_quant_linears(sd: dict, names, fmt: str, seed: int = 0, pre_quant_scale: bool = False) -> tuple[dict, dict]:
    """``sd`` (any FLUX family, BFL names) with the Linears ``names`` stored in ComfyUI format ``fmt`` by
    ComfyUI's own writer, the others as they are (Comfy-Org's "fp8mixed" files are this with
    ``float8_e4m3fn``); returns the tensors and the float32 weights the quantized layers compute with."""
    import comfy.ops
    from comfy.quant_ops import QUANT_ALGOS, QuantizedTensor

    sd = dict(sd)
    g = torch.Generator().manual_seed(seed + 100)
    ops = comfy.ops.mixed_precision_ops({}, torch.float32)
    layout = QUANT_ALGOS[fmt]["comfy_tensor_layout"]
    out, expected = {}, {}
    for name in names:
        w = sd.pop(f"{name}.weight")
        rows, cols = w.shape
        t = ternary(rows, cols, g)
        kwargs = {}
        if fmt in ("float8_e4m3fn", "float8_e5m2", "int8_tensorwise"):  # one scale per tensor
            scale = torch.tensor(0.0137 + 0.0011 * len(out), dtype=torch.float32)
            level = {"float8_e4m3fn": 1.75, "float8_e5m2": 1.5, "int8_tensorwise": 127.0}[fmt]
            w = t * (level * scale)
            kwargs["scale"] = scale
        elif fmt == "mxfp8":  # e8m0 block scales are powers of two: vary them per (row, 64 columns)
            exps = block_values(rows, cols, g, torch.tensor([-9.0, -8.0, -7.0, -6.0]))
            w = t * (1.75 * torch.exp2(exps)).repeat_interleave(64, dim=1)
        else:  # nvfp4: e2m1 code 6 times fp8 block scale (per 16, constant per 64) times a tensor scale
            scale_2 = torch.tensor(0.00173, dtype=torch.float32)
            block = block_values(rows, cols, g, _fp8_values(0.5, 8.0))
            w = t * (6.0 * (scale_2 * block)).repeat_interleave(64, dim=1)
            kwargs["scale"] = scale_2
        lin = ops.Linear(cols, rows, bias=f"{name}.bias" in sd)
        lin.weight = torch.nn.Parameter(QuantizedTensor.from_float(w, layout, **kwargs), requires_grad=False)
        lin.quant_format = fmt
        # ComfyUI's forward otherwise quantizes the activations too; with this it dequantizes the weight
        # and runs a float32 matmul, so a float32 comparison is meaningful
        lin._full_precision_mm_config = True
        if lin.bias is not None:
            lin.bias = torch.nn.Parameter(sd.pop(f"{name}.bias"), requires_grad=False)
        expected[name] = lin.weight.dequantize().float()
        if pre_quant_scale:
            columns = torch.exp2(torch.randint(-2, 3, (cols // 64,), generator=g).float()).repeat_interleave(64)
            lin.pre_quant_scale = torch.nn.Parameter(columns, requires_grad=False)
            expected[name] = expected[name] * columns
        out.update(lin.state_dict(prefix=f"{name}."))
    out.update(sd)
    return {k: v.detach().contiguous() for k, v in out.items()}, expected


def scaled_fp8_flux(cfg: TinyFluxConfig, seed: int = 0) -> tuple[dict, dict]:
    """Comfy-Org's scaled fp8 layout: fp8 weight + ``scale_weight`` per Linear + ``scaled_fp8`` marker
    (two elements: ComfyUI then runs float matmuls on the dequantized weight)."""
    sd = make_tiny_flux(cfg, seed=seed)
    return scaled_fp8_linears(sd, quantized_linears(sd), seed)


def scaled_fp8_linears(sd: dict, names, seed: int = 0) -> tuple[dict, dict]:
    """``sd`` (any FLUX family) in the scaled fp8 layout: the Linears ``names`` fp8 with ``scale_weight``."""
    from comfy.quant_ops import TensorCoreFP8E4M3Layout

    sd = dict(sd)
    g = torch.Generator().manual_seed(seed + 200)
    expected = {}
    for i, name in enumerate(names):
        w = sd[f"{name}.weight"]
        scale = torch.tensor(0.0091 + 0.0007 * i, dtype=torch.float32)
        target = ternary(*w.shape, g) * (1.25 * scale)
        qdata, params = TensorCoreFP8E4M3Layout.quantize(target, scale=scale)
        sd[f"{name}.weight"] = qdata
        sd[f"{name}.scale_weight"] = params.scale.reshape(1)
        expected[name] = TensorCoreFP8E4M3Layout.dequantize(qdata, params).float()
    sd["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    return sd, expected
