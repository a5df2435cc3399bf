"""Optional Triton kernels for the CUDA forward (everything works without them, through bnb's kernels
and PyTorch ops).

``dequantize_int8_rows``: ``W = CB * (SCB / 127)`` row by row: int8 in, the compute dtype out, one pass
over the weight. PyTorch's ``torch.mul(int8, bf16)`` computes the same products (exact in float32:
|CB| <= 127 times an 8-bit mantissa) and rounds them once, as this kernel does, so both give the same
bits; PyTorch's mixed-dtype path, though, loads and casts element by element.

``Dequant4bit``: NF4/FP4 in bnb's layout, in one kernel per layer instead of bnb's two or three (nested
absmax, offset add, 4-bit codes): each program reads a tile of packed bytes and its absmax bytes once
and writes the tile of the compute-dtype weight. The products are the ones bnb's kernels form
(``code[q] * absmax`` in float32, the nested absmax as ``code2[a] * absmax2`` then ``+ offset``, no fused
multiply-add), rounded once, so the bits are bnb's; the code table is read back from bnb's own CUDA
kernel, and every new (device, type, dtype, layout) is checked against bnb bit for bit before use
(:func:`Dequant4bit.verified`). With a LoRA it also adds ``alpha * (up * scale) @ down`` to each tile
before writing it (a rank-R GEMM in the tile's epilogue): the merged lazy delta without a second pass
over the weight.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

try:  # Triton comes with CUDA builds of PyTorch; CPU-only installs have none
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    triton = None

_BLOCK = 2048

if triton is not None:
    @triton.jit
    def _int8_rows_kernel(cb_ptr, scale_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        s = tl.load(scale_ptr + row).to(tl.float32)
        v = tl.load(cb_ptr + row * n_cols + cols, mask=mask).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (v * s).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dequant4_kernel(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr,
                         down_ptr, up_ptr, scale_ptr, alpha, out_ptr,
                         n_rows, n_stored, n_cols, rank,
                         QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, NESTED: tl.constexpr,
                         LORA: tl.constexpr, SCALE_VEC: tl.constexpr,
                         BM: tl.constexpr, NB: tl.constexpr, BR: tl.constexpr):
        # tile: BM rows x NB quantization blocks (NB * QBLOCK columns) of the [n_rows, n_stored] weight,
        # written into columns [0, n_stored) of the [n_rows, n_cols] output (the rest: zeros + LoRA)
        BN: tl.constexpr = NB * QBLOCK
        HALF: tl.constexpr = QBLOCK // 2
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        blocks = tl.program_id(1) * NB + tl.arange(0, NB)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        if LORA:  # the rank-R product first: the dequantized tile is not held across the GEMM loop
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for r0 in range(0, rank, BR):
                rr = r0 + tl.arange(0, BR)
                r_ok = rr < rank
                u = tl.load(up_ptr + rows64[:, None] * rank + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
                if SCALE_VEC:  # up * scale in the compute dtype, as torch forms it
                    s = tl.load(scale_ptr + rr, mask=r_ok, other=0.0)
                    u = (u.to(tl.float32) * s.to(tl.float32)[None, :]).to(up_ptr.dtype.element_ty)
                d = tl.load(down_ptr + rr[:, None].to(tl.int64) * n_cols + cols[None, :],
                            mask=r_ok[:, None] & (cols < n_cols)[None, :], other=0.0)
                acc += tl.dot(u, d)
        blocks_per_row = n_stored // QBLOCK
        blk_ok = blocks < blocks_per_row
        blk = rows64[:, None] * blocks_per_row + blocks[None, :]  # [BM, NB] absmax index
        ok2 = row_ok[:, None] & blk_ok[None, :]
        if NESTED:
            a8 = tl.load(absmax_ptr + blk, mask=ok2, other=0)
            amax = tl.load(code2_ptr + a8.to(tl.int32)) * tl.load(absmax2_ptr + blk // QBLOCK2, mask=ok2, other=0.0)
            amax = amax + tl.load(offset_ptr)
        else:
            amax = tl.load(absmax_ptr + blk, mask=ok2, other=0.0)
        byte_idx = blk[:, :, None] * HALF + tl.arange(0, HALF)[None, None, :]  # [BM, NB, HALF]
        b = tl.load(packed_ptr + byte_idx, mask=ok2[:, :, None], other=0).to(tl.int32)
        hi = tl.load(table_ptr + (b >> 4))
        lo = tl.load(table_ptr + (b & 15))
        vals = tl.reshape(tl.join(hi, lo), (BM, NB, QBLOCK))  # element 2k: high nibble, 2k+1: low
        w = tl.where(ok2[:, :, None], vals * amax[:, :, None], 0.0)  # columns past the stored ones: zero
        w = tl.reshape(w, (BM, BN))
        if LORA:
            w = w + alpha * acc
        out = out_ptr + rows64[:, None] * n_cols + cols[None, :]
        tl.store(out, w.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < n_cols)[None, :])

from ..tuning import TUNING


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def dequantize_int8_rows(cb: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``cb * scale[:, None]`` for int8 ``cb`` [rows, cols] (contiguous, CUDA) and ``scale`` [rows] in
    the output dtype."""
    rows, cols = cb.shape
    out = torch.empty((rows, cols), dtype=scale.dtype, device=cb.device)
    _int8_rows_kernel[(rows, triton.cdiv(cols, _BLOCK))](cb, scale, out, cols, BLOCK=_BLOCK)
    return out


_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_NESTED_BLOCK = 256  # the nested absmax blocksize bnb's quantize_4bit uses
_EPILOGUE_MAX_BLOCK = 512  # a tile is at least one quantization block wide: wider ones overflow shared memory
_PLAIN_MAX_COLS = 1024  # columns per row of a plain tile (more quantization blocks per row: fewer)
# tile shapes (TUNING.plain_tile / lora_tile in quant_expand/tuning.py): chosen with
# bench/dequant_kernels.py; any shape gives the same dequantized bits. The LoRA tile's blocks count
# 64-column blocks (wider quantization blocks: one). Square LoRA tiles use less shared memory per
# program than wider ones, so more programs per SM hide the dequantize's loads behind the others' GEMMs.


class Dequant4bit:
    """One 4-bit layer's weight (bnb's packed bytes and ``QuantState``) dequantized by
    ``_dequant4_kernel``; build it only where :meth:`supports` and :meth:`verified` say yes."""

    _tables: dict = {}
    _verified: dict = {}

    @staticmethod
    def supports(packed: torch.Tensor, qs, dtype: torch.dtype) -> bool:
        if triton is None or packed.device.type != "cuda" or dtype not in _OUT_DTYPES or qs.dtype != dtype:
            return False
        if qs.quant_type not in ("nf4", "fp4") or qs.blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
            return False
        rows, cols = qs.shape
        if cols % qs.blocksize or packed.dtype != torch.uint8 or not packed.is_contiguous():
            return False
        if qs.nested:
            s2 = qs.state2
            if s2.absmax.dtype != torch.float32 or qs.absmax.dtype != torch.uint8 or s2.code.dtype != torch.float32:
                return False
        elif qs.absmax.dtype != torch.float32:
            return False
        return qs.absmax.is_contiguous()

    @classmethod
    def table(cls, quant_type: str, device: torch.device) -> torch.Tensor:
        """The 16 code values as bnb's CUDA kernel has them: its own output for each code with absmax 1."""
        key = (quant_type, device)
        t = cls._tables.get(key)
        if t is None:
            codes = torch.arange(16, dtype=torch.uint8, device=device)
            packed = ((codes[0::2] << 4) | codes[1::2]).repeat(4)  # 64 values: codes 0..15 four times
            one = torch.ones(1, dtype=torch.float32, device=device)
            t = torch.ops.bitsandbytes.dequantize_4bit.default(packed, one, 64, quant_type, (64,), torch.float32)[:16]
            cls._tables[key] = t = t.contiguous()
        return t

    @classmethod
    def verified(cls, qs, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this kernel gives bnb's bits for this kind of layer here (checked once on a random
        weight of the same type, blocksize, nesting and dtype; on a mismatch bnb's kernels are used)."""
        if qs.nested and qs.state2.blocksize != _NESTED_BLOCK:
            return False  # bnb's quantizer (the check's reference) makes only this nesting

        def check():
            import bitsandbytes.functional as bnbf

            g = torch.Generator(device=device).manual_seed(0)
            w = torch.randn(96, 4 * qs.blocksize, generator=g, device=device, dtype=dtype)
            w[0, :7] = 0.0  # zeros
            packed, q2 = bnbf.quantize_4bit(w, blocksize=qs.blocksize, compress_statistics=bool(qs.nested),
                                            quant_type=qs.quant_type)
            return cls.supports(packed, q2, dtype) and torch.equal(
                cls(packed, q2).dequantize(), bnbf.dequantize_4bit(packed, q2).to(dtype))

        return cls._check((device, qs.quant_type, qs.blocksize, bool(qs.nested), dtype), check,
                          "Triton 4-bit dequantize", "using bitsandbytes' kernels", device)

    @classmethod
    def _check(cls, key, check, what: str, instead: str, device: torch.device):
        """The verdict remembered for ``key``, else run ``check`` on ``device`` (Triton launches on the
        current device) and remember it; a Triton that cannot build or run the kernel here gives False
        with a warning. Running out of memory says nothing about the kernel: False for now, checked
        again next time."""
        ok = cls._verified.get(key)
        if ok is not None:
            return ok
        try:
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                ok = bool(check())
        except torch.OutOfMemoryError:
            return False
        except Exception as e:
            warnings.warn(f"quant_expand: {what} unavailable on {device} ({type(e).__name__}: {e}); {instead}")
            ok = False
        cls._verified[key] = ok
        return ok

    @classmethod
    def epilogue_ok(cls, dtype: torch.dtype, device: torch.device, blocksize: int = 64) -> bool:
        """Whether the merged-LoRA epilogue (a tensor-core GEMM in ``dtype``) builds and computes here
        for this blocksize: checked once per device, dtype and blocksize on a small layer (a vector
        scale, a widened width) against ``W + (s * up) @ down``. Blocksizes above 512 would need more
        shared memory per tile than GPUs have; GPUs without tensor cores for the dtype fail the check.
        Both then dequantize and add the LoRA with ``addmm_``."""
        if dtype not in (torch.bfloat16, torch.float16) or blocksize > _EPILOGUE_MAX_BLOCK:
            return False

        def check():
            import bitsandbytes.functional as bnbf

            g = torch.Generator(device=device).manual_seed(1)
            w = torch.randn(96, 2 * blocksize, generator=g, device=device, dtype=dtype)
            packed, q2 = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
            width = 2 * blocksize + 64
            down = torch.randn(24, width, generator=g, device=device, dtype=dtype) * 0.1
            up = torch.randn(96, 24, generator=g, device=device, dtype=dtype) * 0.1
            scale = torch.rand(24, generator=g, device=device, dtype=dtype)
            got = cls(packed, q2).dequantize(width, down, up, scale).float()
            ref = torch.nn.functional.pad(bnbf.dequantize_4bit(packed, q2).float(), (0, 64)) + \
                (up * scale).float() @ down.float()
            return bool(torch.isfinite(got).all()) and ((got - ref).norm() / ref.norm()).item() < 1e-2

        return cls._check(("epilogue", device, dtype, blocksize), check,
                          f"Triton LoRA epilogue ({dtype}, blocksize {blocksize})",
                          "dequantizing, then adding the LoRA with addmm_", device)

    def __init__(self, packed: torch.Tensor, qs):
        self.packed, self.qs = packed, qs
        self.rows, self.stored = qs.shape
        device = packed.device
        self.table_ = self.table(qs.quant_type, device)
        if qs.nested:
            s2 = qs.state2
            self.absmax, self.code2, self.absmax2 = qs.absmax, s2.code.to(device), s2.absmax
            self.offset = torch.as_tensor(qs.offset, dtype=torch.float32).to(device).reshape(1)
            self.qblock2 = s2.blocksize
        else:
            self.absmax = qs.absmax
            self.code2 = self.absmax2 = self.offset = self.absmax  # unused
            self.qblock2 = 1

    def dequantize(self, width: int | None = None, down=None, up=None, scale=None) -> torch.Tensor:
        """The weight ``[rows, width]`` (``width`` >= the stored columns, extra columns zero) in the
        compute dtype; with ``down`` [R, width] and ``up`` [rows, R], plus ``scale * up @ down`` (``scale``
        a float, or a vector [R] applied to ``up``'s columns)."""
        qs = self.qs
        width = width or self.stored
        out_dtype = qs.dtype
        lora = down is not None
        rank = down.shape[0] if lora else 0
        bm, nb, br, warps, stages = TUNING.lora_tile if lora else TUNING.plain_tile
        qblock = qs.blocksize
        if lora:
            if down.shape != (rank, width) or up.shape != (self.rows, rank) or not (down.is_contiguous() and up.is_contiguous()):
                raise ValueError(f"LoRA factors {tuple(up.shape)} x {tuple(down.shape)} do not fit a "
                                 f"[{self.rows}, {width}] weight (contiguous [rows, R] and [R, width] expected)")
            if not isinstance(scale, float) and scale.numel() != rank:
                raise ValueError(f"{scale.numel()} LoRA scales for rank {rank}")
            nb = max(1, nb * 64 // qblock)
            if qblock > 128:  # one pipeline stage: a 256- or 512-wide tile of down fits consumer GPUs' shared memory
                stages = 1
        else:
            nb = max(1, min(nb, _PLAIN_MAX_COLS // qblock))
        out = torch.empty((self.rows, width), dtype=out_dtype, device=self.packed.device)
        vec = lora and not isinstance(scale, float)
        grid = (triton.cdiv(self.rows, bm), triton.cdiv(width, nb * qblock))
        _dequant4_kernel[grid](
            self.packed, self.absmax, self.code2, self.absmax2, self.offset, self.table_,
            down if lora else self.table_, up if lora else self.table_, scale if vec else self.table_,
            1.0 if vec or not lora else float(scale), out,
            self.rows, self.stored, width, rank,
            QBLOCK=qblock, QBLOCK2=self.qblock2, NESTED=bool(qs.nested), LORA=lora, SCALE_VEC=vec,
            BM=bm, NB=nb, BR=br or 16, num_warps=warps, num_stages=stages, enable_fp_fusion=False)
        return out
