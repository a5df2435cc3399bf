"""The pack as a user sees it: ComfyUI's editor in a headless Chromium (Debian's ``/usr/bin/chromium``,
driven by the Python ``playwright`` package; no browser is ever downloaded).

A real ComfyUI server on loopback (``server_host``: the pack in a temporary ``custom_nodes``, plus
test-only conditioning/latent nodes for the tiny FLUX). The test opens the editor, loads each example
workflow and checks that no node type is missing (and that a workflow with an unknown node does raise
the missing-nodes dialog, so the check can fail) and that its API twin is what the editor exports; then
builds small graphs on the tiny FLUX in the editor, runs them, and checks what ``web/bnb_flux.js`` shows:
every node's badge after a run (whole, wrapped inside the node), Apply Control LoRA's strength after a Set
LoRA Scale downstream, a failed node's badge and the editor's error report, quant_type/double_quant greyed
out for a pre-quantized file, Set LoRA Scale taking the LoRA applied upstream, and Apply LoRA Stack.
Screenshots go to the test's output directory (printed; ``BNB_FLUX_SCREENSHOTS=DIR`` to keep them
somewhere else).

Skipped, with the reason printed, without COMFYUI_PATH, without Chromium or without playwright.
"""
from __future__ import annotations

import json
import os
import re

import pytest

from browser_host import CFG, CONTROL, EXAMPLES, MODEL, NF4_FILE, STYLE, STYLE_TE, browser_session, close_dialogs, \
    load_workflow, missing_dialog_text, UNKNOWN_NODES


@pytest.fixture(scope="module")
def browser_server(tmp_path_factory):
    with browser_session(tmp_path_factory) as session:
        yield session


def test_extension_is_loaded(browser_server):
    srv, page, _ = browser_server
    names = page.evaluate("() => (window.app.extensions || []).map(e => e.name)")
    assert "comfyui-bnb-flux" in names, names


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_workflow_has_no_missing_nodes(browser_server, path):
    srv, page, shots = browser_server
    with open(path, encoding="utf-8") as f:
        workflow = json.load(f)
    load_workflow(page, workflow)
    page.screenshot(path=os.path.join(shots, os.path.basename(path).replace(".json", ".png")))
    assert not missing_dialog_text(page), missing_dialog_text(page)
    assert page.evaluate(UNKNOWN_NODES) == []
    types = page.evaluate("() => window.app.graph._nodes.map(n => n.type)")
    assert sorted(types) == sorted(n["type"] for n in workflow["nodes"])
    close_dialogs(page)


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_api_twin_is_the_editors_export(browser_server, path):
    """example_workflows/api/<name>.json is what the editor itself makes of the workflow for the server
    (graphToPrompt, as Queue and Export (API) do): node ids, class types, titles, links and values."""
    srv, page, _ = browser_server
    with open(path, encoding="utf-8") as f:
        workflow = json.load(f)
    with open(os.path.join(os.path.dirname(path), "api", os.path.basename(path)), encoding="utf-8") as f:
        twin = json.load(f)
    load_workflow(page, workflow)
    exported = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert exported == twin
    close_dialogs(page)


def test_unknown_node_raises_missing_nodes_dialog(browser_server):
    """The checks above can fail: a node type nobody registered is found (a placeholder node) and the
    editor tells the user (a "Missing node" toast in this frontend, a dialog in older ones)."""
    srv, page, shots = browser_server
    with open(EXAMPLES[0], encoding="utf-8") as f:
        workflow = json.load(f)
    for n in workflow["nodes"]:
        if n["type"] == "ApplyControlLora":
            n["type"] = "NoSuchBnbFluxNode"
            n["properties"]["Node name for S&R"] = "NoSuchBnbFluxNode"
    load_workflow(page, workflow)
    page.wait_for_timeout(700)
    page.screenshot(path=os.path.join(shots, "missing_node_dialog.png"))
    assert page.evaluate(UNKNOWN_NODES) == ["NoSuchBnbFluxNode"]
    assert "NoSuchBnbFluxNode" in missing_dialog_text(page)  # and the user is told
    close_dialogs(page)


def test_opening_a_workflow_keeps_set_lora_scale_as_saved(browser_server):
    """Set LoRA Scale takes the nearest upstream LoRA only when a user connects it, never while a workflow
    opens: in the style example, a Set LoRA Scale saved on the Canny LoRA keeps it, although the style LoRA
    is the one nearest to it."""
    srv, page, shots = browser_server
    path = next(p for p in EXAMPLES if os.path.basename(p) == "Style LoRA + Canny Control.json")
    with open(path, encoding="utf-8") as f:
        workflow = json.load(f)
    (control,) = [n["widgets_values"][0] for n in workflow["nodes"]
                  if n["type"] == "ApplyControlLora" and "canny" in n["widgets_values"][0]]
    (scale,) = [n for n in workflow["nodes"] if n["type"] == "SetLoraScale"]
    scale["widgets_values"][0] = control
    load_workflow(page, workflow)
    shown = page.evaluate("""() => window.app.graph._nodes.filter((n) => n.type === 'SetLoraScale')
                                 .map((n) => n.widgets.map((w) => w.value))""")
    assert shown == [scale["widgets_values"]], (shown, scale["widgets_values"])
    close_dialogs(page)


# Editor calls: the editor's own LiteGraph API, used the way the editor's UI code uses it (a widget changes
# through its value and callback, as a pick in its menu does; links through connect, as a drag does).
EDITOR_CALLS = """
() => {
  if (!window.__bnbRunListener) {  // how the last queued run ended
    window.__bnbRunListener = true;
    const api = window.comfyAPI.api.api;
    for (const e of ["execution_success", "execution_error", "execution_interrupted"]) {
      api.addEventListener(e, () => { window.__bnbRunEnded = e; });
    }
    api.addEventListener("execution_cached", ({detail}) => { window.__bnbCached = detail.nodes; });
  }
  const g = () => window.app.graph;
  const node = (id) => g().getNodeById(id);
  const widget = (id, name) => (node(id).widgets || []).find((w) => w.name === name);
  window.bnbTest = {
    clear() { g().clear(); },
    add(type, x, y, values) {
      const n = window.LiteGraph.createNode(type);
      n.pos = [x, y];
      g().add(n);
      for (const [k, v] of Object.entries(values || {})) window.bnbTest.set(n.id, k, v);
      return n.id;
    },
    set(id, name, value) {
      const w = widget(id, name);
      w.value = value;
      w.callback?.(value, window.app.canvas, node(id));
    },
    link(a, slot, b, name) { node(a).connect(slot, node(b), node(b).findInputSlot(name)); },
    value(id, name) { return widget(id, name).value; },
    widgetState(id, name) {
      const w = widget(id, name);
      return {label: w.label ?? null, disabled: !!w.disabled, hidden: !!w.hidden, value: w.value};
    },
    badge(id) {
      const w = (node(id).widgets || []).find((w) => w.name === "bnb_flux_info");
      if (!w) return null;
      const el = w.element;
      return {text: el.textContent, title: el.title, classes: [...el.classList], whiteSpace: getComputedStyle(el).whiteSpace,
              scrollHeight: el.scrollHeight, clientHeight: el.clientHeight, scrollWidth: el.scrollWidth,
              clientWidth: el.clientWidth, lineHeight: parseFloat(getComputedStyle(el).lineHeight),
              nodeHeight: node(id).size[1], minNodeHeight: node(id).computeSize()[1]};
    },
    view(scale, offset) {
      window.app.canvas.ds.scale = scale;
      window.app.canvas.ds.offset = offset;
      g().setDirtyCanvas(true, true);
    },
  };
}
"""


def editor_calls(page):
    page.evaluate(EDITOR_CALLS)
    return lambda expr, *args: page.evaluate(f"([a, b, c, d]) => window.bnbTest.{expr}", list(args) + [None] * 4)


def sampler_nodes(t, model_id, x=1180, y=40):
    """Conditioning, latent, KSampler on ``model_id`` (fixed seed), SaveLatent."""
    cond = {"tokens": 8, "context_dim": CFG.context_in_dim, "pooled_dim": CFG.vec_in_dim, "guidance": 3.5}
    pos = t("add(a, b, c, d)", "BnbFluxServerTestConditioning", 20, 560, {**cond, "seed": 1})
    lat = t("add(a, b, c, d)", "BnbFluxServerTestLatent", 420, 620, {"size": 16})
    ks = t("add(a, b, c, d)", "KSampler", x, y, {"seed": 3, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                                                   "scheduler": "simple", "control_after_generate": "fixed"})
    save = t("add(a, b, c, d)", "SaveLatent", x, y + 380, {"filename_prefix": "latents/browser"})
    t("link(a, b, c, d)", model_id, 0, ks, "model")
    t("link(a, b, c, d)", pos, 0, ks, "positive")
    t("link(a, b, c, d)", pos, 0, ks, "negative")
    t("link(a, b, c, d)", lat, 0, ks, "latent_image")
    t("link(a, b, c, d)", ks, 0, save, "samples")
    return ks


def run(page, timeout=120_000) -> str:
    """Queue the graph as the Run button does; returns how the run ended (``execution_success``, ...)."""
    page.evaluate("async () => { window.__bnbRunEnded = null; await window.app.queuePrompt(0, 1); }")
    page.wait_for_function("() => window.__bnbRunEnded != null", timeout=timeout)
    page.wait_for_timeout(300)  # the canvas redraws
    return page.evaluate("() => window.__bnbRunEnded")


def close_side_panel(page):
    page.evaluate("async () => { await window.app.extensionManager.setting.set('Comfy.RightSidePanel.IsOpen', false); }")
    page.wait_for_timeout(300)


def assert_not_clipped(badge, what):
    """The whole text is on the page: lines wrap inside the node (pre-wrap), nothing overflows the badge,
    the node is tall enough for it, and the tooltip holds the same text."""
    assert badge["whiteSpace"] == "pre-wrap", (what, badge)
    assert badge["scrollHeight"] <= badge["clientHeight"] + 1, (what, badge)
    assert badge["scrollWidth"] <= badge["clientWidth"] + 1, (what, badge)
    assert badge["nodeHeight"] >= badge["minNodeHeight"] - 1, (what, badge)
    assert badge["title"] == badge["text"], (what, badge)


def build_lora_graph(t):
    """Load BnB Flux -> Apply Control LoRA (Control, 1.0) -> Apply Control LoRA (style with text-encoder keys, 0.6)
    -> Set LoRA Scale -> KSampler; Save BnB Flux on the loader. Returns the ids."""
    t("clear()")
    ids = {"load": t("add(a, b, c, d)", "LoadBnbFlux", 20, 40, {"unet_name": MODEL, "quant_type": "nf4",
                                                                "double_quant": True, "compute_dtype": "float32"})}
    ids["control"] = t("add(a, b, c, d)", "ApplyControlLora", 420, 40, {"lora_name": CONTROL, "strength": 1.0})
    ids["style"] = t("add(a, b, c, d)", "ApplyControlLora", 420, 300, {"lora_name": STYLE_TE, "strength": 0.6})
    ids["scale"] = t("add(a, b, c, d)", "SetLoraScale", 800, 40)
    ids["save"] = t("add(a, b, c, d)", "SaveBnbFlux", 20, 330, {"filename_prefix": "diffusion_models/browser"})
    t("link(a, b, c, d)", ids["load"], 0, ids["control"], "model")
    t("link(a, b, c, d)", ids["control"], 0, ids["style"], "model")
    ids["fresh_lora_name"] = t("value(a, b)", ids["scale"], "lora_name")
    t("link(a, b, c, d)", ids["style"], 0, ids["scale"], "model")
    t("link(a, b, c, d)", ids["load"], 0, ids["save"], "model")
    ids["ks"] = sampler_nodes(t, ids["scale"])
    t("view(a, b)", 0.8, [60, 90])
    return ids


def test_run_shows_badges(browser_server):
    srv, page, shots = browser_server
    close_dialogs(page)
    t = editor_calls(page)
    ids = build_lora_graph(t)
    # a Set LoRA Scale just placed lists every LoRA file, its first one applied nowhere; connecting its model
    # picks the nearest LoRA applied upstream
    assert ids["fresh_lora_name"] not in (CONTROL, STYLE_TE), ids
    assert t("value(a, b)", ids["scale"], "lora_name") == STYLE_TE
    t("set(a, b, c)", ids["scale"], "lora_name", CONTROL)  # the user picks the Control LoRA to rescale
    t("set(a, b, c)", ids["scale"], "strength", 0.85)
    assert run(page) == "execution_success"
    page.screenshot(path=os.path.join(shots, "badges_after_run.png"))
    badges = {k: t("badge(a)", ids[k]) for k in ("load", "control", "style", "scale", "save")}
    print("badges:", *(f"[{k}]\n{b['text']}" for k, b in badges.items()), sep="\n")
    assert badges["load"]["text"].startswith("nf4") and "Linear layers quantized" in badges["load"]["text"]
    control = badges["control"]["text"].split("\n")
    # the strength line of the node that applied the LoRA says what the model downstream carries
    assert control[0] == f"Control LoRA (bfl), strength 1; rescaled downstream to 0.85 (Set LoRA Scale #{ids['scale']})"
    assert "img_in widened to 128 inputs" in control
    assert badges["scale"]["text"] == f"{CONTROL}: strength 1 -> 0.85 (no reload)"
    style = badges["style"]
    assert style["text"].startswith("Style LoRA (kohya), strength 0.6\n") and "bnb-flux-warn" in style["classes"]
    assert ("\u26a0 2 text-encoder keys not applied here: load the file in ComfyUI's Load LoRA (Model and CLIP) node "
            "too and use only its CLIP output") in style["text"]
    assert style["clientHeight"] > 5 * style["lineHeight"], style  # the long warning wrapped onto more lines
    save = badges["save"]["text"].split("\n")
    assert save[0] == "saved diffusion_models/browser_00001_.safetensors", save
    assert re.fullmatch(r"\d+\.\d MiB, nf4, \d+ of \d+ Linear layers quantized", save[1]), save
    for name, badge in badges.items():
        assert not ({"bnb-flux-stale", "bnb-flux-error"} & set(badge["classes"])), (name, badge)
        assert_not_clipped(badge, name)
    # the badge is not saved into the workflow (the node's widgets_values stay as ComfyUI defines them)
    saved = page.evaluate("(id) => window.app.graph.getNodeById(id).serialize().widgets_values", ids["load"])
    assert saved == [MODEL, "nf4", True, "float32", False], saved

    # a narrower node: the text wraps at its new width and the node grows to fit
    page.evaluate("(id) => { const n = window.app.graph.getNodeById(id); n.setSize([230, n.size[1]]); }",
                  ids["control"])
    page.evaluate("(id) => { const n = window.app.graph.getNodeById(id); n.setSize([230, n.computeSize()[1]]);"
                  " n.setDirtyCanvas(true, true); }", ids["control"])
    page.wait_for_timeout(500)
    narrow = t("badge(a)", ids["control"])
    assert narrow["clientHeight"] > badges["control"]["clientHeight"], (narrow, badges["control"])
    assert_not_clipped(narrow, "narrow control")
    page.screenshot(path=os.path.join(shots, "badges_narrow_node.png"))


def page_text(page) -> str:
    return page.evaluate("() => document.body.innerText")


def test_failure_replaces_the_badge_and_shows_a_readable_error(browser_server):
    srv, page, shots = browser_server
    close_dialogs(page)
    t = editor_calls(page)
    ids = build_lora_graph(t)
    t("set(a, b, c)", ids["scale"], "lora_name", CONTROL)
    t("set(a, b, c)", ids["scale"], "strength", 0.85)
    assert run(page) == "execution_success"
    # nothing changed since the last test's run: ComfyUI served every node from its cache and sent the badges again
    assert t("badge(a)", ids["scale"])["text"] == f"{CONTROL}: strength 1 -> 0.85 (no reload)"
    # the user picks a file that is no safetensors file (an empty placeholder) for the style LoRA
    t("set(a, b, c)", ids["style"], "lora_name", "flux_style_lora.safetensors")
    assert run(page) == "execution_error"
    page.wait_for_timeout(1000)
    page.screenshot(path=os.path.join(shots, "badge_after_failure.png"))
    style = t("badge(a)", ids["style"])
    print("failed badge:", style["text"], "| tooltip:", style["title"], sep="\n")
    assert style["text"].startswith("failed: flux_style_lora.safetensors: not a readable safetensors file"), style
    assert "bnb-flux-error" in style["classes"] and "Style LoRA" not in style["text"]
    assert style["title"].startswith("failed (bnb_flux.BnbFluxError): flux_style_lora.safetensors: "), style["title"]
    assert_not_clipped({**style, "title": style["text"]}, "failed style")
    # downstream of the failure nothing ran: Set LoRA Scale's badge is dimmed, and the Control LoRA no longer
    # claims a rescale this run did not make; the loader and the Control LoRA served this run from ComfyUI's
    # cache: their badges stand
    assert "bnb-flux-stale" in t("badge(a)", ids["scale"])["classes"]
    for k in ("load", "control"):
        assert "bnb-flux-stale" not in t("badge(a)", ids[k])["classes"], k
    assert t("badge(a)", ids["control"])["text"].startswith("Control LoRA (bfl), strength 1\n")
    # the editor's toast names the node; its "View details" opens the error report: the exception type is the
    # pack's readable name, not the folder path ComfyUI loaded the pack from, and the message follows it
    page.get_by_text("View details").first.click()
    page.get_by_text("Exception Type").first.wait_for(timeout=20_000)
    page.wait_for_timeout(500)
    page.screenshot(path=os.path.join(shots, "error_details.png"))
    lines = page_text(page).splitlines()
    shown_type = [line for line in lines if "Exception Type" in line]
    shown_message = [line for line in lines if "Exception Message" in line]
    print("error report:", *shown_type, *shown_message, sep="\n")
    assert len(shown_type) == 1 and shown_type[0].endswith("bnb_flux.BnbFluxError"), shown_type
    assert "/" not in shown_type[0] and "\\" not in shown_type[0], shown_type
    assert len(shown_message) == 1 and shown_message[0].endswith(
        "bnb_flux.BnbFluxError: flux_style_lora.safetensors: not a readable safetensors file (Error while "
        "deserializing header: header too small); the download may be truncated or corrupted: download it again"), \
        shown_message
    close_side_panel(page)
    close_dialogs(page)


def test_prequantized_file_greys_out_quant_inputs(browser_server):
    srv, page, shots = browser_server
    close_dialogs(page)
    t = editor_calls(page)
    t("clear()")
    load = t("add(a, b, c, d)", "LoadBnbFlux", 20, 40, {"unet_name": MODEL, "quant_type": "int8", "double_quant": False,
                                                          "compute_dtype": "float32"})
    page.wait_for_timeout(500)
    assert t("widgetState(a, b)", load, "quant_type") == {"label": "quant_type", "disabled": False, "hidden": False,
                                                          "value": "int8"}
    t("set(a, b, c)", load, "unet_name", NF4_FILE)  # the user picks a pre-quantized file
    page.wait_for_function("(id) => window.bnbTest.widgetState(id, 'quant_type').disabled", arg=load, timeout=20_000)
    quant, double = t("widgetState(a, b)", load, "quant_type"), t("widgetState(a, b)", load, "double_quant")
    assert quant == {"label": "quant_type: nf4 (from file)", "disabled": True, "hidden": False, "value": "int8"}, quant
    assert double["label"] == "double_quant: on (from file)" and double["disabled"], double
    save = t("add(a, b, c, d)", "SaveBnbFlux", 420, 40, {"filename_prefix": "diffusion_models/browser_prequantized"})
    t("link(a, b, c, d)", load, 0, save, "model")
    t("view(a, b)", 1.0, [60, 90])
    page.wait_for_timeout(300)
    page.screenshot(path=os.path.join(shots, "prequantized_inputs_greyed.png"))
    # run as it is: the badge says plainly which setting the file overrides
    assert run(page) == "execution_success"
    badge = t("badge(a)", load)
    print("loader badge:", badge["text"], sep="\n")
    assert "\u26a0 quant_type int8 not used: this file is pre-quantized nf4, double quant" in badge["text"], badge
    assert "bnb-flux-warn" in badge["classes"]
    assert_not_clipped(badge, "prequantized loader")
    page.screenshot(path=os.path.join(shots, "prequantized_badge.png"))
    # saved and opened again, the workflow shows the inputs greyed out from the start
    workflow = page.evaluate("() => window.app.graph.serialize()")
    load_workflow(page, workflow)
    page.wait_for_function("(id) => window.bnbTest.widgetState(id, 'quant_type').disabled", arg=load, timeout=20_000)
    # back to a full-precision file: the inputs are the user's again
    t("set(a, b, c)", load, "unet_name", MODEL)
    page.wait_for_function("(id) => !window.bnbTest.widgetState(id, 'quant_type').disabled", arg=load, timeout=20_000)
    assert t("widgetState(a, b)", load, "quant_type") == {"label": "quant_type", "disabled": False, "hidden": False,
                                                          "value": "int8"}
    assert t("widgetState(a, b)", load, "double_quant")["label"] == "double_quant"


def test_lora_stack_renders_and_runs(browser_server):
    srv, page, shots = browser_server
    close_dialogs(page)
    t = editor_calls(page)
    t("clear()")
    load = t("add(a, b, c, d)", "LoadBnbFlux", 20, 40, {"unet_name": MODEL, "quant_type": "nf4", "double_quant": True,
                                                          "compute_dtype": "float32"})
    stack = t("add(a, b, c, d)", "ApplyLoraStack", 420, 40)
    shown = lambda: [n for n in page.evaluate(  # noqa: E731
        "(id) => window.app.graph.getNodeById(id).widgets.filter((w) => !w.hidden).map((w) => w.name)", stack)]
    assert shown() == ["lora_1"], shown()  # a new stack shows one empty slot
    t("set(a, b, c)", stack, "lora_1", CONTROL)
    t("set(a, b, c)", stack, "lora_2", STYLE)
    t("set(a, b, c)", stack, "strength_2", 0.6)
    t("set(a, b, c)", stack, "on_2", False)  # switched off: skipped, nothing reloaded
    assert shown() == ["lora_1", "strength_1", "on_1", "lora_2", "strength_2", "on_2", "lora_3"], shown()
    scale = t("add(a, b, c, d)", "SetLoraScale", 800, 40)
    t("link(a, b, c, d)", load, 0, stack, "model")
    t("link(a, b, c, d)", stack, 0, scale, "model")
    assert t("value(a, b)", scale, "lora_name") == CONTROL  # the nearest LoRA the stack applies (slot 2 is off)
    t("set(a, b, c)", scale, "strength", 0.5)
    sampler_nodes(t, scale)
    t("view(a, b)", 0.8, [60, 90])
    assert run(page) == "execution_success"
    page.screenshot(path=os.path.join(shots, "lora_stack.png"))
    badge = t("badge(a)", stack)
    print("stack badge:", badge["text"], sep="\n")
    lines = badge["text"].split("\n")
    assert lines[0] == (f"1. {CONTROL}: Control LoRA (bfl), strength 1; rescaled downstream to 0.5 "
                        f"(Set LoRA Scale #{scale})"), lines
    assert f"2. {STYLE}: off (skipped)" in lines, lines
    assert_not_clipped(badge, "stack")
    assert t("badge(a)", scale)["text"] == f"{CONTROL}: strength 1 -> 0.5 (no reload)"
    # switching slot 2 on runs the stack again, not the loader (ComfyUI serves its model from the cache)
    t("set(a, b, c)", stack, "on_2", True)
    assert run(page) == "execution_success"
    cached = page.evaluate("() => window.__bnbCached")
    assert str(load) in cached and str(stack) not in cached, cached
    lines = t("badge(a)", stack)["text"].split("\n")
    assert lines[3] == f"2. {STYLE}: Style LoRA (bfl), strength 0.6", lines
    page.screenshot(path=os.path.join(shots, "lora_stack_slot_on.png"))
