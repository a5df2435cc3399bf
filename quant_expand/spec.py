"""What a quantization is: nf4 | fp4 (blocksize, double quant, compute dtype) | int8."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from .errors import BnbFluxError

QUANT_TYPES = ("nf4", "fp4", "int8")
COMPUTE_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


class QuantSpecError(BnbFluxError):
    """A quantization setting that cannot work (unknown type, bad blocksize, ...)."""


@dataclass(frozen=True)
class QuantSpec:
    """A bitsandbytes storage scheme for Linear weights.

    ``int8`` is LLM.int8 storage (``Int8Params``: int8 rows + per-row absmax ``SCB``) run as
    weight-only dequantize + matmul in the compute dtype: activations are never quantized, so it is
    as accurate as the stored weights allow (bnb's int8 matmul with threshold 0 also quantizes the
    activations, and is slower on the GPU).
    ``compute_dtype`` None means "decided by the host when loading" (ComfyUI's choice for the device).
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: Optional[torch.dtype] = None

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise QuantSpecError(f"unknown quant_type {self.quant_type!r}: use one of {', '.join(QUANT_TYPES)}")
        if self.is_4bit and self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise QuantSpecError(f"blocksize {self.blocksize} is not one bitsandbytes supports (64 is the default)")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES.values():
            raise QuantSpecError(f"compute dtype {self.compute_dtype} is not bfloat16, float16 or float32")
        if not self.is_4bit and self.double_quant:
            object.__setattr__(self, "double_quant", False)  # int8 has one per-row scale: nothing to nest

    @property
    def is_4bit(self) -> bool:
        return self.quant_type in ("nf4", "fp4")

    def with_compute_dtype(self, dtype: torch.dtype) -> "QuantSpec":
        return replace(self, compute_dtype=dtype)

    def __str__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        if self.is_4bit:
            dq = "double quant" if self.double_quant else "no double quant"
            return f"{self.quant_type} (blocksize {self.blocksize}, {dq})"
        return "int8 (LLM.int8 storage, weight-only dequantize)"

    def can_quantize(self, in_features: int) -> bool:
        """bnb 4-bit packs rows of blocks; a weight whose input width is no multiple of the block
        would straddle rows, which our exact zero-padding of inputs relies on not happening."""
        return in_features % self.blocksize == 0 if self.is_4bit else True


FLOAT16_MAX = float(torch.finfo(torch.float16).max)  # a scale or update past it: no 16-bit compute dtype holds it
