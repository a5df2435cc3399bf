"""Shared fixtures.

Import convention: core tests import ``quant_expand`` from the repo root (torch + bitsandbytes only).
ComfyUI tests never import the pack themselves: the ``host`` fixture starts ComfyUI in-process from
``COMFYUI_PATH`` and loads this repo with ComfyUI's own ``nodes.load_custom_node`` (so the package is
named after its path, exactly as in a real install); tests reach the pack's modules through
``host.pack_module("quant_expand.layers")`` and therefore use the same class objects ComfyUI does.
"""
from __future__ import annotations

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def pytest_report_header(config):
    path = os.environ.get("COMFYUI_PATH")
    return f"COMFYUI_PATH: {path}" if path else "COMFYUI_PATH not set: ComfyUI tests will be skipped"


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        msg = "COMFYUI_PATH not set: ComfyUI tests need a ComfyUI checkout (see README, Testing)"
        print(msg)
        pytest.skip(msg)
    from comfy_host import ComfyHost

    return ComfyHost.start(path, REPO_ROOT, str(tmp_path_factory.mktemp("comfy-models")))
