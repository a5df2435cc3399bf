"""Fusing diffusers' separate q/k/v (and other split) layers into FLUX's fused rows, quantized bytes included."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch
from bitsandbytes.functional import QuantState

from ..errors import BnbFluxError
from ..spec import QuantSpec
from .stored import StoredKind, StoredLinear, denested_absmax, quantize_weight


@dataclass
class PieceInfo:
    """What one stored Linear of the file is, read from headers and the small quant-state tensors only."""

    module: str                   # file module key (prefix included)
    kind: StoredKind
    shape: tuple[int, int]        # logical [out, in]
    dtype: torch.dtype            # float weight dtype; 4-bit: the recorded dequantize dtype
    quant_type: Optional[str] = None
    blocksize: Optional[int] = None
    nested: bool = False
    nested_blocksize: Optional[int] = None
    offset: Optional[float] = None
    absmax_count: int = 0
    code: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    stored_bytes: int = 0

    def __post_init__(self):
        self.kind = StoredKind(self.kind)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @classmethod
    def of(cls, module: str, stored: StoredLinear) -> "PieceInfo":
        """The info of a Linear already in memory (for planning row assembly of tensors not read from a file)."""
        if stored.kind is not StoredKind.FOUR_BIT:
            dtype = stored.weight.dtype if stored.kind is StoredKind.FLOAT else torch.float16
            return cls(module, stored.kind, stored.shape, dtype)
        qs = stored.quant_state
        return cls(module, StoredKind.FOUR_BIT, tuple(qs.shape), qs.dtype, quant_type=qs.quant_type,
                   blocksize=qs.blocksize,
                   nested=qs.nested, nested_blocksize=qs.state2.blocksize if qs.nested else None,
                   offset=float(qs.offset) if qs.nested else None, absmax_count=qs.absmax.numel(), code=qs.code,
                   nested_code=qs.state2.code if qs.nested else None)

    def scheme(self) -> str:
        if self.kind is StoredKind.FOUR_BIT:
            return f"{self.quant_type} (blocksize {self.blocksize}, {'double quant' if self.nested else 'no double quant'})"
        return "int8 (LLM.int8 rows + SCB)" if self.kind is StoredKind.INT8 else "float"


class RowMethod(str, enum.Enum):
    """How :func:`assemble_rows` builds a Linear from its pieces (see :func:`plan_rows`)."""

    READ = "read"                    # one whole piece, as stored
    FLOAT = "float"                  # float pieces concatenated
    CONCAT = "concat"                # quantized bytes and statistics concatenated as they are
    CONCAT_DENEST = "concat-denest"  # 4-bit bytes concatenated, double-quantized absmax de-nested
    REQUANTIZE = "requantize"        # dequantized, concatenated, quantized again: not exact


@dataclass
class RowPlan:
    """How a BFL Linear is assembled from row slices of stored Linears (``parts``: piece, first row, rows)."""

    parts: list
    method: RowMethod
    kind: StoredKind              # kind of the result
    exact: bool
    reason: str = ""


def plan_rows(parts: list[tuple[PieceInfo, int, int]]) -> RowPlan:
    """The fusion rule for q/k/v (+ proj_mlp) and for swapping norm_out's halves.

    * one whole piece: read as is.
    * all float: concatenate. All int8: concatenate rows and SCB (per-row scales: always exact).
    * all 4-bit with the same quant type, blocksize, code book and input width, each slice starting on a
      block boundary and spanning whole blocks (or ending where its tensor ends, as the last part):
      the packed bytes and the absmax concatenate exactly. Double-quantized absmax is quantized again per
      256 absmax values *after subtracting the tensor's mean* (``offset``): the nested codes concatenate
      exactly only if every part has the same offset and its absmax slice covers whole nested blocks
      (true for halves of one tensor; practically never for separately quantized q/k/v). Otherwise the
      absmax is de-nested: bnb's own float32 absmax of each part, concatenated. The dequantized weights
      are bit-identical; the layer keeps 4 bytes instead of 1 per block of absmax (+0.375 bits/weight).
    * anything else (misaligned blocks, different settings, mixed kinds): dequantize, concatenate and
      quantize again with the first quantized part's scheme. Not exact: reported as such.
    """
    first = parts[0][0]
    if len(parts) == 1 and parts[0][1] == 0 and parts[0][2] == first.shape[0]:
        return RowPlan(parts, RowMethod.READ, first.kind, True)
    kinds = {p.kind for p, _, _ in parts}
    widths = {p.shape[1] for p, _, _ in parts}
    if len(widths) != 1:
        raise BnbFluxError(f"{', '.join(p.module for p, _, _ in parts)}: input widths {sorted(widths)} differ; "
                           f"these tensors cannot form one FLUX Linear")
    if kinds == {StoredKind.FLOAT}:
        return RowPlan(parts, RowMethod.FLOAT, StoredKind.FLOAT, True)
    if kinds == {StoredKind.INT8}:
        return RowPlan(parts, RowMethod.CONCAT, StoredKind.INT8, True, "int8 rows and per-row scales concatenated")
    quantized = [p for p, _, _ in parts if p.kind is not StoredKind.FLOAT]
    target = quantized[0]
    if kinds == {StoredKind.FOUR_BIT}:
        same = all(p.quant_type == first.quant_type and p.blocksize == first.blocksize
                   and torch.equal(p.code, first.code) for p, _, _ in parts)
        why = _alignment_problem(parts) if same else "parts quantized with different settings"
        if why is None:
            if _nested_concat_exact(parts):
                return RowPlan(parts, RowMethod.CONCAT, StoredKind.FOUR_BIT, True,
                               "packed bytes, absmax and nested absmax concatenated")
            if not any(p.nested for p, _, _ in parts):
                return RowPlan(parts, RowMethod.CONCAT, StoredKind.FOUR_BIT, True,
                               "packed bytes and absmax concatenated")
            return RowPlan(parts, RowMethod.CONCAT_DENEST, StoredKind.FOUR_BIT, True,
                           "packed bytes concatenated; double-quantized absmax de-nested to float32 (each part has "
                           "its own offset), dequantized values identical")
        return RowPlan(parts, RowMethod.REQUANTIZE, StoredKind.FOUR_BIT, False,
                       f"{why}: dequantized and quantized again as {target.scheme()}")
    return RowPlan(parts, RowMethod.REQUANTIZE, target.kind, False,
                   f"parts stored as {', '.join(sorted(kinds))}: dequantized and quantized again as {target.scheme()}")


def _alignment_problem(parts) -> Optional[str]:
    for i, (p, start, rows) in enumerate(parts):
        bs = p.blocksize
        e0, e1 = start * p.shape[1], (start + rows) * p.shape[1]
        ends_tensor = e1 == p.numel and i == len(parts) - 1
        if e0 % bs or ((e1 - e0) % bs and not ends_tensor):
            return f"{p.module}: rows {start}..{start + rows} do not fall on {bs}-element block boundaries"
    return None


def _nested_concat_exact(parts) -> bool:
    first = parts[0][0]
    if not all(p.nested for p, _, _ in parts):
        return False
    offset = torch.tensor(first.offset, dtype=torch.float32)
    for i, (p, start, rows) in enumerate(parts):
        if (p.nested_blocksize != first.nested_blocksize or not torch.equal(p.nested_code, first.nested_code)
                or not torch.equal(torch.tensor(p.offset, dtype=torch.float32), offset)):
            return False
        a0 = start * p.shape[1] // p.blocksize
        a1 = -(-(start + rows) * p.shape[1] // p.blocksize)
        nbs = p.nested_blocksize
        if a0 % nbs or ((a1 - a0) % nbs and not (a1 == p.absmax_count and i == len(parts) - 1)):
            return False
    return True


def assemble_rows(plan: RowPlan, stored: dict[str, StoredLinear]) -> StoredLinear:
    """Carry out :func:`plan_rows` on the stored tensors (``stored``: piece module -> StoredLinear)."""
    parts = [(stored[p.module], p, start, rows) for p, start, rows in plan.parts]
    bias = _concat_bias(parts)
    if plan.method is RowMethod.READ:
        s = parts[0][0]
        return StoredLinear(s.kind, s.weight, s.packed, s.quant_state, s.cb, s.scb, bias)
    if plan.method is RowMethod.FLOAT:
        dtype = parts[0][0].weight.dtype
        if any(s.weight.dtype != dtype for s, _, _, _ in parts):
            dtype = torch.float32
        w = torch.cat([s.weight[start:start + rows].to(dtype) for s, _, start, rows in parts])
        return StoredLinear(StoredKind.FLOAT, weight=w, bias=bias)
    if plan.kind is StoredKind.INT8 and plan.method is RowMethod.CONCAT:
        cb = torch.cat([s.cb[start:start + rows] for s, _, start, rows in parts])
        scb = torch.cat([s.scb[start:start + rows].to(torch.float32) for s, _, start, rows in parts])
        return StoredLinear(StoredKind.INT8, cb=cb, scb=scb, bias=bias, note=plan.reason)
    if plan.method in (RowMethod.CONCAT, RowMethod.CONCAT_DENEST):
        return _concat_4bit(parts, plan, bias)
    # requantize: not exact, said so in plan.reason
    w = torch.cat([s.dequantize(torch.float32)[start:start + rows] for s, _, start, rows in parts])
    target = next(p for p, _, _ in plan.parts if p.kind is not StoredKind.FLOAT)
    spec = (QuantSpec(target.quant_type, target.nested, target.blocksize) if target.kind is StoredKind.FOUR_BIT
            else QuantSpec("int8"))
    out = quantize_weight(w, spec, bias)
    if out.kind is StoredKind.FOUR_BIT:
        out.quant_state.dtype = target.dtype
    out.note = plan.reason
    return out


def _concat_bias(parts) -> Optional[torch.Tensor]:
    if all(s.bias is None for s, _, _, _ in parts):
        return None
    pieces = []
    for s, _, start, rows in parts:
        pieces.append(s.bias[start:start + rows].to(torch.float32) if s.bias is not None else torch.zeros(rows))
    dtype = parts[0][0].bias.dtype if parts[0][0].bias is not None else torch.float32
    return torch.cat(pieces).to(dtype)


def _concat_4bit(parts, plan: RowPlan, bias) -> StoredLinear:
    first = parts[0][0].quant_state
    width = parts[0][1].shape[1]
    packed, absmax, nested_absmax, rows_total = [], [], [], 0
    keep_nested = plan.method is RowMethod.CONCAT
    for s, info, start, rows in parts:
        qs = s.quant_state
        bs = qs.blocksize
        e0, e1 = start * width, (start + rows) * width
        flat = s.packed.reshape(-1)
        packed.append(flat[e0 // 2: -(-e1 // 2)])
        a0, a1 = e0 // bs, -(-e1 // bs)
        if keep_nested and qs.nested:
            nbs = qs.state2.blocksize
            absmax.append(qs.absmax[a0:a1])
            nested_absmax.append(qs.state2.absmax[a0 // nbs: -(-a1 // nbs)])
        else:
            absmax.append(denested_absmax(qs)[a0:a1])
        rows_total += rows
    state2, offset = None, None
    if keep_nested and first.nested:
        state2 = QuantState(absmax=torch.cat(nested_absmax), code=first.state2.code, blocksize=first.state2.blocksize,
                            dtype=first.state2.dtype)
        offset = first.offset
    qs = QuantState(absmax=torch.cat(absmax), shape=torch.Size([rows_total, width]), code=first.code,
                    blocksize=first.blocksize, quant_type=first.quant_type, dtype=first.dtype, offset=offset,
                    state2=state2)
    return StoredLinear(StoredKind.FOUR_BIT, packed=torch.cat(packed).reshape(-1, 1), quant_state=qs, bias=bias,
                        note=plan.reason)
