"""FLUX.2 [klein] as a pre-quantized file: ``cli quantize`` and Save BnB Flux write it, bitsandbytes' own
``QuantState.from_dict`` reads every 4-bit layer of it, Load BnB Flux loads it without quantizing again,
and ``cli inspect`` names the family.

The test model's quantized Linears hold values nf4 keeps exactly (``testing/family_models.py``), so the
written bytes dequantize to the bf16 file's weights, and a reload samples bit-equal latents (the same
bytes through the same kernels) to quantize-on-load of the bf16 file.
"""
from __future__ import annotations

import os

import bitsandbytes.functional as bnbf
import pytest
import torch
from bitsandbytes.functional import QuantState
from safetensors import safe_open

from quant_expand.cli import main
from quant_expand.testing.family_models import Flux2Config, flux2_linears, flux2_quantized_linears, make_flux2
from quant_expand.testing.prompts import load_bnb_flux, sampling_graph, save_bnb_flux
from quant_expand.testing.synthetic import save_safetensors

KLEIN = Flux2Config(guidance=False)
BF16 = "fam_klein_bf16.safetensors"
SAMPLING = dict(steps=2, size=4, pooled_dim=0, channels=KLEIN.in_channels, context_dim=KLEIN.context_in_dim)


@pytest.fixture(scope="module")
def klein(host):
    sd = make_flux2(KLEIN, seed=4)
    save_safetensors(sd, host.model_path("diffusion_models", BF16))
    return sd


@pytest.fixture(scope="module")
def outdir(host, tmp_path_factory):
    """ComfyUI's output directory, moved to a temporary folder for this module."""
    import folder_paths

    old = folder_paths.get_output_directory()
    new = str(tmp_path_factory.mktemp("comfy-output"))
    folder_paths.set_output_directory(new)
    yield new
    folder_paths.set_output_directory(old)


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_bnb_reads_the_file(path: str, source: dict):
    """Every quantized Linear in the Forge 4-bit layout, its ``weight.*`` tensors read by bitsandbytes'
    ``QuantState.from_dict`` and dequantized by bitsandbytes to the source weights; the rest as in the source."""
    quantized = flux2_quantized_linears(KLEIN)
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        assert meta["format"] == "bnb-flux" and meta["quant_type"] == "nf4"
        assert meta["quantized_layers"] == str(len(quantized)) and meta["linear_layers"] == str(len(flux2_linears(KLEIN)))
        for name in flux2_linears(KLEIN):
            state = {k[len(name) + 1:]: f.get_tensor(k) for k in keys if k.startswith(name + ".")}
            if name not in quantized:
                assert set(state) == {"weight"} and torch.equal(state["weight"], source[f"{name}.weight"]), name
                continue
            assert {"weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"} <= set(state), name
            qs = QuantState.from_dict({k[len("weight."):]: v for k, v in state.items() if k.startswith("weight.")},
                                      device=torch.device("cpu"))
            assert qs.quant_type == "nf4" and tuple(qs.shape) == tuple(source[f"{name}.weight"].shape), name
            qs.dtype = torch.float32
            assert torch.equal(bnbf.dequantize_4bit(state["weight"], qs), source[f"{name}.weight"].float()), name
        others = {k for k in source if k.rpartition(".")[0] not in flux2_linears(KLEIN)}
        for key in others:
            assert torch.equal(f.get_tensor(key), source[key]), key


def assert_reload_equals_quantize_on_load(host, name: str):
    """Load BnB Flux on the written file (asking for fp4: the file's own nf4 wins) samples bit-equal latents
    to Load BnB Flux quantizing the bf16 file with nf4 on load."""
    g = sampling_graph({"q": load_bnb_flux(BF16, "nf4", False)}, ["q", 0], key="orig", prefix="a", **SAMPLING)
    g = sampling_graph({**g, "r": load_bnb_flux(name, "fp4", True)}, ["r", 0], key="reloaded", prefix="b", **SAMPLING)
    out = host.run(g)
    report = host.pack_module("quant_expand.comfyui.report").load_report
    original, reloaded = report(host.node_output("q")), report(host.node_output("r"))
    assert reloaded.prequantized and not original.prequantized
    assert "(FLUX.2 [klein])" in reloaded.source and reloaded.quant == original.quant
    layers = host.pack_module("quant_expand.layers")
    dm = host.node_output("r").model.diffusion_model
    assert {n for n, m in dm.named_modules() if layers.is_quantized_linear(m)} == flux2_quantized_linears(KLEIN)
    assert torch.isfinite(out["orig"]).all() and out["orig"].abs().max() > 0
    assert torch.equal(out["orig"], out["reloaded"])
    host.free_models()


def test_cli_quantize_writes_a_file_bitsandbytes_and_load_bnb_flux_read(host, klein, capsys):
    name = "fam_klein_cli_nf4.safetensors"
    dst = host.model_path("diffusion_models", name)
    rc, out, err = cli(capsys, "quantize", host.model_path("diffusion_models", BF16), dst, "--no-double-quant",
                       "--device", "cpu", "--overwrite")
    assert rc == 0, err
    assert f"{len(flux2_quantized_linears(KLEIN))} x nf4" in out, out
    assert_bnb_reads_the_file(dst, klein)
    assert_reload_equals_quantize_on_load(host, name)


def test_save_bnb_flux_writes_a_file_bitsandbytes_and_load_bnb_flux_read(host, klein, outdir):
    prefix = "diffusion_models/fam_klein_saved"
    host.run({"q": load_bnb_flux(BF16, "nf4", False), "save": save_bnb_flux(["q", 0], prefix)})
    host.free_models()
    folder, base = os.path.split(os.path.join(outdir, prefix))
    found = sorted(n for n in os.listdir(folder) if n.startswith(base + "_") and n.endswith(".safetensors"))
    assert len(found) == 1, found
    name = "fam_klein_saved_nf4.safetensors"
    with open(os.path.join(folder, found[0]), "rb") as src, open(host.model_path("diffusion_models", name), "wb") as dst:
        dst.write(src.read())
    assert_bnb_reads_the_file(host.model_path("diffusion_models", name), klein)
    assert_reload_equals_quantize_on_load(host, name)


def test_cli_inspect_names_the_family_and_its_layers(host, klein, capsys, tmp_path):
    n_linear, n_quant = len(flux2_linears(KLEIN)), len(flux2_quantized_linears(KLEIN))
    rc, out, err = cli(capsys, "inspect", host.model_path("diffusion_models", BF16))
    assert rc == 0, err
    assert f"model: FLUX.2 [klein], hidden {KLEIN.hidden_size}, img_in {KLEIN.in_channels} inputs, 1 double + " \
           f"1 single blocks" in out, out
    assert f"Linear layers: {n_linear} (0 4-bit, 0 int8, {n_linear} full precision)" in out, out
    assert "FLUX.1" not in out, out
    dst = str(tmp_path / "klein_nf4.safetensors")
    rc, out, err = cli(capsys, "quantize", host.model_path("diffusion_models", BF16), dst, "--device", "cpu")
    assert rc == 0, err
    rc, out, err = cli(capsys, "inspect", dst)
    assert rc == 0, err
    assert f"model: FLUX.2 [klein], hidden {KLEIN.hidden_size}" in out, out
    assert f"Linear layers: {n_linear} ({n_quant} 4-bit, 0 int8, {n_linear - n_quant} full precision)" in out, out
    assert "FLUX.1" not in out and "uses the file's own quantization" in out, out
