"""FLUX.1 facts: which file layout a checkpoint has, BFL <-> diffusers names; which layers stay unquantized
(per family: ``families.py``)."""
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


# FLUX.1's one name table, BFL -> diffusers (checkpoints read it this way; lora/naming.py reverses it).
# BFL module (inside a block) -> diffusers modules whose rows it stacks, in BFL row order
DIFFUSERS_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
}


DIFFUSERS_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}


DIFFUSERS_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # (scale, shift) rows; BFL has (shift, scale)
}


DIFFUSERS_NORMS_DOUBLE = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                           "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}


DIFFUSERS_NORMS_SINGLE = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}


SWAPPED_HALVES = "final_layer.adaLN_modulation.1"
FUSED_SLICES = ("q", "k", "v", "mlp")  # the row slices of a fused BFL layer, in row order

# other spellings LoRA trainers use for the same layers, which ComfyUI's LoRA loader maps too
DIFFUSERS_ALIASES_DOUBLE = {"ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",  # LyCORIS
                            "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
DIFFUSERS_ALIASES_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}  # fused (Flux 2)


def diffusers_to_bfl(table: dict, aliases: dict) -> dict[str, tuple[str, Optional[str]]]:
    """A block's table reversed: diffusers name -> (BFL name, the row slice it is of a fused layer, or None)."""
    out = {}
    for bfl, pieces in table.items():
        for i, d in enumerate(pieces):
            out[d] = (bfl, FUSED_SLICES[i] if len(pieces) > 1 else None)
    out.update({d: (bfl, None) for d, bfl in aliases.items()})
    return out


def block_count(keys: Iterable[str], root: str) -> int:
    pattern = re.compile(rf"^{re.escape(root)}\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def diffusers_layout(keys: Iterable[str]) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """For diffusers module names (no prefix): BFL Linear -> diffusers modules stacked in row order, and
    BFL norm key (``...scale``) -> diffusers tensor key."""
    keys = list(keys)
    linears = {bfl: (d,) for bfl, d in DIFFUSERS_TOP.items()}
    norms = {}
    for i in range(block_count(keys, "transformer_blocks")):
        for bfl, ds in DIFFUSERS_DOUBLE.items():
            linears[f"double_blocks.{i}.{bfl}"] = tuple(f"transformer_blocks.{i}.{d}" for d in ds)
        for bfl, d in DIFFUSERS_NORMS_DOUBLE.items():
            norms[f"double_blocks.{i}.{bfl}.scale"] = f"transformer_blocks.{i}.{d}.weight"
    for i in range(block_count(keys, "single_transformer_blocks")):
        for bfl, ds in DIFFUSERS_SINGLE.items():
            linears[f"single_blocks.{i}.{bfl}"] = tuple(f"single_transformer_blocks.{i}.{d}" for d in ds)
        for bfl, d in DIFFUSERS_NORMS_SINGLE.items():
            norms[f"single_blocks.{i}.{bfl}.scale"] = f"single_transformer_blocks.{i}.{d}.weight"
    return linears, norms


def bfl_file_key(model_key: str) -> str:
    """ComfyUI calls the QK-norm scales ``*_norm.weight``; BFL and Forge files say ``*_norm.scale``."""
    return model_key[: -len(".weight")] + ".scale" if model_key.endswith("_norm.weight") else model_key


# ComfyUI builds FLUX with num_heads = hidden // 128, so every QK-norm scale has 128 entries.
HEAD_DIM = 128


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)
