"""Does a model run slower after Set LoRA Scale, or at a strength other than 1.0? (GPU)

    python bench/strength_probe.py --comfyui PATH --workdir DIR --out FILE [--full]

Samples NF4 + Control applied at 1.0 and at 0.7, and each rescaled to the other strength with Set LoRA
Scale (the in-place swap), in three interleaved rounds, then profiles one sampling run of three of
them (GPU time per kernel, CPU time). Same kernels and same GPU time mean a slower row in the main
benchmark is the machine, not the model. Default model: FLUX.1-dev width with 4 + 8 blocks (--full:
all 19 + 38).
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import Bench, bench_parser, comfyui_version, machine_info, scrub_paths, start_host  # noqa: E402
from inputs import FULL, MODEL_FILE, flux_width, write_inputs  # noqa: E402
from probes import profiled_kernels  # noqa: E402


def main():
    ap = bench_parser()
    ap.add_argument("--full", action="store_true")
    args = ap.parse_args()

    import torch

    cfg = FULL if args.full else flux_width(4, 8)

    def log(m):
        print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)

    models = write_inputs(args.workdir, cfg, "cuda", log, styles=False)
    host = start_host(args.comfyui, models, cpu=False)
    b = Bench(host, cfg, 1024, 8, log)
    load = host.pack_module("nodes.load_bnb_flux").LoadBnbFlux
    nodes = host.pack_module("nodes.apply_control_lora")
    with torch.inference_mode():
        nf4 = load.execute(MODEL_FILE, "nf4", True, "auto").result[0]
        a10 = nodes.ApplyControlLora.execute(nf4, "control.safetensors", 1.0).result[0]
        a07 = nodes.ApplyControlLora.execute(nf4, "control.safetensors", 0.7).result[0]
        sw = nodes.SetLoraScale.execute(a10, "control.safetensors", 0.7).result[0]
        sw10 = nodes.SetLoraScale.execute(a07, "control.safetensors", 1.0).result[0]
    medians = {}
    for rnd in range(3):
        for name, m in (("apply 1.0", a10), ("set 1.0->0.7", sw), ("apply 0.7", a07), ("set 0.7->1.0", sw10)):
            b.sample(f"{name} r{rnd}", m, control=True)
            medians[f"{name} r{rnd}"] = b.results[f"{name} r{rnd}"]["median_step_s"]
    profiles = {}
    for name, m in (("apply 1.0", a10), ("set 1.0->0.7", sw), ("apply 0.7", a07)):
        rows, cpu_ms = profiled_kernels(b, name, m, True)
        profiles[name] = rows[:14]
        profiles[name + " totals"] = {"gpu_ms": round(sum(r["gpu_ms"] for r in rows), 1), "cpu_self_ms": cpu_ms,
                                      "gpu_events": sum(r["calls"] for r in rows)}
        log(f"{name} totals: {profiles[name + ' totals']}")
    info = {**machine_info(cpu=False), "comfyui": comfyui_version(args.comfyui),
            "model": "full" if args.full else "4+8 blocks", "res": 1024, "timed_steps": 8,
            "medians": medians, "profiles": profiles}
    with open(args.out, "w") as f:
        f.write(scrub_paths(json.dumps(info, indent=1), args.comfyui, args.workdir))
    log(json.dumps(medians))


if __name__ == "__main__":
    main()
