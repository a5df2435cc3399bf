"""Ordinary LoRAs on FLUX.2 [klein] and Chroma through ComfyUI's real executor (CPU, float32): stock
LoraLoaderModelOnly, Apply Control LoRA and Set LoRA Scale on the Load BnB Flux model equal ComfyUI's
LoraLoaderModelOnly on UNETLoader of the same file.

The families' test models (``quant_expand.testing.family_models``) hold values nf4 keeps exactly, so the
full-precision model is the exact reference; the LoRAs reach every Linear, the quantized block Linears
and the ones the family keeps unquantized (FLUX.2's global modulation, Chroma's approximator), in the
key forms ComfyUI itself maps for these families. The quantized graph runs first and ComfyUI's
model is loaded only after it, so the two models are never in memory together.
"""
from __future__ import annotations

import gc

import pytest
import torch

from quant_expand.testing.family_models import (
    LORA_FORMATS,
    ChromaConfig,
    Flux2Config,
    chroma_linears,
    flux2_linears,
    make_chroma,
    make_family_lora,
    make_flux2,
)
from quant_expand.testing.prompts import (
    apply_lora,
    load_bnb_flux,
    rel_err,
    sampling_graph,
    set_lora_scale,
    stock_lora,
    unet_loader,
)
from quant_expand.testing.synthetic import save_safetensors

CHROMA = ChromaConfig()
KLEIN = Flux2Config(guidance=False)
STRENGTH = 0.8


def _lora_keys_comfy_maps(host, unet_name: str, lora: dict) -> set:
    """The LoRA's keys ComfyUI's own key map for the model knows (comfy.lora.model_lora_keys_unet)."""
    import comfy.lora
    import comfy.sd
    import comfy.utils

    model = comfy.sd.load_diffusion_model(host.model_path("diffusion_models", unet_name))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    mapped = comfy.lora.load_lora(lora, key_map, log_missing=False)
    return {k for k in mapped}


def _free_models(host):
    """Drop the executor's cached outputs and ComfyUI's loaded models, so the next graph's model is the
    only one in memory."""
    import comfy.model_management as mm

    host.executor.reset()
    mm.unload_all_models()
    gc.collect()


def _run_quantized_then_reference(host, unet_name: str, lora_name: str, common: dict) -> dict:
    """The quantized graph (stock LoRA loader, Apply Control LoRA, Set LoRA Scale from 1.0, no LoRA),
    then, its model freed, the reference graph (LoraLoaderModelOnly on UNETLoader). Latents by key."""
    g = {"q": load_bnb_flux(unet_name, "nf4", False),
         "qs": stock_lora(["q", 0], lora_name, STRENGTH),
         "qa": apply_lora(["q", 0], lora_name, STRENGTH),
         "q1": apply_lora(["q", 0], lora_name, 1.0),
         "qset": set_lora_scale(["q1", 0], lora_name, STRENGTH)}
    for key in ("qs", "qa", "qset"):
        g = sampling_graph(g, [key, 0], key=key, prefix=f"{key}_", **common)
    g = sampling_graph(g, ["q", 0], key="base", prefix="base_", **common)
    out = host.run(g)
    _free_models(host)
    ref = {"r": unet_loader(unet_name), "rs": stock_lora(["r", 0], lora_name, STRENGTH)}
    out.update(host.run(sampling_graph(ref, ["rs", 0], key="ref", prefix="ref_", **common)))
    _free_models(host)
    return out


def _assert_all_equal_reference(out: dict):
    for key in ("qs", "qa", "qset"):
        assert torch.isfinite(out[key]).all(), key
        assert rel_err(out[key], out["ref"]) < 1e-6, (key, rel_err(out[key], out["ref"]))
    assert rel_err(out["base"], out["ref"]) > 1e-3  # the LoRA really acts


@pytest.fixture(scope="module")
def klein_file(host):
    name = "tiny_flux2_klein_lora_base_bf16.safetensors"
    save_safetensors(make_flux2(KLEIN, seed=4), host.model_path("diffusion_models", name))
    return name


@pytest.fixture(scope="module")
def chroma_file(host):
    name = "tiny_chroma_lora_base_bf16.safetensors"
    save_safetensors(make_chroma(CHROMA, seed=0), host.model_path("diffusion_models", name))
    return name


@pytest.mark.parametrize("fmt", LORA_FORMATS)
def test_klein_loras_equal_stock_on_full_precision(host, klein_file, fmt):
    lin = flux2_linears(KLEIN)
    lora = make_family_lora(lin, list(lin), fmt, seed=21)
    name = f"tiny_klein_{fmt}_lora.safetensors"
    save_safetensors(lora, host.model_path("loras", name))
    # ComfyUI maps every key of the file for FLUX.2: the reference applies all of it
    assert _lora_keys_comfy_maps(host, klein_file, lora) == {f"diffusion_model.{n}.weight" for n in lin}
    common = dict(steps=2, size=4, pooled_dim=0, channels=KLEIN.in_channels, context_dim=KLEIN.context_in_dim)
    _assert_all_equal_reference(_run_quantized_then_reference(host, klein_file, name, common))


@pytest.mark.parametrize("fmt", LORA_FORMATS)
def test_chroma_loras_equal_stock_on_full_precision(host, chroma_file, fmt):
    lin = chroma_linears(CHROMA)
    lora = make_family_lora(lin, list(lin), fmt, seed=22)
    name = f"tiny_chroma_{fmt}_lora.safetensors"
    save_safetensors(lora, host.model_path("loras", name))
    common = dict(steps=1, size=4, pooled_dim=0)
    _assert_all_equal_reference(_run_quantized_then_reference(host, chroma_file, name, common))
