"""``python -m quant_expand.cli run`` as a user runs it: a separate process, against a real ComfyUI server.

Every command runs under a prelude (``PRELUDE``) that refuses to import torch, bitsandbytes, numpy,
safetensors and tqdm and writes, at exit, which of them anything tried to import; one run also uses a Python
started with ``-I -S`` (no site-packages at all), the way a machine without torch runs the client.
"""
from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from quant_expand.testing.synthetic import TinyFluxConfig, make_control_lora, make_lora, make_tiny_flux, save_safetensors
from server_host import REPO_ROOT, control_style_graph, free_port, running_server

CFG = TinyFluxConfig()
MODEL, CONTROL, STYLE = "clirun_nf4.safetensors", "clirun_canny.safetensors", "clirun_style.safetensors"
HEAVY = ("torch", "bitsandbytes", "numpy", "safetensors", "tqdm")

PRELUDE = f"""
import atexit, importlib.util, json, runpy, sys
report, repo, mode = sys.argv[1:4]
sys.argv = ["quant_expand.cli", *sys.argv[4:]]
sys.path.insert(0, repo)
HEAVY = {HEAVY!r}
torch_found = importlib.util.find_spec("torch") is not None
attempted = []

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HEAVY:
            attempted.append(name)
            raise ImportError(name + " is refused by the test")

if mode == "refuse":
    sys.meta_path.insert(0, Refuse())

@atexit.register
def write_report():
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in HEAVY)
    with open(report, "w") as f:
        json.dump({{"attempted": attempted, "loaded": loaded, "torch_found": torch_found}}, f)

runpy.run_module("quant_expand.cli", run_name="__main__", alter_sys=True)
"""


def cli_command(tmp_path, *args, mode="refuse", isolated=False) -> tuple[list[str], str]:
    """The command line of a ``cli`` process under the prelude, and where its import report goes.
    ``isolated``: ``python -I -S`` (no site-packages, no environment variables)."""
    report = str(tmp_path / f"imports-{time.monotonic_ns()}.json")
    flags = ["-I", "-S"] if isolated else []
    return [sys.executable, *flags, "-u", "-c", PRELUDE, report, REPO_ROOT, mode, *args], report


def run_cli(tmp_path, *args, mode="refuse", isolated=False, timeout=300) -> tuple[subprocess.CompletedProcess, dict]:
    cmd, report = cli_command(tmp_path, *args, mode=mode, isolated=isolated)
    proc = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=timeout)
    with open(report) as f:
        return proc, json.load(f)


def write_files(dirs):
    save_safetensors(make_tiny_flux(CFG, seed=0, exact_for="nf4"), os.path.join(dirs["models/diffusion_models"], MODEL))
    save_safetensors(make_control_lora(CFG, seed=2), os.path.join(dirs["models/loras"], CONTROL))
    save_safetensors(make_lora(CFG, kind="lora", seed=11), os.path.join(dirs["models/loras"], STYLE))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory, "cli-run", write_files) as srv:
        yield srv


def graph(control_strength=1.0, steps=2):
    return control_style_graph(CFG, MODEL, CONTROL, STYLE, control_strength=control_strength, steps=steps,
                               prefix="latents/clirun")


def write_workflow(tmp_path, name: str, data) -> str:
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def assert_one_error_line(proc: subprocess.CompletedProcess, *phrases: str):
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


# ---------------------------------------------------------------- standard library only

def test_run_help_imports_nothing_outside_the_standard_library(tmp_path):
    """With torch installed and importable, ``run --help`` still never imports it (nor bitsandbytes...)."""
    t0 = time.monotonic()
    proc, imports = run_cli(tmp_path, "run", "--help", mode="watch")
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert "WORKFLOW.json" in proc.stdout and "exit status: 0 done; 1 refused or failed" in " ".join(proc.stdout.split())
    assert imports["torch_found"] and imports["loaded"] == [], imports
    print(f"cli run --help: {took:.2f} s in a new process")


def test_run_on_a_python_without_torch_against_a_real_server(server, tmp_path):
    wf = write_workflow(tmp_path, "wf.json", graph(control_strength=0.85, steps=2))
    out = tmp_path / "out"
    proc, imports = run_cli(tmp_path, "run", wf, "--server", server.url, "--output-dir", str(out), isolated=True)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert not imports["torch_found"], "the isolated Python must not see site-packages"
    assert imports["attempted"] == [] and imports["loaded"] == [], imports
    assert "running 7 KSampler" in proc.stdout and re.search(r"^finished \S+: 1 file\(s\) in ", proc.stdout, re.M)
    (saved,) = out.rglob("*.latent")
    from safetensors.torch import load_file

    on_server = os.path.join(server.dirs["output"], "latents", saved.name)
    assert torch.equal(load_file(str(saved))["latent_tensor"], load_file(on_server)["latent_tensor"])


# ---------------------------------------------------------------- what goes wrong, said once, in one line

def test_a_failed_node_is_reported_once(server, tmp_path):
    failing = graph()
    failing["2"]["inputs"]["strength"] = float("nan")  # passes the validator, refused by the node
    proc, imports = run_cli(tmp_path, "run", write_workflow(tmp_path, "fail.json", failing), "--server", server.url,
                            "--output-dir", str(tmp_path / "o"))
    assert imports["attempted"] == []
    everything = proc.stdout + proc.stderr
    assert everything.count("failed:") == 1, everything
    assert_one_error_line(proc, f"2 ApplyControlLora failed: BnbFluxError: {CONTROL}: strength is nan")
    assert not (tmp_path / "o").exists()


def test_a_refused_workflow_shows_comfyuis_message(server, tmp_path):
    bad = graph()
    bad["1"]["inputs"]["quant_type"] = "nf5"
    proc, _ = run_cli(tmp_path, "run", write_workflow(tmp_path, "bad.json", {"prompt": bad}), "--server", server.url)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ComfyUI refused the workflow:\n"), proc.stderr
    assert "node 1 LoadBnbFlux" in proc.stderr and "quant_type" in proc.stderr


class _NotComfyUI(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def other_http_server():
    """A real HTTP server that is no ComfyUI (it answers everything with 404)."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotComfyUI)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_server_problems_are_one_line(tmp_path, other_http_server):
    wf = write_workflow(tmp_path, "wf.json", graph())
    dead = f"http://127.0.0.1:{free_port()}"  # a port nothing listens on
    cases = [
        (dead, [f"cannot reach ComfyUI at {dead} (connection refused", "start ComfyUI there or pass --server"]),
        ("http://comfyui.invalid:8188", ["cannot reach ComfyUI at http://comfyui.invalid:8188 (unknown host name)"]),
        ("http://127.0.0.1:port", ["server http://127.0.0.1:port: not an address", "--server http://HOST:PORT"]),
        ("https://127.0.0.1:8188", ["only plain http:// addresses are supported"]),
        (other_http_server, [f"{other_http_server}: its websocket /ws answered", "404", "is it ComfyUI?"]),
    ]
    for server, phrases in cases:
        t0 = time.monotonic()
        proc, imports = run_cli(tmp_path, "run", wf, "--server", server)
        assert_one_error_line(proc, *phrases)
        assert proc.stdout == "" and imports["attempted"] == []
        assert time.monotonic() - t0 < 30, server  # no waiting for --timeout's hour


def test_workflow_file_problems_are_one_line(tmp_path):
    export = "export it from ComfyUI with Workflow > Export (API)"
    cases = [
        ("missing.json", None, ["missing.json: no such file"]),
        ("broken.json", "{\"1\": {", ["broken.json: not valid JSON (", export]),
        ("editor.json", {"nodes": [], "links": [], "version": 0.4}, ["editor.json is an editor workflow", export]),
        ("empty.json", {}, ["empty.json: not an API-format workflow", export]),
        ("list.json", [1, 2], ["list.json: not an API-format workflow"]),
        ("binary.json", b"\xff\xfe\x00\x81", ["binary.json: not a text file"]),
    ]
    for name, data, phrases in cases:
        if data is not None:
            write_workflow(tmp_path, name, data)
        proc, _ = run_cli(tmp_path, "run", name, "--server", "http://127.0.0.1:1")
        assert_one_error_line(proc, *phrases)
    (tmp_path / "folder.json").mkdir()
    proc, _ = run_cli(tmp_path, "run", "folder.json")
    assert_one_error_line(proc, "folder.json: a folder, not a workflow file")


# ---------------------------------------------------------------- Ctrl-C

def test_ctrl_c_says_what_stays_on_the_server(server, tmp_path):
    wf = write_workflow(tmp_path, "long.json", graph(steps=5000))
    cmd, report = cli_command(tmp_path, "run", wf, "--server", server.url, "--output-dir", str(tmp_path / "o"))
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    prompt_id = None
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            m = re.match(r"queued (\S+) ", line)
            prompt_id = m.group(1) if m else prompt_id
            if re.match(r"  7 KSampler: \d+/5000$", line):
                break  # following the sampler over the websocket: now the user presses Ctrl-C
            assert time.monotonic() < deadline, "the sampler never reported a step"
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if prompt_id is not None:  # stop the long prompt so the server is free again
            server._request("POST", "/interrupt", json.dumps({"prompt_id": prompt_id}).encode())
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert err.strip().splitlines() == [f"interrupted: prompt {prompt_id} stays queued on {server.url} and runs to "
                                        f"the end there; cancel it in ComfyUI's queue if you do not want it"], err
    entry = server.wait_history(prompt_id, timeout=60)
    assert entry["status"]["status_str"] == "error"  # what ComfyUI records for a prompt interrupted there
    with open(report) as f:
        assert json.load(f)["attempted"] == []
