"""Apply Control LoRA and Set LoRA Scale: a parsed LoRA as ComfyUI patches, and which LoRAs a model carries."""
from __future__ import annotations

import dataclasses
import uuid
from typing import Optional

import comfy.weight_adapter as weight_adapter
import torch

from ..errors import BnbFluxError
from ..families import FLUX1, Family, family_by_comfy_model
from .patches import required_in_features

APPLIED_LORAS = "bnb_flux_applied_loras"


@dataclasses.dataclass(frozen=True)
class AppliedLora:
    """One LoRA file applied by Apply Control LoRA or Apply LoRA Stack."""

    patch_ids: frozenset  # id() of its patch objects inside ModelPatcher.patches (Set LoRA Scale finds them so)
    control: bool  # a Control LoRA (at most one per model)
    strength: float  # as this model carries it (Set LoRA Scale reports the value it replaces)
    node_id: Optional[str] = None  # the prompt's id of the node that applied it (the editor annotates its badge)


class AppliedLoras:
    """Which LoRAs a model had applied by Apply Control LoRA or Apply LoRA Stack, by file name. A patcher attachment, copied on
    clone, so each branch of a graph keeps its own record."""

    def __init__(self, entries=None):
        self.entries: dict[str, AppliedLora] = dict(entries or {})

    def on_model_patcher_clone(self):
        return AppliedLoras(self.entries)

    @staticmethod
    def of(patcher) -> "AppliedLoras":
        return patcher.get_attachment(APPLIED_LORAS) or AppliedLoras()


def is_linear_layer(module) -> bool:
    """A Linear of any op class ComfyUI builds FLUX with: ``comfy.ops.mixed_precision_ops.Linear`` (scaled
    fp8, ``comfy_quant`` files) is a plain ``nn.Module`` with a weight and in/out features, not an
    ``nn.Linear``."""
    return isinstance(module, torch.nn.Linear) or (
        isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
        and "weight" in getattr(module, "_parameters", {}))


def linear_shapes(patcher) -> dict[str, tuple[int, int]]:
    """BFL name -> (out, in) of every Linear of the diffusion model as this clone will run it
    (a widened img_in counts with its new width)."""
    dm = patcher.get_model_object("diffusion_model")
    shapes = {}
    for name, m in dm.named_modules():
        if is_linear_layer(m):
            current = patcher.get_model_object(f"diffusion_model.{name}")
            shapes[name] = (current.out_features, current.in_features)
    for key, patch_list in patcher.patches.items():  # widening queued on a stock patcher (ComfyUI's reshape)
        width = required_in_features(patch_list)
        name = key[len("diffusion_model."):-len(".weight")] if key.startswith("diffusion_model.") else None
        if width and name in shapes and width > shapes[name][1]:
            shapes[name] = (shapes[name][0], width)
    return shapes


def lora_patches(parsed, shapes: dict[str, tuple[int, int]]) -> dict:
    """ComfyUI patches for a parsed LoRA: LoRA adapters (``lora_A`` zero-padded to the layer's logical
    width; ``reshape`` where the LoRA widens the layer), bias diffs, and norm ``set`` patches."""
    patches = {}
    for layer in parsed.layers:
        out_features, in_features = shapes[layer.module]
        width = parsed.widened.get(layer.module, in_features)
        down = layer.down
        if down.shape[1] < width:
            down = torch.nn.functional.pad(down, (0, width - down.shape[1]))
        reshape = [out_features, width] if layer.module in parsed.widened else None
        key = f"diffusion_model.{layer.module}.weight"
        rows = layer.up.shape[0]
        offset = None if (layer.row_offset == 0 and rows == out_features) else (0, layer.row_offset, rows)
        patches[key if offset is None else (key, offset)] = weight_adapter.LoRAAdapter(
            set(), (layer.up, down, layer.alpha, None, None, reshape))
        if layer.bias is not None:
            bkey = f"diffusion_model.{layer.module}.bias"
            patches[bkey if offset is None else (bkey, offset)] = ("diff", (layer.bias,))
    for module, bias in getattr(parsed, "bias_diffs", {}).items():
        patches[f"diffusion_model.{module}.bias"] = ("diff", (bias,))
    for key, value in parsed.norm_sets.items():
        model_key = key[: -len(".scale")] + ".weight" if key.endswith("_norm.scale") else key
        patches[f"diffusion_model.{model_key}"] = ("set", (value,))
    return patches


# what only a BFL Control LoRA holds (in BFL or diffusers names): full QK-norm scales and reshape requests
_CONTROL_ONLY = ("_norm.scale", ".reshape_weight", "attn.norm_q.weight", "attn.norm_k.weight",
                 "attn.norm_added_q.weight", "attn.norm_added_k.weight")


def model_family(model) -> Family:
    """The FLUX family of a patcher's model, as ComfyUI detected it (FLUX.1 for anything unknown)."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    image_model = getattr(config, "unet_config", {}).get("image_model")
    return family_by_comfy_model(image_model) or FLUX1


def refuse_control_lora_elsewhere(model, keys, lora_name: str, is_control: bool = False):
    """Control LoRAs (Canny/Depth) exist for FLUX.1 only: on another family, say so instead of the
    missing layers the parse would name. Checked on the keys before parsing, and on the parse."""
    family = model_family(model)
    if family.control_loras:
        return
    if is_control or any(k.endswith(_CONTROL_ONLY) for k in keys):
        raise BnbFluxError(f"{lora_name}: a FLUX.1 Control LoRA, and the model is "
                           f"{family.variant(linear_shapes(model))}: Control LoRAs work with FLUX.1 models only; "
                           f"load a FLUX.1 model for it, or use a LoRA made for {family.title}")


def apply_lora(model, parsed, strength: float, lora_name: str, node_id: Optional[str] = None):
    """A clone of ``model`` with the LoRA's patches at ``strength`` (0 included: the widening and the
    norm sets are part of the model's shape, unlike ComfyUI's LoraLoader which skips at 0); ``node_id``:
    the node that applies it, kept in the record."""
    applied = AppliedLoras.of(model)
    if lora_name in applied.entries:
        raise BnbFluxError(f"{lora_name}: already applied to this model; use Set LoRA Scale to change its "
                           f"strength instead of applying it twice")
    if parsed.is_control:
        refuse_control_lora_elsewhere(model, (), lora_name, is_control=True)
        other = [n for n, e in applied.entries.items() if e.control]
        if other:
            raise BnbFluxError(f"{lora_name}: a Control LoRA ({other[0]}) is already applied; two Control LoRAs "
                               f"would both claim the control channels of img_in: use one per model")
        # one applied by ComfyUI's own LoRA loaders leaves no record here, only its widening patch on img_in
        if required_in_features(model.patches.get("diffusion_model.img_in.weight", [])):
            raise BnbFluxError(f"{lora_name}: the model already has a Control LoRA (applied by a LoRA loader node "
                               f"upstream); two Control LoRAs would both claim the control channels of img_in: "
                               f"use one per model")
    shapes = linear_shapes(model)
    patches = lora_patches(parsed, shapes)
    m = model.clone()
    accepted = set(m.add_patches(patches, strength))
    missing = [k if isinstance(k, str) else k[0] for k in patches if k not in accepted]
    if missing:
        raise BnbFluxError(f"{lora_name}: the model has no {missing[0].removeprefix('diffusion_model.')} "
                           f"({len(missing)} layer(s) not found); is this LoRA for {model_family(model).title}?")
    record = AppliedLoras.of(m)  # the clone's own copy (ModelPatcher.clone calls on_model_patcher_clone)
    record.entries[lora_name] = AppliedLora(frozenset(id(v) for v in patches.values()), parsed.is_control,
                                            strength, node_id)
    m.set_attachments(APPLIED_LORAS, record)
    return m


def applied_lora(model, lora_name: str) -> AppliedLora:
    """The record of ``lora_name`` on ``model``; fails naming the LoRAs that are applied."""
    applied = AppliedLoras.of(model)
    entry = applied.entries.get(lora_name)
    if entry is None:
        names = ", ".join(sorted(applied.entries))
        if names:
            raise BnbFluxError(f"{lora_name}: not applied to this model (applied upstream by Apply Control LoRA or "
                               f"Apply LoRA Stack: {names}); pick one of those in lora_name")
        raise BnbFluxError(f"{lora_name}: not applied to this model: no LoRA is applied upstream; add Apply "
                           f"Control LoRA or Apply LoRA Stack before this node")
    return entry


def set_lora_scale(model, lora_name: str, strength: float):
    """A clone whose patches of ``lora_name`` carry ``strength``: nothing is reloaded or requantized;
    the next load re-stacks the lazy deltas with the new number."""
    entry = applied_lora(model, lora_name)
    m = model.clone()
    ids = entry.patch_ids
    for key, plist in m.patches.items():
        if any(id(p[1]) in ids for p in plist):
            m.patches[key] = [(strength,) + p[1:] if id(p[1]) in ids else p for p in plist]
    m.patches_uuid = uuid.uuid4()
    record = AppliedLoras.of(m)  # the clone's own copy
    record.entries[lora_name] = dataclasses.replace(entry, strength=strength)
    m.set_attachments(APPLIED_LORAS, record)
    return m
