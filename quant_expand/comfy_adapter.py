"""The only module that touches ComfyUI internals: ops class, ModelPatcher subclass and loader.

Imported by the pack's nodes inside a running ComfyUI (``comfy`` must be importable).
"""
from __future__ import annotations

import concurrent.futures
import copy
import logging
import time
import uuid
from typing import Optional

import torch

import comfy.lora
import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils
import comfy.weight_adapter as weight_adapter

from .formats import BnbFluxError, shown_name
from .layers import (QLinear4bit, QLinear8bit, QuantLinear, expand_in_features, is_quantized_linear,
                     quantized_linear_from_float, statistics_finite, unexpand)
from .prequantized import (FluxCheckpoint, StoredLinear, bfl_file_key,  # noqa: F401
                           default_should_quantize, file_metadata, linear_tensors, open_flux_checkpoint)
from .lora import LazyLoraDelta, LoraTerm, indexed_device
from .streaming import LayerStreamer, StreamedPlacement, StreamUnit, stream_unit_name
from .spec import QuantSpec

log = logging.getLogger("comfyui-bnb-flux")

class DeferredLinear(comfy.ops.manual_cast.Linear):
    """What FLUX's constructor gets for ``operations.Linear``: no storage until the loader streams the
    layer's tensors in, then either replaced by a quantized layer or given its full-precision weights."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        torch.nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.deferred_bias = bias
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        raise RuntimeError("DeferredLinear is loaded by quant_expand.comfy_adapter, not by load_state_dict")


class BnbFluxOps(comfy.ops.manual_cast):
    Linear = DeferredLinear


# -- loading ---------------------------------------------------------------------------------------

def _set_module(root: torch.nn.Module, name: str, module: torch.nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def resolve_compute_dtype(choice, parameters: int, model_config, load_device) -> torch.dtype:
    """``auto`` is ComfyUI's own choice of FLUX dtype for the load device (fp32 on a CPU, bf16 on an
    H100); quantized layers dequantize into it and activations run in it."""
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
    if image_model != "flux" or not ckpt.is_flux:
        found = f"a {image_model} model" if image_model else "no diffusion model ComfyUI recognises"
        raise BnbFluxError(f"{ckpt.name}: not a FLUX.1 diffusion model (found {found}); Load BnB Flux reads "
                           f"FLUX.1 dev/schnell safetensors with BFL or diffusers key names")
    return config, keys, stripped


def describe_source(ckpt: FluxCheckpoint) -> str:
    """One line on what the file holds, for the log and the node's output text."""
    if ckpt.scaled:
        return f"{ckpt.name}: {ckpt.describe_layout()}"
    if not ckpt.is_prequantized:
        return f"{ckpt.name}: full precision ({ckpt.describe_layout()})"
    s = ckpt.quant_summary()
    schemes = "; ".join(f"{n} x {k}" for k, n in s["schemes"].items())
    return f"{ckpt.name}: pre-quantized, {ckpt.describe_layout()}: {schemes}"


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


def _require_finite(file: str, key: str, tensor: torch.Tensor):
    if not bool(torch.isfinite(tensor).all()):
        raise BnbFluxError(f"{file}: tensor {key} holds NaN or inf values; the file is damaged: download it again")


def load_bnb_flux(unet_path: str, options: dict, disable_dynamic: bool = False, progress=None):
    """Build a quantized FLUX as a :class:`BnbModelPatcher`, quantizing tensor by tensor while streaming.

    ``options``: ``quant_type``, ``double_quant``, ``compute_dtype``, ``quantize_img_in`` (the node's inputs). The
    patcher always uses ComfyUI's non-dynamic loading (see :class:`BnbModelPatcher`), so
    ``disable_dynamic`` is accepted for ``cached_patcher_init`` and changes nothing.
    """
    ckpt = open_flux_checkpoint(unet_path)
    try:
        model_config, key_map, meta = detect_flux(ckpt)
    except BnbFluxError:
        ckpt.close()
        raise
    load_device = options.get("load_device") or mm.get_torch_device()
    offload_device = options.get("offload_device") or mm.unet_offload_device()
    parameters = comfy.utils.calculate_parameters(meta)
    compute_dtype = resolve_compute_dtype(options.get("compute_dtype", "auto"), parameters, model_config, load_device)
    spec = QuantSpec(options.get("quant_type", "nf4"), bool(options.get("double_quant", True)), 64, compute_dtype)
    # the file's own quantization wins: its float Linears stay float, its quantized ones are used as stored
    prequantized = ckpt.is_prequantized

    model_config.set_inference_dtype(compute_dtype, None, device=load_device)
    model_config.custom_operations = BnbFluxOps
    model = model_config.get_model({}, "")
    # ComfyUI's names for the logical keys (FLUX renames *_norm.scale to *_norm.weight)
    model_keys = model_config.process_unet_state_dict({k: k for k in key_map})
    logical_key = {mk: key_map[sk] for mk, sk in model_keys.items()}

    quantize_device = load_device if mm.is_device_cuda(load_device) else torch.device("cpu")
    dm = model.diffusion_model
    linears = [(n, m) for n, m in dm.named_modules() if isinstance(m, DeferredLinear)]
    bar = progress(len(linears) + 1) if progress is not None else None
    file_linears = set(ckpt.linear_names())
    loaded = set()
    quantized = 0
    schemes: dict[str, int] = {}

    missing = [name for name, _ in linears if name not in file_linears]
    if missing:
        ckpt.close()
        raise BnbFluxError(f"{ckpt.name}: tensor {missing[0]}.weight is missing; the file is not a complete FLUX.1 model")
    module_of = dict(linears)
    order = ckpt.read_order([name for name, _ in linears])  # the file's order: one pass over a cold disk
    timing: dict = {}
    started = time.perf_counter()
    # float weights are copied (to the GPU to be quantized, or into a kept float layer) before the
    # buffer they were read into is reused
    staging = None if prequantized else _staging_buffers(ckpt, order, pin=mm.is_device_cuda(quantize_device))
    reads = _read_ahead(ckpt, order, timing, staging)
    try:
        for name in order:
            lin = module_of[name]
            stored = next(reads)
            loaded.update({f"{name}.weight", f"{name}.bias"})
            if stored.shape != (lin.out_features, lin.in_features):
                raise BnbFluxError(f"{ckpt.name}: {name}.weight has shape {list(stored.shape)}, the detected model "
                                   f"expects {[lin.out_features, lin.in_features]}")
            if lin.deferred_bias and stored.bias is None:
                raise BnbFluxError(f"{ckpt.name}: tensor {name}.bias is missing; the file is not a complete FLUX.1 model")
            new = None
            if stored.kind == "4bit":
                new = QLinear4bit.from_prequantized(stored.packed, stored.quant_state,
                                                    _owned(stored.bias, offload_device, compute_dtype), compute_dtype,
                                                    offload_device)
            elif stored.kind == "int8":
                new = QLinear8bit.from_prequantized(stored.cb, stored.scb, _owned(stored.bias, offload_device, compute_dtype),
                                                    compute_dtype, offload_device)
            elif not prequantized and default_should_quantize(name, lin.in_features, spec,
                                                              bool(options.get("quantize_img_in", False))):
                new = quantized_linear_from_float(stored.weight, stored.bias, spec, quantize_device=quantize_device,
                                                  store_device=offload_device)
            if new is not None and not prequantized and not statistics_finite(new):
                # a NaN/inf weight makes its block's scale NaN/inf: checked on the scales, not the weights
                raise BnbFluxError(f"{ckpt.name}: tensor {name}.weight holds NaN or inf values (or, for int8, values "
                                   f"beyond float16's range); the file is damaged: download it again")
            if new is None:
                _require_finite(ckpt.name, f"{name}.weight", stored.weight)
            if stored.bias is not None:
                _require_finite(ckpt.name, f"{name}.bias", stored.bias)
            if new is not None:
                _set_module(dm, name, new)
                quantized += 1
                scheme = new.quant_spec().describe()
                schemes[scheme] = schemes.get(scheme, 0) + 1
            else:
                lin.weight = torch.nn.Parameter(_owned(stored.weight, offload_device, compute_dtype), requires_grad=False)
                if stored.bias is not None:
                    lin.bias = torch.nn.Parameter(_owned(stored.bias, offload_device, compute_dtype), requires_grad=False)
            del stored, new
            if bar is not None:
                bar.update(1)
    finally:
        reads.close()
        pinned = staging is not None and staging[0].is_pinned()
        del staging
        if pinned and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # hand the pinned staging memory back instead of caching it

    params = dict(dm.named_parameters())
    for key, src in logical_key.items():
        if key in loaded:
            continue
        current = params.get(key)
        if current is None:
            # as ComfyUI's UNETLoader, which loads such files and logs the keys it did not use
            log.warning("Load BnB Flux: %s: tensor %s is not part of a FLUX.1 model; ignored", ckpt.name, shown_name(src))
            continue
        tensor = ckpt.read(src)
        if tuple(tensor.shape) != tuple(current.shape):
            raise BnbFluxError(f"{ckpt.name}: tensor {shown_name(src)} has shape {list(tensor.shape)}, the detected model "
                               f"expects {list(current.shape)}; the file is damaged or not a FLUX.1 model of this size")
        if tensor.is_floating_point():
            _require_finite(ckpt.name, shown_name(src), tensor)
        comfy.utils.set_attr_param(model, f"diffusion_model.{key}", _owned(tensor, offload_device, compute_dtype))
    unloaded = [n for n, p in dm.named_parameters() if p is None or p.device.type == "meta"]
    if unloaded:
        raise BnbFluxError(f"{ckpt.name}: no tensors for {', '.join(unloaded[:5])}; the file is not a complete FLUX.1 model")
    if bar is not None:
        bar.update(1)
    ckpt.close()

    patcher = BnbModelPatcher(model, load_device=load_device, offload_device=offload_device)
    source = describe_source(ckpt)
    quant = "; ".join(f"{n} x {k}" if len(schemes) > 1 else k for k, n in schemes.items()) or "none"
    patcher.bnb_info = {
        "file": ckpt.name,
        "source": source,
        "prequantized": prequantized,
        "quant": quant,
        "compute_dtype": str(compute_dtype).replace("torch.", ""),
        "quantized_layers": quantized,
        "linear_layers": len(linears),
        "size_bytes": patcher.model_size(),
        "notes": list(ckpt.notes),
        # where loading spent its time: a load waiting on reads is disk-bound, else the quantizing is
        "load_timing": {"total_s": round(time.perf_counter() - started, 3),
                        **{k: round(v, 3) for k, v in timing.items()}},
    }
    if prequantized:
        log.info("Load BnB Flux: %s; quantized as stored (quant_type/double_quant inputs not used)", source)
    for note in ckpt.notes:
        log.info("Load BnB Flux: %s: %s", ckpt.name, note)
    log.info("Load BnB Flux: %s -> %s, %d of %d Linear layers quantized, compute %s, %.1f MiB, %.1f s "
             "(%.1f s waiting for the file)", ckpt.name, quant, quantized, len(linears), compute_dtype,
             patcher.model_size() / 2**20, patcher.bnb_info["load_timing"]["total_s"],
             timing.get("waiting_for_reads_s", 0.0))
    return patcher


def unmerged(patcher, key: str, current: torch.Tensor) -> torch.Tensor:
    """``current`` (the model's tensor at ``key``) without the patches another clone merged into it while
    loaded: ComfyUI keeps the original in the backup every clone shares (``ModelPatcher.backup``)."""
    backup = patcher.backup.get(key)
    # a backup of another shape belongs to a widened stand-in layer (its merges never touched ours)
    if backup is not None and backup.weight.shape == current.shape:
        return backup.weight
    return current


def bnb_flux_state_for_saving(patcher, progress=None) -> tuple[dict, dict]:
    """The tensors and metadata of a Load BnB Flux model as a pre-quantized file (Forge 4-bit / bnb int8
    layout, BFL names): the stored bytes as they are, nothing requantized.

    Reads the model as *this* patcher defines it: another clone of the same model may be loaded right now
    with its LoRA merged into biases/norms and a widened ``img_in`` swapped in; ComfyUI keeps the originals
    in the backups every clone shares (``ModelPatcher.backup``, ``object_patches_backup``)."""
    model = patcher.model
    config = getattr(model, "model_config", None)
    if getattr(model, "diffusion_model", None) is None or config is None or \
            config.unet_config.get("image_model") != "flux":
        raise BnbFluxError("Save BnB Flux saves FLUX.1 models; this model is not one")
    if patcher.patches or patcher.object_patches:
        raise BnbFluxError(f"Save BnB Flux saves the quantized model as loaded; this one has LoRA patches on "
                           f"{len(patcher.patches) + len(patcher.object_patches)} weights, which would need requantizing "
                           f"and are not saved: connect Save BnB Flux straight to Load BnB Flux (LoRAs stay "
                           f"separate files, applied lazily)")
    dm = patcher.get_model_object("diffusion_model")

    def original(key: str, current: torch.Tensor) -> torch.Tensor:
        return unmerged(patcher, f"diffusion_model.{key}", current).detach()

    linear_names = [n for n, m in dm.named_modules() if isinstance(m, torch.nn.Linear)]
    bar = progress(len(linear_names) + 1) if progress is not None else None
    linears: dict[str, StoredLinear] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name in linear_names:
        module = patcher.get_model_object(f"diffusion_model.{name}")
        bias = original(f"{name}.bias", module.bias) if module.bias is not None else None
        if isinstance(module, QLinear4bit):
            module = unexpand(module)
            stored = StoredLinear("4bit", packed=module.weight.data, quant_state=module.weight.quant_state, bias=bias)
        elif isinstance(module, QLinear8bit):
            module = unexpand(module)
            stored = StoredLinear("int8", cb=module.weight.data, scb=module.weight.SCB, bias=bias)
        else:
            stored = StoredLinear("float", weight=original(f"{name}.weight", module.weight), bias=bias)
        linears[name] = stored
        tensors.update(linear_tensors(name, stored))
        if bar is not None:
            bar.update(1)
    owners = set(linear_names)
    for key, param in dm.named_parameters():
        if key.rpartition(".")[0] in owners:
            continue
        tensors[bfl_file_key(key)] = original(key, param).to("cpu").contiguous()
    if not any(s.kind != "float" for s in linears.values()):
        raise BnbFluxError("Save BnB Flux: this model has no bitsandbytes layers (it did not come from Load BnB "
                           "Flux); load the file with Load BnB Flux, or convert it with "
                           "python -m quant_expand.cli quantize")
    if bar is not None:
        bar.update(1)
    info = getattr(patcher, "bnb_info", None) or {}
    return tensors, file_metadata(linears, source=info.get("file", ""))


def _patch_kind(v) -> Optional[str]:
    """The kind of one of ComfyUI's tuple patches (``("diff", (tensor, extra))``, ``("set", ...)``), or
    None for adapters and anything else. ``v[0]`` may be a tensor: comparing that with a string costs
    ~0.2 ms in torch, per key per change."""
    return v[0] if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) else None


def required_in_features(patch_list) -> Optional[int]:
    """The input width a key's patches ask for (a Control LoRA's ``reshape`` or a padded diff), if any."""
    width = None
    for _strength, v, _sm, offset, _fn in patch_list:
        if offset is not None:
            continue
        shape = None
        if isinstance(v, weight_adapter.LoRAAdapter) and v.weights[5] is not None:
            shape = v.weights[5]
        elif _patch_kind(v) == "diff" and len(v[1]) > 1 and v[1][1].get("pad_weight"):
            shape = v[1][0].shape
        if shape is not None and len(shape) == 2:
            width = max(width or 0, int(shape[1]))
    return width


def widened_linear(module: torch.nn.Linear, width: int, unpatched: Optional[dict] = None) -> torch.nn.Linear:
    """``module`` taking ``width`` inputs; ``unpatched``: its parameters by name without any clone's merged
    patches (see :func:`unmerged`), in place of its own."""
    if is_quantized_linear(module):
        return expand_in_features(module, width)
    unpatched = unpatched or {}
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    if "bias" in unpatched:
        new.bias = torch.nn.Parameter(unpatched["bias"].detach(), requires_grad=False)
    weight = unpatched.get("weight", module.weight).detach()
    new.in_features = width
    new.weight = torch.nn.Parameter(torch.nn.functional.pad(weight, (0, width - weight.shape[1])), requires_grad=False)
    return new


# -- patcher -------------------------------------------------------------------------------------

# Adapters whose effect is "weight + something independent of weight": they commute with LoRA terms,
# so they can run on the dequantized weight before the stacked low-rank update is added.
_ADDITIVE_ADAPTERS = (weight_adapter.LoHaAdapter, weight_adapter.LoKrAdapter)


def _plain_lora_term(patch, module, key) -> Optional[LoraTerm]:
    """A LoRA patch that is exactly ``strength * alpha/rank * up @ down`` (on optional qkv rows)."""
    strength, v, strength_model, offset, function = patch
    if strength_model != 1.0 or function is not None or not isinstance(v, weight_adapter.LoRAAdapter):
        return None
    up, down, alpha, mid, dora_scale, reshape = v.weights
    if mid is not None or dora_scale is not None or up.ndim != 2 or down.ndim != 2:
        return None
    if reshape is not None and list(reshape) != [module.out_features, module.in_features]:
        return None
    row_offset = 0
    if offset is not None:
        dim, start, length = offset
        if dim != 0 or up.shape[0] != length:
            return None
        row_offset = start
    elif up.shape[0] != module.out_features:
        return None
    if down.shape[1] > module.in_features:
        return None
    scale = strength * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
    return LoraTerm(down=down, up=up, scale=scale, row_offset=row_offset)


def _is_additive(patch) -> bool:
    strength, v, strength_model, offset, function = patch
    if strength_model != 1.0 or function is not None or offset is not None:
        return False
    if isinstance(v, _ADDITIVE_ADAPTERS):
        return True
    return _patch_kind(v) == "diff" and len(v[1]) == 1


def _full_weight_fn(patches, key):
    def apply(weight: torch.Tensor) -> torch.Tensor:
        # ComfyUI merges in float32 (comfy.lora.calculate_weight); do the same, per forward
        return comfy.lora.calculate_weight(patches, weight.float(), key).to(weight.dtype)
    return apply


def lazy_bias_terms(patches: list, out_features: int):
    """Additive bias diffs (a Control LoRA's ``lora_B.bias``) as ``(full-length tensor, strength)``,
    or None when some patch on the bias is anything else (then ComfyUI merges it as usual)."""
    terms = []
    for strength, v, strength_model, offset, function in patches:
        if strength_model != 1.0 or function is not None or not (_patch_kind(v) == "diff" and len(v[1]) == 1):
            return None
        diff = v[1][0]
        if offset is not None:
            dim, start, length = offset
            if dim != 0 or diff.shape[0] != length:
                return None
            diff = torch.nn.functional.pad(diff, (start, out_features - start - length))
        if diff.shape != (out_features,):
            return None
        terms.append((diff, strength))
    return terms


def build_lazy_delta(patches: list, module: QuantLinear, key: str, bias_terms=()) -> LazyLoraDelta:
    terms, others = [], []
    for p in patches:
        term = _plain_lora_term(p, module, key)
        if term is not None:
            terms.append(term)
        else:
            others.append(p)
    if others and not all(_is_additive(p) for p in others):
        # order matters for set/OFT/DoRA/GLoRA...: apply every patch in ComfyUI's order
        return LazyLoraDelta(module.out_features, module.in_features, weight_fn=_full_weight_fn(patches, key),
                             bias_terms=bias_terms)
    return LazyLoraDelta(module.out_features, module.in_features, terms,
                         weight_fn=_full_weight_fn(others, key) if others else None, bias_terms=bias_terms)


BYPASS_LORA_INJECTIONS = "bypass_lora"  # the injection key of comfy.sd.load_bypass_lora_for_models
BYPASS_LORA_REFUSAL = (
    "Load LoRA (Bypass) (LoraLoaderBypass / LoraLoaderBypassModelOnly, ComfyUI's experimental bypass mode in "
    "comfy/weight_adapter/bypass.py) does not work on a Load BnB Flux model: its forward hooks skip this "
    "model's patcher, which already adds LoRAs at sampling time without touching the quantized weights. Use "
    "LoraLoaderModelOnly (or LoraLoader) or Apply Control LoRA instead: they apply the same LoRA, Control "
    "LoRAs included.")
MERGED_ATTR = "bnb_flux_merged_patches"
STREAMER_ATTR = "bnb_flux_streamer"  # the model's LayerStreamer while it is partially loaded
STREAM_SLOTS = 3  # units in flight: the one computing and two copying ahead


def _offloaded(module) -> bool:
    """ComfyUI's partial load marks each module it leaves on the offload device this way
    (``ModelPatcher.load`` sets ``prev_comfy_cast_weights``; loading it fully removes it)."""
    return hasattr(module, "prev_comfy_cast_weights")


def _set_plain(module, name: str, value):
    object.__setattr__(module, name, value)


class MergeSignature:
    """What a key's merged weight depends on: the patch objects (by identity, held so that no other
    object can take their id), their strengths (except for ``set``, which ignores strength), and the
    rest of each patch tuple."""

    def __init__(self, patch_list):
        self.objects = [(v, function) for _s, v, _sm, _o, function in patch_list]
        self.key = tuple((id(v), None if _patch_kind(v) == "set" else strength, strength_model, offset, id(function))
                         for strength, v, strength_model, offset, function in patch_list)

    def __eq__(self, other):
        return isinstance(other, MergeSignature) and self.key == other.key


class BnbModelPatcher(comfy.model_patcher.ModelPatcher):
    """ModelPatcher for models holding :class:`QuantLinear` layers.

    LoRA patches on quantized weights are never merged: ``patch_weight_to_device`` leaves them alone
    and ``load`` installs a :class:`LazyLoraDelta` on each layer (moved and stacked on the load
    device), removed again by ``unpatch_model``. Other keys (biases, norms, unquantized layers) follow
    ComfyUI's usual merge-with-backup path.

    It is a non-dynamic patcher even when ComfyUI runs with dynamic VRAM: dynamic VRAM streams and
    requantizes raw weight tensors, which would rewrite quantized bytes; a 4-bit FLUX is small enough
    to load whole or partially the classic way.

    It refuses ComfyUI's experimental bypass mode (``LoraLoaderBypass``, ``comfy/weight_adapter/bypass.py``):
    that wraps each adapted module's ``forward`` in a hook adding ``B(Ax)``, which the lazy deltas already do
    (merged or not, per layer and token count) under this patcher's memory budget, Set LoRA Scale and
    Control LoRA widening; the hooks see none of those (a Control LoRA's img_in is never widened).
    """

    def _quantized_module(self, key: str, param_name: str = "weight"):
        module_name, _, param = key.rpartition(".")
        if param != param_name:
            return None
        try:
            module = comfy.utils.get_attr(self.model, module_name)
        except AttributeError:
            return None
        return module if is_quantized_linear(module) else None

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False, return_weight=False, force_cast=False):
        module = self._quantized_module(key)
        if module is None:
            bias_owner = self._quantized_module(key, "bias")
            if (bias_owner is not None and not return_weight and key in self.patches
                    and lazy_bias_terms(self.patches[key], bias_owner.out_features) is not None):
                return None  # added by the layer's lazy delta at run time (re-scaling costs nothing)
            return super().patch_weight_to_device(key, device_to=device_to, inplace_update=inplace_update,
                                                  return_weight=return_weight, force_cast=force_cast)
        if return_weight:  # a full-precision view for savers/merges; the stored bytes stay as they are
            weight = module.dequantize(device_to, torch.float32)
            if key in self.patches:
                weight = comfy.lora.calculate_weight(self.patches[key], weight, key)
            return weight
        return None

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        img_in = "diffusion_model.img_in.weight"
        if (img_in in patches and required_in_features(self.patches.get(img_in, []))
                and required_in_features([(strength_patch, patches[img_in], strength_model, None, None)])):
            # ComfyUI's LoRA loaders call this too: a second Control LoRA from them is caught here
            raise BnbFluxError("this model already has a Control LoRA, and the LoRA being added is one too: two "
                               "Control LoRAs would both claim the control channels of img_in; use one per model")
        keys = super().add_patches(patches, strength_patch, strength_model)
        self.widen_for_patches()
        return keys

    def set_injections(self, key, injections):
        # comfy.sd.load_bypass_lora_for_models hides LoRAs in hooks this patcher never sees (img_in unwidened)
        if key == BYPASS_LORA_INJECTIONS:
            raise BnbFluxError(BYPASS_LORA_REFUSAL)
        super().set_injections(key, injections)

    def widen_for_patches(self):
        """A patch that widens a Linear's inputs (a Control LoRA's ``img_in``) gets a widened layer as an
        object patch of this clone: quantized layers keep their bytes (``expand_in_features``), plain ones
        get a zero-padded copy. ComfyUI's own path pads the weight at merge time instead, which fails when
        the layer is offloaded (lowvram) and cannot work on packed 4-bit bytes."""
        for key, patch_list in self.patches.items():
            width = required_in_features(patch_list)
            if width is None or not key.endswith(".weight"):
                continue
            name = key[: -len(".weight")]
            current = self.get_model_object(name)
            if isinstance(current, torch.nn.Linear) and width > current.in_features:
                # while another clone is loaded, ComfyUI has merged its patches into a plain layer's weight
                # and bias (ModelPatcher.patch_weight_to_device): widen the originals
                unpatched = {p: unmerged(self, f"{name}.{p}", getattr(current, p)) for p in ("weight", "bias")
                             if getattr(current, p, None) is not None}
                self.add_object_patch(name, widened_linear(current, width, unpatched))

    def _compute_dtype(self):
        return self.model.manual_cast_dtype or self.model.get_dtype()

    def _quantized_modules(self) -> list:
        return [(n, m) for n, m in self.model.named_modules() if is_quantized_linear(m)]

    def install_lazy_deltas(self, device=None, modules=None, bias_terms_of=None):
        """Give every quantized layer the delta of this patcher's patches (or none). ``bias_terms_of``:
        :func:`lazy_bias_terms` by layer name where the caller already worked them out."""
        device = indexed_device(device or self.load_device)
        dtype = self._compute_dtype()
        with self.use_ejected():
            for name, module in (modules if modules is not None else self._quantized_modules()):
                key = f"{name}.weight"
                if module.weight_function:
                    # ComfyUI's lowvram path put a merge-per-forward patch here; the lazy delta replaces it
                    module.weight_function = [f for f in module.weight_function
                                              if not isinstance(f, comfy.model_patcher.LowVramPatch)]
                if bias_terms_of is not None and name in bias_terms_of:
                    bias_terms = bias_terms_of[name]
                else:
                    bias_terms = lazy_bias_terms(self.patches.get(f"{name}.bias", []), module.out_features)
                if bias_terms and module.bias_function:
                    module.bias_function = [f for f in module.bias_function
                                            if not isinstance(f, comfy.model_patcher.LowVramPatch)]
                patches = self.patches.get(key)
                if not patches and not bias_terms:
                    _set_plain(module, "lora_delta", None)
                    _set_plain(module, "reusable_lora_delta", None)
                    self._prepare_run(module, device, dtype)
                    continue
                delta = build_lazy_delta(patches or [], module, key, bias_terms or ())
                # same LoRA tensors, new strengths: nothing is re-uploaded or re-stacked
                delta.adopt_stack(module.lora_delta or getattr(module, "reusable_lora_delta", None))
                if not _offloaded(module):  # an offloaded layer's factors stream with it (_start_streaming)
                    delta.prepare(device, dtype)
                _set_plain(module, "lora_delta", delta)
                _set_plain(module, "reusable_lora_delta", None)
                self._prepare_run(module, device, dtype)

    @staticmethod
    def _prepare_run(module, device, dtype):
        """Look up now what the layer's forward needs on ``device`` (so a torch.compile'd model traces
        straight through it), and the bias + delta sum its delta will add (``device`` indexed)."""
        run = module._run_state(device, dtype)
        delta = module.lora_delta
        if delta is not None and delta.bias_terms and (run.static_bias or run.bias is None):
            delta.bias_with(run.bias, device, dtype)

    def clear_lazy_deltas(self, keep_for_reuse=False, modules=None):
        """Remove every layer's delta; ``keep_for_reuse`` (the model stays where it is) lets the next
        install take over the stacked device tensors of the same LoRAs."""
        for _, module in (modules if modules is not None else self._quantized_modules()):
            # plain attributes: nn.Module.__setattr__'s checks cost more than the rest of a swap
            _set_plain(module, "reusable_lora_delta", module.lora_delta if keep_for_reuse else None)
            _set_plain(module, "lora_delta", None)

    # -- memory: what ComfyUI budgets, and the layers that do not fit ----------------------------------
    # ComfyUI sizes a model by its state dict; the lazy deltas' stacked LoRA factors and bias deltas live
    # outside it (a rank-128 Control LoRA adds a fifth to NF4 FLUX), and so do the streaming slots. Each is
    # counted here, so ComfyUI never plans a load that cannot fit.

    def lora_bytes(self) -> int:
        """Device bytes of every quantized layer's lazy delta under this patcher's patches (stacked LoRA
        factors in the compute dtype, bias deltas)."""
        cached = getattr(self, "_lora_bytes", None)
        if cached is not None and cached[0] == self.patches_uuid:
            return cached[1]
        total = sum(self._layer_lora_bytes(name, module) for name, module in self._quantized_modules())
        self._lora_bytes = (self.patches_uuid, total)
        return total

    def _layer_lora_bytes(self, name: str, module) -> int:
        itemsize = self._compute_dtype().itemsize
        total = 0
        for patch in self.patches.get(f"{name}.weight", []):
            term = _plain_lora_term(patch, module, f"{name}.weight")
            if term is not None:
                total += term.rank * (module.in_features + module.out_features) * itemsize
        if f"{name}.bias" in self.patches:
            total += module.out_features * itemsize
        return total

    def model_size(self):
        # not ModelPatcher.size: clone() hands the parent's model_size() to the child's constructor, which
        # would count the parent's LoRA factors again; the state dict's bytes are the model's, shared
        base = getattr(self.model, "bnb_flux_state_dict_bytes", None)
        if base is None:
            base = comfy.model_management.module_size(self.model)
            self.model.bnb_flux_state_dict_bytes = base
        return base + self.lora_bytes()

    def memory_required(self, input_shape):
        # on top of ComfyUI's activation estimate: one layer's weight dequantized into the compute dtype
        # (and, merged with a LoRA, written by the kernel's epilogue) exists during that layer's GEMM
        itemsize = self._compute_dtype().itemsize
        largest = max((m.out_features * m.in_features for _, m in self._quantized_modules()), default=0)
        return super().memory_required(input_shape) + 2 * largest * itemsize

    def _load_list(self, *args, **kwargs):
        """ComfyUI's list of modules to place, with a quantized layer's size including its LoRA factors and
        no offload cost: streamed, it needs none of ComfyUI's cast buffers (its slots are reserved apart)."""
        out = []
        unloading = getattr(self, "_unloading", False)
        for entry in super()._load_list(*args, **kwargs):
            *criteria, module_mem, name, module, params = entry
            if is_quantized_linear(module):
                module_mem += self._layer_lora_bytes(name, module)
                if len(criteria) == 1:  # the non-dynamic sort key: the module's offload cost
                    criteria = [0]
                entry = (*criteria, module_mem, name, module, params)
            elif unloading:
                continue  # unquantized modules stay resident (see _keep_unquantized_resident)
            out.append(entry)
        return out

    def _streaming_reserve(self) -> int:
        """What a partial load needs besides the layers ComfyUI places: the streaming slots (the largest
        units of quantized layers, with their LoRA factors) and the unquantized modules kept resident."""
        units: dict[str, int] = {}
        unquantized = 0
        for name, module in self.model.diffusion_model.named_modules():
            if is_quantized_linear(module):
                unit = stream_unit_name(name)
                units[unit] = units.get(unit, 0) + sum(t.nbytes for t in module.stream_sources()) + \
                    self._layer_lora_bytes(f"diffusion_model.{name}", module)
            elif not any(True for _ in module.children()):
                unquantized += sum(p.nbytes for p in module.parameters(recurse=False))
        largest = sorted(units.values(), reverse=True)[:STREAM_SLOTS]
        return sum(largest) + unquantized

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        setattr(self.model, MERGED_ATTR, None)
        self._stop_streaming()
        partial = not full_load and 0 < lowvram_model_memory < self.model_size()
        if partial:  # leave room for what ComfyUI's plan does not see (see _streaming_reserve)
            lowvram_model_memory = max(1, lowvram_model_memory - self._streaming_reserve())
        super().load(device_to, lowvram_model_memory=lowvram_model_memory,
                     force_patch_weights=force_patch_weights, full_load=full_load)
        self._after_placement(device_to)

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        if self._can_swap_patches_in_place(device_to, force_patch_weights):
            self.swap_patches_in_place(device_to)
            return 0
        setattr(self.model, MERGED_ATTR, None)
        out = super().partially_load(device_to, extra_memory=extra_memory, force_patch_weights=force_patch_weights)
        if getattr(self.model, STREAMER_ATTR, None) is None:  # paths on which ComfyUI did not call load()
            self.install_lazy_deltas(device_to)
            if self.model.model_lowvram:
                self._start_streaming(device_to)
        return out

    def _after_placement(self, device_to):
        """After ComfyUI placed the modules: unquantized ones it offloaded made resident, lazy deltas,
        the offloaded quantized layers streamed."""
        device_to = device_to or self.load_device
        if self.model.model_lowvram:
            self.model.model_loaded_weight_memory += self._keep_unquantized_resident(device_to)
        self.install_lazy_deltas(device_to)
        self._start_streaming(device_to)
        if not self.model.model_lowvram or getattr(self.model, STREAMER_ATTR, None) is not None:
            self._record_merges()

    def _keep_unquantized_resident(self, device_to) -> int:
        """Load the unquantized modules ComfyUI offloaded (img_in, embedders, final layer, norms: a few
        percent of a quantized FLUX) the way its ``ModelPatcher.load`` loads a module that fits (0.33:
        wipe the lowvram state, merge the patches, move it): ComfyUI's offloaded arithmetic, merging LoRAs
        per forward, would give other numbers than the same layer resident. Returns the bytes moved."""
        moved = 0
        for name, module in self.model.named_modules():
            if is_quantized_linear(module) or not _offloaded(module):
                continue
            params = dict(module.named_parameters(recurse=False))
            comfy.model_patcher.wipe_lowvram_weight(module)
            for param in params:
                key = f"{name}.{param}" if name else param
                self.unpin_weight(key)
                self.patch_weight_to_device(key, device_to=device_to)
            module.comfy_patched_weights = True
            module.to(device_to)
            moved += sum(p.nbytes for p in module.parameters(recurse=False))
        return moved

    def pin_weight_to_device(self, key):
        module = self._quantized_module(key)
        if module is None:
            return super().pin_weight_to_device(key)
        # model_management.pin_memory takes plain tensors only: pin the packed bytes in place (no second
        # host copy), under ComfyUI's accounting; unpin_weight undoes it on the same storage
        if comfy.model_management.pin_memory(module.weight.data):
            self.pinned.add(key)

    def _start_streaming(self, device):
        """A :class:`LayerStreamer` for the quantized layers ComfyUI left offloaded; its device bytes are
        counted in the model's loaded memory until :meth:`_stop_streaming`."""
        offloaded = [(n, m) for n, m in self._quantized_modules() if _offloaded(m)]
        if not offloaded:
            return
        device = indexed_device(device)
        dtype = self._compute_dtype()
        units, members = {}, {}
        for name, module in offloaded:
            own = module.stream_sources()
            delta = module.lora_delta
            lora = list(delta.host_stack(dtype)) if delta is not None and delta.terms else []
            unit = stream_unit_name(name)
            units.setdefault(unit, []).extend(own + lora)
            members.setdefault(unit, []).append((module, len(own), len(lora)))
        mm = comfy.model_management
        streamer = LayerStreamer(device, [StreamUnit(u, srcs) for u, srcs in units.items()], slots=STREAM_SLOTS,
                                 pin=mm.pin_memory, unpin=mm.unpin_memory, pinned_copies=mm.MAX_PINNED_MEMORY > 0)
        resident = 0
        for index, (unit, layers) in enumerate(members.items()):
            views = streamer.views(index)
            at = 0
            for module, n_own, n_lora in layers:
                own, lora, at = views[at:at + n_own], views[at + n_own:at + n_own + n_lora], at + n_own + n_lora
                bias = module.bias.detach().to(device=device, dtype=dtype) if module.bias is not None else None
                resident += bias.nbytes if bias is not None else 0
                delta = module.lora_delta
                if lora:
                    delta.use_stack(device, dtype, *lora)
                run = module.stream_run_state(own, bias, device, dtype)
                module.__dict__["_stream"] = StreamedPlacement(streamer, index, run, device, dtype)
                if delta is not None and delta.bias_terms:
                    delta.bias_with(bias, device, dtype)
                    resident += module.out_features * dtype.itemsize
        streamer.layout = self._stream_layout(offloaded)
        streamer.counted_bytes = streamer.device_bytes + resident
        self.model.model_loaded_weight_memory += streamer.counted_bytes
        setattr(self.model, STREAMER_ATTR, streamer)
        log.info("Load BnB Flux: %d quantized layers in %d units stream from %s memory through %d slots of "
                 "%.0f MiB", len(offloaded), len(units), "pinned" if not streamer.pageable_bytes else "partly pageable",
                 streamer.slots, streamer.slot_bytes / 2**20)

    def _stream_layout(self, offloaded) -> tuple:
        """What the streamed bytes depend on under this patcher's patches: the layers and the LoRA tensors
        their deltas stack (by identity); a strength change keeps it, another LoRA does not."""
        return tuple((name, build_lazy_delta(self.patches.get(f"{name}.weight") or [], module,
                                             f"{name}.weight")._layout()) for name, module in offloaded)

    def _stop_streaming(self):
        streamer = getattr(self.model, STREAMER_ATTR, None)
        if streamer is None:
            return
        for _, module in self._quantized_modules():
            if module.__dict__.pop("_stream", None) is not None:
                for delta in (module.lora_delta, module.reusable_lora_delta):
                    if delta is not None:  # its stack is views into the slots: not to be adopted later
                        delta.drop_stack()
        streamer.close()
        setattr(self.model, STREAMER_ATTR, None)
        self.model.model_loaded_weight_memory = max(0, self.model.model_loaded_weight_memory - streamer.counted_bytes)

    def swap_patches_in_place(self, device_to):
        """Another clone's LoRAs (or strengths) are on the fully loaded model. ComfyUI would unpatch it by
        moving the whole model to the offload device and reloading it; quantized weights hold no merged
        state, so undoing the few merges ComfyUI made (norm sets, unquantized layers) and swapping object
        patches and lazy deltas where the model is gives the same model state at a fraction of the cost."""
        with self.use_ejected(skip_and_inject_on_exit_only=True):
            quantized = self._quantized_modules()
            self.clear_lazy_deltas(keep_for_reuse=True, modules=quantized)
            # a merge whose patches are the very same (a Control LoRA's norm sets after a strength change:
            # a "set" ignores strength) stays as it is; only the others are undone and redone
            merged = getattr(self.model, MERGED_ATTR, None) or {}
            keep = {key for key, sig in merged.items()
                    if key in self.backup and key in self.patches and MergeSignature(self.patches[key]) == sig}
            lazy, bias_terms_of = self._lazy_keys(quantized)
            # layers the previous clone's or this clone's object patches replace: their weights are undone
            # and backed up the usual way (a backup belongs to the module it was taken from)
            replaced = tuple(f"{k}." for k in (*self.object_patches_backup, *self.object_patches))
            for key, bk in list(self.backup.items()):  # as unpatch_model, onto the device the model is on
                if key in keep:
                    continue
                if bk.inplace_update:
                    comfy.utils.copy_to_param(self.model, key, bk.weight)
                elif (key in self.patches and key not in lazy and not self.weight_inplace_update
                      and not key.startswith(replaced)):
                    # merged again below from the original, which stays backed up: put the backup itself
                    # in place (patch_weight_to_device copies it to the device as it merges) instead of a
                    # copy to the device now and a copy back into a new backup there
                    comfy.utils.set_attr_param(self.model, key, bk.weight)
                    continue
                else:
                    comfy.utils.set_attr_param(self.model, key, bk.weight.to(device_to))
                del self.backup[key]
            restored = dict(self.object_patches_backup)
            for key, old in restored.items():
                comfy.utils.set_attr(self.model, key, old)
            self.object_patches_backup.clear()
            for key, obj in self.object_patches.items():
                self.object_patches_backup[key] = comfy.utils.set_attr(self.model, key, obj)
                if isinstance(obj, torch.nn.Module):
                    obj.to(device_to)
            for key in self.patches:
                if key not in keep and key not in lazy:
                    self.patch_weight_to_device(key, device_to=device_to)
            # object patches swapped above may have replaced quantized layers (a widened img_in)
            self.install_lazy_deltas(device_to, modules=self._after_object_patches(quantized, restored),
                                     bias_terms_of=bias_terms_of)
            self.model.current_weight_patches_uuid = self.patches_uuid
            self._record_merges()

    def _after_object_patches(self, quantized: list, restored: dict) -> list:
        """The (name, module) pairs of quantized layers once the previous clone's object patches were put
        back (``restored``: their originals) and this patcher's went in (a widened img_in replaces a
        layer): ``quantized``, taken before, brought up to date without a second walk over the model's
        ~1000 modules."""
        names = dict(quantized)
        for patches in (restored, self.object_patches):
            for key, obj in patches.items():
                if not isinstance(obj, torch.nn.Module):
                    continue
                if next(obj.children(), None) is not None:  # a container may hold quantized layers: walk
                    return self._quantized_modules()
                if is_quantized_linear(obj):
                    names[key] = obj
                else:
                    names.pop(key, None)
        return list(names.items())

    def _lazy_keys(self, modules) -> tuple[set, dict]:
        """Patch keys that the lazy deltas carry (quantized weights, their additive bias diffs): nothing
        to merge, and asking ``patch_weight_to_device`` costs a module lookup per key. Also the layers'
        :func:`lazy_bias_terms` by name, for :meth:`install_lazy_deltas` to reuse."""
        keys, bias_terms_of = set(), {}
        for name, module in modules:
            keys.add(f"{name}.weight")
            bias_key = f"{name}.bias"
            terms = lazy_bias_terms(self.patches.get(bias_key, []), module.out_features)
            bias_terms_of[name] = terms
            if bias_key in self.patches and terms is not None:
                keys.add(bias_key)
        return keys, bias_terms_of

    def _record_merges(self):
        """Remember which patches are merged into which weights now (see :meth:`swap_patches_in_place`)."""
        setattr(self.model, MERGED_ATTR, {key: MergeSignature(self.patches[key]) for key in self.backup
                                          if key in self.patches})

    def _can_swap_patches_in_place(self, device_to, force_patch_weights) -> bool:
        m = self.model
        if not (m.current_weight_patches_uuid is not None and m.current_weight_patches_uuid != self.patches_uuid
                and not force_patch_weights and m.model_loaded_weight_memory > 0
                and not self.weight_wrapper_patches and not self.hook_patches and m.device == device_to):
            return False
        if not m.model_lowvram:
            return True
        # partially loaded: in place only while the streamed bytes stay the same (a strength change);
        # every unquantized module is resident then (_keep_unquantized_resident)
        streamer = getattr(m, STREAMER_ATTR, None)
        if streamer is None:
            return False
        offloaded = [(n, mod) for n, mod in self._quantized_modules() if _offloaded(mod)]
        return self._stream_layout(offloaded) == streamer.layout

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        setattr(self.model, MERGED_ATTR, None)
        self._stop_streaming()
        self._unloading = True  # quantized layers only: see _load_list
        try:
            out = super().partially_unload(device_to, memory_to_free=memory_to_free, force_patch_weights=force_patch_weights)
        finally:
            self._unloading = False
        self.install_lazy_deltas(self.load_device)
        self._start_streaming(self.load_device)
        return out

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:  # before the object patches (a widened img_in) are taken out of the model
            self._stop_streaming()
            self.clear_lazy_deltas(keep_for_reuse=device_to is None)
            setattr(self.model, MERGED_ATTR, None)
        super().unpatch_model(device_to, unpatch_weights)


# -- Apply Control LoRA / Set LoRA Scale ---------------------------------------------------------

APPLIED_LORAS = "bnb_flux_applied_loras"


class AppliedLoras:
    """Which LoRAs a model had applied by Apply Control LoRA, by file name: their patch objects
    (identified by identity inside ``ModelPatcher.patches``) and current strength. A patcher
    attachment, copied on clone, so each branch of a graph keeps its own record."""

    def __init__(self, entries=None):
        self.entries: dict[str, dict] = dict(entries or {})

    def on_model_patcher_clone(self):
        return AppliedLoras({k: dict(v) for k, v in self.entries.items()})

    @staticmethod
    def of(patcher) -> "AppliedLoras":
        return patcher.get_attachment(APPLIED_LORAS) or AppliedLoras()


def is_linear_layer(module) -> bool:
    """A Linear of any op class ComfyUI builds FLUX with: ``comfy.ops.mixed_precision_ops.Linear`` (scaled
    fp8, ``comfy_quant`` files) is a plain ``nn.Module`` with a weight and in/out features, not an
    ``nn.Linear``."""
    return isinstance(module, torch.nn.Linear) or (
        isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
        and "weight" in getattr(module, "_parameters", {}))


def linear_shapes(patcher) -> dict[str, tuple[int, int]]:
    """BFL name -> (out, in) of every Linear of the diffusion model as this clone will run it
    (a widened img_in counts with its new width)."""
    dm = patcher.get_model_object("diffusion_model")
    shapes = {}
    for name, m in dm.named_modules():
        if is_linear_layer(m):
            current = patcher.get_model_object(f"diffusion_model.{name}")
            shapes[name] = (current.out_features, current.in_features)
    for key, patch_list in patcher.patches.items():  # widening queued on a stock patcher (ComfyUI's reshape)
        width = required_in_features(patch_list)
        name = key[len("diffusion_model."):-len(".weight")] if key.startswith("diffusion_model.") else None
        if width and name in shapes and width > shapes[name][1]:
            shapes[name] = (shapes[name][0], width)
    return shapes


def lora_patches(parsed, shapes: dict[str, tuple[int, int]]) -> dict:
    """ComfyUI patches for a parsed LoRA: LoRA adapters (``lora_A`` zero-padded to the layer's logical
    width; ``reshape`` where the LoRA widens the layer), bias diffs, and norm ``set`` patches."""
    patches = {}
    for layer in parsed.layers:
        out_features, in_features = shapes[layer.module]
        width = parsed.widened.get(layer.module, in_features)
        down = layer.down
        if down.shape[1] < width:
            down = torch.nn.functional.pad(down, (0, width - down.shape[1]))
        reshape = [out_features, width] if layer.module in parsed.widened else None
        key = f"diffusion_model.{layer.module}.weight"
        rows = layer.up.shape[0]
        offset = None if (layer.row_offset == 0 and rows == out_features) else (0, layer.row_offset, rows)
        patches[key if offset is None else (key, offset)] = weight_adapter.LoRAAdapter(
            set(), (layer.up, down, layer.alpha, None, None, reshape))
        if layer.bias is not None:
            bkey = f"diffusion_model.{layer.module}.bias"
            patches[bkey if offset is None else (bkey, offset)] = ("diff", (layer.bias,))
    for module, bias in getattr(parsed, "bias_diffs", {}).items():
        patches[f"diffusion_model.{module}.bias"] = ("diff", (bias,))
    for key, value in parsed.norm_sets.items():
        model_key = key[: -len(".scale")] + ".weight" if key.endswith("_norm.scale") else key
        patches[f"diffusion_model.{model_key}"] = ("set", (value,))
    return patches


def apply_lora(model, parsed, strength: float, lora_name: str):
    """A clone of ``model`` with the LoRA's patches at ``strength`` (0 included: the widening and the
    norm sets are part of the model's shape, unlike ComfyUI's LoraLoader which skips at 0)."""
    applied = AppliedLoras.of(model)
    if lora_name in applied.entries:
        raise BnbFluxError(f"{lora_name}: already applied to this model; use Set LoRA Scale to change its "
                           f"strength instead of applying it twice")
    if parsed.is_control:
        other = [n for n, e in applied.entries.items() if e["control"]]
        if other:
            raise BnbFluxError(f"{lora_name}: a Control LoRA ({other[0]}) is already applied; two Control LoRAs "
                               f"would both claim the control channels of img_in: use one per model")
        # one applied by ComfyUI's own LoRA loaders leaves no record here, only its widening patch on img_in
        if required_in_features(model.patches.get("diffusion_model.img_in.weight", [])):
            raise BnbFluxError(f"{lora_name}: the model already has a Control LoRA (applied by a LoRA loader node "
                               f"upstream); two Control LoRAs would both claim the control channels of img_in: "
                               f"use one per model")
    shapes = linear_shapes(model)
    patches = lora_patches(parsed, shapes)
    m = model.clone()
    accepted = set(m.add_patches(patches, strength))
    missing = [k if isinstance(k, str) else k[0] for k in patches if k not in accepted]
    if missing:
        raise BnbFluxError(f"{lora_name}: the model has no {missing[0].removeprefix('diffusion_model.')} "
                           f"({len(missing)} layer(s) not found); is this LoRA for FLUX.1?")
    record = AppliedLoras.of(m).on_model_patcher_clone()
    record.entries[lora_name] = {"strength": strength, "patch_ids": {id(v) for v in patches.values()},
                                 "control": parsed.is_control, "layers": len(parsed.layers)}
    m.set_attachments(APPLIED_LORAS, record)
    return m


def set_lora_scale(model, lora_name: str, strength: float):
    """A clone whose patches of ``lora_name`` carry ``strength``: nothing is reloaded or requantized;
    the next load re-stacks the lazy deltas with the new number."""
    applied = AppliedLoras.of(model)
    entry = applied.entries.get(lora_name)
    if entry is None:
        names = ", ".join(sorted(applied.entries)) or "none"
        raise BnbFluxError(f"{lora_name}: not applied to this model (applied by Apply Control LoRA upstream: "
                           f"{names}); pick one of those or add an Apply Control LoRA node for it")
    m = model.clone()
    ids = entry["patch_ids"]
    for key, plist in m.patches.items():
        if any(id(p[1]) in ids for p in plist):
            m.patches[key] = [(strength,) + p[1:] if id(p[1]) in ids else p for p in plist]
    m.patches_uuid = uuid.uuid4()
    record = applied.on_model_patcher_clone()
    record.entries[lora_name]["strength"] = strength
    m.set_attachments(APPLIED_LORAS, record)
    return m
