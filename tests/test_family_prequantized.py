"""Pre-quantized FLUX.2 and Chroma files from other tools through Load BnB Flux: the Forge layout (BFL
names under ``model.diffusion_model.``, bitsandbytes' own ``Linear4bit`` state per Linear) and diffusers +
bitsandbytes (what ``Flux2Transformer2DModel`` with a ``BitsAndBytesConfig`` saves: diffusers names,
q/k/v split, every Linear but the skipped ones in bitsandbytes' layout, sharded as diffusers shards).

diffusers' own converter gives the names and bitsandbytes' own modules give the quantized tensors
(``tests/diffusers_family_files.py``, ``tests/prequantized_files.py``). The test models' quantized Linears
hold values NF4 keeps exactly (no double quant), so the file used as stored must sample what ComfyUI's
UNETLoader samples on the bf16 BFL file: within 1e-6 (float32 on CPU).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from diffusers_family_files import linear_names, to_diffusers
from prequantized_files import bnb_linear_state, forge_state_dict, save_sharded
from family_sampling import assert_same_latents, quantized_layer_names, sample_against_unet_loader
from quant_expand.testing.family_models import (
    ChromaConfig,
    Flux2Config,
    binary_weight,
    chroma_quantized_linears,
    flux2_linears,
    flux2_quantized_linears,
    make_chroma,
    make_flux2,
)
from quant_expand.testing.prompts import load_bnb_flux
from quant_expand.testing.synthetic import save_safetensors

DEV = Flux2Config(guidance=True)
CHROMA = ChromaConfig()


def diffusers_bnb(cfg, bfl: dict, quant: str, every_linear: bool = False) -> dict:
    """``bfl`` in diffusers' names (its converter), with the block Linears and the text projection in
    bitsandbytes' layout and the rest as they are (``llm_int8_skip_modules`` for the layers the family keeps
    in bf16), or with ``every_linear`` in bitsandbytes' layout (diffusers' default: embedders, the shared
    modulation and ``norm_out.linear``, whose halves diffusers swaps, too)."""
    sd = to_diffusers(cfg, bfl)
    out = dict(sd)
    for name in linear_names(cfg):
        block = name.startswith(("transformer_blocks.", "single_transformer_blocks.")) or name == "context_embedder"
        if not (block or every_linear):
            continue
        weight, bias = out.pop(f"{name}.weight"), out.pop(f"{name}.bias", None)
        out.update({f"{name}.{k}": v for k, v in bnb_linear_state(weight.float(), bias, quant, False).items()})
    return out


def sample_both(host, name: str, reference: str, cfg, steps: int, expected: set) -> dict:
    """The pre-quantized file, asked for fp4 with double quant: every quantized layer must keep the file's
    own nf4 (a pre-quantized file wins); then ComfyUI's UNETLoader on the bf16 file."""
    def used_as_stored(patcher):
        dm = patcher.model.diffusion_model
        names = quantized_layer_names(patcher, host)
        assert names == expected
        assert {dm.get_submodule(n).weight.quant_state.quant_type for n in names} == {"nf4"}

    return sample_against_unet_loader(host, load_bnb_flux(name, "fp4", True), reference, cfg, steps,
                                      check=used_as_stored)


def nf4_exact_everywhere(cfg, bfl: dict) -> dict:
    """``bfl`` with the Linears the family keeps in bf16 redrawn as the quantized ones are (values NF4 keeps
    exactly, at the test model's scale for each), so a file that quantizes every Linear is exact too."""
    g = torch.Generator().manual_seed(21)
    out = dict(bfl)
    for name, (rows, cols) in flux2_linears(cfg).items():
        if name not in flux2_quantized_linears(cfg):
            gain = 0.5 if "modulation" in name else 1.0
            out[f"{name}.weight"] = binary_weight(rows, cols, gain / math.sqrt(cols), g).to(torch.bfloat16)
    return out


@pytest.mark.parametrize("layout", ["forge", "diffusers sharded", "diffusers every Linear"])
def test_flux2_dev_prequantized_nf4_is_used_as_stored(host, layout):
    bfl = make_flux2(DEV, seed=6)
    if layout == "diffusers every Linear":
        bfl = nf4_exact_everywhere(DEV, bfl)
    reference = f"tiny_flux2_dev_for_prequantized_{layout.replace(' ', '_')}_bf16.safetensors"
    save_safetensors(bfl, host.model_path("diffusion_models", reference))
    every = layout == "diffusers every Linear"
    quantized = set(flux2_linears(DEV)) if every else flux2_quantized_linears(DEV)
    if layout == "forge":
        name = "tiny_flux2_dev_forge_nf4.safetensors"
        save_safetensors(forge_state_dict(bfl, "nf4", False, quantize=quantized.__contains__, all_in_one=False),
                         host.model_path("diffusion_models", name))
    else:
        stem = f"tiny_flux2_dev_diffusers_bnb{'_every' if every else ''}"
        folder = os.path.join(host.models_dir, "diffusion_models", stem)
        os.makedirs(folder, exist_ok=True)
        save_sharded(diffusers_bnb(DEV, bfl, "nf4", every_linear=every), folder, shards=2)
        name = f"{stem}/diffusion_pytorch_model-00001-of-00002.safetensors"
    out = sample_both(host, name, reference, DEV, steps=2, expected=quantized)
    assert_same_latents(out)


def test_chroma_forge_nf4_is_used_as_stored(host):
    bfl = make_chroma(CHROMA, seed=0)
    reference = "tiny_chroma_for_prequantized_bf16.safetensors"
    save_safetensors(bfl, host.model_path("diffusion_models", reference))
    quantized = chroma_quantized_linears(CHROMA)
    name = "tiny_chroma_forge_nf4.safetensors"
    save_safetensors(forge_state_dict(bfl, "nf4", False, quantize=quantized.__contains__, all_in_one=False),
                     host.model_path("diffusion_models", name))
    del bfl
    out = sample_both(host, name, reference, CHROMA, steps=1, expected=quantized)
    assert_same_latents(out)
