"""Registry readiness: what the Comfy Registry and ComfyUI-Manager read from pyproject.toml (no ComfyUI)."""
from __future__ import annotations

import os
import re
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if sys.version_info < (3, 11):
    pytest.skip("tomllib needs Python 3.11", allow_module_level=True)
import tomllib


@pytest.fixture(scope="module")
def pyproject():
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_project_fields(pyproject):
    project = pyproject["project"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", project["name"]) and len(project["name"]) < 100
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["license"] == {"file": "LICENSE"} and os.path.isfile(os.path.join(REPO_ROOT, "LICENSE"))
    assert project["description"] and project["urls"]["Repository"].startswith("https://")


def test_tool_comfy_fields(pyproject):
    comfy = pyproject["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert comfy["Icon"].startswith("https://") and comfy["Icon"].endswith("web/icon.svg")
    assert os.path.isfile(os.path.join(REPO_ROOT, "web", "icon.svg"))  # the file the Icon URL points at
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])


def test_requirements_txt_equals_dependencies(pyproject):
    with open(os.path.join(REPO_ROOT, "requirements.txt")) as f:
        reqs = [line.split("#")[0].strip() for line in f]
    assert [r for r in reqs if r] == pyproject["project"]["dependencies"]
    assert not any(r.startswith("torch") for r in reqs)  # torch comes from the ComfyUI install


def test_web_directory_exists():
    with open(os.path.join(REPO_ROOT, "__init__.py")) as f:
        assert 'WEB_DIRECTORY = "./web"' in f.read()
    assert os.path.isfile(os.path.join(REPO_ROOT, "web", "bnb_flux.js"))


def test_one_supported_comfyui_version(pyproject):
    """quant_expand/comfyui/supported_comfyui.py names the ComfyUI release; pyproject, the README, the quick
    start's known archives and CI's pinned host all say the same."""
    from quant_expand.comfyui.supported_comfyui import COMFYUI_ARCHIVES, COMFYUI_VERSION

    assert pyproject["tool"]["comfy"]["requires-comfyui"] == f">={COMFYUI_VERSION}"
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert f"ComfyUI {COMFYUI_VERSION} (tested)" in readme and f"`v{COMFYUI_VERSION}` tag of ComfyUI" in readme
    assert set(COMFYUI_ARCHIVES.values()) == {COMFYUI_VERSION}
    with open(os.path.join(REPO_ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert re.findall(r"COMFYUI_ARCHIVE=\S*ComfyUI-([0-9.]+)\.tar\.gz", ci) == [COMFYUI_VERSION]


def test_quickstart_reads_the_same_version():
    """quickstart.py runs before anything is installed: it reads the constants file, not the package."""
    import runpy

    from quant_expand.comfyui import supported_comfyui

    qs = runpy.run_path(os.path.join(REPO_ROOT, "quickstart.py"))
    assert qs["SUPPORTED"]["COMFYUI_VERSION"] == supported_comfyui.COMFYUI_VERSION
    vt = supported_comfyui.version_tuple
    assert vt("0.3.64") < vt("0.33.0") < vt("0.33.1") < vt("1.0") and vt("0.34.0rc1") == (0, 34, 0)
