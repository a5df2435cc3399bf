"""Which trainer wrote a LoRA file, and which BFL layer each of its keys targets."""
from __future__ import annotations

import re
from typing import Optional

from ..errors import LoraFormatError
from ..flux import (
    DIFFUSERS_ALIASES_DOUBLE,
    DIFFUSERS_ALIASES_SINGLE,
    DIFFUSERS_DOUBLE,
    DIFFUSERS_NORMS_DOUBLE,
    DIFFUSERS_NORMS_SINGLE,
    DIFFUSERS_SINGLE,
    DIFFUSERS_TOP,
    SWAPPED_HALVES,
    diffusers_to_bfl,
)
from .canonical import LoraTarget

# the top-level modules of every FLUX family (FLUX.1; FLUX.2's global modulation; Chroma's approximator)
_BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.",
              "guidance_in.", "final_layer.", "double_stream_modulation_img.", "double_stream_modulation_txt.",
              "single_stream_modulation.", "distilled_guidance_layer.")


_DIFFUSERS_ROOTS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.",
                    "time_text_embed.", "norm_out.", "proj_out.")


_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "te1.", "te2.", "t5xxl.", "clip_l.")


# SD1/SDXL UNet block names (sgm and diffusers spelling); SD3/FLUX never use them
_SD_UNET_MARKERS = ("input_blocks", "output_blocks", "middle_block", "down_blocks", "up_blocks", "mid_block")


# diffusers name inside (single_)transformer_blocks.<i> -> (BFL name inside the block, slice of fused rows)
_DIFFUSERS_DOUBLE = diffusers_to_bfl(DIFFUSERS_DOUBLE, DIFFUSERS_ALIASES_DOUBLE)
_DIFFUSERS_SINGLE = diffusers_to_bfl(DIFFUSERS_SINGLE, DIFFUSERS_ALIASES_SINGLE)
_DIFFUSERS_TOP = {d: bfl for bfl, d in DIFFUSERS_TOP.items()}
_DIFFUSERS_NORMS_DOUBLE = {d: bfl for bfl, d in DIFFUSERS_NORMS_DOUBLE.items()}
_DIFFUSERS_NORMS_SINGLE = {d: bfl for bfl, d in DIFFUSERS_NORMS_SINGLE.items()}


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


def _in_block(name: str, double: dict, single: dict) -> Optional[tuple[str, object]]:
    """``(BFL block name, table entry)`` for a name inside a diffusers (single_)transformer block that the
    block's table knows, else None."""
    m = _BLOCK_RE.match(name)
    if m is None:
        return None
    kind, index, inner = m.groups()
    table, bfl_block = (double, "double_blocks") if kind == "transformer_blocks" else (single, "single_blocks")
    return (f"{bfl_block}.{index}", table[inner]) if inner in table else None


def _diffusers_target(name: str, modules: dict[str, tuple[int, int]]) -> Optional[LoraTarget]:
    """BFL target of a diffusers Linear name (no prefix, no suffix); None if the name is not a FLUX Linear."""
    if name in _DIFFUSERS_TOP:
        return LoraTarget(_DIFFUSERS_TOP[name], swap_halves=(_DIFFUSERS_TOP[name] == SWAPPED_HALVES))
    found = _in_block(name, _DIFFUSERS_DOUBLE, _DIFFUSERS_SINGLE)
    if found is None:
        return None
    block, (bfl_inner, part) = found
    return _slice_target(f"{block}.{bfl_inner}", part, modules)


def _diffusers_norm_key(name: str) -> Optional[str]:
    """BFL norm scale key of a diffusers QK-norm name (``transformer_blocks.0.attn.norm_q``), or None."""
    found = _in_block(name, _DIFFUSERS_NORMS_DOUBLE, _DIFFUSERS_NORMS_SINGLE)
    return f"{found[0]}.{found[1]}.scale" if found is not None else None


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


def other_adapter(key: str) -> Optional[str]:
    for pattern, kind in _OTHER_ADAPTERS:
        if re.search(pattern, key):
            return kind
    return None


def preview_keys(keys, n: int = 3) -> str:
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
        raise LoraFormatError(f"{name}: not a FLUX LoRA (keys look like SDXL/SD1 UNet: {preview_keys(sd_keys)}); "
                              f"use a LoRA made for FLUX.1")
    if any(k.startswith("lora_transformer_") for k in model_keys):
        raise LoraFormatError(f"{name}: OneTrainer key names (lora_transformer_...) are not supported; "
                              f"save the LoRA from OneTrainer in diffusers or kohya format")
    if not model_keys:
        detail = f"only text-encoder keys: {preview_keys(te_keys)}" if te_keys else "the file has no tensors"
        raise LoraFormatError(f"{name}: no LoRA for the FLUX diffusion model ({detail}); "
                              f"this loader applies LoRAs to the diffusion model only")
    families = {k: _family_of(k) for k in model_keys}
    found = sorted({f for f in families.values() if f is not None})
    if not found:
        raise LoraFormatError(f"{name}: not a FLUX LoRA (no key names a FLUX.1 layer: {preview_keys(model_keys)}); "
                              f"use a LoRA made for FLUX.1")
    if len(found) > 1:
        examples = "; ".join(f"{f}: {next(k for k, g in families.items() if g == f)}" for f in found)
        raise LoraFormatError(f"{name}: mixes LoRA key formats ({examples}); "
                              f"re-save it in one format (BFL, diffusers or kohya)")
    strays = [k for k, f in families.items() if f is None]
    if strays:
        raise LoraFormatError(f"{name}: keys that name no FLUX.1 layer: {preview_keys(strays)}; "
                              f"the file may be damaged or made for another model")
    family = found[0]
    if family == "bfl" and any(k.endswith(_COMFY_ONLY) for k in model_keys):
        family = "comfy"
    return family, te_keys


def module_and_role(key: str, family: str) -> Optional[tuple[str, str]]:
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


def targets_bfl(modules_in_file) -> dict[str, LoraTarget]:
    return {m: LoraTarget(m) for m in modules_in_file}


def targets_kohya(modules_in_file, modules) -> dict[str, LoraTarget]:
    by_underscored = {m.replace(".", "_"): m for m in modules}
    return {m: LoraTarget(by_underscored.get(m, _kohya_guess(m))) for m in modules_in_file}


def targets_diffusers(modules_in_file, modules, name) -> dict[str, LoraTarget]:
    out = {}
    for m in modules_in_file:
        target = _diffusers_target(m, modules)
        if target is None:
            raise LoraFormatError(f"{name}: {m} is not a FLUX.1 diffusers layer name; "
                                  f"the LoRA was made for another model: use a LoRA made for FLUX.1")
        out[m] = target
    return out


def norm_key(module: str, family: str, name: str) -> str:
    if family != "diffusers":
        return module
    key = _diffusers_norm_key(module)
    if key is None:
        raise LoraFormatError(f"{name}: {module}.weight is a full weight, not a LoRA; "
                              f"only QK-norm scales may ship as full tensors in a FLUX LoRA")
    return key
