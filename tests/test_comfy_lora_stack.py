"""Apply LoRA Stack through ComfyUI's executor, patcher and sampler (CPU, in-process).

Each enabled slot goes through the same parse and ``apply_lora`` as an Apply Control LoRA node, so the stack
builds the very patch lists a chain of those nodes builds: the latents compare bit for bit (``torch.equal``).
Switching a slot off reruns only the stack node: ComfyUI's cache keeps serving Load BnB Flux's model (the same
object, the same quantized bytes).
"""
from __future__ import annotations

import pytest
import torch

from comfy_host import quantized_hash
from quant_expand.testing.prompts import (apply_lora, linked_value, load_bnb_flux, lora_stack, rel_err, sampling_graph,
                                          set_lora_scale)
from quant_expand.testing.synthetic import TinyFluxConfig, make_control_lora, make_lora, make_tiny_flux, save_safetensors

CFG = TinyFluxConfig()
MODEL = "stack_exact_nf4.safetensors"
CONTROL, STYLE, STYLE2 = "stack_canny.safetensors", "stack_style.safetensors", "stack_style2.safetensors"
CONTROL_COPY = "stack_canny_copy.safetensors"
EMPTY = "None"


@pytest.fixture(scope="module")
def files(host):
    save_safetensors(make_tiny_flux(CFG, seed=0, exact_for="nf4"), host.model_path("diffusion_models", MODEL))
    save_safetensors(make_control_lora(CFG, seed=2), host.model_path("loras", CONTROL))
    save_safetensors(make_control_lora(CFG, seed=2), host.model_path("loras", CONTROL_COPY))
    save_safetensors(make_lora(CFG, kind="lora", seed=7), host.model_path("loras", STYLE))
    save_safetensors(make_lora(CFG, kind="kohya", seed=9), host.model_path("loras", STYLE2))


def loader():
    return load_bnb_flux(MODEL, "nf4", False)


def sampled(host, model_nodes: dict, outputs: dict) -> dict:
    """``outputs``: capture key -> model reference; one prompt, the same noise and control latent for each."""
    g = dict(model_nodes)
    for i, (key, ref) in enumerate(outputs.items()):
        g = sampling_graph(g, ref, key=key, control_seed=42, prefix=f"p{i}")
    return host.run(g)


def history_ui(host) -> dict:
    """The nodes' ``ui`` outputs of the last prompt, as ComfyUI stores them in /history."""
    return host.executor.history_result["outputs"]


def test_stack_equals_the_chain_of_apply_control_lora_nodes(host, files):
    g = {"q": loader(),
         "st": lora_stack(["q", 0], (CONTROL, 0.85), (EMPTY, 1.0), (STYLE, 0.6), (STYLE2, 0.4, False)),
         "st3": lora_stack(["q", 0], (CONTROL, 0.85), (EMPTY, 1.0), (STYLE, 0.6), (STYLE2, 0.4, True)),
         "c": apply_lora(["q", 0], CONTROL, 0.85), "s": apply_lora(["c", 0], STYLE, 0.6),
         "s2": apply_lora(["s", 0], STYLE2, 0.4),
         "off": lora_stack(["q", 0], (CONTROL, 0.85, False), (STYLE, 0.6, False))}
    out = sampled(host, g, {"stack": ["st", 0], "chain": ["s", 0], "stack3": ["st3", 0], "chain3": ["s2", 0],
                            "off": ["off", 0], "base": ["q", 0]})
    assert torch.equal(out["stack"], out["chain"])
    assert torch.equal(out["stack3"], out["chain3"])
    assert torch.equal(out["off"], out["base"])
    # the comparisons can fail: each LoRA changes the result
    assert rel_err(out["stack"], out["base"]) > 1e-3 and rel_err(out["stack3"], out["stack"]) > 1e-4

    ui = history_ui(host)["st"]["bnb_flux_stack"]
    assert [(s["slot"], s["state"]) for s in ui] == [(1, "applied"), (3, "applied"), (4, "off")], ui
    assert ui[0]["kind"] == "control" and ui[0]["strength"] == 0.85 and ui[0]["widened"] == {"img_in": 128}
    assert ui[1]["name"] == STYLE and ui[1]["strength"] == 0.6 and ui[2] == {"slot": 4, "name": STYLE2,
                                                                              "state": "off", "strength": 0.4}


def test_switching_a_slot_reruns_only_the_stack(host, files):
    def graph(style_on):
        return sampling_graph({"q": loader(), "st": lora_stack(["q", 0], (CONTROL, 1.0), (STYLE, 0.6, style_on))},
                              ["st", 0], key="x", control_seed=42)

    on = host.run(graph(True))["x"]
    base = host.node_output("q")
    before = quantized_hash(host, base)
    off = host.run(graph(False))["x"]
    cached = next(d["nodes"] for e, d in host.executor.status_messages if e == "execution_cached")
    assert "q" in cached and "st" not in cached, cached
    assert host.node_output("q") is base and quantized_hash(host, base) == before
    only_control = host.run(sampling_graph({"q": loader(), "c": apply_lora(["q", 0], CONTROL, 1.0)}, ["c", 0], key="x",
                                           control_seed=42))["x"]
    assert torch.equal(off, only_control)
    assert rel_err(on, off) > 1e-3
    assert host.node_output("q") is base  # the loader was never run again


def test_set_lora_scale_rescales_a_stacked_lora(host, files):
    g = {"q": loader(), "st": lora_stack(["q", 0], (CONTROL, 1.0), (STYLE, 0.3)),
         "set": set_lora_scale(["st", 0], STYLE, 0.8),
         "st8": lora_stack(["q", 0], (CONTROL, 1.0), (STYLE, 0.8))}
    out = sampled(host, g, {"set": ["set", 0], "applied": ["st8", 0], "before": ["st", 0]})
    assert torch.equal(out["set"], out["applied"])
    assert rel_err(out["set"], out["before"]) > 1e-4
    (badge,) = history_ui(host)["set"]["bnb_flux_scale"]
    assert badge == {"name": STYLE, "kind": "style", "from": 0.3, "to": 0.8, "applied_by": "st"}, badge


BAD_SLOTS = [
    ("same_file_twice", [(STYLE, 0.5), (STYLE, 0.7)], ["lora_2: ", STYLE, "already applied"]),
    ("nan_strength", [(STYLE, float("nan"))], ["lora_1: ", STYLE, "strength is nan"]),
    ("switch_not_bool", [(STYLE, 0.5, ["v", 0])], ["on_1 is str 'yes', not a switch"]),
    ("second_control_lora", [(CONTROL, 1.0), (EMPTY, 1.0), (CONTROL_COPY, 1.0)],
     ["lora_3: ", "a Control LoRA (stack_canny.safetensors) is already applied"]),
]


@pytest.mark.parametrize("case,slots,phrases", BAD_SLOTS, ids=[c[0] for c in BAD_SLOTS])
def test_bad_slot_fails_naming_the_slot(host, files, case, slots, phrases):
    g = {"q": loader(), "v": linked_value("yes")}  # "v": a string reaching on_1 through a link
    g["st"] = lora_stack(["q", 0], *slots)
    res = host.run(sampling_graph(g, ["st", 0], key="x"), expect_error=True)
    assert "validation" not in res, res
    (err,) = res["errors"]
    assert err["node_id"] == "st" and err["exception_type"] == "bnb_flux.BnbFluxError", err
    for phrase in phrases:
        assert phrase in err["exception_message"], (phrase, err["exception_message"])


def test_off_slots_are_not_read(host, files):
    """An off slot is skipped whole: a NaN strength there is no error, and the result is the base model's."""
    g = {"q": loader(), "st": lora_stack(["q", 0], (STYLE, float("nan"), False))}
    out = sampled(host, g, {"off": ["st", 0], "base": ["q", 0]})
    assert torch.equal(out["off"], out["base"])
    assert history_ui(host)["st"]["bnb_flux_stack"] == [{"slot": 1, "name": STYLE, "state": "off", "strength": None}]
