"""Lazy LoRA deltas: what a quantized layer adds at run time, never merged into its stored bytes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..tuning import TUNING


def indexed_device(device) -> torch.device:
    """``device`` as the forward sees it in ``x.device`` (a CUDA device always has an index): what the
    caches here and the layers' run state are keyed by."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


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

    Low-rank terms are stacked once per device and dtype into one ``down`` ``[R, in]`` / ``up``
    ``[out, R]`` pair (unscaled), plus a scale vector ``[R]`` holding each term's strength·alpha/rank.
    Keeping the scales apart lets a new strength reuse the stacked tensors already on the device
    (:meth:`adopt_stack`): Set LoRA Scale re-uploads nothing. ``weight_fn`` covers every other adapter
    (LoHa, LoKr, OFT, full diffs, ...): it maps the dequantized full-precision weight to the patched one.
    ``bias_terms`` are additive bias deltas ``(tensor [out], scale)``.
    """

    # "auto" (cost model), "merged" or "unmerged": a switch for benchmarks, never needed for results

    def __init__(self, out_features: int, in_features: int, terms: Sequence[LoraTerm] = (),
                 weight_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 bias: Optional[torch.Tensor] = None, bias_terms: Sequence[tuple] = ()):
        self.out_features = out_features
        self.in_features = in_features
        self.terms = list(terms)
        self.weight_fn = weight_fn
        self.bias_terms = list(bias_terms) + ([(bias, 1.0)] if bias is not None else [])
        for t in self.terms:
            if t.down.shape[1] > in_features or t.row_offset + t.up.shape[0] > out_features:
                raise ValueError(f"LoRA term {tuple(t.up.shape)}x{tuple(t.down.shape)} at row {t.row_offset} "
                                 f"does not fit a [{out_features}, {in_features}] layer")
        self._stack_cache: dict = {}  # (device, dtype) -> (down, up) unscaled
        self._scale_cache: dict = {}
        self._bias_cache: dict = {}
        self._bias_raw: dict = {}  # device -> the unscaled bias terms there
        self._bias_sum = None  # (base bias, device, dtype, base + delta)

    @property
    def rank(self) -> int:
        return sum(t.rank for t in self.terms)

    def layout(self):
        """What the stacked tensors depend on: the term tensors (by identity) and where they go."""
        return tuple((id(t.down), id(t.up), t.row_offset) for t in self.terms)

    def device_tensors(self) -> list[torch.Tensor]:
        """Every tensor this delta holds for the forward (stacked factors, scales, bias terms and sums),
        for memory accounting: what a loaded model owns besides its state dict."""
        out = [t for pair in self._stack_cache.values() for t in pair]
        out += list(self._scale_cache.values()) + list(self._bias_cache.values())
        out += [t for raw in self._bias_raw.values() for t in raw]
        if self._bias_sum is not None:
            out.append(self._bias_sum[3])
        return [t for t in out if isinstance(t, torch.Tensor)]  # a uniform scale is a plain float

    def adopt_stack(self, previous: Optional["LazyLoraDelta"]):
        """Reuse ``previous``'s device tensors (stacked low-rank terms, bias terms) where it holds the very
        same LoRA tensors: a strength change re-uploads nothing."""
        if previous is None or previous is self:
            return
        if previous.terms and previous.layout() == self.layout() and previous.in_features == self.in_features:
            self._stack_cache = dict(previous._stack_cache)
        if self.bias_terms and [id(b) for b, _ in previous.bias_terms] == [id(b) for b, _ in self.bias_terms]:
            self._bias_raw = dict(previous._bias_raw)

    def stacked(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor, object]:
        """``down`` [R, in], ``up`` [out, R] (unscaled) on ``device`` in ``dtype``, and the scale: a float
        when every term has the same one (folded into the GEMM's alpha), else a vector [R] on ``device``."""
        key = (device, dtype)
        hit = self._stack_cache.get(key)
        if hit is None:
            hit = self._stack(device, dtype)
            self._stack_cache = {key: hit}  # one compute device at a time
        scale = self._scale_cache.get(key)
        if scale is None:
            scales = {float(t.scale) for t in self.terms}
            if len(scales) == 1:
                scale = scales.pop()
            else:  # filled on the device: no host-to-device copy per strength change
                scale = torch.cat([torch.full((t.rank,), float(t.scale), device=device, dtype=dtype)
                                   for t in self.terms])
            self._scale_cache = {key: scale}
        return hit[0], hit[1], scale

    def _stack(self, device, dtype):
        down = torch.zeros(self.rank, self.in_features, device=device, dtype=dtype)
        up = torch.zeros(self.out_features, self.rank, device=device, dtype=dtype)
        r = 0
        for t in self.terms:
            down[r:r + t.rank, : t.down.shape[1]] = t.down.to(device=device, dtype=dtype)
            up[t.row_offset:t.row_offset + t.up.shape[0], r:r + t.rank] = t.up.to(device=device, dtype=dtype)
            r += t.rank
        return down, up

    def host_stack(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``down``/``up`` on the CPU in ``dtype``, as :meth:`stacked` lays them out: the source a streamed
        layer copies to the GPU. One term that already is the whole stack is returned as it is (no second
        host copy of the LoRA)."""
        if len(self.terms) == 1:
            t = self.terms[0]
            if (t.row_offset == 0 and t.up.shape[0] == self.out_features and t.down.shape[1] == self.in_features
                    and t.down.dtype == dtype and t.up.dtype == dtype and t.down.device.type == "cpu"
                    and t.up.device.type == "cpu" and t.down.is_contiguous() and t.up.is_contiguous()):
                return t.down, t.up
        return self._stack(torch.device("cpu"), dtype)

    def use_stack(self, device, dtype, down: torch.Tensor, up: torch.Tensor):
        """Take ``down``/``up`` (device views a streamer refills before each use) as the stacked terms."""
        self._stack_cache = {(indexed_device(device), dtype): (down, up)}

    def drop_stack(self):
        """Forget the stacked terms (a streamer's views, refilled with other layers' bytes once it stops)."""
        self._stack_cache = {}

    def stack_bytes(self, dtype) -> int:
        """Bytes of the stacked terms in ``dtype`` (what :meth:`stacked` puts on the compute device)."""
        return self.rank * (self.in_features + self.out_features) * dtype.itemsize

    def bias_on(self, device, dtype):
        """The summed bias delta on ``device`` in ``dtype`` (None without bias terms). The unscaled terms
        are uploaded once (and kept across strength changes, see :meth:`adopt_stack`); the sum is formed on
        the device, in float32 as before."""
        if not self.bias_terms:
            return None
        key = (device, dtype)
        hit = self._bias_cache.get(key)
        if hit is None:
            raw = self._bias_raw.get(device)
            if raw is None:
                raw = [b.to(device=device) for b, _ in self.bias_terms]
                self._bias_raw = {device: raw}
            if len(raw) == 1 and raw[0].dtype == dtype:
                # one kernel: torch forms the product in float32 and rounds it once, the same bits as the
                # general path below (three more kernels per layer on every strength change)
                hit = raw[0] * float(self.bias_terms[0][1])
            else:
                hit = sum(b.to(torch.float32) * float(s) for b, (_, s) in zip(raw, self.bias_terms)).to(dtype)
            self._bias_cache = {key: hit}
        return hit

    def bias_with(self, base: Optional[torch.Tensor], device, dtype, cache: bool = True):
        """``base + bias delta`` (``base`` may be None), kept while ``base`` is the same tensor."""
        hit = self._bias_sum
        if hit is not None and hit[0] is base and hit[1] == device and hit[2] == dtype:
            return hit[3]
        delta = self.bias_on(device, dtype)
        out = delta if base is None else (base if delta is None else base + delta)
        if cache:
            self._bias_sum = (base, device, dtype, out)
        return out

    def prepare(self, device, dtype):
        """Move and stack now (at model load), so the first sampling step pays nothing."""
        device = indexed_device(device)
        if self.terms:
            self.stacked(device, dtype)
        self.bias_on(device, dtype)

    def prefer_merged(self, tokens: int) -> bool:
        """Merged (``W += s * up @ down`` into the transient dequantized buffer) costs ``out*in*R``
        multiply-adds and a pass over W per forward; unmerged (``y += s * (x @ down^T) @ up^T``, the
        second GEMM accumulating into y) costs ``tokens*R*(in+out)`` and a pass over y. Both are exact;
        the FLOP count picks. For FLUX at 1024x1024 that merges the image-stream and single-block layers
        (4096-4608 tokens) and keeps the text stream (512 tokens) and the one-token modulation layers
        unmerged. On CUDA the merged product is the dequantize kernel's epilogue (no pass over W of its
        own; backends/triton_dequant.py): a slower GEMM than cuBLAS' but fewer FLOPs at these sizes, and
        the unmerged path reads and writes the output once more; bench/README.md has the measured mix."""
        if TUNING.lora_strategy != "auto":
            return TUNING.lora_strategy == "merged"
        return self.out_features * self.in_features < tokens * (self.in_features + self.out_features)

    def nbytes(self) -> int:
        return sum(t.down.nbytes + t.up.nbytes for t in self.terms)
