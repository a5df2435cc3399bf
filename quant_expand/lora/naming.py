"""Which trainer wrote a LoRA file, and which BFL layer each of its keys targets."""
from __future__ import annotations

import re
from typing import Optional

from ..errors import LoraFormatError
from ..families import FAMILIES, Family, family_of_linears
from .canonical import LoraTarget

# the top-level modules of every FLUX family in BFL and in diffusers names; some are both (FLUX.2's global
# modulation, Chroma's approximator): a bare key under one of those reads as the rest of its file does
_BFL_ROOTS = tuple(sorted(set().union(*(f.diffusers.roots()[0] for f in FAMILIES))))
_DIFFUSERS_ROOTS = tuple(sorted(set().union(*(f.diffusers.roots()[1] for f in FAMILIES))))
_EITHER = "bfl or diffusers"


_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "te1.", "te2.", "t5xxl.", "clip_l.")


# SD1/SDXL UNet block names (sgm and diffusers spelling); SD3/FLUX never use them
_SD_UNET_MARKERS = ("input_blocks", "output_blocks", "middle_block", "down_blocks", "up_blocks", "mid_block")


def _slice_target(module: str, part: Optional[str], modules: dict[str, tuple[int, int]]) -> LoraTarget:
    if part is None:
        return LoraTarget(module)
    if module not in modules:
        return LoraTarget(module)  # reported as a missing layer; no offsets to compute
    out, hidden = modules[module]  # the fused layers' input width is the hidden size
    offsets = {"q": (0, hidden), "k": (hidden, hidden), "v": (2 * hidden, hidden), "mlp": (3 * hidden, out - 3 * hidden)}
    start, rows = offsets[part]
    return LoraTarget(module, start, rows)


def _target(found: tuple[str, Optional[str]], modules: dict[str, tuple[int, int]], family: Family) -> LoraTarget:
    """The BFL target of a diffusers name the family's table read as ``found`` (BFL Linear, row slice)."""
    module, part = found
    if part is None:
        return LoraTarget(module, swap_halves=module in family.diffusers.swapped)
    return _slice_target(module, part, modules)


def _diffusers_target(name: str, modules: dict[str, tuple[int, int]], family: Family) -> Optional[LoraTarget]:
    """BFL target of a diffusers Linear name (no prefix, no suffix); None if the name is not one of the
    family's Linears."""
    found = family.diffusers.linear_of(name)
    return None if found is None else _target(found, modules, family)


def diffusers_linear_map(modules: dict[str, tuple[int, int]]) -> dict[str, LoraTarget]:
    """Every diffusers Linear name of this model (its family's names) -> its BFL target (module, rows, order)."""
    family = family_of_linears(modules)
    return {d: _target(found, modules, family) for d, found in family.diffusers.linear_names(modules).items()}


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
    names = family_of_linears(modules).diffusers
    return {names.key(k)[: -len(".weight")]: k for k in norm_scale_keys(modules)}


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


# LoRA key format -> [(key suffix, role)], longest suffixes first where one ends another
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


def _format_of(key: str) -> Optional[str]:
    if key.startswith("lora_unet_"):
        return "kohya"
    diffusers, bfl = _strip_diffusers_prefix(key) is not None, _strip_bfl_prefix(key) is not None
    if diffusers and bfl:  # a bare key under a root both namings share
        return _EITHER
    return "diffusers" if diffusers else "bfl" if bfl else None


def _shared_roots_format(keys) -> str:
    """The format of a file whose keys all lie under roots BFL and diffusers names share: diffusers if one
    of its modules is a diffusers Linear name that no family's BFL names have (``…layers.0.linear_1``,
    ``…modulation_img.linear``), else BFL."""
    for key in keys:
        found = module_and_role(key, "diffusers")
        if found is None:
            continue
        module = found[0]
        if any(f.diffusers.linear_of(module) is not None and f.diffusers.key(f"{module}.weight") is None
               for f in FAMILIES):
            return "diffusers"
    return "bfl"


def other_adapter(key: str) -> Optional[str]:
    for pattern, kind in _OTHER_ADAPTERS:
        if re.search(pattern, key):
            return kind
    return None


def preview_keys(keys, n: int = 3) -> str:
    keys = list(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def detect_lora_format(name: str, keys, family: Family) -> tuple[str, list[str]]:
    """(format, text-encoder keys) of a file's keys; raises LoraFormatError for anything not a FLUX LoRA
    (naming ``family``, the family of the model the LoRA is for)."""
    keys = list(keys)
    te_keys = [k for k in keys if k.startswith(_TEXT_ENCODER_PREFIXES)]
    model_keys = [k for k in keys if not k.startswith(_TEXT_ENCODER_PREFIXES)]
    sd_keys = [k for k in model_keys if any(m in k for m in _SD_UNET_MARKERS)]
    if sd_keys:
        raise LoraFormatError(f"{name}: not a FLUX LoRA (keys look like SDXL/SD1 UNet: {preview_keys(sd_keys)}); "
                              f"use a LoRA made for {family.title}")
    if any(k.startswith("lora_transformer_") for k in model_keys):
        raise LoraFormatError(f"{name}: OneTrainer key names (lora_transformer_...) are not supported; "
                              f"save the LoRA from OneTrainer in diffusers or kohya format")
    if not model_keys:
        detail = f"only text-encoder keys: {preview_keys(te_keys)}" if te_keys else "the file has no tensors"
        raise LoraFormatError(f"{name}: no LoRA for the FLUX diffusion model ({detail}); "
                              f"this loader applies LoRAs to the diffusion model only")
    formats = {k: _format_of(k) for k in model_keys}
    found = sorted({f for f in formats.values() if f not in (None, _EITHER)})
    if not found and _EITHER in formats.values():
        found = [_shared_roots_format(k for k, f in formats.items() if f == _EITHER)]
    if not found:
        raise LoraFormatError(f"{name}: not a FLUX LoRA (no key names a {family.title} layer: "
                              f"{preview_keys(model_keys)}); use a LoRA made for {family.title}")
    if len(found) > 1:
        examples = "; ".join(f"{f}: {next(k for k, g in formats.items() if g == f)}" for f in found)
        raise LoraFormatError(f"{name}: mixes LoRA key formats ({examples}); "
                              f"re-save it in one format (BFL, diffusers or kohya)")
    lora_format = found[0]
    strays = [k for k, f in formats.items()
              if f is None or (f == _EITHER and lora_format not in ("bfl", "diffusers"))]
    if strays:
        raise LoraFormatError(f"{name}: keys that name no {family.title} layer: {preview_keys(strays)}; "
                              f"the file may be damaged or made for another model")
    if lora_format == "bfl" and any(k.endswith(_COMFY_ONLY) for k in model_keys):
        lora_format = "comfy"
    return lora_format, te_keys


def module_and_role(key: str, lora_format: str) -> Optional[tuple[str, str]]:
    """(module name in the file's own spelling, role) of one key; None if the suffix is not understood."""
    if lora_format == "kohya":
        stem = key[len("lora_unet_"):]
    elif lora_format == "diffusers":
        stem = _strip_diffusers_prefix(key)
    else:
        stem = _strip_bfl_prefix(key)
    for suffix, role in _SUFFIXES[lora_format]:
        if stem.endswith(suffix):
            module = stem[: -len(suffix)]
            if role == "norm" and lora_format != "diffusers":
                module = module + "_norm.scale"  # the BFL key of the norm scale
            return module, role
    return None


def targets_bfl(modules_in_file) -> dict[str, LoraTarget]:
    return {m: LoraTarget(m) for m in modules_in_file}


def targets_kohya(modules_in_file, modules) -> dict[str, LoraTarget]:
    by_underscored = {m.replace(".", "_"): m for m in modules}
    return {m: LoraTarget(by_underscored.get(m, _kohya_guess(m))) for m in modules_in_file}


def targets_diffusers(modules_in_file, modules, name) -> dict[str, LoraTarget]:
    """The targets of diffusers names, read with the diffusers names of the family ``modules`` (the
    model's Linears) is."""
    family = family_of_linears(modules)
    out = {}
    for m in modules_in_file:
        target = _diffusers_target(m, modules, family)
        if target is None:
            raise LoraFormatError(f"{name}: {m} is not a {family.title} diffusers layer name; "
                                  f"the LoRA was made for another model: use a LoRA made for {family.title}")
        out[m] = target
    return out


def targets_of(lora_format: str, modules_in_file, modules, name) -> dict[str, LoraTarget]:
    """The BFL targets of a file's modules (``lora_format``: the file's key format) on a model with the
    Linears ``modules``."""
    if lora_format == "kohya":
        return targets_kohya(modules_in_file, modules)
    if lora_format == "diffusers":
        return targets_diffusers(modules_in_file, modules, name)
    return targets_bfl(modules_in_file)


def norm_key(module: str, lora_format: str, name: str, family: Family) -> str:
    """The BFL key of a norm scale a LoRA sets (``module`` in the file's spelling; diffusers names read
    with ``family``'s table)."""
    if lora_format != "diffusers":
        return module
    key = family.diffusers.tensor_of(f"{module}.weight")
    if key is None:
        raise LoraFormatError(f"{name}: {module}.weight is a full weight, not a LoRA; "
                              f"only QK-norm scales may ship as full tensors in a FLUX LoRA")
    return key
