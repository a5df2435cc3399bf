"""Load BnB Flux: a FLUX.1 diffusion model quantized with bitsandbytes while it streams from disk, or a
pre-quantized one (lllyasviel/Forge NF4/FP4, diffusers-bnb, LLM.int8, Save BnB Flux) used as stored."""
from __future__ import annotations

import dataclasses

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..quant_expand.comfyui.loader import LoadOptions, load_bnb_flux
from ..quant_expand.checkpoint.tensor_files import open_tensor_set
from ..quant_expand.comfyui.report import FileQuantization, file_quantization, load_report
from .host_check import require_supported_host

CATEGORY = "loaders/bnb flux"


def _progress(total):
    return comfy.utils.ProgressBar(total)


def model_files() -> list[str]:
    """diffusion_models files, then checkpoints files not already listed (all-in-one NF4 checkpoints
    are usually kept there)."""
    names = list(folder_paths.get_filename_list("diffusion_models"))
    seen = set(names)
    names += [n for n in folder_paths.get_filename_list("checkpoints") if n not in seen]
    return names


def stored_quantization(path: str) -> FileQuantization:
    """How the file (every shard of a sharded model) stores its Linears, from its headers."""
    tensors = open_tensor_set(path)
    try:
        return file_quantization(tensors.keys())
    finally:
        tensors.close()


def model_path(name: str) -> str:
    for kind in ("diffusion_models", "checkpoints"):
        path = folder_paths.get_full_path(kind, name)
        if path is not None:
            return path
    raise FileNotFoundError(f"{name}: not found in models/diffusion_models or models/checkpoints")


class LoadBnbFlux(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadBnbFlux",
            display_name="Load BnB Flux",
            category=CATEGORY,
            description=(
                "Loads a FLUX.1 dev/schnell diffusion model and quantizes its transformer blocks with "
                "bitsandbytes while streaming it from disk. Pre-quantized files (lllyasviel/Forge NF4 v1/v2 "
                "and FP4, all-in-one or not; diffusers-bnb, sharded too; LLM.int8; Save BnB Flux) are used "
                "as stored: their own quantization wins over quant_type. LoRAs (stock LoRA nodes too) are "
                "applied lazily at sampling time and never rewrite the quantized weights."),
            inputs=[
                io.Combo.Input("unet_name", options=model_files(),
                               tooltip="A FLUX.1 diffusion model from models/diffusion_models (or an all-in-one "
                                       "checkpoint from models/checkpoints): safetensors, fp32/bf16/fp16/fp8 or "
                                       "pre-quantized with bitsandbytes, BFL or diffusers key names. For a sharded "
                                       "diffusers model pick any shard."),
                io.Combo.Input("quant_type", options=["nf4", "fp4", "int8"], default="nf4",
                               tooltip="Used for full-precision files only (a pre-quantized file keeps its own). nf4/fp4: 4-bit blockwise (blocksize 64), about 0.53 bytes per weight. "
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
            has_intermediate_output=True,  # a fully cached run resends the badge (execution.py, end of a run)
        )

    @classmethod
    def execute(cls, unet_name, quant_type, double_quant, compute_dtype, quantize_img_in=False) -> io.NodeOutput:
        require_supported_host()
        path = model_path(unet_name)
        options = LoadOptions(quant_type=quant_type, double_quant=bool(double_quant), compute_dtype=compute_dtype,
                              quantize_img_in=bool(quantize_img_in))
        model = load_bnb_flux(path, options, progress=_progress)
        # ComfyUI rebuilds a model through this when it needs a fresh copy (clone(disable_dynamic=True))
        model.cached_patcher_init = (load_bnb_flux, (path, options))
        report = load_report(model)
        text = (f"{report.source}\n{report.quant}: {report.quantized_layers} of {report.linear_layers} Linear "
                f"layers quantized, compute {report.compute_dtype}, {report.size_bytes / 2**20:.1f} MiB")
        stored = stored_quantization(path) if report.prequantized else FileQuantization(None, None)
        unused = stored.unused_inputs(quant_type, double_quant)
        if report.prequantized:
            text += "\nquant_type and double_quant not used: the file's own quantization wins"
        text += "".join(f"\n{line}" for line in unused)
        text += "".join(f"\nnote: {n}" for n in report.notes)
        badge = {**{k: v for k, v in dataclasses.asdict(report).items() if k != "load_timing"},
                 "notes": list(report.notes), "file_quantization": stored.describe() if stored.prequantized else None,
                 "unused_inputs": unused}
        return io.NodeOutput(model, ui={"text": [text], "bnb_flux": [badge]})
