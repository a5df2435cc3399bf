"""The input images the example workflows name (``example_workflows/input/``), copied into ComfyUI's input
folder at start-up when a file of that name is missing there, so a template opens with its image in Load
Image. A file already there is never replaced: it may be the user's own picture under that name."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil

import folder_paths

log = logging.getLogger("comfyui-bnb-flux")
SHIPPED_INPUTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_workflows", "input")


def shipped_input_names(source: str = SHIPPED_INPUTS) -> list[str]:
    if not os.path.isdir(source):
        return []
    return sorted(n for n in os.listdir(source) if n.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))


def copy_example_inputs(source: str = SHIPPED_INPUTS, target: str | None = None) -> list[str]:
    """Copies each shipped input image that ``target`` (ComfyUI's input folder by default) lacks; returns
    the names copied. Failing to copy is logged, never raised: the pack's nodes do not need these files."""
    target = target or folder_paths.get_input_directory()
    names, copied = shipped_input_names(source), []
    try:
        os.makedirs(target, exist_ok=True)
    except OSError as e:  # FileExistsError too: a file where the folder should be
        _warn(names, target, source, e)
        return []
    for name in names:
        dest = os.path.join(target, name)
        try:
            out = open(dest, "xb")  # "x": never replace a file, even one that appeared meanwhile
        except FileExistsError:
            continue
        except OSError as e:
            _warn([name], target, source, e)
            continue
        try:
            with out, open(os.path.join(source, name), "rb") as src:
                shutil.copyfileobj(src, out)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(dest)  # no half-written image under the workflow's name
            _warn([name], target, source, e)
            continue
        copied.append(name)
    if copied:
        log.info("comfyui-bnb-flux: copied the example workflows' input images %s into %s", ", ".join(copied), target)
    return copied


def _warn(names, target, source, error):
    log.warning("comfyui-bnb-flux: could not copy the example input images %s into %s (%s); the example "
                "workflows' Load Image will miss them: copy them there from %s", ", ".join(names), target, error,
                source)
