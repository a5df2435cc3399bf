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

import glob
import json
import os
import shutil

import pytest

from quant_expand.testing.synthetic import TinyFluxConfig, make_control_lora, make_lora, make_tiny_flux, save_safetensors
from server_host import ComfyServer, make_base_directory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(REPO_ROOT, "example_workflows", "*.json")))
CFG = TinyFluxConfig()
MODEL = "tiny_exact_nf4.safetensors"
CONTROL = "tiny_canny_lora.safetensors"
STYLE = "tiny_style_lora.safetensors"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def skip(msg):
    print(msg)
    pytest.skip(msg)


def chromium_path():
    for p in (os.environ.get("BNB_FLUX_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser")):
        if p and os.path.isfile(p):
            return p
    return None


@pytest.fixture(scope="module")
def browser_server(tmp_path_factory):
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        skip("COMFYUI_PATH not set: the browser test needs a ComfyUI checkout (see README, Testing)")
    chromium = chromium_path()
    if chromium is None:
        skip("no Chromium at /usr/bin/chromium (apt-get install chromium): browser test skipped")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip("the playwright Python package is not installed (pip install playwright; no browser download "
             "needed): browser test skipped")
    base = str(tmp_path_factory.mktemp("comfy-browser-base"))
    dirs = make_base_directory(base, REPO_ROOT)
    save_safetensors(make_tiny_flux(CFG, seed=0, exact_for="nf4"), os.path.join(dirs["models/diffusion_models"], MODEL))
    save_safetensors(make_control_lora(CFG, seed=2), os.path.join(dirs["models/loras"], CONTROL))
    save_safetensors(make_lora(CFG, kind="lora", seed=11), os.path.join(dirs["models/loras"], STYLE))
    # every file the example workflows name, so the editor shows them as a user with the files sees them
    # (empty placeholders: nothing here runs them)
    from PIL import Image

    for kind, name in (("diffusion_models", "flux1-dev.safetensors"), ("loras", "flux1-canny-dev-lora.safetensors"),
                       ("loras", "flux1-depth-dev-lora.safetensors"), ("loras", "flux_style_lora.safetensors"),
                       ("text_encoders", "clip_l.safetensors"), ("text_encoders", "t5xxl_fp8_e4m3fn.safetensors"),
                       ("vae", "ae.safetensors")):
        os.makedirs(os.path.join(base, "models", kind), exist_ok=True)
        open(os.path.join(base, "models", kind, name), "wb").close()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(os.path.join(dirs["input"], "example.png"))
    Image.new("RGB", (64, 64), (40, 40, 40)).save(os.path.join(dirs["input"], "depth_map.png"))
    # a returning user: no first-run templates dialog over the canvas
    os.makedirs(os.path.join(dirs["user"], "default"), exist_ok=True)
    with open(os.path.join(dirs["user"], "default", "comfy.settings.json"), "w") as f:
        json.dump({"Comfy.TutorialCompleted": True}, f)
    srv = ComfyServer(comfy, base, os.path.join(str(tmp_path_factory.mktemp("comfy-browser-log")), "comfyui.log"))
    shots = os.environ.get("BNB_FLUX_SCREENSHOTS") or str(tmp_path_factory.mktemp("screenshots"))
    os.makedirs(shots, exist_ok=True)
    print(f"\nscreenshots: {shots}")
    try:
        srv.start()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(srv.url + "/", wait_until="domcontentloaded", timeout=120_000)
                page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
                page.wait_for_timeout(1500)
                page.keyboard.press("Escape")
                yield srv, page, shots
            finally:
                browser.close()
    finally:
        srv.stop()


def missing_dialog_text(page) -> str:
    """What the editor says about missing nodes: a dialog (older frontends) or a "Missing node: X" toast."""
    texts = page.locator(".p-dialog").all_inner_texts()
    lines = [t for t in texts if "missing" in t.lower()]
    body = page.evaluate("() => document.body.innerText")
    lines += [line for line in body.splitlines() if "missing node" in line.lower()]
    return "\n".join(lines)


UNKNOWN_NODES = """() => window.app.graph._nodes
    .filter((n) => !window.LiteGraph.registered_node_types[n.type] || n.has_errors)
    .map((n) => n.type)"""


def close_dialogs(page):
    for _ in range(3):
        if not page.locator(".p-dialog").count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)


def load_workflow(page, workflow: dict):
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
    page.wait_for_timeout(800)


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
