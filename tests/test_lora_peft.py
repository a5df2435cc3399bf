"""diffusers/PEFT LoRAs against PEFT's own forward: alpha kept only in the file's metadata (diffusers'
``save_lora_weights``), ``alpha_pattern``/``rank_pattern``, rsLoRA, and ``lora_B`` biases scaled by
alpha/rank like the weight.

The LoRA is made by PEFT on diffusers' own ``FluxTransformer2DModel`` (the tiny config the tests use
everywhere), saved by diffusers' ``FluxPipeline.save_lora_weights`` and parsed by the pack. Reference:
each adapted layer's output minus its base layer's output, computed by PEFT's ``LoraLayer.forward``.
Tolerance: relative L2 error 1e-6 (float32; PEFT runs ``B(A(x)) * scale``, the parsed form
``x @ (scale * up @ down)^T``: the same sums blocked differently).
"""
from __future__ import annotations

import os

import pytest
import torch

from quant_expand.testing import synthetic as S
from quant_expand.checkpoint.tensor_files import TensorFile
from quant_expand.lora.parse import parse_lora
from quant_expand.testing.prompts import rel_err

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:Adapter .default.*invalid shape")  # PEFT on 1-D lora_B biases

CFG = S.TinyFluxConfig()
MODS = {k[: -len(".weight")]: v for k, v in S.flux_shapes(CFG).items() if k.endswith(".weight")}
TARGETS = ["to_q", "to_k", "to_v", "add_q_proj", "to_out.0", "proj_mlp", "ff.net.0.proj", "norm1.linear",
           "norm_out.linear", "x_embedder", "context_embedder"]


def peft_flux(config_kwargs: dict, seed: int = 0):
    """A tiny diffusers FLUX transformer with a PEFT LoRA whose factors and biases are random."""
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=CFG.in_channels * 4, num_layers=CFG.depth, num_single_layers=CFG.depth_single_blocks,
        attention_head_dim=128, num_attention_heads=CFG.num_heads, joint_attention_dim=CFG.context_in_dim,
        pooled_projection_dim=CFG.vec_in_dim, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    model.add_adapter(peft.LoraConfig(target_modules=TARGETS, **config_kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def save_with_diffusers(model, directory: str) -> str:
    from peft.utils import get_peft_model_state_dict

    config = model.peft_config["default"].to_dict()
    diffusers.FluxPipeline.save_lora_weights(directory, transformer_lora_layers=get_peft_model_state_dict(model),
                                             transformer_lora_adapter_metadata=config)
    return os.path.join(directory, "pytorch_lora_weights.safetensors")


def peft_deltas(model) -> dict:
    """diffusers module name -> (input, PEFT's LoRA output: adapted layer minus base layer)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                x = torch.randn(5, module.in_features, generator=g)
                out[name] = (x, module(x) - module.get_base_layer()(x))
    return out


def parsed_delta(layer, x: torch.Tensor) -> torch.Tensor:
    down = layer.down.float()
    y = (x[:, : down.shape[1]] @ down.t()) @ (layer.scale * layer.up.float()).t()
    return y + layer.bias.float() if layer.bias is not None else y


def check_against_peft(model, path, name):
    with TensorFile(path) as tensors:
        parsed = parse_lora(tensors, name, MODS)
    by_source = {layer.source: layer for layer in parsed.layers}
    deltas = peft_deltas(model)
    assert set(by_source) == set(deltas)
    for module, (x, want) in deltas.items():
        got = parsed_delta(by_source[module], x)
        if module == "norm_out.linear":  # parsed in BFL row order: (shift, scale) halves swapped back
            got = torch.cat(got.chunk(2, dim=-1)[::-1], dim=-1)
        err = rel_err(got, want)
        assert err < 1e-6, (module, err)
    return parsed


def test_alpha_only_in_metadata_and_scaled_biases_match_peft(tmp_path):
    model = peft_flux(dict(r=8, lora_alpha=4, lora_bias=True))
    path = save_with_diffusers(model, str(tmp_path))
    with TensorFile(path) as t:
        assert not any(k.endswith(".alpha") for k in t.keys()) and "lora_adapter_metadata" in t.metadata
        assert any(k.endswith("lora_B.bias") for k in t.keys())
    parsed = check_against_peft(model, path, "peft.safetensors")
    assert {layer.scale for layer in parsed.layers} == {0.5}
    assert "alpha 4 from the file's lora_adapter_metadata: scale 0.5" in parsed.describe()


def test_alpha_and_rank_patterns_and_rslora_match_peft(tmp_path):
    model = peft_flux(dict(r=8, lora_alpha=6, use_rslora=True, lora_bias=True,
                           rank_pattern={"to_k": 4}, alpha_pattern={"proj_mlp": 16, "norm_out.linear": 2}))
    parsed = check_against_peft(model, save_with_diffusers(model, str(tmp_path)), "patterns.safetensors")
    scales = {layer.source: layer.scale for layer in parsed.layers}
    assert scales["single_transformer_blocks.0.proj_mlp"] == pytest.approx(16 / 8 ** 0.5)
    assert scales["transformer_blocks.0.attn.to_k"] == pytest.approx(6 / 4 ** 0.5)
    assert "(rsLoRA) with alpha_pattern" in parsed.describe()


def test_without_metadata_the_scale_is_one(tmp_path):
    """The same tensors with the metadata dropped: PEFT's default alpha equals nothing the file says."""
    from safetensors.torch import load_file

    model = peft_flux(dict(r=8, lora_alpha=8, lora_bias=True))
    path = save_with_diffusers(model, str(tmp_path))
    bare = S.save_safetensors(load_file(path), str(tmp_path / "bare.safetensors"))
    parsed = check_against_peft(model, bare, "bare.safetensors")  # alpha == r: PEFT's scale is 1 too
    assert {layer.scale for layer in parsed.layers} == {1.0} and parsed.alpha_note == ""
