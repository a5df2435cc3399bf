"""The pack as a user sees it: ComfyUI's editor in a headless Chromium (Debian's ``/usr/bin/chromium``,
driven by the Python ``playwright`` package; no browser is ever downloaded).

A real ComfyUI server on loopback (``server_host``: the pack in a temporary ``custom_nodes``, plus
test-only conditioning/latent nodes for the tiny FLUX). The test opens the editor, loads each example
workflow and checks that no node type is missing (and that a workflow with an unknown node does raise
the missing-nodes dialog, so the check can fail); then builds a small graph on the tiny FLUX in the
editor, queues it, and checks the badges of ``web/bnb_flux.js``. Screenshots go to the test's
output directory (printed; ``BNB_FLUX_SCREENSHOTS=DIR`` to keep them somewhere else).

Skipped, with the reason printed, without COMFYUI_PATH, without Chromium or without playwright.
"""
from __future__ import annotations

import json
import os

import pytest

from browser_host import CFG, CONTROL, EXAMPLES, MODEL, STYLE, browser_session, close_dialogs, load_workflow, \
    missing_dialog_text, UNKNOWN_NODES


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




BUILD_GRAPH = """
([model, control, style, ctx, vec]) => {
  const g = window.app.graph;
  g.clear();
  const add = (type, x, y, values) => {
    const n = window.LiteGraph.createNode(type);
    n.pos = [x, y];
    g.add(n);
    for (const [k, v] of Object.entries(values || {})) n.widgets.find((w) => w.name === k).value = v;
    return n;
  };
  const link = (a, slot, b, name) => a.connect(slot, b, b.findInputSlot(name));
  const load = add("LoadBnbFlux", 20, 40, {unet_name: model, quant_type: "nf4", double_quant: true,
                                          compute_dtype: "float32"});
  const c = add("ApplyControlLora", 420, 40, {lora_name: control, strength: 1.0});
  const s = add("ApplyControlLora", 780, 40, {lora_name: style, strength: 0.6});
  const cond = {tokens: 8, context_dim: ctx, pooled_dim: vec, guidance: 3.5};
  const pos = add("BnbFluxServerTestConditioning", 20, 380, {...cond, seed: 1});
  const neg = add("BnbFluxServerTestConditioning", 20, 600, {...cond, seed: 2});
  const lat = add("BnbFluxServerTestLatent", 420, 600, {size: 16});
  const ks = add("KSampler", 1140, 40, {seed: 3, steps: 1, cfg: 1.0, sampler_name: "euler", scheduler: "simple"});
  const save = add("SaveLatent", 1140, 420, {filename_prefix: "latents/browser"});
  link(load, 0, c, "model"); link(c, 0, s, "model"); link(s, 0, ks, "model");
  link(pos, 0, ks, "positive"); link(neg, 0, ks, "negative"); link(lat, 0, ks, "latent_image");
  link(ks, 0, save, "samples");
  const cw = ks.widgets.find((w) => w.name === "control_after_generate");
  if (cw) cw.value = "fixed";
  window.app.canvas.ds.scale = 0.85;
  window.app.canvas.ds.offset = [90, 110];
  g.setDirtyCanvas(true, true);
  return [load.id, c.id, s.id];
}
"""


def test_run_shows_badges(browser_server):
    srv, page, shots = browser_server
    close_dialogs(page)
    ids = page.evaluate(BUILD_GRAPH, [MODEL, CONTROL, STYLE, CFG.context_in_dim, CFG.vec_in_dim])
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    page.wait_for_function("() => document.querySelectorAll('.bnb-flux-badge').length >= 3", timeout=120_000)
    page.wait_for_timeout(1000)
    page.screenshot(path=os.path.join(shots, "badges_after_run.png"))
    texts = page.evaluate("""(ids) => ids.map((id) => {
        const w = (window.app.graph.getNodeById(id).widgets || []).find((w) => w.name === 'bnb_flux_info');
        return w ? w.element.textContent : null; })""", ids)
    print("badges:", *texts, sep="\n")
    loader, control, style = texts
    assert loader.startswith("nf4") and "Linear layers quantized" in loader and "MiB" in loader
    assert control.startswith("Control LoRA (bfl)") and "img_in widened to 128 inputs" in control
    assert style.startswith("Style LoRA") and "strength 0.6" in style
    # the badge is not saved into the workflow (the node's widgets_values stay as ComfyUI defines them)
    saved = page.evaluate("(id) => window.app.graph.getNodeById(id).serialize().widgets_values", ids[0])
    assert saved == [MODEL, "nf4", True, "float32", False], saved
