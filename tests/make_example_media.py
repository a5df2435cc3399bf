"""Regenerates the example workflows' media (never needed at run time):

- ``inputs``: the input images in ``example_workflows/input/``, drawn here: a flat cottage scene for the
  Canny workflows (Canny finds its edges) and a synthetic depth map (near = bright) for the Depth one.
- ``thumbnails``: ``example_workflows/<workflow name>.jpg``, what the template browser shows for each
  workflow: the graph as ComfyUI's editor draws it (headless Chromium, see ``browser_host``), with the
  workflow's input image in a corner (a text-to-image workflow: its prompt). Nothing in them is a model's
  output: there are no weights here.

Run with the Python of a ComfyUI install (COMFYUI_PATH set for ``thumbnails``), from the repo root:
``python tests/make_example_media.py inputs`` or ``... thumbnails [WORKFLOW NAME ...]`` (all by default).
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import tempfile

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO_ROOT, "example_workflows")
INPUTS = os.path.join(EXAMPLES, "input")
CANNY_INPUT = "bnb_flux_canny_example.png"
DEPTH_INPUT = "bnb_flux_depth_example.png"
WIDTH, HEIGHT = 1024, 768  # multiples of 16: the output FLUX image takes the control image's size
THUMB = 512  # the template browser shows a square card; the image is drawn at most 256 px high
THUMB_QUALITY = 82


def draw_canny_input() -> Image.Image:
    """A flat-colour cottage on a hill with a pine tree, mountains and the sun: regions of clearly
    different brightness, so ComfyUI's Canny (0.15 / 0.3) draws their outlines."""
    w, h = WIDTH, HEIGHT
    img = Image.new("RGB", (w, h), (150, 200, 240))
    d = ImageDraw.Draw(img)
    d.ellipse((800, 70, 920, 190), fill=(255, 250, 200))  # sun
    d.polygon([(-40, 470), (250, 150), (520, 470)], fill=(95, 110, 140))  # mountains
    d.polygon([(250, 150), (310, 217), (275, 205), (250, 228), (222, 210), (192, 214)], fill=(245, 245, 250))
    d.polygon([(330, 470), (600, 200), (900, 470)], fill=(80, 95, 125))
    d.polygon([(600, 200), (655, 255), (625, 248), (600, 270), (575, 250), (545, 256)], fill=(240, 240, 248))
    d.ellipse((-300, 400, 1400, 1300), fill=(90, 170, 70))  # hill
    d.polygon([(470, 768), (530, 560), (560, 560), (660, 768)], fill=(200, 170, 120))  # path
    d.rectangle((380, 400, 700, 580), fill=(245, 240, 225))  # cottage wall
    d.rectangle((610, 290, 640, 350), fill=(150, 90, 70), outline=(60, 30, 25), width=4)  # chimney
    d.polygon([(350, 410), (540, 270), (730, 410)], fill=(190, 50, 40), outline=(60, 30, 25), width=4)  # roof
    d.rectangle((505, 470, 575, 580), fill=(120, 75, 40))  # door
    d.ellipse((558, 520, 566, 528), fill=(230, 200, 60))
    for x0 in (410, 610):  # windows with crossbars
        d.rectangle((x0, 440, x0 + 60, 500), fill=(120, 170, 210), outline=(90, 60, 40), width=5)
        d.line((x0 + 30, 440, x0 + 30, 500), fill=(90, 60, 40), width=5)
        d.line((x0, 470, x0 + 60, 470), fill=(90, 60, 40), width=5)
    d.rectangle((842, 520, 868, 610), fill=(110, 70, 40))  # pine trunk
    for top, bottom, half in ((250, 380, 60), (310, 460, 80), (380, 540, 100)):  # pine crown
        d.polygon([(855, top), (855 - half, bottom), (855 + half, bottom)], fill=(30, 100, 50))
    return img


def draw_depth_map() -> Image.Image:
    """A depth map as Depth Anything or MiDaS give it (near = bright): a ground plane running to the
    horizon, a far sky, a crate in the middle distance and a ball in the foreground."""
    w, h = WIDTH, HEIGHT
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    horizon = 0.42 * h
    # ground: inverse distance grows linearly below the horizon
    depth = np.where(y > horizon, 20 + 215 * (y - horizon) / (h - horizon), 8.0)
    # crate: a box with a flat front face and a receding top
    front = (x > 620) & (x < 880) & (y > 330) & (y < 520)
    depth = np.where(front, 120.0, depth)
    top = (y >= 280) & (y <= 330) & (x > 620 + (330 - y) * 0.8) & (x < 880 + (330 - y) * 0.8)
    depth = np.where(top, 100 + 20 * (y - 280) / 50, depth)
    # ball: a sphere, nearest at its centre
    cx, cy, r = 300.0, 500.0, 170.0
    rr = ((x - cx) ** 2 + (y - cy) ** 2) / r ** 2
    depth = np.where(rr < 1, 185 + 60 * np.sqrt(np.clip(1 - rr, 0, 1)), depth)
    return Image.fromarray(np.clip(depth, 0, 255).round().astype(np.uint8), mode="L")


def write_inputs():
    os.makedirs(INPUTS, exist_ok=True)
    for name, img in ((CANNY_INPUT, draw_canny_input()), (DEPTH_INPUT, draw_depth_map())):
        path = os.path.join(INPUTS, name)
        img.save(path, optimize=True)
        print(f"wrote {os.path.relpath(path, REPO_ROOT)} ({os.path.getsize(path) // 1024} KiB)")


# ---------------------------------------------------------------------------------------------------
# thumbnails


class _TmpFactory:
    """What ``browser_session`` asks of pytest's tmp_path_factory."""

    def __init__(self, root):
        self.root = root

    def mktemp(self, name):
        return tempfile.mkdtemp(prefix=name + "-", dir=self.root)


def workflow_input_image(workflow: dict) -> str | None:
    for n in workflow["nodes"]:
        if n["type"] == "LoadImage":
            return n["widgets_values"][0]
    return None


# the nodes that make a template what it is: the model and the LoRAs on it, and for a text-to-image
# template (no LoRA) the text encoder it needs
CHAIN = ("LoadBnbFlux", "ApplyControlLora", "SetLoraScale")
TEXT_TO_IMAGE_CHAIN = ("LoadBnbFlux", "CLIPLoader")
# what each thumbnail says on top, in words a user choosing a template needs
CAPTIONS = {
    "Canny Control - NF4 checkpoint": ("Start here: a ready NF4 file", "nothing to quantize, a ~12 GB file"),
    "Canny Control - quantize on load": ("FLUX.1-dev (23.8 GB) quantized", "to NF4 at every start"),
    "Depth Control - quantize on load": ("FLUX.1-dev (23.8 GB) quantized", "to NF4, a depth map as control"),
    "Style LoRA + Canny Control": ("Control LoRA + your style LoRA", "strengths change without reloading"),
    "FLUX.2 klein 4B - text to image": ("FLUX.2 [klein] 4B in NF4", "quantized on load, Qwen3-4B prompt"),
    "Chroma - text to image": ("Chroma1-HD in NF4", "quantized on load, T5-only prompt"),
}

CHAIN_LAYOUT = """([types, gap]) => {
  const g = window.app.graph;
  for (const n of [...g._nodes]) if (!types.includes(n.type)) g.remove(n);
  const chain = [...g._nodes].sort((a, b) => a.pos[0] - b.pos[0]);
  let y = 24;  // room for the node-source badge the editor draws above a node's title
  for (const n of chain) { n.pos = [0, y + 30]; y += n.size[1] + 30 + gap; }
  const width = Math.max(...chain.map((n) => n.size[0]));
  return [width, y - gap];
}"""


def chain_types(workflow: dict) -> tuple[str, ...]:
    return CHAIN if workflow_input_image(workflow) else TEXT_TO_IMAGE_CHAIN


def positive_prompt(workflow: dict) -> str:
    (text,) = [n["widgets_values"][0] for n in workflow["nodes"]
               if n["type"] == "CLIPTextEncode" and "Positive" in n.get("title", "")]
    return text


def prompt_panel(text: str, width: int, height: int) -> Image.Image:
    """The prompt as a text box, where an image-to-image template shows its input image."""
    panel = Image.new("RGB", (width, height), (24, 24, 24))
    d = ImageDraw.Draw(panel)
    font = ImageFont.load_default(size=17)
    lines, line = [], ""
    for word in text.split():
        if line and d.textlength(line + " " + word, font=font) > width - 20:
            lines.append(line)
            line = word
        else:
            line = (line + " " + word).strip()
    lines.append(line)
    fits = (height - 18) // 22
    if len(lines) > fits:  # a long prompt ends in an ellipsis
        lines = lines[:fits - 1] + [lines[fits - 1].rstrip(",.") + " ..."]
    for k, line in enumerate(lines):
        d.text((10, 10 + 22 * k), line, fill=(210, 210, 210), font=font)
    return panel


def chain_screenshot(page, workflow: dict) -> Image.Image:
    """The workflow's model chain (Load BnB Flux and its LoRA nodes) as the editor draws it, stacked
    top to bottom at a zoom where the widgets read; the rest of the graph is left out of the picture.
    Read from the canvas bitmap itself, so no toolbar or panel of the page covers it."""
    import base64

    from browser_host import close_dialogs, load_workflow

    load_workflow(page, workflow)
    close_dialogs(page)
    width, height = page.evaluate(CHAIN_LAYOUT, [list(chain_types(workflow)), 50])
    data_url = page.evaluate("""([width, height, margin]) => {
      const canvas = window.app.canvas, el = canvas.canvas;
      const scale = Math.min(1.6, (el.height - 2 * margin) / height, (el.width - 2 * margin) / width);
      canvas.ds.scale = scale;
      canvas.ds.offset = [margin / scale, margin / scale];
      canvas.draw(true, true);
      const crop = document.createElement('canvas');
      crop.width = Math.ceil(width * scale + 2 * margin);
      crop.height = Math.ceil(height * scale + 2 * margin);
      crop.getContext('2d').drawImage(el, 0, 0, crop.width, crop.height, 0, 0, crop.width, crop.height);
      return crop.toDataURL('image/png');
    }""", [width, height, 12])
    png = base64.b64decode(data_url.split(",", 1)[1])
    return Image.open(io.BytesIO(png)).convert("RGB")


def compose_thumbnail(chain: Image.Image, control: Image.Image | None, caption: tuple[str, str],
                      label: str = "input") -> Image.Image:
    """Square, on the editor's dark grey: the model chain on the left, the input image (the control the
    workflow starts from, or a text-to-image workflow's prompt) on the right, the caption at the bottom.
    The top left stays plain: the template browser lays its "Node graph" badge over it."""
    bg, fg, dim = (32, 32, 32), (240, 240, 240), (170, 170, 170)
    thumb = Image.new("RGB", (THUMB, THUMB), bg)
    d = ImageDraw.Draw(thumb)
    pad, badge_h, caption_top = 12, 96, THUMB - 96
    c = chain.copy()
    c.thumbnail((int(THUMB * 0.6), caption_top - badge_h - pad), Image.LANCZOS)
    thumb.paste(c, (pad, badge_h + (caption_top - badge_h - pad - c.height) // 2))
    if control is not None:
        x0 = pad + c.width + pad
        img = control.convert("RGB")
        img.thumbnail((THUMB - x0 - pad, caption_top - badge_h - pad - 30), Image.LANCZOS)
        y0 = badge_h + (caption_top - badge_h - pad - 30 - img.height) // 2
        d.rectangle((x0 - 2, y0 - 2, x0 + img.width + 1, y0 + img.height + 1), fill=(90, 90, 90))
        thumb.paste(img, (x0, y0))
        d.text((x0, y0 + img.height + 6), label, fill=dim, font=ImageFont.load_default(size=18))
    d.text((16, caption_top + 10), caption[0], fill=fg, font=ImageFont.load_default(size=30))
    d.text((16, caption_top + 50), caption[1], fill=dim, font=ImageFont.load_default(size=22))
    return thumb


def write_thumbnails(names=()):
    sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), REPO_ROOT]  # as conftest.py does for the tests
    from browser_host import browser_session

    workflows = sorted(glob.glob(os.path.join(EXAMPLES, "*.json")))
    if names:
        unknown = set(names) - {os.path.splitext(os.path.basename(p))[0] for p in workflows}
        if unknown:
            raise SystemExit(f"no example workflow named {sorted(unknown)}")
        workflows = [p for p in workflows if os.path.splitext(os.path.basename(p))[0] in names]
    with tempfile.TemporaryDirectory() as tmp:
        with browser_session(_TmpFactory(tmp)) as (_, page, _):
            page.set_viewport_size({"width": 1400, "height": 1400})
            for path in workflows:
                with open(path, encoding="utf-8") as f:
                    workflow = json.load(f)
                name = os.path.splitext(os.path.basename(path))[0]
                image = workflow_input_image(workflow)
                chain = chain_screenshot(page, workflow)
                if image:
                    thumb = compose_thumbnail(chain, Image.open(os.path.join(INPUTS, image)), CAPTIONS[name])
                else:
                    side = THUMB - 3 * 12 - min(chain.width, int(THUMB * 0.6))
                    panel = prompt_panel(positive_prompt(workflow), side, 220)
                    thumb = compose_thumbnail(chain, panel, CAPTIONS[name], label="prompt")
                out = os.path.join(EXAMPLES, name + ".jpg")
                thumb.save(out, quality=THUMB_QUALITY, optimize=True)
                print(f"wrote {os.path.relpath(out, REPO_ROOT)} ({os.path.getsize(out) // 1024} KiB)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["inputs", "thumbnails"])
    parser.add_argument("names", nargs="*", help="thumbnails: only these workflows (file names without .json)")
    args = parser.parse_args(argv)
    write_inputs() if args.what == "inputs" else write_thumbnails(args.names)


if __name__ == "__main__":
    main()
