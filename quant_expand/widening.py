"""Quantized layers with more logical inputs than stored ones: the bytes untouched, the new columns exact zeros."""
from __future__ import annotations

import copy

import bitsandbytes as bnb
import torch

from .layers import QLinear4bit, QLinear8bit, QuantLinear
from .params import LogicalInt8Params, LogicalParams4bit, copy_param


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
    weight = copy_param(base.weight, base.weight.data)  # same storage: the original bytes
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
