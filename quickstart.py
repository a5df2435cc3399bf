#!/usr/bin/env python3
"""Quick start for comfyui-bnb-flux: find or set up a ComfyUI to run against, then run the demo or the tests.

    python3 quickstart.py demo [demo options]      the main job: a Control-LoRA graph through ComfyUI's executor
    python3 quickstart.py test [pytest options]    the whole test suite against that ComfyUI
    python3 quickstart.py host                     only find or set up the host, and say where it is

Where the ComfyUI comes from (the first that applies):
  1. ``--comfyui DIR`` or ``COMFYUI_PATH``, else the ComfyUI whose ``custom_nodes`` folder holds this pack.
     It runs with that ComfyUI's own Python when one imports ComfyUI's requirements (the Python running
     this script, ``COMFYUI_PYTHON``, ``DIR/venv``, ``DIR/.venv``, a portable build's ``python_embeded``);
     only the pack's own requirements are added to it. Without one, a venv is made in the cache.
  2. ``--archive FILE`` or ``COMFYUI_ARCHIVE``: a ComfyUI source archive (.tar.gz or .zip) whose sha256
     the pack knows (``quant_expand/comfyui/supported_comfyui.py``), unpacked into the cache.
  3. The release tag of the supported version, cloned with git into the cache (or, without git or a
     network, the exact commands to run are printed).
A fetched host and its venv live in one cache folder outside the clone, keyed by ComfyUI version and
shared by every clone: ``--cache DIR``, ``BNB_FLUX_CACHE``, else the user's cache folder. In a venv made
here pip chooses torch; ``--torch SPECS`` / ``BNB_FLUX_TORCH`` (e.g. ``"torch==2.14.1 torchvision==0.29.1"``)
installs those first instead, for machines where only some builds work.

Standard library only (it runs before anything is installed), and for Windows as for Linux and macOS.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
SUPPORTED = runpy.run_path(os.path.join(REPO_ROOT, "quant_expand", "comfyui", "supported_comfyui.py"))
READY_MARK = "comfyui-bnb-flux-venv.json"  # written into a venv made here once it is complete
TORCH_PACKAGES = ("torch", "torchvision", "torchaudio")
WINDOWS = os.name == "nt"


class SetupError(SystemExit):
    """What the set-up cannot do, said to the user (exit status 1)."""

    def __init__(self, message: str):
        super().__init__(f"quickstart: {message}")


def say(message: str):
    print(f"[quickstart] {message}", flush=True)


# -- where things live ---------------------------------------------------------------------------

def cache_root(explicit: str | None) -> str:
    if explicit or os.environ.get("BNB_FLUX_CACHE"):
        return os.path.abspath(explicit or os.environ["BNB_FLUX_CACHE"])
    if WINDOWS:
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~\\AppData\\Local")
    elif sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Caches")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "comfyui-bnb-flux")


def venv_python(venv: str) -> str:
    return os.path.join(venv, "Scripts", "python.exe") if WINDOWS else os.path.join(venv, "bin", "python")


def is_comfyui(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "main.py")) and \
        os.path.isfile(os.path.join(path, "comfy", "model_patcher.py"))


def comfyui_version(path: str) -> str:
    try:
        return runpy.run_path(os.path.join(path, "comfyui_version.py")).get("__version__", "unknown")
    except (OSError, SyntaxError):
        return "unknown"


def check_version(path: str, version: str):
    needed = SUPPORTED["COMFYUI_VERSION"]
    vt = SUPPORTED["version_tuple"]
    if version == "unknown" or vt(version) < vt(needed):
        raise SetupError(f"{path} is ComfyUI {version}; this pack needs ComfyUI {needed} or newer: update it "
                         f"(git pull, or a newer release), or unset COMFYUI_PATH to let the quick start fetch {needed}")


@contextlib.contextmanager
def cache_lock(folder: str):
    """One set-up at a time per cache entry (two clones starting together would build one venv twice)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ".lock")
    with open(path, "a+") as f:
        if WINDOWS:
            import msvcrt

            while True:
                try:
                    msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    time.sleep(1)
        else:
            import fcntl

            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                say(f"waiting for another set-up in {folder} to finish")
                fcntl.flock(f, fcntl.LOCK_EX)
        yield


# -- the host tree ----------------------------------------------------------------------------------

def host_from_path(explicit: str | None) -> tuple[str, str] | None:
    """(ComfyUI folder, where it was found) from --comfyui, COMFYUI_PATH or the custom_nodes folder."""
    if explicit or os.environ.get("COMFYUI_PATH"):
        path = os.path.abspath(explicit or os.environ["COMFYUI_PATH"])
        origin = "--comfyui" if explicit else "COMFYUI_PATH"
        if not is_comfyui(path):
            raise SetupError(f"{origin}={path} is not a ComfyUI folder (no main.py and comfy/model_patcher.py)")
        return path, origin
    parent = os.path.dirname(REPO_ROOT)
    if os.path.basename(parent) == "custom_nodes" and is_comfyui(os.path.dirname(parent)):
        return os.path.dirname(parent), "the custom_nodes folder this pack sits in"
    return None


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unpack(archive: str, into: str):
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():  # zipfile strips absolute paths and '..' itself; refuse them anyway
                if name.startswith(("/", "\\")) or ".." in re.split(r"[\\/]", name):
                    raise SetupError(f"{archive}: entry {name!r} points outside the archive")
            z.extractall(into)
        return
    with tarfile.open(archive) as t:
        if hasattr(tarfile, "data_filter"):
            try:
                t.extractall(into, filter="data")  # no links or paths out of the folder
            except tarfile.FilterError as e:
                raise SetupError(f"{archive}: {e}") from e
        else:
            for member in t.getmembers():
                if member.name.startswith("/") or ".." in member.name.split("/") or member.issym() or member.islnk():
                    raise SetupError(f"{archive}: entry {member.name!r} points outside the archive")
            t.extractall(into)


def _tree_root(folder: str) -> str | None:
    """The ComfyUI folder inside an unpacked archive (``ComfyUI/``, ``ComfyUI-0.33.0/``, or the top)."""
    if is_comfyui(folder):
        return folder
    for name in sorted(os.listdir(folder)):
        if is_comfyui(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def host_from_archive(archive: str, cache: str) -> str:
    if not os.path.isfile(archive):
        raise SetupError(f"COMFYUI_ARCHIVE={archive}: no such file")
    digest = sha256_of(archive)
    version = SUPPORTED["COMFYUI_ARCHIVES"].get(digest)
    if version is None:
        known = ", ".join(f"{v} ({d[:12]}...)" for d, v in SUPPORTED["COMFYUI_ARCHIVES"].items())
        raise SetupError(f"{archive}: sha256 {digest} is not one of the ComfyUI archives this pack knows ({known}); "
                         f"an unknown archive is not unpacked. Point COMFYUI_PATH at a ComfyUI you trust instead")
    entry = os.path.join(cache, f"comfyui-{version}")
    tree = os.path.join(entry, "ComfyUI")
    mark = os.path.join(entry, "archive.sha256")
    with cache_lock(entry):
        if is_comfyui(tree) and os.path.isfile(mark) and open(mark).read().strip() == digest:
            say(f"ComfyUI {version}: {tree} (unpacked earlier from an archive with this sha256)")
            return tree
        say(f"unpacking {archive} (sha256 {digest[:12]}..., ComfyUI {version}) into {entry}")
        shutil.rmtree(tree, ignore_errors=True)
        staging = tempfile.mkdtemp(prefix=".unpack-", dir=entry)
        try:
            _unpack(archive, staging)
            root = _tree_root(staging)
            if root is None:
                raise SetupError(f"{archive}: no ComfyUI folder (main.py, comfy/) inside")
            os.replace(root, tree)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with open(mark, "w") as f:
            f.write(digest + "\n")
    return tree


def host_from_upstream(cache: str) -> str:
    version = SUPPORTED["COMFYUI_VERSION"]
    repo = SUPPORTED["COMFYUI_REPOSITORY"]
    entry = os.path.join(cache, f"comfyui-{version}")
    tree = os.path.join(entry, "ComfyUI")
    clone = ["git", "clone", "--depth", "1", "--branch", f"v{version}", repo, tree]
    with cache_lock(entry):
        if is_comfyui(tree):
            say(f"ComfyUI {version}: {tree} (fetched earlier)")
            return tree
        how = (f"no ComfyUI given. Either point COMFYUI_PATH at your ComfyUI {version} (or newer), or run\n"
               f"    {shlex.join(clone)}\nand run this again (the quick start finds it there), or set "
               f"COMFYUI_ARCHIVE to a ComfyUI source archive the pack knows")
        if shutil.which("git") is None:
            raise SetupError(how)
        say(f"cloning ComfyUI {version} (tag v{version} of {repo}) into {tree}")
        shutil.rmtree(tree, ignore_errors=True)
        if subprocess.call(clone) != 0 or not is_comfyui(tree):
            shutil.rmtree(tree, ignore_errors=True)
            raise SetupError("git clone failed. " + how)
    return tree


# -- the Python that runs it ------------------------------------------------------------------------

# Run by a candidate Python: which requirements it lacks (by distribution name and version range).
_PROBE = r"""
import json, re, sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:
    try:
        from pip._vendor.packaging.requirements import Requirement
    except ImportError:
        Requirement = None
groups = json.loads(sys.argv[1])
report = {"missing": {}, "mismatched": {}, "python": sys.version.split()[0]}
for group, lines in groups.items():
    for line in lines:
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group(0)
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            report["missing"].setdefault(group, []).append(line)
            continue
        if Requirement is not None:
            spec = Requirement(line).specifier
            if spec and not spec.contains(have, prereleases=True):
                report["mismatched"].setdefault(group, []).append(f"{line} (has {have})")
try:
    import torch
    report["torch"] = torch.__version__
except Exception as e:
    report["torch_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(report))
"""


def read_requirements(path: str, essential_only: bool = False) -> list[str]:
    """Requirement lines of a requirements file (ComfyUI's: those above its 'non essential' comment)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            if essential_only and raw.lower().startswith("#non essential"):
                break
            line = raw.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                out.append(line)
    return out


def requirement_name(line: str) -> str:
    return re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group(0).lower().replace("_", "-")


def probe(python: str, groups: dict) -> dict | None:
    try:
        out = subprocess.run([python, "-c", _PROBE, json.dumps(groups)], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def pack_requirements(with_tests: bool) -> dict:
    groups = {"pack": read_requirements(os.path.join(REPO_ROOT, "requirements.txt"))}
    if with_tests:
        groups["tests"] = read_requirements(os.path.join(REPO_ROOT, "requirements-test.txt"))
    return groups


def candidate_pythons(tree: str) -> list[tuple[str, str]]:
    found = [(sys.executable, "the Python running this script")]
    if os.environ.get("COMFYUI_PYTHON"):
        found.insert(0, (os.environ["COMFYUI_PYTHON"], "COMFYUI_PYTHON"))
    for folder in (os.path.join(tree, "venv"), os.path.join(tree, ".venv"),
                   os.path.join(os.path.dirname(tree), "venv")):
        found.append((venv_python(folder), folder))
    found.append((os.path.join(os.path.dirname(tree), "python_embeded", "python.exe"), "the portable build's Python"))
    seen, out = set(), []
    for python, origin in found:
        # not realpath: a venv's python is a link to the base Python, whose packages it does not see
        if os.path.isfile(python) and os.path.abspath(python) not in seen:
            seen.add(os.path.abspath(python))
            out.append((python, origin))
    return out


def hosts_own_python(tree: str) -> tuple[str, dict, str] | None:
    """The first Python beside ``tree`` that has ComfyUI's essential requirements and imports torch."""
    comfy_reqs = read_requirements(os.path.join(tree, "requirements.txt"), essential_only=True)
    for python, origin in candidate_pythons(tree):
        report = probe(python, {"comfyui": comfy_reqs})
        if report is None or report["missing"] or "torch" not in report:
            continue
        for line in report["mismatched"].get("comfyui", []):
            say(f"note: {python} has not ComfyUI's pinned {line}: pip install -r {os.path.join(tree, 'requirements.txt')}")
        return python, report, origin
    return None


def pip(python: str, *args: str):
    cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", *args]
    say("pip install " + " ".join(args))
    if subprocess.call(cmd) != 0:
        raise SetupError(f"pip failed: {shlex.join(cmd)}")


@contextlib.contextmanager
def lines_file(lines: list[str]):
    """A temporary requirements/constraints file holding ``lines`` (Windows: closed before pip reads it)."""
    f = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    f.write("\n".join(lines) + "\n")
    f.close()
    try:
        yield f.name
    finally:
        os.unlink(f.name)


def install_torch_specs(python: str, specs: list[str]) -> list[str]:
    """The pinned torch packages, in order; one whose own pins contradict the torch already installed
    (a torchaudio that only exists for an older torch) goes in without its dependencies, said aloud.
    Returns constraints that keep them where they are while the rest installs."""
    kept = []
    for spec in specs:
        with lines_file(kept) as constraint:
            cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q", spec, "-c", constraint]
            say(f"pip install {spec}")
            if subprocess.call(cmd) == 0:
                kept.append(spec)
                continue
        say(f"{spec} asks for other versions of {', '.join(kept) or 'its dependencies'}: installing it without "
            f"its dependencies (ComfyUI only imports it)")
        pip(python, "-q", "--no-deps", spec)
    return kept


def make_venv(tree: str, version: str, cache: str, torch_specs: list[str]) -> str:
    """A venv for ComfyUI ``version`` in the cache (ComfyUI's requirements, the pack's, the test tools),
    smoke-tested with ComfyUI's own CI start-up check; marked complete only when all of that worked."""
    venv = os.path.join(cache, f"comfyui-{version}", "venv")
    python = venv_python(venv)
    mark = os.path.join(venv, READY_MARK)
    if os.path.isfile(mark) and os.path.isfile(python):
        return python
    if os.path.exists(venv):
        say(f"{venv} is from a set-up that did not finish: making it again")
        shutil.rmtree(venv)
    t0 = time.monotonic()
    say(f"making a venv for ComfyUI {version} in {venv} (ComfyUI's requirements with torch: a few GB, "
        f"minutes; once for every clone)")
    subprocess.check_call([sys.executable, "-m", "venv", venv])
    requirements = read_requirements(os.path.join(tree, "requirements.txt"))
    constraints: list[str] = []
    if torch_specs:
        constraints = install_torch_specs(python, torch_specs)
        requirements = [r for r in requirements if requirement_name(r) not in TORCH_PACKAGES]
    with lines_file(requirements + sum(pack_requirements(True).values(), [])) as reqs, \
            lines_file(constraints) as pins:
        pip(python, "-q", "-r", reqs, *(["-c", pins] if constraints else []))
    say("checking that ComfyUI starts with it (main.py --cpu --quick-test-for-ci)")
    check = subprocess.run([python, "main.py", "--cpu", "--quick-test-for-ci"], cwd=tree, capture_output=True,
                           text=True, timeout=600)
    if check.returncode != 0:
        raise SetupError(f"ComfyUI {version} does not start with {python}:\n{check.stdout[-3000:]}{check.stderr[-3000:]}\n"
                         f"(run '{python} main.py --cpu --quick-test-for-ci' in {tree} to see why)")
    report = probe(python, {}) or {}
    with open(mark, "w") as f:
        json.dump({"comfyui": version, "comfyui_path": tree, "torch": report.get("torch"),
                   "torch_specs": torch_specs, "made_s": round(time.monotonic() - t0)}, f)
    say(f"venv ready in {time.monotonic() - t0:.0f} s (torch {report.get('torch')})")
    return python


def ensure_pack_requirements(python: str, with_tests: bool, owned: bool):
    """The pack's requirements (and test tools) in ``python``: installed or upgraded where they are not."""
    report = probe(python, pack_requirements(with_tests)) or {"missing": {}, "mismatched": {}}
    todo = [line for group in (report["missing"], report["mismatched"]) for lines in group.values() for line in lines]
    todo = [line.split(" (has ")[0] for line in todo]
    if todo:
        where = "the cached venv" if owned else f"ComfyUI's Python ({python})"
        say(f"adding to {where}: {', '.join(todo)}")
        pip(python, "-q", *todo)


# -- the whole set-up ----------------------------------------------------------------------------------

def set_up(args, with_tests: bool) -> tuple[str, str]:
    """(ComfyUI folder, Python to run it with), set up where missing, each step said aloud."""
    cache = cache_root(args.cache)
    found = host_from_path(args.comfyui)
    if found is not None:
        tree, origin = found
        version = comfyui_version(tree)
        say(f"ComfyUI {version}: {tree} (from {origin})")
    elif args.archive or os.environ.get("COMFYUI_ARCHIVE"):
        tree = host_from_archive(os.path.abspath(args.archive or os.environ["COMFYUI_ARCHIVE"]), cache)
        version = comfyui_version(tree)
    else:
        tree = host_from_upstream(cache)
        version = comfyui_version(tree)
    check_version(tree, version)

    own = hosts_own_python(tree) if found is not None else None
    if own is not None:
        python, report, origin = own
        say(f"Python: {python} ({origin}; torch {report['torch']}): ComfyUI's own, nothing rebuilt")
        owned = False
    else:
        if found is not None:
            say(f"no Python beside {tree} imports ComfyUI's requirements: using a venv in the cache")
        specs = (args.torch if args.torch is not None else os.environ.get("BNB_FLUX_TORCH", "")).split()
        entry = os.path.join(cache, f"comfyui-{version}")
        with cache_lock(entry):
            python = make_venv(tree, version, cache, specs)
        say(f"Python: {python} (venv for ComfyUI {version} in the cache, shared by every clone)")
        owned = True
    ensure_pack_requirements(python, with_tests, owned)
    return tree, python


def run(cmd: list[str], tree: str) -> int:
    env = dict(os.environ, COMFYUI_PATH=tree)
    say(f"COMFYUI_PATH={tree} {shlex.join(cmd)}")
    return subprocess.call(cmd, cwd=REPO_ROOT, env=env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="quickstart.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Options the script does not know go on to the demo or to pytest.")
    parser.add_argument("command", choices=["demo", "test", "host"])
    parser.add_argument("--comfyui", help="a ComfyUI folder (default: COMFYUI_PATH, or the one this pack is installed in)")
    parser.add_argument("--archive", help="a ComfyUI source archive (default: COMFYUI_ARCHIVE)")
    parser.add_argument("--cache", help="the cache folder for fetched hosts and their venvs (default: BNB_FLUX_CACHE)")
    parser.add_argument("--torch", help="torch packages to install first in a new venv (default: BNB_FLUX_TORCH; "
                                        "unset: pip chooses)")
    args, rest = parser.parse_known_args(argv)
    tree, python = set_up(args, with_tests=args.command == "test")
    if args.command == "host":
        print(f"COMFYUI_PATH={tree}\npython={python}")
        return 0
    if args.command == "demo":
        return run([python, "-m", "quant_expand.cli", "demo", "--comfyui", tree, *rest], tree)
    # the whole suite unless test files or folders are named
    named = any(not a.startswith("-") and (os.path.exists(os.path.join(REPO_ROOT, a.split("::")[0]))) for a in rest)
    return run([python, "-m", "pytest", *([] if named else ["tests"]), *rest], tree)


if __name__ == "__main__":
    sys.exit(main())
