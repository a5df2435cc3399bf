"""Microbenchmark of the 4-bit dequantize and the merged-LoRA epilogue on FLUX.1-dev's Linear shapes
(GPU): bnb's kernels vs ``quant_expand.backends.triton_dequant.Dequant4bit`` per tile shape, and the LoRA paths the
forward can take at 4608 tokens (1024x1024). Prints a table and writes JSON; every Triton result is
compared with bnb's (plain: bit for bit; merged: to float32 rounding)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bitsandbytes.functional as bnbf  # noqa: E402

from quant_expand.backends import triton_dequant as kernels  # noqa: E402
from quant_expand.testing.prompts import rel_err  # noqa: E402
from quant_expand.tuning import TUNING  # noqa: E402

# (rows, cols, layers of this shape in FLUX.1-dev that dequantize at 1024x1024)
SHAPES = [(9216, 3072, 38), (3072, 3072, 38), (12288, 3072, 38), (3072, 12288, 38),
          (21504, 3072, 38), (3072, 15360, 38)]
PLAIN_TILES = [(2, 16, 0, 4, 1), (4, 8, 0, 4, 1), (8, 4, 0, 4, 1), (2, 16, 0, 4, 3), (1, 32, 0, 4, 1)]
LORA_TILES = [(64, 1, 64, 4, 2), (64, 2, 64, 4, 3), (64, 1, 64, 4, 3), (64, 1, 32, 4, 3), (64, 1, 128, 4, 1),
              (128, 1, 64, 4, 2), (32, 1, 64, 4, 2), (64, 2, 128, 8, 2)]


def gpu_time(fn, calls=10, reps=5):
    """GPU time per call without the host's launch time: ``calls`` calls captured in a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1000 / calls)
    del g
    return statistics.median(times)


def timeit(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=4608)
    args = ap.parse_args()
    dev, dt = torch.device("cuda", 0), torch.bfloat16
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": [], "totals": {}}
    totals: dict = {}
    for rows, cols, count in SHAPES:
        w = torch.randn(rows, cols, device=dev, dtype=dt) * 0.02
        packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        del w
        ref = bnbf.dequantize_4bit(packed, qs)
        fused = kernels.Dequant4bit(packed, qs)
        row = {"shape": [rows, cols], "count": count}
        row["bnb_s"] = timeit(lambda: bnbf.dequantize_4bit(packed, qs))
        row["bnb_gpu_s"] = gpu_time(lambda: bnbf.dequantize_4bit(packed, qs))
        gbytes = (rows * cols * 2.5 + rows * cols / 64) / 1e9
        for tile in PLAIN_TILES:
            TUNING.plain_tile = tile
            got = fused.dequantize()
            same = torch.equal(got, ref)
            row[f"triton{tile}_s"] = timeit(fused.dequantize)
            row[f"triton{tile}_gpu_s"] = gpu_time(fused.dequantize)
            row[f"triton{tile}_same_bits"] = same
        down = torch.randn(args.rank, cols, device=dev, dtype=dt) * 0.02
        up = torch.randn(rows, args.rank, device=dev, dtype=dt) * 0.02
        x = torch.randn(args.tokens, cols, device=dev, dtype=dt)
        exact = ref.float() + 0.8 * (up.float() @ down.float())
        row["bnb_then_addmm_s"] = timeit(lambda: bnbf.dequantize_4bit(packed, qs).addmm_(up, down, alpha=0.8))
        row["bnb_then_addmm_gpu_s"] = gpu_time(lambda: bnbf.dequantize_4bit(packed, qs).addmm_(up, down, alpha=0.8))
        for tile in LORA_TILES:
            TUNING.lora_tile = tile
            m = fused.dequantize(cols, down, up, 0.8)
            row[f"lora{tile}_rel_err"] = rel_err(m, exact)
            row[f"lora{tile}_s"] = timeit(lambda: fused.dequantize(cols, down, up, 0.8))
            row[f"lora{tile}_gpu_s"] = gpu_time(lambda: fused.dequantize(cols, down, up, 0.8))
        wb = ref.clone()
        row["gemm_bf16_s"] = timeit(lambda: F.linear(x, wb))
        row["unmerged_lora_gemms_s"] = timeit(lambda: F.linear(x, down).matmul(up.t()))
        row["unmerged_lora_gemms_gpu_s"] = gpu_time(lambda: F.linear(x, down).matmul(up.t()))
        res["shapes"].append(row)
        for k, v in row.items():
            if k.endswith("_s"):
                totals[k] = totals.get(k, 0.0) + v * count
        print(json.dumps({k: (round(v * 1e3, 4) if k.endswith("_s") else v) for k, v in row.items()
                          if not k.endswith("same_bits") or not v}), flush=True)
        fastest = min(row[f"triton{t}_gpu_s"] for t in PLAIN_TILES)
        print(f"  GPU time: bnb {gbytes / row['bnb_gpu_s']:.0f} GB/s, Triton {gbytes / fastest:.0f} GB/s", flush=True)
        packed = qs = ref = fused = down = up = x = exact = wb = None  # free before the next shape
        torch.cuda.empty_cache()
    res["totals_per_step_ms"] = {k: round(v * 1e3, 3) for k, v in totals.items()}
    print(json.dumps(res["totals_per_step_ms"], indent=1))
    # the tiles with the least GPU time over a FLUX step (what bench_gpu --tiles reads)
    best = {kind: min((t for t in tiles), key=lambda t: totals[f"{kind}{t}_gpu_s"])
            for kind, tiles in (("triton", PLAIN_TILES), ("lora", LORA_TILES))}
    res["best_tiles"] = {"plain": list(best["triton"]), "lora": list(best["lora"])}
    print("best tiles:", res["best_tiles"])
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
