"""What Load BnB Flux found and did, kept on the patcher it returns (and on every clone of it); and how a
file stores its Linears, read from key names alone (the editor asks before anything loads)."""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

from ..checkpoint.stored import QS_KEY

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
    # how a pre-quantized file stores its Linears, from the header the load read (None: not pre-quantized)
    stored: Optional[FileQuantization] = None
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


@dataclasses.dataclass(frozen=True)
class FileQuantization:
    """How a file stores its Linears, as bitsandbytes' key names tell (no tensor read)."""

    quant_type: Optional[str]  # "nf4", "fp4", "int8", "nf4+int8" for a mix; None: not pre-quantized
    double_quant: Optional[bool]  # of its 4-bit layers: all / none nested; None: a mix, or no 4-bit layer

    @property
    def prequantized(self) -> bool:
        return self.quant_type is not None

    def describe(self) -> str:
        if not self.prequantized:
            return "not pre-quantized"
        if self.double_quant is None:
            return self.quant_type
        return f"{self.quant_type}, {'double quant' if self.double_quant else 'no double quant'}"

    def unused_inputs(self, quant_type: str, double_quant: bool) -> list[str]:
        """Load BnB Flux's settings this file overrides, said plainly (empty when they agree)."""
        if not self.prequantized:
            return []
        if quant_type != self.quant_type:
            return [f"quant_type {quant_type} not used: this file is pre-quantized {self.describe()}"]
        if self.double_quant is not None and bool(double_quant) != self.double_quant:
            return [f"double_quant {'on' if double_quant else 'off'} not used: this file is pre-quantized "
                    f"{self.describe()}"]
        return []


def file_quantization(keys: Iterable[str]) -> FileQuantization:
    """4-bit layers carry ``<module>.weight.quant_state.bitsandbytes__<nf4|fp4>`` (``weight.nested_absmax``
    with double quant), LLM.int8 ones ``<module>.SCB``: the names say the scheme."""
    four_bit: dict[str, str] = {}
    nested, int8 = set(), set()
    for key in keys:
        module, found, quant = key.rpartition(f".weight.{QS_KEY}")
        if found:
            four_bit[module] = quant
        elif key.endswith(".weight.nested_absmax"):
            nested.add(key[: -len(".weight.nested_absmax")])
        elif key.endswith(".SCB"):
            int8.add(key[: -len(".SCB")])
    types = sorted(set(four_bit.values())) + (["int8"] if int8 else [])
    if not types:
        return FileQuantization(None, None)
    nested &= set(four_bit)
    double = None if not four_bit or 0 < len(nested) < len(four_bit) else len(nested) == len(four_bit)
    return FileQuantization("+".join(types), double)
