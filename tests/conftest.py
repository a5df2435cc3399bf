"""Shared fixtures.

Import convention: core tests import ``quant_expand`` from the repo root (torch + bitsandbytes only).
ComfyUI tests never import the pack themselves: the ``host`` fixture starts ComfyUI in-process from
``COMFYUI_PATH`` and loads this repo with ComfyUI's own ``nodes.load_custom_node`` (so the package is
named after its path, exactly as in a real install); tests reach the pack's modules through
``host.pack_module("quant_expand.layers")`` and therefore use the same class objects ComfyUI does.
"""
from __future__ import annotations

import collections
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


# A skip whose reason starts with this is a test that needs a GPU; on a CPU host it is expected.
CUDA_ONLY = "needs a CUDA GPU"
# Set by .ci/run: every other skip (no ComfyUI, no browser, a missing tool) fails the run, so a host
# that quietly stops running the ComfyUI or browser tests cannot pass.
STRICT_SKIPS = os.environ.get("BNB_FLUX_ONLY_CUDA_SKIPS") == "1"


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Skips counted by reason; with BNB_FLUX_ONLY_CUDA_SKIPS=1, a non-CUDA skip fails the run."""
    reasons = collections.Counter(_skip_reason(r) for r in terminalreporter.stats.get("skipped", []))
    if not reasons:
        return
    terminalreporter.section("skips by reason")
    for reason, n in reasons.most_common():
        terminalreporter.write_line(f"{n:4d}  {reason}")
    unexpected = {r: n for r, n in reasons.items() if not r.startswith(CUDA_ONLY)}
    if STRICT_SKIPS and unexpected:
        terminalreporter.write_line(f"BNB_FLUX_ONLY_CUDA_SKIPS=1: {sum(unexpected.values())} test(s) skipped for a "
                                    f"reason other than '{CUDA_ONLY}': this host must run them", red=True, bold=True)


def pytest_sessionfinish(session, exitstatus):
    # runs before the terminal reporter's summary, whose stats are complete by now
    if STRICT_SKIPS and exitstatus == 0:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        skipped = reporter.stats.get("skipped", []) if reporter is not None else []
        if any(not _skip_reason(r).startswith(CUDA_ONLY) for r in skipped):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


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


@pytest.fixture(scope="module")
def outdir(host, tmp_path_factory):
    """ComfyUI's output directory, moved to a temporary folder for this module."""
    import folder_paths

    old = folder_paths.get_output_directory()
    new = str(tmp_path_factory.mktemp("comfy-output"))
    folder_paths.set_output_directory(new)
    yield new
    folder_paths.set_output_directory(old)
