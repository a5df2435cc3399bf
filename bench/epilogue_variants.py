"""Experiment: ways to write the merged-LoRA dequantize kernel (``W + alpha * up @ down`` from NF4 bytes),
timed on FLUX.1-dev's merged shapes (GPU time, CUDA graphs). Prints one JSON line per (shape, variant)
and writes the table (``python bench/epilogue_variants.py --out FILE [--rank R]``). Variants:

- ``a``: quant_expand.kernels' kernel (rank-R product first, the dequantized tile built per
  quantization block and reshaped), with tile shapes it does not pick itself;
- ``b``: the product first, then the tile dequantized element by element in the product's own shape
  (byte and absmax addresses per element: no reshape of the tile);
- ``d``: the tile dequantized first and handed to the GEMM as its accumulator (``tl.dot(u, d, acc)``);
- ``e``: ``a``'s tile, but each program holds its rows of ``up`` (the whole rank, padded to a power of
  two) and walks ``CT`` column tiles, so ``up`` is read once per row band and the loop is pipelined.

Run 1 (bench/results/epilogue-variants-h200-2026-12-02-run1.json) had ten ``b``/``d`` tiles, other ``a``
tiles and no ``e``; the tile lists here are run 2's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant_expand import kernels  # noqa: E402


@triton.jit
def _variant_kernel(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr,
                    down_ptr, up_ptr, alpha, out_ptr, n_rows, n_stored, n_cols, rank,
                    QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, NESTED: tl.constexpr,
                    ACC_INIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    col_ok = cols < n_cols
    if not ACC_INIT:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for r0 in range(0, rank, BR):
            rr = r0 + tl.arange(0, BR)
            r_ok = rr < rank
            u = tl.load(up_ptr + rows64[:, None] * rank + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            d = tl.load(down_ptr + rr[:, None].to(tl.int64) * n_cols + cols[None, :],
                        mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            acc += tl.dot(u, d)
    ok = row_ok[:, None] & (cols < n_stored)[None, :]
    blk = rows64[:, None] * (n_stored // QBLOCK) + (cols // QBLOCK)[None, :]
    if NESTED:
        a8 = tl.load(absmax_ptr + blk, mask=ok, other=0)
        amax = tl.load(code2_ptr + a8.to(tl.int32)) * tl.load(absmax2_ptr + blk // QBLOCK2, mask=ok, other=0.0)
        amax = amax + tl.load(offset_ptr)
    else:
        amax = tl.load(absmax_ptr + blk, mask=ok, other=0.0)
    b = tl.load(packed_ptr + rows64[:, None] * (n_stored // 2) + (cols // 2)[None, :], mask=ok, other=0).to(tl.int32)
    code = (b >> (4 - 4 * (cols & 1))[None, :]) & 15
    w = tl.where(ok, tl.load(table_ptr + code) * amax, 0.0)
    if ACC_INIT:
        acc = w * (1.0 / alpha)
        for r0 in range(0, rank, BR):
            rr = r0 + tl.arange(0, BR)
            r_ok = rr < rank
            u = tl.load(up_ptr + rows64[:, None] * rank + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            d = tl.load(down_ptr + rr[:, None].to(tl.int64) * n_cols + cols[None, :],
                        mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(u, d, acc)
        w = acc * alpha
    else:
        w = w + alpha * acc
    tl.store(out_ptr + rows64[:, None] * n_cols + cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _rows_kernel(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr,
                 down_ptr, up_ptr, alpha, out_ptr, n_rows, n_stored, n_cols, rank,
                 QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, NESTED: tl.constexpr,
                 BM: tl.constexpr, NB: tl.constexpr, RP2: tl.constexpr, CT: tl.constexpr):
    BN: tl.constexpr = NB * QBLOCK
    HALF: tl.constexpr = QBLOCK // 2
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    rr = tl.arange(0, RP2)
    r_ok = rr < rank
    u = tl.load(up_ptr + rows64[:, None] * rank + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    blocks_per_row = n_stored // QBLOCK
    for j in range(0, CT):
        tile = tl.program_id(1) * CT + j
        cols = tile * BN + tl.arange(0, BN)
        blocks = tile * NB + tl.arange(0, NB)
        d = tl.load(down_ptr + rr[:, None].to(tl.int64) * n_cols + cols[None, :],
                    mask=r_ok[:, None] & (cols < n_cols)[None, :], other=0.0)
        acc = tl.dot(u, d)
        blk_ok = blocks < blocks_per_row
        blk = rows64[:, None] * blocks_per_row + blocks[None, :]
        ok2 = row_ok[:, None] & blk_ok[None, :]
        if NESTED:
            a8 = tl.load(absmax_ptr + blk, mask=ok2, other=0)
            amax = tl.load(code2_ptr + a8.to(tl.int32)) * tl.load(absmax2_ptr + blk // QBLOCK2, mask=ok2, other=0.0)
            amax = amax + tl.load(offset_ptr)
        else:
            amax = tl.load(absmax_ptr + blk, mask=ok2, other=0.0)
        byte_idx = blk[:, :, None] * HALF + tl.arange(0, HALF)[None, None, :]
        b = tl.load(packed_ptr + byte_idx, mask=ok2[:, :, None], other=0).to(tl.int32)
        hi = tl.load(table_ptr + (b >> 4))
        lo = tl.load(table_ptr + (b & 15))
        vals = tl.reshape(tl.join(hi, lo), (BM, NB, QBLOCK))
        w = tl.where(ok2[:, :, None], vals * amax[:, :, None], 0.0)
        w = tl.reshape(w, (BM, BN)) + alpha * acc
        tl.store(out_ptr + rows64[:, None] * n_cols + cols[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (cols < n_cols)[None, :])


def rows_variant(fused, down, up, alpha, tile):
    bm, nb, ct, warps, stages = tile
    qs = fused.qs
    width, rank = down.shape[1], down.shape[0]
    out = torch.empty((fused.rows, width), dtype=qs.dtype, device=fused.packed.device)
    grid = (triton.cdiv(fused.rows, bm), triton.cdiv(triton.cdiv(width, nb * qs.blocksize), ct))
    _rows_kernel[grid](fused.packed, fused.absmax, fused.code2, fused.absmax2, fused.offset, fused.table_,
                       down, up, alpha, out, fused.rows, fused.stored, width, rank,
                       QBLOCK=qs.blocksize, QBLOCK2=fused.qblock2, NESTED=bool(qs.nested),
                       BM=bm, NB=nb, RP2=max(16, triton.next_power_of_2(rank)), CT=ct,
                       num_warps=warps, num_stages=stages, enable_fp_fusion=False)
    return out


def variant(fused: kernels.Dequant4bit, down, up, alpha: float, acc_init: bool, tile):
    bm, bn, br, warps, stages = tile
    qs = fused.qs
    width = down.shape[1]
    out = torch.empty((fused.rows, width), dtype=qs.dtype, device=fused.packed.device)
    grid = (triton.cdiv(fused.rows, bm), triton.cdiv(width, bn))
    _variant_kernel[grid](fused.packed, fused.absmax, fused.code2, fused.absmax2, fused.offset, fused.table_,
                          down, up, alpha, out, fused.rows, fused.stored, width, down.shape[0],
                          QBLOCK=qs.blocksize, QBLOCK2=fused.qblock2, NESTED=bool(qs.nested), ACC_INIT=acc_init,
                          BM=bm, BN=bn, BR=br, num_warps=warps, num_stages=stages, enable_fp_fusion=False)
    return out


# (BM, NB, BR, warps, stages); run 1 (H200): (64, 1, 64, 4, 2) best of these on every shape
A_TILES = [(64, 1, 64, 4, 2), (64, 2, 64, 4, 3), (64, 1, 64, 4, 3), (64, 1, 32, 4, 2), (64, 1, 32, 4, 3),
           (32, 1, 64, 4, 2), (32, 1, 64, 2, 2), (32, 1, 128, 4, 1), (64, 1, 64, 8, 2), (128, 1, 64, 4, 2),
           (128, 1, 32, 4, 3), (64, 1, 16, 4, 4), (32, 1, 32, 2, 3), (16, 1, 64, 2, 2)]
# b, d: (BM, BN, BR, warps, stages); run 1: 2-4x slower than a, dropped
V_TILES = [(64, 64, 128, 4, 1)]
# e: (BM, NB, CT, warps, stages)
E_TILES = [(64, 1, 2, 4, 2), (64, 1, 4, 4, 2), (64, 1, 8, 4, 2), (64, 1, 4, 4, 3), (64, 1, 8, 4, 3),
           (32, 1, 4, 4, 2), (32, 1, 8, 4, 3), (64, 2, 4, 4, 2), (128, 1, 4, 8, 2), (64, 1, 16, 4, 3),
           (32, 1, 16, 2, 3), (64, 1, 4, 8, 3)]


def main():
    import bitsandbytes.functional as bnbf
    from dequant_kernels import SHAPES, gpu_time

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="two shapes, three tiles each (a dry run)")
    args = ap.parse_args()
    dev, dt = torch.device("cuda", 0), torch.bfloat16
    shapes = SHAPES[:2] if args.quick else SHAPES
    a_tiles, v_tiles, e_tiles = (A_TILES[:3], V_TILES[:3], E_TILES[:3]) if args.quick else (A_TILES, V_TILES, E_TILES)
    rows_out, totals = [], {}
    for rows, cols, count in shapes:
        if args.quick:
            rows, cols = rows // 16, cols // 16
        w = torch.randn(rows, cols, device=dev, dtype=dt) * 0.02
        packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        ref_w = bnbf.dequantize_4bit(packed, qs)
        fused = kernels.Dequant4bit(packed, qs)
        down = torch.randn(args.rank, cols, device=dev, dtype=dt) * 0.02
        up = torch.randn(rows, args.rank, device=dev, dtype=dt) * 0.02
        exact = ref_w.float() + 0.8 * (up.float() @ down.float())
        zero_up = torch.zeros_like(up)
        cands = [("plain", None, lambda: fused.dequantize())]
        for tile in a_tiles:
            cands.append((f"a{tile}", tile, lambda tile=tile: _kernel_a(fused, cols, down, up, 0.8, tile)))
        for tile in e_tiles:
            cands.append((f"e{tile}", tile, lambda tile=tile: rows_variant(fused, down, up, 0.8, tile)))
        for acc_init in (False, True):
            for tile in v_tiles:
                cands.append((f"{'d' if acc_init else 'b'}{tile}", tile,
                              lambda acc_init=acc_init, tile=tile: variant(fused, down, up, 0.8, acc_init, tile)))
        for name, tile, fn in cands:
            row = {"shape": [rows, cols], "count": count, "variant": name}
            try:
                got = fn()
                if name != "plain":
                    row["rel_err"] = ((got.float() - exact).norm() / exact.norm()).item()
                    if name[0] in "bd":  # with a zero LoRA the tile is exactly bnb's dequantized weight
                        z = variant(fused, down, zero_up, 0.8, name[0] == "d", tile)
                        row["zero_lora_same_bits"] = torch.equal(z, ref_w)
                else:
                    row["same_bits"] = torch.equal(got, ref_w)
                row["gpu_us"] = round(gpu_time(fn) * 1e6, 2)
                totals[name] = totals.get(name, 0.0) + row["gpu_us"] * count
            except Exception as e:  # a tile that does not build here (shared memory, registers)
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows_out.append(row)
            print(json.dumps(row), flush=True)
        packed = qs = ref_w = fused = down = up = exact = zero_up = w = None
        torch.cuda.empty_cache()
    complete = {k: v for k, v in totals.items() if sum(1 for r in rows_out if r["variant"] == k and "gpu_us" in r) == len(shapes)}
    ranking = sorted(complete.items(), key=lambda kv: kv[1])
    print("per FLUX step (ms):", json.dumps({k: round(v / 1e3, 3) for k, v in ranking[:12]}))
    import time

    import bitsandbytes

    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                                          "torch": torch.__version__, "triton": triton.__version__,
                                          "bitsandbytes": bitsandbytes.__version__, "rank": args.rank, "rows": rows_out,
                                          "per_step_ms": {k: round(v / 1e3, 3) for k, v in ranking}}, indent=1))


def _kernel_a(fused, width, down, up, alpha, tile):
    """quant_expand.kernels' LoRA kernel with this tile (its NB honoured)."""
    bm, nb, br, warps, stages = tile
    qs = fused.qs
    out = torch.empty((fused.rows, width), dtype=qs.dtype, device=fused.packed.device)
    grid = (triton.cdiv(fused.rows, bm), triton.cdiv(width, nb * qs.blocksize))
    kernels._dequant4_kernel[grid](
        fused.packed, fused.absmax, fused.code2, fused.absmax2, fused.offset, fused.table_,
        down, up, fused.table_, alpha, out, fused.rows, fused.stored, width, down.shape[0],
        QBLOCK=qs.blocksize, QBLOCK2=fused.qblock2, NESTED=bool(qs.nested), LORA=True, SCALE_VEC=False,
        BM=bm, NB=nb, BR=br, num_warps=warps, num_stages=stages, enable_fp_fusion=False)
    return out


if __name__ == "__main__":
    main()
