"""ComfyUI's own quantized files (scaled fp8, comfy_quant mixed precision) through Load BnB Flux and
through ComfyUI's UNETLoader; Apply Control LoRA on UNETLoader's models of them.

The files are written with ComfyUI's code (``tests/scaled_files.py``) with weights whose dequantized
values survive NF4 exactly, so Load BnB Flux (nf4, no double quant) holds the very numbers ComfyUI
dequantizes. Tolerances (relative L2 error of whole latents after two euler steps, float32 on CPU):
- quantized vs UNETLoader: 1e-6 (the same weights; ComfyUI's float32 matmul on the dequantized weight).
  ComfyUI runs an int8_tensorwise layer as an int8 x int8 matmul (it quantizes the activations per row,
  ``comfy_kitchen``'s ``int8_linear``, whatever ``full_precision_matrix_mult`` says), which Load BnB Flux
  never does: there the reference is UNETLoader on a float32 file of ComfyUI's dequantized weights;
- Apply Control LoRA vs LoraLoaderModelOnly on the same UNETLoader model: 1e-6 (the same patches).
"""
from __future__ import annotations

import pytest
import torch

from quant_expand.testing.prompts import apply_lora, load_bnb_flux, rel_err, sampling_graph, stock_lora, unet_loader
from quant_expand.testing.synthetic import TinyFluxConfig, make_control_lora, make_lora, save_safetensors
from scaled_files import comfy_quant_flux, scaled_fp8_flux

CFG = TinyFluxConfig()
FORMATS = ["scaled_fp8", "float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "mxfp8", "nvfp4", "nvfp4_awq"]


@pytest.fixture(scope="module")
def files(host):
    out = {}
    for fmt in FORMATS:
        if fmt == "scaled_fp8":
            sd, expected = scaled_fp8_flux(CFG)
        else:
            sd, expected = comfy_quant_flux(fmt.removesuffix("_awq"), CFG, pre_quant_scale=fmt.endswith("_awq"))
        name = f"tiny_{fmt}.safetensors"
        save_safetensors(sd, host.model_path("diffusion_models", name))
        out[fmt] = (name, expected)
    save_safetensors(make_control_lora(CFG, seed=2), host.model_path("loras", "scaled_control.safetensors"))
    save_safetensors(make_lora(CFG, kind="lora", seed=7), host.model_path("loras", "scaled_style.safetensors"))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_weights_read_equal_comfyuis_dequantized_weights(host, files, fmt):
    """Stored values times scales, bit for bit what ComfyUI's layout classes dequantize; and every
    64-value block is {-v, 0, v} with v reached, v varying (so NF4 keeps them exactly)."""
    name, expected = files[fmt]
    ckpt = host.pack_module("quant_expand.checkpoint.reader").open_flux_checkpoint(host.model_path("diffusion_models", name))
    try:
        assert set(ckpt.scaled) == set(expected) and not ckpt.is_prequantized
        magnitudes = set()
        for module, want in expected.items():
            got = ckpt.read_linear(module).weight
            assert got.dtype == torch.float32 and torch.equal(got, want), module
            blocks = got.reshape(got.shape[0], -1, 64)
            v = blocks.abs().amax(-1, keepdim=True)
            assert bool(((blocks == 0) | (blocks.abs() == v)).all()), module
            magnitudes.update(v.flatten().tolist())
        assert len(magnitudes) > 3  # not one uniform scale
    finally:
        ckpt.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_bnb_flux_samples_like_unetloader(host, files, fmt):
    name, expected = files[fmt]
    reference = name
    if fmt == "int8_tensorwise":
        from safetensors.torch import load_file

        sd = load_file(host.model_path("diffusion_models", name))
        plain = {k: v for k, v in sd.items() if k.endswith(".bias") or k.rpartition(".")[0] not in expected}
        plain.update({f"{m}.weight": w for m, w in expected.items()})
        reference = "tiny_int8_tensorwise_dequantized.safetensors"
        save_safetensors(plain, host.model_path("diffusion_models", reference))
    g = sampling_graph({"q": load_bnb_flux(name, double_quant=False)}, ["q", 0], key="q", prefix="a")
    g = sampling_graph({**g, "ref": unet_loader(reference)}, ["ref", 0], key="ref", prefix="b")
    out = host.run(g)
    assert torch.isfinite(out["q"]).all() and out["q"].abs().max() > 0
    assert rel_err(out["q"], out["ref"]) < 1e-6


def test_node_text_and_inspect_say_what_the_file_is(host, files):
    name, expected = files["nvfp4"]
    node = host.pack_module("nodes.load_bnb_flux").LoadBnbFlux
    with torch.inference_mode():
        result = node.execute(name, "nf4", False, "float32")
    text = result.ui["text"][0]
    assert f"{len(expected)} Linear layers stored by ComfyUI as {len(expected)} x NVFP4" in text
    assert "then quantized with the node's quant_type" in text and "full precision" not in text
    report = host.pack_module("quant_expand.tools.convert").inspect_file(host.model_path("diffusion_models", files["scaled_fp8"][0]))
    assert "layout: ComfyUI-quantized (" in report and "scaled fp8 (weight x scale_weight)" in report
    assert "full precision" not in report.split("layout:")[1].splitlines()[0]


@pytest.mark.parametrize("fmt", ["scaled_fp8", "float8_e4m3fn"])
def test_apply_control_lora_on_unetloaders_model_equals_stock_lora_nodes(host, files, fmt):
    """UNETLoader builds these files with comfy.ops.mixed_precision_ops, whose Linear is no nn.Linear."""
    name, _ = files[fmt]
    ours = {"m": unet_loader(name),
            "c": apply_lora(["m", 0], "scaled_control.safetensors", 0.85),
            "s": apply_lora(["c", 0], "scaled_style.safetensors", 0.6)}
    stock = {"m2": unet_loader(name),
             "c2": stock_lora(["m2", 0], "scaled_control.safetensors", 0.85),
             "s2": stock_lora(["c2", 0], "scaled_style.safetensors", 0.6)}
    g = sampling_graph(ours, ["s", 0], key="ours", prefix="a", control_seed=5)
    g = sampling_graph({**g, **stock}, ["s2", 0], key="stock", prefix="b", control_seed=5)
    out = host.run(g)
    assert torch.isfinite(out["ours"]).all()
    assert rel_err(out["ours"], out["stock"]) < 1e-6
    plain = host.run(sampling_graph({"m": unet_loader(name)}, ["m", 0], key="plain", control_seed=5))
    assert rel_err(out["ours"], plain["plain"]) > 1e-2  # the LoRAs did something
