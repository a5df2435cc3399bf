"""Apply LoRA Stack: several LoRAs in one node, each with its strength and an on/off switch. Each enabled
slot is applied exactly as Apply Control LoRA applies it; switching a slot runs only this node again."""
from __future__ import annotations

import math

import folder_paths
from comfy_api.latest import io

from ..quant_expand.errors import BnbFluxError, shown_name
from .apply_control_lora import STRENGTH_MAX, STRENGTH_MIN, apply_lora_file, node_id
from .host_check import require_supported_host
from .categories import LOADERS

SLOTS = 6
EMPTY = "None"  # a slot with no file


def slot_inputs(i: int) -> list:
    files = [EMPTY] + folder_paths.get_filename_list("loras")
    return [
        io.Combo.Input(f"lora_{i}", options=files, default=EMPTY, optional=True,
                       tooltip=f"Slot {i}: a LoRA from models/loras (a BFL Canny or Depth Control LoRA, at most one "
                               f"per model, or any FLUX style or character LoRA), or None to leave the slot empty. "
                               f"Slots apply in order, 1 first; put each file in one slot only."),
        io.Float.Input(f"strength_{i}", default=1.0, min=STRENGTH_MIN, max=STRENGTH_MAX, step=0.01, optional=True,
                       tooltip=f"Slot {i}: how strongly this LoRA acts. Canny and Depth Control LoRAs: 0.85 (BFL's "
                               f"default). Style LoRAs: usually 0.6 to 1.0. At 0 a Control LoRA keeps its control "
                               f"input, so the graph still runs. Negative values invert a LoRA."),
        io.Boolean.Input(f"on_{i}", default=True, label_on="on", label_off="off", optional=True,
                         tooltip=f"Slot {i}: off skips this LoRA and keeps it in the slot, to compare with and "
                                 f"without it. Switching runs only this node again: the model from Load BnB Flux "
                                 f"is not reloaded or re-quantized."),
    ]


class ApplyLoraStack(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ApplyLoraStack",
            display_name="Apply LoRA Stack",
            category=LOADERS,
            search_aliases=["lora stack", "lora stacker", "stacker", "multiple loras", "multi lora", "several loras",
                            "lora list", "lora loader", "load loras", "lora toggle", "lora switch", "lora on off",
                            "nunchaku lora stack", "power lora loader", "flux lora", "style lora", "loras"],
            description=(
                f"Applies up to {SLOTS} FLUX LoRAs in one node, each with its own strength and on/off switch: BFL "
                f"Control LoRAs (Canny, Depth; one per model) and style or character LoRAs. Switching a slot "
                f"reloads nothing and quantized weights are never rewritten. Set LoRA Scale can change a slot's "
                f"strength later."),
            inputs=[io.Model.Input("model", tooltip="A FLUX model: from Load BnB Flux (the LoRAs are added while "
                                                     "sampling, quantized weights untouched), from Apply Control "
                                                     "LoRA, or from ComfyUI's Load Diffusion Model.")]
                   + [inp for i in range(1, SLOTS + 1) for inp in slot_inputs(i)],
            outputs=[io.Model.Output(tooltip="The model with every slot that is on: connect it to KSampler, or to "
                                             "Set LoRA Scale to change one LoRA's strength.")],
            hidden=[io.Hidden.unique_id],
            has_intermediate_output=True,  # a fully cached run resends the badge (execution.py, end of a run)
        )

    @classmethod
    def execute(cls, model, **slots) -> io.NodeOutput:
        require_supported_host()
        applied_by = node_id(cls)
        report = []
        for i in range(1, SLOTS + 1):
            name = slots.get(f"lora_{i}", EMPTY)
            if name == EMPTY or name is None:
                continue
            on = slots.get(f"on_{i}", True)
            if not isinstance(on, bool):
                raise BnbFluxError(f"on_{i} is {type(on).__name__} {shown_name(on)}, not a switch; connect a "
                                   f"boolean or use the widget")
            strength = slots.get(f"strength_{i}", 1.0)
            if not on:
                # the badge goes out as JSON, where NaN and inf are not numbers
                finite = isinstance(strength, (int, float)) and not isinstance(strength, bool) and math.isfinite(strength)
                shown = strength if finite else None
                report.append({"slot": i, "name": name, "state": "off", "strength": shown})
                continue
            try:
                model, summary = apply_lora_file(model, name, strength, applied_by)
            except BnbFluxError as e:  # the same message, naming the slot
                raise type(e)(f"lora_{i}: {e}") from None
            report.append({"slot": i, "state": "applied", **summary})
        return io.NodeOutput(model, ui={"bnb_flux_stack": report})
