"""The command line's quantize and inspect: a float file to a pre-quantized one, and what a file holds."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable, Optional

import torch

from ..checkpoint.reader import FluxCheckpoint, flux_checkpoint
from ..checkpoint.stored import StoredKind, StoredLinear, linear_tensors, quantize_weight
from ..checkpoint.tensor_files import open_tensor_set, require_finite
from ..checkpoint.writer import file_metadata, save_flux_file
from ..errors import BnbFluxError
from ..families import TITLES
from ..flux import block_count, bfl_file_key, default_should_quantize
from ..spec import QuantSpec
from .lora_info import describe_lora_file, looks_like_lora

NOT_FLUX = ("not a FLUX diffusion model (no double_blocks.0.img_attn.norm / transformer_blocks.0.attn.norm_k "
            f"tensors); Load BnB Flux reads {TITLES} safetensors, with BFL/ComfyUI or diffusers key names")


def _open_file(path: str):
    if not os.path.isfile(path):
        raise BnbFluxError(f"{path}: no such file")
    return open_tensor_set(path)


def open_model(path: str) -> FluxCheckpoint:
    """A FLUX diffusion model file (a family in ``families.py``), or BnbFluxError with the reason Load BnB Flux
    would refuse it (checked on the header: names, shapes, dtypes, quantization states; ``read_checked`` reads the values)."""
    return _model_of(_open_file(path))


def _model_of(tensors) -> FluxCheckpoint:
    """:func:`open_model` on a tensor set already open (its header is read once); closes it when refused."""
    try:
        if looks_like_lora(tensors.keys()):
            raise BnbFluxError(f"{tensors.name}: a LoRA, not a diffusion model; apply it with Apply Control LoRA "
                               f"(models/loras), after Load BnB Flux")
        ckpt = flux_checkpoint(tensors)
    except BaseException:
        tensors.close()
        raise
    if not ckpt.is_flux:
        ckpt.close()
        raise BnbFluxError(f"{ckpt.name}: {NOT_FLUX}")
    names = set(ckpt.linear_names())
    expected = ckpt.family.expected_linears(block_count(names, "double_blocks"), block_count(names, "single_blocks"))
    missing = [n for n in expected if n not in names]
    if missing:
        ckpt.close()
        raise BnbFluxError(f"{ckpt.name}: tensor {missing[0]}.weight is missing; the file is not a complete "
                           f"{ckpt.family.title} model")
    return ckpt


def read_checked(ckpt: FluxCheckpoint, name: str) -> StoredLinear:
    """One Linear as stored, with the value checks Load BnB Flux makes (the reader checks quantization states
    and their scales; float weights and biases are checked here)."""
    stored = ckpt.read_linear(name)
    if stored.kind is StoredKind.FLOAT:
        require_finite(ckpt.name, f"{name}.weight", stored.weight)
    require_finite(ckpt.name, f"{name}.bias", stored.bias)
    return stored


def read_other_checked(ckpt: FluxCheckpoint, key: str) -> torch.Tensor:
    tensor = ckpt.read(key)
    require_finite(ckpt.name, key, tensor)
    return tensor


def quantize_file(src: str, dst: str, spec: QuantSpec, quantize_img_in: bool = False,
                  progress: Optional[Callable[[int], object]] = None, log: Callable[[str], None] = print,
                  device=None) -> dict:
    """Convert a FLUX file into a pre-quantized one, one Linear at a time.

    Full-precision Linears are quantized as Load BnB Flux would on load (same layers, same bytes).
    A pre-quantized input keeps its own quantization (the file wins, as in the loader): its layers are
    re-laid out (diffusers q/k/v fused by :func:`plan_rows`), not quantized again; its float Linears
    stay float. Only the diffusion model is written (an all-in-one file's text encoders and VAE are not).

    ``dst`` is written under a temporary name in its folder and renamed at the end: an error or Ctrl-C leaves
    no partial file, and an existing ``dst`` is replaced only by a complete one.
    """
    ckpt = open_model(src)
    try:
        tensors, meta = _quantized_tensors(ckpt, spec, quantize_img_in, progress, log, device)
    finally:
        ckpt.close()
    folder = os.path.dirname(os.path.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(dst)}.", suffix=".partial")
    os.close(fd)
    try:
        save_flux_file(partial, tensors, meta)
        os.replace(partial, dst)
    except Exception as e:  # disk full, file size limit, OUT is a folder...; safetensors raises its own type
        _remove(partial)
        raise BnbFluxError(f"{dst}: not written ({e}); a file already there is left as it was") from e
    except BaseException:  # Ctrl-C
        _remove(partial)
        raise
    return meta


def _remove(path: str):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _quantized_tensors(ckpt: FluxCheckpoint, spec: QuantSpec, quantize_img_in: bool, progress, log, device):
    pre = ckpt.is_prequantized
    if pre:
        log(f"{ckpt.name} is already quantized ({ckpt.describe_layout()}): its quantization is kept, "
            f"--quant {spec.quant_type} applies to nothing")
    names = ckpt.linear_names()
    bar = progress(len(names)) if progress is not None else None
    out: dict[str, torch.Tensor] = {}
    linears: dict[str, StoredLinear] = {}
    try:
        for name in names:
            stored = read_checked(ckpt, name)
            if (stored.kind is StoredKind.FLOAT and not pre
                    and default_should_quantize(name, stored.shape[1], spec, quantize_img_in, ckpt.family)):
                stored = quantize_weight(stored.weight, spec, stored.bias, device=device)
            linears[name] = stored
            out.update(linear_tensors(name, stored))
            del stored
            if bar is not None:
                bar.update(1)
        for key in ckpt.other_keys():
            out[bfl_file_key(key)] = read_other_checked(ckpt, key).contiguous()
    finally:
        if bar is not None and hasattr(bar, "close"):
            bar.close()  # also on an error, so the error starts a line of its own
    meta = file_metadata(linears, source=ckpt.name)
    if ckpt.skipped:
        log(f"not written: {len(ckpt.skipped)} tensors outside the diffusion model (text encoders, VAE, ...)")
    for note in ckpt.notes:
        log(f"note: {note}")
    return out, meta


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def inspect_file(path: str, verify: bool = False) -> str:
    """A description of a FLUX file (layout, scheme, layer counts, size, and what Load BnB Flux does with it) or
    of a LoRA (format, rank, layers, control or not, and how to apply it). BnbFluxError with the message the
    node would give when it refuses the file. ``verify``: also read every tensor's values, as loading does."""
    tensors = _open_file(path)
    if looks_like_lora(tensors.keys()):
        try:
            return describe_lora_file(path, tensors)
        finally:
            tensors.close()
    ckpt = _model_of(tensors)
    try:
        if verify:
            for name in ckpt.linear_names():
                read_checked(ckpt, name)
            for key in ckpt.other_keys():
                read_other_checked(ckpt, key)
        return _describe_model(ckpt, verify)
    finally:
        ckpt.close()


def _describe_model(ckpt: FluxCheckpoint, verified: bool) -> str:
    t = ckpt.tensors
    lines = [f"file: {ckpt.name} ({_mib(t.size_bytes)}{', ' + str(len(t.files)) + ' shards' if len(t.files) > 1 else ''})"]
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
    doubles = block_count(shapes, "double_blocks")
    singles = block_count(shapes, "single_blocks")
    variant = ckpt.family.variant(shapes)
    params = sum(o * i for o, i in shapes.values())
    if img_in:
        lines.append(f"model: {variant}, hidden {img_in[0]}, img_in {img_in[1]} inputs, {doubles} double + "
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
    if verified:
        lines.append("verified: every tensor read, all values finite, every quantization state readable")
    if ckpt.is_prequantized:
        lines.append("Load BnB Flux: uses the file's own quantization as stored (its quant_type and double_quant "
                     "inputs are not used); no quantization on load")
    else:
        lines.append("Load BnB Flux: quantizes the blocks and txt_in on load with its quant_type input; to skip that "
                     "at every start, convert once: python -m quant_expand.cli quantize IN OUT --quant nf4")
    return "\n".join(lines)
