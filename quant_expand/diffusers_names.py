"""Each FLUX family's diffusers names: what its diffusers transformer (``FluxTransformer2DModel``,
``Flux2Transformer2DModel``, ``ChromaTransformer2DModel``) calls the layers BFL/ComfyUI files name. Model
files (``save_pretrained``) and LoRAs (PEFT, ``save_lora_weights``) use the same names.

A name with ``{i}`` stands for every index of a repeated module (a block, an approximator layer). The
tables are written from diffusers' model classes and its single-file converters
(``loaders/single_file_utils.py``: ``convert_flux_transformer_checkpoint_to_diffusers`` and its FLUX.2 and
Chroma siblings); ``families.py`` gives each family its table.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

FUSED_SLICES = ("q", "k", "v", "mlp")  # the row slices of a fused BFL layer, in row order

IDX = "{i}"  # where a name holds the index of a repeated module


def _pattern(template: str) -> re.Pattern:
    return re.compile(r"(\d+)".join(re.escape(part) for part in template.split(IDX)))


def _fill(template: str, match: re.Match) -> str:
    return template.replace(IDX, match.group(1)) if match.groups() else template


def _indices(keys: list[str], root: str) -> list[int]:
    """The indices ``keys`` hold under a repeated module's ``root`` (``transformer_blocks.``)."""
    pattern = re.compile(rf"^{re.escape(root)}(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


@dataclass(frozen=True, eq=False)  # compared and hashed as the one table it is (a Family field)
class DiffusersNames:
    """One family's BFL <-> diffusers names."""

    # BFL Linear -> the diffusers Linears whose rows it stacks, in BFL row order (q, k, v[, mlp] of a fused one)
    linears: Mapping[str, tuple[str, ...]]
    # the other tensors (norm scales), BFL key -> diffusers key
    tensors: Mapping[str, str]
    # other diffusers spellings LoRA trainers write for a whole BFL Linear (ComfyUI's LoRA loader maps them too)
    aliases: Mapping[str, str] = field(default_factory=dict)
    # BFL Linears whose two row halves diffusers stores the other way round: BFL's final adaLN emits
    # (shift, scale), diffusers' norm_out.linear (scale, shift)
    swapped: tuple[str, ...] = ()
    # the tables compiled once: (diffusers pattern, diffusers name, BFL pattern, BFL name, row slice) per
    # diffusers Linear name; (BFL pattern, diffusers names) per BFL Linear; (BFL pattern, diffusers
    # pattern, BFL key, diffusers key) per tensor
    _pieces: list = field(init=False, repr=False)
    _linears: list = field(init=False, repr=False)
    _tensors: list = field(init=False, repr=False)

    def __post_init__(self):
        pieces = [(d, bfl, FUSED_SLICES[i] if len(ds) > 1 else None)
                  for bfl, ds in self.linears.items() for i, d in enumerate(ds)]
        pieces += [(d, bfl, None) for d, bfl in self.aliases.items()]
        object.__setattr__(self, "_pieces", [(_pattern(d), d, _pattern(bfl), bfl, part) for d, bfl, part in pieces])
        object.__setattr__(self, "_linears", [(_pattern(bfl), ds) for bfl, ds in self.linears.items()])
        object.__setattr__(self, "_tensors", [(_pattern(bfl), _pattern(d), bfl, d) for bfl, d in self.tensors.items()])

    # -- a model file ------------------------------------------------------------------------------
    def layout(self, keys: Iterable[str]) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
        """For a file's diffusers keys (no prefix): BFL Linear -> the diffusers modules it stacks in row
        order, and BFL tensor key -> diffusers tensor key, for every index the file holds."""
        keys = list(keys)
        indices: dict[str, list[int]] = {}  # by root

        def expand(bfl: str, ds: tuple[str, ...]):
            if IDX not in bfl:
                return [(bfl, ds)]
            root = ds[0].split(IDX)[0]
            if root not in indices:
                indices[root] = _indices(keys, root)
            return [(bfl.replace(IDX, str(i)), tuple(d.replace(IDX, str(i)) for d in ds)) for i in indices[root]]

        linears = dict(pair for bfl, ds in self.linears.items() for pair in expand(bfl, ds))
        tensors = {}
        for bfl, d in self.tensors.items():
            tensors.update({b: ds[0] for b, ds in expand(bfl, (d,))})
        return linears, tensors

    def key(self, bfl_key: str) -> Optional[str]:
        """The diffusers key of a BFL key: a tensor's, or a Linear's weight/bias (its first piece's)."""
        for pattern, _, _, d in self._tensors:
            m = pattern.fullmatch(bfl_key)
            if m:
                return _fill(d, m)
        module, _, end = bfl_key.rpartition(".")
        for pattern, ds in self._linears:
            m = pattern.fullmatch(module)
            if m:
                return f"{_fill(ds[0], m)}.{end}"
        return None

    # -- a LoRA --------------------------------------------------------------------------------------
    def linear_of(self, name: str) -> Optional[tuple[str, Optional[str]]]:
        """``(BFL Linear, the row slice it is of a fused one, or None)`` of a diffusers Linear name; None
        if the table has no such name."""
        for pattern, _, _, bfl, part in self._pieces:
            m = pattern.fullmatch(name)
            if m:
                return _fill(bfl, m), part
        return None

    def tensor_of(self, key: str) -> Optional[str]:
        """The BFL key of a diffusers tensor key (a norm scale), or None."""
        for _, pattern, bfl, _ in self._tensors:
            m = pattern.fullmatch(key)
            if m:
                return _fill(bfl, m)
        return None

    def linear_names(self, bfl_linears: Iterable[str]) -> dict[str, tuple[str, Optional[str]]]:
        """Every diffusers Linear name (aliases included) of a model with these BFL Linears -> as
        :meth:`linear_of` reads it."""
        bfl_linears = list(bfl_linears)
        out = {}
        for _, d, pattern, _, part in self._pieces:
            for name in bfl_linears:
                m = pattern.fullmatch(name)
                if m:
                    out[_fill(d, m)] = (name, part)
        return out

    def roots(self) -> tuple[set[str], set[str]]:
        """The top-level module names (each with its dot) of the BFL and of the diffusers names."""
        def root(name):
            return name.split(".")[0] + "."
        bfl = {root(n) for n in (*self.linears, *self.tensors)}
        diffusers = {root(d) for ds in self.linears.values() for d in ds}
        diffusers |= {root(d) for d in (*self.tensors.values(), *self.aliases)}
        return bfl, diffusers


def _in_blocks(double: Mapping, single: Mapping) -> dict:
    """Tables of names inside one block (double, single) as names under every block, BFL -> diffusers; a
    value is a tuple of diffusers names or one name."""
    def under(bfl_root, d_root, table):
        def name(d):
            return f"{d_root}.{IDX}.{d}"
        return {f"{bfl_root}.{IDX}.{bfl}": (tuple(map(name, ds)) if isinstance(ds, tuple) else name(ds))
                for bfl, ds in table.items()}
    return {**under("double_blocks", "transformer_blocks", double),
            **under("single_blocks", "single_transformer_blocks", single)}


# FLUX.1 (FluxTransformer2DModel), inside a block: BFL Linear -> diffusers Linears, in BFL row order
_FLUX1_DOUBLE = {
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
_FLUX1_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
# the QK-norm scales every family has (BFL files say .scale, ComfyUI's models .weight)
_QK_NORMS = _in_blocks({"img_attn.norm.query_norm.scale": "attn.norm_q.weight",
                        "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                        "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                        "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"},
                       {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"})
_SWAPPED = ("final_layer.adaLN_modulation.1",)

FLUX1_NAMES = DiffusersNames(
    linears={
        "img_in": ("x_embedder",),
        "txt_in": ("context_embedder",),
        "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
        "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
        "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
        "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
        "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
        "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
        "final_layer.linear": ("proj_out",),
        "final_layer.adaLN_modulation.1": ("norm_out.linear",),
        **_in_blocks(_FLUX1_DOUBLE, _FLUX1_SINGLE),
    },
    tensors=_QK_NORMS,
    # LyCORIS' MLP names and FLUX.2's fused single-block names for the same layers
    aliases={d: bfl for bfl, d in _in_blocks({"img_mlp.0": "ff.linear_in", "img_mlp.2": "ff.linear_out",
                                              "txt_mlp.0": "ff_context.linear_in", "txt_mlp.2": "ff_context.linear_out"},
                                             {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}).items()},
    swapped=_SWAPPED)

# FLUX.2 (Flux2Transformer2DModel): three global modulation Linears instead of one per block, gated MLPs
# named linear_in/linear_out, a single block's fused Linears kept fused, time and guidance embedders
# under time_guidance_embed
FLUX2_NAMES = DiffusersNames(
    linears={
        "img_in": ("x_embedder",),
        "txt_in": ("context_embedder",),
        "time_in.in_layer": ("time_guidance_embed.timestep_embedder.linear_1",),
        "time_in.out_layer": ("time_guidance_embed.timestep_embedder.linear_2",),
        "guidance_in.in_layer": ("time_guidance_embed.guidance_embedder.linear_1",),
        "guidance_in.out_layer": ("time_guidance_embed.guidance_embedder.linear_2",),
        "double_stream_modulation_img.lin": ("double_stream_modulation_img.linear",),
        "double_stream_modulation_txt.lin": ("double_stream_modulation_txt.linear",),
        "single_stream_modulation.lin": ("single_stream_modulation.linear",),
        "final_layer.linear": ("proj_out",),
        "final_layer.adaLN_modulation.1": ("norm_out.linear",),
        **_in_blocks({**{k: v for k, v in _FLUX1_DOUBLE.items() if k.endswith(("attn.qkv", "attn.proj"))},
                      "img_mlp.0": ("ff.linear_in",), "img_mlp.2": ("ff.linear_out",),
                      "txt_mlp.0": ("ff_context.linear_in",), "txt_mlp.2": ("ff_context.linear_out",)},
                     {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}),
    },
    tensors=_QK_NORMS,
    swapped=_SWAPPED)

# Chroma (ChromaTransformer2DModel): FLUX.1's blocks without their modulation Linears; no time, vector or
# guidance embedders and no final adaLN: the approximator (distilled_guidance_layer) gives all modulation
CHROMA_NAMES = DiffusersNames(
    linears={
        "img_in": ("x_embedder",),
        "txt_in": ("context_embedder",),
        "distilled_guidance_layer.in_proj": ("distilled_guidance_layer.in_proj",),
        f"distilled_guidance_layer.layers.{IDX}.in_layer": (f"distilled_guidance_layer.layers.{IDX}.linear_1",),
        f"distilled_guidance_layer.layers.{IDX}.out_layer": (f"distilled_guidance_layer.layers.{IDX}.linear_2",),
        "distilled_guidance_layer.out_proj": ("distilled_guidance_layer.out_proj",),
        "final_layer.linear": ("proj_out",),
        **_in_blocks({k: v for k, v in _FLUX1_DOUBLE.items() if "_mod." not in k},
                     {k: v for k, v in _FLUX1_SINGLE.items() if k != "modulation.lin"}),
    },
    tensors={**_QK_NORMS, f"distilled_guidance_layer.norms.{IDX}.scale": f"distilled_guidance_layer.norms.{IDX}.weight"},
    aliases=FLUX1_NAMES.aliases)
