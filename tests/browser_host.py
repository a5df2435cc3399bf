"""The editor as a user meets it, for the browser tests: ComfyUI's real frontend in a headless Chromium
(Debian's ``/usr/bin/chromium``, driven by the Python ``playwright`` package; no browser is downloaded),
against a real ComfyUI server on loopback (``server_host``: the pack in a temporary ``custom_nodes``, plus
test-only conditioning/latent nodes for the tiny FLUX).

``browser_session`` is one module's server and page, with the tiny FLUX (also pre-quantized to NF4), a
Control LoRA, two style LoRAs (one with text-encoder keys) and an empty placeholder for every model file the
example workflows name (``model_placeholders=False``: none, as for a user who has downloaded nothing yet).
The pack itself copies the workflows' input images into the server's input folder at start-up. Screenshots
go to the printed directory
(``BNB_FLUX_SCREENSHOTS=DIR`` to keep them somewhere else). It skips, with the reason printed, without
COMFYUI_PATH, without Chromium or without playwright.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil

import pytest
import torch

from prequantized_files import forge_state_dict
from quant_expand.testing.synthetic import TinyFluxConfig, make_control_lora, make_lora, make_tiny_flux, save_safetensors
from server_host import ComfyServer, make_base_directory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(REPO_ROOT, "example_workflows", "*.json")))
CFG = TinyFluxConfig()
MODEL = "tiny_exact_nf4.safetensors"
CONTROL = "tiny_canny_lora.safetensors"
STYLE = "tiny_style_lora.safetensors"
NF4_FILE = "tiny_forge_nf4_dq.safetensors"  # pre-quantized (lllyasviel/Forge layout, NF4 with double quant)
STYLE_TE = "tiny_style_te_lora.safetensors"  # a kohya style LoRA with text-encoder keys (the badge warns)
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


# every model file the example workflows name, by ComfyUI model folder
EXAMPLE_MODEL_FILES = (
    ("diffusion_models", "flux1-dev.safetensors"), ("checkpoints", "flux1-dev-bnb-nf4-v2.safetensors"),
    ("loras", "flux1-canny-dev-lora.safetensors"), ("loras", "flux1-depth-dev-lora.safetensors"),
    ("loras", "flux_style_lora.safetensors"), ("text_encoders", "clip_l.safetensors"),
    ("text_encoders", "t5xxl_fp8_e4m3fn.safetensors"), ("vae", "ae.safetensors"),
    ("diffusion_models", "flux-2-klein-base-4b.safetensors"), ("text_encoders", "qwen_3_4b.safetensors"),
    ("vae", "flux2-vae.safetensors"), ("diffusion_models", "Chroma1-HD.safetensors"),
    ("text_encoders", "t5xxl_fp8_e4m3fn_scaled.safetensors"))


@contextlib.contextmanager
def browser_session(tmp_path_factory, model_placeholders: bool = True):
    """(server, page, screenshot directory) for one test module."""
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
    flux = make_tiny_flux(CFG, seed=0, exact_for="nf4")
    save_safetensors(flux, os.path.join(dirs["models/diffusion_models"], MODEL))
    save_safetensors(forge_state_dict(flux, "nf4", True, all_in_one=False),
                     os.path.join(dirs["models/diffusion_models"], NF4_FILE))
    save_safetensors(make_control_lora(CFG, seed=2), os.path.join(dirs["models/loras"], CONTROL))
    save_safetensors(make_lora(CFG, kind="lora", seed=11), os.path.join(dirs["models/loras"], STYLE))
    te = {f"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_{part}.weight": torch.zeros(shape)
          for part, shape in (("down", (4, 768)), ("up", (3072, 4)))}
    save_safetensors({**make_lora(CFG, kind="kohya", seed=12), **te}, os.path.join(dirs["models/loras"], STYLE_TE))
    # every model file the example workflows name, so the editor shows them as a user with the files sees
    # them (empty placeholders: nothing here runs them)
    for kind, name in EXAMPLE_MODEL_FILES if model_placeholders else ():
        os.makedirs(os.path.join(base, "models", kind), exist_ok=True)
        open(os.path.join(base, "models", kind, name), "wb").close()
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
    """Escape until no dialog is open (PrimeVue dialogs, and the frontend's own modal such as Templates)."""
    for _ in range(3):
        if not page.locator(".p-dialog, [data-testid='dialog-overlay']").count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)


def load_workflow(page, workflow: dict):
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
    page.wait_for_timeout(800)
