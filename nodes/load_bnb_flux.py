"""Load BnB Flux: a FLUX.1 diffusion model quantized with bitsandbytes while it streams from disk."""
from __future__ import annotations

import folder_paths
import comfy.utils
from comfy_api.latest import io

from ..quant_expand.comfy_adapter import load_bnb_flux

CATEGORY = "loaders/bnb flux"


def _progress(total):
    return comfy.utils.ProgressBar(total)


class LoadBnbFlux(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadBnbFlux",
            display_name="Load BnB Flux",
            category=CATEGORY,
            description=(
                "Loads a FLUX.1 dev/schnell diffusion model and quantizes its transformer blocks with "
                "bitsandbytes while streaming it from disk. LoRAs (stock LoRA nodes too) are applied "
                "lazily at sampling time and never rewrite the quantized weights."),
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="A FLUX.1 diffusion model (safetensors, fp32/bf16/fp16/fp8, BFL key names, "
                                       "with or without the model.diffusion_model. prefix) from models/diffusion_models."),
                io.Combo.Input("quant_type", options=["nf4", "fp4", "int8"], default="nf4",
                               tooltip="nf4/fp4: 4-bit blockwise (blocksize 64), about 0.53 bytes per weight. "
                                       "int8: LLM.int8 storage (int8 rows + per-row scale), about 1 byte per weight, "
                                       "run as weight-only dequantize + matmul."),
                io.Boolean.Input("double_quant", default=True,
                                 tooltip="4-bit only: also quantize the per-block scales (saves ~0.4 bits per "
                                         "weight, adds a little error). Ignored for int8."),
                io.Combo.Input("compute_dtype", options=["auto", "bfloat16", "float16", "float32"], default="auto",
                               tooltip="dtype the weights are dequantized to and the model computes in. auto: "
                                       "ComfyUI's choice for FLUX on this device (bf16 on recent NVIDIA GPUs, "
                                       "fp32 on CPU)."),
                io.Boolean.Input("quantize_img_in", default=False, optional=True,
                                 tooltip="Also quantize img_in, the image input layer (0.005 % of the weights). Off "
                                         "by default: it sees raw latents. A Control LoRA widens it either way, "
                                         "without requantizing."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, unet_name, quant_type, double_quant, compute_dtype, quantize_img_in=False) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        options = {"quant_type": quant_type, "double_quant": bool(double_quant), "compute_dtype": compute_dtype,
                   "quantize_img_in": bool(quantize_img_in)}
        model = load_bnb_flux(path, options, progress=_progress)
        # ComfyUI rebuilds a model through this when it needs a fresh copy (clone(disable_dynamic=True))
        model.cached_patcher_init = (load_bnb_flux, (path, options))
        return io.NodeOutput(model)
