"""The example workflows in ``example_workflows/``.

Without ComfyUI: every editor (UI-format) workflow has an API-format twin in ``example_workflows/api/``;
both parse; the UI links are consistent (each link id sits in exactly its from-node's ``outputs[].links``
and its to-node's ``inputs[].link``, types agree); the API prompt is the same graph (same node ids and
types, same connections) with the same widget values, matched by name in each node's input order
(``WIDGETS`` below; UI-only values such as ``control_after_generate`` are skipped).

With ComfyUI (``host``): every node type exists, ``WIDGETS`` and the UI sockets match ComfyUI's own node
definitions, and each API prompt passes ``execution.validate_prompt`` with empty placeholder files under
the referenced names. Nothing is executed: real FLUX weights are not available here.
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
CANNY = "flux_dev_nf4_canny_lora.json"
DEPTH = "flux_dev_nf4_depth_lora.json"
STYLE = "flux_dev_nf4_canny_style_lora.json"

# nodes that live only in the editor: never sent to the server, absent from the API format
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
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
}
# API inputs that name files: (class_type, input) -> ComfyUI model folder ("input": the input directory)
FILE_INPUTS = {
    ("LoadBnbFlux", "unet_name"): "diffusion_models",
    ("ApplyControlLora", "lora_name"): "loras",
    ("SetLoraScale", "lora_name"): "loras",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
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
    assert {CANNY, DEPTH, STYLE} <= {os.path.basename(p) for p in UI_FILES}
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


def test_canny_workflow_settings():
    ui = load(os.path.join(EXAMPLES, CANNY))
    api = load(os.path.join(EXAMPLES, "api", CANNY))
    by_type = {}
    for entry in api.values():
        by_type.setdefault(entry["class_type"], []).append(entry["inputs"])
    one = {t: v[0] for t, v in by_type.items()}
    assert one["LoadBnbFlux"] == {"unet_name": "flux1-dev.safetensors", "quant_type": "nf4", "double_quant": True,
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
    assert api[canny["inputs"]["image"][0]]["class_type"] == "LoadImage"
    assert api[ip2p["vae"][0]]["inputs"] == {"vae_name": "ae.safetensors"}
    clip = api[positive["inputs"]["clip"][0]]["inputs"]
    assert (clip["clip_name1"], clip["clip_name2"], clip["type"]) == (
        "clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "flux")
    decode = [e for e in api.values() if e["class_type"] == "VAEDecode"][0]["inputs"]
    assert decode["samples"][0] == [k for k, e in api.items() if e["class_type"] == "KSampler"][0]
    assert [e for e in api.values() if e["class_type"] == "SaveImage"][0]["inputs"]["images"][0] == \
        [k for k, e in api.items() if e["class_type"] == "VAEDecode"][0]
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    for needed in ("diffusion_models", "loras", "text_encoders", "vae", "0.85"):
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
    (note,) = [n for n in ui["nodes"] if n["type"] == "Note"]
    return note["widgets_values"][0]


def test_depth_workflow_settings():
    ui, api = load(os.path.join(EXAMPLES, DEPTH)), load(os.path.join(EXAMPLES, "api", DEPTH))
    types = api_by_type(api)
    assert "Canny" not in types  # the depth map is given as an image: ComfyUI has no depth estimator
    assert [t for t, _ in model_chain(api)] == ["LoadBnbFlux", "ApplyControlLora"]
    lora = model_chain(api)[1][1]
    assert (lora["lora_name"], lora["strength"]) == ("flux1-depth-dev-lora.safetensors", 0.85)
    ip2p = api[types["InstructPixToPixConditioning"][0]]["inputs"]
    assert api[ip2p["pixels"][0]]["class_type"] == "LoadImage"
    assert api[ip2p["pixels"][0]]["inputs"]["image"] == "depth_map.png"
    guidance = api[ip2p["positive"][0]]
    assert guidance["class_type"] == "FluxGuidance" and guidance["inputs"]["guidance"] == 10.0
    ks = api[types["KSampler"][0]]["inputs"]
    assert (ks["cfg"], ks["latent_image"]) == (1.0, [types["InstructPixToPixConditioning"][0], 2])
    for needed in ("flux1-depth-dev-lora.safetensors", "depth_map.png", "0.85", "guidance 10"):
        assert needed in note_text(ui), needed


def test_control_and_style_workflow_settings():
    ui, api = load(os.path.join(EXAMPLES, STYLE)), load(os.path.join(EXAMPLES, "api", STYLE))
    chain = model_chain(api)
    assert [t for t, _ in chain] == ["LoadBnbFlux", "ApplyControlLora", "ApplyControlLora", "SetLoraScale"]
    (_, control), (_, style), (_, scale) = chain[1:]
    assert (control["lora_name"], control["strength"]) == ("flux1-canny-dev-lora.safetensors", 1.0)
    assert (style["lora_name"], style["strength"]) == ("flux_style_lora.safetensors", 0.8)
    # Set LoRA Scale rescales a LoRA applied upstream (the Control LoRA), to BFL's 0.85
    assert (scale["lora_name"], scale["strength"]) == (control["lora_name"], 0.85)
    types = api_by_type(api)
    ip2p = api[types["InstructPixToPixConditioning"][0]]["inputs"]
    assert api[ip2p["pixels"][0]]["class_type"] == "Canny"
    for needed in ("Set LoRA Scale", "flux_style_lora.safetensors", "0.85"):
        assert needed in note_text(ui), needed


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
