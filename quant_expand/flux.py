"""FLUX facts: which file layout a checkpoint has; which layers stay unquantized (per family:
``families.py``; diffusers names per family: ``diffusers_names.py``)."""
from __future__ import annotations

import re
from typing import Iterable, Optional

import torch

from .families import FLUX1, Family
from .spec import QuantSpec

FLUX_BFL_MARKERS = ("double_blocks.0.img_attn.norm.key_norm.scale", "double_blocks.0.img_attn.norm.key_norm.weight")


FLUX_DIFFUSERS_MARKER = "transformer_blocks.0.attn.norm_k.weight"


def default_should_quantize(name: str, in_features: int, spec: QuantSpec, quantize_img_in: bool = False,
                            family: Optional[Family] = None) -> bool:
    """Which Linears of a full-precision file get quantized (on load and by ``cli quantize``): all but
    those ``family`` (FLUX.1 unless given) keeps in the compute dtype, see ``families.py``."""
    family = family or FLUX1
    if name == "img_in" and quantize_img_in:
        return spec.can_quantize(in_features)
    if family.keeps_float(name):
        return False
    return spec.can_quantize(in_features)


def block_count(keys: Iterable[str], root: str) -> int:
    pattern = re.compile(rf"^{re.escape(root)}\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def bfl_file_key(model_key: str) -> str:
    """ComfyUI calls the QK-norm scales ``*_norm.weight``; BFL and Forge files say ``*_norm.scale``."""
    return model_key[: -len(".weight")] + ".scale" if model_key.endswith("_norm.weight") else model_key


# ComfyUI builds FLUX with num_heads = hidden // 128, so every QK-norm scale has 128 entries.
HEAD_DIM = 128


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)
