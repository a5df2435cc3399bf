"""A Linear layer as a file stores it (Forge/bnb 4-bit, bnb int8, float), and the checks on its quant state."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Optional

import bitsandbytes.functional as bnbf
import torch
from bitsandbytes.functional import QuantState

from ..layers import QLinear4bit, QLinear8bit, quantize_weight_bytes
from ..spec import QuantSpec
from ..widening import unexpand

FORMAT_NAME = "bnb-flux"


FORMAT_VERSION = "1"


QS_KEY = "quant_state.bitsandbytes__"


# the quant-state JSON of a 4-bit weight as bitsandbytes' QuantState.as_dict writes it: field -> what it holds
QS_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


QS_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


QS_NESTED_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # its blockwise 8-bit quantizer's sizes


QS_JSON_FIELDS = {"quant_type": "nf4 or fp4", "blocksize": f"a number, one of {', '.join(map(str, QS_BLOCKSIZES))}",
                  "dtype": f"one of {', '.join(QS_DTYPES)}", "shape": "two positive whole numbers [out, in]"}


QS_NESTED_FIELDS = {"nested_blocksize": f"a number, one of {', '.join(map(str, QS_NESTED_BLOCKSIZES))}",
                    "nested_dtype": f"one of {', '.join(QS_DTYPES)}", "nested_offset": "a finite number"}


QS_JSON_MAX_BYTES = 64 * 1024  # bitsandbytes' state is ~150 bytes


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def quant_state_value_ok(field: str, value) -> bool:
    if field == "quant_type":
        return value in ("nf4", "fp4")
    if field == "blocksize":
        return _whole(value) and value in QS_BLOCKSIZES
    if field == "nested_blocksize":
        return _whole(value) and value in QS_NESTED_BLOCKSIZES
    if field in ("dtype", "nested_dtype"):
        return isinstance(value, str) and value in QS_DTYPES
    if field == "shape":
        return (isinstance(value, list) and len(value) == 2
                and all(_whole(v) and 0 < v < 2 ** 31 for v in value))
    if field == "nested_offset":
        if _whole(value):
            return abs(value) < 2 ** 1000  # math.isfinite of a 400-digit integer raises OverflowError
        return isinstance(value, float) and math.isfinite(value)
    return False


# the tensors bnb keeps beside a 4-bit ``X.weight`` (``QuantState.as_dict(packed=True)``)
QS_TENSORS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


class StoredKind(str, enum.Enum):
    """How a file stores one Linear (a ``str``: equal to its value; print ``.value``)."""

    FLOAT = "float"
    FOUR_BIT = "4bit"
    INT8 = "int8"


@dataclass
class StoredLinear:
    """One Linear as a file stores it: a float ``weight``, or 4-bit ``packed`` + ``quant_state``, or
    int8 ``cb`` + ``scb``; ``note`` says how it was assembled when that was not a plain read."""

    kind: StoredKind
    weight: Optional[torch.Tensor] = None
    packed: Optional[torch.Tensor] = None
    quant_state: Optional[QuantState] = None
    cb: Optional[torch.Tensor] = None
    scb: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    note: Optional[str] = None

    def __post_init__(self):
        self.kind = StoredKind(self.kind)

    @property
    def shape(self) -> tuple[int, int]:
        if self.kind is StoredKind.FOUR_BIT:
            return tuple(self.quant_state.shape)
        return tuple((self.weight if self.kind is StoredKind.FLOAT else self.cb).shape)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        if self.kind is StoredKind.FLOAT:
            return self.weight.to(dtype)
        if self.kind is StoredKind.INT8:  # SCB / 127 is exact for power-of-two scales (see layers.QLinear8bit)
            return (self.cb.to(torch.float32) * (self.scb.to(torch.float32) / 127.0)[:, None]).to(dtype)
        qs = _quant_state_copy(self.quant_state, torch.float32)
        return bnbf.dequantize_4bit(self.packed, qs).to(dtype)

    def describe(self) -> str:
        if self.kind is StoredKind.FLOAT:
            return f"float ({str(self.weight.dtype).replace('torch.', '')})"
        if self.kind is StoredKind.INT8:
            return "int8"
        qs = self.quant_state
        return f"{qs.quant_type}, blocksize {qs.blocksize}, {'double quant' if qs.nested else 'no double quant'}"


def _quant_state_copy(qs: QuantState, dtype=None) -> QuantState:
    state2 = None
    if qs.nested:
        s2 = qs.state2
        state2 = QuantState(absmax=s2.absmax, code=s2.code, blocksize=s2.blocksize, dtype=s2.dtype)
    return QuantState(absmax=qs.absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
                      quant_type=qs.quant_type, dtype=dtype or qs.dtype, offset=qs.offset, state2=state2)


def denested_absmax(qs: QuantState) -> torch.Tensor:
    """The float32 per-block absmax bnb's ``dequantize_4bit`` computes from a double-quantized state
    (same kernel, same addition): replacing the nested state by it dequantizes to identical values."""
    if not qs.nested:
        return qs.absmax.to(torch.float32)
    absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2)
    absmax += qs.offset
    return absmax.to(torch.float32)


def quantize_weight(weight: torch.Tensor, spec: QuantSpec, bias: Optional[torch.Tensor] = None,
                    device=None) -> StoredLinear:
    """Quantize a float weight as Load BnB Flux does on load (absmax from float32, uint8 storage), on
    ``device`` (default: where the weight is); the result is on the CPU. bnb's CUDA and CPU kernels round
    a few values differently, so the bytes equal a load's where both quantize on the same kind of device
    (the loader quantizes on its load device: the GPU when there is one)."""
    if spec.is_4bit:
        packed, qs = quantize_weight_bytes(weight, spec, device)
        keep = weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
        qs.dtype = spec.compute_dtype or keep  # recorded only; the loader dequantizes into its compute dtype
        if packed.device.type != "cpu":
            packed, qs = packed.cpu(), _quant_state_copy(qs)
            qs.to("cpu")
        return StoredLinear(StoredKind.FOUR_BIT, packed=packed, quant_state=qs, bias=bias)
    cb, scb = quantize_weight_bytes(weight, spec, device)
    return StoredLinear(StoredKind.INT8, cb=cb.cpu(), scb=scb.cpu(), bias=bias)


def layer_from_stored(stored: StoredLinear, bias, compute_dtype: torch.dtype, store_device):
    """The live quantized layer holding a stored layer's bytes as they are (None for a float one)."""
    if stored.kind is StoredKind.FOUR_BIT:
        return QLinear4bit.from_prequantized(stored.packed, stored.quant_state, bias, compute_dtype, store_device)
    if stored.kind is StoredKind.INT8:
        return QLinear8bit.from_prequantized(stored.cb, stored.scb, bias, compute_dtype, store_device)
    return None


def stored_from_layer(module, weight=None, bias=None) -> StoredLinear:
    """What a file stores for a live layer: a quantized one's original bytes (an expanded layer's own,
    unwidened), else ``weight`` (the plain layer's float weight)."""
    if isinstance(module, QLinear4bit):
        module = unexpand(module)
        return StoredLinear(StoredKind.FOUR_BIT, packed=module.weight.data, quant_state=module.weight.quant_state,
                            bias=bias)
    if isinstance(module, QLinear8bit):
        module = unexpand(module)
        return StoredLinear(StoredKind.INT8, cb=module.weight.data, scb=module.weight.SCB, bias=bias)
    return StoredLinear(StoredKind.FLOAT, weight=weight, bias=bias)


def default_quantize_device() -> torch.device:
    """Where Load BnB Flux quantizes on a machine like this one: its GPU if it has one."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def linear_tensors(name: str, stored: StoredLinear) -> dict[str, torch.Tensor]:
    """The tensors of one Linear in the file layout: 4-bit as lllyasviel/Forge (bitsandbytes'
    ``QuantState.as_dict(packed=True)`` beside the packed ``weight``), int8 as bnb's ``Linear8bitLt``
    state dict (``weight``, ``SCB``, ``weight_format`` 0 = row-major), float as a plain ``weight``."""
    out: dict[str, torch.Tensor] = {}
    if stored.kind is StoredKind.FOUR_BIT:
        out[f"{name}.weight"] = stored.packed.detach().reshape(-1, 1)
        for k, v in stored.quant_state.as_dict(packed=True).items():
            out[f"{name}.weight.{k}"] = v.detach().clone()  # small; never shares storage with another layer
    elif stored.kind is StoredKind.INT8:
        out[f"{name}.weight"] = stored.cb.detach()
        out[f"{name}.SCB"] = stored.scb.detach().to(torch.float32)
        out[f"{name}.weight_format"] = torch.tensor(0, dtype=torch.uint8)
    else:
        out[f"{name}.weight"] = stored.weight.detach()
    if stored.bias is not None:
        out[f"{name}.bias"] = stored.bias.detach()
    return {k: v.to("cpu").contiguous() for k, v in out.items()}
