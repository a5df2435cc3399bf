"""FLUX.2 and Chroma files in diffusers names, written by diffusers and PEFT themselves.

A model file: the BFL test model (``quant_expand.testing.family_models``) through diffusers' own single-file
converter (``convert_flux2_transformer_checkpoint_to_diffusers`` / ``convert_chroma_…``), taken by the diffusers
model class with ``load_state_dict(strict=True)`` (so the names are the class's), written by its
``save_pretrained`` (one file, or shards with an index). A LoRA: PEFT's adapter on that model class
(``add_adapter`` with a ``LoraConfig``, random factors), written by the pipeline's ``save_lora_weights``.
The models are built on the meta device (Chroma's fixed 3072 hidden makes a real one ~2.5 GB in float32):
only the file's own tensors are ever allocated.
"""
from __future__ import annotations

import glob
import math
import os
import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_chroma_transformer_checkpoint_to_diffusers,
    convert_flux2_transformer_checkpoint_to_diffusers,
)

from quant_expand.testing.family_models import HEAD_DIM, ChromaConfig, Flux2Config  # noqa: E402


def diffusers_model(cfg):
    """The diffusers transformer of a test model config, on the meta device."""
    with torch.device("meta"):
        if isinstance(cfg, Flux2Config):
            return diffusers.Flux2Transformer2DModel(
                patch_size=1, in_channels=cfg.in_channels, num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks,
                attention_head_dim=HEAD_DIM, num_attention_heads=cfg.hidden_size // HEAD_DIM,
                joint_attention_dim=cfg.context_in_dim, mlp_ratio=cfg.mlp_hidden / cfg.hidden_size,
                guidance_embeds=cfg.guidance)
        assert isinstance(cfg, ChromaConfig)
        return diffusers.ChromaTransformer2DModel(
            patch_size=1, in_channels=cfg.in_channels, num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks,
            attention_head_dim=HEAD_DIM, num_attention_heads=cfg.hidden_size // HEAD_DIM,
            joint_attention_dim=cfg.context_in_dim, approximator_num_channels=cfg.approx_in,
            approximator_hidden_dim=cfg.approx_hidden, approximator_layers=cfg.approx_layers)


def to_diffusers(cfg, bfl: dict) -> dict:
    """diffusers' own conversion of a BFL state dict (``bfl`` is left as it is)."""
    convert = (convert_flux2_transformer_checkpoint_to_diffusers if isinstance(cfg, Flux2Config)
               else convert_chroma_transformer_checkpoint_to_diffusers)
    return convert(dict(bfl))


def owner_renames(cfg, bfl: dict) -> dict[str, str]:
    """diffusers module -> BFL module, for the Linears diffusers' converter only renames (the same tensor
    under another name: no split, no swap)."""
    by_id = {id(t): k for k, t in bfl.items()}
    out = {}
    for key, t in to_diffusers(cfg, bfl).items():
        if key.endswith(".weight") and t.ndim == 2 and id(t) in by_id:
            out[key[: -len(".weight")]] = by_id[id(t)][: -len(".weight")]
    return out


def save_pretrained(cfg, bfl: dict, directory: str, shards: int = 1) -> list[str]:
    """The model as diffusers' ``save_pretrained`` writes it to ``directory``: its safetensors files (the
    shards in order), with ``diffusion_pytorch_model.safetensors.index.json`` beside them when ``shards`` > 1."""
    model = diffusers_model(cfg)
    model.load_state_dict(to_diffusers(cfg, bfl), strict=True, assign=True)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(directory, max_shard_size=math.ceil(size / shards) if shards > 1 else "10GB")
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    assert len(files) >= shards and (shards == 1) != os.path.isfile(
        os.path.join(directory, "diffusion_pytorch_model.safetensors.index.json"))
    return files


def linear_names(cfg) -> list[str]:
    """Every Linear of the diffusers model, by its module name."""
    return [n for n, m in diffusers_model(cfg).named_modules() if isinstance(m, torch.nn.Linear)]


def save_peft_lora(cfg, targets, directory: str, rank: int = 8, seed: int = 0, scale: float = 0.1) -> str:
    """A PEFT LoRA on the diffusers modules ``targets`` (exact names), saved by the family's pipeline
    (``Flux2Pipeline`` / ``ChromaPipeline``) ``save_lora_weights``: ``transformer.`` keys, lora_alpha only in
    the metadata. lora_alpha equals the rank (scale 1): ComfyUI's LoRA loader does not read the metadata.
    Each layer's delta has RMS about ``scale / sqrt(in)``, ``scale`` times the weights' own size here."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    model = diffusers_model(cfg)
    pattern = "|".join(re.escape(t) for t in targets)  # a string is matched whole, a list by name suffix
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=f"^({pattern})$")
    model.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            a, b = module.lora_A["default"], module.lora_B["default"]
            a.weight = torch.nn.Parameter(torch.randn(rank, a.in_features, generator=g) / math.sqrt(a.in_features))
            b.weight = torch.nn.Parameter(torch.randn(b.out_features, rank, generator=g) * scale / math.sqrt(a.in_features))
    state = get_peft_model_state_dict(model)
    assert {k.rsplit(".lora_", 1)[0] for k in state} == set(targets)
    pipeline = diffusers.Flux2Pipeline if isinstance(cfg, Flux2Config) else diffusers.ChromaPipeline
    pipeline.save_lora_weights(directory, transformer_lora_layers=state,
                               transformer_lora_adapter_metadata=config.to_dict())
    return os.path.join(directory, "pytorch_lora_weights.safetensors")
