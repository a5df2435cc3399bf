"""ComfyUI's experimental bypass-LoRA nodes (LoraLoaderBypass, LoraLoaderBypassModelOnly) on a Load BnB Flux
model, through ComfyUI's executor (CPU).

Stock bypass mode (comfy.sd.load_bypass_lora_for_models) wraps each adapted module's ``forward`` in a hook
and never gives the LoRA to the patcher: on this pack's model a Control LoRA's img_in is never widened, so
KSampler fails on a matmul shape mismatch far from the LoRA node, and the hook's factors live outside the
memory the patcher budgets. The patcher refuses it where the node runs (``BnbModelPatcher.set_injections``),
with a message naming the node and what to use instead; this checks the refusal is raised by the LoRA node
itself (not by KSampler), that nothing is sampled, that the next prompt on the same cached model samples
exactly what it sampled before (no hook left behind), and that models from ComfyUI's own loaders keep
stock bypass mode (the refusal belongs to Load BnB Flux models only).

Tolerance for bypass vs LoraLoaderModelOnly on UNETLoader's model: relative L2 error 1e-5 on whole latents
(float32: ``W x + s*B(A x)`` against ``(W + s*B A) x``, the same sums in another order).
"""
from __future__ import annotations

import pytest

from quant_expand.testing.prompts import (linked_value, load_bnb_flux, node, rel_err, sampling_graph, stock_lora,
                                          unet_loader)
from quant_expand.testing.synthetic import TinyFluxConfig, default_lora_targets, make_control_lora, make_lora, make_tiny_flux, save_safetensors

CFG = TinyFluxConfig()
MODEL, STYLE, CONTROL = "bypass_flux.safetensors", "bypass_style.safetensors", "bypass_canny.safetensors"
BYPASS_NODES = ["LoraLoaderBypassModelOnly", "LoraLoaderBypass"]


@pytest.fixture(scope="module")
def files(host):
    save_safetensors(make_tiny_flux(CFG, seed=0, exact_for="nf4"), host.model_path("diffusion_models", MODEL))
    # quantized layers (blocks, txt_in) and an unquantized one (img_in)
    save_safetensors(make_lora(CFG, kind="lora", seed=8, targets=default_lora_targets(CFG) + ["img_in"]),
                     host.model_path("loras", STYLE))
    save_safetensors(make_control_lora(CFG, seed=2), host.model_path("loras", CONTROL))


def bypass_nodes(class_type, model_ref, lora, strength):
    """``class_type`` on ``model_ref``; LoraLoaderBypass's CLIP input gets None (these tiny FLUX graphs have no
    text encoder; the stock node skips a None CLIP) through the test value node, as a link would feed it."""
    g, clip = {}, {}
    if class_type == "LoraLoaderBypass":
        g["none"] = linked_value(None)
        clip = {"clip": ["none", 0], "strength_clip": 0.0}
    g["bp"] = node(class_type, model=model_ref, lora_name=lora, strength_model=strength, **clip)
    return g


@pytest.mark.parametrize("node", BYPASS_NODES)
@pytest.mark.parametrize("lora,control", [(STYLE, False), (CONTROL, True)])
def test_bypass_node_on_bnb_model_fails_at_the_node_and_next_prompt_runs(host, files, node, lora, control):
    ctl = 42 if control else None
    # the next prompt: the style LoRA by the stock loader on the same cached Load BnB Flux model
    follow = sampling_graph({"q": load_bnb_flux(MODEL, quantize_img_in=False), "s": stock_lora(["q", 0], STYLE, 0.6)},
                            ["s", 0], key="next")
    before = host.run(follow)["next"]

    g = {"q": load_bnb_flux(MODEL, quantize_img_in=False), **bypass_nodes(node, ["q", 0], lora, 0.6)}
    result = host.run(sampling_graph(g, ["bp", 0], key="bypass", control_seed=ctl), expect_error=True)
    assert result["captured"] == {}
    assert len(result["errors"]) == 1, result["errors"]
    error = result["errors"][0]
    assert error["node_type"] == node, error  # refused by the LoRA node, not later by KSampler
    message = error["exception_message"]
    for words in ("Load LoRA (Bypass)", "LoraLoaderBypass", "comfy/weight_adapter/bypass.py", "Load BnB Flux",
                  "LoraLoaderModelOnly", "Apply Control LoRA"):
        assert words in message, message

    # the same cached Load BnB Flux model, right after the refusal: no hook, no patch left behind
    assert host.node_output("q").injections == {}
    after = host.run(follow)["next"]
    assert rel_err(after, before) == 0.0


@pytest.mark.parametrize("node", BYPASS_NODES)
def test_bypass_node_on_comfyui_loader_model_stays_stock(host, files, node):
    g = {"r": unet_loader(MODEL), **bypass_nodes(node, ["r", 0], STYLE, 0.6), "s": stock_lora(["r", 0], STYLE, 0.6)}
    g = sampling_graph(g, ["bp", 0], key="bypass", prefix="a")
    g = sampling_graph(g, ["s", 0], key="stock", prefix="b")
    g = sampling_graph(g, ["r", 0], key="base", prefix="c")
    out = host.run(g)
    assert rel_err(out["bypass"], out["stock"]) < 1e-5
    assert rel_err(out["bypass"], out["base"]) > 1e-3  # the LoRA is applied
