"""Save BnB Flux: writes a Load BnB Flux model as a pre-quantized file, so the next start skips quantizing."""
from __future__ import annotations

import logging
import os

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..quant_expand.comfyui.saver import bnb_flux_state_for_saving
from ..quant_expand.errors import BnbFluxError, has_control_characters, shown_name
from ..quant_expand.checkpoint.writer import save_flux_file
from .categories import SAVERS
from .host_check import require_supported_host

log = logging.getLogger("comfyui-bnb-flux")


class SaveBnbFlux(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SaveBnbFlux",
            display_name="Save BnB Flux",
            category=SAVERS,
            search_aliases=["save model", "export model", "save quantized", "save nf4", "save fp4", "save int8",
                            "quantize and save", "save bitsandbytes", "save bnb", "save flux", "convert to nf4"],
            description=(
                "Saves the quantized model from Load BnB Flux as a safetensors file, so the next load skips "
                "quantizing. Move the file from ComfyUI's output folder to models/diffusion_models."),
            inputs=[
                io.Model.Input("model", tooltip="A model straight from Load BnB Flux, with no LoRA applied (LoRAs "
                                                 "stay separate files: apply them after loading)."),
                io.String.Input("filename_prefix", default="diffusion_models/flux_bnb",
                                tooltip="Where to save, under ComfyUI's output folder; a counter and .safetensors "
                                        "are added (diffusion_models/flux_bnb_00001_.safetensors)."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, filename_prefix) -> io.NodeOutput:
        require_supported_host()
        if not isinstance(filename_prefix, str) or not filename_prefix or has_control_characters(filename_prefix):
            # the OS would only say "Invalid argument" (a NUL), or a newline would end up in a file name
            raise BnbFluxError(f"filename_prefix {shown_name(filename_prefix)} is not a usable path: give a path "
                               f"under ComfyUI's output directory without control characters (NUL, newlines)")
        tensors, metadata = bnb_flux_state_for_saving(model, progress=comfy.utils.ProgressBar)
        output_dir = folder_paths.get_output_directory()
        try:
            folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output_dir)
        except Exception as e:  # ComfyUI raises a plain Exception for a prefix that leaves the output folder
            raise BnbFluxError(f"filename_prefix {shown_name(filename_prefix)}: {e}; give a path under ComfyUI's "
                               f"output directory") from None
        path = os.path.join(folder, f"{filename}_{counter:05}_.safetensors")
        save_flux_file(path, tensors, metadata)
        size = os.path.getsize(path)
        shown_path = os.path.relpath(path, output_dir)
        text = (f"saved {shown_path} ({size / 2**20:.1f} MiB, {metadata['quant_type']}, "
                f"{metadata['quantized_layers']} of {metadata['linear_layers']} Linear layers quantized)")
        log.info("Save BnB Flux: %s", text)
        badge = {"path": shown_path.replace(os.sep, "/"), "size_bytes": size, "quant_type": metadata["quant_type"],
                 "quantized_layers": int(metadata["quantized_layers"]), "linear_layers": int(metadata["linear_layers"])}
        return io.NodeOutput(ui={"text": [text], "bnb_flux_saved": [badge],
                                 "bnb_flux_files": [{"filename": os.path.basename(path), "subfolder": subfolder,
                                                     "type": "output"}]})
