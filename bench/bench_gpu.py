"""GPU benchmark: full-size FLUX.1-dev architecture (random weights, no download) through the pack's own
loader and nodes, ComfyUI's model management and ComfyUI's sampler, ratios to bf16 measured in the
same run.

    python bench/bench_gpu.py --comfyui PATH --phase legacy  --workdir DIR --out FILE
    python bench/bench_gpu.py --comfyui PATH --phase dynamic --workdir DIR --out FILE
    python bench/bench_gpu.py --comfyui PATH --phase paired  --workdir DIR --out FILE [--compiled]
    python bench/bench_gpu.py --comfyui PATH --phase lowvram --workdir DIR --out FILE [--dynamic-vram]
    python bench/bench_gpu.py --comfyui PATH --phase families --family klein9b|dev|both --workdir DIR --out FILE
    python bench/bench_gpu.py --comfyui PATH --phase legacy --small --cpu ...   (a quick dry run)

This file is the command line; each phase is a module:

    legacy   bench/phase_legacy.py   ComfyUI's classic ModelPatcher: load, every row, Set LoRA Scale
    dynamic  bench/phase_dynamic.py  ComfyUI's dynamic VRAM: eager rows, then compiled ones
    paired   bench/phase_paired.py   only the paired rounds, every quantization
    lowvram  bench/phase_lowvram.py  a really smaller card (a ballast process), one command per memory mode
    families bench/phase_families.py FLUX.2 [klein] 9B and [dev] (bench/flux2_inputs.py): NF4 against bf16

What they share: bench/inputs.py (the model and LoRA files), bench/harness.py (sampling, the run's
set-up, the options every script takes), bench/probes.py (memory and kernels), bench/compiling.py
(torch.compile per block).
"""
from __future__ import annotations

from harness import PhaseRun, bench_parser
from phase_dynamic import run_dynamic
from phase_legacy import run_legacy
from phase_families import run_families
from phase_lowvram import run_lowvram
from phase_paired import run_paired

PHASES = {"legacy": run_legacy, "dynamic": run_dynamic, "paired": run_paired, "lowvram": run_lowvram,
          "families": run_families}


def run(args):
    """ComfyUI started on the generated files, then the phase ``args.phase``."""
    bench_run = PhaseRun(args)
    PHASES[args.phase](bench_run)
    bench_run.log(f"wrote {args.out}")


def main():
    ap = bench_parser()
    ap.add_argument("--phase", choices=list(PHASES), default="legacy")
    ap.add_argument("--family", choices=["klein9b", "dev", "both"], default="both",
                    help="--phase families: which FLUX.2 model (bench/README: run each alone)")
    ap.add_argument("--dynamic-vram", action="store_true", help="--phase lowvram: with ComfyUI's dynamic VRAM")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of --phase paired and --phase families, and per budget of --phase lowvram")
    ap.add_argument("--before", help="--phase paired: a checkout of this pack at an earlier commit; only NF4 "
                    "and NF4 + Control, each beside the earlier code's in the same rounds")
    ap.add_argument("--before-label", help="what --before is (a commit), for the results")
    ap.add_argument("--budgets", help="--phase lowvram: free GiB to cap at, comma-separated (default 8,6,4)")
    ap.add_argument("--profile", action="store_true",
                    help="--phase lowvram: one more NF4 + Control run per budget under torch.profiler")
    ap.add_argument("--compiled", action="store_true",
                    help="--phase paired: also bf16 and NF4 + Control with every block compiled")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    ap.add_argument("--small", action="store_true", help="tiny model(s) at 64x64 (dry run)")
    ap.add_argument("--blocks", help="DOUBLE,SINGLE: FLUX.1-dev width with this many blocks")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--tiles", help="JSON from bench/dequant_kernels.py: use its best Triton tile shapes")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
