"""What Load BnB Flux found and did, kept on the patcher it returns (and on every clone of it)."""
from __future__ import annotations

import dataclasses
from typing import Optional

LOAD_REPORT = "bnb_flux_load_report"


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """One load of one file. Immutable, so every clone shares the same object."""

    file: str  # the file's name as shown (not its path)
    source: str  # one line on what the file holds (describe_source)
    prequantized: bool  # the file's own quantization was used
    quant: str  # the scheme(s) of the quantized layers, or "none"
    compute_dtype: str  # "bfloat16", "float16" or "float32"
    quantized_layers: int
    linear_layers: int
    size_bytes: int
    notes: tuple[str, ...] = ()
    # where loading spent its time: a load waiting on reads is disk-bound, else the quantizing is
    load_timing: dict = dataclasses.field(default_factory=dict, compare=False)

    def attach_to(self, patcher):
        # a patcher attachment, not an attribute: ComfyUI's ModelPatcher.clone() copies attachments
        # and drops plain attributes, and every LoRA node clones
        patcher.set_attachments(LOAD_REPORT, self)


def load_report(patcher) -> Optional[LoadReport]:
    """The report of the load ``patcher`` (or the model it was cloned from) came from; None for a model
    Load BnB Flux did not load."""
    get = getattr(patcher, "get_attachment", None)
    report = get(LOAD_REPORT) if get is not None else None
    return report if isinstance(report, LoadReport) else None
