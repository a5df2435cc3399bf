"""An older ComfyUI is named at start-up and makes every node fail with that message.

The start-up check reads ``comfyui_version.py`` as text. It is run against ComfyUI 0.3.64's own version file
(``COMFYUI_OLD_ARCHIVE``: the 0.3.64 source archive, which CI passes; only that one file is read from it) and
against the host the suite runs in; the nodes' refusal runs in the in-process host with the check's verdict
set to 0.3.64's.
"""
from __future__ import annotations

import os
import tarfile

import pytest
import torch

from quant_expand.comfyui.supported_comfyui import COMFYUI_VERSION, host_problem, installed_version


@pytest.fixture(scope="module")
def old_tree(tmp_path_factory):
    archive = os.environ.get("COMFYUI_OLD_ARCHIVE")
    if not archive:
        pytest.skip("COMFYUI_OLD_ARCHIVE not set: point it at a ComfyUI 0.3.x source archive (CI passes 0.3.64)")
    root = tmp_path_factory.mktemp("old-comfyui")
    with tarfile.open(archive) as t:
        member = next(m for m in t.getmembers() if m.name.endswith("/comfyui_version.py") and m.name.count("/") == 1)
        with t.extractfile(member) as f:
            (root / "comfyui_version.py").write_bytes(f.read())
    return str(root)


def test_older_comfyui_is_named_with_the_needed_version(old_tree):
    assert installed_version(old_tree) == "0.3.64"
    problem = host_problem(old_tree)
    assert problem.startswith(f"comfyui-bnb-flux needs ComfyUI {COMFYUI_VERSION} or newer, and this is ComfyUI 0.3.64")
    assert "update ComfyUI" in problem


def test_the_supported_host_passes(host):
    assert installed_version(os.environ["COMFYUI_PATH"]) == COMFYUI_VERSION
    assert host_problem(os.environ["COMFYUI_PATH"]) is None
    assert host.pack_module("nodes.host_check").HOST_PROBLEM is None


def test_every_node_fails_with_the_message_on_an_older_host(host, old_tree, monkeypatch):
    check = host.pack_module("nodes.host_check")
    monkeypatch.setattr(check, "HOST_PROBLEM", host_problem(old_tree))
    nodes = {n: host.pack_module(m) for n, m in (("LoadBnbFlux", "nodes.load_bnb_flux"),
                                                 ("ApplyControlLora", "nodes.apply_control_lora"),
                                                 ("SetLoraScale", "nodes.apply_control_lora"),
                                                 ("ApplyLoraStack", "nodes.apply_lora_stack"),
                                                 ("SaveBnbFlux", "nodes.save_bnb_flux"))}
    calls = {"LoadBnbFlux": ("x.safetensors", "nf4", True, "auto"), "ApplyControlLora": (None, "x.safetensors", 1.0),
             "SetLoraScale": (None, "x.safetensors", 1.0), "ApplyLoraStack": (None,), "SaveBnbFlux": (None, "flux")}
    errors = host.pack_module("quant_expand.errors").BnbFluxError
    for name, module in nodes.items():
        with pytest.raises(errors, match=r"needs ComfyUI 0\.33\.0 or newer, and this is ComfyUI 0\.3\.64"), torch.inference_mode():
            getattr(module, name).execute(*calls[name])
