"""Reading a FLUX checkpoint (BFL or diffusers names, float, pre-quantized or scaled) with its damage checks.

Longer than the other modules on purpose: it is one class, ``FluxCheckpoint``, whose checks all read the
layout it parsed once from the header (fusion, stored layers and tensor files live apart already).
"""
from __future__ import annotations

import json
import math
import re
from typing import Optional

import torch
from bitsandbytes.functional import QuantState

from ..errors import BnbFluxError, shown_name
from ..families import FLUX1, Family, family_of
from ..flux import FLUX_BFL_MARKERS, FLUX_DIFFUSERS_MARKER
from ..spec import FLOAT16_MAX
from . import scaled_formats
from .fusion import PieceInfo, RowMethod, RowPlan, assemble_rows, plan_rows
from .stored import (
    FORMAT_NAME,
    QS_DTYPES,
    QS_JSON_FIELDS,
    QS_JSON_MAX_BYTES,
    QS_KEY,
    QS_NESTED_FIELDS,
    QS_TENSORS,
    StoredKind,
    StoredLinear,
    quant_state_value_ok,
)
from .tensor_files import FLOAT_DTYPES, TensorSet, open_tensor_set

_LAYOUT_NAMES = {"bfl": "BFL names", "diffusers": "diffusers names"}


class FluxCheckpoint:
    """A FLUX diffusion model file (of a family in ``families.py``) seen in BFL names with logical shapes,
    whatever its layout; ``family`` says which.

    ``linear_names()`` / ``read_linear(name)`` give every Linear as a :class:`StoredLinear`;
    ``other_keys()`` / ``read(key)`` the rest (norm scales, biases of nothing else); ``meta_state_dict()``
    the logical shapes for model detection (a packed 4-bit weight shows as ``[out, in]``).
    A file with no FLUX marker is kept as is (``layout`` None) so the host can say what it is instead.
    """

    def __init__(self, tensors: TensorSet):
        self.tensors = tensors
        self.name = tensors.name
        self.metadata = tensors.metadata
        self.notes: list[str] = []
        keys = tensors.keys()
        self.layout, self.prefix = _find_layout(keys)
        self.family: Family = FLUX1
        under = [k for k in keys if k.startswith(self.prefix)] if self.layout else keys
        self.skipped = [k for k in keys if not k.startswith(self.prefix)] if self.layout else []
        self._pieces: dict[str, PieceInfo] = {}
        self._linears: dict[str, list[tuple[str, int, Optional[int]]]] = {}
        self._others: dict[str, str] = {}
        self.scaled: dict[str, scaled_formats.ScaledLayer] = {}
        if self.layout is None:  # not FLUX: keep every key so the host can tell what the file is
            self._others = {k: k for k in keys}
            self._plans = {}
            return
        self.family = family_of((k[len(self.prefix):] for k in under), diffusers_names=self.layout == "diffusers")
        # another tool's quantization (ComfyUI scaled fp8, comfy_quant): read as float32, quantized like bf16
        self.scaled = scaled_formats.scaled_layers(tensors, under, self.prefix, self.name)
        if self.scaled:
            self.notes.append(f"{len(self.scaled)} Linear layers stored by ComfyUI as "
                              f"{scaled_formats.describe_formats(self.scaled)}: read as their stored values times "
                              f"their scales, then quantized with the node's quant_type")
        modules = _stored_modules(under)
        modules.update({m: StoredKind.FLOAT for m in self.scaled})
        for k in under:  # float Linears: the remaining 2-D float weights (no FLUX family has other 2-D weights)
            if k.endswith(".weight") and k[: -len(".weight")] not in modules and len(tensors.shape(k)) == 2 \
                    and tensors.dtype(k) in FLOAT_DTYPES:
                modules[k[: -len(".weight")]] = StoredKind.FLOAT
        for m, kind in modules.items():
            self._pieces[m] = self._piece_info(m, kind)
        consumed = scaled_formats.consumed_keys(under, self.scaled, self.prefix)
        for m, kind in modules.items():
            consumed.update(_module_keys(m, kind, tensors))
        if self.layout == "diffusers":
            self._map_diffusers(under, modules, consumed)
        else:
            p = len(self.prefix)
            for m in modules:
                self._linears[m[p:]] = [(m, 0, None)]
            for k in under:
                if k not in consumed:
                    self._others[k[p:]] = k
        self._plans: dict[str, RowPlan] = {}

    # -- layout --------------------------------------------------------------------------------
    def _map_diffusers(self, under, modules, consumed):
        p = len(self.prefix)
        names = self.family.diffusers
        linears, others = names.layout(k[p:] for k in under)
        used = set()
        for bfl, ds in linears.items():
            files = [self.prefix + d for d in ds]
            present = [f in modules for f in files]
            if not any(present):
                continue
            if not all(present):
                missing = [d for d, ok in zip(ds, present) if not ok]
                raise BnbFluxError(f"{self.name}: {bfl} needs {', '.join(ds)}; {', '.join(missing)} "
                                   f"missing; the file is incomplete (a shard missing?)")
            if bfl in names.swapped:
                rows = self._pieces[files[0]].shape[0] // 2
                self._linears[bfl] = [(files[0], rows, rows), (files[0], 0, rows)]
            else:
                self._linears[bfl] = [(f, 0, None) for f in files]
            used.update(files)
        for bfl, d in others.items():
            if self.prefix + d in self.tensors:
                self._others[bfl] = self.prefix + d
                used.add(self.prefix + d)
        unknown = [m for m in modules if m not in used]
        unknown += [k for k in under if k not in consumed and k not in used and k not in self._others.values()]
        if unknown:
            self.notes.append(f"{len(unknown)} tensor(s) with no {self.family.title} counterpart ignored, e.g. "
                              f"{unknown[0]}")

    def _piece_info(self, module: str, kind: StoredKind) -> PieceInfo:
        t = self.tensors
        wkey = f"{module}.weight"
        scaled = self.scaled.get(module)
        if scaled is not None:
            return PieceInfo(module, StoredKind.FLOAT, scaled.logical_shape(t.shape(wkey)), torch.float32,
                             stored_bytes=scaled_formats.stored_bytes(t, scaled))
        if kind is StoredKind.FLOAT:
            shape = t.shape(wkey)
            return PieceInfo(module, StoredKind.FLOAT, tuple(shape), t.dtype(wkey), stored_bytes=_nbytes(t, wkey))
        if kind is StoredKind.INT8:
            shape = t.shape(wkey)
            if t.dtype(wkey) != torch.int8 or len(shape) != 2:
                raise BnbFluxError(f"{self.name}: {wkey} has {t.dtype(wkey)} {list(shape)} beside {module}.SCB; "
                                   f"an LLM.int8 weight is int8 [out, in]: the file is damaged")
            fmt = f"{module}.weight_format"
            if fmt in t:
                value = t.get(fmt)
                if value.numel() != 1 or value.is_floating_point() or value.is_complex():
                    raise BnbFluxError(f"{self.name}: {fmt} holds {value.numel()} values of {value.dtype}; "
                                       f"bitsandbytes writes one integer (0: row-major): the file is damaged, "
                                       f"download it again")
                if int(value.reshape(-1)[0]) != 0:
                    raise BnbFluxError(f"{self.name}: {wkey} is stored in a GPU tile layout (weight_format "
                                       f"{value.reshape(-1).tolist()}) from an old bitsandbytes; load and save it "
                                       f"again with bitsandbytes >= 0.45, which writes the row-major layout")
            scb = f"{module}.SCB"
            if not t.dtype(scb).is_floating_point:
                raise BnbFluxError(f"{self.name}: {scb} is {t.dtype(scb)}; per-row scales are float32: the file is "
                                   f"damaged: download it again")
            if math.prod(t.shape(scb)) != shape[0]:
                raise BnbFluxError(f"{self.name}: {scb} has {math.prod(t.shape(scb))} values for the {shape[0]} rows "
                                   f"of {wkey}; the file is damaged: download it again")
            return PieceInfo(module, StoredKind.INT8, tuple(shape), torch.float16,
                             stored_bytes=_nbytes(t, wkey) + _nbytes(t, f"{module}.SCB"))
        qs_keys = [k for k in (f"{wkey}.{QS_KEY}nf4", f"{wkey}.{QS_KEY}fp4") if k in t]
        if not qs_keys:
            raise BnbFluxError(f"{self.name}: tensor {wkey} has no weight.{QS_KEY}nf4 (or fp4) beside its "
                               f"weight.absmax; the file is incomplete (an interrupted download or a missing "
                               f"shard): download it again")
        state = self._quant_state_fields(qs_keys[0])
        shape = tuple(state["shape"])
        info = PieceInfo(module, StoredKind.FOUR_BIT, shape, QS_DTYPES[state["dtype"]], quant_type=state["quant_type"],
                         blocksize=state["blocksize"])
        if f"{wkey}.absmax" not in t:
            raise BnbFluxError(f"{self.name}: tensor {wkey} has no weight.absmax beside its quant state; the file "
                               f"is incomplete (an interrupted download or a missing shard): download it again")
        info.absmax_count = math.prod(t.shape(f"{wkey}.absmax"))
        info.code = t.get(f"{wkey}.quant_map") if f"{wkey}.quant_map" in t else None
        if info.code is None:
            raise BnbFluxError(f"{self.name}: tensor {wkey} has no weight.quant_map; the file is incomplete: "
                               f"download it again")
        info.nested = f"{wkey}.nested_absmax" in t
        if not info.nested and ("nested_offset" in state or f"{wkey}.nested_quant_map" in t):
            # without this the uint8 nested codes of the absmax would be read as float absmax: weights off
            # by up to 255x with no error
            raise BnbFluxError(f"{self.name}: tensor {wkey} is double-quantized (its quant state has "
                               f"nested_offset) but weight.nested_absmax is missing; the file is incomplete "
                               f"(an interrupted download or a missing shard): download it again")
        if info.nested:
            if f"{wkey}.nested_quant_map" not in t or "nested_offset" not in state:
                raise BnbFluxError(f"{self.name}: tensor {wkey} has weight.nested_absmax but no "
                                   f"weight.nested_quant_map or nested_offset; the file is incomplete")
            info.nested_blocksize = state["nested_blocksize"]
            info.offset = float(state["nested_offset"])
            info.nested_code = t.get(f"{wkey}.nested_quant_map")
        self._check_quant_state_tensors(wkey, info)
        n = info.numel
        packed_bytes = _nbytes(t, wkey)
        if packed_bytes != -(-n // 2) or info.absmax_count != -(-n // info.blocksize):
            raise BnbFluxError(f"{self.name}: {wkey} holds {packed_bytes} bytes and {info.absmax_count} absmax "
                               f"values; a 4-bit {list(shape)} weight with blocksize {info.blocksize} needs "
                               f"{-(-n // 2)} and {-(-n // info.blocksize)}: the file is damaged")
        info.stored_bytes = sum(_nbytes(t, k) for k in _module_keys(module, StoredKind.FOUR_BIT, t))
        return info

    def _quant_state_fields(self, key: str) -> dict:
        """The quant-state JSON of a 4-bit weight (``key``: its uint8 tensor), checked field by field against
        what bitsandbytes' ``QuantState.as_dict`` writes, before bitsandbytes or anything else reads it: a
        damaged value otherwise surfaces as a raw RecursionError/OverflowError/ZeroDivisionError, or loads
        and fails inside KSampler."""
        def damaged(field, problem):
            raise BnbFluxError(f"{self.name}: tensor {key}, field {field}: {problem}; the file is damaged: "
                               f"download it again")

        size, dtype = self.tensors.nbytes(key), self.tensors.dtype(key)  # from the header: nothing read
        if dtype != torch.uint8 or size > QS_JSON_MAX_BYTES:
            damaged("(the whole state)", f"{dtype} with {size} values; bitsandbytes stores the state as a short "
                                          f"UTF-8 JSON text in uint8")
        raw = self.tensors.get(key)
        try:
            state = json.loads(bytes(raw.reshape(-1).numpy()).decode("utf-8"))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            damaged("(the whole state)", f"not JSON text ({type(e).__name__})")
        if not isinstance(state, dict):
            damaged("(the whole state)", f"a JSON {type(state).__name__}, not an object")
        unknown = sorted(set(state) - set(QS_JSON_FIELDS) - set(QS_NESTED_FIELDS))
        if unknown:
            damaged(shown_name(unknown[0]), "not a field bitsandbytes writes")
        nested = any(f in state for f in QS_NESTED_FIELDS)
        for field in [*QS_JSON_FIELDS, *(QS_NESTED_FIELDS if nested else ())]:
            if field not in state:
                damaged(field, "missing" + (" (the other double-quant fields are there)" if field in QS_NESTED_FIELDS
                                            else ""))
            value = state[field]
            expected = QS_JSON_FIELDS.get(field) or QS_NESTED_FIELDS[field]
            if not quant_state_value_ok(field, value):
                kind = "the string" if isinstance(value, str) else type(value).__name__
                damaged(field, f"{kind} {shown_name(value)}; bitsandbytes writes {expected}")
        return state

    def _check_quant_state_tensors(self, wkey: str, info: PieceInfo):
        """Sizes and dtypes bitsandbytes takes on trust: a wrong one reads past a buffer or silently
        dequantizes to wrong weights, so a damaged file must fail here, naming the tensor."""
        t = self.tensors

        def damaged(what):
            raise BnbFluxError(f"{self.name}: {wkey}.{what}; the file is damaged: download it again")

        for key in ("quant_map", "nested_quant_map", "nested_absmax"):
            if f"{wkey}.{key}" in t and not t.dtype(f"{wkey}.{key}").is_floating_point:
                damaged(f"{key} is {t.dtype(f'{wkey}.{key}')}, bitsandbytes stores it as float32")
        absmax_dtype = t.dtype(f"{wkey}.absmax")
        if info.nested and absmax_dtype != torch.uint8:
            damaged(f"absmax is {absmax_dtype}, a double-quantized weight stores uint8 codes")
        if not info.nested and not absmax_dtype.is_floating_point:
            damaged(f"absmax is {absmax_dtype}, a 4-bit weight without double quant stores float scales")
        if info.code.numel() != 16:
            damaged(f"quant_map has {info.code.numel()} entries, a 4-bit code book has 16")
        if info.nested:
            if info.nested_code.numel() != 256:
                damaged(f"nested_quant_map has {info.nested_code.numel()} entries, an 8-bit code book has 256")
            nested = math.prod(t.shape(f"{wkey}.nested_absmax"))
            need = -(-info.absmax_count // info.nested_blocksize)
            if nested != need:
                damaged(f"nested_absmax has {nested} values, {info.absmax_count} absmax codes in blocks of "
                        f"{info.nested_blocksize} need {need}")

    # -- what the file holds --------------------------------------------------------------------
    @property
    def is_flux(self) -> bool:
        return self.layout is not None

    def linear_names(self) -> list[str]:
        return list(self._linears)

    def other_keys(self) -> list[str]:
        return list(self._others)

    def plan(self, name: str) -> RowPlan:
        plan = self._plans.get(name)
        if plan is None:
            parts = []
            for module, start, rows in self._linears[name]:
                info = self._pieces[module]
                parts.append((info, start, info.shape[0] if rows is None else rows))
            plan = self._plans[name] = plan_rows(parts)
        return plan

    def read_order(self, names) -> list:
        """``names`` (Linears) sorted by where their stored weights lie in the file(s): a cold file is then
        read front to back, as fast as the disk streams, instead of seeking back and forth."""
        def where(name):
            return min(self.tensors.position(f"{info.module}.weight") for info, _, _ in self.plan(name).parts)
        return sorted(names, key=where)

    def linear_shape(self, name: str) -> tuple[int, int]:
        parts = self.plan(name).parts
        return (sum(rows for _, _, rows in parts), parts[0][0].shape[1])

    def has_bias(self, name: str) -> bool:
        return any(f"{m}.bias" in self.tensors for m, _, _ in self._linears[name])

    @property
    def is_prequantized(self) -> bool:
        return any(p.kind is not StoredKind.FLOAT for p in self._pieces.values())

    def meta_state_dict(self) -> dict[str, torch.Tensor]:
        """Logical BFL keys, shapes and dtypes (no data read): what model detection must see."""
        out = {}
        for name in self._linears:
            plan = self.plan(name)
            dtype = plan.parts[0][0].dtype
            out[f"{name}.weight"] = torch.empty(self.linear_shape(name), dtype=dtype, device="meta")
            if self.has_bias(name):
                out[f"{name}.bias"] = torch.empty(self.linear_shape(name)[0], dtype=dtype, device="meta")
        for key, src in self._others.items():
            out[key] = torch.empty(self.tensors.shape(src), dtype=self.tensors.dtype(src), device="meta")
        return out

    # -- reading --------------------------------------------------------------------------------
    def staging_bytes(self, names) -> int:
        """The largest float weight among ``names`` stored in one piece (what :meth:`read_linear` can
        read into a staging buffer)."""
        sizes = [self.tensors.nbytes(f"{plan.parts[0][0].module}.weight") for plan in map(self.plan, names)
                 if len(plan.parts) == 1 and plan.parts[0][0].kind is StoredKind.FLOAT]
        return max(sizes, default=0)

    def read_linear(self, name: str, staging: Optional[torch.Tensor] = None) -> StoredLinear:
        """One Linear as stored. ``staging``: a uint8 buffer that a float weight stored in one piece is
        read into (the result's weight is then a view of it, valid until the buffer is reused)."""
        if name not in self._linears:
            raise BnbFluxError(f"{self.name}: tensor {name}.weight is missing; the file is not a complete "
                               f"{self.family.title} model")
        plan = self.plan(name)
        if len(plan.parts) != 1:
            staging = None
        stored = {p.module: self._read_piece(p, staging) for p, _, _ in plan.parts}
        out = assemble_rows(plan, stored)
        if plan.method not in (RowMethod.READ, RowMethod.FLOAT):
            note = f"{name}: {plan.reason}"
            if note not in self.notes:
                self.notes.append(note)
        return out

    def read(self, key: str) -> torch.Tensor:
        src = self._others.get(key)
        if src is None:
            raise BnbFluxError(f"{self.name}: tensor {key} is missing; the file is not a complete {self.family.title} model")
        return self.tensors.get(src)

    def _read_piece(self, info: PieceInfo, staging: Optional[torch.Tensor] = None) -> StoredLinear:
        t, m = self.tensors, info.module
        bias = t.get(f"{m}.bias") if f"{m}.bias" in t else None
        if m in self.scaled:
            weight = scaled_formats.dequantize(self.scaled[m], t, self.name)
            return StoredLinear(StoredKind.FLOAT, weight=weight, bias=bias)
        weight = t.get(f"{m}.weight", out=staging if info.kind is StoredKind.FLOAT else None)
        if info.kind is StoredKind.FLOAT:
            return StoredLinear(StoredKind.FLOAT, weight=weight, bias=bias)
        if info.kind is StoredKind.INT8:
            scb = t.get(f"{m}.SCB").to(torch.float32)
            self._check_statistic(f"{m}.SCB", scb, "per-row scale")
            return StoredLinear(StoredKind.INT8, cb=weight, scb=scb, bias=bias)
        qs_dict = {k[len(m) + 1:]: t.get(k) for k in _module_keys(m, StoredKind.FOUR_BIT, t)
                   if k not in (f"{m}.weight", f"{m}.bias")}
        try:
            qs = QuantState.from_dict(qs_dict, device=torch.device("cpu"))
        except Exception as e:  # bnb raises ValueError/AssertionError/KeyError for malformed states
            raise BnbFluxError(f"{self.name}: the quant state of {m}.weight cannot be read by bitsandbytes "
                               f"({e!r}); the file is damaged: download it again") from e
        self._check_statistic(f"{m}.weight.quant_map", qs.code, "code book")
        if qs.nested:
            # a de-nested block scale is a code (within [-1, 1]) times a nested scale, plus the offset
            self._check_statistic(f"{m}.weight.nested_absmax", qs.state2.absmax, "block scale", abs(float(qs.offset)))
            self._check_statistic(f"{m}.weight.nested_quant_map", qs.state2.code, "code book")
        else:
            self._check_statistic(f"{m}.weight.absmax", qs.absmax, "block scale")
        # bytes are bytes: a non-uint8 quant_storage (diffusers' bnb_4bit_quant_storage) is viewed as uint8
        packed = weight.contiguous().view(torch.uint8).reshape(-1, 1)
        return StoredLinear(StoredKind.FOUR_BIT, packed=packed, quant_state=qs, bias=bias)

    def _check_statistic(self, key: str, values: torch.Tensor, what: str, offset: float = 0.0):
        """A quantization statistic bitsandbytes multiplies into every weight of its block or row: NaN or
        inf there gives NaN latents with no error, a negative scale flips the weights' signs, a code book
        entry outside [-1, 1] scales them past the absmax."""
        v = values.to(torch.float32)
        bad = None
        if not bool(torch.isfinite(v).all()):
            bad = "holds NaN or inf"
        elif what == "code book" and bool((v.abs() > 1).any()):
            bad = "has entries outside [-1, 1]"
        elif what != "code book" and bool((v < 0).any()):
            bad = "holds a negative scale"
        elif what != "code book" and float(v.max()) + offset > FLOAT16_MAX:
            bad = (f"holds a scale of {float(v.max()) + offset:.4g}, beyond {FLOAT16_MAX:g}: weights no 16-bit "
                   f"compute dtype holds")
        if bad is not None:
            raise BnbFluxError(f"{self.name}: tensor {key} ({what}s) {bad}; the file is damaged: download it again, "
                               f"or quantize the full-precision model again")

    # -- describing -----------------------------------------------------------------------------
    def quant_summary(self) -> dict:
        """Counts and schemes of the Linears as the loader will build them."""
        kinds = {kind.value: 0 for kind in (StoredKind.FOUR_BIT, StoredKind.INT8, StoredKind.FLOAT)}
        schemes: dict[str, int] = {}
        fusions = {"exact": 0, "denested": 0, "requantized": 0}
        for name in self._linears:
            plan = self.plan(name)
            kinds[plan.kind.value] += 1
            if plan.kind is not StoredKind.FLOAT:
                target = next(p for p, _, _ in plan.parts if p.kind is not StoredKind.FLOAT)
                scheme = target.scheme()
                if plan.method is RowMethod.CONCAT_DENEST:
                    scheme = scheme.replace("double quant", "absmax de-nested")
                schemes[scheme] = schemes.get(scheme, 0) + 1
            if len(plan.parts) > 1 and plan.kind is not StoredKind.FLOAT:
                fusion = {RowMethod.CONCAT: "exact", RowMethod.CONCAT_DENEST: "denested"}.get(plan.method, "requantized")
                fusions[fusion] += 1
        return {"kinds": kinds, "schemes": schemes, "fusions": fusions, "linears": len(self._linears)}

    def describe_layout(self) -> str:
        if self.scaled:
            return (f"ComfyUI-quantized ({scaled_formats.describe_formats(self.scaled)}), "
                    f"{_LAYOUT_NAMES.get(self.layout, 'unknown names')}: dequantized on load")
        if not self.is_prequantized:
            return f"full precision, {_LAYOUT_NAMES.get(self.layout, 'unknown names')}"
        kinds = {p.kind for p in self._pieces.values()}
        if self.layout == "diffusers":
            shown = {StoredKind.FOUR_BIT: "4-bit", StoredKind.INT8: "int8"}
            what = "diffusers-bnb " + "/".join(word for kind, word in shown.items() if kind in kinds)
        elif StoredKind.FOUR_BIT in kinds:
            what = "lllyasviel/Forge bnb 4-bit layout (weight.absmax, weight.quant_map, weight.quant_state...)"
        else:
            what = "bnb LLM.int8 layout (weight, SCB, weight_format), BFL names"
        if self.metadata.get("format") == FORMAT_NAME:
            what += ", written by comfyui-bnb-flux"
        return what

    def close(self):
        self.tensors.close()


def _nbytes(t: TensorSet, key: str) -> int:
    return math.prod(t.shape(key)) * torch.empty(0, dtype=t.dtype(key)).element_size()


def _find_layout(keys: list[str]) -> tuple[Optional[str], str]:
    for k in keys:
        for marker in FLUX_BFL_MARKERS:
            if k.endswith(marker):
                prefix = k[: -len(marker)]
                if prefix == "" or prefix.endswith("."):
                    return "bfl", prefix
    for k in keys:
        if k.endswith(FLUX_DIFFUSERS_MARKER):
            prefix = k[: -len(FLUX_DIFFUSERS_MARKER)]
            if prefix == "" or prefix.endswith("."):  # not single_transformer_blocks.*
                return "diffusers", prefix
    return None, ""


_AUX_RE = re.compile(r"^(.*)\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__\w+)$")


def _stored_modules(keys: list[str]) -> dict[str, StoredKind]:
    """File module key -> the :class:`StoredKind` of every quantized Linear (bnb 4-bit or int8 layout)."""
    keyset = set(keys)
    out: dict[str, StoredKind] = {}
    for k in keys:
        m = _AUX_RE.match(k)
        if m:
            out[m.group(1)] = StoredKind.FOUR_BIT
        elif k.endswith(".SCB"):
            out.setdefault(k[: -len(".SCB")], StoredKind.INT8)
    missing = [m for m in out if f"{m}.weight" not in keyset]
    if missing:
        raise BnbFluxError(f"tensor {missing[0]}.weight is missing beside its quantization state; "
                           f"the file is incomplete (a shard missing?)")
    return out


def _module_keys(module: str, kind: StoredKind, t) -> list[str]:
    w = f"{module}.weight"
    if kind is StoredKind.FLOAT:
        return [k for k in (w, f"{module}.bias") if k in t]
    if kind is StoredKind.INT8:
        return [k for k in (w, f"{module}.bias", f"{module}.SCB", f"{module}.weight_format") if k in t]
    keys = [w, f"{module}.bias"] + [f"{w}.{s}" for s in QS_TENSORS] + [f"{w}.{QS_KEY}{q}" for q in ("nf4", "fp4")]
    return [k for k in keys if k in t]


def open_flux_checkpoint(path: str) -> FluxCheckpoint:
    return flux_checkpoint(open_tensor_set(path))


def flux_checkpoint(tensors) -> FluxCheckpoint:
    """The checkpoint of an open tensor set; its errors name the file."""
    try:
        ckpt = FluxCheckpoint(tensors)
    except BnbFluxError as e:
        msg = str(e)
        raise BnbFluxError(msg if msg.startswith(tensors.name) else f"{tensors.name}: {msg}") from e
    return ckpt
