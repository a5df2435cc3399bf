"""Pre-quantized FLUX files in and out, with no host: pure torch + bitsandbytes + safetensors.

Read (every layout gives the same thing: BFL module names, one :class:`StoredLinear` per Linear):

* **lllyasviel/Forge bnb 4-bit** (``flux1-dev-bnb-nf4`` v1 with double-quantized absmax, v2 with float32
  absmax, their FP4 form): per Linear ``X.weight`` (packed uint8 ``[N*K/2, 1]``) beside ``X.weight.absmax``,
  ``X.weight.quant_map``, ``X.weight.nested_absmax`` + ``X.weight.nested_quant_map`` (double quant only) and
  ``X.weight.quant_state.bitsandbytes__nf4|fp4`` (JSON in uint8): bitsandbytes' own ``QuantState.as_dict``.
  BFL names, bare or under any prefix (all-in-one checkpoints: ``model.diffusion_model.`` beside the text
  encoders and the VAE, which are skipped).
* **diffusers-bnb** transformers (``FluxTransformer2DModel.save_pretrained`` with 4-bit or 8-bit bnb):
  the same per-tensor keys under diffusers names, one file or sharded with a ``*.index.json``. q/k/v (and
  a single block's ``proj_mlp``) become BFL's fused ``qkv`` / ``linear1``; ``norm_out.linear`` gets its
  two halves swapped. See :func:`plan_rows` for when that is done on the packed bytes.
* **LLM.int8**: ``X.weight`` (int8, logical shape) + ``X.SCB`` (per-row absmax) + ``X.weight_format``
  (0 = row-major), bitsandbytes' ``Linear8bitLt`` state dict, in BFL or diffusers names.
* Full-precision files (fp32/bf16/fp16/fp8), BFL or diffusers names: every Linear is a float weight.

Which Linears a file has quantized is the file's choice; the others are read as float weights.

Write: :func:`linear_tensors` gives a quantized Linear in the Forge key layout (4-bit) or bnb's
``SCB``/``weight_format`` layout (int8); :func:`quantize_file` converts a file (streaming, one Linear at a
time) and :func:`inspect_file` describes one. Files written here carry ``{"format": "bnb-flux", ...}``
metadata naming the scheme.
"""
from __future__ import annotations

import json
import math
import ntpath
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import bitsandbytes.functional as bnbf
import torch
from bitsandbytes.functional import QuantState

from . import scaled_formats
from .formats import FLOAT16_MAX, FLOAT_DTYPES, BnbFluxError, TensorFile, has_control_characters, shown_name
from .spec import QuantSpec

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


def _quant_state_value_ok(field: str, value) -> bool:
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
FLUX_BFL_MARKERS = ("double_blocks.0.img_attn.norm.key_norm.scale", "double_blocks.0.img_attn.norm.key_norm.weight")
FLUX_DIFFUSERS_MARKER = "transformer_blocks.0.attn.norm_k.weight"

# Linear layers the quantize-on-load default leaves in the compute dtype: the small embedders and the
# output layer hold ~0.4 % of FLUX's parameters and see raw inputs/outputs, where 4-bit error is most
# visible. Everything in the double/single blocks and txt_in (99.6 %) is quantized.
UNQUANTIZED_LINEARS = ("img_in", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


def default_should_quantize(name: str, in_features: int, spec: QuantSpec, quantize_img_in: bool = False) -> bool:
    """Which Linears of a full-precision file get quantized (on load and by ``cli quantize``)."""
    if name == "img_in" and quantize_img_in:
        return spec.can_quantize(in_features)
    if name == "img_in" or name.startswith(UNQUANTIZED_LINEARS):
        return False
    return spec.can_quantize(in_features)


# ---------------------------------------------------------------- files and shards

class TensorSet:
    """One key space over one safetensors file or the shards an ``*.index.json`` names."""

    def __init__(self, files: list[TensorFile], name: str, index_path: Optional[str] = None):
        self.files = files
        self.name = name
        self.index_path = index_path
        self._where: dict[str, TensorFile] = {}
        for f in files:
            for k in f.keys():
                self._where.setdefault(k, f)
        self.metadata = dict(files[0].metadata) if files else {}

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._where[key].get(key, out=out)

    def nbytes(self, key: str) -> int:
        return self._where[key].nbytes(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def position(self, key: str) -> tuple[int, int]:
        """(shard, byte offset) of a tensor: reading in this order reads each file front to back."""
        f = self._where[key]
        return self.files.index(f), f.offset(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._where[key].dtype(key)

    @property
    def size_bytes(self) -> int:
        return sum(os.path.getsize(f.path) for f in self.files)

    def close(self):
        for f in self.files:
            f.close()


INDEX_MAX_BYTES = 64 * 2**20  # a real index is ~100 KB; larger ones are refused before parsing


def _index_files(directory: str) -> list[str]:
    try:
        return [os.path.join(directory, n) for n in sorted(os.listdir(directory)) if n.endswith(".index.json")]
    except OSError:
        return []


def _confined_shard(entry) -> Optional[str]:
    """``entry`` as a path inside the index's folder, or None: decided from the text alone (relative, no
    ``..``, no absolute or drive path, a ``.safetensors`` name), so the answer does not depend on, and does
    not tell, what exists on the disk. A shard that is a symlink stays allowed (Hugging Face snapshots)."""
    if not isinstance(entry, str) or not entry or "\\" in entry or ":" in entry or len(entry) > 1024:
        return None  # ":" anywhere: a drive in a later part (a/C:x) would restart the path on Windows
    if has_control_characters(entry):
        return None
    if os.path.isabs(entry) or ntpath.splitdrive(entry)[0] or entry.startswith("/"):
        return None
    parts = [p for p in entry.split("/") if p != "."]  # "./x" is x (some converters write it)
    if not parts or any(p in ("", "..") for p in parts) or not entry.endswith(".safetensors"):
        return None
    return os.path.join(*parts)


def read_shard_index(index: str) -> dict[str, str]:
    """The ``weight_map`` of a sharded model's ``*.index.json``: tensor name -> shard path inside the
    index's folder. Raises :class:`BnbFluxError` naming the index and the entry for anything else."""
    name = os.path.basename(index)
    fix = "re-download the index with its shards, or pick a single-file model"
    try:
        if os.path.getsize(index) > INDEX_MAX_BYTES:
            raise BnbFluxError(f"{name}: {os.path.getsize(index)} bytes, too large for a shard index "
                               f"(at most {INDEX_MAX_BYTES >> 20} MiB); {fix}")
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except BnbFluxError:
        raise
    except (OSError, ValueError, RecursionError) as e:
        raise BnbFluxError(f"{name}: not a readable shard index ({type(e).__name__}: {shown_name(e)}); {fix}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BnbFluxError(f"{name}: no \"weight_map\" object from tensor names to shard files; {fix}")
    out = {}
    for key, entry in weight_map.items():
        shard = _confined_shard(entry)
        if shard is None:
            raise BnbFluxError(f"{name}: tensor {shown_name(key)} is mapped to {shown_name(entry)}, which is not a "
                               f".safetensors file inside the index's folder (absolute paths, drive letters and "
                               f"'..' are refused); {fix}")
        out[key] = shard
    return out


def _index_of(path: str) -> tuple[Optional[str], dict[str, str]]:
    """The ``*.index.json`` beside ``path`` that lists it as a shard, and its weight map (None, {} if none
    does). An index that cannot be read is skipped unless its name says it belongs to this file
    (``model.safetensors.index.json`` for ``model-00001-of-00002.safetensors``): one broken index does not
    break the other models beside it."""
    name = os.path.basename(path)
    for candidate in _index_files(os.path.dirname(os.path.abspath(path))):
        stem = os.path.basename(candidate)[: -len(".index.json")].removesuffix(".safetensors")
        try:
            weight_map = read_shard_index(candidate)
        except BnbFluxError as e:
            if re.fullmatch(re.escape(stem) + r"-\d{5}-of-\d{5}\.safetensors", name):  # how its shards are named
                raise BnbFluxError(f"{name}: a shard of {e}") from None
            continue
        if name in weight_map.values():
            return candidate, weight_map
    return None, {}


def open_tensor_set(path: str) -> TensorSet:
    """A file, or all shards of a sharded model: ``path`` is the ``*.index.json`` or any one shard
    (ComfyUI lists the shards, not the index, so picking one shard loads the whole set)."""
    name = os.path.basename(path)
    if path.endswith(".index.json"):
        index, weight_map = path, read_shard_index(path)
    else:
        index, weight_map = _index_of(path)
    if index is None:
        return TensorSet([TensorFile(path)], name)
    directory = os.path.dirname(os.path.abspath(index))
    files = []
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(directory, shard)
        if not os.path.isfile(shard_path):
            raise BnbFluxError(f"{os.path.basename(index)}: shard {shard} is missing from {directory}; "
                               f"download every shard the index lists")
        files.append(TensorFile(shard_path))
    shown = os.path.basename(index) if path == index else f"{name}, a shard of {os.path.basename(index)}"
    return TensorSet(files, shown, index)


# ---------------------------------------------------------------- stored Linears

@dataclass
class StoredLinear:
    """One Linear as a file stores it: a float ``weight``, or 4-bit ``packed`` + ``quant_state``, or
    int8 ``cb`` + ``scb``; ``note`` says how it was assembled when that was not a plain read."""

    kind: str                                   # "float" | "4bit" | "int8"
    weight: Optional[torch.Tensor] = None
    packed: Optional[torch.Tensor] = None
    quant_state: Optional[QuantState] = None
    cb: Optional[torch.Tensor] = None
    scb: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    note: Optional[str] = None

    @property
    def shape(self) -> tuple[int, int]:
        if self.kind == "4bit":
            return tuple(self.quant_state.shape)
        return tuple((self.weight if self.kind == "float" else self.cb).shape)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        if self.kind == "float":
            return self.weight.to(dtype)
        if self.kind == "int8":  # SCB / 127 is exact for power-of-two scales (see layers.QLinear8bit)
            return (self.cb.to(torch.float32) * (self.scb.to(torch.float32) / 127.0)[:, None]).to(dtype)
        qs = _quant_state_copy(self.quant_state, torch.float32)
        return bnbf.dequantize_4bit(self.packed, qs).to(dtype)

    def describe(self) -> str:
        if self.kind == "float":
            return f"float ({str(self.weight.dtype).replace('torch.', '')})"
        if self.kind == "int8":
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
    w = weight.to(device=device or weight.device, dtype=torch.float32)
    if spec.is_4bit:
        packed, qs = bnbf.quantize_4bit(w, blocksize=spec.blocksize, compress_statistics=spec.double_quant,
                                        quant_type=spec.quant_type, quant_storage=torch.uint8)
        keep = weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
        qs.dtype = spec.compute_dtype or keep  # recorded only; the loader dequantizes into its compute dtype
        if packed.device.type != "cpu":
            packed, qs = packed.cpu(), _quant_state_copy(qs)
            qs.to("cpu")
        return StoredLinear("4bit", packed=packed, quant_state=qs, bias=bias)
    # from float16, as bnb's CUDA kernel requires and as the loader does
    cb, scb, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
    return StoredLinear("int8", cb=cb.cpu(), scb=scb.to("cpu", torch.float32), bias=bias)


def default_quantize_device() -> torch.device:
    """Where Load BnB Flux quantizes on a machine like this one: its GPU if it has one."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------- light layer info (headers + JSON only)

@dataclass
class PieceInfo:
    """What one stored Linear of the file is, read from headers and the small quant-state tensors only."""

    module: str                   # file module key (prefix included)
    kind: str                     # "float" | "4bit" | "int8"
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

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @classmethod
    def of(cls, module: str, stored: StoredLinear) -> "PieceInfo":
        """The info of a Linear already in memory (for planning row assembly of tensors not read from a file)."""
        if stored.kind != "4bit":
            dtype = stored.weight.dtype if stored.kind == "float" else torch.float16
            return cls(module, stored.kind, stored.shape, dtype)
        qs = stored.quant_state
        return cls(module, "4bit", tuple(qs.shape), qs.dtype, quant_type=qs.quant_type, blocksize=qs.blocksize,
                   nested=qs.nested, nested_blocksize=qs.state2.blocksize if qs.nested else None,
                   offset=float(qs.offset) if qs.nested else None, absmax_count=qs.absmax.numel(), code=qs.code,
                   nested_code=qs.state2.code if qs.nested else None)

    def scheme(self) -> str:
        if self.kind == "4bit":
            return f"{self.quant_type} (blocksize {self.blocksize}, {'double quant' if self.nested else 'no double quant'})"
        return "int8 (LLM.int8 rows + SCB)" if self.kind == "int8" else "float"


@dataclass
class RowPlan:
    """How a BFL Linear is assembled from row slices of stored Linears (``parts``: piece, first row, rows)."""

    parts: list
    method: str                   # "read" | "concat" | "concat-denest" | "requantize" | "float"
    kind: str                     # kind of the result
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
        return RowPlan(parts, "read", first.kind, True)
    kinds = {p.kind for p, _, _ in parts}
    widths = {p.shape[1] for p, _, _ in parts}
    if len(widths) != 1:
        raise BnbFluxError(f"{', '.join(p.module for p, _, _ in parts)}: input widths {sorted(widths)} differ; "
                           f"these tensors cannot form one FLUX Linear")
    if kinds == {"float"}:
        return RowPlan(parts, "float", "float", True)
    if kinds == {"int8"}:
        return RowPlan(parts, "concat", "int8", True, "int8 rows and per-row scales concatenated")
    quantized = [p for p, _, _ in parts if p.kind != "float"]
    target = quantized[0]
    if kinds == {"4bit"}:
        same = all(p.quant_type == first.quant_type and p.blocksize == first.blocksize
                   and torch.equal(p.code, first.code) for p, _, _ in parts)
        why = _alignment_problem(parts) if same else "parts quantized with different settings"
        if why is None:
            if _nested_concat_exact(parts):
                return RowPlan(parts, "concat", "4bit", True, "packed bytes, absmax and nested absmax concatenated")
            if not any(p.nested for p, _, _ in parts):
                return RowPlan(parts, "concat", "4bit", True, "packed bytes and absmax concatenated")
            return RowPlan(parts, "concat-denest", "4bit", True,
                           "packed bytes concatenated; double-quantized absmax de-nested to float32 (each part has "
                           "its own offset), dequantized values identical")
        return RowPlan(parts, "requantize", "4bit", False, f"{why}: dequantized and quantized again as {target.scheme()}")
    return RowPlan(parts, "requantize", target.kind, False,
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
    if plan.method == "read":
        s = parts[0][0]
        return StoredLinear(s.kind, s.weight, s.packed, s.quant_state, s.cb, s.scb, bias)
    if plan.method == "float":
        dtype = parts[0][0].weight.dtype
        if any(s.weight.dtype != dtype for s, _, _, _ in parts):
            dtype = torch.float32
        w = torch.cat([s.weight[start:start + rows].to(dtype) for s, _, start, rows in parts])
        return StoredLinear("float", weight=w, bias=bias)
    if plan.kind == "int8" and plan.method == "concat":
        cb = torch.cat([s.cb[start:start + rows] for s, _, start, rows in parts])
        scb = torch.cat([s.scb[start:start + rows].to(torch.float32) for s, _, start, rows in parts])
        return StoredLinear("int8", cb=cb, scb=scb, bias=bias, note=plan.reason)
    if plan.method in ("concat", "concat-denest"):
        return _concat_4bit(parts, plan, bias)
    # requantize: not exact, said so in plan.reason
    w = torch.cat([s.dequantize(torch.float32)[start:start + rows] for s, _, start, rows in parts])
    target = next(p for p, _, _ in plan.parts if p.kind != "float")
    spec = (QuantSpec(target.quant_type, target.nested, target.blocksize) if target.kind == "4bit"
            else QuantSpec("int8"))
    out = quantize_weight(w, spec, bias)
    if out.kind == "4bit":
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
    keep_nested = plan.method == "concat"
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
    return StoredLinear("4bit", packed=torch.cat(packed).reshape(-1, 1), quant_state=qs, bias=bias, note=plan.reason)


# ---------------------------------------------------------------- diffusers names

# BFL module (inside a block) -> diffusers modules whose rows it stacks, in BFL row order
_DIFFUSERS_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
}
_DIFFUSERS_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
_DIFFUSERS_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # (scale, shift) rows; BFL has (shift, scale)
}
_DIFFUSERS_NORMS_DOUBLE = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                           "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
_DIFFUSERS_NORMS_SINGLE = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
SWAPPED_HALVES = "final_layer.adaLN_modulation.1"


def _block_count(keys: Iterable[str], root: str) -> int:
    pattern = re.compile(rf"^{re.escape(root)}\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def diffusers_layout(keys: Iterable[str]) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """For diffusers module names (no prefix): BFL Linear -> diffusers modules stacked in row order, and
    BFL norm key (``...scale``) -> diffusers tensor key."""
    keys = list(keys)
    linears = {bfl: (d,) for bfl, d in _DIFFUSERS_TOP.items()}
    norms = {}
    for i in range(_block_count(keys, "transformer_blocks")):
        for bfl, ds in _DIFFUSERS_DOUBLE.items():
            linears[f"double_blocks.{i}.{bfl}"] = tuple(f"transformer_blocks.{i}.{d}" for d in ds)
        for bfl, d in _DIFFUSERS_NORMS_DOUBLE.items():
            norms[f"double_blocks.{i}.{bfl}.scale"] = f"transformer_blocks.{i}.{d}.weight"
    for i in range(_block_count(keys, "single_transformer_blocks")):
        for bfl, ds in _DIFFUSERS_SINGLE.items():
            linears[f"single_blocks.{i}.{bfl}"] = tuple(f"single_transformer_blocks.{i}.{d}" for d in ds)
        for bfl, d in _DIFFUSERS_NORMS_SINGLE.items():
            norms[f"single_blocks.{i}.{bfl}.scale"] = f"single_transformer_blocks.{i}.{d}.weight"
    return linears, norms


# ---------------------------------------------------------------- the checkpoint

_LAYOUT_NAMES = {"bfl": "BFL names", "diffusers": "diffusers names"}


class FluxCheckpoint:
    """A FLUX.1 diffusion model file seen in BFL names with logical shapes, whatever its layout.

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
        # another tool's quantization (ComfyUI scaled fp8, comfy_quant): read as float32, quantized like bf16
        self.scaled = scaled_formats.scaled_layers(tensors, under, self.prefix, self.name)
        if self.scaled:
            self.notes.append(f"{len(self.scaled)} Linear layers stored by ComfyUI as "
                              f"{scaled_formats.describe_formats(self.scaled)}: read as their stored values times "
                              f"their scales, then quantized with the node's quant_type")
        modules = _stored_modules(under)
        modules.update({m: "float" for m in self.scaled})
        for k in under:  # float Linears: the remaining 2-D float weights (FLUX.1 has no other 2-D weights)
            if k.endswith(".weight") and k[: -len(".weight")] not in modules and len(tensors.shape(k)) == 2 \
                    and tensors.dtype(k) in FLOAT_DTYPES:
                modules[k[: -len(".weight")]] = "float"
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
        bare = [k[p:] for k in under]
        linears, norms = diffusers_layout(bare)
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
            if bfl == SWAPPED_HALVES:
                rows = self._pieces[files[0]].shape[0] // 2
                self._linears[bfl] = [(files[0], rows, rows), (files[0], 0, rows)]
            else:
                self._linears[bfl] = [(f, 0, None) for f in files]
            used.update(files)
        for bfl, d in norms.items():
            if self.prefix + d in self.tensors:
                self._others[bfl] = self.prefix + d
                used.add(self.prefix + d)
        unknown = [m for m in modules if m not in used]
        unknown += [k for k in under if k not in consumed and k not in used and k not in self._others.values()]
        if unknown:
            self.notes.append(f"{len(unknown)} tensor(s) with no FLUX.1 counterpart ignored, e.g. {unknown[0]}")

    def _piece_info(self, module: str, kind: str) -> PieceInfo:
        t = self.tensors
        wkey = f"{module}.weight"
        scaled = self.scaled.get(module)
        if scaled is not None:
            return PieceInfo(module, "float", scaled.logical_shape(t.shape(wkey)), torch.float32,
                             stored_bytes=scaled_formats.stored_bytes(t, scaled))
        if kind == "float":
            shape = t.shape(wkey)
            return PieceInfo(module, "float", tuple(shape), t.dtype(wkey), stored_bytes=_nbytes(t, wkey))
        if kind == "int8":
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
            return PieceInfo(module, "int8", tuple(shape), torch.float16,
                             stored_bytes=_nbytes(t, wkey) + _nbytes(t, f"{module}.SCB"))
        qs_keys = [k for k in (f"{wkey}.{QS_KEY}nf4", f"{wkey}.{QS_KEY}fp4") if k in t]
        if not qs_keys:
            raise BnbFluxError(f"{self.name}: tensor {wkey} has no weight.{QS_KEY}nf4 (or fp4) beside its "
                               f"weight.absmax; the file is incomplete (an interrupted download or a missing "
                               f"shard): download it again")
        state = self._quant_state_fields(qs_keys[0])
        shape = tuple(state["shape"])
        info = PieceInfo(module, "4bit", shape, QS_DTYPES[state["dtype"]], quant_type=state["quant_type"],
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
        info.stored_bytes = sum(_nbytes(t, k) for k in _module_keys(module, "4bit", t))
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
            if not _quant_state_value_ok(field, value):
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

    def linear_kind(self, name: str) -> str:
        return self.plan(name).kind

    def has_bias(self, name: str) -> bool:
        return any(f"{m}.bias" in self.tensors for m, _, _ in self._linears[name])

    @property
    def is_prequantized(self) -> bool:
        return any(p.kind != "float" for p in self._pieces.values())

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
                 if len(plan.parts) == 1 and plan.parts[0][0].kind == "float"]
        return max(sizes, default=0)

    def read_linear(self, name: str, staging: Optional[torch.Tensor] = None) -> StoredLinear:
        """One Linear as stored. ``staging``: a uint8 buffer that a float weight stored in one piece is
        read into (the result's weight is then a view of it, valid until the buffer is reused)."""
        if name not in self._linears:
            raise BnbFluxError(f"{self.name}: tensor {name}.weight is missing; the file is not a complete FLUX.1 model")
        plan = self.plan(name)
        if len(plan.parts) != 1:
            staging = None
        stored = {p.module: self._read_piece(p, staging) for p, _, _ in plan.parts}
        out = assemble_rows(plan, stored)
        if plan.method not in ("read", "float"):
            note = f"{name}: {plan.reason}"
            if note not in self.notes:
                self.notes.append(note)
        return out

    def read(self, key: str) -> torch.Tensor:
        src = self._others.get(key)
        if src is None:
            raise BnbFluxError(f"{self.name}: tensor {key} is missing; the file is not a complete FLUX.1 model")
        return self.tensors.get(src)

    def _read_piece(self, info: PieceInfo, staging: Optional[torch.Tensor] = None) -> StoredLinear:
        t, m = self.tensors, info.module
        bias = t.get(f"{m}.bias") if f"{m}.bias" in t else None
        if m in self.scaled:
            return StoredLinear("float", weight=scaled_formats.dequantize(self.scaled[m], t, self.name), bias=bias)
        weight = t.get(f"{m}.weight", out=staging if info.kind == "float" else None)
        if info.kind == "float":
            return StoredLinear("float", weight=weight, bias=bias)
        if info.kind == "int8":
            scb = t.get(f"{m}.SCB").to(torch.float32)
            self._check_statistic(f"{m}.SCB", scb, "per-row scale")
            return StoredLinear("int8", cb=weight, scb=scb, bias=bias)
        qs_dict = {k[len(m) + 1:]: t.get(k) for k in _module_keys(m, "4bit", t) if k not in (f"{m}.weight", f"{m}.bias")}
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
        return StoredLinear("4bit", packed=packed, quant_state=qs, bias=bias)

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
        kinds = {"4bit": 0, "int8": 0, "float": 0}
        schemes: dict[str, int] = {}
        fusions = {"exact": 0, "denested": 0, "requantized": 0}
        for name in self._linears:
            plan = self.plan(name)
            kinds[plan.kind] += 1
            if plan.kind != "float":
                target = next(p for p, _, _ in plan.parts if p.kind != "float")
                scheme = target.scheme()
                if plan.method == "concat-denest":
                    scheme = scheme.replace("double quant", "absmax de-nested")
                schemes[scheme] = schemes.get(scheme, 0) + 1
            if len(plan.parts) > 1 and plan.kind != "float":
                fusions["exact" if plan.method == "concat" else "denested" if plan.method == "concat-denest"
                        else "requantized"] += 1
        return {"kinds": kinds, "schemes": schemes, "fusions": fusions, "linears": len(self._linears)}

    def describe_layout(self) -> str:
        if self.scaled:
            return (f"ComfyUI-quantized ({scaled_formats.describe_formats(self.scaled)}), "
                    f"{_LAYOUT_NAMES.get(self.layout, 'unknown names')}: dequantized on load")
        if not self.is_prequantized:
            return f"full precision, {_LAYOUT_NAMES.get(self.layout, 'unknown names')}"
        kinds = {p.kind for p in self._pieces.values()}
        if self.layout == "diffusers":
            what = "diffusers-bnb " + "/".join(k for k in ("4-bit", "int8") if k.replace("-", "") in kinds)
        elif "4bit" in kinds:
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


def _stored_modules(keys: list[str]) -> dict[str, str]:
    """File module key -> "4bit" | "int8" | "float" for every stored Linear (2-D weight or bnb layout)."""
    keyset = set(keys)
    out: dict[str, str] = {}
    for k in keys:
        m = _AUX_RE.match(k)
        if m:
            out[m.group(1)] = "4bit"
        elif k.endswith(".SCB"):
            out.setdefault(k[: -len(".SCB")], "int8")
    missing = [m for m in out if f"{m}.weight" not in keyset]
    if missing:
        raise BnbFluxError(f"tensor {missing[0]}.weight is missing beside its quantization state; "
                           f"the file is incomplete (a shard missing?)")
    return out


def _module_keys(module: str, kind: str, t) -> list[str]:
    w = f"{module}.weight"
    if kind == "float":
        return [k for k in (w, f"{module}.bias") if k in t]
    if kind == "int8":
        return [k for k in (w, f"{module}.bias", f"{module}.SCB", f"{module}.weight_format") if k in t]
    keys = [w, f"{module}.bias"] + [f"{w}.{s}" for s in QS_TENSORS] + [f"{w}.{QS_KEY}{q}" for q in ("nf4", "fp4")]
    return [k for k in keys if k in t]


def open_flux_checkpoint(path: str) -> FluxCheckpoint:
    tensors = open_tensor_set(path)
    try:
        ckpt = FluxCheckpoint(tensors)
    except BnbFluxError as e:
        msg = str(e)
        raise BnbFluxError(msg if msg.startswith(tensors.name) else f"{tensors.name}: {msg}") from e
    return ckpt


# ---------------------------------------------------------------- writing

def linear_tensors(name: str, stored: StoredLinear) -> dict[str, torch.Tensor]:
    """The tensors of one Linear in the file layout: 4-bit as lllyasviel/Forge (bitsandbytes'
    ``QuantState.as_dict(packed=True)`` beside the packed ``weight``), int8 as bnb's ``Linear8bitLt``
    state dict (``weight``, ``SCB``, ``weight_format`` 0 = row-major), float as a plain ``weight``."""
    out: dict[str, torch.Tensor] = {}
    if stored.kind == "4bit":
        out[f"{name}.weight"] = stored.packed.detach().reshape(-1, 1)
        for k, v in stored.quant_state.as_dict(packed=True).items():
            out[f"{name}.weight.{k}"] = v.detach().clone()  # small; never shares storage with another layer
    elif stored.kind == "int8":
        out[f"{name}.weight"] = stored.cb.detach()
        out[f"{name}.SCB"] = stored.scb.detach().to(torch.float32)
        out[f"{name}.weight_format"] = torch.tensor(0, dtype=torch.uint8)
    else:
        out[f"{name}.weight"] = stored.weight.detach()
    if stored.bias is not None:
        out[f"{name}.bias"] = stored.bias.detach()
    return {k: v.to("cpu").contiguous() for k, v in out.items()}


def bfl_file_key(model_key: str) -> str:
    """ComfyUI calls the QK-norm scales ``*_norm.weight``; BFL and Forge files say ``*_norm.scale``."""
    return model_key[: -len(".weight")] + ".scale" if model_key.endswith("_norm.weight") else model_key


def file_metadata(linears: dict[str, StoredLinear], source: str = "") -> dict[str, str]:
    """``format: bnb-flux`` metadata naming the scheme of a file being written."""
    quantized = [s for s in linears.values() if s.kind != "float"]
    types = sorted({s.quant_state.quant_type if s.kind == "4bit" else "int8" for s in quantized})
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "quant_type": types[0] if len(types) == 1 else ("mixed:" + ",".join(types) if types else "none"),
            "quantized_layers": str(len(quantized)), "linear_layers": str(len(linears))}
    four = [s.quant_state for s in quantized if s.kind == "4bit"]
    if four:
        sizes = sorted({qs.blocksize for qs in four})
        nested = {qs.nested for qs in four}
        meta["blocksize"] = ",".join(str(b) for b in sizes)
        meta["double_quant"] = "true" if nested == {True} else "false" if nested == {False} else "mixed"
        meta["layout"] = "bnb 4-bit, lllyasviel/Forge keys (weight.absmax, weight.quant_map, weight.quant_state...)"
    if any(s.kind == "int8" for s in quantized):
        meta["layout"] = (meta.get("layout", "") + "; " if four else "") + "bnb LLM.int8 (weight, SCB, weight_format)"
    if source:
        meta["source"] = source
    return meta


def save_flux_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    save_file(tensors, path, metadata=metadata)
    return path


def quantize_file(src: str, dst: str, spec: QuantSpec, quantize_img_in: bool = False,
                  progress: Optional[Callable[[int], object]] = None, log: Callable[[str], None] = print,
                  device=None) -> dict:
    """Convert a FLUX file into a pre-quantized one, one Linear at a time.

    Full-precision Linears are quantized as Load BnB Flux would on load (same layers, same bytes).
    A pre-quantized input keeps its own quantization (the file wins, as in the loader): its layers are
    re-laid out (diffusers q/k/v fused by :func:`plan_rows`), not quantized again; its float Linears
    stay float. Only the diffusion model is written (an all-in-one file's text encoders and VAE are not).
    """
    ckpt = open_flux_checkpoint(src)
    if not ckpt.is_flux:
        raise BnbFluxError(f"{ckpt.name}: no FLUX.1 diffusion model found (no double_blocks.0.img_attn.norm "
                           f"or transformer_blocks.0.attn.norm_k tensors)")
    pre = ckpt.is_prequantized
    if pre:
        log(f"{ckpt.name} is already quantized ({ckpt.describe_layout()}): its quantization is kept, "
            f"--quant {spec.quant_type} applies to nothing")
    names = ckpt.linear_names()
    bar = progress(len(names)) if progress is not None else None
    out: dict[str, torch.Tensor] = {}
    linears: dict[str, StoredLinear] = {}
    for name in names:
        stored = ckpt.read_linear(name)
        if stored.kind == "float" and not pre and default_should_quantize(name, stored.shape[1], spec, quantize_img_in):
            stored = quantize_weight(stored.weight, spec, stored.bias, device=device)
        linears[name] = stored
        out.update(linear_tensors(name, stored))
        del stored
        if bar is not None:
            bar.update(1)
    for key in ckpt.other_keys():
        out[bfl_file_key(key)] = ckpt.read(key).contiguous()
    if bar is not None and hasattr(bar, "close"):
        bar.close()
    meta = file_metadata(linears, source=ckpt.name)
    if ckpt.skipped:
        log(f"not written: {len(ckpt.skipped)} tensors outside the diffusion model (text encoders, VAE, ...)")
    for note in ckpt.notes:
        log(f"note: {note}")
    save_flux_file(dst, out, meta)
    ckpt.close()
    return meta


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def inspect_file(path: str) -> str:
    """A description of a FLUX file: layout, scheme, layer counts, size, and what Load BnB Flux does with it."""
    ckpt = open_flux_checkpoint(path)
    t = ckpt.tensors
    lines = [f"file: {ckpt.name} ({_mib(t.size_bytes)}{', ' + str(len(t.files)) + ' shards' if len(t.files) > 1 else ''})"]
    if not ckpt.is_flux:
        lines.append("not a FLUX.1 diffusion model (no double_blocks.0.img_attn.norm / transformer_blocks.0.attn.norm_k "
                     "tensors): Load BnB Flux refuses it")
        return "\n".join(lines)
    if ckpt.prefix:
        lines.append(f"diffusion model under '{ckpt.prefix}'" + (f"; {len(ckpt.skipped)} other tensors (text "
                     f"encoders, VAE, ...) are not read" if ckpt.skipped else ""))
    shown = ("format", "quant_type", "blocksize", "double_quant", "quantized_layers", "source")
    meta = {k: ckpt.metadata[k] for k in shown if k in ckpt.metadata}
    if meta:
        lines.append("metadata: " + ", ".join(f"{k}={v}" for k, v in meta.items()))
    lines.append(f"layout: {ckpt.describe_layout()}")
    shapes = {n: ckpt.linear_shape(n) for n in ckpt.linear_names()}
    img_in = shapes.get("img_in")
    doubles = _block_count(shapes, "double_blocks")
    singles = _block_count(shapes, "single_blocks")
    variant = "dev (guidance_in)" if any(n.startswith("guidance_in.") for n in shapes) else "schnell (no guidance_in)"
    params = sum(o * i for o, i in shapes.values())
    if img_in:
        lines.append(f"model: FLUX.1 {variant}, hidden {img_in[0]}, img_in {img_in[1]} inputs, {doubles} double + "
                     f"{singles} single blocks, {_count(params)} Linear weights")
    s = ckpt.quant_summary()
    k = s["kinds"]
    lines.append(f"Linear layers: {s['linears']} ({k['4bit']} 4-bit, {k['int8']} int8, {k['float']} full precision)")
    for scheme, count in s["schemes"].items():
        lines.append(f"  {count} x {scheme}")
    stored = sum(p.stored_bytes for p in ckpt._pieces.values())
    lines.append(f"Linear weights stored: {_mib(stored)} (bf16 would be {_mib(params * 2)})")
    f = s["fusions"]
    if any(f.values()):
        lines.append(f"diffusers pieces joined into BFL Linears (q/k/v, proj_mlp, norm_out halves): {f['exact']} on "
                     f"the stored bytes, {f['denested']} with absmax de-nested (both exact), {f['requantized']} "
                     f"requantized (lossy)")
    if ckpt.notes:
        lines += [f"note: {n}" for n in ckpt.notes]
    if ckpt.is_prequantized:
        lines.append("Load BnB Flux: uses the file's own quantization as stored (its quant_type and double_quant "
                     "inputs are not used); no quantization on load")
    else:
        lines.append("Load BnB Flux: quantizes the blocks and txt_in on load with its quant_type input; to skip that "
                     "at every start, convert once: python -m quant_expand.cli quantize IN OUT --quant nf4")
    ckpt.close()
    return "\n".join(lines)
