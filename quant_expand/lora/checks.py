"""What a LoRA file's tensors must satisfy before they reach a model: dtypes, widths, finite and bounded updates."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..checkpoint.tensor_files import all_finite
from ..errors import LoraFormatError
from ..spec import FLOAT16_MAX
from .canonical import LoraTarget
from .naming import preview_keys

# dtypes a LoRA's weights may have (what ComfyUI and trainers write); anything else is a damaged file or
# not a LoRA: an int8/bool "lora_A" would be applied as if its codes were weights
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)


# alpha and ComfyUI's reshape_weight are plain numbers: any real dtype, but not bool
NUMBER_DTYPES = WEIGHT_DTYPES + (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


_F32_MAX = torch.finfo(torch.float32).max


def read_tensor(tensors: Any, key: str, name: str, numbers: bool = False) -> torch.Tensor:
    """A tensor of the file, checked: a weight dtype (a number dtype for alpha/reshape when ``numbers``)
    and finite values."""
    t = tensors.get(key) if hasattr(tensors, "get") else tensors[key]
    if not isinstance(t, torch.Tensor):
        raise LoraFormatError(f"{name}: {key} is not a tensor")
    allowed = NUMBER_DTYPES if numbers else WEIGHT_DTYPES
    if t.dtype not in allowed:
        what = "a number" if numbers else "floating point (float32, float16, bfloat16 or float8)"
        raise LoraFormatError(f"{name}: tensor {key} has dtype {str(t.dtype).replace('torch.', '')}, but it must be "
                              f"{what}; the file is damaged or not a LoRA: use another copy of this LoRA")
    if not all_finite(t):
        raise LoraFormatError(f"{name}: tensor {key} contains NaN or inf values; "
                              f"the file is damaged or the training diverged: use another copy of this LoRA")
    return t


# a LoRA's update W += scale * up @ down is added to weights of magnitude ~1; an update entry past float16's
# largest value is no trained LoRA (a flipped exponent bit), and in the compute dtype it turns activations to inf
DELTA_MAX = FLOAT16_MAX


ALPHA_SCALE_MAX = 1e4  # |alpha / rank|: trainers write alpha <= rank (scale <= 1), a few use alpha = 2 * rank or so


def _update_abs_max(down: torch.Tensor, up: torch.Tensor, scale: float, rows: int = 1024) -> float:
    """``max |scale * up @ down|`` in float32, a block of rows at a time (inf where it overflows)."""
    d = down.to(torch.float32)
    return max((float((up[r:r + rows].to(torch.float32) @ d).abs().max()) * abs(scale)
                for r in range(0, up.shape[0], rows)), default=0.0)


def _abs_max(t: torch.Tensor) -> float:
    return float(t.double().abs().max()) if t.numel() else 0.0


def check_magnitude(name: str, what: str, down: torch.Tensor, up: torch.Tensor, scale: float):
    """Every entry of ``scale * up @ down`` is at most ``|scale| * rank * max|up| * max|down|``; past float32's
    range the update is inf/NaN in the model (ComfyUI computes LoRA weights in float32): a corrupted
    exponent or alpha, refused here instead of sampling black images."""
    if not math.isfinite(scale) or abs(scale) > ALPHA_SCALE_MAX:
        raise LoraFormatError(f"{name}: lora for {what} has alpha/rank {scale:.3g}; LoRA trainers write alphas up to "
                              f"about the rank (a scale near 1), an alpha this large is a damaged file: use another "
                              f"copy of this LoRA")
    bound = abs(scale) * down.shape[0] * _abs_max(up) * _abs_max(down)
    if not bound <= DELTA_MAX and bound <= _F32_MAX:
        # the bound is the worst case: a high-rank LoRA (an SVD extraction) can pass it with a small update
        bound = _update_abs_max(down, up, scale)
    if not bound <= DELTA_MAX:
        overflow = "overflows float32" if not bound <= _F32_MAX else "overflows float16 and breaks a bf16 matmul"
        raise LoraFormatError(f"{name}: lora for {what} has values so large (|alpha/rank| {abs(scale):.3g}, largest "
                              f"|lora_B| {_abs_max(up):.3g}, |lora_A| {_abs_max(down):.3g}) that its update {overflow}; "
                              f"the file is damaged: use another copy of this LoRA")


def layer_name(target: LoraTarget, source: str) -> str:
    where = target.module
    if target.rows is not None:
        where += f" rows {target.row_offset}:{target.row_offset + target.rows}"
    return where if source in ("", target.module) else f"{where} ({source})"


def check_inputs(name: str, what: str, module: str, width: int, modules: dict[str, tuple[int, int]],
                 model: str) -> Optional[int]:
    """Accept ``width`` inputs for ``module``; returns the width the module must be widened to, if any.
    ``model``: the family's name, for the message."""
    current = modules[module][1]
    if width == current:
        return None
    if module == "img_in":
        # FLUX's latent patch width is final_layer's output (64 for FLUX.1); a Control LoRA feeds image
        # + control latent (2x); an ordinary LoRA keeps the latent width and is zero-padded when wider
        latent = modules.get("final_layer.linear", (current, 0))[0]
        if width == latent and width < current:
            return None
        if width == 2 * latent and width > current:
            return width
        if current == latent:
            hint = f"{current} (or {2 * latent} after a Control LoRA)"
        elif current == 2 * latent:
            hint = f"{current} ({latent} before a Control LoRA widened it)"
        else:
            hint = str(current)
        raise LoraFormatError(f"{name}: lora for {what} has {width} inputs, model has {hint}; "
                              f"use a LoRA made for this {model} model")
    raise LoraFormatError(f"{name}: lora for {what} has {width} inputs, model has {current}; "
                          f"use a LoRA made for this {model} model")


def check_missing(name: str, missing: list[str]):
    if missing:
        raise LoraFormatError(f"{name}: targets layers this model does not have: {preview_keys(missing, 5)}; "
                              f"the LoRA was made for a larger or different FLUX model: use one made for this model")


def check_vector(name: str, what: str, entry: tuple[str, torch.Tensor], rows: int, model: str):
    key, t = entry
    if tuple(t.shape) != (rows,):
        raise LoraFormatError(f"{name}: bias {key} for {what} has shape {tuple(t.shape)}, expected ({rows},); "
                              f"use a LoRA made for this {model} model")
