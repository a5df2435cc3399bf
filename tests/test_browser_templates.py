"""The example workflows as a user meets them in ComfyUI's template browser (frontend 1.49, headless
Chromium, see ``browser_host``), on a server where none of the model files has been downloaded yet.

The user opens Templates from the sidebar, picks this pack's section (titled by ``locales/en/main.json``),
sees every template with its title and thumbnail, opens one, and finds each model file it needs in the
Missing Models panel with its folder and a Download button that goes to the file's URL (requests to
huggingface.co are answered here by the test: nothing leaves the machine). Screenshots go to the printed
directory (``BNB_FLUX_SCREENSHOTS=DIR`` to keep them).

Skipped, with the reason printed, without COMFYUI_PATH, without Chromium or without playwright.
"""
from __future__ import annotations

import json
import os
import urllib.parse

import pytest

from browser_host import EXAMPLES, REPO_ROOT, browser_session, close_dialogs
from server_host import PACK_DIR_NAME

TEMPLATES = [os.path.splitext(os.path.basename(p))[0] for p in EXAMPLES]
NF4_CHECKPOINT = "Canny Control - NF4 checkpoint"
STYLE = "Style LoRA + Canny Control"
# templates whose every file has a link, and how many files each needs
LINKED_TEMPLATES = {NF4_CHECKPOINT: 5, "FLUX.2 klein 4B - text to image": 3, "Chroma - text to image": 3}
SECTION_TITLE = "BnB Flux"
SHIPPED_INPUTS = os.path.join(REPO_ROOT, "example_workflows", "input")
THUMBNAIL_SIZE = 512  # ours; the frontend's fallback picture for a thumbnail that fails is 224 px wide


def workflow(name: str) -> dict:
    with open(os.path.join(REPO_ROOT, "example_workflows", name + ".json"), encoding="utf-8") as f:
        return json.load(f)


def model_links(name: str) -> dict:
    """{file name: (url, directory)} from the workflow's properties.models."""
    return {m["name"]: (m["url"], m["directory"])
            for n in workflow(name)["nodes"] for m in n.get("properties", {}).get("models", [])}


@pytest.fixture(scope="module")
def editor(tmp_path_factory):
    with browser_session(tmp_path_factory, model_placeholders=False) as (srv, page, shots):
        opened = []  # URLs the page navigated to on huggingface.co (a Download button's new tab)

        def answer_huggingface(route, request):
            if request.resource_type == "document":
                opened.append(request.url)
                route.fulfill(status=200, content_type="text/plain", body="(test: not downloaded)")
            else:  # the panel's metadata look-ups (file size, gated repository)
                route.abort()

        page.context.route("https://huggingface.co/**", answer_huggingface)
        served = {}  # path -> HTTP status of what the page fetched from the pack's template folder

        def note_template_file(response):
            path = urllib.parse.unquote(urllib.parse.urlsplit(response.url).path)
            if path.startswith(f"/api/workflow_templates/{PACK_DIR_NAME}/"):
                served[path] = response.status

        page.on("response", note_template_file)
        srv.served = served
        yield srv, page, shots, opened


def open_section(page):
    """Templates in the sidebar, then this pack's entry under Extensions: what a user clicks."""
    close_dialogs(page)
    page.locator(".templates-tab-button").first.click()
    nav = page.get_by_role("button").filter(has_text=SECTION_TITLE)
    nav.first.wait_for(timeout=30_000)
    nav.first.click()
    page.locator(f"[data-testid='template-workflow-{TEMPLATES[0]}']").wait_for(timeout=30_000)


def test_server_lists_the_templates(editor):
    """ComfyUI lists the top-level workflows under the pack's folder name: not api/ nor input/."""
    srv, *_ = editor
    assert sorted(srv.get_json("/workflow_templates")[PACK_DIR_NAME]) == sorted(TEMPLATES)


def test_pack_put_its_inputs_in_the_input_folder(editor):
    """At start-up the pack copied the images its workflows load into the server's input folder, and
    ComfyUI serves them there (what Load Image shows)."""
    srv, *_ = editor
    names = sorted(os.listdir(SHIPPED_INPUTS))
    assert names
    for name in names:
        status, body = srv.get("/view?" + urllib.parse.urlencode({"filename": name, "type": "input"}))
        with open(os.path.join(SHIPPED_INPUTS, name), "rb") as f:
            assert status == 200 and body == f.read(), name


def test_section_shows_every_template_with_title_and_thumbnail(editor):
    srv, page, shots, _ = editor
    open_section(page)
    nav_labels = page.get_by_role("button").all_inner_texts()
    assert SECTION_TITLE in nav_labels and PACK_DIR_NAME not in nav_labels  # the title, not the folder name
    cards = page.locator("[data-testid^='template-workflow-']")
    assert sorted(cards.evaluate_all("els => els.map(e => e.dataset.testid)")) == \
        sorted(f"template-workflow-{name}" for name in TEMPLATES)
    for name in TEMPLATES:
        card = page.locator(f"[data-testid='template-workflow-{name}']")
        assert card.locator("h3").inner_text().strip() == name
        card.scroll_into_view_if_needed()
        img = card.locator("img").first
        img.wait_for(timeout=15_000)
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=img.element_handle(),
                               timeout=15_000)
        # the frontend fetches the thumbnail and shows it from a blob: URL; a failed one is replaced by
        # its own 224 px placeholder
        assert srv.served.get(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.jpg") == 200, srv.served
        src, width, height = img.evaluate("(img) => [img.src, img.naturalWidth, img.naturalHeight]")
        assert (width, height) == (THUMBNAIL_SIZE, THUMBNAIL_SIZE), (name, src, width, height)
    page.screenshot(path=os.path.join(shots, "template_browser.png"))
    close_dialogs(page)


def open_template(page, name: str):
    open_section(page)
    page.locator(f"[data-testid='template-workflow-{name}']").click()
    page.wait_for_function("(n) => (window.app.graph._nodes || []).length === n",
                           arg=len(workflow(name)["nodes"]), timeout=30_000)
    page.locator("[data-testid='error-overlay-see-errors']").click()  # "View details" on the errors toast
    page.locator("[data-testid='error-group-missing-model']").wait_for(timeout=30_000)
    page.wait_for_timeout(1000)


def missing_model_row(page, name: str):
    group = page.locator("[data-testid='error-group-missing-model']")
    label = group.get_by_text(name, exact=True).first
    return label.locator("xpath=ancestor::div[contains(concat(' ', @class, ' '), ' mb-1 ')][1]")


@pytest.mark.parametrize("name", sorted(LINKED_TEMPLATES))
def test_template_missing_models_link_their_downloads(editor, name):
    """Each file of the NF4 checkpoint template (the one to try first) and of the text-to-image templates is
    in the Missing Models panel under its folder, and its Download button opens the file's URL from the
    workflow (not "Unknown", not a bare name)."""
    srv, page, shots, opened = editor
    open_template(page, name)
    page.screenshot(path=os.path.join(shots, f"{name} missing models.png"))
    links = model_links(name)
    assert len(links) == LINKED_TEMPLATES[name]
    group = page.locator("[data-testid='error-group-missing-model']")
    assert "Unknown" not in group.inner_text()
    assert group.locator("[data-testid='missing-model-download']").count() == len(links)
    for name, (url, directory) in links.items():
        row = missing_model_row(page, name)
        assert directory in row.inner_text().split("\n"), row.inner_text()
        opened.clear()
        with page.context.expect_page() as new_tab:
            row.locator("[data-testid='missing-model-download']").click()
        new_tab.value.wait_for_load_state()
        assert opened == [url], (name, opened)
        new_tab.value.close()


def test_a_file_without_link_is_shown_as_unknown(editor):
    """The check above can fail: the style LoRA (the user's own pick, no link in the workflow) is listed
    without a folder or a Download button, while the linked files of the same template have both."""
    srv, page, shots, _ = editor
    open_template(page, STYLE)
    page.screenshot(path=os.path.join(shots, "style_template_missing_models.png"))
    style = missing_model_row(page, "flux_style_lora.safetensors")
    assert "Unknown" in style.inner_text()
    assert style.locator("[data-testid='missing-model-download']").count() == 0
    for name, (_, directory) in model_links(STYLE).items():
        row = missing_model_row(page, name)
        assert directory in row.inner_text().split("\n")
        assert row.locator("[data-testid='missing-model-download']").count() == 1
