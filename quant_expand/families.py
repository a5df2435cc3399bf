"""The FLUX families Load BnB Flux reads, one table: how a file shows which family it is, what ComfyUI
calls the model, and which Linears stay in the compute dtype (with why).

A new family is one :class:`Family` here (its Linears' shapes and released sizes included), its diffusers
names in ``diffusers_names.py`` and, where it needs one, its test model in ``testing/``; the reader, loader,
LoRA inspection (``lora/implied_model.py``) and command line ask this table instead of naming a family.
Detection looks at key names without the file's prefix, after the reader found the FLUX layout
(``double_blocks.0.img_attn.norm.key_norm``, which every family here has, or its diffusers name): a
family's markers, in BFL names or translated by its diffusers table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

from .diffusers_names import CHROMA_NAMES, FLUX1_NAMES, FLUX2_NAMES, DiffusersNames


TIME_EMBED = 256  # time_in's and guidance_in's inputs: the sinusoidal timestep embedding
# the Linears whose input width does not follow from the hidden size (latent, text encoder, pooled vector):
# a model's shapes take them from its file where the file shows them
FREE_INPUTS = ("img_in", "txt_in", "vector_in.in_layer")


@dataclass(frozen=True)
class ModelSize:
    """The size of released models of a family: what ``cli inspect`` tells a LoRA's widths fit."""

    name: str        # what users call the models of this size, family title first: "FLUX.2 [klein] 4B"
    hidden: int
    doubles: int     # double and single blocks
    singles: int
    text: int        # txt_in's inputs: the text encoder's width
    absent: tuple[str, ...] = ()  # Linear name prefixes these models lack (FLUX.2 [klein]: no guidance embedder)

    def variant(self, title: str) -> str:
        """The name without the family's title ("[klein] 4B"), as a phrase about the family uses it."""
        return self.name[len(title) + 1:] if self.name.startswith(title + " ") else self.name


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
    # the Linears' shapes, as ComfyUI 0.33 builds the model (comfy/ldm/flux, comfy/ldm/chroma, model_detection.py):
    latent: int = 64                        # img_in's inputs and final_layer.linear's outputs
    mlp_widths: tuple[int, int] = (4, 4)    # a block MLP's first Linear's outputs and second's inputs, in hidden sizes
    # (hidden, latent, input widths) -> (out, in) of each Linear outside the blocks, in module order (see linear_shapes)
    outer_linears: Optional[Callable[[int, int, Mapping[str, int]], dict[str, tuple[int, int]]]] = None
    sizes: tuple[ModelSize, ...] = ()       # the released models' sizes, the most common first

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

    def linear_shapes(self, hidden: int, doubles: int, singles: int,
                      inputs: Mapping[str, int] = {}) -> dict[str, tuple[int, int]]:
        """BFL name -> (out, in) of every Linear of a model of this family and size. ``inputs``: widths of
        :data:`FREE_INPUTS` where known; otherwise the latent width and the first released size's text width."""
        h = hidden
        first, second = (r * h for r in self.mlp_widths)
        block = {"attn.qkv": (3 * h, h), "attn.proj": (h, h), "mlp.0": (first, h), "mlp.2": (h, second),
                 "mod.lin": (6 * h, h), "linear1": (3 * h + first, h), "linear2": (h, h + second),
                 "modulation.lin": (3 * h, h)}
        outer = self.outer_linears(h, self.latent, {"img_in": self.latent, "txt_in": self.sizes[0].text, **inputs})
        names = list(outer)
        tail = names.index("final_layer.linear")  # in module order: the output layer (and on) follows the blocks
        out = {n: outer[n] for n in names[:tail]}
        for i in range(doubles):
            for inner in self.double_linears:  # img_attn.qkv, txt_mlp.0, ...: the stream, then the Linear
                out[f"double_blocks.{i}.{inner}"] = block[inner.split("_", 1)[1]]
        for i in range(singles):
            for inner in self.single_linears:
                out[f"single_blocks.{i}.{inner}"] = block[inner]
        out.update((n, outer[n]) for n in names[tail:])
        return out

    def variant(self, linears: Iterable[str]) -> str:
        """The name a user knows the model by, from its Linears' names (as ComfyUI tells FLUX.1 dev from
        schnell and FLUX.2 [dev] from [klein]: guidance_embed, i.e. a guidance embedder)."""
        if self.variants is None:
            return self.title
        prefix, with_it, without = self.variants
        return with_it if any(n.startswith(prefix) for n in linears) else without


# the attention and MLP Linears of a double block, img and txt streams (FLUX.1 adds a modulation per stream)
_DOUBLE = tuple(f"{s}_{m}" for s in ("img", "txt") for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2"))


def _embedder(name: str, h: int, inputs: int) -> dict[str, tuple[int, int]]:
    """ComfyUI's MLPEmbedder: in_layer, then out_layer on the hidden size."""
    return {f"{name}.in_layer": (h, inputs), f"{name}.out_layer": (h, h)}


def _flux1_outer(h: int, latent: int, inputs: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    return {"img_in": (h, inputs["img_in"]), **_embedder("time_in", h, TIME_EMBED),
            **_embedder("vector_in", h, inputs.get("vector_in.in_layer", 768)),  # CLIP-L's pooled output
            **_embedder("guidance_in", h, TIME_EMBED), "txt_in": (h, inputs["txt_in"]),
            "final_layer.linear": (latent, h), "final_layer.adaLN_modulation.1": (2 * h, h)}


def _flux2_outer(h: int, latent: int, inputs: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    # no vector_in; the global modulation Linears emit (shift, scale, gate) per stream for every block of
    # their kind: 6 x hidden for a double block's stream, 3 x hidden for a single block
    return {"img_in": (h, inputs["img_in"]), **_embedder("time_in", h, TIME_EMBED),
            **_embedder("guidance_in", h, TIME_EMBED), "txt_in": (h, inputs["txt_in"]),
            "final_layer.linear": (latent, h), "final_layer.adaLN_modulation.1": (2 * h, h),
            "double_stream_modulation_img.lin": (6 * h, h), "double_stream_modulation_txt.lin": (6 * h, h),
            "single_stream_modulation.lin": (3 * h, h)}


# ComfyUI fixes Chroma's approximator: 64 inputs, 5 layers of 5120, 3072 outputs (every block's modulation)
CHROMA_APPROXIMATOR = (64, 5120, 5, 3072)


def _chroma_outer(h: int, latent: int, inputs: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    a_in, a_hidden, a_layers, a_out = CHROMA_APPROXIMATOR
    out = {"img_in": (h, inputs["img_in"]), "txt_in": (h, inputs["txt_in"]),
           "distilled_guidance_layer.in_proj": (a_hidden, a_in)}
    for i in range(a_layers):
        out.update(_embedder(f"distilled_guidance_layer.layers.{i}", a_hidden, a_hidden))
    out["distilled_guidance_layer.out_proj"] = (a_out, a_hidden)
    out["final_layer.linear"] = (latent, h)  # no adaLN_modulation: the approximator gives its shift and scale
    return out


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
    variants=("guidance_in.", "FLUX.1 dev (guidance_in)", "FLUX.1 schnell (no guidance_in)"),
    latent=64, mlp_widths=(4, 4), outer_linears=_flux1_outer,  # latent: 16 channels x 2 x 2 patch
    sizes=(ModelSize("FLUX.1 dev and schnell", 3072, 19, 38, 4096),))  # text: T5-XXL

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
    variants=("guidance_in.in_layer", "FLUX.2 [dev]", "FLUX.2 [klein]"),
    # 128 latent channels, patch 1; gated SiLU MLP with ratio 3: its first Linear emits gate and value
    latent=128, mlp_widths=(6, 3), outer_linears=_flux2_outer,
    # text: three hidden layers of the LLM side by side (Mistral Small 3.1 5120, Qwen3-4B 2560, Qwen3-8B 4096)
    sizes=(ModelSize("FLUX.2 [dev]", 6144, 8, 48, 15360),
           ModelSize("FLUX.2 [klein] 4B", 3072, 5, 20, 7680, absent=("guidance_in.",)),
           ModelSize("FLUX.2 [klein] 9B", 4096, 8, 24, 12288, absent=("guidance_in.",))))

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
    double_linears=_DOUBLE, single_linears=("linear1", "linear2"), diffusers=CHROMA_NAMES,
    latent=64, mlp_widths=(4, 4), outer_linears=_chroma_outer,
    # the hidden size is the approximator's output width (the blocks read its modulation); text: T5-XXL
    sizes=(ModelSize("Chroma1-HD and Chroma1-Base", CHROMA_APPROXIMATOR[3], 19, 38, 4096),))

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
