"""bitsandbytes-backed Linear layers that a host's model management can move, offload and patch.

The layers are real ``bnb.nn.Linear4bit`` / ``bnb.nn.Linear8bitLt`` subclasses holding real
``Params4bit`` / ``Int8Params`` weights, with three differences that make them safe inside ComfyUI:

* ``weight.shape`` reports the logical ``[out_features, in_features]`` (bnb's packed 4-bit weight is
  ``[N*K/2, 1]``; ComfyUI reads ``img_in.weight.shape[1]`` to count control channels).
* ``forward`` dequantizes the stored bytes itself and runs the matmul in the activations' dtype, adding
  the lazy LoRA delta; bnb's own CPU forward is never called because it repacks the weight in place.
* device moves (``module.to``) carry the quantization state along without touching the packed bytes
  and without casting them; transient moves (offloaded weights) copy, never move, the state.
"""
from __future__ import annotations

import contextlib
import importlib
import copy
import math
from typing import Callable, Optional

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import torch.nn.functional as F

from . import kernels
from .spec import QuantSpec

_bnb_ops = torch.ops.bitsandbytes


class LogicalShapeMixin:
    """A bnb parameter whose Python-visible ``shape`` is the logical (dequantized) shape.

    Only Python reads of ``.shape`` change; kernels, ``nbytes`` and ``state_dict`` see the stored tensor
    (``detach()`` returns a plain tensor), so memory accounting and saving stay byte-true.
    """

    @property
    def shape(self):
        logical = self.__dict__.get("logical_shape")
        return logical if logical is not None else torch.Tensor.shape.__get__(self)


class LogicalParams4bit(LogicalShapeMixin, bnb.nn.Params4bit):
    pass


class LogicalInt8Params(LogicalShapeMixin, bnb.nn.Int8Params):
    pass


def _copy_param(param: torch.nn.Parameter, data: torch.Tensor) -> torch.nn.Parameter:
    """Same parameter class and attributes (whatever this bnb version keeps on it), new storage."""
    new = torch.Tensor._make_subclass(type(param), data, False)
    new.__dict__.update(param.__dict__)
    return new


def quant_state_to(quant_state, device: torch.device, dtype: Optional[torch.dtype] = None):
    """A copy of a bnb ``QuantState`` on ``device``: ``QuantState.to`` moves in place, and the
    state is shared by every ``Params4bit`` made from the same weight."""
    qs = copy.copy(quant_state)
    if qs.nested:
        qs.state2 = copy.copy(quant_state.state2)
    if dtype is not None:
        qs.dtype = dtype
    if qs.absmax.device != torch.device(device):
        qs.to(device)
    return qs


def _target_device(fn: Callable, like: torch.Tensor) -> torch.device:
    # nn.Module._apply only hands us an opaque function: read where it sends an empty tensor.
    return fn(torch.empty(0, dtype=like.dtype, device=like.device)).device


class _RunState:
    """What a layer's forward looked up for one placement (see ``QuantLinear._run_state``). Never copied
    with the layer: a copy (``copy.deepcopy`` of a model) looks its own tensors up again."""

    __slots__ = ("weight", "bias", "device", "dtype", "dequantize", "static_bias", "small_matmul", "merged")

    def __init__(self, weight, bias, device, dtype, dequantize, static_bias, small_matmul, merged):
        self.weight, self.bias, self.device, self.dtype = weight, bias, device, dtype
        self.dequantize, self.static_bias, self.small_matmul = dequantize, static_bias, small_matmul
        self.merged = merged

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (type(None), ())


class QuantLinear:
    """Mixin with the behaviour both quantized Linear kinds share.

    ``comfy_cast_weights``, ``weight_function`` and ``bias_function`` are the attributes ComfyUI's
    model management sets on its own ops (lowvram offload, weight hooks); they are honoured here.
    ``lora_delta`` is a :class:`quant_expand.lora.LazyLoraDelta` installed at sampling time.
    """

    comfy_cast_weights = False
    weight_function: list = []
    bias_function: list = []
    lora_delta = None
    reusable_lora_delta = None  # the last delta, kept while the model stays on its device (see comfy_adapter)

    # -- shapes -----------------------------------------------------------------------------
    @property
    def stored_in_features(self) -> int:
        raise NotImplementedError

    def _set_logical_shape(self):
        self.weight.logical_shape = torch.Size([self.out_features, self.in_features])

    # -- dequantization -----------------------------------------------------------------------
    def dequantize_stored(self, device=None, dtype=None) -> torch.Tensor:
        """The stored weight ``[out, stored_in]`` as floats on ``device`` in ``dtype`` (a new tensor)."""
        raise NotImplementedError

    def dequantize(self, device=None, dtype=None) -> torch.Tensor:
        """The logical weight ``[out, in_features]``; input columns beyond the stored ones are zero."""
        w = self.dequantize_stored(device, dtype)
        return _pad_columns(w, self.in_features)

    def _bias_for(self, device, dtype):
        bias = self.bias
        if bias is None:
            return None
        bias = bias.to(device=device, dtype=dtype)
        for f in self.bias_function:
            bias = f(bias)
        return bias

    # -- forward ----------------------------------------------------------------------------
    # A FLUX step calls ~350 of these layers; at 1024x1024 a layer's GPU work takes ~0.1-1 ms, so the
    # host side must stay well below that or the GPU waits for Python. Everything that depends only on
    # where the layer sits (plain tensors behind bnb's parameter subclass, bias in the compute dtype,
    # the dequantize call) is looked up once per (weight, bias, device, dtype) in ``_run_state``.

    def _run_state(self, device: torch.device, dtype: torch.dtype) -> "_RunState":
        params = self._parameters
        weight, bias = params["weight"], params.get("bias")
        run = self.__dict__.get("_run")
        if run is None or run.weight is not weight or run.bias is not bias or run.device != device or run.dtype != dtype:
            static_bias = (bias is not None and not self.bias_function and bias.device == device
                           and bias.dtype == dtype)
            dequantize, small_matmul, merged = self._kernels(device, dtype)
            # the fused few-token path adds the bias inside the kernel: only a bias already in place
            run = _RunState(weight, bias, device, dtype, dequantize, static_bias,
                            small_matmul if static_bias or bias is None else None, merged)
            self.__dict__["_run"] = run
        return run

    def _kernels(self, device: torch.device, dtype: torch.dtype) -> tuple[Callable, Optional[Callable], Optional[Callable]]:
        """``(dequantize, small_matmul, merged)`` for this placement: a no-argument function giving the
        stored weight ``[out, stored_in]`` on ``device`` in ``dtype``; ``f(x, bias)`` computing the layer on
        the stored bytes for a few tokens (or None); ``f(width, down, up, scale)`` giving the logical
        weight with a stacked low-rank delta added as it is dequantized (or None). This default works
        wherever the weight sits."""
        return (lambda: self.dequantize_stored(device, dtype)), None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device, dtype = x.device, x.dtype
        # prepared at load time (BnbModelPatcher): torch.compile then traces straight through, since
        # building it means looking into bnb's parameter subclass, which dynamo cannot trace
        streamed = self.__dict__.get("_stream")  # offloaded by a partial load: see quant_expand.streaming
        run = streamed.run_state(device, dtype) if streamed is not None else None
        if run is None:
            run = self._run_state(device, dtype)
        static_bias = run.static_bias
        bias = run.bias if static_bias else self._bias_for(device, dtype)
        delta = self.lora_delta
        if delta is not None and delta.bias_terms:
            bias = delta.bias_with(bias, device, dtype, cache=static_bias or bias is None)
        weight_fns = self.weight_function
        if delta is not None and delta.weight_fn is not None:
            weight_fns = [*weight_fns, delta.weight_fn]
        tokens = x.numel() // max(x.shape[-1], 1)
        if run.small_matmul is not None and tokens <= _SMALL_M and len(weight_fns) == 0:
            # FLUX's modulation layers see one token: bnb's fused 4-bit GEMV reads the packed bytes
            # (a quarter of bf16's traffic) instead of dequantizing a full weight for one row
            stored = self.stored_in_features
            y = run.small_matmul(x[..., :stored] if stored < x.shape[-1] else x, bias)
            if delta is None or not delta.terms:
                return y
            down, up, scale = delta.stacked(device, dtype)
            return _add_low_rank(y, x, down, up, scale)
        # (no bool() on the list: dynamo in torch 2.11 cannot trace that builtin and breaks the graph)
        merge = delta is not None and len(delta.terms) > 0 and delta.prefer_merged(tokens)
        if merge and run.merged is not None and len(weight_fns) == 0 and not torch.compiler.is_compiling():
            # dequantize and add the delta in one kernel (each tile gets its rank-R product before it is
            # written): no second pass over the weight; a traced graph takes bnb's ops and addmm_ below
            down, up, scale = delta.stacked(device, dtype)
            return F.linear(x, run.merged(self.in_features, down, up, scale), bias)
        w = run.dequantize()
        stored = w.shape[1]
        if len(weight_fns) > 0:
            w = _pad_columns(w, self.in_features)
            for f in weight_fns:
                w = f(w)
            stored = w.shape[1]
        if delta is None or not delta.terms:
            return _linear_prefix(x, w, bias, stored)
        down, up, scale = delta.stacked(device, dtype)
        if merge:
            # one GEMM-accumulate into the transient dequantized buffer; stored bytes never change
            w = _pad_columns(w, self.in_features)
            if isinstance(scale, float):
                w.addmm_(up, down, alpha=scale)
            else:
                w.addmm_(up * scale, down)
            return F.linear(x, w, bias)
        return _add_low_rank(_linear_prefix(x, w, bias, stored), x, down, up, scale)

    # -- streamed placement (quant_expand.streaming) ------------------------------------------
    def stream_sources(self) -> list[torch.Tensor]:
        """The host tensors a streamed placement copies to the GPU ahead of each use: the stored bytes
        and the per-block statistics (the small constant state stays on the device)."""
        raise NotImplementedError

    def stream_run_state(self, views: list[torch.Tensor], bias: Optional[torch.Tensor], device, dtype) -> "_RunState":
        """The run state on ``views`` (device copies of :meth:`stream_sources`, persistent, refilled
        before each use) with ``bias`` already on the device: the kernels a resident layer would run."""
        dequantize, small_matmul, merged = self._streamed_kernels(views, device, dtype)
        return _RunState(None, bias, device, dtype, dequantize, True, small_matmul, merged)

    # -- device moves -------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_run", None)  # holds the tensors of the old placement
        self.__dict__.pop("_stream", None)
        weight = self._parameters.get("weight")
        if weight is None or weight.device.type == "meta":
            return super()._apply(fn, recurse)
        # Hide the quantized weight from nn.Module._apply: it would cast the packed bytes with
        # float conversions and bnb's Params.to moves shared state in place or drops it (Int8 SCB).
        del self._parameters["weight"]
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight
        target = _target_device(fn, weight.data)
        if target != weight.device:
            self._parameters["weight"] = self._weight_on(target, non_blocking=False)
        return self

    def _weight_on(self, device, non_blocking=False):
        raise NotImplementedError

    def extra_repr(self) -> str:
        base = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.in_features != self.stored_in_features:
            base += f", stored_in_features={self.stored_in_features}"
        return base + f", quant={self.quant_spec().describe()}"


def _add_low_rank(y: torch.Tensor, x: torch.Tensor, down, up, scale) -> torch.Tensor:
    """``y + scale * (x @ down^T) @ up^T``, accumulated into ``y`` by the second GEMM (cuBLAS beta=1):
    no separate pass over ``y``. ``scale`` is a float (the GEMM's alpha) or a vector over the rank."""
    h = F.linear(x, down)
    uniform = isinstance(scale, float)
    if not uniform:
        h = h * scale
    y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), up.t(), alpha=scale if uniform else 1.0)
    return y


_SMALL_M = 4  # up to this many tokens bnb's fused 4-bit kernel always beats dequantize + GEMM
_KERNEL_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class _Cuda4bit:
    """bitsandbytes' own CUDA kernels for one 4-bit layer, called through its ctypes entry points.

    bnb's torch ops run each call through the dispatcher, a dynamo guard and Python argument checks:
    ~50 us of host time per op, two or three ops per layer and step, which is what kept the GPU waiting
    at 1024x1024 (bench/README.md). The calls here pass the very arguments bnb's CUDA backend passes to
    the very same kernels, so the results are bit-identical; under torch.compile the torch ops are used
    (dynamo traces those, not ctypes).
    """

    _lib = None
    use_triton = True  # quant_expand.kernels.Dequant4bit where it is verified (bench A/B switch)

    @classmethod
    def usable(cls, qs, gemm: bool = False) -> bool:
        if cls._lib is None:
            try:
                importlib.import_module("bitsandbytes.backends.cuda.ops")  # sets the ctypes signatures
                from bitsandbytes.cextension import lib

                for name in ("cdequantize_blockwise_fp32", "cdequantize_blockwise_bf16_nf4", "cgemm_4bit_bf16"):
                    getattr(lib, name)
                cls._lib = lib
            except Exception:  # no CUDA build of bnb here, or another layout of its internals
                cls._lib = False
        if not cls._lib or qs.dtype not in _KERNEL_DTYPES or qs.quant_type not in ("nf4", "fp4"):
            return False
        if qs.nested and (qs.state2.dtype != torch.float32 or qs.absmax.dtype != torch.uint8):
            return False
        return not gemm or not qs.nested or qs.state2.blocksize == 256

    def __init__(self, packed: torch.Tensor, qs):
        lib = self._lib
        dt = _KERNEL_DTYPES[qs.dtype]
        self.packed, self.qs = packed, qs
        self.index = packed.device.index
        self.numel = qs.shape[0] * qs.shape[1]
        self.dequant4 = getattr(lib, f"cdequantize_blockwise_{dt}_{qs.quant_type}")
        self.dequant8 = lib.cdequantize_blockwise_fp32
        self.gemm = getattr(lib, f"cgemm_4bit_{dt}")
        self.offset = qs.offset.to(device=packed.device, dtype=torch.float32) if qs.nested else None  # 0-dim, as bnb wants
        self.fused = None
        if self.use_triton:
            dev = packed.device
            if kernels.available() and kernels.Dequant4bit.supports(packed, qs, qs.dtype) and \
                    kernels.Dequant4bit.verified(qs, qs.dtype, dev):
                self.fused = kernels.Dequant4bit(packed, qs)

    def _device(self):
        return torch.cuda.device(self.index) if torch.cuda.current_device() != self.index else contextlib.nullcontext()

    def dequantize(self) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return _dequantize_4bit(self.packed, self.qs)
        qs = self.qs
        with self._device():
            if self.fused is not None:
                return self.fused.dequantize()
            stream = torch._C._cuda_getCurrentRawStream(self.index)
            absmax = qs.absmax
            if qs.nested:
                s2 = qs.state2
                nested = torch.empty(absmax.shape, dtype=torch.float32, device=absmax.device)
                self.dequant8(s2.code.data_ptr(), absmax.data_ptr(), s2.absmax.data_ptr(), nested.data_ptr(),
                              s2.blocksize, absmax.numel(), stream)
                nested += qs.offset
                absmax = nested
            w = torch.empty(qs.shape, dtype=qs.dtype, device=self.packed.device)
            self.dequant4(None, self.packed.data_ptr(), absmax.data_ptr(), w.data_ptr(), qs.blocksize, self.numel, stream)
        return w

    def matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        qs = self.qs
        nested = qs.nested
        if torch.compiler.is_compiling():
            return _bnb_ops.gemm_4bit.default(
                x, self.packed.view(-1, 1), qs.shape, qs.state2.absmax if nested else qs.absmax, qs.blocksize,
                qs.quant_type, bias=bias, absmax_8bit=qs.absmax if nested else None,
                absmax_code=qs.state2.code if nested else None, absmax_offset=self.offset)
        a = x.contiguous()
        n, k = qs.shape
        out = torch.empty((*a.shape[:-1], n), dtype=a.dtype, device=a.device)
        with self._device():
            self.gemm(a.data_ptr(), self.packed.data_ptr(),
                      (qs.state2.absmax if nested else qs.absmax).data_ptr(),
                      qs.absmax.data_ptr() if nested else None,
                      qs.state2.code.data_ptr() if nested else None,
                      self.offset.data_ptr() if nested else None,
                      out.data_ptr(), bias.data_ptr() if bias is not None else None,
                      a.numel() // k, n, k, qs.blocksize, 1 if qs.quant_type == "fp4" else 2,
                      torch._C._cuda_getCurrentRawStream(self.index))
        return out

    def merged(self, width: int, down: torch.Tensor, up: torch.Tensor, scale) -> torch.Tensor:
        with self._device():
            return self.fused.dequantize(width, down, up, scale)


def _dequantize_4bit(packed: torch.Tensor, qs) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit(packed, qs)``: the same kernels in the same order (so the
    same bits), without its per-call argument checks (``qs`` was checked when the layer was made)."""
    absmax = qs.absmax
    if qs.nested:
        s2 = qs.state2
        absmax = _bnb_ops.dequantize_blockwise.default(absmax, s2.absmax, s2.code, s2.blocksize, s2.dtype)
        absmax += qs.offset
        if absmax.dtype != torch.float32:
            absmax = absmax.float()
    return _bnb_ops.dequantize_4bit.default(packed, absmax, qs.blocksize, qs.quant_type, qs.shape, qs.dtype)


def _pad_columns(w: torch.Tensor, width: int) -> torch.Tensor:
    if w.shape[1] >= width:
        return w
    return F.pad(w, (0, width - w.shape[1]))


def _linear_prefix(x, w, bias, stored):
    # zero input columns contribute nothing: compute on the stored ones only
    if stored < x.shape[-1]:
        x = x[..., :stored]
    return F.linear(x, w, bias)


class QLinear4bit(QuantLinear, bnb.nn.Linear4bit):
    """NF4/FP4 ``Linear4bit`` with logical shapes, self-dequantizing forward and lazy LoRA."""

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], spec: QuantSpec,
                   quantize_device=None, store_device="cpu") -> "QLinear4bit":
        out_features, in_features = weight.shape
        compute_dtype = spec.compute_dtype or torch.float32
        with torch.device("meta"):
            layer = cls(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                        compress_statistics=spec.double_quant, quant_type=spec.quant_type)
        quantize_device = quantize_device or weight.device
        # absmax from float32 whatever the file's dtype: the scale is then as exact as the data allows
        w = weight.to(device=quantize_device, dtype=torch.float32)
        packed, qs = bnbf.quantize_4bit(w, blocksize=spec.blocksize, compress_statistics=spec.double_quant,
                                        quant_type=spec.quant_type, quant_storage=torch.uint8)
        del w
        qs.dtype = compute_dtype  # dequantize straight into the compute dtype
        layer._install(packed.to(store_device), quant_state_to(qs, store_device), bias, compute_dtype, store_device)
        return layer

    @classmethod
    def from_prequantized(cls, packed: torch.Tensor, quant_state, bias: Optional[torch.Tensor],
                          compute_dtype: torch.dtype, store_device="cpu") -> "QLinear4bit":
        out_features, in_features = quant_state.shape
        with torch.device("meta"):
            layer = cls(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                        compress_statistics=quant_state.nested, quant_type=quant_state.quant_type,
                        quant_storage=packed.dtype)
        qs = quant_state_to(quant_state, store_device, compute_dtype)
        layer._install(packed.to(store_device), qs, bias, compute_dtype, store_device)
        return layer

    def _install(self, packed, qs, bias, compute_dtype, store_device):
        self.weight = LogicalParams4bit(packed, requires_grad=False, quant_state=qs, blocksize=qs.blocksize,
                                        compress_statistics=qs.nested, quant_type=qs.quant_type,
                                        quant_storage=packed.dtype, module=self, bnb_quantized=True)
        self.quant_state = qs
        self._set_logical_shape()
        if bias is not None:
            self.bias = torch.nn.Parameter(bias.to(device=store_device, dtype=compute_dtype), requires_grad=False)

    @property
    def stored_in_features(self) -> int:
        return self.weight.quant_state.shape[1]

    def quant_spec(self) -> QuantSpec:
        qs = self.weight.quant_state
        return QuantSpec(qs.quant_type, qs.nested, qs.blocksize, qs.dtype)

    def dequantize_stored(self, device=None, dtype=None) -> torch.Tensor:
        param = self.weight
        qs = param.quant_state
        device = torch.device(device) if device is not None else param.device
        dtype = dtype or qs.dtype
        # bnb dequantizes into 16/32-bit floats only; anything else goes through float32
        kernel_dtype = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        if param.device != device or qs.dtype != kernel_dtype:
            qs = quant_state_to(qs, device, kernel_dtype)
        packed = param.data if param.device == device else param.data.to(device, non_blocking=True)
        w = _dequantize_4bit(packed, qs)
        return w if kernel_dtype == dtype else w.to(dtype)

    def _kernels(self, device, dtype):
        param = self.weight
        qs = param.quant_state
        if param.device != device or qs.dtype != dtype or qs.absmax.device != device:
            return super()._kernels(device, dtype)  # offloaded (lowvram) or another dtype: per call
        return self._kernels_on(param.data, qs, device, dtype)  # a plain tensor: no subclass dispatch

    def stream_sources(self):
        qs = self.weight.quant_state
        return [self.weight.data, qs.absmax] + ([qs.state2.absmax] if qs.nested else [])

    def _streamed_kernels(self, views, device, dtype):
        src = self.weight.quant_state
        qs = copy.copy(src)
        qs.dtype, qs.absmax, qs.code = dtype, views[1], src.code.to(device)
        if src.nested:
            qs.state2 = copy.copy(src.state2)
            qs.state2.absmax, qs.state2.code = views[2], src.state2.code.to(device)
            qs.offset = torch.as_tensor(src.offset).to(device)
        return self._kernels_on(views[0], qs, device, dtype)

    def _kernels_on(self, packed, qs, device, dtype):
        if device.type == "cuda" and _Cuda4bit.usable(qs):
            cuda = _Cuda4bit(packed, qs)
            # the fused LoRA epilogue runs tensor-core GEMMs: 16-bit compute dtypes only (epilogue_ok)
            merged = cuda.merged if cuda.fused is not None and \
                kernels.Dequant4bit.epilogue_ok(dtype, device, qs.blocksize) else None
            return cuda.dequantize, (cuda.matmul if _Cuda4bit.usable(qs, gemm=True) else None), merged
        return (lambda: _dequantize_4bit(packed, qs)), None, None

    def _weight_on(self, device, non_blocking=False):
        param = self.weight
        new = _copy_param(param, param.data.to(device, non_blocking=non_blocking))
        new.quant_state = quant_state_to(param.quant_state, device)
        new.module = self
        self.quant_state = new.quant_state
        return new


class QLinear8bit(QuantLinear, bnb.nn.Linear8bitLt):
    """LLM.int8 storage (``Int8Params``: int8 rows ``CB`` + per-row absmax ``SCB``), run as
    weight-only dequantize + matmul in the activations' dtype."""

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], spec: QuantSpec,
                   quantize_device=None, store_device="cpu") -> "QLinear8bit":
        quantize_device = quantize_device or weight.device
        w = weight.to(device=quantize_device, dtype=torch.float32)
        # bnb's CUDA kernel takes float16 only (as Int8Params quantizes); the same on CPU keeps the bytes
        # identical whichever device quantized the file
        cb, scb, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
        del w
        return cls.from_prequantized(cb, scb, bias, spec.compute_dtype or torch.float32, store_device)

    @classmethod
    def from_prequantized(cls, cb: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor],
                          compute_dtype: torch.dtype, store_device="cpu") -> "QLinear8bit":
        out_features, in_features = cb.shape
        with torch.device("meta"):
            layer = cls(in_features, out_features, bias=bias is not None, has_fp16_weights=False, threshold=0.0)
        cb = cb.to(store_device)
        param = LogicalInt8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb,
                                  SCB=scb.to(device=store_device, dtype=torch.float32))
        layer.weight = param
        layer.compute_dtype = compute_dtype
        layer._set_logical_shape()
        if bias is not None:
            layer.bias = torch.nn.Parameter(bias.to(device=store_device, dtype=compute_dtype), requires_grad=False)
        return layer

    @property
    def stored_in_features(self) -> int:
        return self.weight.data.shape[1]

    def quant_spec(self) -> QuantSpec:
        return QuantSpec("int8", compute_dtype=getattr(self, "compute_dtype", None))

    def dequantize_stored(self, device=None, dtype=None) -> torch.Tensor:
        param = self.weight
        device = torch.device(device) if device is not None else param.device
        dtype = dtype or getattr(self, "compute_dtype", None) or torch.float32
        cb = param.data.to(device, non_blocking=True)
        # SCB / 127 is exact for a power-of-two row scale; bnb's own dequant multiplies by a
        # rounded 1/127 and loses that exactness
        scale = (param.SCB.to(device, non_blocking=True) / 127.0).to(dtype)
        # int8 * float promotes to the float dtype inside one kernel: no separate int8 -> float copy
        return torch.mul(cb, scale[:, None])

    # How the GPU dequantizes: "promote" (torch.mul(int8, scale)), "cast" (cast, then scale in place) or
    # "triton" (quant_expand.kernels, one pass). All three give the same bits; bench/README.md says
    # which is fastest where. Without Triton "triton" falls back to "promote".
    cuda_dequant = "triton"

    def _kernels(self, device, dtype):
        param = self.weight
        if param.device != device or param.SCB.device != device:
            return super()._kernels(device, dtype)
        return self._kernels_on(param.data, param.SCB, device, dtype)

    def stream_sources(self):
        return [self.weight.data]

    def _streamed_kernels(self, views, device, dtype):
        return self._kernels_on(views[0], self.weight.SCB.to(device), device, dtype)

    def _kernels_on(self, cb, scb, device, dtype):
        scale = (scb / 127.0).to(dtype)  # as dequantize_stored computes it, kept
        rows = scale[:, None]
        mode = self.cuda_dequant if device.type == "cuda" else "promote"
        if mode == "triton" and cb.is_contiguous():
            if kernels.available():
                return (lambda: kernels.dequantize_int8_rows(cb, scale)), None, None
        if mode == "cast":
            return (lambda: cb.to(dtype).mul_(rows)), None, None
        return (lambda: torch.mul(cb, rows)), None, None

    def _weight_on(self, device, non_blocking=False):
        param = self.weight
        data = param.data.to(device, non_blocking=non_blocking)
        new = _copy_param(param, data)
        new.CB = data
        new.SCB = param.SCB.to(device, non_blocking=non_blocking)
        return new


def is_quantized_linear(module) -> bool:
    return isinstance(module, QuantLinear)


def quantized_linear_from_float(weight, bias, spec: QuantSpec, quantize_device=None, store_device="cpu"):
    cls = QLinear4bit if spec.is_4bit else QLinear8bit
    return cls.from_float(weight, bias, spec, quantize_device=quantize_device, store_device=store_device)


def statistics_finite(module) -> bool:
    """Whether a quantized layer's scales are finite: a NaN or inf weight makes its block's absmax (its
    row's SCB) NaN or inf, so this checks the weights at 1/64 (1/in_features) of the cost."""
    if isinstance(module, QLinear8bit):
        return bool(torch.isfinite(module.weight.SCB).all())
    qs = module.weight.quant_state
    if qs.nested:
        return bool(torch.isfinite(qs.state2.absmax).all()) and math.isfinite(float(qs.offset))
    return bool(torch.isfinite(qs.absmax).all())


def quantized_bytes(module) -> dict[str, torch.Tensor]:
    """Every tensor that holds a quantized layer's stored state (for byte-for-byte checks)."""
    param = module.weight
    out = {"weight": param.data}
    if isinstance(module, QLinear4bit):
        qs = param.quant_state
        out["absmax"] = qs.absmax
        out["code"] = qs.code
        if qs.nested:
            out["nested_absmax"] = qs.state2.absmax
            out["nested_code"] = qs.state2.code
            out["offset"] = torch.as_tensor(qs.offset)
    else:
        out["SCB"] = param.SCB
    return out


def dequantized_state_dict(root: torch.nn.Module, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The module's weights as plain tensors (quantized layers dequantized, zero padding included):
    what a full-precision model holding exactly the quantized values looks like."""
    out = {}
    quantized = {name: m for name, m in root.named_modules() if isinstance(m, QuantLinear)}
    for name, m in quantized.items():
        out[f"{name}.weight"] = m.dequantize(torch.device("cpu"), dtype)
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach().to("cpu", dtype)
    for name, p in root.named_parameters():
        owner = name.rpartition(".")[0]
        if owner in quantized:
            continue
        out[name] = p.detach().to("cpu", dtype)
    return out


def as_quant_linear(layer):
    """The pack's subclass for a plain ``bnb.nn.Linear4bit`` / ``Linear8bitLt`` (shared storage and state)."""
    if isinstance(layer, QuantLinear):
        return layer
    if isinstance(layer, bnb.nn.Linear4bit):
        cls, pcls = QLinear4bit, LogicalParams4bit
    elif isinstance(layer, bnb.nn.Linear8bitLt):
        cls, pcls = QLinear8bit, LogicalInt8Params
    else:
        raise TypeError(f"expected a bitsandbytes Linear4bit or Linear8bitLt, got {type(layer).__name__}")
    param = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit) and getattr(param, "quant_state", None) is None:
        raise ValueError("the Linear4bit is not quantized yet (move it to a device first)")
    new = copy.copy(layer)
    new.__class__ = cls
    new._parameters = dict(layer._parameters)
    weight = torch.Tensor._make_subclass(pcls, param.data, False)
    weight.__dict__.update(param.__dict__)
    new._parameters["weight"] = weight
    if cls is QLinear4bit:
        weight.module = new
    elif getattr(weight, "SCB", None) is None and getattr(layer.state, "SCB", None) is not None:
        weight.SCB = layer.state.SCB  # bnb moves SCB into module.state after its first forward
    new._set_logical_shape()
    return new


def expand_in_features(layer, in_features: int):
    """The same quantized layer with ``in_features`` logical inputs; the added input columns are exact zeros.

    Works for every attribute bnb or the host keeps on the layer (a shallow copy, no hand-written list):
    quant type, blocksize, double quant, quant storage and compute dtype (4-bit), has_fp16_weights and
    threshold (8-bit). The stored bytes are the original's own storage, untouched: the forward computes
    on the original columns and treats the new ones as zero, so no requantization error can arise (with
    double quant on, re-laying zero blocks would change the nested absmax). The original layer is kept as
    ``expanded_from``: restoring it is exact by construction.
    """
    layer = as_quant_linear(layer)
    base = unexpand(layer)
    if in_features < base.in_features:
        raise ValueError(f"cannot narrow a layer from {base.in_features} to {in_features} inputs")
    if in_features == base.in_features:
        return base
    new = copy.copy(base)
    new._parameters = dict(base._parameters)
    new._buffers = dict(base._buffers)
    new._modules = dict(base._modules)
    new.in_features = in_features
    new.__dict__.pop("_run", None)
    weight = _copy_param(base.weight, base.weight.data)  # same storage: the original bytes
    if isinstance(new, QLinear4bit):
        weight.module = new
    new._parameters["weight"] = weight
    new._set_logical_shape()
    new.lora_delta = None
    # a plain attribute, not a registered submodule: the original must stay out of state_dict/modules()
    object.__setattr__(new, "expanded_from", base)
    return new


def unexpand(layer):
    """The original layer an expanded one was made from (the layer itself if it was never expanded)."""
    return layer.__dict__.get("expanded_from") or layer


def quantized_digest(root: torch.nn.Module) -> str:
    """SHA-256 over the stored state of every quantized layer under ``root`` (names included): equal
    digests mean no quantized byte changed."""
    import hashlib

    h = hashlib.sha256()
    for name, m in sorted(root.named_modules(), key=lambda item: item[0]):
        if isinstance(m, QuantLinear):
            for key, t in sorted(quantized_bytes(m).items()):
                h.update(f"{name}.{key}".encode())
                h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
