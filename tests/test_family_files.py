"""FLUX.2 [klein] (and Chroma) as a pre-quantized file: ``cli quantize`` and Save BnB Flux write it,
bitsandbytes' own ``QuantState.from_dict`` reads every 4-bit layer of it, Load BnB Flux loads it without
quantizing again, and ``cli inspect`` names the family.

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
from quant_expand.testing.family_models import (ChromaConfig, Flux2Config, chroma_linears, chroma_quantized_linears,
                                                flux2_linears, flux2_quantized_linears, make_chroma, make_flux2)
from quant_expand.testing.prompts import load_bnb_flux, sampling_graph, save_bnb_flux
from quant_expand.testing.synthetic import save_safetensors

KLEIN = Flux2Config(guidance=False)
BF16 = "fam_klein_bf16.safetensors"
SAMPLING = dict(steps=2, size=4, pooled_dim=0, channels=KLEIN.in_channels, context_dim=KLEIN.context_in_dim)
KLEIN_LINEARS, KLEIN_QUANTIZED = flux2_linears(KLEIN), flux2_quantized_linears(KLEIN)


@pytest.fixture(scope="module")
def klein(host):
    sd = make_flux2(KLEIN, seed=4)
    save_safetensors(sd, host.model_path("diffusion_models", BF16))
    return sd


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_bnb_reads_the_file(path: str, source: dict, linears=KLEIN_LINEARS, quantized=KLEIN_QUANTIZED):
    """Every quantized Linear in the Forge 4-bit layout, its ``weight.*`` tensors read by bitsandbytes'
    ``QuantState.from_dict`` and dequantized by bitsandbytes to the source weights; the rest as in the source."""
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        assert meta["format"] == "bnb-flux" and meta["quant_type"] == "nf4"
        assert meta["quantized_layers"] == str(len(quantized)) and meta["linear_layers"] == str(len(linears))
        for name in linears:
            state = {k[len(name) + 1:]: f.get_tensor(k) for k in keys if k.startswith(name + ".")}
            if name not in quantized:
                assert {"weight"} <= set(state) <= {"weight", "bias"}, (name, set(state))
                assert all(torch.equal(t, source[f"{name}.{k}"]) for k, t in state.items()), name
                continue
            assert {"weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"} <= set(state), name
            if "bias" in state:
                assert torch.equal(state["bias"], source[f"{name}.bias"]), name
            qs = QuantState.from_dict({k[len("weight."):]: v for k, v in state.items() if k.startswith("weight.")},
                                      device=torch.device("cpu"))
            assert qs.quant_type == "nf4" and tuple(qs.shape) == tuple(source[f"{name}.weight"].shape), name
            qs.dtype = torch.float32
            assert torch.equal(bnbf.dequantize_4bit(state["weight"], qs), source[f"{name}.weight"].float()), name
        others = {k for k in source if k.rpartition(".")[0] not in linears}
        for key in others:
            assert torch.equal(f.get_tensor(key), source[key]), key


def assert_reload_equals_quantize_on_load(host, name: str, bf16=BF16, title="FLUX.2 [klein]",
                                          quantized=KLEIN_QUANTIZED, sampling=SAMPLING):
    """Load BnB Flux on the written file (asking for fp4: the file's own nf4 wins) samples bit-equal latents
    to Load BnB Flux quantizing the bf16 file with nf4 on load."""
    g = sampling_graph({"q": load_bnb_flux(bf16, "nf4", False)}, ["q", 0], key="orig", prefix="a", **sampling)
    g = sampling_graph({**g, "r": load_bnb_flux(name, "fp4", True)}, ["r", 0], key="reloaded", prefix="b", **sampling)
    out = host.run(g)
    report = host.pack_module("quant_expand.comfyui.report").load_report
    original, reloaded = report(host.node_output("q")), report(host.node_output("r"))
    assert reloaded.prequantized and not original.prequantized
    assert f"({title})" in reloaded.source and reloaded.quant == original.quant
    layers = host.pack_module("quant_expand.layers")
    dm = host.node_output("r").model.diffusion_model
    assert {n for n, m in dm.named_modules() if layers.is_quantized_linear(m)} == quantized
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


def test_cli_inspect_names_flux2_dev(host, tmp_path, capsys):
    path = save_safetensors(make_flux2(Flux2Config(guidance=True), seed=4), tmp_path / "dev_bf16.safetensors")
    rc, out, err = cli(capsys, "inspect", path)
    assert rc == 0, err
    assert "model: FLUX.2 [dev], hidden 256, img_in 128 inputs, 1 double + 1 single blocks" in out, out


CHROMA = ChromaConfig()


def test_chroma_cli_quantize_and_inspect(host, capsys):
    """Chroma (~0.6 B parameters, the approximator's fixed size): the written file is read by bitsandbytes and
    loads as pre-quantized, sampling what quantize-on-load samples; inspect names Chroma on both files."""
    sd = make_chroma(CHROMA, seed=0)
    bf16, name = "fam_chroma_bf16.safetensors", "fam_chroma_cli_nf4.safetensors"
    save_safetensors(sd, host.model_path("diffusion_models", bf16))
    linears, quantized = chroma_linears(CHROMA), chroma_quantized_linears(CHROMA)
    dst = host.model_path("diffusion_models", name)
    rc, out, err = cli(capsys, "quantize", host.model_path("diffusion_models", bf16), dst, "--no-double-quant",
                       "--device", "cpu", "--overwrite")
    assert rc == 0, err
    assert_bnb_reads_the_file(dst, sd, linears, quantized)
    for path, four in ((host.model_path("diffusion_models", bf16), 0), (dst, len(quantized))):
        rc, out, err = cli(capsys, "inspect", path)
        assert rc == 0, err
        assert "model: Chroma, hidden 3072, img_in 64 inputs, 1 double + 1 single blocks" in out, out
        assert f"Linear layers: {len(linears)} ({four} 4-bit, 0 int8, {len(linears) - four} full precision)" in out
    del sd
    try:
        assert_reload_equals_quantize_on_load(host, name, bf16, "Chroma", quantized, dict(steps=1, pooled_dim=0))
    finally:  # 1.2 GB and 0.4 GB: not left in the host's model folder for the rest of the session
        for n in (bf16, name):
            os.remove(host.model_path("diffusion_models", n))
