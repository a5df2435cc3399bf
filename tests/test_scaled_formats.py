"""Quantized layouts of other tools that Load BnB Flux refuses, and damaged ComfyUI-quantized files: each
fails at open with the file, the layer or format, and what to use instead (no ComfyUI needed; files
written with safetensors in those tools' key layouts). Reading the formats that are supported is checked
against ComfyUI's own code in ``tests/test_comfy_scaled.py``."""
from __future__ import annotations

import json

import pytest
import torch

from quant_expand.errors import BnbFluxError
from quant_expand.checkpoint.reader import open_flux_checkpoint
from quant_expand.testing.synthetic import TinyFluxConfig, make_tiny_flux, save_safetensors

CFG = TinyFluxConfig()
QKV = "double_blocks.0.img_attn.qkv"


def conf(fmt: str, **extra) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt, **extra}).encode()), dtype=torch.uint8)


def write(tmp_path, sd, metadata=None, name="model.safetensors"):
    return save_safetensors(sd, str(tmp_path / name), metadata=metadata)


def with_layer(**tensors) -> dict:
    sd = make_tiny_flux(CFG, seed=0)
    sd.pop(f"{QKV}.weight")
    sd.update({f"{QKV}.{k}": v for k, v in tensors.items()})
    return sd


W = (3 * CFG.hidden_size, CFG.hidden_size)


@pytest.mark.parametrize("tensors,expect", [
    (dict(weight=torch.zeros(W, dtype=torch.int8), weight_scale=torch.ones(()), comfy_quant=conf("convrot_w4a4")),
     r"model.safetensors: double_blocks.0.img_attn.qkv is stored as ComfyUI's 'convrot_w4a4' quantization"),
    (dict(weight=torch.zeros(W, dtype=torch.int8), weight_scale=torch.ones(()),
          comfy_quant=conf("int8_tensorwise", convrot=True)), r"ConvRot int8"),
    (dict(qweight=torch.zeros(W[0], W[1] // 8, dtype=torch.int32), qzeros=torch.zeros(1, W[0] // 8, dtype=torch.int32),
          scales=torch.ones(1, W[0])), r"GPTQ/AWQ"),
    (dict(qweight=torch.zeros(W[0], W[1] // 2, dtype=torch.int8), wscales=torch.ones(W[1] // 64, W[0])),
     r"nunchaku SVDQuant .*ComfyUI-nunchaku"),
    ({"weight._data": torch.zeros(W, dtype=torch.int8), "weight._scale": torch.ones(W[0], 1)}, r"optimum-quanto"),
    ({"weight_qdata": torch.zeros(W, dtype=torch.int8), "weight_scale": torch.ones(W[0])}, r"torchao"),
])
def test_other_quantizations_are_refused_by_name(tmp_path, tensors, expect):
    path = write(tmp_path, with_layer(**tensors))
    with pytest.raises(BnbFluxError, match=expect) as e:
        open_flux_checkpoint(path)
    assert "Load Diffusion Model" in str(e.value) or "ComfyUI-nunchaku" in str(e.value)
    assert "is missing" not in str(e.value)


def test_gguf_metadata_is_refused(tmp_path):
    path = write(tmp_path, make_tiny_flux(CFG, seed=0), metadata={"general.architecture": "flux"})
    with pytest.raises(BnbFluxError, match=r"model.safetensors: quantized in the GGUF .* ComfyUI-GGUF"):
        open_flux_checkpoint(path)


def test_quantization_metadata_names_layers_without_the_prefix(tmp_path):
    """``_quantization_metadata`` (the file-level form of comfy_quant) is read like the per-layer JSON."""
    sd = make_tiny_flux(CFG, seed=0, prefix="model.diffusion_model.")
    key = f"model.diffusion_model.{QKV}"
    w = sd[f"{key}.weight"]
    sd[f"{key}.weight"] = (w / 0.01).to(torch.float8_e4m3fn)
    sd[f"{key}.weight_scale"] = torch.tensor(0.01)
    meta = {"_quantization_metadata": json.dumps({"layers": {QKV: {"format": "float8_e4m3fn"}}})}
    ckpt = open_flux_checkpoint(write(tmp_path, sd, metadata=meta))
    try:
        got = ckpt.read_linear(QKV).weight
        assert torch.equal(got, sd[f"{key}.weight"].float() * torch.tensor(0.01))
        assert f"{QKV}.weight_scale" not in ckpt.other_keys()
    finally:
        ckpt.close()


@pytest.mark.parametrize("tensors,expect", [
    (dict(weight=torch.zeros(W, dtype=torch.float8_e4m3fn), comfy_quant=conf("float8_e4m3fn")),
     r"double_blocks.0.img_attn.qkv is float8_e4m3fn but double_blocks.0.img_attn.qkv.weight_scale is missing"),
    (dict(weight=torch.zeros(W[0], W[1] // 2, dtype=torch.uint8), weight_scale=torch.zeros(128, 4, dtype=torch.float8_e4m3fn),
          comfy_quant=conf("nvfp4")), r"nvfp4 but .*weight_scale_2 is missing"),
    (dict(weight=torch.zeros(W, dtype=torch.float8_e4m3fn), weight_scale=torch.ones(7), comfy_quant=conf("float8_e4m3fn")),
     r"double_blocks.0.img_attn.qkv.weight cannot be read as fp8 e4m3 x weight_scale"),
    (dict(weight=torch.ones(W, dtype=torch.float8_e4m3fn), weight_scale=torch.tensor(float("nan")),
          comfy_quant=conf("float8_e4m3fn")), r"times its scales is not finite"),
    (dict(weight=torch.zeros(W, dtype=torch.float16), weight_scale=torch.ones(()), comfy_quant=conf("float8_e4m3fn")),
     r"weight is torch.float16, float8_e4m3fn stores"),
    (dict(weight=torch.zeros(W[0], W[1] // 2, dtype=torch.uint8), weight_scale=torch.zeros(3, dtype=torch.float8_e4m3fn),
          weight_scale_2=torch.ones(()), comfy_quant=conf("nvfp4")), r"block scales, the tiled layout"),
    (dict(weight=torch.zeros(W, dtype=torch.float8_e4m3fn), weight_scale=torch.ones(()),
          comfy_quant=torch.tensor(list(b"{not json"), dtype=torch.uint8)), r"comfy_quant is not ComfyUI quantization JSON"),
])
def test_damaged_comfyui_quantized_layers_name_the_tensor(tmp_path, tensors, expect):
    path = write(tmp_path, with_layer(**tensors))
    with pytest.raises(BnbFluxError, match=expect) as e:
        ckpt = open_flux_checkpoint(path)
        try:
            ckpt.read_linear(QKV)
        finally:
            ckpt.close()
    assert str(e.value).startswith("model.safetensors: ")
