"""Load BnB Flux: a FLUX file to a BnbModelPatcher, quantized layer by layer while the file streams in."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from typing import Optional

import comfy.lora
import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils
import torch

from ..checkpoint.reader import FluxCheckpoint, open_flux_checkpoint
from ..checkpoint.stored import layer_from_stored
from ..checkpoint.tensor_files import require_finite
from ..errors import BnbFluxError, shown_name
from ..families import FLUX1, TITLES
from ..flux import default_should_quantize
from ..layers import (
    quantized_linear_from_float,
    statistics_finite,
)
from ..spec import QuantSpec
from .ops import BnbFluxOps, DeferredLinear
from .patcher import BnbModelPatcher
from .report import LoadReport, file_quantization

log = logging.getLogger("comfyui-bnb-flux")


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """How Load BnB Flux quantizes a full-precision file (a pre-quantized one keeps its own scheme)."""

    quant_type: str = "nf4"  # nf4, fp4 or int8
    double_quant: bool = True  # 4-bit only: quantize the per-block scales too
    compute_dtype: object = "auto"  # auto, bfloat16, float16, float32 or a torch.dtype
    quantize_img_in: bool = False
    blocksize: int = 64  # 4-bit only
    load_device: Optional[torch.device] = None  # None: ComfyUI's torch device
    offload_device: Optional[torch.device] = None  # None: ComfyUI's unet offload device


def _set_module(root: torch.nn.Module, name: str, module: torch.nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def resolve_compute_dtype(choice, parameters: int, model_config, load_device) -> torch.dtype:
    """``auto`` is ComfyUI's own choice of FLUX dtype for the load device (fp32 on a CPU, bf16 on a
    recent GPU); quantized layers dequantize into it and activations run in it."""
    if isinstance(choice, torch.dtype):
        return choice
    if choice in (None, "auto"):
        dtype = mm.unet_dtype(load_device, model_params=parameters,
                              supported_dtypes=model_config.supported_inference_dtypes)
        return dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[choice]


def detect_flux(ckpt: FluxCheckpoint):
    """Model config from the file's logical shapes (a packed 4-bit weight counts as ``[out, in]``: detection
    on packed shapes finds nonsense sizes); nothing is read or quantized yet."""
    meta = ckpt.meta_state_dict()
    prefix = comfy.model_detection.unet_prefix_from_state_dict(meta)
    keys = {k[len(prefix):]: k for k in meta if k.startswith(prefix)}
    if not keys:  # as comfy.sd.load_diffusion_model_state_dict: no prefix means a bare diffusion model
        keys = {k: k for k in meta}
    stripped = {k: meta[v] for k, v in keys.items()}
    config = comfy.model_detection.model_config_from_unet(stripped, "")
    image_model = config.unet_config.get("image_model") if config is not None else None
    if not ckpt.is_flux or image_model != ckpt.family.comfy_model:
        found = f"a {image_model} model" if image_model else "no diffusion model ComfyUI recognises"
        raise BnbFluxError(f"{ckpt.name}: not a FLUX diffusion model Load BnB Flux reads (found {found}); it reads "
                           f"{TITLES} safetensors, with BFL/ComfyUI or diffusers key names")
    return config, keys, stripped


def describe_source(ckpt: FluxCheckpoint) -> str:
    """One line on what the file holds, for the log and the node's output text (the family named where
    it is not FLUX.1)."""
    name = ckpt.name if ckpt.family is FLUX1 else f"{ckpt.name} ({ckpt.family.variant(ckpt.linear_names())})"
    if ckpt.scaled:
        return f"{name}: {ckpt.describe_layout()}"
    if not ckpt.is_prequantized:
        return f"{name}: full precision ({ckpt.describe_layout()})"
    s = ckpt.quant_summary()
    schemes = "; ".join(f"{n} x {k}" for k, n in s["schemes"].items())
    return f"{name}: pre-quantized, {ckpt.describe_layout()}: {schemes}"


def _owned(t: Optional[torch.Tensor], device, dtype) -> Optional[torch.Tensor]:
    """``t`` on ``device`` in ``dtype``, in memory of its own: a tensor read from a safetensors file can
    point into the file's buffer at any byte offset, and CPU matmul kernels round differently with the
    operand's alignment, so identical weights would not give identical outputs."""
    if t is None:
        return None
    out = t.to(device=device, dtype=dtype)
    return out.clone() if out.data_ptr() == t.data_ptr() else out


def _staging_buffers(ckpt, names, pin: bool) -> Optional[list]:
    """Two reusable buffers for the float weights the loader quantizes (the reader fills one while the
    other is copied to the GPU): no fresh pages to fault in per layer, and pinned ones copy to the GPU
    at full speed. None when nothing is read as float."""
    size = ckpt.staging_bytes(names)
    if not size:
        return None
    try:
        return [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
    except RuntimeError:  # pinning refused (a limit on locked memory): plain memory still helps
        return [torch.empty(size, dtype=torch.uint8) for _ in range(2)]


def _read_ahead(ckpt, names: list, timing: Optional[dict] = None, staging: Optional[list] = None):
    """``ckpt.read_linear`` of each name in turn, the next one read on a thread while the caller
    quantizes this one (file reads release the GIL): loading takes about as long as reading the file.
    At most two layers are in memory at once. ``timing`` gets the seconds spent reading (on the thread)
    and waiting for reads (the caller): which side holds a load up. With ``staging`` (two buffers) layer
    ``i`` is read into buffer ``i % 2``: the read of ``i + 2`` starts only when the caller asks for
    ``i + 1``, so the caller must be done with layer ``i``'s weight (copied it) by then."""

    def read(i):
        t = time.perf_counter()
        out = ckpt.read_linear(names[i], staging[i % 2] if staging else None)
        if timing is not None:
            timing["reading_s"] = timing.get("reading_s", 0.0) + time.perf_counter() - t
        return out

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bnb-flux-read")
    try:
        pending = pool.submit(read, 0) if names else None
        for i in range(len(names)):
            current = pending
            pending = pool.submit(read, i + 1) if i + 1 < len(names) else None
            t = time.perf_counter()
            stored = current.result()
            if timing is not None:
                timing["waiting_for_reads_s"] = timing.get("waiting_for_reads_s", 0.0) + time.perf_counter() - t
            yield stored
            current = stored = None
    finally:
        if pending is not None:
            pending.cancel()
        pool.shutdown(wait=True)


class _LinearLoad:
    """Every Linear of the file into the model built for it, in the file's order: a quantized layer as
    stored, a float one quantized on ``quantize_device`` (or kept float where FLUX keeps it), with the
    checks a damaged file fails. Counts what it did for the load report."""

    def __init__(self, ckpt: FluxCheckpoint, dm: torch.nn.Module, spec: QuantSpec, options: LoadOptions,
                 quantize_device: torch.device, offload_device: torch.device):
        self.ckpt, self.dm, self.spec = ckpt, dm, spec
        self.quantize_img_in = bool(options.quantize_img_in)
        self.quantize_device, self.offload_device = quantize_device, offload_device
        # the file's own quantization wins: its float Linears stay float, its quantized ones are used as stored
        self.prequantized = ckpt.is_prequantized
        self.keys: set[str] = set()  # the model keys loaded here (weights and biases)
        self.quantized = 0
        self.schemes: dict[str, int] = {}
        self.timing: dict = {}

    def run(self, linears: list, bar=None):
        in_file = set(self.ckpt.linear_names())
        missing = [name for name, _ in linears if name not in in_file]
        if missing:
            raise BnbFluxError(f"{self.ckpt.name}: tensor {missing[0]}.weight is missing; the file is not a "
                               f"complete {self.ckpt.family.title} model")
        module_of = dict(linears)
        order = self.ckpt.read_order(list(module_of))  # the file's order: one pass over a cold disk
        # float weights are copied (to the GPU to be quantized, or into a kept float layer) before the
        # buffer they were read into is reused
        staging = None if self.prequantized else _staging_buffers(
            self.ckpt, order, pin=mm.is_device_cuda(self.quantize_device))
        reads = _read_ahead(self.ckpt, order, self.timing, staging)
        try:
            for name in order:
                self._one(name, module_of[name], next(reads))
                if bar is not None:
                    bar.update(1)
        finally:
            reads.close()
            pinned = staging is not None and staging[0].is_pinned()
            del staging
            if pinned and hasattr(torch._C, "_host_emptyCache"):
                torch._C._host_emptyCache()  # hand the pinned staging memory back instead of caching it

    def _one(self, name: str, lin: DeferredLinear, stored):
        file, dtype = self.ckpt.name, self.spec.compute_dtype
        self.keys.update({f"{name}.weight", f"{name}.bias"})
        if stored.shape != (lin.out_features, lin.in_features):
            raise BnbFluxError(f"{file}: {name}.weight has shape {list(stored.shape)}, the detected model "
                               f"expects {[lin.out_features, lin.in_features]}")
        if lin.deferred_bias and stored.bias is None:
            raise BnbFluxError(f"{file}: tensor {name}.bias is missing; the file is not a complete "
                               f"{self.ckpt.family.title} model")
        new = layer_from_stored(stored, _owned(stored.bias, self.offload_device, dtype), dtype, self.offload_device)
        if new is None and not self.prequantized and default_should_quantize(
                name, lin.in_features, self.spec, self.quantize_img_in, self.ckpt.family):
            new = quantized_linear_from_float(stored.weight, stored.bias, self.spec,
                                              quantize_device=self.quantize_device, store_device=self.offload_device)
            if not statistics_finite(new):
                # a NaN/inf weight makes its block's scale NaN/inf: checked on the scales, not the weights
                raise BnbFluxError(f"{file}: tensor {name}.weight holds NaN or inf values (or, for int8, values "
                                   f"beyond float16's range); the file is damaged: download it again")
        if new is None:
            require_finite(file, f"{name}.weight", stored.weight)
        require_finite(file, f"{name}.bias", stored.bias)
        if new is not None:
            _set_module(self.dm, name, new)
            self.quantized += 1
            scheme = new.quant_spec().describe()
            self.schemes[scheme] = self.schemes.get(scheme, 0) + 1
            return
        lin.weight = torch.nn.Parameter(_owned(stored.weight, self.offload_device, dtype), requires_grad=False)
        if stored.bias is not None:
            lin.bias = torch.nn.Parameter(_owned(stored.bias, self.offload_device, dtype), requires_grad=False)


def _load_other_tensors(ckpt: FluxCheckpoint, model, logical_key: dict[str, str], loaded: set[str],
                        device: torch.device, dtype: torch.dtype):
    """Every model tensor that is no Linear's (norm scales, embedder tensors) from the file; ``logical_key``:
    ComfyUI's model key -> the file's logical key."""
    params = dict(model.diffusion_model.named_parameters())
    for key, src in logical_key.items():
        if key in loaded:
            continue
        current = params.get(key)
        if current is None:
            # as ComfyUI's UNETLoader, which loads such files and logs the keys it did not use
            log.warning("Load BnB Flux: %s: tensor %s is not part of a %s model; ignored", ckpt.name,
                        shown_name(src), ckpt.family.title)
            continue
        tensor = ckpt.read(src)
        if tuple(tensor.shape) != tuple(current.shape):
            raise BnbFluxError(f"{ckpt.name}: tensor {shown_name(src)} has shape {list(tensor.shape)}, the detected "
                               f"model expects {list(current.shape)}; the file is damaged or not a "
                               f"{ckpt.family.title} model of this size")
        if tensor.is_floating_point():
            require_finite(ckpt.name, shown_name(src), tensor)
        comfy.utils.set_attr_param(model, f"diffusion_model.{key}", _owned(tensor, device, dtype))
    unloaded = [n for n, p in model.diffusion_model.named_parameters() if p is None or p.device.type == "meta"]
    if unloaded:
        raise BnbFluxError(f"{ckpt.name}: no tensors for {', '.join(unloaded[:5])}; the file is not a complete "
                           f"{ckpt.family.title} model")


def load_bnb_flux(unet_path: str, options: LoadOptions = LoadOptions(), disable_dynamic: bool = False,
                  progress=None):
    """Build a quantized FLUX as a :class:`BnbModelPatcher`, quantizing tensor by tensor while streaming;
    its :class:`LoadReport` is attached (``report.load_report(patcher)``). The patcher always uses
    ComfyUI's non-dynamic loading (see :class:`BnbModelPatcher`), so ``disable_dynamic`` is accepted for
    ``cached_patcher_init`` and changes nothing.
    """
    ckpt = open_flux_checkpoint(unet_path)
    try:
        model_config, key_map, meta = detect_flux(ckpt)
        load_device = options.load_device or mm.get_torch_device()
        offload_device = options.offload_device or mm.unet_offload_device()
        parameters = comfy.utils.calculate_parameters(meta)
        compute_dtype = resolve_compute_dtype(options.compute_dtype, parameters, model_config, load_device)
        spec = QuantSpec(options.quant_type, bool(options.double_quant), options.blocksize, compute_dtype)
        model_config.set_inference_dtype(compute_dtype, None, device=load_device)
        model_config.custom_operations = BnbFluxOps
        model = model_config.get_model({}, "")
        # ComfyUI's names for the logical keys (FLUX renames *_norm.scale to *_norm.weight)
        model_keys = model_config.process_unet_state_dict({k: k for k in key_map})
        logical_key = {mk: key_map[sk] for mk, sk in model_keys.items()}
        quantize_device = load_device if mm.is_device_cuda(load_device) else torch.device("cpu")
        linears = [(n, m) for n, m in model.diffusion_model.named_modules() if isinstance(m, DeferredLinear)]
        bar = progress(len(linears) + 1) if progress is not None else None
        started = time.perf_counter()
        layers = _LinearLoad(ckpt, model.diffusion_model, spec, options, quantize_device, offload_device)
        layers.run(linears, bar)
        _load_other_tensors(ckpt, model, logical_key, layers.keys, offload_device, compute_dtype)
        stored = file_quantization(ckpt.tensors.keys()) if layers.prequantized else None
        if bar is not None:
            bar.update(1)
    finally:
        ckpt.close()

    patcher = BnbModelPatcher(model, load_device=load_device, offload_device=offload_device)
    source = describe_source(ckpt)
    schemes = layers.schemes
    quant = "; ".join(f"{n} x {k}" if len(schemes) > 1 else k for k, n in schemes.items()) or "none"
    report = LoadReport(
        file=ckpt.name, source=source, prequantized=layers.prequantized, quant=quant,
        compute_dtype=str(compute_dtype).replace("torch.", ""), quantized_layers=layers.quantized,
        linear_layers=len(linears), size_bytes=patcher.model_size(), notes=tuple(ckpt.notes), stored=stored,
        load_timing={"total_s": round(time.perf_counter() - started, 3),
                     **{k: round(v, 3) for k, v in layers.timing.items()}})
    report.attach_to(patcher)
    if layers.prequantized:
        log.info("Load BnB Flux: %s; quantized as stored (quant_type/double_quant inputs not used)", source)
    for note in ckpt.notes:
        log.info("Load BnB Flux: %s: %s", ckpt.name, note)
    log.info("Load BnB Flux: %s -> %s, %d of %d Linear layers quantized, compute %s, %.1f MiB, %.1f s "
             "(%.1f s waiting for the file)", ckpt.name, quant, layers.quantized, len(linears), compute_dtype,
             patcher.model_size() / 2**20, report.load_timing["total_s"],
             layers.timing.get("waiting_for_reads_s", 0.0))
    return patcher
