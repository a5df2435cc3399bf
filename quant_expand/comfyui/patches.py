"""ComfyUI's LoRA patches translated into lazy deltas, layer widening, and the originals behind merged weights."""
from __future__ import annotations

import copy
from typing import Optional

import comfy.lora
import comfy.model_detection
import comfy.model_patcher
import comfy.ops
import comfy.utils
import comfy.weight_adapter as weight_adapter
import torch

from ..layers import QuantLinear, is_quantized_linear
from ..lora.delta import LazyLoraDelta, LoraTerm
from ..widening import expand_in_features


def unmerged(patcher, key: str, current: torch.Tensor) -> torch.Tensor:
    """``current`` (the model's tensor at ``key``) without the patches another clone merged into it while
    loaded: ComfyUI keeps the original in the backup every clone shares (``ModelPatcher.backup``)."""
    backup = patcher.backup.get(key)
    # a backup of another shape belongs to a widened stand-in layer (its merges never touched ours)
    if backup is not None and backup.weight.shape == current.shape:
        return backup.weight
    return current


def _patch_kind(v) -> Optional[str]:
    """The kind of one of ComfyUI's tuple patches (``("diff", (tensor, extra))``, ``("set", ...)``), or
    None for adapters and anything else. ``v[0]`` may be a tensor: comparing that with a string goes
    through torch, per key per change."""
    return v[0] if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) else None


def required_in_features(patch_list) -> Optional[int]:
    """The input width a key's patches ask for (a Control LoRA's ``reshape`` or a padded diff), if any."""
    width = None
    for _strength, v, _sm, offset, _fn in patch_list:
        if offset is not None:
            continue
        shape = None
        if isinstance(v, weight_adapter.LoRAAdapter) and v.weights[5] is not None:
            shape = v.weights[5]
        elif _patch_kind(v) == "diff" and len(v[1]) > 1 and v[1][1].get("pad_weight"):
            shape = v[1][0].shape
        if shape is not None and len(shape) == 2:
            width = max(width or 0, int(shape[1]))
    return width


def widened_linear(module: torch.nn.Linear, width: int, unpatched: Optional[dict] = None) -> torch.nn.Linear:
    """``module`` taking ``width`` inputs; ``unpatched``: its parameters by name without any clone's merged
    patches (see :func:`unmerged`), in place of its own."""
    if is_quantized_linear(module):
        return expand_in_features(module, width)
    unpatched = unpatched or {}
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    if "bias" in unpatched:
        new.bias = torch.nn.Parameter(unpatched["bias"].detach(), requires_grad=False)
    weight = unpatched.get("weight", module.weight).detach()
    new.in_features = width
    new.weight = torch.nn.Parameter(torch.nn.functional.pad(weight, (0, width - weight.shape[1])), requires_grad=False)
    return new


# Adapters whose effect is "weight + something independent of weight": they commute with LoRA terms,
# so they can run on the dequantized weight before the stacked low-rank update is added.
_ADDITIVE_ADAPTERS = (weight_adapter.LoHaAdapter, weight_adapter.LoKrAdapter)


def plain_lora_term(patch, module, key) -> Optional[LoraTerm]:
    """A LoRA patch that is exactly ``strength * alpha/rank * up @ down`` (on optional qkv rows)."""
    strength, v, strength_model, offset, function = patch
    if strength_model != 1.0 or function is not None or not isinstance(v, weight_adapter.LoRAAdapter):
        return None
    up, down, alpha, mid, dora_scale, reshape = v.weights
    if mid is not None or dora_scale is not None or up.ndim != 2 or down.ndim != 2:
        return None
    if reshape is not None and list(reshape) != [module.out_features, module.in_features]:
        return None
    row_offset = 0
    if offset is not None:
        dim, start, length = offset
        if dim != 0 or up.shape[0] != length:
            return None
        row_offset = start
    elif up.shape[0] != module.out_features:
        return None
    if down.shape[1] > module.in_features:
        return None
    scale = strength * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
    return LoraTerm(down=down, up=up, scale=scale, row_offset=row_offset)


def _is_additive(patch) -> bool:
    strength, v, strength_model, offset, function = patch
    if strength_model != 1.0 or function is not None or offset is not None:
        return False
    if isinstance(v, _ADDITIVE_ADAPTERS):
        return True
    return _patch_kind(v) == "diff" and len(v[1]) == 1


def _full_weight_fn(patches, key):
    def apply(weight: torch.Tensor) -> torch.Tensor:
        # ComfyUI merges in float32 (comfy.lora.calculate_weight); do the same, per forward
        return comfy.lora.calculate_weight(patches, weight.float(), key).to(weight.dtype)
    return apply


def lazy_bias_terms(patches: list, out_features: int):
    """Additive bias diffs (a Control LoRA's ``lora_B.bias``) as ``(full-length tensor, strength)``,
    or None when some patch on the bias is anything else (then ComfyUI merges it as usual)."""
    terms = []
    for strength, v, strength_model, offset, function in patches:
        if strength_model != 1.0 or function is not None or not (_patch_kind(v) == "diff" and len(v[1]) == 1):
            return None
        diff = v[1][0]
        if offset is not None:
            dim, start, length = offset
            if dim != 0 or diff.shape[0] != length:
                return None
            diff = torch.nn.functional.pad(diff, (start, out_features - start - length))
        if diff.shape != (out_features,):
            return None
        terms.append((diff, strength))
    return terms


def build_lazy_delta(patches: list, module: QuantLinear, key: str, bias_terms=()) -> LazyLoraDelta:
    terms, others = [], []
    for p in patches:
        term = plain_lora_term(p, module, key)
        if term is not None:
            terms.append(term)
        else:
            others.append(p)
    if others and not all(_is_additive(p) for p in others):
        # order matters for set/OFT/DoRA/GLoRA...: apply every patch in ComfyUI's order
        return LazyLoraDelta(module.out_features, module.in_features, weight_fn=_full_weight_fn(patches, key),
                             bias_terms=bias_terms)
    return LazyLoraDelta(module.out_features, module.in_features, terms,
                         weight_fn=_full_weight_fn(others, key) if others else None, bias_terms=bias_terms)


class MergeSignature:
    """What a key's merged weight depends on: the patch objects (by identity, held so that no other
    object can take their id), their strengths (except for ``set``, which ignores strength), and the
    rest of each patch tuple."""

    def __init__(self, patch_list):
        self.objects = [(v, function) for _s, v, _sm, _o, function in patch_list]
        self.key = tuple((id(v), None if _patch_kind(v) == "set" else strength, strength_model, offset, id(function))
                         for strength, v, strength_model, offset, function in patch_list)

    def __eq__(self, other):
        return isinstance(other, MergeSignature) and self.key == other.key
