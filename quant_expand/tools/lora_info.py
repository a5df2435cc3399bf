"""What ``cli inspect`` says about a LoRA file: the pack's own LoRA parser (the one Apply Control LoRA runs),
checked against the model the file's layers and shapes imply (``lora/implied_model.py``), since no model is
loaded here."""
from __future__ import annotations

import os

from ..families import FLUX1
from ..lora.implied_model import ImpliedModel, implied_model_of
from ..lora.naming import preview_keys
from ..lora.parse import parse_lora

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


def implied_model(tensors, name: str) -> dict[str, tuple[int, int]]:
    """The Linears (BFL name -> (out, in)) of the model this LoRA is for, sized from the file's own factors;
    a released model's sizes where the file fits one."""
    return implied_model_of(tensors, name).linears


def _either(words: list[str], last: str = "or") -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {last} {words[-1]}"


def made_for(model: ImpliedModel) -> str:
    """The families and released models the file fits, or the size it implies and why it fits none."""
    families = model.families
    if model.sizes:
        fits = [[s for s in model.sizes if s in f.sizes] for f in families]
        line = "made for: " + _either([f"{f.title} (hidden size {sizes[0].hidden}, as "
                                       f"{_either([s.variant(f.title) for s in sizes])})"
                                       for f, sizes in zip(families, fits)])
    else:
        text = "" if model.text is None else f", text width {model.text}"
        released = "; ".join(f"{s.name}: hidden size {s.hidden}, {s.doubles} double + {s.singles} single blocks"
                             f"{'' if model.text is None else f', text width {s.text}'}"
                             for f in families for s in f.sizes)
        line = (f"made for: a {_either([f'{f.title}-type' for f in families])} model with hidden size {model.hidden} "
                f"(at least {model.doubles} double + {model.singles} single blocks{text}), which no released model "
                f"is ({released}), so it does not fit them")
    if len(families) > 1:
        line += (f"; nothing in the file tells {_either([f.title for f in families], 'and')} apart: no layer or "
                 f"width only one of them has")
    return line


PEFT_PREFIX = "base_model.model."


def comfyui_leaves_out(parsed, keys) -> str:
    """What ComfyUI's own Load LoRA leaves out of a diffusers LoRA, said as a phrase ("" when nothing): its LoRA
    key map (ComfyUI 0.33, comfy/lora.py) has, for every FLUX model, FLUX.1's diffusers names
    (comfy.utils.flux_to_diffusers), as ``transformer.<name>`` or bare, never under PEFT's prefix."""
    if parsed.source_format != "diffusers":
        return ""
    if any(k.startswith(PEFT_PREFIX) for k in keys):
        return f"ComfyUI's Load LoRA does not read {PEFT_PREFIX} keys: it would leave out all {len(parsed.layers)} layers"
    names = sorted({layer.source for layer in parsed.layers if FLUX1.diffusers.linear_of(layer.source) is None})
    if not names:
        return ""
    return (f"ComfyUI's Load LoRA reads {FLUX1.title}'s diffusers names only and would leave out {len(names)} of its "
            f"layers: {preview_keys(names)}")


def describe_lora_file(path: str, tensors) -> str:
    """What ``inspect`` prints for a LoRA; LoraFormatError (Apply Control LoRA's message) when the node would
    refuse the file."""
    name = os.path.basename(path)
    model = implied_model_of(tensors, name)
    parsed = parse_lora(tensors, name, model.linears)
    control = parsed.is_control and model.families[0].control_loras  # BFL's Canny/Depth LoRAs: FLUX.1 only
    kind = "Control LoRA" if control else "LoRA"
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
    lines.append(made_for(model))
    if control:
        lines.append("use: put it in models/loras and pick it in Apply Control LoRA after Load BnB Flux (or any "
                     "FLUX loader); feed the control image (e.g. its Canny edges) through "
                     "InstructPixToPixConditioning to KSampler")
    else:
        stock = comfyui_leaves_out(parsed, tensors.keys()) or "ComfyUI's Load LoRA works too"
        lines.append(f"use: put it in models/loras and pick it in Apply Control LoRA after Load BnB Flux (the "
                     f"quantized weights stay untouched; {stock}); Set LoRA Scale changes its strength later")
    return "\n".join(lines)
