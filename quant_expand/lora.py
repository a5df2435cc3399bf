"""Lazy LoRA deltas: what a quantized layer adds at run time, never merged into its stored bytes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch


@dataclass
class LoraTerm:
    """One low-rank update ``scale * up @ down`` on rows ``[row_offset, row_offset + up.shape[0])``.

    ``down`` may be narrower than the layer's logical width (a LoRA made before a Control LoRA widened
    the layer): it is zero-padded on the right, which is exact.
    """

    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [rows, rank]
    scale: float
    row_offset: int = 0

    @property
    def rank(self) -> int:
        return self.down.shape[0]


class LazyLoraDelta:
    """The LoRA state one quantized layer applies at every forward.

    Low-rank terms are stacked into a single ``down`` ``[R, in]`` / ``up`` ``[out, R]`` pair with the
    strengths folded into ``up``, once per device and dtype. ``weight_fn`` covers every other adapter
    (LoHa, LoKr, OFT, full diffs, ...): it maps the dequantized full-precision weight to the patched one.
    ``bias`` is an additive bias delta already scaled by its strength.
    """

    def __init__(self, out_features: int, in_features: int, terms: Sequence[LoraTerm] = (),
                 weight_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 bias: Optional[torch.Tensor] = None):
        self.out_features = out_features
        self.in_features = in_features
        self.terms = list(terms)
        self.weight_fn = weight_fn
        self.bias = bias
        for t in self.terms:
            if t.down.shape[1] > in_features or t.row_offset + t.up.shape[0] > out_features:
                raise ValueError(f"LoRA term {tuple(t.up.shape)}x{tuple(t.down.shape)} at row {t.row_offset} "
                                 f"does not fit a [{out_features}, {in_features}] layer")
        self._cache: dict = {}

    @property
    def has_low_rank(self) -> bool:
        return bool(self.terms)

    @property
    def rank(self) -> int:
        return sum(t.rank for t in self.terms)

    def stacked(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (torch.device(device), dtype)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._stack(*key)
            self._cache = {key: hit}  # one compute device at a time
        return hit

    def _stack(self, device, dtype):
        rank = self.rank
        down = torch.zeros(rank, self.in_features, device=device, dtype=torch.float32)
        up = torch.zeros(self.out_features, rank, device=device, dtype=torch.float32)
        r = 0
        for t in self.terms:
            d = t.down.to(device=device, dtype=torch.float32)
            down[r:r + t.rank, : d.shape[1]] = d
            up[t.row_offset:t.row_offset + t.up.shape[0], r:r + t.rank] = t.up.to(device=device, dtype=torch.float32) * t.scale
            r += t.rank
        return down.to(dtype), up.to(dtype)

    def bias_on(self, device, dtype):
        if self.bias is None:
            return None
        return self.bias.to(device=device, dtype=dtype)

    def prepare(self, device, dtype):
        """Move and stack now (at model load), so the first sampling step pays nothing."""
        if self.terms:
            self.stacked(device, dtype)
        if self.bias is not None:
            self.bias = self.bias.to(device=device)

    def prefer_merged(self, tokens: int) -> bool:
        """Merged (``W + up @ down`` into the transient dequantized buffer) costs ``out*in*R``
        multiply-adds per forward; unmerged (``up(down(x))``) costs ``tokens*R*(in+out)``.
        Both are exact; pick the cheaper for this layer and token count."""
        return self.out_features * self.in_features < tokens * (self.in_features + self.out_features)

    def nbytes(self) -> int:
        return sum(t.down.nbytes + t.up.nbytes for t in self.terms)
