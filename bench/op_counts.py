"""Diagnostic: aten ops per sampling run (with the calling lines) of NF4 and of NF4 + Control through
ComfyUI, and the ops that differ. ``python bench/op_counts.py COMFYUI WORKDIR [--cpu]``"""
from __future__ import annotations

import collections
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench, start_host  # noqa: E402
from inputs import MODEL_FILE, SMALL, flux_width, write_inputs  # noqa: E402


def main():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    comfy, wd = sys.argv[1], sys.argv[2]
    cpu = "--cpu" in sys.argv
    cfg = SMALL if cpu else flux_width(1, 2)
    res = 64 if cpu else 1024
    models = write_inputs(wd, cfg, "cpu" if cpu else "cuda", print, styles=False)
    host = start_host(comfy, models, cpu)
    load = host.pack_module("nodes.load_bnb_flux").LoadBnbFlux
    ctl_mod = host.pack_module("nodes.apply_control_lora")
    with torch.inference_mode():
        nf4 = load.execute(MODEL_FILE, "nf4", True, "auto").result[0]
        ctl = ctl_mod.ApplyControlLora.execute(nf4, "control.safetensors", 1.0).result[0]
    bench = Bench(host, cfg, res, 1, print)

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.where = collections.Counter(), collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func)] += 1
            st = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            self.where[(str(func), " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in st[-4:]))] += 1
            return func(*args, **(kwargs or {}))

    got = {}
    for label, m, c in (("nf4", nf4, False), ("control", ctl, True)):
        bench.sample(label + " warm", m, control=c)
        with Count() as mode:
            bench.sample(label, m, control=c)
        got[label] = mode
    a, b = got["nf4"], got["control"]
    print("ops (nf4, control, 2 forwards):")
    for k in sorted(set(a.ops) | set(b.ops), key=lambda k: -abs(b.ops[k] - a.ops[k])):
        if a.ops[k] != b.ops[k]:
            print(f"  {k}: {a.ops[k]} -> {b.ops[k]}")
    print("calling lines that differ:")
    for k in sorted(set(a.where) | set(b.where), key=lambda k: -abs(b.where[k] - a.where[k]))[:60]:
        if a.where[k] != b.where[k]:
            print(f"  {b.where[k] - a.where[k]:+d} {k[0]} {k[1]}")


if __name__ == "__main__":
    main()
