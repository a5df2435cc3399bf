"""The model a LoRA file is for when no model is loaded (``cli inspect``): its family and its Linears, sized
from the file's own factors.

One rule, over the family table (``families.py``: each family's Linears, shapes and released sizes):
1. layers: the families that have every Linear the file targets, its names read as that family's (BFL,
   kohya's underscores, or the family's diffusers names); a layer only one family has (FLUX.1's per-block
   img_mod/txt_mod/modulation.lin, FLUX.2's shared modulation, Chroma's approximator) leaves that one;
2. widths: of those, the ones whose Linears, at the hidden size the file shows, have every width the file's
   factors have (FLUX.2's gated MLP: mlp.0 emits 6 x hidden, linear1 9 x hidden; FLUX.1's and Chroma's 4 x, 7 x);
3. sizes: of those, the ones with a released size the file fits (hidden size, blocks, text width), if any has.
What remains is the answer; more than one family when nothing in the file tells them apart.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from ..errors import LoraFormatError
from ..families import FAMILIES, FLUX1, FREE_INPUTS, Family, ModelSize
from ..flux import block_count
from .naming import detect_lora_format, module_and_role, norm_key, other_adapter, targets_of

# FLUX.1, the family without markers, first: a file that fits it and another is read as a FLUX.1 LoRA
_ORDER = tuple(reversed(FAMILIES))

# a hidden size no fixed width of any family equals: at it, a Linear whose input (output) width is this
# reads (writes) the hidden state
_PROBE_HIDDEN = 1001


@dataclass
class ImpliedModel:
    families: tuple[Family, ...]  # the families the file fits; the file is read against the first one's model
    hidden: int                   # as the first family reads the file
    doubles: int                  # the double and single blocks the file reaches
    singles: int
    text: Optional[int]           # txt_in's inputs, where the file has a txt_in layer
    sizes: tuple[ModelSize, ...]  # the released sizes of those families it fits; () if none
    linears: dict[str, tuple[int, int]]  # BFL name -> (out, in): the model the file is read against


@dataclass
class _Reading:
    """The file read as one family's LoRA."""

    family: Family
    has_layers: bool       # the family has every Linear the file targets
    widths_agree: bool     # and every width of the file's factors is that Linear's
    hidden: int
    doubles: int
    singles: int
    text: Optional[int]
    sizes: tuple[ModelSize, ...]
    linears: dict[str, tuple[int, int]]


def implied_model_of(tensors, name: str) -> ImpliedModel:
    """The model the LoRA ``tensors`` (a file named ``name``) is for; LoraFormatError where no FLUX model
    has its layers, with the message Apply Control LoRA gives on a FLUX.1 model."""
    # no model yet (it is what this works out): a file that is no FLUX LoRA at all is named against FLUX.1
    fmt, te_keys = detect_lora_format(name, tensors.keys(), FLUX1)
    widths, norms = _factor_widths(tensors, fmt, set(te_keys))
    readings = []
    for family in _ORDER:
        try:
            readings.append(_read_as(family, fmt, widths, norms, name))
        except LoraFormatError:  # a diffusers name the family's table does not have
            continue
    named = [r for r in readings if r.has_layers]
    if not named:  # no family has them all: the parser says what FLUX.1 lacks, as the node does on FLUX.1
        named = [_read_as(FLUX1, fmt, widths, norms, name)]
    fitting = [r for r in named if r.widths_agree] or named  # none: the parser names the width that is off
    released = [r for r in fitting if r.sizes] or fitting
    first = released[0]
    return ImpliedModel(families=tuple(r.family for r in released), hidden=first.hidden, doubles=first.doubles,
                        singles=first.singles, text=first.text, sizes=tuple(s for r in released for s in r.sizes),
                        linears=first.linears)


def _factor_widths(tensors, fmt: str, te_keys: set) -> tuple[dict[tuple[str, str], int], list[str]]:
    """``{(module in the file, "down" | "up"): lora_A's inputs | lora_B's rows}`` and the file's modules of
    QK-norm scales it sets."""
    widths, norms = {}, []
    for key in tensors.keys():
        found = None if key in te_keys or other_adapter(key) else module_and_role(key, fmt)
        if found is None:
            continue  # parse_lora names such keys
        module, role = found
        if role == "norm":
            norms.append(module)
        elif role in ("down", "up") and len(tensors.shape(key)) == 2:
            widths[found] = tensors.shape(key)[1 if role == "down" else 0]
    return widths, norms


def _read_as(family: Family, fmt: str, widths: dict, norms: list[str], name: str) -> _Reading:
    in_file = sorted({module for module, _ in widths})
    # the family's model with every block index the file names: what its names are read against
    reach = 1 + max((int(n) for m in in_file + norms for n in re.findall(r"\d+", m)), default=0)
    provisional = family.linear_shapes(_PROBE_HIDDEN, reach, reach)
    targets = targets_of(fmt, in_file, provisional, name)
    has_layers = all(t.module in provisional for t in targets.values())

    ins = Counter(w for (m, role), w in widths.items()
                  if role == "down" and provisional.get(targets[m].module, (0, 0))[1] == _PROBE_HIDDEN)
    outs = Counter(w for (m, role), w in widths.items() if role == "up" and targets[m].rows is None
                   and provisional.get(targets[m].module, (0, 0))[0] == _PROBE_HIDDEN)
    hidden = (ins or outs).most_common(1)[0][0] if ins or outs else family.sizes[0].hidden
    bfl = [t.module for t in targets.values()] + [norm_key(m, fmt, name, family) for m in norms]
    doubles, singles = block_count(bfl, "double_blocks"), block_count(bfl, "single_blocks")
    inputs = {}  # the widths of FREE_INPUTS the file shows
    for (module, role), width in widths.items():
        if role == "down" and targets[module].module in FREE_INPUTS:
            inputs[targets[module].module] = width
    if family.control_loras and inputs.get("img_in") == 2 * family.latent:
        inputs["img_in"] = family.latent  # a Control LoRA's image + control latent: the model's own is narrower
    text = inputs.get("txt_in")
    sizes = tuple(s for s in family.sizes if s.hidden == hidden and doubles <= s.doubles and singles <= s.singles
                  and text in (None, s.text) and not (s.absent and any(m.startswith(s.absent) for m in bfl)))

    size = sizes[0] if sizes else None
    linears = family.linear_shapes(hidden, size.doubles if size else max(doubles, 1),
                                   size.singles if size else max(singles, 1),
                                   {"txt_in": size.text, **inputs} if size else inputs)
    if size and size.absent:
        linears = {m: shape for m, shape in linears.items() if not m.startswith(size.absent)}
    widths_agree = has_layers and _widths_agree(family, widths, targets_of(fmt, in_file, linears, name), linears)
    return _Reading(family, has_layers, widths_agree, hidden, doubles, singles, text, sizes, linears)


def _widths_agree(family: Family, widths: dict, targets: dict, linears: dict) -> bool:
    for (module, role), width in widths.items():
        target = targets[module]
        if target.module not in linears:
            return False
        out, inputs = linears[target.module]
        if role == "down":
            control = target.module == "img_in" and family.control_loras and width == 2 * family.latent
            if width != inputs and not control:
                return False
        elif width != (out if target.rows is None else target.rows):
            return False
    return True
