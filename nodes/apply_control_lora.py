"""Apply Control LoRA and Set LoRA Scale: LoRAs applied lazily, strengths changed without reloading; the
inputs, the parse and the badge summary Apply LoRA Stack shares."""
from __future__ import annotations

import math
from typing import Optional

import folder_paths
from comfy_api.latest import io

from ..quant_expand.comfyui.loras import (
    applied_lora,
    apply_lora,
    linear_shapes,
    refuse_control_lora_elsewhere,
    set_lora_scale,
)
from ..quant_expand.errors import BnbFluxError, shown_name
from ..quant_expand.checkpoint.tensor_files import TensorFile
from ..quant_expand.lora.parse import parse_lora
from .categories import LOADERS
from .host_check import require_supported_host

STRENGTH_TOOLTIP = (
    "How strongly the LoRA acts. Canny and Depth Control LoRAs: 0.85 (BFL's default). Style LoRAs: usually "
    "0.6 to 1.0. At 0 a Control LoRA adds no weights but keeps its control input, so the graph still runs. "
    "Negative values invert a LoRA.")


STRENGTH_MIN, STRENGTH_MAX = -10.0, 10.0


def check_inputs(lora_name, strength) -> float:
    """The inputs as the schema declares them, checked here: ComfyUI's validator checks only widget values
    (a number from a link, a switch node's output arrive as they are) and lets NaN through (NaN < min is
    false). Returns the strength as a float."""
    if not isinstance(lora_name, str):
        raise BnbFluxError(f"lora_name is {type(lora_name).__name__} {shown_name(lora_name)}, not a file name; "
                           f"connect a LoRA file name (a string) or pick one in the widget")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise BnbFluxError(f"{lora_name}: strength is {type(strength).__name__} {shown_name(strength)}, not a number; "
                           f"connect a number between {STRENGTH_MIN:g} and {STRENGTH_MAX:g}")
    value = float(strength) if isinstance(strength, float) or abs(strength) < 2 ** 1000 else math.inf
    if not (math.isfinite(value) and STRENGTH_MIN <= value <= STRENGTH_MAX):
        shown = f"{value:g}" if math.isfinite(value) or isinstance(strength, float) else shown_name(strength)
        raise BnbFluxError(f"{lora_name}: strength is {shown}; use a finite number "
                           f"between {STRENGTH_MIN:g} and {STRENGTH_MAX:g}")
    return value


def lora_combo(tooltip: str):
    return io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"), tooltip=tooltip)


def strength_input(tooltip: str = STRENGTH_TOOLTIP):
    return io.Float.Input("strength", default=1.0, min=STRENGTH_MIN, max=STRENGTH_MAX, step=0.01, tooltip=tooltip)


def lora_summary(parsed, strength: float) -> dict:
    """What the frontend badge of Apply Control LoRA shows (JSON only: sent in the node's ``ui`` output)."""
    ranks = sorted({layer.rank for layer in parsed.layers})
    warnings = []
    if parsed.text_encoder_keys:
        # core's LoraLoader maps lora_te1_/lora_te_/text_encoder. to FLUX's CLIP-L and lora_te2_/lora_te3_ to T5
        # (comfy.lora.model_lora_keys_clip); tests/test_server_ui.py checks it on a FLUX CLIP
        warnings.append(f"{len(parsed.text_encoder_keys)} text-encoder keys not applied here: load the file in "
                        f"ComfyUI's Load LoRA (Model and CLIP) node too and use only its CLIP output")
    if not parsed.layers and not parsed.bias_diffs and not parsed.norm_sets:
        warnings.append("nothing in this file applies to the FLUX model")
    return {"name": parsed.name, "kind": "control" if parsed.is_control else "style",
            "format": parsed.source_format, "strength": strength,
            "rank": ranks[-1] if ranks else 0, "ranks": ranks, "layers": len(parsed.layers),
            "widened": dict(parsed.widened), "norm_sets": len(parsed.norm_sets),
            "description": parsed.describe(), "warnings": warnings}


def node_id(node_class) -> Optional[str]:
    """The prompt's id of the running node (ComfyUI fills ``hidden`` only when its executor runs it)."""
    hidden = getattr(node_class, "hidden", None)
    return getattr(hidden, "unique_id", None) if hidden is not None else None


def apply_lora_file(model, lora_name, strength, applied_by: Optional[str] = None):
    """What Apply Control LoRA does, for each LoRA of Apply LoRA Stack too: the inputs checked, the file
    parsed against the model's shapes, its patches added to a clone. Returns (model, badge summary)."""
    strength = check_inputs(lora_name, strength)
    path = folder_paths.get_full_path_or_raise("loras", lora_name)
    tensors = TensorFile(path)
    try:
        refuse_control_lora_elsewhere(model, tensors.keys(), lora_name)
        parsed = parse_lora(tensors, lora_name, linear_shapes(model))
    finally:
        tensors.close()
    return apply_lora(model, parsed, strength, lora_name, applied_by), lora_summary(parsed, strength)


class ApplyControlLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ApplyControlLora",
            display_name="Apply Control LoRA",
            category=LOADERS,
            search_aliases=["lora", "control lora", "load lora", "apply lora", "lora loader", "flux lora",
                            "canny", "depth", "canny lora", "depth lora", "controlnet", "control net",
                            "flux controlnet", "style lora", "bfl", "nf4 lora"],
            description=(
                "Applies a FLUX LoRA: a BFL Control LoRA (Canny, Depth), which makes the image from "
                "InstructPixToPixConditioning steer the picture, or an ordinary style or character LoRA. Chain "
                "several. Quantized weights are never rewritten."),
            inputs=[
                io.Model.Input("model", tooltip="A FLUX model: from Load BnB Flux or another Apply Control LoRA, "
                                                 "or from ComfyUI's Load Diffusion Model."),
                lora_combo("A LoRA file from models/loras: BFL's flux1-canny-dev-lora or flux1-depth-dev-lora, or "
                           "any FLUX LoRA (BFL, diffusers/PEFT, kohya or ComfyUI format)."),
                strength_input(),
            ],
            outputs=[io.Model.Output(tooltip="The model with the LoRA: connect it to another Apply Control LoRA, "
                                             "Set LoRA Scale or KSampler.")],
            hidden=[io.Hidden.unique_id],
            has_intermediate_output=True,  # a fully cached run resends the badge (execution.py, end of a run)
        )

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        require_supported_host()
        model, summary = apply_lora_file(model, lora_name, strength, node_id(cls))
        return io.NodeOutput(model, ui={"bnb_flux_lora": [summary]})


class SetLoraScale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SetLoraScale",
            display_name="Set LoRA Scale",
            category=LOADERS,
            search_aliases=["lora strength", "lora weight", "lora scale", "set lora strength", "change lora strength",
                            "control lora strength", "lora", "strength"],
            description=(
                "Changes the strength of a LoRA applied upstream by Apply Control LoRA or Apply LoRA Stack, "
                "without reloading or re-quantizing the model: the quick way to try strengths."),
            inputs=[
                io.Model.Input("model", tooltip="A model that went through one or more Apply Control LoRA or "
                                                 "Apply LoRA Stack nodes."),
                lora_combo("The LoRA to change: the file picked on an Apply Control LoRA upstream, or in a slot of an "
                           "Apply LoRA Stack that is on."),
                strength_input("The new strength of that LoRA, as on Apply Control LoRA: 0.85 for Canny and "
                               "Depth Control LoRAs, usually 0.6 to 1.0 for style LoRAs. Gives the same picture "
                               "as applying the LoRA at this strength."),
            ],
            outputs=[io.Model.Output(tooltip="The same model with the new strength: connect it to KSampler.")],
            has_intermediate_output=True,
        )

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        require_supported_host()
        strength = check_inputs(lora_name, strength)
        before = applied_lora(model, lora_name)
        badge = {"name": lora_name, "kind": "control" if before.control else "style", "from": before.strength,
                 "to": strength, "applied_by": before.node_id}
        return io.NodeOutput(set_lora_scale(model, lora_name, strength), ui={"bnb_flux_scale": [badge]})
