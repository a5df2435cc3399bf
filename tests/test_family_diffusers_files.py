"""FLUX.2 and Chroma diffusion model files with diffusers names (what ``Flux2Transformer2DModel`` /
``ChromaTransformer2DModel.save_pretrained`` write: one file, or shards with an index) through Load BnB Flux.

ComfyUI 0.33 does not read these files itself (checked below), so the reference is the same weights with
BFL names: the checkpoint reader must give every tensor of the BFL file exactly, and sampling must equal
ComfyUI's UNETLoader on the BFL file to 1e-6 (the test models hold values nf4 keeps exactly). The diffusers
files are written by diffusers from the BFL test models (``tests/diffusers_family_files.py``).
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from diffusers_family_files import save_pretrained, to_diffusers
from family_sampling import assert_same_latents, quantized_layer_names, sample_against_unet_loader
from quant_expand.checkpoint.reader import open_flux_checkpoint
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

FLUX2 = {"dev": Flux2Config(guidance=True), "klein": Flux2Config(guidance=False)}
CHROMA = ChromaConfig()
LAYOUTS = {"single": 1, "sharded": 2}


def _write(host, stem: str, cfg, bfl: dict, layouts: dict) -> dict:
    """The BFL file and, per layout, the diffusers folder; file names as Load BnB Flux lists them (a
    sharded model by its first shard)."""
    out = {"bfl": f"{stem}_bfl.safetensors"}
    save_safetensors(bfl, host.model_path("diffusion_models", out["bfl"]))
    for layout, shards in layouts.items():
        folder = f"{stem}_diffusers_{layout}"
        files = save_pretrained(cfg, bfl, host.model_path("diffusion_models", folder), shards=shards)
        out[layout] = f"{folder}/{os.path.basename(files[0])}"
    return out


@pytest.fixture(scope="module")
def flux2_files(host):
    return {v: _write(host, f"tiny_flux2_{v}", cfg, make_flux2(cfg, seed=6), LAYOUTS) for v, cfg in FLUX2.items()}


@pytest.fixture(scope="module")
def chroma_files(host):
    # sharded only: the layouts are read alike for every family (FLUX.2 has both), and Chroma's 1.2 GB
    # cost seconds per copy
    return _write(host, "tiny_chroma", CHROMA, make_chroma(CHROMA, seed=2), {"sharded": 3})


def _assert_reads_as_bfl(host, diffusers_name: str, bfl_name: str, family: str):
    """Every Linear and every other tensor of the diffusers file, as the reader gives them to the loader,
    equals the BFL file's (the final adaLN's halves back in BFL order, q/k/v[/mlp] stacked)."""
    diffusers = open_flux_checkpoint(host.model_path("diffusion_models", diffusers_name))
    bfl = open_flux_checkpoint(host.model_path("diffusion_models", bfl_name))
    try:
        assert (diffusers.layout, bfl.layout) == ("diffusers", "bfl")
        assert diffusers.family.key == bfl.family.key == family
        assert sorted(diffusers.linear_names()) == sorted(bfl.linear_names())
        assert sorted(diffusers.other_keys()) == sorted(bfl.other_keys())
        assert diffusers.notes == []  # no tensor of the file left unread
        for name in bfl.linear_names():
            got, want = diffusers.read_linear(name), bfl.read_linear(name)
            assert got.weight.dtype == want.weight.dtype and torch.equal(got.weight, want.weight), name
            assert (got.bias is None) == (want.bias is None), name
            assert got.bias is None or torch.equal(got.bias, want.bias), name
        for key in bfl.other_keys():
            assert torch.equal(diffusers.read(key), bfl.read(key)), key
    finally:
        diffusers.close()
        bfl.close()


def test_comfyui_does_not_read_them(host, flux2_files, chroma_files):
    """ComfyUI 0.33's own loader (comfy.sd.load_diffusion_model_state_dict) has FLUX.1's diffusers table
    only: a FLUX.2 file fails on the biases FLUX.2 has none of, and a Chroma file converts to a FLUX.1
    schnell without the approximator. Hence the BFL reference."""
    import comfy.model_detection
    import comfy.sd
    import comfy.utils

    flux2 = comfy.utils.load_torch_file(host.model_path("diffusion_models", flux2_files["dev"]["single"]))
    with pytest.raises(KeyError, match="x_embedder.bias"):
        comfy.sd.load_diffusion_model_state_dict(flux2)
    # Chroma's shapes only (its ~0.6 B parameters stay on disk), in diffusers' names
    with safe_open(host.model_path("diffusion_models", chroma_files["bfl"]), "pt") as f:
        bfl = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    chroma = to_diffusers(CHROMA, bfl)
    assert comfy.model_detection.model_config_from_unet(dict(chroma), "") is None
    converted = comfy.model_detection.convert_diffusers_mmdit(dict(chroma), "")
    config = comfy.model_detection.model_config_from_unet(converted, "")
    assert config.unet_config["image_model"] == "flux"
    assert not any(k.startswith("distilled_guidance_layer.") for k in converted)


class TestFlux2:
    @pytest.mark.parametrize("layout", list(LAYOUTS))
    @pytest.mark.parametrize("variant", list(FLUX2))
    def test_reads_as_the_bfl_file(self, host, flux2_files, variant, layout):
        _assert_reads_as_bfl(host, flux2_files[variant][layout], flux2_files[variant]["bfl"], "flux2")

    @pytest.mark.parametrize("layout", list(LAYOUTS))
    @pytest.mark.parametrize("variant", list(FLUX2))
    def test_sampling_equals_unet_loader_on_bfl_names(self, host, flux2_files, variant, layout):
        cfg, files = FLUX2[variant], flux2_files[variant]

        def check(patcher):
            assert quantized_layer_names(patcher, host) == flux2_quantized_linears(cfg)
            report = host.pack_module("quant_expand.comfyui.report").load_report(patcher)
            assert f"(FLUX.2 [{variant}]): full precision (full precision, diffusers names)" in report.source

        assert_same_latents(sample_against_unet_loader(host, load_bnb_flux(files[layout], "nf4", False), files["bfl"],
                                                       cfg, steps=2, check=check))


class TestChroma:
    def test_reads_as_the_bfl_file(self, host, chroma_files):
        _assert_reads_as_bfl(host, chroma_files["sharded"], chroma_files["bfl"], "chroma")

    def test_sharded_sampling_equals_unet_loader_on_bfl_names(self, host, chroma_files):
        def check(patcher):
            assert quantized_layer_names(patcher, host) == chroma_quantized_linears(CHROMA)
            report = host.pack_module("quant_expand.comfyui.report").load_report(patcher)
            assert "(Chroma): full precision (full precision, diffusers names)" in report.source
            assert "a shard of diffusion_pytorch_model.safetensors.index.json" in report.source

        assert_same_latents(sample_against_unet_loader(host, load_bnb_flux(chroma_files["sharded"], "nf4", False),
                                                       chroma_files["bfl"], CHROMA, steps=1, check=check))
