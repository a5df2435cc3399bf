"""What ``cli inspect`` says about a LoRA file: the pack's own LoRA parser (the one Apply Control LoRA runs),
checked against the FLUX.1 model the file's shapes imply, since no model is loaded here."""
from __future__ import annotations

import os
from collections import Counter

from ..families import FLUX1
from ..flux import block_count
from ..lora.naming import (detect_lora_format, module_and_role, norm_key, other_adapter, targets_bfl,
                           targets_diffusers, targets_kohya)
from ..lora.parse import parse_lora

# FLUX.1 dev/schnell: hidden size and block counts, and the input widths a LoRA file need not show
FLUX1_HIDDEN, FLUX1_DOUBLE_BLOCKS, FLUX1_SINGLE_BLOCKS = 3072, 19, 38
FLUX1_LATENT = 64          # img_in's inputs and final_layer.linear's outputs: 16 channels x 2 x 2 patches
FLUX1_TEXT = 4096          # txt_in's inputs (T5-XXL)
FLUX1_VECTOR = 768         # vector_in's inputs (CLIP-L pooled)
TIME_EMBED = 256           # time_in's and guidance_in's inputs (sinusoidal embedding)
MLP_RATIO = 4              # ComfyUI builds every FLUX.1 with mlp_ratio 4

FORMAT_NAMES = {"bfl": "BFL (BFL layer names, lora_A/lora_B)",
                "comfy": "ComfyUI (BFL layer names, lora_up/lora_down, diff_b, reshape_weight)",
                "diffusers": "diffusers/PEFT (diffusers layer names, lora_A/lora_B)",
                "kohya": "kohya (lora_unet_ layer names, lora_down/lora_up)"}

_END_MARKERS = (".alpha", ".diff", ".diff_b", ".reshape_weight", ".set_weight", ".oft_blocks", ".dora_scale")
_INNER_MARKERS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.", ".lora_mid.", ".hada_", ".lokr_")


def looks_like_lora(keys) -> bool:
    """Any LoRA or adapter key: a model file has none. (A BFL Control LoRA also carries the QK-norm scales
    that mark a FLUX model, so this is asked first.)"""
    return any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) or k.endswith(_END_MARKERS)
               or any(m in k for m in _INNER_MARKERS) for k in keys)


def flux1_linear_shapes(hidden: int, doubles: int, singles: int, img_in: int = FLUX1_LATENT,
                        txt_in: int = FLUX1_TEXT, vector_in: int = FLUX1_VECTOR) -> dict[str, tuple[int, int]]:
    """BFL name -> (out, in) of every Linear of a FLUX.1 model of this size, in module order."""
    h, m = hidden, MLP_RATIO * hidden
    out = {"img_in": (h, img_in), "time_in.in_layer": (h, TIME_EMBED), "time_in.out_layer": (h, h),
           "vector_in.in_layer": (h, vector_in), "vector_in.out_layer": (h, h),
           "guidance_in.in_layer": (h, TIME_EMBED), "guidance_in.out_layer": (h, h), "txt_in": (h, txt_in)}
    # per stream (img_ / txt_) in a double block
    double = {"attn.qkv": (3 * h, h), "attn.proj": (h, h), "mlp.0": (m, h), "mlp.2": (h, m), "mod.lin": (6 * h, h)}
    single = {"linear1": (3 * h + m, h), "linear2": (h, h + m), "modulation.lin": (3 * h, h)}
    for i in range(doubles):
        for inner in FLUX1.double_linears:  # the BFL names inside a double block: img_attn.qkv, txt_mlp.0, ...
            out[f"double_blocks.{i}.{inner}"] = double[inner.split("_", 1)[1]]
    for i in range(singles):
        for inner in FLUX1.single_linears:
            out[f"single_blocks.{i}.{inner}"] = single[inner]
    out["final_layer.linear"] = (FLUX1_LATENT, h)
    out["final_layer.adaLN_modulation.1"] = (2 * h, h)
    return out


# Linears whose input is the hidden state, and those whose output is (a LoRA's lora_A / lora_B width there;
# none of the latter is a fused layer that a diffusers LoRA trains in pieces)
_HIDDEN_IN = ("attn.qkv", "attn.proj", "mod.lin", "mlp.0", "linear1", "modulation.lin", "final_layer.linear",
              "final_layer.adaLN_modulation.1", "out_layer")
_HIDDEN_OUT = ("img_in", "txt_in", "in_layer", "out_layer", "attn.proj", "mlp.2", "linear2")


def implied_model(tensors, name: str) -> dict[str, tuple[int, int]]:
    """The Linears of the FLUX.1 model this LoRA is for, sized from the file's own factors (hidden size, blocks,
    text and vector widths); FLUX.1 dev/schnell's sizes where the file does not say."""
    keys = tensors.keys()
    family, te_keys = detect_lora_format(name, keys)
    skip = set(te_keys)
    widths: dict[tuple[str, str], int] = {}  # (module in the file, role) -> lora_A inputs / lora_B rows
    norms = []  # BFL keys of the QK-norm scales the file sets
    for key in keys:
        found = None if key in skip or other_adapter(key) else module_and_role(key, family)
        if found is None:
            continue  # parse_lora names such keys
        module, role = found
        if role == "norm":
            norms.append(norm_key(module, family, name))
        elif role in ("down", "up") and len(tensors.shape(key)) == 2:
            widths[found] = tensors.shape(key)[1 if role == "down" else 0]
    in_file = sorted({module for module, _ in widths})
    if family == "kohya":
        targets = targets_kohya(in_file, {})
    elif family == "diffusers":
        targets = targets_diffusers(in_file, {}, name)
    else:
        targets = targets_bfl(in_file)
    ins, outs = {}, {}
    for (module, role), width in widths.items():
        target = targets[module]
        (ins if role == "down" else outs)[target.module] = width
    hidden = Counter(w for m, w in ins.items() if m.endswith(_HIDDEN_IN)) or \
        Counter(w for m, w in outs.items() if m.endswith(_HIDDEN_OUT))
    h = hidden.most_common(1)[0][0] if hidden else FLUX1_HIDDEN
    bfl_names = [t.module for t in targets.values()] + norms
    doubles, singles = block_count(bfl_names, "double_blocks"), block_count(bfl_names, "single_blocks")
    if h == FLUX1_HIDDEN:
        doubles, singles = max(doubles, FLUX1_DOUBLE_BLOCKS), max(singles, FLUX1_SINGLE_BLOCKS)
    img_in = ins.get("img_in", FLUX1_LATENT)
    if img_in == 2 * FLUX1_LATENT:  # a Control LoRA's image + control latent: the model's own img_in is narrower
        img_in = FLUX1_LATENT
    return flux1_linear_shapes(h, max(doubles, 1), max(singles, 1), img_in=img_in,
                               txt_in=ins.get("txt_in", FLUX1_TEXT), vector_in=ins.get("vector_in.in_layer", FLUX1_VECTOR))


def describe_lora_file(path: str, tensors) -> str:
    """What ``inspect`` prints for a LoRA; LoraFormatError (Apply Control LoRA's message) when the node would
    refuse the file."""
    name = os.path.basename(path)
    modules = implied_model(tensors, name)
    parsed = parse_lora(tensors, name, modules)
    kind = "Control LoRA" if parsed.is_control else "LoRA"
    ranks = sorted({layer.rank for layer in parsed.layers})
    rank = "" if not ranks else f", rank {ranks[0]}" if len(ranks) == 1 else f", ranks {ranks[0]} to {ranks[-1]}"
    lines = [f"file: {name} ({tensors.size_bytes / 2**20:.1f} MiB)",
             f"a FLUX {kind}, not a diffusion model: Load BnB Flux refuses it, Apply Control LoRA applies it",
             f"format: {FORMAT_NAMES[parsed.source_format]}; {len(parsed.layers)} low-rank layers{rank}"]
    changes = [f"{len(parsed.bias_diffs)} bias diffs"] if parsed.bias_diffs else []
    if parsed.norm_sets:
        changes.append(f"{len(parsed.norm_sets)} QK-norm scales replaced")
    changes += [f"{m} widened to {w} inputs (image + control latent)" for m, w in parsed.widened.items()]
    if changes:
        lines.append("also: " + ", ".join(changes))
    if parsed.alpha_note:
        lines.append(f"scale: {parsed.alpha_note}")
    elif parsed.layers:
        scales = sorted({round(layer.scale, 6) for layer in parsed.layers})
        source = "alpha/rank" if any(layer.alpha is not None for layer in parsed.layers) else "no alpha in the file"
        lines.append(f"scale: {', '.join(f'{s:g}' for s in scales)} ({source})")
    if parsed.text_encoder_keys:
        lines.append(f"text encoder: {len(parsed.text_encoder_keys)} tensors, not applied by Apply Control LoRA "
                     f"(diffusion model only); ComfyUI's Load LoRA (Model and CLIP) applies them")
    h = modules["img_in"][0]
    doubles = block_count(modules, "double_blocks")
    singles = block_count(modules, "single_blocks")
    if h == FLUX1_HIDDEN:
        lines.append(f"made for: FLUX.1 (hidden size {h}, as dev and schnell)")
    else:
        lines.append(f"made for: a FLUX.1-type model with hidden size {h} (at least {doubles} double + {singles} "
                     f"single blocks); FLUX.1 dev and schnell have {FLUX1_HIDDEN}, so it does not fit them")
    if parsed.is_control:
        lines.append("use: put it in models/loras and pick it in Apply Control LoRA after Load BnB Flux (or any "
                     "FLUX loader); feed the control image (e.g. its Canny edges) through "
                     "InstructPixToPixConditioning to KSampler")
    else:
        lines.append("use: put it in models/loras and pick it in Apply Control LoRA after Load BnB Flux (the "
                     "quantized weights stay untouched; ComfyUI's Load LoRA works too); Set LoRA Scale changes "
                     "its strength later")
    return "\n".join(lines)
