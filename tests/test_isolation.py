"""Isolation: what one branch or one prompt does to a shared, cached model never shows in another
CPU; ComfyUI from COMFYUI_PATH.

In-process (ComfyUI's executor): branches of one graph share one loaded quantized model — plain, Control
LoRA, Control + style LoRA, the same rescaled by Set LoRA Scale, stock LoraLoaderModelOnly. Each branch run alone
on a freshly loaded model (cache reset, models unloaded) gives bit for bit the latent it gives inside the
shared graph, whatever the order the branches are listed in and with the loader served from the cache.

Real server (``POST /prompt``): 20 prompts with different LoRA and Set LoRA Scale strengths are queued
back to back, sharing the cached loader and Control LoRA nodes; each latent equals the one the same
prompt gives when run on its own after ``/free`` (cache and models dropped). A NaN strength passes
ComfyUI's validator (``NaN < min`` is false) and fails the node with the file named; an out-of-range one
is a 400; the next prompt's result is unchanged.
"""
from __future__ import annotations

import json
import os
import random
import time

import pytest
import torch

from model_files import write_flux_with_loras
from quant_expand.testing.prompts import (apply_lora, ksampler, load_bnb_flux, node, sampling_graph, set_lora_scale,
                                          stock_lora)
from quant_expand.testing.synthetic import TinyFluxConfig
from server_host import running_server

CFG = TinyFluxConfig(hidden_size=128)  # the smallest FLUX ComfyUI builds: 20+ prompts stay quick
MODEL, CONTROL, STYLE = "iso_base.safetensors", "iso_canny.safetensors", "iso_style.safetensors"


# ---------------------------------------------------------------- branches of one graph (in-process)

BRANCHES = {
    # branch -> (nodes it needs besides the loader "q", model it samples, control latent?)
    "plain": ({}, ["q", 0], False),
    "control": ({"c": apply_lora(["q", 0], CONTROL, 0.85)}, ["c", 0], True),
    "control_style": ({"c": apply_lora(["q", 0], CONTROL, 0.85), "s": apply_lora(["c", 0], STYLE, 0.6)}, ["s", 0], True),
    "control_style_rescaled": ({"c": apply_lora(["q", 0], CONTROL, 0.85), "s": apply_lora(["c", 0], STYLE, 0.6),
                                "r": set_lora_scale(["s", 0], CONTROL, -0.4)}, ["r", 0], True),
    "stock_lora": ({"k": stock_lora(["q", 0], STYLE, 0.6)}, ["k", 0], False),
}


def branch_graph(names):
    g = {"q": load_bnb_flux(MODEL, quantize_img_in=True)}
    for name in names:
        nodes, model_ref, control = BRANCHES[name]
        g.update(nodes)
        g = sampling_graph(g, model_ref, key=name, steps=2, control_seed=42 if control else None, prefix=name)
    return g


def fresh(host):
    """Forget every cached node output and unload every model: the next prompt loads from disk."""
    import comfy.model_management

    host.executor.reset()
    comfy.model_management.unload_all_models()
    comfy.model_management.cleanup_models_gc()


@pytest.fixture(scope="module")
def iso_files(host):
    write_flux_with_loras(CFG, os.path.join(host.models_dir, "diffusion_models"), os.path.join(host.models_dir, "loras"),
                          MODEL, CONTROL, STYLE)


def test_branches_sharing_a_loaded_model_equal_running_alone(host, iso_files):
    alone = {}
    for name in BRANCHES:
        fresh(host)
        alone[name] = host.run(branch_graph([name]))[name]
    # the branches really differ (else equality below proves nothing)
    assert not torch.equal(alone["plain"], alone["control"])
    assert not torch.equal(alone["control"], alone["control_style"])
    assert not torch.equal(alone["control_style"], alone["control_style_rescaled"])
    assert not torch.equal(alone["plain"], alone["stock_lora"])

    orders = [list(BRANCHES), list(reversed(BRANCHES))]
    for i, order in enumerate(orders):
        fresh(host)
        out = host.run(branch_graph(order))
        for name in BRANCHES:
            assert torch.equal(out[name], alone[name]), f"{name} in a shared graph (order {order})"
        assert host.node_output("q") is not None
    # and once more with the loader (and its model, loaded and patched by the runs above) from the cache
    out = host.run(branch_graph(orders[0][1:] + orders[0][:1]))
    cached = next(d["nodes"] for e, d in host.executor.status_messages if e == "execution_cached")
    assert "q" in cached
    for name in BRANCHES:
        assert torch.equal(out[name], alone[name]), f"{name} with the cached loader"


# ---------------------------------------------------------------- 20 prompts through a real server

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    def write_files(dirs):
        write_flux_with_loras(CFG, dirs["models/diffusion_models"], dirs["models/loras"], MODEL, CONTROL, STYLE)

    with running_server(tmp_path_factory, "iso-server", write_files) as srv:
        yield srv


COND = {"tokens": 8, "context_dim": CFG.context_in_dim, "pooled_dim": CFG.vec_in_dim, "guidance": 3.5}


def strength_prompt(tag, style, scale):
    """Load BnB Flux -> Control LoRA 1.0 -> style LoRA at ``style`` [-> Set LoRA Scale (control) to ``scale``]."""
    g = {"r": set_lora_scale(["s", 0], CONTROL, scale)} if scale is not None else {}
    return {**g, "q": load_bnb_flux(MODEL, quantize_img_in=True), "c": apply_lora(["q", 0], CONTROL, 1.0),
            "s": apply_lora(["c", 0], STYLE, style),
            "ctl": node("BnbFluxServerTestLatent", seed=42, size=16, scale=1.0),
            "lat": node("BnbFluxServerTestLatent", seed=0, size=16, scale=0.0),
            "pos": node("BnbFluxServerTestConditioning", **COND, seed=1, control=["ctl", 0]),
            "neg": node("BnbFluxServerTestConditioning", **COND, seed=1001, control=["ctl", 0]),
            "ks": ksampler(["r" if scale is not None else "s", 0], ["pos", 0], ["neg", 0], ["lat", 0], seed=3, steps=1),
            "save": node("SaveLatent", samples=["ks", 0], filename_prefix=f"iso/{tag}")}


def latent_of(server, entry) -> torch.Tensor:
    from safetensors.torch import load_file

    status = entry["status"]
    assert status["status_str"] == "success", [m for m in status["messages"] if m[0] == "execution_error"]
    saved = entry["outputs"]["save"]["latents"]
    assert len(saved) == 1
    return load_file(os.path.join(server.dirs["output"], saved[0]["subfolder"], saved[0]["filename"]))["latent_tensor"]


def run_alone(server, prompt) -> torch.Tensor:
    """The prompt on its own, on a server that has just dropped its cache and models."""
    status, _ = server._request("POST", "/free", json.dumps({"unload_models": True, "free_memory": True}).encode())
    assert status == 200
    # the worker applies /free's flags after the prompt it is running (or on waking): once a prompt
    # posted after /free has finished, the next one starts from a reset cache
    barrier = {"b": node("BnbFluxServerTestLatent", seed=9, size=16, scale=0.0),
               "bs": node("SaveLatent", samples=["b", 0], filename_prefix="iso/barrier")}
    assert server.run_prompt(barrier)["status"]["status_str"] == "success"
    return latent_of(server, server.run_prompt(prompt))


# (style strength, Set LoRA Scale strength of the Control LoRA or None: sample the style node itself);
# each style strength comes back with other scales, so a queued prompt reuses a cached style node that
# an earlier prompt rescaled downstream
STRENGTHS = [(style, scale) for style in (-0.6, 0.0, 0.35, 0.8, 1.7) for scale in (None, 0.5, -0.25, 1.3)]


def test_twenty_queued_prompts_equal_single_runs(server):
    t0 = time.monotonic()
    single = {i: run_alone(server, strength_prompt(f"single_{i:02d}", a, b)) for i, (a, b) in enumerate(STRENGTHS)}
    t1 = time.monotonic()
    assert len({tuple(v.flatten()[:64].tolist()) for v in single.values()}) == len(STRENGTHS)  # all different

    order = list(range(len(STRENGTHS)))
    random.Random(0).shuffle(order)
    ids = {}
    for i in order:  # back to back: the queue holds them all, the cached loader and Control LoRA serve each
        a, b = STRENGTHS[i]
        status, answer = server.post_prompt(strength_prompt(f"queued_{i:02d}", a, b))
        assert status == 200 and not answer.get("node_errors"), answer
        ids[i] = answer["prompt_id"]
    for n, i in enumerate(order):
        entry = server.wait_history(ids[i], timeout=180)
        got = latent_of(server, entry)
        assert torch.equal(got, single[i]), f"prompt {i} (style {STRENGTHS[i][0]}, control scale {STRENGTHS[i][1]})"
        cached = next(m[1]["nodes"] for m in entry["status"]["messages"] if m[0] == "execution_cached")
        assert {"q", "c"} <= set(cached), cached  # one loaded model served them all
    print(f"20 single runs {t1 - t0:.1f} s, 20 queued {time.monotonic() - t1:.1f} s")


def test_nan_strength_reaches_the_node_and_out_of_range_is_a_400(server):
    good = run_alone(server, strength_prompt("before_nan", 0.3, 0.7))
    # Python's json writes NaN as the bare token NaN, which ComfyUI's JSON reader accepts
    status, answer = server.post_prompt(strength_prompt("nan", float("nan"), 0.7))
    assert status == 200, answer
    entry = server.wait_history(answer["prompt_id"])
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert len(errors) == 1 and errors[0]["node_id"] == "s", errors
    assert errors[0]["exception_type"].endswith("BnbFluxError")
    assert STYLE in errors[0]["exception_message"] and "strength is nan" in errors[0]["exception_message"]

    status, answer = server.post_prompt(strength_prompt("too_big", 10.5, 0.7))
    assert status == 400 and "s" in answer["node_errors"], answer
    # the same prompt as before, now with everything up to Set LoRA Scale served from the cache
    status, answer = server.post_prompt(strength_prompt("after_nan", 0.3, 0.7))
    assert status == 200
    assert torch.equal(latent_of(server, server.wait_history(answer["prompt_id"])), good)
