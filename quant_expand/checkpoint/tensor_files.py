"""Safetensors files and shard sets, read tensor by tensor from the header, never unpickled."""
from __future__ import annotations

import json
import math
import ntpath
import os
import re
from typing import Iterable, Optional

import torch
from safetensors import safe_open

from ..errors import BnbFluxError, has_control_characters, shown_name

# safetensors header dtype names -> torch dtypes
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e8m0fnu"):  # MXFP8 block scales (ComfyUI mixed-precision files)
    _ST_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.float64)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in a tensor read from a file (integer tensors always pass)."""
    if not tensor.is_floating_point():
        return True
    # torch has no isfinite kernel for the float8 dtypes: check a widened copy
    probe = tensor.float() if tensor.element_size() == 1 else tensor
    return bool(torch.isfinite(probe).all())


def require_finite(file: str, key: str, tensor: Optional[torch.Tensor]):
    """BnbFluxError naming the file and tensor when ``tensor`` (None: nothing stored, passes) holds NaN or inf:
    the check Load BnB Flux and the command line make on what they read."""
    if tensor is not None and not all_finite(tensor):
        raise BnbFluxError(f"{file}: tensor {key} holds NaN or inf values; the file is damaged: download it again")


class TensorFile:
    """A safetensors file opened lazily: shapes come from the header, tensors one at a time."""

    def __init__(self, path: str):
        self.path = path
        self.name = os.path.basename(path)
        if not path.lower().endswith((".safetensors", ".sft")):
            raise BnbFluxError(f"{self.name}: only .safetensors files are read (pickle-based .ckpt/.pt/.bin "
                               f"files can run code when loaded); convert it to safetensors first")
        try:
            self._handle = safe_open(path, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise BnbFluxError(f"{self.name}: not a readable safetensors file ({e}); "
                               f"the download may be truncated or corrupted: download it again") from e
        self._keys = list(self._handle.keys())
        self.metadata = self._handle.metadata() or {}
        self._offsets = self._data_offsets(path)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._handle_keys_set

    @property
    def _handle_keys_set(self):
        s = self.__dict__.get("_key_set")
        if s is None:
            s = self.__dict__["_key_set"] = set(self._keys)
        return s

    def dtype(self, key: str) -> torch.dtype:
        name = self._handle.get_slice(key).get_dtype()
        if name not in _ST_DTYPES:
            raise BnbFluxError(f"{self.name}: tensor {key} has dtype {name}, which this loader cannot read")
        return _ST_DTYPES[name]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(key).get_shape())

    def meta_state_dict(self, keys: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
        """Logical shapes and dtypes without reading any data (model detection needs only these)."""
        keys = self._keys if keys is None else keys
        return {k: torch.empty(self.shape(k), dtype=self.dtype(k), device="meta") for k in keys}

    @staticmethod
    def _data_offsets(path: str) -> dict:
        """Where each tensor's bytes lie in the file (absolute ``(start, end)``), from the header that
        ``safe_open`` has just validated."""
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        base = 8 + n
        return {k: (base + v["data_offsets"][0], base + v["data_offsets"][1])
                for k, v in header.items() if k != "__metadata__"}

    def offset(self, key: str) -> int:
        return self._offsets[key][0]

    def nbytes(self, key: str) -> int:
        start, end = self._offsets[key]
        return end - start

    def get(self, key: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One tensor, read with one large ``readinto`` into memory of its own (a cold file is read at the
        disk's sequential speed, where page faults through a memory map fetch it in small pieces; the
        call releases the GIL, so a reader thread overlaps it with quantization). ``out``: a uint8
        staging buffer to read into instead (the result is a view of it: the caller copies it before the
        buffer is used again)."""
        try:
            dtype, shape = self.dtype(key), self.shape(key)
            start, end = self._offsets[key]
            if out is not None and out.dtype == torch.uint8 and out.is_contiguous() and out.numel() >= end - start:
                buf = out[: end - start]
            else:
                buf = torch.empty(end - start, dtype=torch.uint8)
            if end > start:
                with open(self.path, "rb", buffering=0) as f:
                    f.seek(start)
                    view, got = memoryview(buf.numpy()), 0
                    while got < len(view):
                        n = f.readinto(view[got:])
                        if not n:
                            raise OSError(f"file ends after {start + got} of {end} bytes")
                        got += n
            if buf.numel() != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{end - start} bytes for shape {list(shape)} of {dtype}")
            return buf.view(dtype).reshape(shape)
        except BnbFluxError:
            raise
        except Exception as e:
            raise BnbFluxError(f"{self.name}: could not read tensor {key} ({e}); the file may be truncated "
                               f"or corrupted: download it again") from e

    def close(self):
        self._handle = None

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc):
        self.close()


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
