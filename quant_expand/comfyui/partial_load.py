"""Partial loads of a BnbModelPatcher: what ComfyUI budgets for the model, and the quantized layers it
leaves offloaded streamed through a few device slots (``LayerStreamer``) instead of cast per layer.

ComfyUI sizes a model by its state dict; the lazy deltas' stacked LoRA factors and bias deltas live outside
it, and so do the streaming slots. Each is counted here, so ComfyUI never plans a load that cannot fit.
Mirrors ComfyUI 0.33's ``ModelPatcher.model_size``, ``memory_required``, ``_load_list``, ``load`` (its
per-module placement) and ``pin_weight_to_device``.
"""
from __future__ import annotations

import logging

import comfy.model_management
import comfy.model_patcher

from ..layers import is_quantized_linear
from ..lora.delta import indexed_device
from ..streaming import LayerStreamer, StreamedPlacement, StreamUnit, stream_unit_name
from .patches import plain_lora_term, build_lazy_delta

log = logging.getLogger("comfyui-bnb-flux")

STREAMER_ATTR = "bnb_flux_streamer"  # the model's LayerStreamer while it is partially loaded
STREAM_SLOTS = 3  # units in flight: the one computing and two copying ahead
def is_offloaded(module) -> bool:
    """ComfyUI's partial load marks each module it leaves on the offload device this way
    (``ModelPatcher.load`` sets ``prev_comfy_cast_weights``; loading it fully removes it)."""
    return hasattr(module, "prev_comfy_cast_weights")


class PartialLoad:
    """The memory side of :class:`~.patcher.BnbModelPatcher` (a mixin before ComfyUI's ModelPatcher)."""

    def lora_bytes(self) -> int:
        """Device bytes of every quantized layer's lazy delta under this patcher's patches (stacked LoRA
        factors in the compute dtype, bias deltas)."""
        cached = getattr(self, "_lora_bytes", None)
        if cached is not None and cached[0] == self.patches_uuid:
            return cached[1]
        total = sum(self._layer_lora_bytes(name, module) for name, module in self._quantized_modules())
        self._lora_bytes = (self.patches_uuid, total)
        return total

    def _layer_lora_bytes(self, name: str, module) -> int:
        itemsize = self._compute_dtype().itemsize
        total = 0
        for patch in self.patches.get(f"{name}.weight", []):
            term = plain_lora_term(patch, module, f"{name}.weight")
            if term is not None:
                total += term.rank * (module.in_features + module.out_features) * itemsize
        if f"{name}.bias" in self.patches:
            total += module.out_features * itemsize
        return total

    def model_size(self):
        # not ModelPatcher.size: clone() hands the parent's model_size() to the child's constructor, which
        # would count the parent's LoRA factors again; the state dict's bytes are the model's, shared
        base = getattr(self.model, "bnb_flux_state_dict_bytes", None)
        if base is None:
            base = comfy.model_management.module_size(self.model)
            self.model.bnb_flux_state_dict_bytes = base
        return base + self.lora_bytes()

    def memory_required(self, input_shape):
        # on top of ComfyUI's activation estimate: one layer's weight dequantized into the compute dtype
        # (and, merged with a LoRA, written by the kernel's epilogue) exists during that layer's GEMM
        itemsize = self._compute_dtype().itemsize
        largest = max((m.out_features * m.in_features for _, m in self._quantized_modules()), default=0)
        return super().memory_required(input_shape) + 2 * largest * itemsize

    def _load_list(self, *args, **kwargs):
        """ComfyUI's list of modules to place, with a quantized layer's size including its LoRA factors and
        no offload cost: streamed, it needs none of ComfyUI's cast buffers (its slots are reserved apart)."""
        out = []
        unloading = getattr(self, "_unloading", False)
        for entry in super()._load_list(*args, **kwargs):
            *criteria, module_mem, name, module, params = entry
            if is_quantized_linear(module):
                module_mem += self._layer_lora_bytes(name, module)
                if len(criteria) == 1:  # the non-dynamic sort key: the module's offload cost
                    criteria = [0]
                entry = (*criteria, module_mem, name, module, params)
            elif unloading:
                continue  # unquantized modules stay resident (see _keep_unquantized_resident)
            out.append(entry)
        return out

    def _streaming_reserve(self) -> int:
        """What a partial load needs besides the layers ComfyUI places: the streaming slots (the largest
        units of quantized layers, with their LoRA factors) and the unquantized modules kept resident."""
        units: dict[str, int] = {}
        unquantized = 0
        for name, module in self.model.diffusion_model.named_modules():
            if is_quantized_linear(module):
                unit = stream_unit_name(name)
                units[unit] = units.get(unit, 0) + sum(t.nbytes for t in module.stream_sources()) + \
                    self._layer_lora_bytes(f"diffusion_model.{name}", module)
            elif not any(True for _ in module.children()):
                unquantized += sum(p.nbytes for p in module.parameters(recurse=False))
        largest = sorted(units.values(), reverse=True)[:STREAM_SLOTS]
        return sum(largest) + unquantized

    def _keep_unquantized_resident(self, device_to) -> int:
        """Load the unquantized modules ComfyUI offloaded (img_in, embedders, final layer, norms: a few
        percent of a quantized FLUX) the way its ``ModelPatcher.load`` loads a module that fits (0.33:
        wipe the lowvram state, merge the patches, move it): ComfyUI's offloaded arithmetic, merging LoRAs
        per forward, would give other numbers than the same layer resident. Returns the bytes moved."""
        moved = 0
        for name, module in self.model.named_modules():
            if is_quantized_linear(module) or not is_offloaded(module):
                continue
            params = dict(module.named_parameters(recurse=False))
            comfy.model_patcher.wipe_lowvram_weight(module)
            for param in params:
                key = f"{name}.{param}" if name else param
                self.unpin_weight(key)
                self.patch_weight_to_device(key, device_to=device_to)
            module.comfy_patched_weights = True
            module.to(device_to)
            moved += sum(p.nbytes for p in module.parameters(recurse=False))
        return moved

    def pin_weight_to_device(self, key):
        module = self._quantized_module(key)
        if module is None:
            return super().pin_weight_to_device(key)
        # model_management.pin_memory takes plain tensors only: pin the packed bytes in place (no second
        # host copy), under ComfyUI's accounting; unpin_weight undoes it on the same storage
        if comfy.model_management.pin_memory(module.weight.data):
            self.pinned.add(key)

    def _start_streaming(self, device):
        """A :class:`LayerStreamer` for the quantized layers ComfyUI left offloaded; its device bytes are
        counted in the model's loaded memory until :meth:`_stop_streaming`."""
        offloaded = [(n, m) for n, m in self._quantized_modules() if is_offloaded(m)]
        if not offloaded:
            return
        device = indexed_device(device)
        dtype = self._compute_dtype()
        units, members = {}, {}
        for name, module in offloaded:
            own = module.stream_sources()
            delta = module.lora_delta
            lora = list(delta.host_stack(dtype)) if delta is not None and delta.terms else []
            unit = stream_unit_name(name)
            units.setdefault(unit, []).extend(own + lora)
            members.setdefault(unit, []).append((module, len(own), len(lora)))
        mm = comfy.model_management
        streamer = LayerStreamer(device, [StreamUnit(u, srcs) for u, srcs in units.items()], slots=STREAM_SLOTS,
                                 pin=mm.pin_memory, unpin=mm.unpin_memory, pinned_copies=mm.MAX_PINNED_MEMORY > 0)
        resident = 0
        for index, (unit, layers) in enumerate(members.items()):
            views = streamer.views(index)
            at = 0
            for module, n_own, n_lora in layers:
                own, lora, at = views[at:at + n_own], views[at + n_own:at + n_own + n_lora], at + n_own + n_lora
                bias = module.bias.detach().to(device=device, dtype=dtype) if module.bias is not None else None
                resident += bias.nbytes if bias is not None else 0
                delta = module.lora_delta
                if lora:
                    delta.use_stack(device, dtype, *lora)
                run = module.stream_run_state(own, bias, device, dtype)
                module.__dict__["_stream"] = StreamedPlacement(streamer, index, run, device, dtype)
                if delta is not None and delta.bias_terms:
                    delta.bias_with(bias, device, dtype)
                    resident += module.out_features * dtype.itemsize
        streamer.layout = self._stream_layout(offloaded)
        streamer.counted_bytes = streamer.device_bytes + resident
        self.model.model_loaded_weight_memory += streamer.counted_bytes
        setattr(self.model, STREAMER_ATTR, streamer)
        log.info("Load BnB Flux: %d quantized layers in %d units stream from %s memory through %d slots of "
                 "%.0f MiB", len(offloaded), len(units), "pinned" if not streamer.pageable_bytes else "partly pageable",
                 streamer.slots, streamer.slot_bytes / 2**20)

    def _stream_layout(self, offloaded) -> tuple:
        """What the streamed bytes depend on under this patcher's patches: the layers and the LoRA tensors
        their deltas stack (by identity); a strength change keeps it, another LoRA does not."""
        return tuple((name, build_lazy_delta(self.patches.get(f"{name}.weight") or [], module,
                                             f"{name}.weight").layout()) for name, module in offloaded)

    def _stop_streaming(self):
        streamer = getattr(self.model, STREAMER_ATTR, None)
        if streamer is None:
            return
        for _, module in self._quantized_modules():
            if module.__dict__.pop("_stream", None) is not None:
                for delta in (module.lora_delta, module.reusable_lora_delta):
                    if delta is not None:  # its stack is views into the slots: not to be adopted later
                        delta.drop_stack()
        streamer.close()
        setattr(self.model, STREAMER_ATTR, None)
        self.model.model_loaded_weight_memory = max(0, self.model.model_loaded_weight_memory - streamer.counted_bytes)
