"""The op class FLUX is built with: Linear layers with no storage until the loader fills them."""
from __future__ import annotations

import comfy.lora
import comfy.model_detection
import comfy.model_patcher
import comfy.ops
import comfy.utils
import torch


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
        raise RuntimeError("DeferredLinear is loaded by quant_expand.comfyui.loader, not by load_state_dict")


class BnbFluxOps(comfy.ops.manual_cast):
    Linear = DeferredLinear
