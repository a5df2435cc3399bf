"""Model and LoRA files written by the ComfyUI tests that chain Load BnB Flux, a Control LoRA and a style LoRA."""
from __future__ import annotations

import os

from quant_expand.testing.synthetic import TinyFluxConfig, make_control_lora, make_lora, make_tiny_flux, save_safetensors


def write_flux_with_loras(cfg: TinyFluxConfig, models_dir: str, loras_dir: str, model: str, control: str,
                          style: str) -> dict:
    """A tiny FLUX whose weights survive NF4 exactly (seed 0) as ``models_dir/model``, and for it a BFL
    Control LoRA (seed 2) as ``loras_dir/control`` and a style LoRA (seed 7) as ``loras_dir/style``.
    Returns the style LoRA's tensors, for variants made from it."""
    save_safetensors(make_tiny_flux(cfg, seed=0, exact_for="nf4"), os.path.join(models_dir, model))
    save_safetensors(make_control_lora(cfg, seed=2), os.path.join(loras_dir, control))
    style_sd = make_lora(cfg, kind="lora", seed=7)
    save_safetensors(style_sd, os.path.join(loras_dir, style))
    return style_sd
