"""torch.compile through ComfyUI's own compile helper (CPU, inductor): quantized layers with lazy
LoRA deltas trace without graph breaks and give the eager result.

Each FLUX block is compiled with ``fullgraph=True`` (ComfyUI's ``set_torch_compile_wrapper`` with block
keys): dynamo raises on any graph break inside a block, so a break per quantized layer cannot pass.
ComfyUI's CPU attention is swapped for its PyTorch attention (what runs on a GPU).
Tolerance: relative L2 error 1e-4 on whole latents (inductor fuses and reorders float32 arithmetic).
"""
from __future__ import annotations

import pytest
import torch

from comfy_host import sample_direct
from quant_expand.testing.prompts import rel_err
from quant_expand.testing.synthetic import TinyFluxConfig, make_control_lora, make_lora, make_tiny_flux, save_safetensors

CFG = TinyFluxConfig()


@pytest.fixture(scope="module")
def model(host):
    save_safetensors(make_tiny_flux(CFG, seed=0, exact_for="nf4"), host.model_path("diffusion_models", "compile_nf4.safetensors"))
    save_safetensors(make_control_lora(CFG, seed=2), host.model_path("loras", "compile_control.safetensors"))
    save_safetensors(make_lora(CFG, kind="lora", seed=7), host.model_path("loras", "compile_style.safetensors"))
    load = host.pack_module("nodes.load_bnb_flux").LoadBnbFlux
    apply = host.pack_module("nodes.apply_control_lora").ApplyControlLora.execute
    with torch.inference_mode():
        m = load.execute("compile_nf4.safetensors", "nf4", True, "float32").result[0]
        m = apply(m, "compile_control.safetensors", 0.9).result[0]
        # a second LoRA on the same layers at another strength: the per-term scale vector path
        return apply(m, "compile_style.safetensors", -0.6).result[0]


def test_blocks_compile_fullgraph_and_match_eager(host, model, monkeypatch):
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention as attention
    import torch._dynamo
    from comfy_api.torch_helpers.torch_compile import set_torch_compile_wrapper

    # ComfyUI's CPU attention (sub-quadratic) asks psutil for free memory inside the block: a graph break
    # of ComfyUI's own; GPUs get PyTorch's attention, which is what runs here too
    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", attention.attention_pytorch)

    control = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(5))
    dm = model.get_model_object("diffusion_model")
    layers = host.pack_module("quant_expand.layers")
    assert sum(layers.is_quantized_linear(m) for m in dm.modules()) > 10
    keys = [f"diffusion_model.double_blocks.{i}" for i in range(len(dm.double_blocks))] + \
           [f"diffusion_model.single_blocks.{i}" for i in range(len(dm.single_blocks))]
    compiled = model.clone()
    set_torch_compile_wrapper(compiled, backend="inductor", fullgraph=True, keys=keys)
    torch._dynamo.reset()
    try:  # compiled first: the layers have never run eagerly, only what loading prepared is there
        out = sample_direct(compiled, control=control)
    finally:
        torch._dynamo.reset()
    eager = sample_direct(model, control=control)
    assert rel_err(out, eager) < 1e-4
