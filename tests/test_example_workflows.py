"""The example workflows in ``example_workflows/``.

Without ComfyUI: every editor (UI-format) workflow has an API-format twin in ``example_workflows/api/``;
both parse; the UI links are consistent (each link id sits in exactly its from-node's ``outputs[].links``
and its to-node's ``inputs[].link``, types agree); the API prompt is the same graph (same node ids and
types, same connections) with the same widget values, matched by name in each node's input order
(``WIDGETS`` below; UI-only values such as ``control_after_generate`` are skipped). The text-to-image
workflows have the nodes, links and settings of ComfyUI's own templates for their models (from the
installed comfyui-workflow-templates packages).

With ComfyUI (``host``): every node type exists, ``WIDGETS`` and the UI sockets match ComfyUI's own node
definitions, and each API prompt passes ``execution.validate_prompt`` with empty placeholder files under
the referenced names. Real weights are not available here: only the text-to-image workflows' sampling
nodes run, on a small model of their family's layout with test conditioning in place of the text encoder
(ComfyUI's are fixed at full size).
"""
from __future__ import annotations

import asyncio
import glob
import json
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO_ROOT, "example_workflows")
UI_FILES = sorted(glob.glob(os.path.join(EXAMPLES, "*.json")))
# file names are the template browser's titles (ComfyUI's frontend shows a custom node pack's template by
# its file name, and its thumbnail is <name>.jpg beside it)
NF4_CHECKPOINT = "Canny Control - NF4 checkpoint.json"
CANNY = "Canny Control - quantize on load.json"
DEPTH = "Depth Control - quantize on load.json"
STYLE = "Style LoRA + Canny Control.json"
KLEIN = "FLUX.2 klein 4B - text to image.json"
CHROMA = "Chroma - text to image.json"
TEXT_TO_IMAGE = {KLEIN, CHROMA}  # no input image

# nodes that live only in the editor: never sent to the server, absent from the API format
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
NOTES = {"Note", "MarkdownNote"}
# widget values the editor saves that are not node inputs
CONTROL, UPLOAD = "control_after_generate", "upload"
UI_ONLY = {CONTROL, UPLOAD}
# each node's widgets in ComfyUI's input order (required, then optional), as the editor lays out
# ``widgets_values``; checked against ComfyUI's INPUT_TYPES in test_widget_table_matches_comfyui
WIDGETS = {
    "LoadBnbFlux": ["unet_name", "quant_type", "double_quant", "compute_dtype", "quantize_img_in"],
    "ApplyControlLora": ["lora_name", "strength"],
    "SetLoraScale": ["lora_name", "strength"],
    "DualCLIPLoader": ["clip_name1", "clip_name2", "type", "device"],
    "CLIPTextEncode": ["text"],
    "FluxGuidance": ["guidance"],
    "VAELoader": ["vae_name"],
    "LoadImage": ["image", UPLOAD],
    "Canny": ["low_threshold", "high_threshold"],
    "InstructPixToPixConditioning": [],
    "KSampler": ["seed", CONTROL, "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "VAEDecode": [],
    "SaveImage": ["filename_prefix"],
    "CLIPLoader": ["clip_name", "type", "device"],
    "CFGGuider": ["cfg"],
    "RandomNoise": ["noise_seed", CONTROL],
    "KSamplerSelect": ["sampler_name"],
    "Flux2Scheduler": ["steps", "width", "height"],
    "BasicScheduler": ["scheduler", "steps", "denoise"],
    "EmptyFlux2LatentImage": ["width", "height", "batch_size"],
    "EmptySD3LatentImage": ["width", "height", "batch_size"],
    "SamplerCustomAdvanced": [],
    "ModelSamplingAuraFlow": ["shift"],
    "T5TokenizerOptions": ["min_padding", "min_length"],
}
# API inputs that name files: (class_type, input) -> ComfyUI model folder ("input": the input directory)
FILE_INPUTS = {
    ("LoadBnbFlux", "unet_name"): "diffusion_models",
    ("ApplyControlLora", "lora_name"): "loras",
    ("SetLoraScale", "lora_name"): "loras",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
    ("LoadImage", "image"): "input",
}
TITLE_BAR = 30  # LiteGraph draws a node's title above its pos


def api_path(ui_file):
    return os.path.join(EXAMPLES, "api", os.path.basename(ui_file))


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def backend_nodes(ui):
    return [n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY]


@pytest.fixture(params=[os.path.basename(p) for p in UI_FILES])
def pair(request):
    ui_file = os.path.join(EXAMPLES, request.param)
    return load(ui_file), load(api_path(ui_file))


# ---------------------------------------------------------------------------------------------------
# without ComfyUI


def test_examples_exist_in_both_formats():
    assert {NF4_CHECKPOINT, CANNY, DEPTH, STYLE, KLEIN, CHROMA} == {os.path.basename(p) for p in UI_FILES}
    for ui_file in UI_FILES:
        assert os.path.isfile(api_path(ui_file)), f"{os.path.basename(ui_file)} has no API-format twin in api/"
    for api_file in glob.glob(os.path.join(EXAMPLES, "api", "*.json")):
        assert os.path.isfile(os.path.join(EXAMPLES, os.path.basename(api_file))), f"{api_file}: no UI workflow"


def test_ui_format(pair):
    ui, _ = pair
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        assert key in ui, key
    assert ui["version"] == 0.4
    ids = [n["id"] for n in ui["nodes"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    assert ui["last_node_id"] >= max(ids)
    link_ids = [link[0] for link in ui["links"]]
    assert len(link_ids) == len(set(link_ids))
    assert ui["last_link_id"] >= max(link_ids)
    for n in ui["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                    "widgets_values"):
            assert key in n, (n["id"], key)
        assert n["mode"] == 0, f"node {n['id']} is muted or bypassed"
        assert len(n["pos"]) == 2 and len(n["size"]) == 2
        for slot in n["inputs"]:
            assert {"name", "type", "link"} <= set(slot), (n["id"], slot)
        for k, slot in enumerate(n["outputs"]):
            assert {"name", "type", "links"} <= set(slot), (n["id"], slot)
            assert slot.get("slot_index", k) == k
        if n["type"] not in FRONTEND_ONLY:
            assert n["properties"].get("Node name for S&R") == n["type"]


def test_ui_links_are_consistent(pair):
    ui, _ = pair
    nodes = {n["id"]: n for n in ui["nodes"]}
    # every place a link id is mentioned by a node
    seen = {}
    for n in ui["nodes"]:
        for k, slot in enumerate(n["outputs"]):
            for lid in slot["links"] or []:
                seen.setdefault(lid, []).append(("out", n["id"], k))
        for k, slot in enumerate(n["inputs"]):
            if slot["link"] is not None:
                seen.setdefault(slot["link"], []).append(("in", n["id"], k))
    links = {link[0]: link for link in ui["links"]}
    assert set(seen) == set(links), "nodes mention links that do not exist, or links no node mentions"
    for lid, (_, src, src_slot, dst, dst_slot, typ) in links.items():
        assert sorted(seen[lid]) == sorted([("out", src, src_slot), ("in", dst, dst_slot)]), (lid, seen[lid])
        assert nodes[src]["outputs"][src_slot]["type"] == typ, lid
        assert nodes[dst]["inputs"][dst_slot]["type"] == typ, lid
    for n in backend_nodes(ui):  # a node's sockets are all connected (the examples leave nothing dangling)
        for slot in n["inputs"]:
            assert slot["link"] is not None, (n["id"], slot["name"])


def test_ui_execution_order(pair):
    ui, _ = pair
    order = {n["id"]: n["order"] for n in ui["nodes"]}
    assert sorted(order.values()) == list(range(len(order)))
    for lid, src, _, dst, _, _ in ui["links"]:
        assert order[src] < order[dst], f"link {lid}: node {src} runs after node {dst}"


def test_ui_layout_is_tidy(pair):
    """Data flows left to right and no two nodes (title bars included) overlap."""
    ui, _ = pair
    nodes = {n["id"]: n for n in ui["nodes"]}
    for lid, src, _, dst, _, _ in ui["links"]:
        right_edge = nodes[src]["pos"][0] + nodes[src]["size"][0]
        assert right_edge < nodes[dst]["pos"][0], f"link {lid} runs right to left ({src} -> {dst})"

    def box(n):
        (x, y), (w, h) = n["pos"], n["size"]
        return x, y - TITLE_BAR, x + w, y + h

    boxes = [(n["id"], box(n)) for n in ui["nodes"]]
    for i, (a, (ax0, ay0, ax1, ay1)) in enumerate(boxes):
        for b, (bx0, by0, bx1, by1) in boxes[i + 1:]:
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"nodes {a} and {b} overlap"


def test_widget_table_covers_every_node(pair):
    ui, api = pair
    types = {n["type"] for n in backend_nodes(ui)} | {v["class_type"] for v in api.values()}
    assert types <= set(WIDGETS), f"add {sorted(types - set(WIDGETS))} to WIDGETS"


def test_api_is_the_same_graph(pair):
    ui, api = pair
    nodes = {str(n["id"]): n for n in backend_nodes(ui)}
    assert set(api) == set(nodes), "API node ids differ from the UI's (Notes excluded)"
    incoming = {}  # (to node, input name) -> [from node, from slot]
    for _, src, src_slot, dst, dst_slot, _ in ui["links"]:
        if str(dst) in nodes:
            incoming[(str(dst), nodes[str(dst)]["inputs"][dst_slot]["name"])] = [str(src), src_slot]
    for nid, entry in api.items():
        assert set(entry) >= {"class_type", "inputs"}
        assert entry["class_type"] == nodes[nid]["type"], nid
        assert isinstance(entry.get("_meta", {}).get("title"), str) and entry["_meta"]["title"], nid
        if "title" in nodes[nid]:
            assert entry["_meta"]["title"] == nodes[nid]["title"], nid
        api_links = {(nid, k): v for k, v in entry["inputs"].items() if isinstance(v, list)}
        ui_links = {key: v for key, v in incoming.items() if key[0] == nid}
        assert api_links == ui_links, f"node {nid}: connections differ"


def test_api_widget_values_equal_ui(pair):
    ui, api = pair
    for n in backend_nodes(ui):
        names = WIDGETS[n["type"]]
        values = n["widgets_values"]
        assert len(values) == len(names), f"node {n['id']} ({n['type']}): widgets_values {values} vs {names}"
        expected = {name: v for name, v in zip(names, values) if name not in UI_ONLY}
        inputs = api[str(n["id"])]["inputs"]
        widgets = {k: v for k, v in inputs.items() if not isinstance(v, list)}
        assert widgets == expected, f"node {n['id']} ({n['type']})"
        for name, v in zip(names, values):
            if name == CONTROL:
                assert v in ("fixed", "increment", "decrement", "randomize"), n["id"]
            elif name == UPLOAD:
                assert v == "image", n["id"]
        # both in the node's input order
        assert [k for k in inputs if k in expected] == [k for k in names if k in expected], n["id"]


@pytest.mark.parametrize("name, unet, folder", [
    (NF4_CHECKPOINT, "flux1-dev-bnb-nf4-v2.safetensors", "checkpoints"),
    (CANNY, "flux1-dev.safetensors", "diffusion_models")])
def test_canny_workflow_settings(name, unet, folder):
    ui = load(os.path.join(EXAMPLES, name))
    api = load(os.path.join(EXAMPLES, "api", name))
    by_type = {}
    for entry in api.values():
        by_type.setdefault(entry["class_type"], []).append(entry["inputs"])
    one = {t: v[0] for t, v in by_type.items()}
    assert one["LoadBnbFlux"] == {"unet_name": unet, "quant_type": "nf4", "double_quant": True,
                                  "compute_dtype": "auto", "quantize_img_in": False}
    lora = one["ApplyControlLora"]
    assert (lora["lora_name"], lora["strength"]) == ("flux1-canny-dev-lora.safetensors", 0.85)
    assert api[lora["model"][0]]["class_type"] == "LoadBnbFlux"
    ks = one["KSampler"]
    assert (ks["cfg"], ks["steps"], ks["sampler_name"], ks["denoise"]) == (1.0, 20, "euler", 1.0)
    assert ks["scheduler"] in ("simple", "beta")
    assert api[ks["model"][0]]["class_type"] == "ApplyControlLora"
    ip2p_id = ks["positive"][0]
    assert api[ip2p_id]["class_type"] == "InstructPixToPixConditioning"
    assert [ks["positive"], ks["negative"], ks["latent_image"]] == [[ip2p_id, 0], [ip2p_id, 1], [ip2p_id, 2]]
    ip2p = api[ip2p_id]["inputs"]
    guidance = api[ip2p["positive"][0]]
    assert guidance["class_type"] == "FluxGuidance" and guidance["inputs"]["guidance"] == 30.0
    positive, negative = api[guidance["inputs"]["conditioning"][0]], api[ip2p["negative"][0]]
    assert positive["class_type"] == negative["class_type"] == "CLIPTextEncode"
    assert positive["inputs"]["text"].strip() and negative["inputs"]["text"] == ""
    canny = api[ip2p["pixels"][0]]
    assert canny["class_type"] == "Canny"
    assert (canny["inputs"]["low_threshold"], canny["inputs"]["high_threshold"]) == (0.15, 0.3)
    image = api[canny["inputs"]["image"][0]]
    assert image["class_type"] == "LoadImage" and image["inputs"]["image"] == "bnb_flux_canny_example.png"
    assert api[ip2p["vae"][0]]["inputs"] == {"vae_name": "ae.safetensors"}
    clip = api[positive["inputs"]["clip"][0]]["inputs"]
    assert (clip["clip_name1"], clip["clip_name2"], clip["type"]) == (
        "clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "flux")
    decode = [e for e in api.values() if e["class_type"] == "VAEDecode"][0]["inputs"]
    assert decode["samples"][0] == [k for k, e in api.items() if e["class_type"] == "KSampler"][0]
    assert [e for e in api.values() if e["class_type"] == "SaveImage"][0]["inputs"]["images"][0] == \
        [k for k, e in api.items() if e["class_type"] == "VAEDecode"][0]
    text = note_text(ui)
    for needed in (folder, unet, "loras", "text_encoders", "vae", "0.85", "bnb_flux_canny_example.png", "VRAM"):
        assert needed in text, needed


def api_by_type(api):
    by_type = {}
    for nid, entry in api.items():
        by_type.setdefault(entry["class_type"], []).append(nid)
    return by_type


def model_chain(api):
    """[(class_type, inputs)] from the KSampler's model back to the loader."""
    ks = api[api_by_type(api)["KSampler"][0]]["inputs"]
    chain, ref = [], ks["model"]
    while ref is not None:
        entry = api[ref[0]]
        chain.append((entry["class_type"], entry["inputs"]))
        ref = entry["inputs"].get("model")
    return chain[::-1]


def note_text(ui):
    """The text of the workflow's notes, which are on the canvas beside the graph."""
    notes = [n for n in ui["nodes"] if n["type"] in NOTES]
    assert notes, "the workflow explains itself in a Note"
    return "\n\n".join(n["widgets_values"][0] for n in notes)


def test_depth_workflow_settings():
    ui, api = load(os.path.join(EXAMPLES, DEPTH)), load(os.path.join(EXAMPLES, "api", DEPTH))
    types = api_by_type(api)
    assert "Canny" not in types  # the depth map is given as an image: ComfyUI has no depth estimator
    assert [t for t, _ in model_chain(api)] == ["LoadBnbFlux", "ApplyControlLora"]
    lora = model_chain(api)[1][1]
    assert (lora["lora_name"], lora["strength"]) == ("flux1-depth-dev-lora.safetensors", 0.85)
    ip2p = api[types["InstructPixToPixConditioning"][0]]["inputs"]
    assert api[ip2p["pixels"][0]]["class_type"] == "LoadImage"
    assert api[ip2p["pixels"][0]]["inputs"]["image"] == "bnb_flux_depth_example.png"
    guidance = api[ip2p["positive"][0]]
    assert guidance["class_type"] == "FluxGuidance" and guidance["inputs"]["guidance"] == 10.0
    ks = api[types["KSampler"][0]]["inputs"]
    assert (ks["cfg"], ks["latent_image"]) == (1.0, [types["InstructPixToPixConditioning"][0], 2])
    for needed in ("flux1-depth-dev-lora.safetensors", "bnb_flux_depth_example.png", "0.85", "Guidance 10"):
        assert needed in note_text(ui), needed


def test_control_and_style_workflow_settings():
    """Read as a first example: the Control LoRA at its working strength, the style LoRA in a node titled
    for it, and Set LoRA Scale on the style LoRA with a note saying why it is there."""
    ui, api = load(os.path.join(EXAMPLES, STYLE)), load(os.path.join(EXAMPLES, "api", STYLE))
    chain = model_chain(api)
    assert [t for t, _ in chain] == ["LoadBnbFlux", "ApplyControlLora", "ApplyControlLora", "SetLoraScale"]
    (_, control), (_, style), (_, scale) = chain[1:]
    assert (control["lora_name"], control["strength"]) == ("flux1-canny-dev-lora.safetensors", 0.85)
    assert (style["lora_name"], style["strength"]) == ("flux_style_lora.safetensors", 1.0)
    assert (scale["lora_name"], scale["strength"]) == (style["lora_name"], 0.8)
    titles = {entry["class_type"] + ":" + entry["inputs"]["lora_name"]: entry["_meta"]["title"]
              for entry in api.values() if "lora_name" in entry["inputs"]}
    assert titles == {"ApplyControlLora:flux1-canny-dev-lora.safetensors": "Apply Control LoRA",
                      "ApplyControlLora:flux_style_lora.safetensors": "Apply Style LoRA",
                      "SetLoraScale:flux_style_lora.safetensors": "Set Style LoRA Strength"}
    types = api_by_type(api)
    ip2p = api[types["InstructPixToPixConditioning"][0]]["inputs"]
    assert api[ip2p["pixels"][0]]["class_type"] == "Canny"
    text = note_text(ui)
    for needed in ("Why Set LoRA Scale", "Set Style LoRA Strength", "flux_style_lora.safetensors", "0.85", "0.8"):
        assert needed in text, needed


def only(api, class_type):
    """The inputs of the workflow's one node of this type."""
    (nid,) = api_by_type(api)[class_type]
    return api[nid]["inputs"]


def source(api, ref):
    """(class_type, inputs) of the node a link comes from."""
    return api[ref[0]]["class_type"], api[ref[0]]["inputs"]


def test_klein_workflow_settings():
    """ComfyUI's FLUX.2 [klein] 4B graph (Qwen3-4B through Load CLIP type flux2, the FLUX.2 VAE, CFG Guider 5,
    Flux2Scheduler 20 steps at the image size) on Load BnB Flux, NF4 quantized on load."""
    ui, api = load(os.path.join(EXAMPLES, KLEIN)), load(api_path(KLEIN))
    assert only(api, "LoadBnbFlux") == {"unet_name": "flux-2-klein-base-4b.safetensors", "quant_type": "nf4",
                                        "double_quant": True, "compute_dtype": "auto", "quantize_img_in": False}
    sampler = only(api, "SamplerCustomAdvanced")
    guider_type, guider = source(api, sampler["guider"])
    assert guider_type == "CFGGuider" and guider["cfg"] == 5.0
    assert source(api, guider["model"])[0] == "LoadBnbFlux"
    (pos_type, positive), (neg_type, negative) = source(api, guider["positive"]), source(api, guider["negative"])
    assert pos_type == neg_type == "CLIPTextEncode"
    assert positive["text"].strip() and negative["text"] == ""
    assert positive["clip"] == negative["clip"]
    assert source(api, positive["clip"]) == ("CLIPLoader", {"clip_name": "qwen_3_4b.safetensors", "type": "flux2",
                                                            "device": "default"})
    assert source(api, sampler["sampler"]) == ("KSamplerSelect", {"sampler_name": "euler"})
    assert source(api, sampler["noise"])[0] == "RandomNoise"
    # the scheduler's shift follows the image size: both nodes get the same one
    assert source(api, sampler["sigmas"]) == ("Flux2Scheduler", {"steps": 20, "width": 1024, "height": 1024})
    assert source(api, sampler["latent_image"]) == ("EmptyFlux2LatentImage",
                                                    {"width": 1024, "height": 1024, "batch_size": 1})
    decode = only(api, "VAEDecode")
    assert decode["samples"] == [api_by_type(api)["SamplerCustomAdvanced"][0], 0]
    assert source(api, decode["vae"]) == ("VAELoader", {"vae_name": "flux2-vae.safetensors"})
    assert only(api, "SaveImage")["images"] == [api_by_type(api)["VAEDecode"][0], 0]
    text = note_text(ui)
    for needed in ("flux-2-klein-base-4b.safetensors", "qwen_3_4b.safetensors", "flux2-vae.safetensors", "flux2",
                   "VRAM", "computed, not measured", "flux-2-klein-4b.safetensors", "4 steps", "change both"):
        assert needed in text, needed


def test_chroma_workflow_settings():
    """ComfyUI's Chroma graph (T5-XXL alone through Load CLIP type chroma, Flow Shift 1, CFG Guider 3.5 with a
    negative prompt, BasicScheduler beta 26 steps, the FLUX.1 VAE) on Load BnB Flux, NF4 quantized on load."""
    ui, api = load(os.path.join(EXAMPLES, CHROMA)), load(api_path(CHROMA))
    assert only(api, "LoadBnbFlux") == {"unet_name": "Chroma1-HD.safetensors", "quant_type": "nf4",
                                        "double_quant": True, "compute_dtype": "auto", "quantize_img_in": False}
    sampler = only(api, "SamplerCustomAdvanced")
    guider_type, guider = source(api, sampler["guider"])
    assert guider_type == "CFGGuider" and guider["cfg"] == 3.5
    shift_type, shift = source(api, guider["model"])
    assert shift_type == "ModelSamplingAuraFlow" and shift["shift"] == 1.0
    assert source(api, shift["model"])[0] == "LoadBnbFlux"
    sched_type, sched = source(api, sampler["sigmas"])
    assert sched_type == "BasicScheduler" and sched["model"] == guider["model"]
    assert (sched["scheduler"], sched["steps"], sched["denoise"]) == ("beta", 26, 1.0)
    (pos_type, positive), (neg_type, negative) = source(api, guider["positive"]), source(api, guider["negative"])
    assert pos_type == neg_type == "CLIPTextEncode"
    assert positive["text"].strip() and negative["text"].strip()  # Chroma is not guidance-distilled: cfg 3.5 uses it
    assert positive["clip"] == negative["clip"]
    tok_type, tok = source(api, positive["clip"])
    assert tok_type == "T5TokenizerOptions"
    assert source(api, tok["clip"]) == ("CLIPLoader", {"clip_name": "t5xxl_fp8_e4m3fn_scaled.safetensors",
                                                       "type": "chroma", "device": "default"})
    assert "DualCLIPLoader" not in api_by_type(api)  # T5 only: Chroma has no CLIP-L input
    assert source(api, sampler["sampler"]) == ("KSamplerSelect", {"sampler_name": "euler"})
    assert source(api, sampler["latent_image"]) == ("EmptySD3LatentImage",
                                                    {"width": 1024, "height": 1024, "batch_size": 1})
    decode = only(api, "VAEDecode")
    assert source(api, decode["vae"]) == ("VAELoader", {"vae_name": "ae.safetensors"})
    assert only(api, "SaveImage")["images"] == [api_by_type(api)["VAEDecode"][0], 0]
    text = note_text(ui)
    for needed in ("Chroma1-HD.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors", "ae.safetensors", "chroma",
                   "no CLIP-L", "VRAM", "computed, not measured"):
        assert needed in text, needed


# ---------------------------------------------------------------------------------------------------
# model links (what ComfyUI's Missing Models panel offers to download) and shipped media


# the loaders whose files a user has to download; each names them in properties.models
MODEL_LOADERS = {"LoadBnbFlux", "ApplyControlLora", "DualCLIPLoader", "CLIPLoader", "VAELoader"}
# files no link can be given for: the user's own pick
USER_PICKED = {"flux_style_lora.safetensors"}
# links of ours, for files no template bundled with ComfyUI names (so nothing here can check them)
OWN_LINKS = {"flux1-dev-bnb-nf4-v2.safetensors", "flux1-canny-dev-lora.safetensors", "t5xxl_fp8_e4m3fn.safetensors"}
# files no bundled template lists as a model, but whose link the note of the template ours follows gives
# (checked in test_text_to_image_follows_comfyui_template)
NOTE_LINKS = {"Chroma1-HD.safetensors"}
THUMBNAIL_MAX_BYTES = 100_000


def model_entries():
    """(workflow file, node, entry) for every properties.models entry of every editor workflow."""
    for path in UI_FILES:
        for n in load(path)["nodes"]:
            for entry in n.get("properties", {}).get("models", []):
                yield os.path.basename(path), n, entry


def test_model_links_cover_every_model_file(pair):
    """Each file a loader names has a link (name, url, directory) on that node, and each link names one
    of the node's files, in a folder that loader reads."""
    ui, _ = pair
    for n in backend_nodes(ui):
        names = [name for name in WIDGETS[n["type"]] if FILE_INPUTS.get((n["type"], name), "input") != "input"]
        files = [v for name, v in zip(WIDGETS[n["type"]], n["widgets_values"]) if name in names]
        links = n["properties"].get("models", [])
        if n["type"] not in MODEL_LOADERS:
            assert not links, f"node {n['id']} ({n['type']}) links files it does not load"
            continue
        assert sorted(m["name"] for m in links) == sorted(f for f in files if f not in USER_PICKED), n["id"]
        for m in links:
            assert set(m) == {"name", "url", "directory"}, (n["id"], m)
            assert m["url"].startswith("https://huggingface.co/") and "/resolve/main/" in m["url"], m["url"]
            assert m["url"].endswith("/" + m["name"]), m["url"]
            folders = {"diffusion_models", "checkpoints"} if n["type"] == "LoadBnbFlux" else \
                {FILE_INPUTS[(n["type"], name)] for name in names}
            assert m["directory"] in folders, (n["id"], m)


def bundled_template_models():
    """{file name: {(url, directory)}} from every workflow in the installed comfyui-workflow-templates
    packages (ComfyUI's own templates); skips, saying why, when they are not installed."""
    import importlib.metadata

    found, packages = {}, []
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if not name.startswith("comfyui-workflow-templates"):
            continue
        packages.append(name)
        for f in dist.files or []:
            if not str(f).endswith(".json"):
                continue
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            stack = [data]
            while stack:
                item = stack.pop()
                if isinstance(item, dict):
                    for m in item.get("models", []) if isinstance(item.get("models"), list) else []:
                        if isinstance(m, dict) and {"name", "url", "directory"} <= set(m):
                            found.setdefault(m["name"], set()).add((m["url"], m["directory"]))
                    stack.extend(item.values())
                elif isinstance(item, list):
                    stack.extend(item)
    if not found:
        msg = ("the comfyui-workflow-templates packages (ComfyUI's requirements) are not installed in this "
               f"Python ({packages or 'none found'}): the model links cannot be compared with ComfyUI's templates")
        print(msg)
        pytest.skip(msg)
    return found


def test_model_links_match_comfyui_templates():
    """A file ComfyUI's own templates name gets their url and folder; the files they do not name are
    exactly OWN_LINKS (links of ours that this test cannot check)."""
    bundled = bundled_template_models()
    unchecked = set()
    for workflow, n, m in model_entries():
        if m["name"] not in bundled:
            unchecked.add(m["name"])
            continue
        assert (m["url"], m["directory"]) in bundled[m["name"]], (
            f"{workflow}, node {n['id']}: {m['name']} -> {m['url']} in {m['directory']}; ComfyUI's templates "
            f"give {sorted(bundled[m['name']])}")
    assert unchecked == OWN_LINKS | NOTE_LINKS, \
        "files ComfyUI's templates do not name changed: check their links by hand"


# the template of ComfyUI's (comfyui-workflow-templates) each text-to-image workflow follows
OFFICIAL_TEMPLATES = {KLEIN: "image_flux2_klein_text_to_image", CHROMA: "image_chroma_text_to_image"}
# the model file ours loads where it is not the official graph's: Chroma's bf16 release (which its template's
# note links) instead of its fp8mixed file, which Load BnB Flux reads too: NF4 made from bf16 stays closer to
# the original
OUR_MODEL_FILE = {CHROMA: ("Chroma1-HD-fp8mixed.safetensors", "Chroma1-HD.safetensors")}
# values that are ours to choose: prompts, seeds, the output file name
OWN_VALUES = {"CLIPTextEncode", "RandomNoise", "SaveImage"}


def bundled_template_text(name):
    """The text of ComfyUI's template ``name``.json from the installed comfyui-workflow-templates packages;
    skips, saying why, when they are not installed."""
    import importlib.metadata

    for dist in importlib.metadata.distributions():
        if not (dist.metadata["Name"] or "").lower().replace("_", "-").startswith("comfyui-workflow-templates"):
            continue
        for f in dist.files or []:
            if str(f).endswith(f"/templates/{name}.json"):
                return f.read_text(encoding="utf-8")
    msg = f"ComfyUI's template {name} is not installed (comfyui-workflow-templates packages): nothing to compare with"
    print(msg)
    pytest.skip(msg)


def active_graph(workflow):
    """(nodes, links as (from node, from slot, to node, to slot)) of what a workflow runs: nodes that are not
    muted or bypassed, the nodes of an active subgraph in place of the subgraph node; links inside one graph."""
    subgraphs = {sg["id"]: sg for sg in workflow.get("definitions", {}).get("subgraphs", [])}
    nodes, links = [], []

    def walk(graph):
        for n in graph["nodes"]:
            if n["mode"] != 0:
                continue
            if n["type"] in subgraphs:
                walk(subgraphs[n["type"]])
            else:
                nodes.append(n)
        for link in graph["links"]:
            if isinstance(link, dict):
                links.append((link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], graph))
            else:
                links.append((link[1], link[2], link[3], link[4], graph))

    walk(workflow)
    return nodes, links


def graph_signature(workflow, loader_type):
    """What the graph does, comparable across files: each node type with its widget values (sorted per type),
    and each link as (from type, slot, to type, input name). The model loader is called ``loader_type``;
    notes, the Primitive* nodes that only hold a value, and SaveImage's links (across a subgraph's border in
    ComfyUI's) are left out."""
    nodes, links = active_graph(workflow)
    kept = {id(n): n for n in nodes if n["type"] not in FRONTEND_ONLY and not n["type"].startswith("Primitive")}

    def typ(n):
        return "MODEL LOADER" if n["type"] == loader_type else n["type"]

    widgets = {}
    for n in kept.values():
        widgets.setdefault(typ(n), []).append(n["widgets_values"])
    edges = []
    for src, src_slot, dst, dst_slot, graph in links:
        by_id = {n["id"]: n for n in graph["nodes"]}
        a, b = by_id.get(src), by_id.get(dst)
        if a is None or b is None or id(a) not in kept or id(b) not in kept or "SaveImage" in (a["type"], b["type"]):
            continue
        edges.append((typ(a), src_slot, typ(b), b["inputs"][dst_slot]["name"]))
    return {t: sorted(v, key=json.dumps) for t, v in widgets.items()}, sorted(edges)


@pytest.mark.parametrize("name", sorted(OFFICIAL_TEMPLATES))
def test_text_to_image_follows_comfyui_template(name):
    """The same nodes, links and settings as ComfyUI's own template for the model, with Load BnB Flux (NF4) in
    place of Load Diffusion Model: only prompts, seed and output name are ours (and, for Chroma, the bf16
    file the official note links first)."""
    official_text = bundled_template_text(OFFICIAL_TEMPLATES[name])
    official = json.loads(official_text)
    theirs, their_links = graph_signature(official, "UNETLoader")
    ours, our_links = graph_signature(load(os.path.join(EXAMPLES, name)), "LoadBnbFlux")
    assert our_links == their_links
    assert sorted(ours) == sorted(theirs)
    for typ in set(ours) - OWN_VALUES - {"MODEL LOADER"}:
        assert ours[typ] == theirs[typ], (typ, ours[typ], theirs[typ])
    (their_loader,), (our_loader,) = theirs["MODEL LOADER"], ours["MODEL LOADER"]
    their_file, our_file = their_loader[0], our_loader[0]
    assert (their_file, our_file) == OUR_MODEL_FILE.get(name, (their_file, their_file))
    if our_file != their_file:  # its link is the one ComfyUI's template gives in its note
        (url,) = [m["url"] for n in load(os.path.join(EXAMPLES, name))["nodes"]
                  for m in n.get("properties", {}).get("models", []) if m["name"] == our_file]
        assert f"({url})" in official_text and our_file in NOTE_LINKS


def test_same_file_same_link_everywhere():
    links = {}
    for workflow, _, m in model_entries():
        links.setdefault(m["name"], set()).add((m["url"], m["directory"]))
    assert all(len(v) == 1 for v in links.values()), {k: v for k, v in links.items() if len(v) > 1}


def test_notes_link_the_files_the_nodes_link(pair):
    """The note on the canvas gives the same download links as the Missing Models panel."""
    ui, _ = pair
    text = note_text(ui)
    for n in ui["nodes"]:
        for m in n.get("properties", {}).get("models", []):
            assert f"[{m['name']}]({m['url']})" in text and f"{m['directory']}/" in text, m["name"]


def shipped_inputs():
    return sorted(os.listdir(os.path.join(EXAMPLES, "input")))


@pytest.mark.parametrize("name", [os.path.basename(p) for p in UI_FILES])
def test_workflows_use_only_shipped_inputs(name):
    ui, api = load(os.path.join(EXAMPLES, name)), load(api_path(name))
    ui_images = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "LoadImage"]
    api_images = [e["inputs"]["image"] for e in api.values() if e["class_type"] == "LoadImage"]
    assert ui_images == api_images
    assert bool(ui_images) == (name not in TEXT_TO_IMAGE), ui_images
    assert set(ui_images) <= set(shipped_inputs()), ui_images


def test_every_shipped_input_is_used():
    used = {n["widgets_values"][0] for path in UI_FILES for n in load(path)["nodes"] if n["type"] == "LoadImage"}
    assert used == set(shipped_inputs())


def test_depth_map_is_near_bright():
    """What the Depth Control LoRA expects (Depth Anything / MiDaS convention): the ground brightens
    toward the viewer, the sky is the darkest, and the foreground ball is brighter than the ground behind."""
    import numpy as np
    from PIL import Image

    img = Image.open(os.path.join(EXAMPLES, "input", "bnb_flux_depth_example.png"))
    depth = np.asarray(img.convert("L"), dtype=np.float32)
    h, w = depth.shape
    assert h % 16 == 0 and w % 16 == 0 and h * w >= 512 * 512
    rows = depth.mean(axis=1)
    assert rows[: h // 4].max() < 30 and rows[-8:].mean() > 200  # sky far, ground at the bottom near
    ground = depth[h // 2:, w - 40:].mean(axis=1)  # a column of bare ground
    assert np.all(np.diff(ground) >= 0) and ground[-1] - ground[0] > 80


def test_thumbnails():
    """One thumbnail per workflow, <name>.jpg (what the template browser requests for a custom node pack),
    square, small; none left over from a renamed workflow."""
    from PIL import Image

    names = {os.path.splitext(os.path.basename(p))[0] for p in UI_FILES}
    thumbs = {os.path.splitext(f)[0] for f in os.listdir(EXAMPLES) if f.lower().endswith((".jpg", ".webp", ".png"))}
    assert thumbs == names
    for name in names:
        path = os.path.join(EXAMPLES, name + ".jpg")
        assert os.path.getsize(path) < THUMBNAIL_MAX_BYTES, path
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.width == img.height >= 256, (path, img.format, img.size)


# ---------------------------------------------------------------------------------------------------
# with ComfyUI


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def comfy_layout(cls):
    """(widgets as the editor lays them out, sockets [(name, type)]) from a node's INPUT_TYPES."""
    widgets, sockets = [], []
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            typ, opts = value[0], (value[1] if len(value) > 1 else {})
            if (isinstance(typ, (list, tuple)) or typ in WIDGET_TYPES) and not opts.get("forceInput"):
                widgets.append(name)
                if opts.get("control_after_generate"):
                    widgets.append(CONTROL)
                if opts.get("image_upload"):
                    widgets.append(UPLOAD)
            else:
                sockets.append((name, typ))
    return widgets, sockets


def comfy_outputs(cls):
    types = list(getattr(cls, "RETURN_TYPES", ()))
    names = list(getattr(cls, "RETURN_NAMES", None) or types)
    return list(zip(names, types))


def test_every_node_exists_in_comfyui(host, pair):
    ui, api = pair
    types = {n["type"] for n in backend_nodes(ui)} | {v["class_type"] for v in api.values()}
    missing = sorted(t for t in types if t not in host.nodes.NODE_CLASS_MAPPINGS)
    assert not missing, f"node types ComfyUI does not know: {missing}"


def test_widget_table_matches_comfyui(host):
    for typ, names in WIDGETS.items():
        widgets, _ = comfy_layout(host.nodes.NODE_CLASS_MAPPINGS[typ])
        assert widgets == names, f"{typ}: ComfyUI lays out {widgets}"


def test_ui_sockets_and_titles_match_comfyui(host, pair):
    ui, api = pair
    for n in backend_nodes(ui):
        cls = host.nodes.NODE_CLASS_MAPPINGS[n["type"]]
        _, sockets = comfy_layout(cls)
        assert [(s["name"], s["type"]) for s in n["inputs"]] == sockets, f"node {n['id']} ({n['type']}) inputs"
        assert [(s["name"], s["type"]) for s in n["outputs"]] == comfy_outputs(cls), \
            f"node {n['id']} ({n['type']}) outputs"
        title = n.get("title") or host.nodes.NODE_DISPLAY_NAME_MAPPINGS.get(n["type"]) or n["type"]
        assert api[str(n["id"])]["_meta"]["title"] == title, n["id"]


@pytest.fixture
def placeholder_files(host, tmp_path, pair):
    """Empty files under every name the API prompt references, in the host's model folders, and a tiny
    PNG in a temporary input directory (never the shared ComfyUI checkout's); all undone afterwards."""
    import folder_paths
    from PIL import Image

    _, api = pair
    created, added_folders = [], []
    old_input = folder_paths.get_input_directory()
    input_dir = tmp_path / "input"
    input_dir.mkdir()
    folder_paths.set_input_directory(str(input_dir))
    try:
        for entry in api.values():
            for name, value in entry["inputs"].items():
                kind = FILE_INPUTS.get((entry["class_type"], name))
                if kind is None or isinstance(value, list):
                    continue
                if kind == "input":
                    Image.new("RGB", (16, 16), (255, 255, 255)).save(input_dir / value)
                    continue
                folder = os.path.dirname(host.model_path(kind, value))
                os.makedirs(folder, exist_ok=True)
                if folder not in folder_paths.get_folder_paths(kind):
                    folder_paths.add_model_folder_path(kind, folder)
                    added_folders.append((kind, folder))
                path = host.model_path(kind, value)
                if not os.path.exists(path):
                    open(path, "wb").close()  # validation only checks that the name is listed
                    created.append(path)
        yield api
    finally:
        folder_paths.set_input_directory(old_input)
        for path in created:
            os.remove(path)
        for kind, folder in added_folders:
            folder_paths.folder_names_and_paths[folder_paths.map_legacy(kind)][0].remove(folder)


def validate(host, prompt):
    return asyncio.run(host.execution.validate_prompt("example-workflow", prompt, None))


def test_api_prompt_passes_comfyui_validation(host, placeholder_files):
    prompt = placeholder_files
    valid = validate(host, prompt)
    assert valid[0], (valid[1], valid[3])
    # and the validator does look at the names: one that is not there is rejected
    for nid, entry in prompt.items():
        for name, value in entry["inputs"].items():
            if FILE_INPUTS.get((entry["class_type"], name), "input") != "input" and not isinstance(value, list):
                broken = json.loads(json.dumps(prompt))
                broken[nid]["inputs"][name] = "not_there.safetensors"
                invalid = validate(host, broken)
                assert not invalid[0] and nid in invalid[3], (nid, name)


# A text-to-image template's stand-in model: its family's test model (quant_expand.testing.family_models), of
# the real layout but small. ComfyUI's Qwen3-4B and T5-XXL text encoders and the VAEs have fixed sizes, so
# their nodes are replaced by test conditioning of the model's text width, and the latent is captured
# undecoded.
# nodes whose work the stand-in replaces
TEXT_AND_IMAGE_NODES = {"CLIPLoader", "T5TokenizerOptions", "VAELoader", "VAEDecode", "SaveImage"}


@pytest.fixture(scope="module")
def tiny_models(host):
    from quant_expand.testing.family_models import ChromaConfig, Flux2Config, make_chroma, make_flux2
    from quant_expand.testing.synthetic import save_safetensors

    klein, chroma = Flux2Config(guidance=False), ChromaConfig()
    files = {KLEIN: ("tiny_template_klein_bf16.safetensors", lambda: make_flux2(klein, seed=6), klein),
             CHROMA: ("tiny_template_chroma_bf16.safetensors", lambda: make_chroma(chroma, seed=6), chroma)}
    for name, make, _ in files.values():
        path = host.model_path("diffusion_models", name)
        if not os.path.exists(path):
            save_safetensors(make(), path)
    return {workflow: (name, cfg.context_in_dim) for workflow, (name, _, cfg) in files.items()}


def tiny_sampler_prompt(workflow, unet_name, text_width, stock_loader=False):
    """The workflow's API prompt on a tiny model: Load BnB Flux as shipped (or ComfyUI's UNETLoader in its
    place), the sampler nodes as shipped but for 2 steps at 64 x 64, test conditioning in place of the text
    encoder, the sampler's latent captured."""
    from quant_expand.testing.prompts import node, unet_loader

    prompt = {nid: entry for nid, entry in load(api_path(workflow)).items()
              if entry["class_type"] not in TEXT_AND_IMAGE_NODES}
    by_type = api_by_type(prompt)
    (loader,) = by_type["LoadBnbFlux"]
    if stock_loader:
        prompt[loader] = unet_loader(unet_name)
    else:
        prompt[loader]["inputs"]["unet_name"] = unet_name
    for k, nid in enumerate(by_type["CLIPTextEncode"]):  # positive and negative differ: cfg mixes them
        prompt[nid] = node("BnbFluxTestConditioning", seed=1 + k, tokens=8, context_dim=text_width, pooled_dim=0,
                           guidance=0.0)
    for entry in prompt.values():
        inputs = entry["inputs"]
        if "width" in inputs:
            inputs.update(width=64, height=64)
        if "steps" in inputs:
            inputs["steps"] = 2
    (sampler,) = by_type["SamplerCustomAdvanced"]
    prompt["capture"] = node("BnbFluxTestCapture", samples=[sampler, 0], key="latent")
    return prompt


@pytest.mark.parametrize("workflow", sorted(TEXT_TO_IMAGE))
def test_text_to_image_sampler_runs_on_the_tiny_model(host, tiny_models, workflow):
    """The template's own sampling nodes (CFG Guider, its scheduler, Flow Shift for Chroma, the empty latent,
    SamplerCustomAdvanced) run on Load BnB Flux's NF4 model of the family's test model as on ComfyUI's
    UNETLoader, to 1e-6 (its quantized weights are values NF4 holds exactly)."""
    from quant_expand.testing.prompts import rel_err

    name, text_width = tiny_models[workflow]
    quantized = host.run(tiny_sampler_prompt(workflow, name, text_width))["latent"]
    (loader,) = api_by_type(load(api_path(workflow)))["LoadBnbFlux"]
    report = host.pack_module("quant_expand.comfyui.report").load_report(host.node_output(loader))
    assert report.quant.startswith("nf4") and report.quantized_layers > 0, report
    host.free_models()
    stock = host.run(tiny_sampler_prompt(workflow, name, text_width, stock_loader=True))["latent"]
    host.free_models()
    assert quantized.isfinite().all() and quantized.abs().max() > 0
    assert rel_err(quantized, stock) < 1e-6


def test_canny_finds_the_shipped_image_edges(host):
    """ComfyUI's own Canny node, at the workflows' thresholds, draws the outlines of the shipped control
    image: a fair share of edge pixels, in every quarter of the picture (no blank or noisy image)."""
    import numpy as np
    import torch
    from PIL import Image

    img = Image.open(os.path.join(EXAMPLES, "input", "bnb_flux_canny_example.png")).convert("RGB")
    assert img.width % 16 == 0 and img.height % 16 == 0
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
    out = host.nodes.NODE_CLASS_MAPPINGS["Canny"].execute(pixels, 0.15, 0.3)
    edges = out.result[0][0, ..., 0].float().numpy() > 0.5
    assert 0.003 < edges.mean() < 0.05, edges.mean()
    h, w = edges.shape
    for rows in (slice(0, h // 2), slice(h // 2, h)):
        for cols in (slice(0, w // 2), slice(w // 2, w)):
            assert edges[rows, cols].mean() > 0.001, (rows, cols)


def test_pack_copied_its_inputs_when_comfyui_loaded_it(host):
    """At start-up the pack put the shipped inputs into ComfyUI's input folder (the in-process host's,
    a temporary one), byte for byte."""
    import folder_paths

    input_dir = folder_paths.get_input_directory()
    assert os.path.realpath(input_dir) != os.path.realpath(os.path.join(os.environ["COMFYUI_PATH"], "input"))
    for name in shipped_inputs():
        with open(os.path.join(input_dir, name), "rb") as got, \
                open(os.path.join(EXAMPLES, "input", name), "rb") as want:
            assert got.read() == want.read(), name


def test_copy_example_inputs(host, tmp_path, caplog):
    example_inputs = host.pack_module("nodes.example_inputs")
    names = shipped_inputs()
    assert example_inputs.shipped_input_names() == names
    target = tmp_path / "input"
    with caplog.at_level("INFO", logger="comfyui-bnb-flux"):
        assert example_inputs.copy_example_inputs(target=str(target)) == names
    for name in names:
        assert (target / name).read_bytes() == open(os.path.join(EXAMPLES, "input", name), "rb").read()
    logged = [r.getMessage() for r in caplog.records if "example workflows' input images" in r.getMessage()]
    assert len(logged) == 1 and all(name in logged[0] for name in names) and str(target) in logged[0]
    caplog.clear()
    with caplog.at_level("INFO", logger="comfyui-bnb-flux"):
        assert example_inputs.copy_example_inputs(target=str(target)) == []  # all there: nothing to do
    assert not caplog.records


def test_copy_example_inputs_never_overwrites(host, tmp_path):
    """A user's own file under a shipped name stays as it is; the others are still copied."""
    example_inputs = host.pack_module("nodes.example_inputs")
    names = shipped_inputs()
    target = tmp_path / "input"
    target.mkdir()
    mine = target / names[0]
    mine.write_bytes(b"the user's own picture")
    os.utime(mine, (1_000_000_000, 1_000_000_000))
    assert example_inputs.copy_example_inputs(target=str(target)) == names[1:]
    assert mine.read_bytes() == b"the user's own picture" and mine.stat().st_mtime == 1_000_000_000
    for name in names[1:]:
        assert (target / name).stat().st_size == os.path.getsize(os.path.join(EXAMPLES, "input", name))


def test_copy_example_inputs_failure_is_logged_not_raised(host, tmp_path, caplog):
    """An input folder that cannot be written (here: a file in its place) costs a warning naming the
    image, the folder and what to do; the pack still loads."""
    example_inputs = host.pack_module("nodes.example_inputs")
    blocked = tmp_path / "input"
    blocked.write_text("not a folder")
    with caplog.at_level("WARNING", logger="comfyui-bnb-flux"):
        assert example_inputs.copy_example_inputs(target=str(blocked)) == []
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert all(name in warning for name in shipped_inputs())
    assert str(blocked) in warning and "copy them there from " + os.path.join(REPO_ROOT, "example_workflows") in warning
