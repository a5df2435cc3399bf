"""Benchmark-only switches, in one object: the alternatives bench/ measures side by side (kernel paths,
Triton tile shapes, where a LoRA is merged). The nodes never change them: every default is what users
run, and every alternative computes the same bits."""
from __future__ import annotations

import contextlib
import dataclasses


@dataclasses.dataclass
class Tuning:
    # 4-bit dequantize on CUDA: "triton" (the pack's kernel where it is verified, else bnb's), "bnb"
    # (bnb's CUDA kernels through its ctypes entry points), "torch" (bnb's torch ops)
    four_bit_path: str = "triton"
    # int8 dequantize on CUDA: "triton" (one pass), "promote" (torch.mul(int8, scale)), "cast" (cast, then scale)
    int8_dequant: str = "triton"
    # where a LoRA meets the weight: "auto" (the FLOP count picks per layer), "merged", "unmerged"
    lora_strategy: str = "auto"
    # Triton tiles (rows, quantization blocks per row, LoRA rank chunk, warps, pipeline stages)
    plain_tile: tuple = (2, 16, 0, 4, 1)
    lora_tile: tuple = (64, 1, 64, 4, 2)


TUNING = Tuning()


@contextlib.contextmanager
def tuned(**changes):
    """``TUNING`` with ``changes`` inside the block, restored after it. Layers look their kernels up when
    placed: unload a model before sampling it under other switches."""
    unknown = [k for k in changes if not hasattr(TUNING, k)]
    if unknown:
        raise AttributeError(f"no tuning switch {unknown[0]!r}")
    before = {k: getattr(TUNING, k) for k in changes}
    for k, v in changes.items():
        setattr(TUNING, k, v)
    try:
        yield TUNING
    finally:
        for k, v in before.items():
            setattr(TUNING, k, v)
