"""FLUX.2 and Chroma files in fp8: plain float8 weights (no scales), Comfy-Org's scaled fp8 and its
``comfy_quant`` "fp8mixed" files (float8_e4m3fn block Linears with a scale each, the rest bf16), written
with ComfyUI's own code (``tests/scaled_files.py``), through Load BnB Flux and through ComfyUI's UNETLoader.

The fp8 weights' dequantized values are ternary times one scale per tensor (every 64-value block {-v, 0, v}
with v reached), so NF4 without double quant holds exactly the numbers ComfyUI computes with: the latents
must match to 1e-6 (relative L2, float32 on CPU, two euler steps for FLUX.2, one for the larger Chroma).
"""
from __future__ import annotations

import pytest
import torch

from family_sampling import assert_same_latents, quantized_layer_names, sample_against_unet_loader
from quant_expand.testing.family_models import (
    ChromaConfig,
    Flux2Config,
    chroma_quantized_linears,
    flux2_quantized_linears,
    make_chroma,
    make_flux2,
)
from quant_expand.testing.prompts import load_bnb_flux
from quant_expand.testing.synthetic import save_safetensors
from scaled_files import comfy_quant_linears, scaled_fp8_linears

KLEIN = Flux2Config(guidance=False)
DEV = Flux2Config(guidance=True)
CHROMA = ChromaConfig()


def plain_float8(sd: dict) -> dict:
    """Every 2-D weight cast to float8_e4m3fn, as fp8 copies of a model are often shared (no scales). The
    family test models' quantized Linears hold ±2**k and zeros, which e4m3 keeps exactly."""
    return {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in sd.items()}


def write(host, name: str, sd: dict) -> str:
    save_safetensors(sd, host.model_path("diffusion_models", name))
    return name


@pytest.fixture(scope="module")
def flux2_files(host):
    klein, dev = make_flux2(KLEIN, seed=4), make_flux2(DEV, seed=5)
    names = sorted(flux2_quantized_linears(KLEIN))
    return {
        "klein plain fp8": write(host, "tiny_klein_plain_fp8.safetensors", plain_float8(klein)),
        "klein scaled fp8": write(host, "tiny_klein_scaled_fp8.safetensors", scaled_fp8_linears(klein, names)[0]),
        "klein fp8mixed": write(host, "tiny_klein_fp8mixed.safetensors",
                                comfy_quant_linears(klein, names, "float8_e4m3fn")[0]),
        "dev fp8mixed": write(host, "tiny_flux2_dev_fp8mixed.safetensors",
                              comfy_quant_linears(dev, sorted(flux2_quantized_linears(DEV)), "float8_e4m3fn")[0]),
    }


@pytest.mark.parametrize("case", ["klein plain fp8", "klein scaled fp8", "klein fp8mixed", "dev fp8mixed"])
def test_flux2_fp8_files_sample_like_unet_loader(host, flux2_files, case):
    cfg = DEV if case.startswith("dev") else KLEIN
    name = flux2_files[case]

    def check(patcher):
        assert quantized_layer_names(patcher, host) == flux2_quantized_linears(cfg)
        report = host.pack_module("quant_expand.comfyui.report").load_report(patcher)
        assert f"(FLUX.2 [{case.split()[0]}])" in report.source

    assert_same_latents(sample_against_unet_loader(host, load_bnb_flux(name, "nf4", False), name, cfg, steps=2,
                                                   check=check))


def test_chroma_fp8mixed_file_samples_like_unet_loader(host):
    sd = make_chroma(CHROMA, seed=0)
    name = write(host, "tiny_chroma_fp8mixed.safetensors",
                 comfy_quant_linears(sd, sorted(chroma_quantized_linears(CHROMA)), "float8_e4m3fn")[0])
    del sd

    def check(patcher):
        assert quantized_layer_names(patcher, host) == chroma_quantized_linears(CHROMA)

    assert_same_latents(sample_against_unet_loader(host, load_bnb_flux(name, "nf4", False), name, CHROMA, steps=1,
                                                   check=check))
