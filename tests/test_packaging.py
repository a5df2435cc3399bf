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
