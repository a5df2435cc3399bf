"""Core of comfyui-bnb-flux: bitsandbytes-quantized Linear layers with logical shapes and lazy LoRA deltas.

Everything here runs with torch + bitsandbytes alone; only ``quant_expand.comfy_adapter`` imports ComfyUI.
"""
from .spec import QuantSpec, QuantSpecError
from .layers import QuantLinear, QLinear4bit, QLinear8bit, as_quant_linear, expand_in_features, is_quantized_linear, unexpand
from .lora import LazyLoraDelta, LoraTerm

__all__ = [
    "QuantSpec",
    "QuantSpecError",
    "QuantLinear",
    "QLinear4bit",
    "QLinear8bit",
    "is_quantized_linear",
    "as_quant_linear",
    "expand_in_features",
    "unexpand",
    "LazyLoraDelta",
    "LoraTerm",
]
