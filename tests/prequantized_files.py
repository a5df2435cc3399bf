"""Writers of the foreign pre-quantized layouts the loader reads, built on bitsandbytes' own modules
(``Linear4bit`` / ``Linear8bitLt`` state dicts, i.e. ``QuantState.as_dict(packed=True)``) and diffusers'
key names from ``quant_expand.testing.synthetic.diffusers_pieces`` (a table written apart from the loader's)."""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import bitsandbytes as bnb
import torch

from quant_expand.testing.synthetic import TinyFluxConfig, diffusers_pieces, linear_modules, save_safetensors

ALL_IN_ONE_EXTRAS = {  # what lllyasviel's all-in-one checkpoints hold beside the diffusion model
    "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight": (32, 16),
    "text_encoders.t5xxl.transformer.shared.weight": (32, 16),
    "vae.decoder.conv_in.weight": (8, 4, 3, 3),
}


def bnb_linear_state(weight: torch.Tensor, bias: Optional[torch.Tensor], quant: str, double_quant: bool) -> dict:
    """bitsandbytes' own state dict of a quantized Linear (keys relative to the module)."""
    out_f, in_f = weight.shape
    if quant == "int8":
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight.float().clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=torch.bfloat16,
                                  compress_statistics=double_quant, quant_type=quant)
        layer.weight = bnb.nn.Params4bit(weight.float().clone(), requires_grad=False, quant_type=quant,
                                         compress_statistics=double_quant, blocksize=64)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    layer = layer.to("cpu")  # bnb quantizes when the parameter is moved to a device
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def forge_state_dict(sd: dict, quant: str, double_quant: bool, prefix: str = "model.diffusion_model.",
                     quantize: Callable[[str], bool] = lambda name: True, all_in_one: bool = True) -> dict:
    """lllyasviel/Forge layout: BFL names under ``prefix``; Linears chosen by ``quantize`` in bnb's layout."""
    out = {}
    linears = set(n for n in {k[: -len(".weight")] for k in sd if k.endswith(".weight") and sd[k].ndim == 2})
    for key, t in sd.items():
        module = key.rsplit(".", 1)[0]
        if module in linears and quantize(module):
            if key.endswith(".weight"):
                state = bnb_linear_state(t, sd.get(f"{module}.bias"), quant, double_quant)
                out.update({f"{prefix}{module}.{k}": v for k, v in state.items()})
            continue
        out[prefix + key] = t
    if all_in_one:
        g = torch.Generator().manual_seed(9)
        out.update({k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in ALL_IN_ONE_EXTRAS.items()})
    return out


def diffusers_state_dict(sd: dict, cfg: TinyFluxConfig, quant: Optional[str], double_quant: bool = False,
                         skip=()) -> dict:
    """A diffusers FluxTransformer2DModel state dict of a BFL one: q/k/v (+ proj_mlp) split, norm_out's
    halves swapped; every Linear but ``skip`` quantized with bnb (diffusers 0.42 quantizes every Linear,
    ``proj_out`` and ``x_embedder`` included; ``llm_int8_skip_modules`` keeps some in full precision)."""
    pieces, norms = diffusers_pieces(cfg)
    out = {}
    for module in linear_modules(cfg):
        w, b = sd[f"{module}.weight"], sd[f"{module}.bias"]
        if module == "final_layer.adaLN_modulation.1":  # BFL (shift, scale) -> diffusers (scale, shift)
            w, b = torch.cat(w.chunk(2)[::-1]), torch.cat(b.chunk(2)[::-1])
        for name, start, rows in pieces[module]:
            rows = w.shape[0] if rows is None else rows
            pw, pb = w[start:start + rows].contiguous(), b[start:start + rows].contiguous()
            if quant is None or name in skip:
                out[f"{name}.weight"], out[f"{name}.bias"] = pw, pb
            else:
                out.update({f"{name}.{k}": v for k, v in bnb_linear_state(pw, pb, quant, double_quant).items()})
    for bfl, name in norms.items():
        out[f"{name}.weight"] = sd[bfl]
    return out


def save_sharded(sd: dict, directory: str, shards: int = 2, base: str = "diffusion_pytorch_model") -> str:
    """transformers/diffusers sharding: tensors spread over files by size order, an index names each
    tensor's file (a weight and its quant state may land in different shards)."""
    keys = sorted(sd)
    names = [f"{base}-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {k: names[i % shards] for i, k in enumerate(keys)}
    for name in names:
        save_safetensors({k: sd[k] for k in keys if weight_map[k] == name}, os.path.join(directory, name))
    index = os.path.join(directory, f"{base}.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return index
