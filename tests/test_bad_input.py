"""Bad input through ComfyUI's own executor (in-process, CPU): a clear node error that names the file and
the problem, and every cached model intact afterwards.

Each case runs three prompts on one ComfyUI host whose cache keeps node outputs between prompts, as a
server does for days:
1. the good prompt (Load BnB Flux -> Control LoRA -> style LoRA -> KSampler with a control latent, and a
   plain branch): its latents must equal the reference computed once for the whole module;
2. the bad prompt: it reuses the cached loader and Control LoRA nodes (ComfyUI hands it the very same
   model objects), samples a good branch on them (so the failing prompt loads and patches the cached
   models), and feeds the bad input to one node. The error must come from that node, be the pack's own
   error type (``BnbFluxError`` / ``LoraFormatError``, not a KeyError or a torch error from deep down),
   and name the file and what is wrong;
3. the good prompt again, with the loader and Control LoRA served from the cache and everything
   downstream executed anew: torch.equal with the reference, and the cached model's quantized bytes
   unchanged.

Pickle files: a real pickle whose unpickling would create a marker file (``pathlib.Path.touch``) sits in
models/loras and models/diffusion_models as ``evil.ckpt`` and as ``evil.safetensors``; the marker must
never appear.

Known gaps, if any, are marked ``xfail(strict=True)`` with the fix they need.
"""
from __future__ import annotations

import json
import os
import pathlib
import pickle

import pytest
import torch

from comfy_host import quantized_hash
from model_files import write_flux_with_loras
from prequantized_files import diffusers_state_dict, forge_state_dict, save_sharded
from quant_expand.testing.prompts import (apply_lora, linked_value, load_bnb_flux, rel_err, sampling_graph,
                                          set_lora_scale, stock_lora)
from quant_expand.testing.synthetic import TinyFluxConfig, make_control_lora, make_lora, make_tiny_flux, save_safetensors

CFG = TinyFluxConfig()
MODEL, CONTROL, STYLE = "bad_base.safetensors", "bad_canny.safetensors", "bad_style.safetensors"
DEPTH = "bad_depth.safetensors"  # a second Control LoRA
OWN_ERRORS = ("BnbFluxError", "LoraFormatError")
QS = "double_blocks.0.img_mlp.0.weight"  # the layer whose quant state loses a key


class Touch:
    """Unpickling this creates ``path`` (the harmless stand-in for code a malicious file would run)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def loader(name=MODEL):
    return load_bnb_flux(name, quantize_img_in=True)


def shared_nodes():
    """The nodes the good and the bad prompts share: ComfyUI's cache gives both the same model objects."""
    return {"q": loader(), "c": apply_lora(["q", 0], CONTROL, 0.85)}


def good_graph():
    g = dict(shared_nodes(), s=apply_lora(["c", 0], STYLE, 0.6))
    g = sampling_graph(g, ["s", 0], key="control_style", steps=1, control_seed=42, prefix="a")
    return sampling_graph(g, ["q", 0], key="plain", steps=1, prefix="p")


def bad_graph(bad_nodes: dict, model_ref):
    """The shared nodes, a good branch sampled on them in this prompt, and the bad nodes feeding a sampler."""
    g = dict(shared_nodes(), **bad_nodes)
    g = sampling_graph(g, ["c", 0], key="bad_prompt_good_branch", steps=1, seed=5, control_seed=7, prefix="g")
    return sampling_graph(g, model_ref, key="bad", steps=1, control_seed=42, prefix="b")




# ---------------------------------------------------------------- files

def _write_bytes(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _damaged(path_in, path_out, how):
    with open(path_in, "rb") as f:
        raw = bytearray(f.read())
    if how == "truncate":  # an interrupted download
        raw = raw[: len(raw) // 2]
    else:  # bytes of the JSON header overwritten
        raw[20:28] = b"\x00\xff\x13\x37\x00\xff\x13\x37"
    _write_bytes(path_out, bytes(raw))


@pytest.fixture(scope="module")
def files(host, tmp_path_factory):
    marker_dir = tmp_path_factory.mktemp("pickle-marker")
    marker = marker_dir / "PICKLE_WAS_LOADED"
    lora = lambda n: host.model_path("loras", n)  # noqa: E731
    model = lambda n: host.model_path("diffusion_models", n)  # noqa: E731
    style = write_flux_with_loras(CFG, os.path.join(host.models_dir, "diffusion_models"),
                                  os.path.join(host.models_dir, "loras"), MODEL, CONTROL, STYLE)
    save_safetensors(make_control_lora(CFG, seed=5), lora(DEPTH))

    payload = pickle.dumps(Touch(marker))
    for folder in (lora, model):
        _write_bytes(folder("evil.ckpt"), payload)
        _write_bytes(folder("evil.safetensors"), payload)
    _damaged(lora(STYLE), lora("bad_truncated_lora.safetensors"), "truncate")
    _damaged(lora(STYLE), lora("bad_corrupted_lora.safetensors"), "header")
    _damaged(model(MODEL), model("bad_truncated_model.safetensors"), "truncate")
    _damaged(model(MODEL), model("bad_corrupted_model.safetensors"), "header")

    sdxl = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(4, 640),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(640, 4),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 768)}
    save_safetensors(sdxl, lora("bad_sdxl_lora.safetensors"))
    save_safetensors(make_lora(TinyFluxConfig(hidden_size=384), kind="lora", seed=3), lora("bad_width384_lora.safetensors"))
    ranks = dict(style)
    key_a = "diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight"
    ranks[key_a] = torch.randn(6, ranks[key_a].shape[1])  # lora_B has rank 8
    save_safetensors(ranks, lora("bad_rank_lora.safetensors"))
    for bad, fname in ((float("nan"), "bad_nan_lora.safetensors"), (float("inf"), "bad_inf_lora.safetensors")):
        sd = dict(style)
        key_b = "diffusion_model.single_blocks.0.linear1.lora_B.weight"
        sd[key_b] = sd[key_b].clone()
        sd[key_b][3, 1] = bad
        save_safetensors(sd, lora(fname))
    save_safetensors({k: (v * 100).to(torch.int8) for k, v in style.items()}, lora("bad_int8_lora.safetensors"))
    huge = dict(style)  # one exponent bit flipped: a lora_B entry at float32's largest value
    huge["diffusion_model.txt_in.lora_B.weight"] = huge["diffusion_model.txt_in.lora_B.weight"].clone()
    huge["diffusion_model.txt_in.lora_B.weight"][0, 0] = 3e38
    save_safetensors(huge, lora("bad_huge_lora.safetensors"))
    rank0 = dict(style)
    rank0["diffusion_model.txt_in.lora_A.weight"] = torch.zeros(0, rank0["diffusion_model.txt_in.lora_A.weight"].shape[1])
    rank0["diffusion_model.txt_in.lora_B.weight"] = torch.zeros(rank0["diffusion_model.txt_in.lora_B.weight"].shape[0], 0)
    save_safetensors(rank0, lora("bad_rank0_lora.safetensors"))
    flood = dict(style)  # a megabyte key name with a forged log line in it
    key = "diffusion_model.txt_in\n[ComfyUI] Prompt executed\x1b[31m" + "x" * 1_000_000
    flood[f"{key}.lora_A.weight"] = torch.zeros(4, 64)
    flood[f"{key}.lora_B.weight"] = torch.zeros(256, 4)
    save_safetensors(flood, lora("bad_flood_lora.safetensors"))
    # a broken index beside the good models: it must not change what they load (every case's good prompt)
    with open(model("bad_unrelated.safetensors.index.json"), "w") as f:
        f.write("[" * 100_000)

    prequantized = forge_state_dict(make_tiny_flux(CFG, seed=0, exact_for="nf4"), "nf4", True, all_in_one=False)
    for suffix in ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"):
        cut = dict(prequantized)
        del cut[f"model.diffusion_model.{QS}.{suffix}"]
        save_safetensors(cut, model(f"bad_prequantized_no_{suffix}.safetensors"))
    nan_absmax = dict(forge_state_dict(make_tiny_flux(CFG, seed=0, exact_for="nf4"), "nf4", False, all_in_one=False))
    key = f"model.diffusion_model.{QS}.absmax"
    nan_absmax[key] = nan_absmax[key].clone()
    nan_absmax[key][2] = float("nan")
    save_safetensors(nan_absmax, model("bad_nan_absmax.safetensors"))
    text_blocksize = dict(prequantized)
    qs_key = f"model.diffusion_model.{QS}.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(text_blocksize[qs_key].numpy()).decode("utf-8"))
    state["blocksize"] = "64"
    text_blocksize[qs_key] = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
    save_safetensors(text_blocksize, model("bad_string_blocksize.safetensors"))
    deep = dict(prequantized)
    deep[f"model.diffusion_model.{QS}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"[" * 5000 + b"]" * 5000),
                                                                                     dtype=torch.uint8)
    save_safetensors(deep, model("bad_deep_quant_state.safetensors"))
    index = save_sharded(diffusers_state_dict(make_tiny_flux(CFG, seed=0, exact_for="nf4"), CFG, "nf4"),
                         model("bad_sharded"), shards=2)
    with open(index) as f:
        data = json.load(f)
    first = sorted(data["weight_map"])[0]
    data["weight_map"][first] = f"../{MODEL}"  # a real model file one folder up
    with open(index, "w") as f:
        json.dump(data, f)
    g = torch.Generator().manual_seed(5)
    save_safetensors({"input_blocks.0.0.weight": torch.randn(32, 4, 3, 3, generator=g),
                      "input_blocks.0.0.bias": torch.randn(32, generator=g),
                      "time_embed.0.weight": torch.randn(64, 32, generator=g),
                      "out.2.weight": torch.randn(4, 32, 3, 3, generator=g)}, model("bad_sdxl_unet.safetensors"))
    save_safetensors(make_control_lora(CFG, seed=2), model("bad_lora_as_model.safetensors"))
    incomplete = make_tiny_flux(CFG, seed=0)
    del incomplete["single_blocks.0.linear2.weight"]
    save_safetensors(incomplete, model("bad_incomplete_model.safetensors"))
    full = make_tiny_flux(CFG, seed=0)
    for fname, key, value in (("bad_nan_weight_model.safetensors", "double_blocks.0.img_mlp.0.weight", float("nan")),
                              ("bad_inf_weight_model.safetensors", "single_blocks.0.linear2.weight", float("inf")),
                              ("bad_nan_bias_model.safetensors", "txt_in.bias", float("nan")),
                              ("bad_nan_norm_model.safetensors", "double_blocks.0.img_attn.norm.key_norm.scale",
                               float("nan"))):
        sd = dict(full)
        sd[key] = sd[key].clone()
        sd[key].view(-1)[1] = value
        save_safetensors(sd, model(fname))
    wrong = dict(full)
    wrong["double_blocks.0.img_attn.norm.key_norm.scale"] = torch.ones(64)
    save_safetensors(wrong, model("bad_norm_shape_model.safetensors"))
    extra = dict(make_tiny_flux(CFG, seed=0, exact_for="nf4"))
    extra["double_blocks.0.some_new_adapter.weight"] = torch.ones(3)
    extra["img_in"] = torch.ones(2)  # the name of a module, not of a tensor
    extra["img_in.weight.data"] = torch.ones(2)
    save_safetensors(extra, model("extra_key_model.safetensors"))
    return {"marker": marker}


@pytest.fixture(scope="module")
def reference(host, files):
    """The good prompt's latents, computed once; every case must give them back bit for bit."""
    out = host.run(good_graph())
    assert rel_err(out["control_style"], out["plain"]) > 1e-3  # the LoRAs really act
    return out


# ---------------------------------------------------------------- the matrix

# (case id, bad nodes, the node the error must come from, its model output, phrases the message must hold)
LORA_ERRORS = [
    ("pickle_lora_ckpt", "evil.ckpt", ["evil.ckpt", "only .safetensors files are read"]),
    ("pickle_lora_named_safetensors", "evil.safetensors", ["evil.safetensors", "not a readable safetensors file"]),
    ("truncated_lora", "bad_truncated_lora.safetensors", ["bad_truncated_lora.safetensors", "not a readable safetensors",
                                                          "truncated or corrupted"]),
    ("corrupted_lora", "bad_corrupted_lora.safetensors", ["bad_corrupted_lora.safetensors", "not a readable safetensors"]),
    ("sdxl_lora", "bad_sdxl_lora.safetensors", ["bad_sdxl_lora.safetensors", "not a FLUX LoRA", "SDXL"]),
    ("other_flux_width", "bad_width384_lora.safetensors", ["bad_width384_lora.safetensors", "model has",
                                                           "use a LoRA made for this FLUX.1 model"]),
    ("rank_mismatch", "bad_rank_lora.safetensors", ["bad_rank_lora.safetensors", "double_blocks.0.img_attn.proj",
                                                    "rank of", "(6) does not match", "(8)"]),
    ("nan_in_lora", "bad_nan_lora.safetensors", ["bad_nan_lora.safetensors", "single_blocks.0.linear1.lora_B.weight",
                                                 "NaN or inf"]),
    ("inf_in_lora", "bad_inf_lora.safetensors", ["bad_inf_lora.safetensors", "NaN or inf"]),
    ("integer_lora", "bad_int8_lora.safetensors", ["bad_int8_lora.safetensors", "dtype int8", "floating point"]),
    ("rank_zero", "bad_rank0_lora.safetensors", ["bad_rank0_lora.safetensors", "txt_in has rank 0", "empty LoRA layer"]),
    ("flooding_key_name", "bad_flood_lora.safetensors", ["bad_flood_lora.safetensors", "characters cut",
                                                         "\\n[ComfyUI] Prompt executed\\x1b[31m"]),
    ("overflowing_values", "bad_huge_lora.safetensors", ["bad_huge_lora.safetensors", "txt_in", "overflows float32"]),
]

NODE_ERRORS = [
    ("nan_strength_apply", {"x": apply_lora(["c", 0], STYLE, float("nan"))}, ["bad_style.safetensors", "strength is nan"]),
    ("nan_strength_set_scale", {"x": set_lora_scale(["c", 0], CONTROL, float("nan"))}, ["bad_canny.safetensors", "strength is nan"]),
    ("set_scale_not_applied", {"x": set_lora_scale(["c", 0], STYLE, 0.5)}, ["bad_style.safetensors", "not applied",
                                                                             "bad_canny.safetensors"]),
    ("same_lora_twice", {"x": apply_lora(["c", 0], CONTROL, 0.5)}, ["bad_canny.safetensors", "already applied", "Set LoRA Scale"]),
    ("two_control_loras", {"x": apply_lora(["c", 0], DEPTH, 1.0)}, ["bad_depth.safetensors",
                                                                    "a Control LoRA (bad_canny.safetensors)",
                                                                    "already applied"]),
    ("stock_loader_after_control_lora", {"x": stock_lora(["c", 0], DEPTH, 1.0)},
     ["already has a Control LoRA", "use one per model"]),
    ("control_lora_after_stock_loader", {"s": stock_lora(["q", 0], CONTROL, 1.0), "x": apply_lora(["s", 0], DEPTH, 1.0)},
     ["bad_depth.safetensors", "already has a Control LoRA (applied by a LoRA loader node upstream)"]),
]

_PREQ_XFAIL: dict[str, str] = {}  # every damaged quant state now fails cleanly
MODEL_ERRORS = [pytest.param(*case, id=case[0]) for case in [
    ("pickle_model_ckpt", "evil.ckpt", ["evil.ckpt", "only .safetensors files are read"]),
    ("pickle_model_named_safetensors", "evil.safetensors", ["evil.safetensors", "not a readable safetensors file"]),
    ("truncated_model", "bad_truncated_model.safetensors", ["bad_truncated_model.safetensors", "not a readable safetensors",
                                                            "truncated or corrupted"]),
    ("corrupted_model", "bad_corrupted_model.safetensors", ["bad_corrupted_model.safetensors", "not a readable safetensors"]),
    ("sdxl_unet", "bad_sdxl_unet.safetensors", ["bad_sdxl_unet.safetensors", "not a FLUX diffusion model"]),
    ("lora_picked_as_model", "bad_lora_as_model.safetensors", ["bad_lora_as_model.safetensors", "not a FLUX diffusion model"]),
    ("incomplete_model", "bad_incomplete_model.safetensors", ["bad_incomplete_model.safetensors",
                                                              "single_blocks.0.linear2.weight", "missing"]),
    ("nan_absmax", "bad_nan_absmax.safetensors", ["bad_nan_absmax.safetensors", f"{QS}.absmax", "NaN or inf",
                                                  "download it again"]),
    ("string_blocksize", "bad_string_blocksize.safetensors", ["bad_string_blocksize.safetensors", "field blocksize",
                                                              "the string '64'; bitsandbytes writes a number"]),
    ("deep_quant_state", "bad_deep_quant_state.safetensors", ["bad_deep_quant_state.safetensors",
                                                              f"{QS}.quant_state.bitsandbytes__nf4",
                                                              "field (the whole state)", "not JSON text"]),
    ("index_escapes_its_folder", "bad_sharded/diffusion_pytorch_model-00001-of-00002.safetensors",
     ["diffusion_pytorch_model.safetensors.index.json", f"is mapped to '../{MODEL}'",
      "absolute paths, drive letters and '..' are refused"]),
    ("nan_weight", "bad_nan_weight_model.safetensors", ["bad_nan_weight_model.safetensors",
                                                        "double_blocks.0.img_mlp.0.weight holds NaN or inf", "download"]),
    ("inf_weight", "bad_inf_weight_model.safetensors", ["single_blocks.0.linear2.weight holds NaN or inf"]),
    ("nan_bias", "bad_nan_bias_model.safetensors", ["txt_in.bias holds NaN or inf"]),
    ("nan_norm_scale", "bad_nan_norm_model.safetensors", ["double_blocks.0.img_attn.norm.key_norm.scale", "NaN or inf"]),
    ("norm_scale_shape", "bad_norm_shape_model.safetensors", ["bad_norm_shape_model.safetensors",
                                                              "double_blocks.0.img_attn.norm.key_norm.scale",
                                                              "has shape [64]", "expects [128]"]),
]] + [pytest.param(f"prequantized_no_{s}", f"bad_prequantized_no_{s}.safetensors",
                  [f"bad_prequantized_no_{s}.safetensors", QS, "incomplete"],
                  marks=[pytest.mark.xfail(strict=True, reason=_PREQ_XFAIL[s])] if s in _PREQ_XFAIL else [],
                  id=f"prequantized_no_{s}")
     for s in ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")]


def run_case(host, files, reference, bad_nodes, model_ref, node_id, node_type, phrases):
    first = host.run(good_graph())
    for k in reference:
        assert torch.equal(first[k], reference[k]), k
    base = host.node_output("q")
    q_hash = quantized_hash(host, base)

    res = host.run(bad_graph(bad_nodes, model_ref), expect_error=True)
    assert "validation" not in res, f"rejected by ComfyUI's validator instead of the node: {res}"
    errors = res["errors"]
    assert len(errors) == 1, errors
    err = errors[0]
    assert (err["node_id"], err["node_type"]) == (node_id, node_type), err
    assert err["exception_type"].rsplit(".", 1)[-1] in OWN_ERRORS, (err["exception_type"], err["exception_message"])
    msg = err["exception_message"]
    for phrase in phrases:
        assert phrase in msg, f"{phrase!r} not in {msg!r}"
    assert not files["marker"].exists(), "a pickle file was unpickled"

    again = host.run(good_graph())
    cached = next(d["nodes"] for e, d in host.executor.status_messages if e == "execution_cached")
    # the cached loader and Control LoRA served the prompt; the samplers ran anew
    assert {"q", "c"} <= set(cached) and "a_ks" not in cached and "p_ks" not in cached, cached
    assert host.node_output("q") is base
    for k in reference:
        assert torch.equal(again[k], reference[k]), k
    assert quantized_hash(host, base) == q_hash


@pytest.mark.parametrize("case,lora_name,phrases", LORA_ERRORS, ids=[c[0] for c in LORA_ERRORS])
def test_bad_lora_file(host, files, reference, case, lora_name, phrases):
    run_case(host, files, reference, {"x": apply_lora(["c", 0], lora_name, 0.7)}, ["x", 0], "x", "ApplyControlLora", phrases)
    if case == "flooding_key_name":  # what reaches /history, the websocket and the log: one bounded line
        err = host.run(bad_graph({"x": apply_lora(["c", 0], lora_name, 0.7)}, ["x", 0]), expect_error=True)["errors"][0]
        msg = err["exception_message"].rstrip("\n")  # ComfyUI ends the message with a newline of its own
        assert len(msg) <= 2000 and "\n" not in msg and "\x1b" not in msg, len(msg)


@pytest.mark.parametrize("case,bad_nodes,phrases", NODE_ERRORS, ids=[c[0] for c in NODE_ERRORS])
def test_bad_node_input(host, files, reference, case, bad_nodes, phrases):
    node_type = bad_nodes["x"]["class_type"]
    run_case(host, files, reference, bad_nodes, ["x", 0], "x", node_type, phrases)


@pytest.mark.parametrize("case,model_name,phrases", MODEL_ERRORS)
def test_bad_model_file(host, files, reference, case, model_name, phrases):
    run_case(host, files, reference, {"x": loader(model_name)}, ["x", 0], "x", "LoadBnbFlux", phrases)


def test_pickle_payload_is_live(tmp_path):
    """The evil files' payload really runs code when unpickled, so the tests above could catch it."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Touch(marker)))  # noqa: S301 - the point of the test
    assert marker.exists()


def test_out_of_range_strength_is_refused_by_validator(host, files):
    """Out-of-range numbers never reach the node (ComfyUI's validator); NaN does (covered above)."""
    res = host.run(sampling_graph({"q": loader(), "x": apply_lora(["q", 0], CONTROL, 11.0)}, ["x", 0], key="x"),
                   expect_error=True)
    assert "validation" in res, res


LINKED_ERRORS = [
    ("huge_strength", "ApplyControlLora", "strength", 1e18, ["bad_style.safetensors", "strength is 1e+18",
                                                                           "between -10 and 10"]),
    ("strength_1000", "SetLoraScale", "strength", 1000, ["bad_canny.safetensors", "strength is 1000"]),
    ("strength_400_digits", "ApplyControlLora", "strength", 10 ** 400, ["strength is '1000000", "between -10 and 10"]),
    ("string_strength", "ApplyControlLora", "strength", "0.5", ["strength is str '0.5', not a number"]),
    ("bool_strength", "SetLoraScale", "strength", True, ["strength is bool 'True', not a number"]),
    ("integer_lora_name", "ApplyControlLora", "lora_name", 3, ["lora_name is int '3', not a file name"]),
    ("list_lora_name", "SetLoraScale", "lora_name", ["a"], ["lora_name is list", "not a file name"]),
]


@pytest.mark.parametrize("case,node_type,field,value,phrases", LINKED_ERRORS, ids=[c[0] for c in LINKED_ERRORS])
def test_a_linked_value_outside_the_schema_fails_the_node(host, files, reference, case, node_type, field, value, phrases):
    lora = STYLE if node_type == "ApplyControlLora" else CONTROL
    node = (apply_lora if node_type == "ApplyControlLora" else set_lora_scale)(["c", 0], lora, 0.5)
    node["inputs"][field] = ["v", 0]
    run_case(host, files, reference, {"v": linked_value(value), "x": node}, ["x", 0], "x", node_type, phrases)


def test_a_tensor_no_flux_layer_has_is_ignored_with_a_warning_as_stock_does(host, files, caplog):
    """ComfyUI's UNETLoader loads such a file and logs the keys it left unused; Load BnB Flux did the same
    work and then raised ``AttributeError: 'Flux' object has no attribute ...``."""
    with caplog.at_level("WARNING"):
        out = host.run(sampling_graph({"q": loader("extra_key_model.safetensors"), "r": loader(MODEL)}, ["q", 0],
                                      key="extra", prefix="a") | sampling_graph({}, ["r", 0], key="plain", prefix="b"))
    assert torch.equal(out["extra"], out["plain"])
    assert any("double_blocks.0.some_new_adapter.weight" in r.getMessage() and "ignored" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records][-5:]
