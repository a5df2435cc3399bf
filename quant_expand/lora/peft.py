"""PEFT's scaling as diffusers' save_lora_weights records it (lora_adapter_metadata)."""
from __future__ import annotations

import json
import math
import re
from typing import NamedTuple, Optional

from ..errors import LoraFormatError

ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' save_lora_weights: PEFT's LoraConfig, "transformer." keys


class PeftScaling(NamedTuple):
    """PEFT's per-module scale rule, from a LoraConfig: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA),
    ``alpha_pattern`` overriding alpha for the modules it matches."""

    lora_alpha: float
    alpha_pattern: dict
    use_rslora: bool

    def scale(self, module: str, rank: int) -> float:
        alpha = self.lora_alpha
        for pattern, value in self.alpha_pattern.items():  # peft.utils.other.get_pattern_key's rule
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def peft_scaling(metadata: Optional[dict], name: str) -> Optional[PeftScaling]:
    """The LoraConfig diffusers keeps in the file's metadata (its ``transformer.`` entries), or None."""
    raw = (metadata or {}).get(ADAPTER_METADATA)
    if not raw:
        return None
    try:
        config = json.loads(raw)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        prefixed = {k[len("transformer."):]: v for k, v in config.items() if k.startswith("transformer.")}
        config = prefixed or config
        if "lora_alpha" not in config:
            return None
        alpha = float(config["lora_alpha"])
        patterns = config.get("alpha_pattern") or {}
        if not isinstance(patterns, dict):
            raise ValueError("alpha_pattern is not a mapping")
        for pattern, value in patterns.items():
            re.compile(pattern)
            float(value)
        if not math.isfinite(alpha):
            raise ValueError(f"lora_alpha is {alpha}")
        return PeftScaling(alpha, dict(patterns), bool(config.get("use_rslora", False)))
    except (ValueError, TypeError, re.error) as e:
        raise LoraFormatError(f"{name}: its {ADAPTER_METADATA} metadata is not a readable LoRA config ({e}); "
                              f"the file is damaged: download it again") from e
