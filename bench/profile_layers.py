"""Where a sampling step's time goes: FLUX.1-dev width (3072, 24 heads) with fewer blocks, through the
pack's loader and nodes and ComfyUI's sampler, on the GPU.

    python bench/profile_layers.py --comfyui PATH --workdir DIR --out FILE [--depth 4 --single 8]

For each configuration (bf16 stock, NF4, FP4, int8, NF4 + Control, NF4 + Control + 2 style) it times
steps at 1024x1024 and at 256x256. At 256x256 the GPU work per layer is small, so the step time there is
mostly the host side (Python, kernel launches): when it comes close to the 1024x1024 time, the GPU waits
for the CPU. Then a torch.profiler trace of NF4 + Control at 1024x1024 gives GPU time per kernel kind,
and cProfile of the same at 256x256 gives host time per Python function.
"""
from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import BenchRun, bench_parser, machine_info  # noqa: E402
from inputs import flux_width  # noqa: E402
from quant_expand.testing.synthetic import TinyFluxConfig  # noqa: E402


def main():
    ap = bench_parser()
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--single", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--configs", default="bf16,nf4,fp4,int8,nf4+control,nf4+control+2style")
    ap.add_argument("--no-trace", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="dry run: width 256 on the CPU, 64x64 and 32x32")
    args = ap.parse_args()

    cfg = (TinyFluxConfig(hidden_size=256, depth=args.depth, depth_single_blocks=args.single) if args.cpu
           else flux_width(args.depth, args.single))
    sizes = (64, 32) if args.cpu else (1024, 256)
    run = BenchRun(args, cfg, sizes[0])  # 512 text tokens at FLUX width, as bench_gpu
    bench, info = run.bench, run.info
    info.update({**machine_info(args.cpu), "depth": args.depth, "single": args.single, "runs": {}})

    for config in args.configs.split(","):
        m, control = build(run, config)
        row = {}
        for res in sizes:
            bench.results.clear()
            bench.sample(f"{config}@{res}", m, res=res, control=control)
            row[str(res)] = bench.results[f"{config}@{res}"]
        info["runs"][config] = row
        if config == "nf4+control" and not args.no_trace:
            info["profile"] = profile(bench, m, run.log, sizes)
        del m
        bench.unload()
        run.save()
    base = info["runs"].get("bf16")
    if base:
        for config, row in info["runs"].items():
            for res, r in row.items():
                r["ratio_to_bf16"] = round(r["median_step_s"] / base[res]["median_step_s"], 3)
    summary = {c: {res: (r["median_step_s"], r.get("ratio_to_bf16")) for res, r in row.items()}
               for c, row in info["runs"].items()}
    run.log("summary (median s/step, ratio to bf16): " + json.dumps(summary))
    run.save()


def build(run, config):
    """The model a configuration names (``bf16``, ``QUANT``, ``QUANT+control``, ``QUANT+control+2style``)
    and whether it takes a Control image."""
    if config == "bf16":
        return run.bf16_model(), False
    quant = config.split("+")[0]
    m = run.load_bnb(quant)
    control = "control" in config
    if control:
        m = run.apply(m, "control.safetensors", 1.0)
    if "2style" in config:
        m = run.with_styles(m)
    return m, control


def profile(bench, m, log, sizes):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    out = {}
    old = bench.steps
    bench.steps = 2
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.cuda else [])
    with tprofile(activities=acts) as prof:
        bench.sample("trace", m, res=sizes[0], control=True)
    table = prof.key_averages().table(sort_by="self_cpu_time_total" if bench.torch.device(m.load_device).type == "cpu" else "self_cuda_time_total", row_limit=25, max_name_column_width=60)
    log(f"GPU time by op (3 steps, {sizes[0]}):\n" + table)
    out["gpu_table"] = table
    pr = cProfile.Profile()
    pr.enable()
    bench.sample("cprofile", m, res=sizes[1], control=True)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(35)
    log(f"host time by function (3 steps, {sizes[1]}):\n" + s.getvalue())
    out["host_table"] = s.getvalue()
    bench.steps = old
    bench.sync()
    return out


if __name__ == "__main__":
    main()
