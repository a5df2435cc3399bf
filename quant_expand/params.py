"""bitsandbytes parameters whose Python-visible shape is the logical one, and quant-state copies."""
from __future__ import annotations

import copy
from typing import Callable, Optional

import bitsandbytes as bnb
import torch


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


def copy_param(param: torch.nn.Parameter, data: torch.Tensor) -> torch.nn.Parameter:
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


def target_device(fn: Callable, like: torch.Tensor) -> torch.device:
    # nn.Module._apply only hands us an opaque function: read where it sends an empty tensor.
    return fn(torch.empty(0, dtype=like.dtype, device=like.device)).device
