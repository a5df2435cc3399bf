"""quickstart.py's host set-up, on real archives and a real ComfyUI: what it accepts, refuses and reuses.
(The venv build itself runs in CI, where the README's test command makes it.)"""
from __future__ import annotations

import io
import os
import runpy
import sys
import tarfile

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def qs():
    return runpy.run_path(os.path.join(REPO_ROOT, "quickstart.py"))


def write_tree_archive(path, version="0.33.0", top="ComfyUI-0.33.0", extra=()):
    """A tar.gz shaped like a ComfyUI source archive (the files the set-up looks for), plus ``extra``
    members ``(name, TarInfo type)``."""
    files = {"main.py": b"print('ComfyUI')\n", "comfy/model_patcher.py": b"",
             "comfyui_version.py": f'__version__ = "{version}"\n'.encode(), "requirements.txt": b"torch\n"}
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, kind in extra:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
            t.addfile(info, io.BytesIO(b""))
    return path


def test_known_archive_is_unpacked_once_into_the_cache(qs, tmp_path, capsys):
    archive = write_tree_archive(str(tmp_path / "host.tar.gz"))
    qs["SUPPORTED"]["COMFYUI_ARCHIVES"][qs["sha256_of"](archive)] = "0.33.0"
    cache = str(tmp_path / "cache")
    tree = qs["host_from_archive"](archive, cache)
    assert tree == os.path.join(cache, "comfyui-0.33.0", "ComfyUI") and qs["is_comfyui"](tree)
    assert qs["comfyui_version"](tree) == "0.33.0"
    assert "unpacking" in capsys.readouterr().out
    assert qs["host_from_archive"](archive, cache) == tree
    assert "unpacked earlier" in capsys.readouterr().out


def test_unknown_archive_is_refused_before_unpacking(qs, tmp_path):
    archive = write_tree_archive(str(tmp_path / "other.tar.gz"))
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit, match=r"sha256 [0-9a-f]{64} is not one of the ComfyUI archives"):
        qs["host_from_archive"](archive, str(cache))
    assert not cache.exists()


@pytest.mark.parametrize("member", [("../evil.py", tarfile.REGTYPE), ("ComfyUI-0.33.0/link", tarfile.SYMTYPE)])
def test_archive_entries_outside_the_folder_are_refused(qs, tmp_path, member):
    archive = write_tree_archive(str(tmp_path / "bad.tar.gz"), extra=[member])
    qs["SUPPORTED"]["COMFYUI_ARCHIVES"][qs["sha256_of"](archive)] = "0.33.0"
    with pytest.raises(SystemExit, match="bad.tar.gz"):
        qs["host_from_archive"](archive, str(tmp_path / "cache"))
    assert not (tmp_path / "evil.py").exists()


def test_older_comfyui_is_refused_with_both_versions(qs, tmp_path):
    with pytest.raises(SystemExit, match=r"is ComfyUI 0\.3\.64; this pack needs ComfyUI 0\.33\.0 or newer"):
        qs["check_version"](str(tmp_path), "0.3.64")
    qs["check_version"](str(tmp_path), "0.33.0")
    qs["check_version"](str(tmp_path), "0.34.1")


def test_no_host_and_no_git_prints_the_clone_command(qs, tmp_path, monkeypatch):
    monkeypatch.setattr(qs["shutil"], "which", lambda name: None)
    with pytest.raises(SystemExit) as e:
        qs["host_from_upstream"](str(tmp_path))
    assert "git clone --depth 1 --branch v0.33.0 https://github.com/comfyanonymous/ComfyUI.git" in str(e.value)
    assert "COMFYUI_PATH" in str(e.value)


def test_comfyui_path_runs_with_that_comfyuis_own_python(qs, monkeypatch):
    """With COMFYUI_PATH at a ComfyUI whose requirements this very Python has (the tests' host), the
    set-up takes this Python and builds nothing."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH not set: this test needs a ComfyUI checkout (see README, Testing)")
    tree, origin = qs["host_from_path"](None)
    assert tree == os.path.abspath(path) and origin == "COMFYUI_PATH"
    python, report, origin = qs["hosts_own_python"](tree)
    assert os.path.realpath(python) == os.path.realpath(sys.executable) and "torch" in report
    assert report["missing"] == {}


def test_a_python_without_comfyuis_requirements_is_not_taken(qs, tmp_path):
    archive = write_tree_archive(str(tmp_path / "host.tar.gz"))
    tree = tmp_path / "ComfyUI"
    with tarfile.open(archive) as t:
        t.extractall(tmp_path, filter="data")
    os.rename(tmp_path / "ComfyUI-0.33.0", tree)
    (tree / "requirements.txt").write_text("a-distribution-nobody-has==1.0\n")
    assert qs["hosts_own_python"](str(tree)) is None


def test_a_venv_inside_comfyui_is_a_candidate_even_when_its_python_links_to_this_one(qs, tmp_path):
    """A venv's python is a link to the base interpreter; the two are different environments."""
    if os.name == "nt":
        pytest.skip("needs symlinks (POSIX venv layout)")
    tree = tmp_path / "ComfyUI"
    (tree / "venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, tree / "venv" / "bin" / "python")
    found = [p for p, _ in qs["candidate_pythons"](str(tree))]
    assert str(tree / "venv" / "bin" / "python") in found
