"""The files every benchmark samples: FLUX.1-dev's architecture with random weights (no download) as a
bf16 safetensors, and Control / style LoRAs for it, written once into a folder of the work directory
named by the model's shape."""
from __future__ import annotations

import gc
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # the pack's quant_expand, for scripts started as bench/NAME.py

from quant_expand.testing.synthetic import TinyFluxConfig, flux_shapes, linear_modules  # noqa: E402

FULL = TinyFluxConfig(hidden_size=3072, depth=19, depth_single_blocks=38, context_in_dim=4096, vec_in_dim=768)


def flux_width(depth: int, single: int) -> TinyFluxConfig:
    """FLUX.1-dev's width (3072, T5 and CLIP inputs) with ``depth`` double and ``single`` single blocks."""
    return TinyFluxConfig(hidden_size=FULL.hidden_size, depth=depth, depth_single_blocks=single,
                          context_in_dim=FULL.context_in_dim, vec_in_dim=FULL.vec_in_dim)


SMALL = TinyFluxConfig(hidden_size=256, depth=2, depth_single_blocks=2, context_in_dim=64, vec_in_dim=64)
GIB = 2 ** 30


def write_model(path, cfg, device, log):
    """Random bf16 FLUX.1-dev (std 0.02 weights, unit norm scales, zero biases), generated on ``device``."""
    import torch
    from safetensors.torch import save_file

    if os.path.exists(path):
        log(f"model file exists: {path}")
        return
    t = time.perf_counter()
    g = torch.Generator(device=device).manual_seed(0)
    sd = {}
    for key, shape in flux_shapes(cfg).items():
        if key.endswith(".scale"):
            sd[key] = torch.ones(shape, dtype=torch.bfloat16)
        elif key.endswith(".bias"):
            sd[key] = torch.zeros(shape, dtype=torch.bfloat16)
        else:
            sd[key] = (torch.randn(shape, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()
    save_file(sd, path)
    n = sum(v.numel() for v in sd.values())
    del sd
    gc.collect()
    log(f"wrote {n / 1e9:.2f} B params ({os.path.getsize(path) / GIB:.1f} GiB) in {time.perf_counter() - t:.0f} s")


def write_lora(path, cfg, rank, targets, control, seed):
    """BFL-format LoRA; ``control``: lora_B biases, img_in widened to 2x inputs, QK-norm scale sets."""
    import torch
    from safetensors.torch import save_file

    if os.path.exists(path):
        return
    g = torch.Generator().manual_seed(seed)
    shapes = flux_shapes(cfg)
    sd = {}
    for m in targets:
        out_f, in_f = shapes[f"{m}.weight"]
        if control and m == "img_in":
            in_f *= 2
        r = min(rank, in_f, out_f)
        sd[f"{m}.lora_A.weight"] = (torch.randn(r, in_f, generator=g) / in_f ** 0.5).to(torch.bfloat16)
        sd[f"{m}.lora_B.weight"] = (torch.randn(out_f, r, generator=g) * 0.002).to(torch.bfloat16)
        if control:
            sd[f"{m}.lora_B.bias"] = (torch.randn(out_f, generator=g) * 0.001).to(torch.bfloat16)
    if control:
        for key in shapes:
            if key.endswith("_norm.scale"):
                sd[key] = (1.0 + 0.01 * torch.randn(shapes[key], generator=g)).to(torch.bfloat16)
    save_file(sd, path)


MODEL_FILE = "flux_random_bf16.safetensors"


def write_inputs(workdir, cfg, device, log, styles=True) -> str:
    """The random bf16 model (``MODEL_FILE``), ``control.safetensors`` (rank 128 on every Linear, as
    :func:`write_lora` makes a Control LoRA) and, with ``styles``, ``style1``/``style2.safetensors``
    (rank 32 on every Linear but img_in) for ``cfg``, in a folder of ``workdir`` named by the shape:
    the writers keep a file that exists, so one written at another size is never taken for this one.
    Returns that folder: ComfyUI's models folder for the run."""
    import hashlib

    tag = f"flux_w{cfg.hidden_size}_d{cfg.depth}_s{cfg.depth_single_blocks}_{hashlib.sha1(repr(cfg).encode()).hexdigest()[:8]}"
    folder = os.path.join(workdir, tag)
    for sub in ("diffusion_models", "loras"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    write_model(os.path.join(folder, "diffusion_models", MODEL_FILE), cfg, device, log)
    linears = linear_modules(cfg)
    write_lora(os.path.join(folder, "loras", "control.safetensors"), cfg, 128, linears, True, 3)
    if styles:
        targets = [m for m in linears if m != "img_in"]
        write_lora(os.path.join(folder, "loras", "style1.safetensors"), cfg, 32, targets, False, 4)
        write_lora(os.path.join(folder, "loras", "style2.safetensors"), cfg, 32, targets, False, 5)
    return folder
