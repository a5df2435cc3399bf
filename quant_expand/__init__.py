"""Core of comfyui-bnb-flux: bitsandbytes-quantized Linear layers with logical shapes and lazy LoRA deltas.

Everything here runs with torch + bitsandbytes alone; only ``quant_expand.comfyui`` imports ComfyUI.

The names below are imported on first use (PEP 562), not with the package: ``python -m quant_expand.cli run``
is a standard-library client and must start without torch or bitsandbytes installed.
"""

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "QuantSpec": ".spec",
    "QuantSpecError": ".spec",
    "QuantLinear": ".layers",
    "QLinear4bit": ".layers",
    "QLinear8bit": ".layers",
    "is_quantized_linear": ".layers",
    "as_quant_linear": ".widening",
    "expand_in_features": ".widening",
    "unexpand": ".widening",
    "LazyLoraDelta": ".lora.delta",
    "LoraTerm": ".lora.delta",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
