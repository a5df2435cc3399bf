"""Through a real ComfyUI server (loopback, CPU): what the frontend extension receives from the pack's
nodes (their ``ui`` output, as stored in ``/history`` and sent over the websocket), and the
command-line client ``python -m quant_expand.cli run`` following a workflow over the websocket."""
from __future__ import annotations

import json
import os
import re
import time

import pytest
import torch

from prequantized_files import forge_state_dict
from quant_expand.testing.prompts import apply_lora, ksampler, load_bnb_flux, lora_stack, node, save_bnb_flux, set_lora_scale
from quant_expand.testing.synthetic import TinyFluxConfig, make_control_lora, make_lora, make_tiny_flux, save_safetensors
from server_host import control_style_graph, running_server

CFG = TinyFluxConfig()
MODEL = "tiny_exact_nf4.safetensors"
NF4_FILE, INT8_FILE = "tiny_forge_nf4_dq.safetensors", "tiny_forge_int8.safetensors"
DAMAGED = "tiny_damaged.safetensors"
CONTROL = "tiny_canny_lora.safetensors"
STYLE = "tiny_style_lora.safetensors"


def write_files(dirs):
    models = dirs["models/diffusion_models"]
    sd = make_tiny_flux(CFG, seed=0, exact_for="nf4")
    save_safetensors(sd, os.path.join(models, MODEL))
    save_safetensors(forge_state_dict(sd, "nf4", True, all_in_one=False), os.path.join(models, NF4_FILE))
    save_safetensors(forge_state_dict(sd, "int8", False, all_in_one=False), os.path.join(models, INT8_FILE))
    with open(os.path.join(models, DAMAGED), "wb") as f:
        f.write(b"\xff" * 64)
    save_safetensors(make_control_lora(CFG, seed=2), os.path.join(dirs["models/loras"], CONTROL))
    save_safetensors(make_lora(CFG, kind="lora", seed=11), os.path.join(dirs["models/loras"], STYLE))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory, "comfy-ui", write_files) as srv:
        yield srv


def graph(control_strength=1.0, steps=2):
    return control_style_graph(CFG, MODEL, CONTROL, STYLE, control_strength=control_strength, steps=steps,
                               prefix="latents/cli")


def test_ui_outputs_reach_history(server):
    entry = server.run_prompt(graph())
    assert entry["status"]["status_str"] == "success", entry["status"]
    outputs = entry["outputs"]
    (badge,) = outputs["1"]["bnb_flux"]
    assert badge["quant"].startswith("nf4") and badge["file"] == MODEL
    assert 0 < badge["quantized_layers"] < badge["linear_layers"] and badge["size_bytes"] > 0
    (control,) = outputs["2"]["bnb_flux_lora"]
    assert control["kind"] == "control" and control["widened"] == {"img_in": 2 * CFG.in_channels * 4}  # 2x2 patches
    assert control["layers"] > 0 and control["rank"] > 0 and control["strength"] == 1.0
    assert control["description"].startswith(CONTROL) and control["warnings"] == []
    (style,) = outputs["3"]["bnb_flux_lora"]
    assert style["kind"] == "style" and style["widened"] == {} and style["strength"] == 0.6
    print(f"ui: {badge['quant']}, {badge['quantized_layers']}/{badge['linear_layers']}; {control['description']}")


def test_cli_run_follows_websocket_and_saves_outputs(server, tmp_path, capsys):
    from safetensors.torch import load_file

    from quant_expand.cli import main

    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(graph(control_strength=0.85, steps=3)))
    out = tmp_path / "out"
    t0 = time.monotonic()
    rc = main(["run", str(wf), "--server", server.url, "--output-dir", str(out), "--timeout", "120"])
    text = capsys.readouterr().out
    print(text, f"({time.monotonic() - t0:.1f} s)")
    assert rc == 0, text
    assert "queued " in text and "running 7 KSampler" in text, text
    assert re.search(r"^  7 KSampler: [123]/3$", text, re.M), text  # the sampler's steps as they come
    (saved,) = [p for p in out.rglob("*.latent")]
    assert saved.parent.name == "latents"
    on_server = os.path.join(server.dirs["output"], "latents", saved.name)
    assert torch.equal(load_file(str(saved))["latent_tensor"], load_file(on_server)["latent_tensor"])


def test_cli_run_reports_refused_and_failed_workflows(server, tmp_path, capsys):
    from quant_expand.cli import main

    bad = graph()
    bad["1"]["inputs"]["quant_type"] = "nf5"
    wf = tmp_path / "bad.json"
    wf.write_text(json.dumps({"prompt": bad}))
    assert main(["run", str(wf), "--server", server.url, "--output-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "node 1 LoadBnbFlux" in err and "quant_type" in err, err

    failing = graph()
    failing["2"]["inputs"]["strength"] = float("nan")  # passes the validator, refused by the node
    wf.write_text(json.dumps(failing))  # Python writes NaN, which the server parses
    assert main(["run", str(wf), "--server", server.url, "--output-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "2 ApplyControlLora failed" in err and "strength" in err, err

    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": []}))
    assert main(["run", str(ui), "--server", server.url]) == 1
    assert "Export (API)" in capsys.readouterr().err


def errors_of(entry) -> list[dict]:
    return [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]


def test_set_lora_scale_and_the_stack_report_what_they_did(server):
    cond = {"tokens": 8, "context_dim": CFG.context_in_dim, "pooled_dim": CFG.vec_in_dim, "guidance": 3.5}
    g = {"1": load_bnb_flux(MODEL),
         "2": lora_stack(["1", 0], (CONTROL, 1.0), ("None", 1.0), (STYLE, 0.6, False)),
         "3": apply_lora(["2", 0], STYLE, 0.6),
         "4": set_lora_scale(["3", 0], CONTROL, 0.85),
         "5": node("BnbFluxServerTestConditioning", **cond, seed=1),
         "6": node("BnbFluxServerTestLatent", seed=0, size=16, scale=0.0),
         "7": ksampler(["4", 0], ["5", 0], ["5", 0], ["6", 0], seed=3, steps=1),
         "8": node("SaveLatent", samples=["7", 0], filename_prefix="latents/scale")}
    entry = server.run_prompt(g)
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    out = entry["outputs"]
    # the node that applied the LoRA is named, so the editor can mark its strength as changed downstream
    assert out["4"]["bnb_flux_scale"] == [{"name": CONTROL, "kind": "control", "from": 1.0, "to": 0.85,
                                           "applied_by": "2"}]
    stack = out["2"]["bnb_flux_stack"]
    assert [(s["slot"], s["state"], s["name"] if s["state"] == "off" else s["description"].split(":")[0])
            for s in stack] == [(1, "applied", CONTROL), (3, "off", STYLE)], stack


def test_save_reports_its_path_and_size(server):
    entry = server.run_prompt({"1": load_bnb_flux(MODEL), "2": save_bnb_flux(["1", 0], "diffusion_models/ui_saved")})
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    (saved,) = entry["outputs"]["2"]["bnb_flux_saved"]
    assert saved["path"] == "diffusion_models/ui_saved_00001_.safetensors", saved
    on_disk = os.path.join(server.dirs["output"], *saved["path"].split("/"))
    assert saved["size_bytes"] == os.path.getsize(on_disk) > 0
    assert saved["quant_type"] == "nf4" and 0 < saved["quantized_layers"] < saved["linear_layers"]


def test_model_info_says_how_a_file_is_stored(server):
    def info(name):
        from urllib.parse import quote

        status, body = server.get("/bnb_flux/model_info" + ("" if name is None else f"?name={quote(name)}"))
        return status, json.loads(body)

    assert info(MODEL) == (200, {"name": MODEL, "prequantized": False, "quant_type": None, "double_quant": None,
                                 "scheme": "not pre-quantized"})
    assert info(NF4_FILE) == (200, {"name": NF4_FILE, "prequantized": True, "quant_type": "nf4", "double_quant": True,
                                    "scheme": "nf4, double quant"})
    assert info(INT8_FILE)[1]["quant_type"] == "int8" and info(INT8_FILE)[1]["double_quant"] is None
    # only names of the node's own list are read: no path from the request reaches the disk
    for name in ("../models/diffusion_models/" + MODEL, os.path.join(server.dirs["models/diffusion_models"], MODEL),
                 STYLE, "no_such.safetensors"):
        status, body = info(name)
        assert status == 404 and "not a file of models/diffusion_models" in body["error"], (name, status, body)
    status, body = info(None)
    assert status == 400 and "name=" in body["error"]
    status, body = info(DAMAGED)
    assert status == 422 and body["error"].startswith("BnbFluxError: "), body
    assert DAMAGED in body["error"] and server.base not in body["error"], body


@pytest.mark.parametrize("quant,dq,says", [
    ("int8", True, "quant_type int8 not used: this file is pre-quantized nf4, double quant"),
    ("nf4", False, "double_quant off not used: this file is pre-quantized nf4, double quant"),
    ("nf4", True, None),
])
def test_loader_says_which_of_its_inputs_a_prequantized_file_overrides(server, quant, dq, says):
    entry = server.run_prompt({"1": load_bnb_flux(NF4_FILE, quant, dq),
                               "2": save_bnb_flux(["1", 0], f"diffusion_models/override_{quant}_{dq}")})
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    (badge,) = entry["outputs"]["1"]["bnb_flux"]
    assert badge["prequantized"] and badge["file_quantization"] == "nf4, double quant"
    assert badge["unused_inputs"] == ([says] if says else []), badge
    (text,) = entry["outputs"]["1"]["text"]
    assert (says in text) if says else ("not used: this file" not in text), text


def test_a_failed_node_shows_a_readable_exception_type(server):
    """ComfyUI builds the type from the class's module: the pack's errors read bnb_flux.<class>, not the
    folder path the pack was loaded from."""
    g = {"1": load_bnb_flux(MODEL), "2": set_lora_scale(["1", 0], STYLE, 0.5),
         "3": save_bnb_flux(["2", 0], "diffusion_models/never")}
    entry = server.run_prompt(g)
    (err,) = errors_of(entry)
    assert err["exception_type"] == "bnb_flux.BnbFluxError", err["exception_type"]
    assert err["exception_message"].startswith(f"{STYLE}: not applied to this model: no LoRA is applied upstream")
    history = server.get_json("/history")  # every prompt so far, as the editor's queue panel reads it
    types = [m[1]["exception_type"] for h in history.values() for m in h["status"]["messages"] if m[0] == "execution_error"]
    assert types and all("/" not in t and "\\" not in t for t in types), types


def test_every_input_has_a_tooltip_and_a_category(server):
    info = server.get_json("/object_info")
    pack = {k: v for k, v in info.items() if v.get("python_module", "").endswith("comfyui-bnb-flux")}
    assert set(pack) == {"LoadBnbFlux", "ApplyControlLora", "ApplyLoraStack", "SetLoraScale", "SaveBnbFlux"}
    # beside core's loaders and model savers (tests/test_node_words.py checks which node goes where)
    assert {v["category"] for v in pack.values()} == {"model/loaders/bnb flux", "model/merging"}
    for node_id, v in pack.items():
        assert v["description"], node_id
        for section in ("required", "optional"):
            for name, spec in v["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_lora_summary_warns_when_part_of_a_file_does_not_apply(host):
    """What the badge warns about (in-process: the pack's own classes, no server)."""
    formats = host.pack_module("quant_expand.lora.canonical")
    summary = host.pack_module("nodes.apply_control_lora").lora_summary
    te_only = formats.ParsedLora(name="te.safetensors", source_format="kohya", layers=[], norm_sets={}, widened={},
                                 text_encoder_keys=["lora_te1_text_model.encoder.layers.0.mlp.fc1.lora_down.weight"])
    s = summary(te_only, 1.0)
    assert s["kind"] == "style" and s["layers"] == 0 and s["rank"] == 0
    assert len(s["warnings"]) == 2 and "text-encoder" in s["warnings"][0] and "nothing" in s["warnings"][1]


def test_text_encoder_advice_names_a_core_node_that_applies_those_keys(host):
    """The warning sends the user to ComfyUI's LoraLoader: its key map for FLUX's text encoders (CLIP-L and
    T5-XXL as DualCLIPLoader builds them, here on the meta device: no weights) takes every text-encoder key
    of the usual trainers that the pack leaves out, kohya CLIP-L and T5, diffusers CLIP-L."""
    import comfy.lora
    import comfy.ops
    import comfy.text_encoders.flux

    parse_lora = host.pack_module("quant_expand.lora.parse").parse_lora
    summary = host.pack_module("nodes.apply_control_lora").lora_summary
    g = torch.Generator().manual_seed(0)
    te = {}
    for module, width, out in (("lora_te1_text_model_encoder_layers_0_mlp_fc1", 768, 3072),
                               ("lora_te_text_model_encoder_layers_1_self_attn_q_proj", 768, 768),
                               ("lora_te2_encoder_block_0_layer_0_SelfAttention_q", 4096, 4096)):
        te[f"{module}.lora_down.weight"] = torch.randn(4, width, generator=g)
        te[f"{module}.lora_up.weight"] = torch.randn(out, 4, generator=g)
        te[f"{module}.alpha"] = torch.tensor(4.0)
    module = "text_encoder.text_model.encoder.layers.2.self_attn.k_proj"
    te[f"{module}.lora_A.weight"] = torch.randn(4, 768, generator=g)
    te[f"{module}.lora_B.weight"] = torch.randn(768, 4, generator=g)
    style = make_lora(CFG, kind="kohya", seed=3)
    shapes = {k[: -len(".weight")]: tuple(v.shape) for k, v in make_tiny_flux(CFG, seed=0).items()
              if k.endswith(".weight") and v.ndim == 2}
    parsed = parse_lora({**style, **te}, "style_with_te.safetensors", shapes)
    assert sorted(parsed.text_encoder_keys) == sorted(te)
    (warning,) = summary(parsed, 1.0)["warnings"]
    assert host.nodes.NODE_DISPLAY_NAME_MAPPINGS["LoraLoader"] in warning and "CLIP output" in warning, warning

    with torch.device("meta"):
        clip = comfy.text_encoders.flux.FluxClipModel(
            device="meta", dtype=torch.float16, model_options={"custom_operations": comfy.ops.disable_weight_init})
    loaded = comfy.lora.load_lora(te, comfy.lora.model_lora_keys_clip(clip, {}))
    assert sorted(loaded) == sorted([
        "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
        "clip_l.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
        "clip_l.transformer.text_model.encoder.layers.2.self_attn.k_proj.weight",
        "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"]), sorted(loaded)
