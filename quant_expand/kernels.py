"""Optional Triton kernel for the int8 layers' dequantization (CUDA only; everything works without it).

``W = CB * (SCB / 127)`` row by row: int8 in, the compute dtype out, one pass over the weight. PyTorch's
``torch.mul(int8, bf16)`` computes the same products (exact in float32: |CB| <= 127 times an 8-bit
mantissa) and rounds them once, as this kernel does, so both give the same bits; PyTorch's mixed-dtype
path, though, loads and casts element by element.
"""
from __future__ import annotations

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


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def dequantize_int8_rows(cb: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``cb * scale[:, None]`` for int8 ``cb`` [rows, cols] (contiguous, CUDA) and ``scale`` [rows] in
    the output dtype."""
    rows, cols = cb.shape
    out = torch.empty((rows, cols), dtype=scale.dtype, device=cb.device)
    _int8_rows_kernel[(rows, triton.cdiv(cols, _BLOCK))](cb, scale, out, cols, BLOCK=_BLOCK)
    return out
