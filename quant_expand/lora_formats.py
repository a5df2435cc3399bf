"""FLUX.1 LoRA files in every supported key format -> one canonical form, checked against the model.

Formats (detected from the keys, one per file):
  bfl        ``<m>.lora_A.weight`` / ``.lora_B.weight`` / ``.lora_B.bias`` / ``.alpha`` and full
             ``*_norm.scale`` tensors (BFL Control LoRAs), BFL module names, optionally under
             ``diffusion_model.`` or ``model.diffusion_model.``
  diffusers  ``transformer.<diffusers name>.lora_A/lora_B(.default).weight`` (PEFT: optionally under
             ``base_model.model.``); q/k/v (and single-block proj_mlp) are row slices of BFL's fused
             Linear; ``norm_out.linear`` has scale/shift in the opposite order from BFL
  kohya      ``lora_unet_<BFL name, dots as underscores>.lora_down/lora_up.weight`` / ``.alpha``
  comfy      ComfyUI's own converted keys: ``diffusion_model.<m>.lora_up/lora_down.weight`` (or
             lora_A/lora_B), ``.diff_b``, ``<norm>.set_weight``, ``img_in.reshape_weight``

Canonical form: every low-rank update is a :class:`LoraLayer` on a BFL Linear, already in BFL row
order, with the rows it targets; the weight delta at strength ``s`` is
``s * scale * up @ down`` on rows ``[row_offset, row_offset + rows)`` (``down`` zero-padded on the
right when the layer is wider), and the bias delta is ``s * bias`` on the same rows: a ``lora_B.bias`` is
scaled by alpha/rank like the weight, as PEFT's forward does (``lora_B(lora_A(x)) * scaling``, bias
included); ComfyUI's own ``diff_b`` is applied at plain strength, as ComfyUI does.

alpha: an ``.alpha`` tensor per layer, else the PEFT ``LoraConfig`` that diffusers' ``save_lora_weights``
keeps in the file's ``lora_adapter_metadata`` (``lora_alpha``, ``alpha_pattern``/``rank_pattern``,
``use_rslora``), else none (scale 1).

Pure torch: never imports ComfyUI (``comfy.utils.flux_to_diffusers`` is what the tests check the
diffusers name table against).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import torch

from .formats import FLOAT16_MAX, BnbFluxError

__all__ = [
    "LoraFormatError",
    "LoraLayer",
    "ParsedLora",
    "LoraTarget",
    "parse_lora",
    "detect_lora_format",
    "diffusers_linear_map",
    "diffusers_norm_map",
    "norm_scale_keys",
]

# ComfyUI builds FLUX with num_heads = hidden // 128, so every QK-norm scale has 128 entries.
HEAD_DIM = 128


class LoraFormatError(BnbFluxError):
    """A LoRA file that cannot be applied to this model; the message names the file and the layer."""


@dataclass
class LoraLayer:
    """One low-rank update of a BFL Linear: ``scale * up @ down`` on rows ``[row_offset, row_offset + rows)``."""

    module: str                 # BFL module name of the target Linear, e.g. "double_blocks.0.img_attn.qkv"
    down: torch.Tensor          # [rank, in]  (lora_A / lora_down); in may be narrower than the layer (zero-pad)
    up: torch.Tensor            # [rows, rank] (lora_B / lora_up), rows already in BFL order
    alpha: Optional[float]      # None -> scale 1; else scale alpha/rank
    row_offset: int = 0         # first row of the (fused) weight this update targets
    bias: Optional[torch.Tensor] = None   # bias delta [rows] at strength 1 on the same rows (alpha/rank applied)
    source: str = ""            # the module's name in the file, for messages ("transformer.x_embedder")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def rows(self) -> int:
        return self.up.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class ParsedLora:
    name: str                    # file name, used in every error message
    source_format: str           # "bfl" | "diffusers" | "kohya" | "comfy"
    layers: list[LoraLayer]
    norm_sets: dict[str, torch.Tensor]   # BFL key of a norm scale, e.g. "single_blocks.0.norm.key_norm.scale" -> full value
    widened: dict[str, int]      # module -> new in_features, e.g. {"img_in": 128} for a Control LoRA
    # A bias delta with no low-rank pair on its module (ComfyUI ``diff_b`` alone): module -> [out],
    # applied at plain strength. A bias that comes with a lora_A/lora_B pair lives on its LoraLayer.
    bias_diffs: dict[str, torch.Tensor] = field(default_factory=dict)
    # Text-encoder keys (lora_te*, text_encoder*): left for a CLIP/T5 loader, not applied here.
    text_encoder_keys: list[str] = field(default_factory=list)
    # where the alpha came from when it was not an .alpha tensor, for the node's text
    alpha_note: str = ""

    @property
    def is_control(self) -> bool:
        """A Control LoRA widens img_in or replaces norm scales (both need more than ``W + delta``)."""
        return bool(self.widened or self.norm_sets)

    def describe(self) -> str:
        parts = [f"{len(self.layers)} low-rank layer{'s' * (len(self.layers) != 1)}"]
        if self.bias_diffs:
            parts.append(f"{len(self.bias_diffs)} bias diffs")
        if self.norm_sets:
            parts.append(f"{len(self.norm_sets)} norm scales set")
        parts += [f"{m} widened to {w} inputs" for m, w in self.widened.items()]
        if self.alpha_note:
            parts.append(self.alpha_note)
        kind = "Control LoRA" if self.is_control else "LoRA"
        return f"{self.name}: {self.source_format} {kind}, " + ", ".join(parts)


class LoraTarget(NamedTuple):
    """Where a file's module lands in BFL FLUX: rows ``[row_offset, row_offset + rows)`` of ``module``."""

    module: str
    row_offset: int = 0
    rows: Optional[int] = None   # None: every row of the module
    swap_halves: bool = False    # diffusers norm_out: (scale, shift) rows -> BFL (shift, scale)


# ---------------------------------------------------------------- FLUX names

_BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.",
              "guidance_in.", "final_layer.")
_DIFFUSERS_ROOTS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.",
                    "time_text_embed.", "norm_out.", "proj_out.")
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "te1.", "te2.", "t5xxl.", "clip_l.")
# SD1/SDXL UNet block names (sgm and diffusers spelling); SD3/FLUX never use them
_SD_UNET_MARKERS = ("input_blocks", "output_blocks", "middle_block", "down_blocks", "up_blocks", "mid_block")

# diffusers name inside transformer_blocks.<i> -> (BFL name inside double_blocks.<i>, slice of the fused rows)
_DIFFUSERS_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", "q"),
    "attn.to_k": ("img_attn.qkv", "k"),
    "attn.to_v": ("img_attn.qkv", "v"),
    "attn.add_q_proj": ("txt_attn.qkv", "q"),
    "attn.add_k_proj": ("txt_attn.qkv", "k"),
    "attn.add_v_proj": ("txt_attn.qkv", "v"),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
    "ff.linear_in": ("img_mlp.0", None),          # LyCORIS spelling, mapped by ComfyUI too
    "ff.linear_out": ("img_mlp.2", None),
    "ff_context.linear_in": ("txt_mlp.0", None),
    "ff_context.linear_out": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
}
# diffusers name inside single_transformer_blocks.<i> -> (BFL name inside single_blocks.<i>, slice)
_DIFFUSERS_SINGLE = {
    "attn.to_q": ("linear1", "q"),
    "attn.to_k": ("linear1", "k"),
    "attn.to_v": ("linear1", "v"),
    "proj_mlp": ("linear1", "mlp"),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
    "attn.to_qkv_mlp_proj": ("linear1", None),    # fused spelling (Flux 2); ComfyUI maps it onto FLUX.1 too
    "attn.to_out": ("linear2", None),
}
_DIFFUSERS_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_DIFFUSERS_NORMS_DOUBLE = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_DIFFUSERS_NORMS_SINGLE = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
_BLOCK_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def _slice_target(module: str, part: Optional[str], modules: dict[str, tuple[int, int]]) -> LoraTarget:
    if part is None:
        return LoraTarget(module)
    if module not in modules:
        return LoraTarget(module)  # reported as a missing layer; no offsets to compute
    out, hidden = modules[module]  # the fused layers' input width is the hidden size
    offsets = {"q": (0, hidden), "k": (hidden, hidden), "v": (2 * hidden, hidden), "mlp": (3 * hidden, out - 3 * hidden)}
    start, rows = offsets[part]
    return LoraTarget(module, start, rows)


def _diffusers_target(name: str, modules: dict[str, tuple[int, int]]) -> Optional[LoraTarget]:
    """BFL target of a diffusers Linear name (no prefix, no suffix); None if the name is not a FLUX Linear."""
    if name in _DIFFUSERS_TOP:
        return LoraTarget(_DIFFUSERS_TOP[name], swap_halves=(name == "norm_out.linear"))
    m = _BLOCK_RE.match(name)
    if m is None:
        return None
    kind, index, inner = m.groups()
    table, bfl_block = ((_DIFFUSERS_DOUBLE, "double_blocks") if kind == "transformer_blocks"
                        else (_DIFFUSERS_SINGLE, "single_blocks"))
    if inner not in table:
        return None
    bfl_inner, part = table[inner]
    return _slice_target(f"{bfl_block}.{index}.{bfl_inner}", part, modules)


def _diffusers_norm_key(name: str) -> Optional[str]:
    """BFL norm scale key of a diffusers QK-norm name (``transformer_blocks.0.attn.norm_q``), or None."""
    m = _BLOCK_RE.match(name)
    if m is None:
        return None
    kind, index, inner = m.groups()
    table, bfl_block = ((_DIFFUSERS_NORMS_DOUBLE, "double_blocks") if kind == "transformer_blocks"
                        else (_DIFFUSERS_NORMS_SINGLE, "single_blocks"))
    return f"{bfl_block}.{index}.{table[inner]}.scale" if inner in table else None


def _block_indices(modules, bfl_block: str) -> list[int]:
    return sorted({int(n.split(".")[1]) for n in modules if n.startswith(bfl_block + ".")})


def diffusers_linear_map(modules: dict[str, tuple[int, int]]) -> dict[str, LoraTarget]:
    """Every diffusers Linear name of this model -> its BFL target (module, rows, order)."""
    out: dict[str, LoraTarget] = {}
    names = list(_DIFFUSERS_TOP)
    names += [f"transformer_blocks.{i}.{n}" for i in _block_indices(modules, "double_blocks") for n in _DIFFUSERS_DOUBLE]
    names += [f"single_transformer_blocks.{i}.{n}" for i in _block_indices(modules, "single_blocks") for n in _DIFFUSERS_SINGLE]
    for name in names:
        target = _diffusers_target(name, modules)
        if target is not None and target.module in modules:
            out[name] = target
    return out


def norm_scale_keys(modules: dict[str, tuple[int, int]]) -> list[str]:
    """BFL keys of the QK-norm scales of a model with these Linears (they sit beside each attention)."""
    keys = []
    for n in modules:
        if re.fullmatch(r"double_blocks\.\d+\.(img|txt)_attn\.qkv", n):
            owner = n[: -len(".qkv")] + ".norm"
        elif re.fullmatch(r"single_blocks\.\d+\.linear1", n):
            owner = n[: -len(".linear1")] + ".norm"
        else:
            continue
        keys += [f"{owner}.query_norm.scale", f"{owner}.key_norm.scale"]
    return keys


def diffusers_norm_map(modules: dict[str, tuple[int, int]]) -> dict[str, str]:
    """Every diffusers QK-norm name of this model -> BFL norm scale key."""
    names = [f"transformer_blocks.{i}.{n}" for i in _block_indices(modules, "double_blocks") for n in _DIFFUSERS_NORMS_DOUBLE]
    names += [f"single_transformer_blocks.{i}.{n}" for i in _block_indices(modules, "single_blocks")
              for n in _DIFFUSERS_NORMS_SINGLE]
    have = set(norm_scale_keys(modules))
    return {n: k for n in names if (k := _diffusers_norm_key(n)) in have}


# kohya underscores every dot; these FLUX name parts contain an underscore of their own
_UNDERSCORED_WORDS = ("double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mod", "txt_mod", "img_mlp",
                      "txt_mlp", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "in_layer", "out_layer",
                      "final_layer", "adaLN_modulation", "query_norm", "key_norm")


def _kohya_guess(underscored: str) -> str:
    """Best-effort BFL spelling of a kohya name the model lacks, for the error message."""
    name = underscored.replace("_", ".")
    for word in _UNDERSCORED_WORDS:
        name = name.replace(word.replace("_", "."), word)
    return name


# ---------------------------------------------------------------- keys -> groups

# family -> [(key suffix, role)], longest suffixes first where one ends another
_SUFFIXES = {
    "bfl": [(".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "bias"), (".alpha", "alpha"),
            ("_norm.scale", "norm")],
    "comfy": [(".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"),
              (".lora_B.weight", "up"), (".lora_B.bias", "bias"), (".diff_b", "bias"), (".alpha", "alpha"),
              ("_norm.scale.set_weight", "norm"),  # older ComfyUI releases wrote this spelling
              ("_norm.set_weight", "norm"), ("_norm.scale", "norm"), (".reshape_weight", "reshape")],
    "diffusers": [(".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"), (".lora_A.weight", "down"),
                  (".lora_B.weight", "up"), (".lora_B.bias", "bias"), (".lora_B.default.bias", "bias"),
                  (".alpha", "alpha"), (".weight", "norm")],
    "kohya": [(".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha")],
}
_COMFY_ONLY = (".lora_down.weight", ".lora_up.weight", ".diff_b", ".set_weight", ".reshape_weight")
# keys of adapters that are not a plain low-rank pair (ComfyUI's weight_adapter kinds), for a precise message
_OTHER_ADAPTERS = ((r"\.hada_", "LyCORIS LoHa"), (r"\.lokr_", "LyCORIS LoKr"), (r"\.oft_blocks$", "OFT/BOFT"),
                   (r"\.[ab][12]\.weight$", "GLoRA"), (r"\.dora_scale$", "DoRA"), (r"\.lora_mid\.", "LoCon"),
                   (r"\.diff$", "full weight diff"), (r"(?<!_norm)(?<!_norm\.scale)\.set_weight$", "full weight replacement"),
                   (r"\.[wb]_norm$", "norm diff"))


def _strip_bfl_prefix(key: str) -> Optional[str]:
    for prefix in ("model.diffusion_model.", "diffusion_model.", ""):
        if key.startswith(prefix) and key[len(prefix):].startswith(_BFL_ROOTS):
            return key[len(prefix):]
    return None


def _strip_diffusers_prefix(key: str) -> Optional[str]:
    rest = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
    if rest.startswith("transformer."):
        rest = rest[len("transformer."):]
    return rest if rest.startswith(_DIFFUSERS_ROOTS) else None


def _family_of(key: str) -> Optional[str]:
    if key.startswith("lora_unet_"):
        return "kohya"
    if _strip_diffusers_prefix(key) is not None:
        return "diffusers"
    if _strip_bfl_prefix(key) is not None:
        return "bfl"
    return None


def _other_adapter(key: str) -> Optional[str]:
    for pattern, kind in _OTHER_ADAPTERS:
        if re.search(pattern, key):
            return kind
    return None


def _preview(keys, n: int = 3) -> str:
    keys = list(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def detect_lora_format(name: str, keys) -> tuple[str, list[str]]:
    """(format, text-encoder keys) of a file's keys; raises LoraFormatError for anything not a FLUX LoRA."""
    keys = list(keys)
    te_keys = [k for k in keys if k.startswith(_TEXT_ENCODER_PREFIXES)]
    model_keys = [k for k in keys if not k.startswith(_TEXT_ENCODER_PREFIXES)]
    sd_keys = [k for k in model_keys if any(m in k for m in _SD_UNET_MARKERS)]
    if sd_keys:
        raise LoraFormatError(f"{name}: not a FLUX LoRA (keys look like SDXL/SD1 UNet: {_preview(sd_keys)}); "
                              f"use a LoRA made for FLUX.1")
    if any(k.startswith("lora_transformer_") for k in model_keys):
        raise LoraFormatError(f"{name}: OneTrainer key names (lora_transformer_...) are not supported; "
                              f"save the LoRA from OneTrainer in diffusers or kohya format")
    if not model_keys:
        detail = f"only text-encoder keys: {_preview(te_keys)}" if te_keys else "the file has no tensors"
        raise LoraFormatError(f"{name}: no LoRA for the FLUX diffusion model ({detail}); "
                              f"this loader applies LoRAs to the diffusion model only")
    families = {k: _family_of(k) for k in model_keys}
    found = sorted({f for f in families.values() if f is not None})
    if not found:
        raise LoraFormatError(f"{name}: not a FLUX LoRA (no key names a FLUX.1 layer: {_preview(model_keys)}); "
                              f"use a LoRA made for FLUX.1")
    if len(found) > 1:
        examples = "; ".join(f"{f}: {next(k for k, g in families.items() if g == f)}" for f in found)
        raise LoraFormatError(f"{name}: mixes LoRA key formats ({examples}); "
                              f"re-save it in one format (BFL, diffusers or kohya)")
    strays = [k for k, f in families.items() if f is None]
    if strays:
        raise LoraFormatError(f"{name}: keys that name no FLUX.1 layer: {_preview(strays)}; "
                              f"the file may be damaged or made for another model")
    family = found[0]
    if family == "bfl" and any(k.endswith(_COMFY_ONLY) for k in model_keys):
        family = "comfy"
    return family, te_keys


def _module_and_role(key: str, family: str) -> Optional[tuple[str, str]]:
    """(module name in the file's own spelling, role) of one key; None if the suffix is not understood."""
    if family == "kohya":
        stem = key[len("lora_unet_"):]
    elif family == "diffusers":
        stem = _strip_diffusers_prefix(key)
    else:
        stem = _strip_bfl_prefix(key)
    for suffix, role in _SUFFIXES[family]:
        if stem.endswith(suffix):
            module = stem[: -len(suffix)]
            if role == "norm" and family != "diffusers":
                module = module + "_norm.scale"  # the BFL key of the norm scale
            return module, role
    return None


# ---------------------------------------------------------------- checks

# dtypes a LoRA's weights may have (what ComfyUI and trainers write); anything else is a damaged file or
# not a LoRA: an int8/bool "lora_A" would be applied as if its codes were weights
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)
# alpha and ComfyUI's reshape_weight are plain numbers: any real dtype, but not bool
NUMBER_DTYPES = WEIGHT_DTYPES + (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
_F32_MAX = torch.finfo(torch.float32).max


def _read(tensors: Any, key: str, name: str, numbers: bool = False) -> torch.Tensor:
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
    if t.is_floating_point():
        # float8 has no isfinite kernel on every device: check a widened copy
        probe = t.float() if t.element_size() == 1 else t
        if not bool(torch.isfinite(probe).all()):
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


def _check_magnitude(name: str, what: str, down: torch.Tensor, up: torch.Tensor, scale: float):
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


def _layer_name(target: LoraTarget, source: str) -> str:
    where = target.module
    if target.rows is not None:
        where += f" rows {target.row_offset}:{target.row_offset + target.rows}"
    return where if source in ("", target.module) else f"{where} ({source})"


def _check_inputs(name: str, what: str, module: str, width: int, modules: dict[str, tuple[int, int]]) -> Optional[int]:
    """Accept ``width`` inputs for ``module``; returns the width the module must be widened to, if any."""
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
                              f"use a LoRA made for this FLUX.1 model")
    raise LoraFormatError(f"{name}: lora for {what} has {width} inputs, model has {current}; "
                          f"use a LoRA made for this FLUX.1 model")


def _check_missing(name: str, missing: list[str]):
    if missing:
        raise LoraFormatError(f"{name}: targets layers this model does not have: {_preview(missing, 5)}; "
                              f"the LoRA was made for a larger or different FLUX model: use one made for this model")


# ---------------------------------------------------------------- per-format target resolution

def _targets_bfl(modules_in_file) -> dict[str, LoraTarget]:
    return {m: LoraTarget(m) for m in modules_in_file}


def _targets_kohya(modules_in_file, modules) -> dict[str, LoraTarget]:
    by_underscored = {m.replace(".", "_"): m for m in modules}
    return {m: LoraTarget(by_underscored.get(m, _kohya_guess(m))) for m in modules_in_file}


def _targets_diffusers(modules_in_file, modules, name) -> dict[str, LoraTarget]:
    out = {}
    for m in modules_in_file:
        target = _diffusers_target(m, modules)
        if target is None:
            raise LoraFormatError(f"{name}: {m} is not a FLUX.1 diffusers layer name; "
                                  f"the LoRA was made for another model: use a LoRA made for FLUX.1")
        out[m] = target
    return out


def _norm_key(module: str, family: str, name: str) -> str:
    if family != "diffusers":
        return module
    key = _diffusers_norm_key(module)
    if key is None:
        raise LoraFormatError(f"{name}: {module}.weight is a full weight, not a LoRA; "
                              f"only QK-norm scales may ship as full tensors in a FLUX LoRA")
    return key


# ---------------------------------------------------------------- alpha from metadata

ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' save_lora_weights: PEFT's LoraConfig, "transformer." keys


class PeftScaling(NamedTuple):
    """PEFT's per-module scale rule, from a LoraConfig: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA),
    ``alpha_pattern`` overriding alpha for the modules it matches."""

    lora_alpha: float
    alpha_pattern: dict
    use_rslora: bool

    def scale(self, module: str, rank: int) -> float:
        alpha = self.lora_alpha
        for pattern, value in self.alpha_pattern.items():  # peft.utils.other.get_pattern_key's rule
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def peft_scaling(metadata: Optional[dict], name: str) -> Optional[PeftScaling]:
    """The LoraConfig diffusers keeps in the file's metadata (its ``transformer.`` entries), or None."""
    raw = (metadata or {}).get(ADAPTER_METADATA)
    if not raw:
        return None
    try:
        config = json.loads(raw)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        prefixed = {k[len("transformer."):]: v for k, v in config.items() if k.startswith("transformer.")}
        config = prefixed or config
        if "lora_alpha" not in config:
            return None
        alpha = float(config["lora_alpha"])
        patterns = config.get("alpha_pattern") or {}
        if not isinstance(patterns, dict):
            raise ValueError("alpha_pattern is not a mapping")
        for pattern, value in patterns.items():
            re.compile(pattern)
            float(value)
        if not math.isfinite(alpha):
            raise ValueError(f"lora_alpha is {alpha}")
        return PeftScaling(alpha, dict(patterns), bool(config.get("use_rslora", False)))
    except (ValueError, TypeError, re.error) as e:
        raise LoraFormatError(f"{name}: its {ADAPTER_METADATA} metadata is not a readable LoRA config ({e}); "
                              f"the file is damaged: download it again") from e


# ---------------------------------------------------------------- parse

def parse_lora(tensors, name: str, modules: dict[str, tuple[int, int]]) -> ParsedLora:
    """Read every tensor of a LoRA file once and return its canonical, model-checked form.

    ``tensors``: a TensorFile or a dict (anything with ``keys()`` and ``get(key)`` / ``[key]``).
    ``modules``: the model's Linears, BFL names -> (out_features, in_features) as the model is now
    (img_in may already be 128 wide after an earlier Control LoRA).
    """
    keys = list(tensors.keys())
    family, te_keys = detect_lora_format(name, keys)
    te_set = set(te_keys)

    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    norm_values: dict[str, tuple[str, torch.Tensor]] = {}
    reshapes: dict[str, tuple[str, torch.Tensor]] = {}
    unknown = []
    for key in keys:
        if key in te_set:
            continue
        parsed = None if _other_adapter(key) else _module_and_role(key, family)
        if parsed is None:
            unknown.append(key)
            continue
        module, role = parsed
        if role == "norm":
            norm = _norm_key(module, family, name)
            if norm in norm_values:
                raise LoraFormatError(f"{name}: {norm_values[norm][0]} and {key} both set {norm}; "
                                      f"re-save the LoRA in one format")
            norm_values[norm] = (key, _read(tensors, key, name))
        elif role == "reshape":
            reshapes[module] = (key, _read(tensors, key, name, numbers=True))
        else:
            group = groups.setdefault(module, {})
            if role in group:
                raise LoraFormatError(f"{name}: {module} has two {role} tensors ({group[role][0]} and {key}); "
                                      f"re-save the LoRA in one format")
            group[role] = (key, _read(tensors, key, name, numbers=role == "alpha"))
    if unknown:
        kinds = sorted({k for k in map(_other_adapter, unknown) if k})
        what = f"{', '.join(kinds)} keys" if kinds else "keys this loader does not understand"
        raise LoraFormatError(f"{name}: {what}: {_preview(unknown)}; this loader applies plain low-rank LoRAs "
                              f"(lora_A/lora_B or lora_down/lora_up): use ComfyUI's LoraLoader for other adapters")

    if family == "kohya":
        targets = _targets_kohya(groups, modules)
    elif family == "diffusers":
        targets = _targets_diffusers(groups, modules, name)
    else:
        targets = _targets_bfl(groups)
    _check_missing(name, sorted({t.module for t in targets.values() if t.module not in modules}))
    _check_missing(name, sorted(set(reshapes) - set(modules)))
    norm_keys = set(norm_scale_keys(modules))
    _check_missing(name, sorted(set(norm_values) - norm_keys))

    layers: list[LoraLayer] = []
    bias_diffs: dict[str, torch.Tensor] = {}
    widened: dict[str, int] = {}
    config = peft_scaling(getattr(tensors, "metadata", None), name)
    from_config = set()
    for module, group in groups.items():
        target = targets[module]
        source = "" if family in ("bfl", "comfy") else (module if family == "diffusers" else "lora_unet_" + module)
        what = _layer_name(target, source)
        out_features = modules[target.module][0]
        rows = out_features if target.rows is None else target.rows
        if "down" not in group and "up" not in group:
            if family == "comfy" and set(group) == {"bias"}:
                layer_bias = group["bias"]
                _check_vector(name, what, layer_bias, rows)
                bias_diffs[target.module] = layer_bias[1]
                continue
            present = ", ".join(k for k, _ in group.values())
            raise LoraFormatError(f"{name}: {what} has {present} but no lora_A/lora_B (lora_down/lora_up) pair; "
                                  f"the file is incomplete: download it again")
        for role, partner in (("down", "up"), ("up", "down")):
            if role not in group:
                have = group[partner][0]
                raise LoraFormatError(f"{name}: {what} has {have} but no matching "
                                      f"{'lora_A/lora_down' if role == 'down' else 'lora_B/lora_up'}; "
                                      f"the file is incomplete: download it again")
        (down_key, down), (up_key, up) = group["down"], group["up"]
        if down.ndim != 2 or up.ndim != 2:
            raise LoraFormatError(f"{name}: lora for {what} has shapes {tuple(down.shape)} / {tuple(up.shape)}; "
                                  f"FLUX Linears need 2-D lora_A [rank, in] and lora_B [out, rank]")
        if down.shape[0] == 0 or up.shape[1] == 0:
            raise LoraFormatError(f"{name}: lora for {what} has rank 0 ({down_key} {tuple(down.shape)}, {up_key} "
                                  f"{tuple(up.shape)}): an empty LoRA layer; the file is damaged: download it again")
        if down.shape[0] != up.shape[1]:
            raise LoraFormatError(f"{name}: lora for {what}: rank of {down_key} ({down.shape[0]}) does not match "
                                  f"rank of {up_key} ({up.shape[1]}); the file is damaged: download it again")
        if up.shape[0] != rows:
            raise LoraFormatError(f"{name}: lora for {what} has {up.shape[0]} outputs, model has {rows}; "
                                  f"use a LoRA made for this FLUX.1 model")
        new_width = _check_inputs(name, what, target.module, down.shape[1], modules)
        if new_width is not None:
            widened[target.module] = max(new_width, widened.get(target.module, 0))
        alpha = None
        if "alpha" in group:
            alpha_key, alpha_t = group["alpha"]
            if alpha_t.numel() != 1:
                raise LoraFormatError(f"{name}: {alpha_key} has {alpha_t.numel()} values, expected one number")
            alpha = float(alpha_t.reshape(()).item())
        elif config is not None:  # as an alpha over this rank: LoraLayer.scale is alpha / rank
            alpha = config.scale(module, down.shape[0]) * down.shape[0]
            from_config.add(alpha / down.shape[0])
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        _check_magnitude(name, what, down, up, scale)
        bias = None
        if "bias" in group:
            _check_vector(name, what, group["bias"], rows)
            bias_key, bias = group["bias"]
            if not bias_key.endswith(".diff_b") and scale != 1.0:
                bias = bias * scale  # PEFT: lora_B's output, its bias included, times alpha / r
        if target.swap_halves:
            # diffusers' norm_out.linear emits (scale, shift); BFL's adaLN_modulation.1 emits (shift, scale).
            # Only the output rows move: lora_A mixes inputs and stays as it is.
            up = _swap_halves(up)
            bias = None if bias is None else _swap_halves(bias)
        layers.append(LoraLayer(module=target.module, down=down, up=up, alpha=alpha, row_offset=target.row_offset,
                                bias=bias, source=source))

    for module, (key, value) in reshapes.items():
        if module != "img_in":
            raise LoraFormatError(f"{name}: {key} reshapes {module}; only img_in is widened by a FLUX Control LoRA")
        values = value.flatten().double()
        if not bool((values == values.round()).all()):
            shown = ", ".join(f"{v:g}" for v in values[:4].tolist())
            raise LoraFormatError(f"{name}: {key} holds [{shown}], not a shape of whole numbers; "
                                  f"the file is damaged: use another copy of this Control LoRA")
        shape = [int(v) for v in values.tolist()]
        if len(shape) != 2 or shape[0] != modules["img_in"][0]:
            raise LoraFormatError(f"{name}: {key} asks for img_in shape {shape}, model's img_in has "
                                  f"{modules['img_in'][0]} outputs; use a Control LoRA made for this FLUX.1 model")
        new_width = _check_inputs(name, "img_in (reshape_weight)", "img_in", shape[1], modules)
        if new_width is not None:
            widened["img_in"] = max(new_width, widened.get("img_in", 0))

    norm_sets = {}
    for key, (file_key, value) in norm_values.items():
        if tuple(value.shape) != (HEAD_DIM,):
            raise LoraFormatError(f"{name}: norm scale {file_key} has shape {tuple(value.shape)}, model's {key} "
                                  f"has ({HEAD_DIM},); use a Control LoRA made for FLUX.1")
        norm_sets[key] = value

    order = {m: i for i, m in enumerate(modules)}
    layers.sort(key=lambda l: (order[l.module], l.row_offset))
    alpha_note = ""
    if from_config:
        scales = ", ".join(f"{v:.4g}" for v in sorted(from_config))
        alpha_note = (f"alpha {config.lora_alpha:g} from the file's {ADAPTER_METADATA}"
                      f"{' (rsLoRA)' if config.use_rslora else ''}{' with alpha_pattern' if config.alpha_pattern else ''}: "
                      f"scale {scales}")
    return ParsedLora(name=name, source_format=family, layers=layers,
                      norm_sets={k: norm_sets[k] for k in sorted(norm_sets, key=_norm_order(modules))},
                      widened=widened, bias_diffs=bias_diffs, text_encoder_keys=te_keys, alpha_note=alpha_note)


def _norm_order(modules):
    order = {k: i for i, k in enumerate(norm_scale_keys(modules))}
    return lambda k: order[k]


def _check_vector(name: str, what: str, entry: tuple[str, torch.Tensor], rows: int):
    key, t = entry
    if tuple(t.shape) != (rows,):
        raise LoraFormatError(f"{name}: bias {key} for {what} has shape {tuple(t.shape)}, expected ({rows},); "
                              f"use a LoRA made for this FLUX.1 model")


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)
