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

import copy
import math
from typing import Callable, Optional

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import torch.nn.functional as F

from .backends import triton_dequant as kernels
from .backends.bnb_cuda import Cuda4bit, dequantize_4bit_unchecked
from .params import (
    LogicalInt8Params,
    LogicalParams4bit,
    copy_param,
    quant_state_to,
    target_device,
)
from .spec import QuantSpec
from .tuning import TUNING


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
    ``lora_delta`` is a :class:`quant_expand.lora.delta.LazyLoraDelta` installed at sampling time.
    """

    comfy_cast_weights = False
    weight_function: list = []
    bias_function: list = []
    lora_delta = None
    reusable_lora_delta = None  # the last delta, kept while the model stays on its device (see comfyui/patcher.py)

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
    # A FLUX step calls hundreds of these layers, each a short piece of GPU work, so the host side must
    # stay well below it or the GPU waits for Python. Everything that depends only on
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
        target = target_device(fn, weight.data)
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
        packed, qs = quantize_weight_bytes(weight, spec, quantize_device)
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
        w = dequantize_4bit_unchecked(packed, qs)
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
        if device.type == "cuda" and Cuda4bit.usable(qs):
            cuda = Cuda4bit(packed, qs)
            # the fused LoRA epilogue runs tensor-core GEMMs: 16-bit compute dtypes only (epilogue_ok)
            merged = cuda.merged if cuda.fused is not None and \
                kernels.Dequant4bit.epilogue_ok(dtype, device, qs.blocksize) else None
            return cuda.dequantize, (cuda.matmul if Cuda4bit.usable(qs, gemm=True) else None), merged
        return (lambda: dequantize_4bit_unchecked(packed, qs)), None, None

    def _weight_on(self, device, non_blocking=False):
        param = self.weight
        new = copy_param(param, param.data.to(device, non_blocking=non_blocking))
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
        cb, scb = quantize_weight_bytes(weight, spec, quantize_device)
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

    # How the GPU dequantizes is TUNING.int8_dequant (quant_expand/tuning.py); without Triton "triton"
    # falls back to "promote".

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
        mode = TUNING.int8_dequant if device.type == "cuda" else "promote"
        if mode == "triton" and cb.is_contiguous():
            if kernels.available():
                return (lambda: kernels.dequantize_int8_rows(cb, scale)), None, None
        if mode == "cast":
            return (lambda: cb.to(dtype).mul_(rows)), None, None
        return (lambda: torch.mul(cb, rows)), None, None

    def _weight_on(self, device, non_blocking=False):
        param = self.weight
        data = param.data.to(device, non_blocking=non_blocking)
        new = copy_param(param, data)
        new.CB = data
        new.SCB = param.SCB.to(device, non_blocking=non_blocking)
        return new


def quantize_weight_bytes(weight: torch.Tensor, spec: QuantSpec, device=None) -> tuple:
    """The pack's one quantizer, behind quantizing on load and ``cli quantize`` alike (so both write the
    same bytes): ``(packed uint8, QuantState)`` for 4-bit, ``(int8 rows, float32 row scales)`` for int8,
    on ``device`` (default: where the weight is). bnb's CUDA and CPU kernels round a few values
    differently: the bytes match where both quantize on the same kind of device."""
    # absmax from float32 whatever the file's dtype: the scale is then as exact as the data allows
    w = weight.to(device=device or weight.device, dtype=torch.float32)
    if spec.is_4bit:
        return bnbf.quantize_4bit(w, blocksize=spec.blocksize, compress_statistics=spec.double_quant,
                                  quant_type=spec.quant_type, quant_storage=torch.uint8)
    # bnb's CUDA kernel takes float16 only (as Int8Params quantizes); the same on CPU keeps the bytes
    # identical whichever device quantized the file
    cb, scb, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
    return cb, scb.to(torch.float32)


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
