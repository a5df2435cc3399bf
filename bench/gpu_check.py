"""Correctness on the GPU machine, through ComfyUI in-process (not a benchmark: no timings asserted).

    python bench/gpu_check.py --comfyui PATH [--dynamic-vram] [--out FILE]

Runs, in one ComfyUI process on CUDA with float32 weights for the stock path (``--fp32-unet``, so the
comparison is exact up to float rounding): Load BnB Flux (nf4, quantized img_in) -> Apply Control LoRA
-> Apply Control LoRA (style) -> KSampler, next to UNETLoader -> LoraLoaderModelOnly x2 -> KSampler,
and reports the relative error, which patcher class each model got and where the weights live.
``--dynamic-vram`` turns on ComfyUI's dynamic VRAM the way main.py does (the default on NVIDIA).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from quant_expand.testing.synthetic import (TinyFluxConfig, make_control_lora, make_lora, make_tiny_flux,  # noqa: E402
                                            save_safetensors)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--dynamic-vram", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU")
    args = ap.parse_args()

    import torch

    cfg = TinyFluxConfig(hidden_size=1024, depth=2, depth_single_blocks=2)
    models = tempfile.mkdtemp(prefix="bnb-gpu-check-")
    save_safetensors(make_tiny_flux(cfg, seed=0, exact_for="nf4"), os.path.join(models, "diffusion_models", "m.safetensors"))
    save_safetensors(make_control_lora(cfg, seed=2, rank=32), os.path.join(models, "loras", "control.safetensors"))
    save_safetensors(make_lora(cfg, kind="lora", seed=7, rank=16), os.path.join(models, "loras", "style.safetensors"))

    from quant_expand.testing.inprocess import ComfyHost
    from quant_expand.testing.prompts import (apply_lora, load_bnb_flux, rel_err, sampling_graph, set_lora_scale,
                                              stock_lora, unet_loader)

    host = ComfyHost.start(args.comfyui, REPO_ROOT, models, cpu=args.cpu, dynamic_vram=args.dynamic_vram,
                           extra_args=["--fp32-unet", "--force-fp32"])

    import comfy.model_management as mm

    # ComfyUI merges LoRAs in float16 on GPUs that favour it (model_management.lora_compute_dtype), which
    # puts ~1e-3 of rounding into the *reference*; merge in float32 so the comparison is exact
    # (--force-fp32 above does the same for every other float16 choice ComfyUI makes)
    mm.LORA_COMPUTE_DTYPES[mm.get_torch_device()] = torch.float32

    g = {"q": load_bnb_flux("m.safetensors", "nf4", False, "auto", quantize_img_in=True),
         "qc": apply_lora(["q", 0], "control.safetensors", 0.85),
         "qs": apply_lora(["qc", 0], "style.safetensors", 0.6),
         "r": unet_loader("m.safetensors"),
         "rc": stock_lora(["r", 0], "control.safetensors", 0.85),
         "rs": stock_lora(["rc", 0], "style.safetensors", 0.6)}
    dims = dict(context_dim=cfg.context_in_dim, pooled_dim=cfg.vec_in_dim, size=64, steps=3, control_seed=42)
    g = sampling_graph(g, ["qs", 0], key="bnb", prefix="a", **dims)
    g = sampling_graph(g, ["rs", 0], key="full", prefix="b", **dims)
    g = sampling_graph(g, ["q", 0], key="bnb_plain", prefix="c", **dims)
    # Set LoRA Scale on the loaded model (patches swapped in place) vs the chain applied at that strength
    g["sc"] = set_lora_scale(["qs", 0], "control.safetensors", 0.4)
    g["qc4"] = apply_lora(["q", 0], "control.safetensors", 0.4)
    g["qs4"] = apply_lora(["qc4", 0], "style.safetensors", 0.6)
    g = sampling_graph(g, ["sc", 0], key="bnb_rescaled", prefix="d", **dims)
    g = sampling_graph(g, ["qs4", 0], key="bnb_applied_at_0.4", prefix="e", **dims)
    out = host.run(g)

    ours, stock = host.node_output("q"), host.node_output("r")
    dm = ours.model.diffusion_model
    report = {
        "device": "cpu" if args.cpu else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "dynamic_vram_requested": args.dynamic_vram,
        "dynamic_vram_enabled": host.dynamic_vram,
        "stock_patcher": type(stock).__name__,
        "bnb_patcher": type(ours).__name__,
        "bnb_compute_dtype": host.pack_module("quant_expand.comfyui.report").load_report(ours).compute_dtype,
        "bnb_weights_device_after_sampling": str(dm.double_blocks[0].img_attn.qkv.weight.device),
        "loaded_models": [type(m.model).__name__ for m in mm.current_loaded_models],
        "rel_err_bnb_control_style_vs_stock_full_precision": rel_err(out["bnb"], out["full"]),
        "rel_effect_of_loras": rel_err(out["bnb_plain"], out["full"]),
        "finite": bool(torch.isfinite(out["bnb"]).all()),
        "set_lora_scale_equals_applying_at_that_strength": bool(torch.equal(out["bnb_rescaled"], out["bnb_applied_at_0.4"])),
        "rel_err_rescaled_vs_applied": rel_err(out["bnb_rescaled"], out["bnb_applied_at_0.4"]),
    }
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    ok = (report["finite"] and report["rel_err_bnb_control_style_vs_stock_full_precision"] < 1e-4
          and report["rel_err_rescaled_vs_applied"] < 1e-6)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
