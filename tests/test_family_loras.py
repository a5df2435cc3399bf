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


def _run_quantized_then_reference(host, unet_name: str, lora_names: list, common: dict) -> dict:
    """The quantized graph (per LoRA: stock LoRA loader, Apply Control LoRA, Set LoRA Scale from 1.0;
    and no LoRA), then, its model freed, the reference graph (LoraLoaderModelOnly on UNETLoader).
    Latents by ``<kind>:<lora name>``, "base" for the quantized model without LoRA."""
    g = {"q": load_bnb_flux(unet_name, "nf4", False)}
    for i, name in enumerate(lora_names):
        g.update({f"qs{i}": stock_lora(["q", 0], name, STRENGTH), f"qa{i}": apply_lora(["q", 0], name, STRENGTH),
                  f"q1{i}": apply_lora(["q", 0], name, 1.0), f"qset{i}": set_lora_scale([f"q1{i}", 0], name, STRENGTH)})
        for kind in ("qs", "qa", "qset"):
            g = sampling_graph(g, [f"{kind}{i}", 0], key=f"{kind}:{name}", prefix=f"{kind}{i}_", **common)
    g = sampling_graph(g, ["q", 0], key="base", prefix="base_", **common)
    out = host.run(g)
    host.free_models()
    ref = {"r": unet_loader(unet_name)}
    for i, name in enumerate(lora_names):
        ref[f"rs{i}"] = stock_lora(["r", 0], name, STRENGTH)
        ref = sampling_graph(ref, [f"rs{i}", 0], key=f"ref:{name}", prefix=f"ref{i}_", **common)
    out.update(host.run(ref))
    host.free_models()
    return out


def _assert_all_equal_reference(out: dict, lora_names: list):
    for name in lora_names:
        ref = out[f"ref:{name}"]
        for kind in ("qs", "qa", "qset"):
            got = out[f"{kind}:{name}"]
            assert torch.isfinite(got).all(), (kind, name)
            assert rel_err(got, ref) < 1e-6, (kind, name, rel_err(got, ref))
        assert rel_err(out["base"], ref) > 1e-3, name  # the LoRA really acts


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
    _assert_all_equal_reference(_run_quantized_then_reference(host, klein_file, [name], common), [name])


# Chroma's model is ~50x FLUX.2 [klein]'s: the LoRA reaches one Linear of each kind (a quantized block
# Linear of each shape, the approximator's in/inner/out Linears, the unquantized embedders and output
# layer), enough for every path, while ComfyUI's reference, which keeps a copy of each weight it patches,
# stays near the size of its model
CHROMA_LORA_TARGETS = ("img_in", "txt_in", "distilled_guidance_layer.in_proj",
                       "distilled_guidance_layer.layers.0.in_layer", "distilled_guidance_layer.out_proj",
                       "double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.proj", "double_blocks.0.img_mlp.2",
                       "single_blocks.0.linear2", "final_layer.linear")


def test_chroma_loras_equal_stock_on_full_precision(host, chroma_file):
    """BFL names through all three nodes; kohya names, the same LoRA (kohya's alpha = rank / 2 with lora_up
    doubled: the same delta, exactly), through Apply Control LoRA, against the one reference."""
    lin = chroma_linears(CHROMA)
    bfl, kohya = "tiny_chroma_bfl_lora.safetensors", "tiny_chroma_kohya_lora.safetensors"
    for fmt, name in (("bfl", bfl), ("kohya", kohya)):
        save_safetensors(make_family_lora(lin, CHROMA_LORA_TARGETS, fmt, seed=22), host.model_path("loras", name))
    common = dict(steps=1, size=4, pooled_dim=0)
    g = {"q": load_bnb_flux(chroma_file, "nf4", False), "qk": apply_lora(["q", 0], kohya, STRENGTH)}
    g = sampling_graph(g, ["qk", 0], key=f"qa:{kohya}", prefix="qk_", **common)
    out = host.run(g)  # kohya first: the bfl graph below frees this model before ComfyUI's reference loads
    out.update(_run_quantized_then_reference(host, chroma_file, [bfl], common))
    out[f"ref:{kohya}"] = out[f"ref:{bfl}"]
    for key in ("qs", "qset"):
        out[f"{key}:{kohya}"] = out[f"qa:{kohya}"]
    _assert_all_equal_reference(out, [bfl, kohya])
