"""State dicts in: safetensors files read tensor by tensor, never all at once, never unpickled."""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Optional

import torch
from safetensors import safe_open

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


MESSAGE_MAX = 2000  # characters of an error message: names from files can be megabytes long


class BnbFluxError(ValueError):
    """A problem with the user's input that the node reports as is: it names the file and what to do.

    The message goes to the log, ``/history`` and the websocket: control characters from a file's names
    are spelled out (a newline or an ANSI escape cannot forge a log line) and it is cut to MESSAGE_MAX."""

    def __init__(self, message: str = ""):
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))
        if len(text) > MESSAGE_MAX:
            cut = len(text) - MESSAGE_MAX + 200
            text = f"{text[:MESSAGE_MAX - 600]} ... ({cut} characters cut) ... {text[-400:]}"
        super().__init__(text)


NAME_SHOWN = 120  # characters of a name from a file or a link that a message quotes
FLOAT16_MAX = float(torch.finfo(torch.float16).max)  # a scale or update past it: no 16-bit compute dtype holds it


def has_control_characters(text: str) -> bool:
    """NUL, newlines, escape sequences and the like: never part of a real file or path name."""
    return any(ord(c) < 0x20 or ord(c) == 0x7f for c in text)


def shown_name(text) -> str:
    """A name from a file or a link, quoted and cut for a message or a log line (no raw newlines or escape
    sequences: ``repr`` spells them out)."""
    text = repr(str(text))
    return text if len(text) <= NAME_SHOWN else text[:NAME_SHOWN - 4] + "...'"


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


def strip_prefix(keys: Iterable[str], prefix: str) -> dict[str, str]:
    """Map model keys (prefix removed) to file keys, for keys under ``prefix``."""
    return {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
