"""bitsandbytes' own CUDA kernels called through its ctypes entry points: the code a bnb upgrade breaks first."""
from __future__ import annotations

import contextlib
import importlib
from typing import Optional

import torch

from ..tuning import TUNING
from . import triton_dequant as kernels

_bnb_ops = torch.ops.bitsandbytes


_KERNEL_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class Cuda4bit:
    """bitsandbytes' own CUDA kernels for one 4-bit layer, called through its ctypes entry points.

    bnb's torch ops run each call through the dispatcher, a dynamo guard and Python argument checks:
    host time per op that, at two or three ops per layer and step, kept the GPU waiting. The calls here pass the very arguments bnb's CUDA backend passes to
    the very same kernels, so the results are bit-identical; under torch.compile the torch ops are used
    (dynamo traces those, not ctypes).
    """

    _lib = None

    @classmethod
    def usable(cls, qs, gemm: bool = False) -> bool:
        if cls._lib is None:
            try:
                importlib.import_module("bitsandbytes.backends.cuda.ops")  # sets the ctypes signatures
                from bitsandbytes.cextension import lib

                for name in ("cdequantize_blockwise_fp32", "cdequantize_blockwise_bf16_nf4", "cgemm_4bit_bf16"):
                    getattr(lib, name)
                cls._lib = lib
            except Exception:  # no CUDA build of bnb here, or another layout of its internals
                cls._lib = False
        if not cls._lib or TUNING.four_bit_path == "torch" or qs.dtype not in _KERNEL_DTYPES or qs.quant_type not in ("nf4", "fp4"):
            return False
        if qs.nested and (qs.state2.dtype != torch.float32 or qs.absmax.dtype != torch.uint8):
            return False
        return not gemm or not qs.nested or qs.state2.blocksize == 256

    def __init__(self, packed: torch.Tensor, qs):
        lib = self._lib
        dt = _KERNEL_DTYPES[qs.dtype]
        self.packed, self.qs = packed, qs
        self.index = packed.device.index
        self.numel = qs.shape[0] * qs.shape[1]
        self.dequant4 = getattr(lib, f"cdequantize_blockwise_{dt}_{qs.quant_type}")
        self.dequant8 = lib.cdequantize_blockwise_fp32
        self.gemm = getattr(lib, f"cgemm_4bit_{dt}")
        self.offset = qs.offset.to(device=packed.device, dtype=torch.float32) if qs.nested else None  # 0-dim, as bnb wants
        self.fused = None
        if TUNING.four_bit_path == "triton":
            dev = packed.device
            if kernels.available() and kernels.Dequant4bit.supports(packed, qs, qs.dtype) and \
                    kernels.Dequant4bit.verified(qs, qs.dtype, dev):
                self.fused = kernels.Dequant4bit(packed, qs)

    def _device(self):
        return torch.cuda.device(self.index) if torch.cuda.current_device() != self.index else contextlib.nullcontext()

    def dequantize(self) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return dequantize_4bit_unchecked(self.packed, self.qs)
        qs = self.qs
        with self._device():
            if self.fused is not None:
                return self.fused.dequantize()
            stream = torch._C._cuda_getCurrentRawStream(self.index)
            absmax = qs.absmax
            if qs.nested:
                s2 = qs.state2
                nested = torch.empty(absmax.shape, dtype=torch.float32, device=absmax.device)
                self.dequant8(s2.code.data_ptr(), absmax.data_ptr(), s2.absmax.data_ptr(), nested.data_ptr(),
                              s2.blocksize, absmax.numel(), stream)
                nested += qs.offset
                absmax = nested
            w = torch.empty(qs.shape, dtype=qs.dtype, device=self.packed.device)
            self.dequant4(None, self.packed.data_ptr(), absmax.data_ptr(), w.data_ptr(), qs.blocksize, self.numel, stream)
        return w

    def matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        qs = self.qs
        nested = qs.nested
        if torch.compiler.is_compiling():
            return _bnb_ops.gemm_4bit.default(
                x, self.packed.view(-1, 1), qs.shape, qs.state2.absmax if nested else qs.absmax, qs.blocksize,
                qs.quant_type, bias=bias, absmax_8bit=qs.absmax if nested else None,
                absmax_code=qs.state2.code if nested else None, absmax_offset=self.offset)
        a = x.contiguous()
        n, k = qs.shape
        out = torch.empty((*a.shape[:-1], n), dtype=a.dtype, device=a.device)
        with self._device():
            self.gemm(a.data_ptr(), self.packed.data_ptr(),
                      (qs.state2.absmax if nested else qs.absmax).data_ptr(),
                      qs.absmax.data_ptr() if nested else None,
                      qs.state2.code.data_ptr() if nested else None,
                      self.offset.data_ptr() if nested else None,
                      out.data_ptr(), bias.data_ptr() if bias is not None else None,
                      a.numel() // k, n, k, qs.blocksize, 1 if qs.quant_type == "fp4" else 2,
                      torch._C._cuda_getCurrentRawStream(self.index))
        return out

    def merged(self, width: int, down: torch.Tensor, up: torch.Tensor, scale) -> torch.Tensor:
        with self._device():
            return self.fused.dequantize(width, down, up, scale)


def dequantize_4bit_unchecked(packed: torch.Tensor, qs) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit(packed, qs)``: the same kernels in the same order (so the
    same bits), without its per-call argument checks (``qs`` was checked when the layer was made)."""
    absmax = qs.absmax
    if qs.nested:
        s2 = qs.state2
        absmax = _bnb_ops.dequantize_blockwise.default(absmax, s2.absmax, s2.code, s2.blocksize, s2.dtype)
        absmax += qs.offset
        if absmax.dtype != torch.float32:
            absmax = absmax.float()
    return _bnb_ops.dequantize_4bit.default(packed, absmax, qs.blocksize, qs.quant_type, qs.shape, qs.dtype)
