"""Finding the pack's nodes and reading their help in ComfyUI's editor, as a user does: double-click on
the empty canvas, type into the node search box, read the result list; select a node and open its Node
Info panel; switch the editor to Chinese. Headless Chromium against a real ComfyUI server
(``browser_host``); screenshots of each result list and panel go to the printed directory.

Skipped, with the reason printed, without COMFYUI_PATH, without Chromium or without playwright.
"""
from __future__ import annotations

import json
import os
import re

import pytest

from browser_host import REPO_ROOT, browser_session, close_dialogs

RESULT_TITLES = """() => [...document.querySelectorAll('#results-list [role=option]')]
    .map((e) => e.querySelector('span.truncate').innerText)"""
RESULT_ROWS = "() => [...document.querySelectorAll('#results-list [role=option]')].map((e) => e.innerText)"


@pytest.fixture(scope="module")
def browser_server(tmp_path_factory):
    with browser_session(tmp_path_factory) as session:
        yield session


def clear_canvas(page):
    close_dialogs(page)
    page.evaluate("() => { window.app.graph.clear(); window.app.graph.setDirtyCanvas(true, true); }")
    page.wait_for_timeout(300)


def search(page, shots, query: str, shot_prefix: str = "search") -> tuple[list[str], list[str]]:
    """The titles and whole rows (title, category, description) the node search box lists for ``query``,
    typed key by key into the box that a double-click on the empty canvas opens; a screenshot of the list
    is kept."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    clear_canvas(page)
    box = page.get_by_role("combobox")
    for attempt in range(3):
        # on a loaded machine the editor can take the two clicks for two single clicks: double-click again
        page.mouse.dblclick(700, 450)
        try:
            box.wait_for(state="visible", timeout=10_000)
            break
        except PlaywrightTimeout:
            if attempt == 2:
                raise
            page.keyboard.press("Escape")
    page.keyboard.type(query, delay=30)
    # the list is filtered as the user types: wait until it settles on the same titles twice
    previous = None
    for _ in range(20):
        page.wait_for_timeout(250)
        titles = page.evaluate(RESULT_TITLES)
        if titles == previous:
            break
        previous = titles
    page.screenshot(path=os.path.join(shots, f"{shot_prefix}_{re.sub(r'[^a-z0-9]+', '_', query)}.png"))
    rows = page.evaluate(RESULT_ROWS)
    page.keyboard.press("Escape")
    print(f"search {query!r}: {titles[:8]}")
    return titles, rows


@pytest.mark.parametrize("query", ["nf4", "bitsandbytes", "fp4", "quantized"])
def test_search_finds_the_loader(browser_server, query):
    srv, page, shots = browser_server
    titles, rows = search(page, shots, query)
    assert "Load BnB Flux" in titles[:2], titles[:5]  # "quantized" also finds core's Quantize Image
    if query in ("nf4", "bitsandbytes"):
        assert titles[0] == "Load BnB Flux", titles[:5]
    row = rows[titles.index("Load BnB Flux")]
    assert "model / loaders / bnb flux" in row, row  # the category shown beside core's loaders


def test_search_finds_the_lora_nodes(browser_server):
    srv, page, shots = browser_server
    titles, _ = search(page, shots, "control lora")
    assert titles[0] == "Apply Control LoRA", titles[:5]
    assert "Set LoRA Scale" in titles[:5], titles[:5]
    titles, _ = search(page, shots, "lora strength")
    assert titles[0] == "Set LoRA Scale", titles[:5]
    for query in ("lora stack", "multiple loras"):
        titles, rows = search(page, shots, query)
        assert titles[0] == "Apply LoRA Stack", titles[:5]
        assert "model / loaders / bnb flux" in rows[0], rows[0]


def test_search_finds_the_saver_beside_core_savers(browser_server):
    srv, page, shots = browser_server
    titles, rows = search(page, shots, "save model")
    assert "Save BnB Flux" in titles[:5] and "Save Checkpoint" in titles[:5], titles[:5]
    assert "model / merging" in rows[titles.index("Save BnB Flux")]


def test_search_does_not_list_the_pack_for_unrelated_words(browser_server):
    """The searches above can fail: a query with nothing to do with the pack lists none of its nodes."""
    srv, page, shots = browser_server
    titles, _ = search(page, shots, "upscale")
    pack = {"Load BnB Flux", "Apply Control LoRA", "Apply LoRA Stack", "Set LoRA Scale", "Save BnB Flux"}
    assert titles and not pack & set(titles)


def node_info_panel(page, shots, node_type: str, name: str) -> str:
    """The text of the Node Info panel for a freshly added node of ``node_type``."""
    clear_canvas(page)
    page.evaluate("""(t) => { const g = window.app.graph;
        const n = window.LiteGraph.createNode(t); n.pos = [100, 200]; g.add(n);
        window.app.canvas.selectNode(n); g.setDirtyCanvas(true, true); }""", node_type)
    page.wait_for_timeout(500)
    page.click("[data-testid=info-button]")
    panel = page.locator(".node-help-content")
    panel.wait_for(state="visible", timeout=15_000)
    page.wait_for_timeout(500)
    page.screenshot(path=os.path.join(shots, f"{name}.png"))
    text = panel.inner_text()
    page.click("[data-testid=info-button]")  # closes the panel again
    return text


@pytest.mark.parametrize("node_type", ["LoadBnbFlux", "ApplyControlLora", "ApplyLoraStack", "SetLoraScale",
                                       "SaveBnbFlux"])
def test_node_info_panel_shows_the_docs_page(browser_server, node_type):
    """The panel renders web/docs/<NodeId>.md (headings and lists in the panel's width) instead of the
    description and a table of tooltips."""
    srv, page, shots = browser_server
    with open(os.path.join(REPO_ROOT, "web", "docs", f"{node_type}.md"), encoding="utf-8") as f:
        headings = re.findall(r"^#+ (.+)$", f.read(), re.M)
    text = node_info_panel(page, shots, node_type, f"node_info_{node_type}")
    for heading in headings:
        assert heading in text, (heading, text[:300])


def switch_language(page, locale: str):
    """Comfy.Locale set as the settings dialog does (stored on the server), then the editor reloaded:
    frontend 1.49 translates node names when it loads the node definitions, so a live switch leaves
    every node name, core's too, in the old language until the next load."""
    page.evaluate("async (l) => { await window.app.extensionManager.setting.set('Comfy.Locale', l); }", locale)
    page.reload(wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
    page.wait_for_timeout(1500)
    page.keyboard.press("Escape")


def test_chinese_editor_shows_translated_names_and_docs(browser_server):
    srv, page, shots = browser_server
    with open(os.path.join(REPO_ROOT, "locales", "zh", "nodeDefs.json"), encoding="utf-8") as f:
        zh = json.load(f)
    switch_language(page, "zh")
    try:
        titles, rows = search(page, shots, "nf4", shot_prefix="search_zh")
        assert titles[0] == zh["LoadBnbFlux"]["display_name"], titles[:5]
        assert zh["SaveBnbFlux"]["display_name"] in titles, titles
        assert zh["LoadBnbFlux"]["description"][:20] in rows[0], rows[0]
        text = node_info_panel(page, shots, "LoadBnbFlux", "node_info_LoadBnbFlux_zh")
        assert "常见错误" in text and "需要下载的文件" in text, text[:300]  # web/docs/LoadBnbFlux/zh.md
        labels = page.evaluate("() => window.app.graph._nodes[0].widgets.map((w) => w.label || w.name)")
        assert zh["LoadBnbFlux"]["inputs"]["quant_type"]["name"] in labels, labels
    finally:
        switch_language(page, "en")
    assert page.evaluate("() => window.LiteGraph.registered_node_types.LoadBnbFlux.title") == "Load BnB Flux"
