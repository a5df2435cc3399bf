"""A LoRA file in one canonical form: per BFL layer, down/up factors, alpha, rows, bias; norm sets; widening."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch


@dataclass
class LoraLayer:
    """One low-rank update of a BFL Linear: ``scale * up @ down`` on rows ``[row_offset, row_offset + rows)``."""

    module: str                 # BFL module name of the target Linear, e.g. "double_blocks.0.img_attn.qkv"
    down: torch.Tensor          # [rank, in]  (lora_A / lora_down); in may be narrower than the layer (zero-pad)
    up: torch.Tensor            # [rows, rank] (lora_B / lora_up), rows already in BFL order
    alpha: Optional[float]      # None -> scale 1; else scale alpha/rank
    row_offset: int = 0         # first row of the (fused) weight this update targets
    bias: Optional[torch.Tensor] = None   # bias delta [rows] at strength 1 on the same rows (alpha/rank applied)
    source: str = ""            # the module's name in the file, for messages ("transformer.x_embedder")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def rows(self) -> int:
        return self.up.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class ParsedLora:
    name: str                    # file name, used in every error message
    source_format: str           # "bfl" | "diffusers" | "kohya" | "comfy"
    layers: list[LoraLayer]
    norm_sets: dict[str, torch.Tensor]   # BFL key of a norm scale, e.g. "single_blocks.0.norm.key_norm.scale" -> full value
    widened: dict[str, int]      # module -> new in_features, e.g. {"img_in": 128} for a Control LoRA
    # A bias delta with no low-rank pair on its module (ComfyUI ``diff_b`` alone): module -> [out],
    # applied at plain strength. A bias that comes with a lora_A/lora_B pair lives on its LoraLayer.
    bias_diffs: dict[str, torch.Tensor] = field(default_factory=dict)
    # Text-encoder keys (lora_te*, text_encoder*): left for a CLIP/T5 loader, not applied here.
    text_encoder_keys: list[str] = field(default_factory=list)
    # where the alpha came from when it was not an .alpha tensor, for the node's text
    alpha_note: str = ""

    @property
    def is_control(self) -> bool:
        """A Control LoRA widens img_in or replaces norm scales (both need more than ``W + delta``)."""
        return bool(self.widened or self.norm_sets)

    def describe(self) -> str:
        parts = [f"{len(self.layers)} low-rank layer{'s' * (len(self.layers) != 1)}"]
        if self.bias_diffs:
            parts.append(f"{len(self.bias_diffs)} bias diffs")
        if self.norm_sets:
            parts.append(f"{len(self.norm_sets)} norm scales set")
        parts += [f"{m} widened to {w} inputs" for m, w in self.widened.items()]
        if self.alpha_note:
            parts.append(self.alpha_note)
        kind = "Control LoRA" if self.is_control else "LoRA"
        return f"{self.name}: {self.source_format} {kind}, " + ", ".join(parts)


class LoraTarget(NamedTuple):
    """Where a file's module lands in BFL FLUX: rows ``[row_offset, row_offset + rows)`` of ``module``."""

    module: str
    row_offset: int = 0
    rows: Optional[int] = None   # None: every row of the module
    swap_halves: bool = False    # diffusers norm_out: (scale, shift) rows -> BFL (shift, scale)
