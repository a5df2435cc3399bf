"""Load BnB Flux: a FLUX diffusion model (FLUX.1, FLUX.2, Chroma) quantized with bitsandbytes while it streams from disk, or a
pre-quantized one (lllyasviel/Forge NF4/FP4, diffusers-bnb, LLM.int8, Save BnB Flux) used as stored."""
from __future__ import annotations

import dataclasses

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..quant_expand.comfyui.loader import LoadOptions, load_bnb_flux
from ..quant_expand.checkpoint.tensor_files import open_tensor_set
from ..quant_expand.comfyui.report import FileQuantization, file_quantization, load_report
from .categories import LOADERS
from .host_check import require_supported_host


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
            category=LOADERS,
            search_aliases=["nf4", "fp4", "int8", "bitsandbytes", "bnb", "quantized", "quantize", "4-bit", "4bit",
                            "8-bit", "flux", "flux nf4", "load flux", "flux loader", "low vram", "forge nf4",
                            "flux1-dev-bnb-nf4", "diffusers bnb", "flux2", "flux.2", "klein", "chroma"],
            description=(
                "Loads a FLUX diffusion model (FLUX.1 dev or schnell, FLUX.2 [dev] or [klein], Chroma) quantized "
                "with bitsandbytes: NF4 or FP4 (4-bit, about a quarter of bf16's memory) or int8. Pre-quantized "
                "NF4/FP4/int8 files (Forge, diffusers) load as they are."),
            inputs=[
                io.Combo.Input("unet_name", options=model_files(),
                               tooltip="The FLUX.1, FLUX.2 or Chroma model file, from models/diffusion_models (or an all-in-one "
                                       "checkpoint from models/checkpoints): full precision (bf16, fp16, fp8) or "
                                       "already quantized. For a sharded diffusers model pick any shard."),
                io.Combo.Input("quant_type", options=["nf4", "fp4", "int8"], default="nf4",
                               tooltip="How to quantize a full-precision file. nf4 (recommended): 4-bit, the "
                                       "best quality for its size. fp4: 4-bit, a little less accurate. int8: twice "
                                       "the size of nf4, closest to bf16. A pre-quantized file keeps its own."),
                io.Boolean.Input("double_quant", default=True,
                                 tooltip="4-bit only: also compresses the scales, saving about 0.5 GB on FLUX.1 "
                                         "at a barely measurable cost. Leave on. Ignored for int8 and pre-quantized "
                                         "files."),
                io.Combo.Input("compute_dtype", options=["auto", "bfloat16", "float16", "float32"], default="auto",
                               tooltip="The precision the model computes in. Leave on auto: ComfyUI's choice for "
                                       "FLUX on this device (bf16 on recent NVIDIA GPUs, fp32 on CPU)."),
                io.Boolean.Input("quantize_img_in", default=False, optional=True,
                                 tooltip="Leave off. On: also quantizes img_in, the tiny layer that reads the "
                                         "latent; it saves almost nothing and adds error where the image enters "
                                         "the model."),
            ],
            outputs=[io.Model.Output(tooltip="The quantized FLUX model: connect it to Apply Control LoRA, a LoRA "
                                             "loader (model only), model patches or KSampler.")],
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
        stored = report.stored or FileQuantization(None, None)
        unused = stored.unused_inputs(quant_type, double_quant)
        if report.prequantized:
            text += "\nquant_type and double_quant not used: the file's own quantization wins"
        text += "".join(f"\n{line}" for line in unused)
        text += "".join(f"\nnote: {n}" for n in report.notes)
        badge = {**{k: v for k, v in dataclasses.asdict(report).items() if k not in ("load_timing", "stored")},
                 "notes": list(report.notes), "file_quantization": stored.describe() if stored.prequantized else None,
                 "unused_inputs": unused}
        return io.NodeOutput(model, ui={"text": [text], "bnb_flux": [badge]})
