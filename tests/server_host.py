"""A real ComfyUI server process for end-to-end tests: loopback only, CPU, a throwaway base directory.

The server runs ``COMFYUI_PATH/main.py`` with the Python that runs pytest. Its base directory holds
the pack as ``custom_nodes/comfyui-bnb-flux`` (a symlink to this repo) and a test-only node file
(``SERVER_NODES_SOURCE``) that exists only in that temporary directory: a tiny FLUX cannot use
ComfyUI's text encoders, so the tests make their conditioning and latents with the in-process host's
nodes (``quant_expand/testing/inprocess.py``), registered as ``BnbFluxServerTestConditioning`` and
``BnbFluxServerTestLatent``.
HTTP uses the standard library only.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from quant_expand.testing.prompts import apply_lora, ksampler, load_bnb_flux, node

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_DIR_NAME = "comfyui-bnb-flux"

# V1 API on purpose (NODE_CLASS_MAPPINGS), so the file does not depend on the pack's V3 code. The node
# classes are the in-process host's, imported from the repo, whose root goes last on the server's
# sys.path, never first: the repo's ``nodes/`` package would shadow ComfyUI's ``nodes.py``.
SERVER_NODES_SOURCE = '''"""Test-only nodes written by tests/server_host.py into a temporary custom_nodes folder:
the conditioning and latent nodes of quant_expand/testing/inprocess.py under server-side names."""
import sys

REPO_ROOT = {repo_root!r}
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

from quant_expand.testing.inprocess import BnbFluxTestConditioning, BnbFluxTestLatent  # noqa: E402

NODE_CLASS_MAPPINGS = {{
    "BnbFluxServerTestConditioning": BnbFluxTestConditioning,
    "BnbFluxServerTestLatent": BnbFluxTestLatent,
}}
'''


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base_directory(base: str, repo_root: str) -> dict:
    """ComfyUI's layout under ``base``; the pack is linked in (copied if links are not possible)."""
    dirs = {name: os.path.join(base, *name.split("/")) for name in
            ("custom_nodes", "models/diffusion_models", "models/loras", "input", "output", "user", "temp")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    pack = os.path.join(dirs["custom_nodes"], PACK_DIR_NAME)
    try:
        os.symlink(repo_root, pack, target_is_directory=True)
        dirs["pack_linked"] = True
    except OSError:  # no symlinks here: copy only what a user installs
        import shutil

        os.makedirs(pack)
        shutil.copy2(os.path.join(repo_root, "__init__.py"), pack)
        for sub in ("nodes", "quant_expand", "web", "example_workflows", "locales"):
            shutil.copytree(os.path.join(repo_root, sub), os.path.join(pack, sub),
                            ignore=shutil.ignore_patterns("__pycache__"))
        dirs["pack_linked"] = False
    with open(os.path.join(dirs["custom_nodes"], "bnb_flux_test_nodes.py"), "w") as f:
        f.write(SERVER_NODES_SOURCE.format(repo_root=repo_root))
    return dirs


@contextlib.contextmanager
def running_server(tmp_path_factory, name: str, write_files=None, repo_root: str = REPO_ROOT):
    """A ComfyUI server for one test module, stopped on exit; skips, with the reason printed, without
    COMFYUI_PATH. ``write_files(dirs)`` puts the module's files into the base directory before start-up,
    as for a user who drops files in and launches ComfyUI (``dirs``: ``make_base_directory``'s answer,
    also the server's ``dirs`` attribute). ``name`` prefixes the temporary base and log directories."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        msg = "COMFYUI_PATH not set: the server tests need a ComfyUI checkout (see README, Testing)"
        print(msg)
        pytest.skip(msg)
    base = str(tmp_path_factory.mktemp(f"{name}-base"))
    dirs = make_base_directory(base, repo_root)
    if write_files is not None:
        write_files(dirs)
    srv = ComfyServer(path, base, os.path.join(str(tmp_path_factory.mktemp(f"{name}-log")), "comfyui.log"))
    srv.dirs = dirs
    t0 = time.monotonic()
    try:
        srv.start()
        print(f"\nComfyUI server up on {srv.url} in {time.monotonic() - t0:.1f} s "
              f"(pack {'symlinked' if dirs['pack_linked'] else 'copied'} into custom_nodes)")
        yield srv
    finally:
        srv.stop()


class ComfyServer:
    def __init__(self, comfy_path: str, base: str, log_path: str):
        self.comfy_path = os.path.abspath(comfy_path)
        self.base = base
        self.log_path = log_path
        self.port = None
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_path: str = "/object_info/LoadBnbFlux", timeout: float = 120.0):
        self.port = free_port()
        # BNB_FLUX_SERVER_DEVICE=gpu (on the GPU machine): ComfyUI's defaults there, dynamic VRAM
        # included, with float32 weights for the stock path so the float32 comparisons still hold
        device_args = ["--fp32-unet"] if os.environ.get("BNB_FLUX_SERVER_DEVICE") == "gpu" else ["--cpu"]
        cmd = [sys.executable, os.path.join(self.comfy_path, "main.py"), *device_args,
               "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", self.base,
               "--disable-auto-launch", "--disable-api-nodes",
               # keep ComfyUI's own checkout untouched (its default database lives in COMFYUI_PATH/user)
               "--database-url", "sqlite:///:memory:"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_path, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                status, body = self.get(ready_path, timeout=5)
                if status == 200 and body:
                    return self
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"ComfyUI did not answer {ready_path} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self):
        """Bounded: terminate, wait 10 s, then kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def log_tail(self, chars: int = 6000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-chars:]
        except OSError:
            return "(no log)"

    # --- HTTP (stdlib only; a proxy-free opener, so traffic stays on loopback) -------------------
    _opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _request(self, method: str, path: str, data: bytes | None = None, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with self._opener.open(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:  # 4xx/5xx still carry a body worth reading
            return e.code, e.read()

    def get(self, path: str, timeout: float = 30):
        return self._request("GET", path, timeout=timeout)

    def get_json(self, path: str, timeout: float = 30):
        status, body = self.get(path, timeout)
        assert status == 200, f"GET {path} -> {status}: {body[:500]!r}"
        return json.loads(body)

    def post_prompt(self, prompt: dict):
        """``POST /prompt``: (HTTP status, decoded JSON answer)."""
        status, body = self._request("POST", "/prompt", json.dumps({"prompt": prompt}).encode())
        return status, json.loads(body)

    def wait_history(self, prompt_id: str, timeout: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get_json(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s:\n{self.log_tail()}")

    def run_prompt(self, prompt: dict, timeout: float = 90.0) -> dict:
        status, answer = self.post_prompt(prompt)
        assert status == 200, f"POST /prompt -> {status}: {answer}"
        assert not answer.get("node_errors"), answer
        return self.wait_history(answer["prompt_id"], timeout)


def control_style_graph(cfg, model: str, control: str, style: str, *, control_strength: float = 1.0, steps: int = 2,
                        prefix: str) -> dict:
    """The server tests' main job as an API prompt: Load BnB Flux -> Control LoRA -> style LoRA (0.6) ->
    KSampler on the test conditioning and latent -> SaveLatent under ``prefix``. Node ids are fixed: 1 loads,
    2 and 3 apply the LoRAs, 7 samples, 8 saves."""
    cond = {"tokens": 8, "context_dim": cfg.context_in_dim, "pooled_dim": cfg.vec_in_dim, "guidance": 3.5}
    return {
        "1": load_bnb_flux(model),
        "2": apply_lora(["1", 0], control, control_strength),
        "3": apply_lora(["2", 0], style, 0.6),
        "4": node("BnbFluxServerTestConditioning", **cond, seed=1),
        "5": node("BnbFluxServerTestConditioning", **cond, seed=2),
        "6": node("BnbFluxServerTestLatent", seed=0, size=16, scale=0.0),
        "7": ksampler(["3", 0], ["4", 0], ["5", 0], ["6", 0], seed=3, steps=steps),
        "8": node("SaveLatent", samples=["7", 0], filename_prefix=prefix),
    }
