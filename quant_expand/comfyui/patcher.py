"""BnbModelPatcher: ComfyUI's ModelPatcher for models whose Linear layers hold bitsandbytes bytes.

Overrides of ComfyUI 0.33's ``ModelPatcher``: ``patch_weight_to_device`` (never merges into quantized
weights), ``add_patches`` and ``set_injections`` (refusals), ``load`` / ``partially_load`` /
``partially_unload`` / ``unpatch_model`` (lazy deltas and streaming around ComfyUI's own placement).
``swap_patches_in_place`` does what ``unpatch_model`` followed by ``load`` would do to a fully loaded
model's ``backup`` and ``object_patches_backup`` (ComfyUI's own fields, read as 0.33 keeps them), where
the model is instead of through the offload device. The memory side is in :mod:`.partial_load`.
"""
from __future__ import annotations

import logging

import comfy.lora
import comfy.model_detection
import comfy.model_patcher
import comfy.ops
import comfy.utils
import torch

from ..errors import BnbFluxError
from ..layers import is_quantized_linear
from ..lora.delta import indexed_device
from .partial_load import STREAMER_ATTR, PartialLoad, is_offloaded
from .patches import (
    MergeSignature,
    build_lazy_delta,
    lazy_bias_terms,
    required_in_features,
    unmerged,
    widened_linear,
)

log = logging.getLogger("comfyui-bnb-flux")

BYPASS_LORA_INJECTIONS = "bypass_lora"  # the injection key of comfy.sd.load_bypass_lora_for_models


BYPASS_LORA_REFUSAL = (
    "Load LoRA (Bypass) (LoraLoaderBypass / LoraLoaderBypassModelOnly, ComfyUI's experimental bypass mode in "
    "comfy/weight_adapter/bypass.py) does not work on a Load BnB Flux model: its forward hooks skip this "
    "model's patcher, which already adds LoRAs at sampling time without touching the quantized weights. Use "
    "LoraLoaderModelOnly (or LoraLoader) or Apply Control LoRA instead: they apply the same LoRA, Control "
    "LoRAs included.")


MERGED_ATTR = "bnb_flux_merged_patches"


def _set_plain(module, name: str, value):
    object.__setattr__(module, name, value)


class BnbModelPatcher(PartialLoad, comfy.model_patcher.ModelPatcher):
    """ModelPatcher for models holding :class:`QuantLinear` layers.

    LoRA patches on quantized weights are never merged: ``patch_weight_to_device`` leaves them alone
    and ``load`` installs a :class:`LazyLoraDelta` on each layer (moved and stacked on the load
    device), removed again by ``unpatch_model``. Other keys (biases, norms, unquantized layers) follow
    ComfyUI's usual merge-with-backup path.

    It is a non-dynamic patcher even when ComfyUI runs with dynamic VRAM (main.py's default), by choice:
    ``ModelPatcherDynamic`` sizes and casts raw weight tensors (it would take the logical-shape uint8 bytes
    for twice the packed size and miss quant state and LoRA factors), and a version that gave each
    quantized layer a home in comfy-aimdo's VBAR instead ran slower with all VRAM (host work per block), and
    its capped results were not bitwise equal to uncapped ones (bench/README, "Small GPUs"). Beside
    dynamic models this patcher is sized the classic way: ``load_models_gpu`` frees memory for it
    (a non-dynamic model in the list turns ``for_dynamic`` off), a dynamic text encoder or VAE loading
    later partially unloads it through ``free_memory``, and what does not fit streams through the pack's
    own slots (:mod:`.partial_load`), which dynamic ComfyUI leaves alone.

    It refuses ComfyUI's experimental bypass mode (``LoraLoaderBypass``, ``comfy/weight_adapter/bypass.py``):
    that wraps each adapted module's ``forward`` in a hook adding ``B(Ax)``, which the lazy deltas already do
    (merged or not, per layer and token count) under this patcher's memory budget, Set LoRA Scale and
    Control LoRA widening; the hooks see none of those (a Control LoRA's img_in is never widened).
    """

    def _quantized_module(self, key: str, param_name: str = "weight"):
        module_name, _, param = key.rpartition(".")
        if param != param_name:
            return None
        try:
            module = comfy.utils.get_attr(self.model, module_name)
        except AttributeError:
            return None
        return module if is_quantized_linear(module) else None

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False, return_weight=False, force_cast=False):
        module = self._quantized_module(key)
        if module is None:
            bias_owner = self._quantized_module(key, "bias")
            if (bias_owner is not None and not return_weight and key in self.patches
                    and lazy_bias_terms(self.patches[key], bias_owner.out_features) is not None):
                return None  # added by the layer's lazy delta at run time (re-scaling costs nothing)
            return super().patch_weight_to_device(key, device_to=device_to, inplace_update=inplace_update,
                                                  return_weight=return_weight, force_cast=force_cast)
        if return_weight:  # a full-precision view for savers/merges; the stored bytes stay as they are
            weight = module.dequantize(device_to, torch.float32)
            if key in self.patches:
                weight = comfy.lora.calculate_weight(self.patches[key], weight, key)
            return weight
        return None

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        img_in = "diffusion_model.img_in.weight"
        if (img_in in patches and required_in_features(self.patches.get(img_in, []))
                and required_in_features([(strength_patch, patches[img_in], strength_model, None, None)])):
            # ComfyUI's LoRA loaders call this too: a second Control LoRA from them is caught here
            raise BnbFluxError("this model already has a Control LoRA, and the LoRA being added is one too: two "
                               "Control LoRAs would both claim the control channels of img_in; use one per model")
        keys = super().add_patches(patches, strength_patch, strength_model)
        self.widen_for_patches()
        return keys

    def set_injections(self, key, injections):
        # comfy.sd.load_bypass_lora_for_models hides LoRAs in hooks this patcher never sees (img_in unwidened)
        if key == BYPASS_LORA_INJECTIONS:
            raise BnbFluxError(BYPASS_LORA_REFUSAL)
        super().set_injections(key, injections)

    def widen_for_patches(self):
        """A patch that widens a Linear's inputs (a Control LoRA's ``img_in``) gets a widened layer as an
        object patch of this clone: quantized layers keep their bytes (``expand_in_features``), plain ones
        get a zero-padded copy. ComfyUI's own path pads the weight at merge time instead, which fails when
        the layer is offloaded (lowvram) and cannot work on packed 4-bit bytes."""
        for key, patch_list in self.patches.items():
            width = required_in_features(patch_list)
            if width is None or not key.endswith(".weight"):
                continue
            name = key[: -len(".weight")]
            current = self.get_model_object(name)
            if isinstance(current, torch.nn.Linear) and width > current.in_features:
                # while another clone is loaded, ComfyUI has merged its patches into a plain layer's weight
                # and bias (ModelPatcher.patch_weight_to_device): widen the originals
                unpatched = {p: unmerged(self, f"{name}.{p}", getattr(current, p)) for p in ("weight", "bias")
                             if getattr(current, p, None) is not None}
                self.add_object_patch(name, widened_linear(current, width, unpatched))

    def _compute_dtype(self):
        return self.model.manual_cast_dtype or self.model.get_dtype()

    def _quantized_modules(self) -> list:
        return [(n, m) for n, m in self.model.named_modules() if is_quantized_linear(m)]

    def install_lazy_deltas(self, device=None, modules=None, bias_terms_of=None):
        """Give every quantized layer the delta of this patcher's patches (or none). ``bias_terms_of``:
        :func:`lazy_bias_terms` by layer name where the caller already worked them out."""
        device = indexed_device(device or self.load_device)
        dtype = self._compute_dtype()
        with self.use_ejected():
            for name, module in (modules if modules is not None else self._quantized_modules()):
                key = f"{name}.weight"
                if module.weight_function:
                    # ComfyUI's lowvram path put a merge-per-forward patch here; the lazy delta replaces it
                    module.weight_function = [f for f in module.weight_function
                                              if not isinstance(f, comfy.model_patcher.LowVramPatch)]
                if bias_terms_of is not None and name in bias_terms_of:
                    bias_terms = bias_terms_of[name]
                else:
                    bias_terms = lazy_bias_terms(self.patches.get(f"{name}.bias", []), module.out_features)
                if bias_terms and module.bias_function:
                    module.bias_function = [f for f in module.bias_function
                                            if not isinstance(f, comfy.model_patcher.LowVramPatch)]
                patches = self.patches.get(key)
                if not patches and not bias_terms:
                    _set_plain(module, "lora_delta", None)
                    _set_plain(module, "reusable_lora_delta", None)
                    self._prepare_run(module, device, dtype)
                    continue
                delta = build_lazy_delta(patches or [], module, key, bias_terms or ())
                # same LoRA tensors, new strengths: nothing is re-uploaded or re-stacked
                delta.adopt_stack(module.lora_delta or getattr(module, "reusable_lora_delta", None))
                if not is_offloaded(module):  # an offloaded layer's factors stream with it (_start_streaming)
                    delta.prepare(device, dtype)
                _set_plain(module, "lora_delta", delta)
                _set_plain(module, "reusable_lora_delta", None)
                self._prepare_run(module, device, dtype)

    @staticmethod
    def _prepare_run(module, device, dtype):
        """Look up now what the layer's forward needs on ``device`` (so a torch.compile'd model traces
        straight through it), and the bias + delta sum its delta will add (``device`` indexed)."""
        run = module._run_state(device, dtype)
        delta = module.lora_delta
        if delta is not None and delta.bias_terms and (run.static_bias or run.bias is None):
            delta.bias_with(run.bias, device, dtype)

    def clear_lazy_deltas(self, keep_for_reuse=False, modules=None):
        """Remove every layer's delta; ``keep_for_reuse`` (the model stays where it is) lets the next
        install take over the stacked device tensors of the same LoRAs."""
        for _, module in (modules if modules is not None else self._quantized_modules()):
            # plain attributes: nn.Module.__setattr__'s checks cost more than the rest of a swap
            _set_plain(module, "reusable_lora_delta", module.lora_delta if keep_for_reuse else None)
            _set_plain(module, "lora_delta", None)

    # -- memory: what ComfyUI budgets, and the layers that do not fit ----------------------------------
    # ComfyUI sizes a model by its state dict; the lazy deltas' stacked LoRA factors and bias deltas live
    # outside it (a rank-128 Control LoRA adds a fifth to NF4 FLUX), and so do the streaming slots. Each is
    # counted here, so ComfyUI never plans a load that cannot fit.

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        setattr(self.model, MERGED_ATTR, None)
        self._stop_streaming()
        partial = not full_load and 0 < lowvram_model_memory < self.model_size()
        if partial:  # leave room for what ComfyUI's plan does not see (see _streaming_reserve)
            lowvram_model_memory = max(1, lowvram_model_memory - self._streaming_reserve())
        super().load(device_to, lowvram_model_memory=lowvram_model_memory,
                     force_patch_weights=force_patch_weights, full_load=full_load)
        self._after_placement(device_to)

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        if self._can_swap_patches_in_place(device_to, force_patch_weights):
            self.swap_patches_in_place(device_to)
            return 0
        setattr(self.model, MERGED_ATTR, None)
        out = super().partially_load(device_to, extra_memory=extra_memory, force_patch_weights=force_patch_weights)
        if getattr(self.model, STREAMER_ATTR, None) is None:  # paths on which ComfyUI did not call load()
            self.install_lazy_deltas(device_to)
            if self.model.model_lowvram:
                self._start_streaming(device_to)
        return out

    def _after_placement(self, device_to):
        """After ComfyUI placed the modules: unquantized ones it offloaded made resident, lazy deltas,
        the offloaded quantized layers streamed."""
        device_to = device_to or self.load_device
        if self.model.model_lowvram:
            self.model.model_loaded_weight_memory += self._keep_unquantized_resident(device_to)
        self.install_lazy_deltas(device_to)
        self._start_streaming(device_to)
        if not self.model.model_lowvram or getattr(self.model, STREAMER_ATTR, None) is not None:
            self._record_merges()

    def swap_patches_in_place(self, device_to):
        """Another clone's LoRAs (or strengths) are on the fully loaded model. ComfyUI would unpatch it by
        moving the whole model to the offload device and reloading it; quantized weights hold no merged
        state, so undoing the few merges ComfyUI made (norm sets, unquantized layers) and swapping object
        patches and lazy deltas where the model is gives the same model state at a fraction of the cost."""
        with self.use_ejected(skip_and_inject_on_exit_only=True):
            quantized = self._quantized_modules()
            self.clear_lazy_deltas(keep_for_reuse=True, modules=quantized)
            # a merge whose patches are the very same (a Control LoRA's norm sets after a strength change:
            # a "set" ignores strength) stays as it is; only the others are undone and redone
            merged = getattr(self.model, MERGED_ATTR, None) or {}
            keep = {key for key, sig in merged.items()
                    if key in self.backup and key in self.patches and MergeSignature(self.patches[key]) == sig}
            lazy, bias_terms_of = self._lazy_keys(quantized)
            # layers the previous clone's or this clone's object patches replace: their weights are undone
            # and backed up the usual way (a backup belongs to the module it was taken from)
            replaced = tuple(f"{k}." for k in (*self.object_patches_backup, *self.object_patches))
            for key, bk in list(self.backup.items()):  # as unpatch_model, onto the device the model is on
                if key in keep:
                    continue
                if bk.inplace_update:
                    comfy.utils.copy_to_param(self.model, key, bk.weight)
                elif (key in self.patches and key not in lazy and not self.weight_inplace_update
                      and not key.startswith(replaced)):
                    # merged again below from the original, which stays backed up: put the backup itself
                    # in place (patch_weight_to_device copies it to the device as it merges) instead of a
                    # copy to the device now and a copy back into a new backup there
                    comfy.utils.set_attr_param(self.model, key, bk.weight)
                    continue
                else:
                    comfy.utils.set_attr_param(self.model, key, bk.weight.to(device_to))
                del self.backup[key]
            restored = dict(self.object_patches_backup)
            for key, old in restored.items():
                comfy.utils.set_attr(self.model, key, old)
            self.object_patches_backup.clear()
            for key, obj in self.object_patches.items():
                self.object_patches_backup[key] = comfy.utils.set_attr(self.model, key, obj)
                if isinstance(obj, torch.nn.Module):
                    obj.to(device_to)
            for key in self.patches:
                if key not in keep and key not in lazy:
                    self.patch_weight_to_device(key, device_to=device_to)
            # object patches swapped above may have replaced quantized layers (a widened img_in)
            self.install_lazy_deltas(device_to, modules=self._after_object_patches(quantized, restored),
                                     bias_terms_of=bias_terms_of)
            self.model.current_weight_patches_uuid = self.patches_uuid
            self._record_merges()

    def _after_object_patches(self, quantized: list, restored: dict) -> list:
        """The (name, module) pairs of quantized layers once the previous clone's object patches were put
        back (``restored``: their originals) and this patcher's went in (a widened img_in replaces a
        layer): ``quantized``, taken before, brought up to date without a second walk over the model's
        ~1000 modules."""
        names = dict(quantized)
        for patches in (restored, self.object_patches):
            for key, obj in patches.items():
                if not isinstance(obj, torch.nn.Module):
                    continue
                if next(obj.children(), None) is not None:  # a container may hold quantized layers: walk
                    return self._quantized_modules()
                if is_quantized_linear(obj):
                    names[key] = obj
                else:
                    names.pop(key, None)
        return list(names.items())

    def _lazy_keys(self, modules) -> tuple[set, dict]:
        """Patch keys that the lazy deltas carry (quantized weights, their additive bias diffs): nothing
        to merge, and asking ``patch_weight_to_device`` costs a module lookup per key. Also the layers'
        :func:`lazy_bias_terms` by name, for :meth:`install_lazy_deltas` to reuse."""
        keys, bias_terms_of = set(), {}
        for name, module in modules:
            keys.add(f"{name}.weight")
            bias_key = f"{name}.bias"
            terms = lazy_bias_terms(self.patches.get(bias_key, []), module.out_features)
            bias_terms_of[name] = terms
            if bias_key in self.patches and terms is not None:
                keys.add(bias_key)
        return keys, bias_terms_of

    def _record_merges(self):
        """Remember which patches are merged into which weights now (see :meth:`swap_patches_in_place`)."""
        setattr(self.model, MERGED_ATTR, {key: MergeSignature(self.patches[key]) for key in self.backup
                                          if key in self.patches})

    def _can_swap_patches_in_place(self, device_to, force_patch_weights) -> bool:
        m = self.model
        if not (m.current_weight_patches_uuid is not None and m.current_weight_patches_uuid != self.patches_uuid
                and not force_patch_weights and m.model_loaded_weight_memory > 0
                and not self.weight_wrapper_patches and not self.hook_patches and m.device == device_to):
            return False
        if not m.model_lowvram:
            return True
        # partially loaded: in place only while the streamed bytes stay the same (a strength change);
        # every unquantized module is resident then (_keep_unquantized_resident)
        streamer = getattr(m, STREAMER_ATTR, None)
        if streamer is None:
            return False
        offloaded = [(n, mod) for n, mod in self._quantized_modules() if is_offloaded(mod)]
        return self._stream_layout(offloaded) == streamer.layout

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        setattr(self.model, MERGED_ATTR, None)
        self._stop_streaming()
        self._unloading = True  # quantized layers only: see _load_list
        try:
            out = super().partially_unload(device_to, memory_to_free=memory_to_free, force_patch_weights=force_patch_weights)
        finally:
            self._unloading = False
        self.install_lazy_deltas(self.load_device)
        self._start_streaming(self.load_device)
        return out

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:  # before the object patches (a widened img_in) are taken out of the model
            self._stop_streaming()
            self.clear_lazy_deltas(keep_for_reuse=device_to is None)
            setattr(self.model, MERGED_ATTR, None)
        super().unpatch_model(device_to, unpatch_weights)
