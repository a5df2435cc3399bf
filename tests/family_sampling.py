"""What the FLUX.2 and Chroma model-file tests share: a Load BnB Flux model sampled beside ComfyUI's own
UNETLoader on a reference file, one model at a time (the test Chroma is ~0.6 B parameters in float32), with
the quantized model's checks run while it is loaded, and the latents compared."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from quant_expand.testing.family_models import Flux2Config
from quant_expand.testing.prompts import rel_err, sampling_graph, unet_loader

SAME_WEIGHTS_TOL = 1e-6  # the same weights through ComfyUI's float32 matmuls: only summation order differs


def sampling_options(cfg, steps: int) -> dict:
    """sampling_graph's options for a family's test model: no pooled vector (neither family has one);
    FLUX.2's latent has 128 channels and its own text width."""
    if isinstance(cfg, Flux2Config):
        return dict(steps=steps, size=4, pooled_dim=0, channels=cfg.in_channels, context_dim=cfg.context_in_dim)
    return dict(steps=steps, size=4, pooled_dim=0, context_dim=cfg.context_in_dim)


def quantized_layer_names(patcher, host) -> set[str]:
    layers = host.pack_module("quant_expand.layers")
    return {n for n, m in patcher.model.diffusion_model.named_modules() if layers.is_quantized_linear(m)}


def sample_against_unet_loader(host, quantized_node: dict, reference_file: str, cfg, steps: int,
                               check: Optional[Callable] = None) -> dict:
    """Latents of ``quantized_node`` (a Load BnB Flux node) under ``"q"`` and of UNETLoader on
    ``reference_file`` under ``"ref"``; ``check(patcher)`` sees the quantized model before it is freed."""
    options = sampling_options(cfg, steps)
    out = host.run(sampling_graph({"q": quantized_node}, ["q", 0], key="q", **options))
    if check is not None:
        check(host.node_output("q"))
    host.free_models()
    out.update(host.run(sampling_graph({"ref": unet_loader(reference_file)}, ["ref", 0], key="ref", **options)))
    host.free_models()
    return out


def assert_same_latents(out: dict, tol: float = SAME_WEIGHTS_TOL):
    assert torch.isfinite(out["q"]).all() and out["q"].abs().max() > 0
    assert rel_err(out["q"], out["ref"]) < tol
