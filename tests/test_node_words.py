"""What the editor tells users about each node, checked against the schemas ComfyUI serves
(``GET_NODE_INFO_V1``, the same dict as ``/object_info``): categories beside core's nodes, search
aliases, a tooltip on every input and output, a docs page per node (``web/docs/<NodeId>.md`` and one per
translated locale, ``web/docs/<NodeId>/<locale>.md``, the paths ComfyUI's frontend fetches for the Node
Info panel), and ``locales/<locale>/nodeDefs.json`` naming exactly the nodes, inputs and outputs the
schemas have.

Adding a node to ``nodes.NODES`` makes these tests fail until it has its words everywhere."""
from __future__ import annotations

import json
import os
import re

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCALES_DIR = os.path.join(REPO_ROOT, "locales")
DOCS_DIR = os.path.join(REPO_ROOT, "web", "docs")
# locales/en holds only main.json (the template browser's section title): the node words are translated
# where a locale has nodeDefs.json
LOCALES = sorted(d for d in os.listdir(LOCALES_DIR) if os.path.isfile(os.path.join(LOCALES_DIR, d, "nodeDefs.json")))
# a tooltip is read while hovering, a description heads the search result and the node's hover card:
# the details belong in the docs page
TOOLTIP_MAX = 300
DESCRIPTION_MAX = 320


@pytest.fixture(scope="module")
def infos(host):
    """node id -> the V1 info dict the frontend receives, for every node the pack registers."""
    return {cls.GET_SCHEMA().node_id: cls.GET_NODE_INFO_V1() for cls in host.pack_module("nodes").NODES}


def input_names(info) -> list[str]:
    return [name for section in ("required", "optional") for name in info["input"].get(section, {})]


def test_locales_include_chinese_and_japanese():
    assert {"zh", "ja"} <= set(LOCALES), LOCALES


def test_categories_sit_beside_core_nodes(host, infos):
    """The loaders where core keeps UNETLoader and its LoRA loaders, the saver where core keeps Save Model:
    read from ComfyUI itself, so this fails if core moves them."""
    import nodes as comfy_nodes

    categories = host.pack_module("nodes.categories")
    core = comfy_nodes.NODE_CLASS_MAPPINGS
    loaders = {core[n].CATEGORY for n in ("UNETLoader", "LoraLoaderModelOnly")}
    assert loaders == {"model/loaders"}, loaders
    assert categories.LOADERS.startswith("model/loaders/")
    assert categories.SAVERS == core["ModelSave"].CATEGORY == core["CheckpointSave"].CATEGORY
    for node_id, info in infos.items():
        expected = categories.SAVERS if info["output_node"] else categories.LOADERS
        assert info["category"] == expected, (node_id, info["category"])


def test_every_node_is_described_for_users(infos):
    for node_id, info in infos.items():
        assert info["display_name"] and info["display_name"] != node_id, node_id
        assert 0 < len(info["description"]) <= DESCRIPTION_MAX, (node_id, len(info["description"]))
        aliases = info["search_aliases"]
        assert aliases and len(set(aliases)) == len(aliases), (node_id, aliases)
        assert all(a == a.lower().strip() and a for a in aliases), (node_id, aliases)
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                tooltip = spec[1].get("tooltip", "") if len(spec) > 1 else ""
                assert 0 < len(tooltip) <= TOOLTIP_MAX, f"{node_id}.{name}: tooltip of {len(tooltip)} characters"
        assert len(info["output_tooltips"]) == len(info["output"]), node_id
        for i, tooltip in enumerate(info["output_tooltips"]):
            assert tooltip and len(tooltip) <= TOOLTIP_MAX, f"{node_id} output {i}: tooltip {tooltip!r}"


def test_aliases_carry_what_users_type(infos):
    """The words a user searching for quantized FLUX or Control LoRAs types (the frontend matches
    search_aliases, display_name and the node id)."""
    aliases = {node_id: set(info["search_aliases"]) for node_id, info in infos.items()}
    assert {"nf4", "fp4", "int8", "bitsandbytes", "bnb", "quantized", "4-bit", "flux", "flux2", "klein", "chroma"} <= aliases["LoadBnbFlux"]
    assert {"lora", "control lora", "canny", "depth", "controlnet"} <= aliases["ApplyControlLora"]
    assert {"lora strength", "lora weight"} <= aliases["SetLoraScale"]
    assert {"lora stack", "multiple loras", "stacker", "lora toggle", "lora loader"} <= aliases["ApplyLoraStack"]
    assert {"save model", "save nf4", "save quantized"} <= aliases["SaveBnbFlux"]


def test_words_name_no_implementation_detail(infos):
    """Tooltips and descriptions say what to set, in a user's words (the maths is in the docs pages)."""
    jargon = re.compile(r"lora_[AB]|QK-norm|dequantiz|per-row|blockwise|absmax|SCB", re.IGNORECASE)
    for node_id, info in infos.items():
        texts = [info["description"], *info["output_tooltips"]]
        texts += [spec[1].get("tooltip", "") for section in ("required", "optional")
                  for spec in info["input"].get(section, {}).values()]
        for text in texts:
            assert not jargon.search(text), (node_id, text)


def test_every_node_has_a_docs_page_per_locale(infos):
    for node_id in infos:
        english = os.path.join(DOCS_DIR, f"{node_id}.md")
        assert os.path.isfile(english), f"{node_id}: no web/docs/{node_id}.md"
        with open(english, encoding="utf-8") as f:
            text = f.read()
        assert text.startswith(f"# {infos[node_id]['display_name']}\n"), node_id
        for name in input_names(infos[node_id]):
            assert f"**{name}**" in text, f"web/docs/{node_id}.md does not describe input {name}"
        for lang in LOCALES:
            page = os.path.join(DOCS_DIR, node_id, f"{lang}.md")
            assert os.path.isfile(page), f"{node_id}: no web/docs/{node_id}/{lang}.md"
    pages = {p[:-3] for p in os.listdir(DOCS_DIR) if p.endswith(".md")}
    assert pages == set(infos), f"docs pages for nodes the pack does not have: {pages - set(infos)}"
    for folder in (p for p in os.listdir(DOCS_DIR) if os.path.isdir(os.path.join(DOCS_DIR, p))):
        assert folder in infos, f"web/docs/{folder}/ is for a node the pack does not have"
        assert sorted(os.listdir(os.path.join(DOCS_DIR, folder))) == [f"{lang}.md" for lang in LOCALES], folder


def test_translated_docs_describe_every_input(infos):
    for node_id, info in infos.items():
        for lang in LOCALES:
            with open(os.path.join(DOCS_DIR, node_id, f"{lang}.md"), encoding="utf-8") as f:
                text = f.read()
            # "**unet_name（UNet名称）**" or "**unet_name**": the input as the user sees it in English too
            for name in input_names(info):
                assert f"**{name}" in text, f"web/docs/{node_id}/{lang}.md does not describe input {name}"
            assert not re.search(r"(?<=[^\x00-\x7f])\n(?=[^\x00-\x7f])", text), \
                f"web/docs/{node_id}/{lang}.md: a line break inside a CJK sentence renders as a space"


def test_docs_fit_the_node_info_panel():
    """The panel is about 26 monospace characters wide and a code span breaks only at spaces and hyphens:
    a longer unbreakable one is cut off (file names that long go in plain text, which wraps narrower)."""
    for root, _, files in os.walk(DOCS_DIR):
        for name in files:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                spans = re.findall(r"`([^`]+)`", f.read())
            too_long = [s for s in spans if max(len(p) for p in re.split(r"[ -]", s)) > 24]
            assert not too_long, f"{os.path.relpath(os.path.join(root, name), REPO_ROOT)}: {too_long}"


@pytest.mark.parametrize("lang", LOCALES)
def test_locale_names_exactly_the_schemas(infos, lang):
    """nodeDefs.json in the key format the frontend reads (nodeDefs.<id>.display_name / description /
    inputs.<name>.name|tooltip / outputs.<index>.tooltip): every node, input and output, nothing else,
    so a renamed input cannot leave a stale translation."""
    path = os.path.join(LOCALES_DIR, lang, "nodeDefs.json")
    with open(path, encoding="utf-8") as f:
        defs = json.load(f)
    assert set(defs) == set(infos), f"{path}: nodes {sorted(set(defs) ^ set(infos))} differ from the schemas"
    for node_id, info in infos.items():
        entry = defs[node_id]
        where = f"{path}: {node_id}"
        assert set(entry) <= {"display_name", "description", "inputs", "outputs"}, where
        assert entry["display_name"] and entry["display_name"] != info["display_name"], where
        assert entry["description"] and entry["description"] != info["description"], where
        inputs = input_names(info)
        assert sorted(entry["inputs"]) == sorted(inputs), f"{where}: inputs {sorted(entry['inputs'])} != {inputs}"
        for name in inputs:
            words = entry["inputs"][name]
            assert set(words) == {"name", "tooltip"} and words["name"], f"{where}.{name}"
            assert words["tooltip"] and words["tooltip"] != info["input"].get("required", {}).get(
                name, info["input"].get("optional", {}).get(name))[1]["tooltip"], f"{where}.{name} is not translated"
        outputs = entry.get("outputs", {})
        assert sorted(outputs) == [str(i) for i in range(len(info["output"]))], f"{where}: outputs {sorted(outputs)}"
        for i, words in outputs.items():
            assert set(words) <= {"name", "tooltip"} and words["tooltip"], f"{where} output {i}"
            assert words["tooltip"] != info["output_tooltips"][int(i)], f"{where} output {i} is not translated"


def test_comfyui_collects_the_locales(host, tmp_path, monkeypatch):
    """ComfyUI's own collector (the server's /i18n) finds the pack's files, installed as a user has them,
    under the keys the frontend merges: {locale: {"nodeDefs": {...}, "templateWorkflows": {...}}}."""
    import shutil

    import folder_paths
    from app.custom_node_manager import CustomNodeManager

    shutil.copytree(LOCALES_DIR, tmp_path / "comfyui-bnb-flux" / "locales")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "custom_nodes", ([str(tmp_path)], set()))
    translations = CustomNodeManager().build_translations()
    assert sorted(translations) == sorted(os.listdir(LOCALES_DIR))
    for lang in LOCALES:
        with open(os.path.join(LOCALES_DIR, lang, "nodeDefs.json"), encoding="utf-8") as f:
            assert translations[lang]["nodeDefs"] == json.load(f), lang
    for lang in translations:  # the template browser's section is titled in every locale the pack has
        assert translations[lang]["templateWorkflows"] == {"category": {"comfyui-bnb-flux": "BnB Flux"}}, lang
