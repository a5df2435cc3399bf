"""CPU measurements behind two design choices (run: python bench/cpu_paths.py [--out FILE]).

1. What ``int8`` means: weight-only dequantize + matmul in the compute dtype, against bitsandbytes'
   own LLM.int8 forward (``Linear8bitLt``, threshold 0, int8 x int8 matmul). Accuracy and time.
2. The lazy LoRA delta: unmerged ``B(Ax)`` against adding ``B@A`` into the transient dequantized
   weight, per token count, next to the cost model ``QuantLinear`` uses to pick one.
Prints a table and writes JSON. The GPU numbers that matter for users come from bench/ on the GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bitsandbytes as bnb  # noqa: E402

from quant_expand import LazyLoraDelta, LoraTerm, QuantSpec  # noqa: E402
from quant_expand.layers import quantized_linear_from_float  # noqa: E402
from quant_expand.testing.prompts import rel_err  # noqa: E402


def timeit(fn, repeat=5):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def int8_paths(out_f=3072, in_f=3072, tokens=(16, 256)):
    rows = []
    w = torch.randn(out_f, in_f) / in_f ** 0.5
    ours = quantized_linear_from_float(w, None, QuantSpec("int8"))
    theirs = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False, threshold=0.0)
    theirs.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    theirs = theirs.to("cpu")
    for t in tokens:
        x = torch.randn(t, in_f)
        exact = F.linear(x, ours.dequantize(dtype=torch.float32))  # the stored weights, float32 math
        with torch.no_grad():
            y_ours, y_bnb = ours(x), theirs(x)
        rows.append({"tokens": t, "shape": [out_f, in_f],
                     "weight_only_s": timeit(lambda: ours(x)), "bnb_int8_matmul_s": timeit(lambda: theirs(x)),
                     "weight_only_rel_err": rel_err(y_ours, exact), "bnb_int8_matmul_rel_err": rel_err(y_bnb, exact)})
    return rows


def delta_paths(shapes=((3072, 3072), (12288, 3072)), rank=128, tokens=(64, 512, 1024, 2048, 4096)):
    rows = []
    for out_f, in_f in shapes:
        layer = quantized_linear_from_float(torch.randn(out_f, in_f) / in_f ** 0.5, None, QuantSpec("nf4", True))
        delta = LazyLoraDelta(out_f, in_f, [LoraTerm(torch.randn(rank, in_f) * 0.01, torch.randn(out_f, rank) * 0.01, 1.0)])
        down, up, scale = delta.stacked("cpu", torch.float32)
        up = up * scale
        for t in tokens:
            x = torch.randn(t, in_f)

            def merged():
                w = layer.dequantize_stored("cpu", torch.float32)
                w.addmm_(up, down)
                return F.linear(x, w)

            def unmerged():
                return F.linear(x, layer.dequantize_stored("cpu", torch.float32)) + F.linear(F.linear(x, down), up)

            tm, tu = timeit(merged, 3), timeit(unmerged, 3)
            rows.append({"shape": [out_f, in_f], "rank": rank, "tokens": t, "merged_s": tm, "unmerged_s": tu,
                         "faster": "merged" if tm < tu else "unmerged",
                         "cost_model_picks": "merged" if delta.prefer_merged(t) else "unmerged",
                         "rel_diff": rel_err(merged(), unmerged())})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    result = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "bitsandbytes": bnb.__version__,
              "int8": int8_paths(), "lora_delta": delta_paths()}
    print("int8 (CPU, float32 compute):")
    for r in result["int8"]:
        print(f"  tokens {r['tokens']:5d}: weight-only {r['weight_only_s'] * 1e3:8.2f} ms (rel err {r['weight_only_rel_err']:.1e})"
              f" | bnb int8 matmul {r['bnb_int8_matmul_s'] * 1e3:8.2f} ms (rel err {r['bnb_int8_matmul_rel_err']:.1e})")
    print("lazy LoRA delta (CPU, nf4 base, rank 128):")
    for r in result["lora_delta"]:
        print(f"  {r['shape']} tokens {r['tokens']:5d}: merged {r['merged_s'] * 1e3:8.2f} ms | unmerged {r['unmerged_s'] * 1e3:8.2f} ms"
              f" -> faster: {r['faster']:8s} cost model: {r['cost_model_picks']:8s} (rel diff {r['rel_diff']:.1e})")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"cpu-paths-{result['date']}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
