"""Quantized layers that do not fit the GPU budget, copied to the GPU a few blocks ahead of the compute.

ComfyUI's lowvram partial load leaves the layers that do not fit on the offload device; stock, a layer's
weight is then copied when the layer is reached, and the GPU waits for it. Here the offloaded layers are
grouped into units (a FLUX block, or one top-level layer). Each unit's tensors (packed bytes, quantization
statistics, stacked LoRA factors) have a pinned host source and a persistent device view in one of a few
slot buffers (``slot_pattern``: round robin, arranged so the step boundary never shares a slot). Entering
unit ``u`` makes the compute stream wait for u's copy and starts copying the next ``slots - 1`` units on a
side stream, each after the unit that held its slot has finished on the compute stream (events order the
two streams; the order wraps around, so the last blocks fetch the first ones for the next step). The views
never move, so each layer's kernels are set up once on them and are the same kernels a resident layer
runs: where the bytes lived changes no result.

Pure torch; which layers stream is ComfyUI's decision (``quant_expand.comfyui.patcher``).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

log = logging.getLogger("comfyui-bnb-flux")

ALIGN = 512            # every view starts where the caching allocator would put a tensor of its own
PIN_IN_PLACE = 1 << 20  # tensors from this size are pinned where they are; smaller ones get a pinned copy


_BLOCK_LIST = ("double_blocks.", "single_blocks.")


def stream_unit_name(layer: str) -> str:
    """The unit a layer streams with: its FLUX block (``double_blocks.3``), else the layer itself. Units
    run in the order they are registered, which is FLUX's order of execution."""
    for root in _BLOCK_LIST:
        at = layer.find(root)
        if at == 0 or (at > 0 and layer[at - 1] == "."):
            index = layer[at + len(root):].split(".", 1)[0]
            return layer[: at + len(root)] + index
    return layer


def slot_pattern(units: int, slots: int) -> list[int]:
    """The slot of each unit: round robin, so any ``slots`` units in a row, wrapping round, use different
    slots and each can be copied while the ``slots - 1`` before it compute. Where the count is not a
    multiple of ``slots``, round robin restarts once or twice in the middle (one or two units there are
    copied only one ahead) rather than at the wrap: at the step boundary the compute between the last
    block and the first (final layer, the sampler's step) is too short to hide a copy."""
    if units <= slots:
        return list(range(units))
    r = units % slots
    # a restart after a run of length L leaves L % slots units; 1 would put a unit beside its own slot
    seams = [] if r == 0 else [r] if (r >= 2 or slots < 3) else [2, slots - 1]
    rest = units - sum(seams)
    first = rest // slots // 2 * slots
    return [i % slots for run in (first, *seams, rest - first) for i in range(run)]


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


class StreamUnit:
    """The offloaded tensors of one unit: ``sources`` (host) and, once placed, their device ``views``.

    In the unit's device bytes the large sources come first and the small ones (under ``PIN_IN_PLACE``)
    after them, together: the small ones cross in one copy (see ``LayerStreamer``)."""

    def __init__(self, name: str, sources: list[torch.Tensor]):
        self.name = name
        self.sources = sources
        sizes = [t.numel() * t.element_size() for t in sources]
        order = sorted(range(len(sources)), key=lambda i: sizes[i] < PIN_IN_PLACE)  # stable: large first
        self.offsets = [0] * len(sources)
        size = 0
        self.small_start = None
        for i in order:
            if sizes[i] < PIN_IN_PLACE and self.small_start is None:
                self.small_start = size
            self.offsets[i] = size
            size += _aligned(sizes[i])
        self.nbytes = size
        self.views: list[torch.Tensor] = []
        # one copy per (device bytes, host bytes) pair, as _foreach_copy_ takes them: built once at placement
        self.dsts: list[torch.Tensor] = []
        self.srcs: list[torch.Tensor] = []


class LayerStreamer:
    """Copies units into ``slots`` device buffers on a side stream, ahead of their use (see module doc).

    ``pin(t) -> bool`` pins a host tensor in place (ComfyUI's ``model_management.pin_memory``, with its
    accounting), ``unpin(t)`` undoes it; ``pinned_copies`` says whether small sources may get pinned copies
    (False when pinned memory is disabled: sources stay pageable and the copies block the host)."""

    def __init__(self, device: torch.device, units: list[StreamUnit], slots: int = 3,
                 pin: Optional[Callable[[torch.Tensor], bool]] = None,
                 unpin: Optional[Callable[[torch.Tensor], bool]] = None, pinned_copies: bool = True):
        self.device = torch.device(device)
        self.units = units
        self.slots = max(1, min(slots, len(units)))
        self._unpin = unpin
        self._pinned_here: list[torch.Tensor] = []
        self.pageable_bytes = 0
        self.pinned_copy_bytes = 0
        self.slot_bytes = max((u.nbytes for u in units), default=0)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.buffers = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(self.slots)]
        self.slot_of = slot_pattern(len(units), self.slots)
        for unit, slot in zip(units, self.slot_of):
            self._place(unit, self.buffers[slot], pin, pinned_copies)
        if self.stream is not None:
            # the caching allocator may hand the slots memory that kernels queued on the compute stream still
            # use (freed there, safe there): the side stream writes the slots only after those kernels
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._filled = [-1] * self.slots          # unit index whose bytes each slot holds (or is receiving)
        self._copied = [self._event() for _ in range(self.slots)]
        self._released = [self._event() for _ in range(self.slots)]
        # worked out once: enter() runs at every unit change of every step, and a capped step is host-bound
        self._ahead = [self.ahead_of(u) for u in range(len(units))]
        self.current: Optional[int] = None
        self.bytes_copied = 0                     # host -> device bytes since the last reset (benchmarks)
        self.layout: tuple = ()                   # what the patcher streams (see BnbModelPatcher._stream_layout)
        self.counted_bytes = 0                    # what the patcher added to the model's loaded memory
        if self.pageable_bytes:
            log.info("Load BnB Flux: %.0f MiB of offloaded layers stay in pageable memory (pinning refused or "
                     "disabled): their copies hold the host up", self.pageable_bytes / 2**20)

    @property
    def device_bytes(self) -> int:
        return self.slot_bytes * self.slots

    def _event(self):
        return torch.cuda.Event() if self.device.type == "cuda" else None

    def _place(self, unit: StreamUnit, buf: torch.Tensor, pin, pinned_copies: bool):
        """The unit's device views in ``buf`` and its copies: each large source from where it is (pinned
        there when it can be), the small ones gathered into one pinned buffer, copied at once: each copy
        call costs host time, and a step that streams every unit is host-bound."""
        unit.sources = [t if t.is_contiguous() else t.contiguous() for t in unit.sources]
        unit.views = [buf[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                      for o, t in zip(unit.offsets, unit.sources)]
        small = [i for i, t in enumerate(unit.sources) if t.numel() * t.element_size() < PIN_IN_PLACE]
        gather = bool(small) and pinned_copies and self.device.type == "cuda" and \
            all(unit.sources[i].device.type == "cpu" for i in small)
        copies = []
        for i, t in enumerate(unit.sources):
            if not (gather and i in small):
                copies.append((_raw(unit.views[i]), _raw(self._pinned(t, pin))))
        if gather:
            span = unit.nbytes - unit.small_start
            host = torch.empty(span, dtype=torch.uint8, pin_memory=True)
            for i in small:
                t, at = unit.sources[i], unit.offsets[i] - unit.small_start
                host[at:at + t.numel() * t.element_size()].copy_(_raw(t))
            copies.append((buf[unit.small_start:unit.nbytes], host))
            self.pinned_copy_bytes += span
        unit.dsts, unit.srcs = [d for d, _ in copies], [h for _, h in copies]

    def _pinned(self, t: torch.Tensor, pin) -> torch.Tensor:
        """``t`` pinned in place when it is large and ComfyUI lets it be, else as it is (pageable)."""
        if t.device.type != "cpu" or self.device.type != "cuda" or t.is_pinned():
            return t
        nbytes = t.numel() * t.element_size()
        if nbytes >= PIN_IN_PLACE and pin is not None and pin(t):
            self._pinned_here.append(t)
            return t
        self.pageable_bytes += nbytes
        return t

    def views(self, unit: int) -> list[torch.Tensor]:
        return self.units[unit].views

    def enter(self, unit: int):
        """Called by every streamed layer before it computes: cheap when ``unit`` is already current."""
        if unit == self.current:
            return
        if self.stream is None:  # CPU: nothing to overlap (only plans and tests get here)
            self._fetch(unit)
            self.current = unit
            return
        compute = torch.cuda.current_stream(self.device)
        if self.current is not None:
            self._released[self.slot_of[self.current]].record(compute)
        with torch.cuda.stream(self.stream):
            self._fetch(unit)
            compute.wait_event(self._copied[self.slot_of[unit]])
            self.current = unit
            for ahead in self._ahead[unit]:
                self._fetch(ahead)

    def ahead_of(self, unit: int) -> list[int]:
        """The units copied ahead while ``unit`` computes: the next ones, wrapping round, up to the first
        whose slot is the one in use or that of a unit needed sooner (at a restart of the pattern)."""
        taken, out = {self.slot_of[unit]}, []
        for k in range(1, self.slots):
            ahead = (unit + k) % len(self.units)
            if self.slot_of[ahead] in taken:
                break
            taken.add(self.slot_of[ahead])
            out.append(ahead)
        return out

    def _fetch(self, unit: int):
        slot = self.slot_of[unit]
        if self._filled[slot] == unit:
            return
        u = self.units[unit]
        if self.stream is None:
            torch._foreach_copy_(u.dsts, u.srcs)
        else:  # on the side stream (enter's context)
            self.stream.wait_event(self._released[slot])  # whatever held the slot is done with it
            torch._foreach_copy_(u.dsts, u.srcs, non_blocking=True)
            self._copied[slot].record(self.stream)
        self._filled[slot] = unit
        self.bytes_copied += u.nbytes

    def close(self):
        """Unpin what was pinned in place and free the slots (the model is being unloaded or re-planned)."""
        if self.stream is not None:
            self.stream.synchronize()
        for t in self._pinned_here:
            if self._unpin is not None:
                self._unpin(t)
        self._pinned_here = []
        self.buffers = []
        for unit in self.units:
            unit.views, unit.dsts, unit.srcs = [], [], []
        self.units = []


class StreamedPlacement:
    """What a streamed layer's forward uses instead of its own placement: its unit in the streamer and the
    run state built once on the unit's device views (see ``layers.QuantLinear.forward``)."""

    __slots__ = ("streamer", "unit", "run", "device", "dtype")

    def __init__(self, streamer: LayerStreamer, unit: int, run, device: torch.device, dtype: torch.dtype):
        self.streamer, self.unit, self.run, self.device, self.dtype = streamer, unit, run, device, dtype

    def run_state(self, device, dtype):
        if device != self.device or dtype != self.dtype:
            return None
        self.streamer.enter(self.unit)
        return self.run

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (type(None), ())
