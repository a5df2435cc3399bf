"""Save BnB Flux: a loaded model's stored bytes back to a pre-quantized file, nothing requantized."""
from __future__ import annotations

import torch

from ..checkpoint.stored import StoredKind, StoredLinear, linear_tensors, stored_from_layer
from ..checkpoint.writer import file_metadata
from ..errors import BnbFluxError
from ..families import TITLES, family_by_comfy_model
from ..flux import bfl_file_key
from ..layers import is_quantized_linear
from .patches import unmerged
from .report import load_report


def bnb_flux_state_for_saving(patcher, progress=None) -> tuple[dict, dict]:
    """The tensors and metadata of a Load BnB Flux model as a pre-quantized file (Forge 4-bit / bnb int8
    layout, BFL names): the stored bytes as they are, nothing requantized.

    Reads the model as *this* patcher defines it: another clone of the same model may be loaded right now
    with its LoRA merged into biases/norms and a widened ``img_in`` swapped in; ComfyUI keeps the originals
    in the backups every clone shares (``ModelPatcher.backup``, ``object_patches_backup``)."""
    model = patcher.model
    config = getattr(model, "model_config", None)
    if getattr(model, "diffusion_model", None) is None or config is None or \
            family_by_comfy_model(config.unet_config.get("image_model")) is None:
        raise BnbFluxError(f"Save BnB Flux saves {TITLES} models; this model is none of them")
    if patcher.patches or patcher.object_patches:
        raise BnbFluxError(f"Save BnB Flux saves the quantized model as loaded; this one has LoRA patches on "
                           f"{len(patcher.patches) + len(patcher.object_patches)} weights, which would need requantizing "
                           f"and are not saved: connect Save BnB Flux straight to Load BnB Flux (LoRAs stay "
                           f"separate files, applied lazily)")
    dm = patcher.get_model_object("diffusion_model")

    def original(key: str, current: torch.Tensor) -> torch.Tensor:
        return unmerged(patcher, f"diffusion_model.{key}", current).detach()

    linear_names = [n for n, m in dm.named_modules() if isinstance(m, torch.nn.Linear)]
    bar = progress(len(linear_names) + 1) if progress is not None else None
    linears: dict[str, StoredLinear] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name in linear_names:
        module = patcher.get_model_object(f"diffusion_model.{name}")
        bias = original(f"{name}.bias", module.bias) if module.bias is not None else None
        plain = not is_quantized_linear(module)
        stored = stored_from_layer(module, original(f"{name}.weight", module.weight) if plain else None, bias)
        linears[name] = stored
        tensors.update(linear_tensors(name, stored))
        if bar is not None:
            bar.update(1)
    owners = set(linear_names)
    for key, param in dm.named_parameters():
        if key.rpartition(".")[0] in owners:
            continue
        tensors[bfl_file_key(key)] = original(key, param).to("cpu").contiguous()
    if not any(s.kind is not StoredKind.FLOAT for s in linears.values()):
        raise BnbFluxError("Save BnB Flux: this model has no bitsandbytes layers (it did not come from Load BnB "
                           "Flux); load the file with Load BnB Flux, or convert it with "
                           "python -m quant_expand.cli quantize")
    if bar is not None:
        bar.update(1)
    report = load_report(patcher)
    return tensors, file_metadata(linears, source=report.file if report is not None else "")
