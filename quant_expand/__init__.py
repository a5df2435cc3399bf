"""Core of comfyui-bnb-flux: bitsandbytes-quantized Linear layers with logical shapes and lazy LoRA deltas.

Everything here runs with torch + bitsandbytes alone; only ``quant_expand.comfyui`` imports ComfyUI.
"""
from .layers import QLinear4bit, QLinear8bit, QuantLinear, is_quantized_linear
from .lora.delta import LazyLoraDelta, LoraTerm
from .spec import QuantSpec, QuantSpecError
from .widening import as_quant_linear, expand_in_features, unexpand

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
