"""No leaks: 50 cycles of Apply Control LoRA -> style LoRA -> Set LoRA Scale -> sample -> drop on a tiny
FLUX loaded once (a server that runs for days does this all the time) leave memory flat.

Run in a child process (``tests/leak_cycles.py``) so the measured memory is this loop's alone. Each cycle
uses new strengths (no cached node output), reads both LoRA files again and samples with ComfyUI's
sampler and model management; then every reference to the cycle's models is dropped, ``gc.collect()``
runs and glibc's ``malloc_trim`` hands freed heap back, so RSS follows live memory.

Bounds (``tests/leak_cycles.py``, which also runs on its own with ``--check`` where pytest is missing),
measured after 5 warm-up cycles (first imports, kernels, allocator pools) as the growth from the
median of the first 5 measured cycles to the median of the last 5 (a median ignores one-off spikes):
- host RSS: at most 16 MiB over 50 cycles. A cycle reads 4.8 MiB of LoRA files and builds about 4 MiB of
  lazy deltas (the child reports both), so leaking either every cycle adds at least 200 MiB, 12x the
  bound; measured drift here was 0.4 MiB. RSS is not disturbed by CPU load, only by allocation, and the
  loop allocates the same things every cycle.
- GPU (CUDA only): ``torch.cuda.memory_allocated`` (exact bytes of live tensors) may grow at most 2 MiB;
  one cycle's stacked deltas on the GPU are about 2 MiB in bf16, so leaking them adds ~100 MiB. On a GPU
  machine: ``COMFYUI_PATH=... python -m pytest tests/test_leaks.py``, or without pytest
  ``python tests/leak_cycles.py $COMFYUI_PATH /tmp/leak cuda 5 50 --check``.
- every dropped clone is garbage: no cycle's patcher survives, apart from the last one, which ComfyUI's
  model management may still hold as the loaded model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from leak_cycles import check

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARMUP, CYCLES = 5, 50


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU variant of the leak test)"))])
def test_apply_rescale_sample_drop_cycles_leave_memory_flat(device, tmp_path):
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        pytest.skip("COMFYUI_PATH not set: ComfyUI tests need a ComfyUI checkout (see README, Testing)")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tests", "leak_cycles.py"), comfy, str(tmp_path),
                           device, str(WARMUP), str(CYCLES)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["records"]) == WARMUP + CYCLES
    problems, summary = check(result)
    print(summary)
    assert not problems, problems
