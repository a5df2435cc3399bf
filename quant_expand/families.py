"""The FLUX families Load BnB Flux reads, one table: how a file shows which family it is, what ComfyUI
calls the model, and which Linears stay in the compute dtype (with why).

A new family is one :class:`Family` here, its diffusers names in ``diffusers_names.py`` and, where it
needs one, its test model in ``testing/``; the reader, loader and command line ask this table instead of naming a family.
Detection looks at key names without the file's prefix, after the reader found the FLUX layout
(``double_blocks.0.img_attn.norm.key_norm``, which every family here has, or its diffusers name): a
family's markers, in BFL names or translated by its diffusers table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from .diffusers_names import CHROMA_NAMES, FLUX1_NAMES, FLUX2_NAMES, DiffusersNames


@dataclass(frozen=True)
class Family:
    key: str                      # short id: flux1, flux2, chroma
    title: str                    # what messages call it
    comfy_model: str              # ComfyUI's unet_config["image_model"] for it
    markers: tuple[str, ...]      # a key (BFL names, no prefix) only this family has; () for the fallback
    unquantized: tuple[str, ...]  # Linear name prefixes the quantize-on-load default keeps in the compute dtype
    unquantized_why: str
    core_linears: tuple[str, ...]  # Linears every model of the family has outside its blocks
    double_linears: tuple[str, ...]  # Linears of each double block (under double_blocks.<i>.)
    single_linears: tuple[str, ...]  # Linears of each single block (under single_blocks.<i>.)
    diffusers: DiffusersNames     # its diffusers names (model files and LoRAs), diffusers_names.py
    block_roots: tuple[str, ...] = ("double_blocks", "single_blocks")
    control_loras: bool = False    # BFL Control LoRAs (Canny/Depth) exist for it
    # how a user's name for the model follows from its Linears: (Linear name prefix, name with one, name without)
    variants: Optional[tuple[str, str, str]] = None

    def expected_linears(self, doubles: int, singles: int) -> list[str]:
        """Every Linear a model of this family with these block counts must have (optional ones aside)."""
        out = list(self.core_linears)
        out += [f"double_blocks.{i}.{n}" for i in range(doubles) for n in self.double_linears]
        out += [f"single_blocks.{i}.{n}" for i in range(singles) for n in self.single_linears]
        return out

    def diffusers_markers(self) -> tuple[str, ...]:
        """The markers in diffusers names."""
        return tuple(k for k in map(self.diffusers.key, self.markers) if k is not None)

    def keeps_float(self, name: str) -> bool:
        return name.startswith(self.unquantized)

    def variant(self, linears: Iterable[str]) -> str:
        """The name a user knows the model by, from its Linears' names (as ComfyUI tells FLUX.1 dev from
        schnell and FLUX.2 [dev] from [klein]: guidance_embed, i.e. a guidance embedder)."""
        if self.variants is None:
            return self.title
        prefix, with_it, without = self.variants
        return with_it if any(n.startswith(prefix) for n in linears) else without


# the attention and MLP Linears of a double block, img and txt streams (FLUX.1 adds a modulation per stream)
_DOUBLE = tuple(f"{s}_{m}" for s in ("img", "txt") for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2"))

FLUX1 = Family(
    key="flux1", title="FLUX.1", comfy_model="flux", markers=(),
    # the embedders and the output layer hold ~0.4 % of FLUX.1's parameters and see raw inputs/outputs,
    # where 4-bit error is most visible; every block Linear (per-block modulation included) and txt_in
    # are quantized. img_in is quantized only on request (quantize_img_in).
    unquantized=("img_in", "time_in.", "vector_in.", "guidance_in.", "final_layer."),
    unquantized_why="embedders and output layer: ~0.4 % of the parameters, where 4-bit error shows most",
    core_linears=("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "final_layer.linear"),
    double_linears=_DOUBLE + ("img_mod.lin", "txt_mod.lin"), single_linears=("linear1", "linear2", "modulation.lin"),
    diffusers=FLUX1_NAMES, control_loras=True,
    variants=("guidance_in.", "FLUX.1 dev (guidance_in)", "FLUX.1 schnell (no guidance_in)"))

FLUX2 = Family(
    key="flux2", title="FLUX.2", comfy_model="flux2", markers=("double_stream_modulation_img.lin.weight",),
    # besides the embedders and output layer, the three global modulation Linears: one of them scales,
    # shifts and gates every block of its kind, so their 4-bit error would reach every block at once
    # (FLUX.1 has one per block instead); ~2 % of [dev]'s parameters, ~3.5 % of [klein] 4B's.
    unquantized=("img_in", "time_in.", "guidance_in.", "final_layer.", "double_stream_modulation_",
                 "single_stream_modulation."),
    unquantized_why="embedders, output layer and the global modulation Linears every block shares",
    core_linears=("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "double_stream_modulation_img.lin",
                  "double_stream_modulation_txt.lin", "single_stream_modulation.lin", "final_layer.linear",
                  "final_layer.adaLN_modulation.1"),
    double_linears=_DOUBLE, single_linears=("linear1", "linear2"), diffusers=FLUX2_NAMES,
    variants=("guidance_in.in_layer", "FLUX.2 [dev]", "FLUX.2 [klein]"))

CHROMA = Family(
    key="chroma", title="Chroma", comfy_model="chroma",
    markers=("distilled_guidance_layer.norms.0.scale", "distilled_guidance_layer.norms.0.weight"),
    # the approximator (distilled_guidance_layer) computes every block's shift/scale/gate from the
    # timestep: it is Chroma's counterpart of FLUX.1's embedders plus all its modulation Linears (~3 %
    # of the parameters), and its error would reach every block
    unquantized=("img_in", "distilled_guidance_layer.", "final_layer."),
    unquantized_why="image embedder, output layer and the modulation approximator every block reads",
    core_linears=("img_in", "txt_in", "distilled_guidance_layer.in_proj", "distilled_guidance_layer.out_proj",
                  "final_layer.linear"),
    double_linears=_DOUBLE, single_linears=("linear1", "linear2"), diffusers=CHROMA_NAMES)

# what each kept group buys, measured per family: bench/unquantized_choice.py, table in bench/README.md
FAMILIES = (FLUX2, CHROMA, FLUX1)  # the ones with markers first: FLUX.1 is what a FLUX layout is otherwise
BY_KEY = {f.key: f for f in FAMILIES}
TITLES = "FLUX.1 dev/schnell, FLUX.2 dev/klein and Chroma"


def family_of(bare_keys: Iterable[str], diffusers_names: bool = False) -> Family:
    """The family of a file that has the FLUX layout; ``bare_keys``: its keys without prefix, BFL names
    or (``diffusers_names``) diffusers names."""
    keys = set(bare_keys)
    for family in FAMILIES:
        markers = family.diffusers_markers() if diffusers_names else family.markers
        if not markers or any(m in keys for m in markers):
            return family
    return FLUX1


def family_of_linears(names: Iterable[str]) -> Family:
    """The family of a model from its Linears' BFL names (what a LoRA is read against): the first whose
    Linears outside the blocks it all has, FLUX.1 otherwise."""
    names = set(names)
    return next((f for f in FAMILIES if f.markers and set(f.core_linears) <= names), FLUX1)


def family_by_comfy_model(image_model: Optional[str]) -> Optional[Family]:
    return next((f for f in FAMILIES if f.comfy_model == image_model), None)
