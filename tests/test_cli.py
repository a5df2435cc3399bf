"""The command line's real-files graph is one ComfyUI accepts (validated, not run: no FLUX weights here)."""
from __future__ import annotations

import asyncio

import pytest

from quant_expand.tools.demo import canny_graph, find_comfyui
from quant_expand.cli import main


def test_find_comfyui_explains_what_to_do(monkeypatch, tmp_path):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(SystemExit, match="COMFYUI_PATH"):
        find_comfyui(str(tmp_path))


def test_real_files_mode_needs_every_file(monkeypatch):
    monkeypatch.setenv("COMFYUI_PATH", "/nonexistent")
    with pytest.raises(SystemExit):
        main(["demo", "--unet", "x.safetensors"])


def test_canny_graph_validates_in_comfyui(host, tmp_path):
    import execution
    import folder_paths
    from PIL import Image

    for kind, name in (("diffusion_models", "flux1-dev.safetensors"), ("loras", "flux1-canny-dev-lora.safetensors"),
                       ("vae", "ae.safetensors"), ("text_encoders", "clip_l.safetensors"),
                       ("text_encoders", "t5xxl.safetensors")):
        open(host.model_path(kind, name), "wb").close()  # validation only checks that the names exist
    old_input = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path))
    try:
        Image.new("RGB", (16, 16)).save(tmp_path / "edges.png")
        g = canny_graph("flux1-dev.safetensors", "flux1-canny-dev-lora.safetensors", "clip_l.safetensors",
                        "t5xxl.safetensors", "ae.safetensors", "edges.png", "a house")
        valid = asyncio.run(execution.validate_prompt("cli-test", g, None))
        assert valid[0], (valid[1], valid[3])
    finally:
        folder_paths.set_input_directory(old_input)
