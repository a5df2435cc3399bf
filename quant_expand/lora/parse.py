"""A LoRA file of any supported trainer to its canonical form."""
from __future__ import annotations

import torch

from ..errors import LoraFormatError
from ..flux import HEAD_DIM, swap_halves
from .canonical import LoraLayer, ParsedLora
from .checks import (
    _check_inputs,
    _check_magnitude,
    _check_missing,
    _check_vector,
    _layer_name,
    _read,
)
from .naming import (
    _module_and_role,
    _norm_key,
    _other_adapter,
    preview_keys,
    _targets_bfl,
    _targets_diffusers,
    _targets_kohya,
    detect_lora_format,
    norm_scale_keys,
)
from .peft import ADAPTER_METADATA, peft_scaling


def parse_lora(tensors, name: str, modules: dict[str, tuple[int, int]]) -> ParsedLora:
    """Read every tensor of a LoRA file once and return its canonical, model-checked form.

    ``tensors``: a TensorFile or a dict (anything with ``keys()`` and ``get(key)`` / ``[key]``).
    ``modules``: the model's Linears, BFL names -> (out_features, in_features) as the model is now
    (img_in may already be 128 wide after an earlier Control LoRA).

    Long on purpose: one pass that groups the keys, then checks the groups in the order a user fixes a
    file (format, targets, shapes, magnitudes, norms); the checks themselves live in ``checks.py``.
    """
    keys = list(tensors.keys())
    family, te_keys = detect_lora_format(name, keys)
    te_set = set(te_keys)

    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    norm_values: dict[str, tuple[str, torch.Tensor]] = {}
    reshapes: dict[str, tuple[str, torch.Tensor]] = {}
    unknown = []
    for key in keys:
        if key in te_set:
            continue
        parsed = None if _other_adapter(key) else _module_and_role(key, family)
        if parsed is None:
            unknown.append(key)
            continue
        module, role = parsed
        if role == "norm":
            norm = _norm_key(module, family, name)
            if norm in norm_values:
                raise LoraFormatError(f"{name}: {norm_values[norm][0]} and {key} both set {norm}; "
                                      f"re-save the LoRA in one format")
            norm_values[norm] = (key, _read(tensors, key, name))
        elif role == "reshape":
            reshapes[module] = (key, _read(tensors, key, name, numbers=True))
        else:
            group = groups.setdefault(module, {})
            if role in group:
                raise LoraFormatError(f"{name}: {module} has two {role} tensors ({group[role][0]} and {key}); "
                                      f"re-save the LoRA in one format")
            group[role] = (key, _read(tensors, key, name, numbers=role == "alpha"))
    if unknown:
        kinds = sorted({k for k in map(_other_adapter, unknown) if k})
        what = f"{', '.join(kinds)} keys" if kinds else "keys this loader does not understand"
        raise LoraFormatError(f"{name}: {what}: {preview_keys(unknown)}; this loader applies plain low-rank LoRAs "
                              f"(lora_A/lora_B or lora_down/lora_up): use ComfyUI's LoraLoader for other adapters")

    if family == "kohya":
        targets = _targets_kohya(groups, modules)
    elif family == "diffusers":
        targets = _targets_diffusers(groups, modules, name)
    else:
        targets = _targets_bfl(groups)
    _check_missing(name, sorted({t.module for t in targets.values() if t.module not in modules}))
    _check_missing(name, sorted(set(reshapes) - set(modules)))
    norm_keys = set(norm_scale_keys(modules))
    _check_missing(name, sorted(set(norm_values) - norm_keys))

    layers: list[LoraLayer] = []
    bias_diffs: dict[str, torch.Tensor] = {}
    widened: dict[str, int] = {}
    config = peft_scaling(getattr(tensors, "metadata", None), name)
    from_config = set()
    for module, group in groups.items():
        target = targets[module]
        source = "" if family in ("bfl", "comfy") else (module if family == "diffusers" else "lora_unet_" + module)
        what = _layer_name(target, source)
        out_features = modules[target.module][0]
        rows = out_features if target.rows is None else target.rows
        if "down" not in group and "up" not in group:
            if family == "comfy" and set(group) == {"bias"}:
                layer_bias = group["bias"]
                _check_vector(name, what, layer_bias, rows)
                bias_diffs[target.module] = layer_bias[1]
                continue
            present = ", ".join(k for k, _ in group.values())
            raise LoraFormatError(f"{name}: {what} has {present} but no lora_A/lora_B (lora_down/lora_up) pair; "
                                  f"the file is incomplete: download it again")
        for role, partner in (("down", "up"), ("up", "down")):
            if role not in group:
                have = group[partner][0]
                raise LoraFormatError(f"{name}: {what} has {have} but no matching "
                                      f"{'lora_A/lora_down' if role == 'down' else 'lora_B/lora_up'}; "
                                      f"the file is incomplete: download it again")
        (down_key, down), (up_key, up) = group["down"], group["up"]
        if down.ndim != 2 or up.ndim != 2:
            raise LoraFormatError(f"{name}: lora for {what} has shapes {tuple(down.shape)} / {tuple(up.shape)}; "
                                  f"FLUX Linears need 2-D lora_A [rank, in] and lora_B [out, rank]")
        if down.shape[0] == 0 or up.shape[1] == 0:
            raise LoraFormatError(f"{name}: lora for {what} has rank 0 ({down_key} {tuple(down.shape)}, {up_key} "
                                  f"{tuple(up.shape)}): an empty LoRA layer; the file is damaged: download it again")
        if down.shape[0] != up.shape[1]:
            raise LoraFormatError(f"{name}: lora for {what}: rank of {down_key} ({down.shape[0]}) does not match "
                                  f"rank of {up_key} ({up.shape[1]}); the file is damaged: download it again")
        if up.shape[0] != rows:
            raise LoraFormatError(f"{name}: lora for {what} has {up.shape[0]} outputs, model has {rows}; "
                                  f"use a LoRA made for this FLUX.1 model")
        new_width = _check_inputs(name, what, target.module, down.shape[1], modules)
        if new_width is not None:
            widened[target.module] = max(new_width, widened.get(target.module, 0))
        alpha = None
        if "alpha" in group:
            alpha_key, alpha_t = group["alpha"]
            if alpha_t.numel() != 1:
                raise LoraFormatError(f"{name}: {alpha_key} has {alpha_t.numel()} values, expected one number")
            alpha = float(alpha_t.reshape(()).item())
        elif config is not None:  # as an alpha over this rank: LoraLayer.scale is alpha / rank
            alpha = config.scale(module, down.shape[0]) * down.shape[0]
            from_config.add(alpha / down.shape[0])
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        _check_magnitude(name, what, down, up, scale)
        bias = None
        if "bias" in group:
            _check_vector(name, what, group["bias"], rows)
            bias_key, bias = group["bias"]
            if not bias_key.endswith(".diff_b") and scale != 1.0:
                bias = bias * scale  # PEFT: lora_B's output, its bias included, times alpha / r
        if target.swap_halves:
            # diffusers' norm_out.linear emits (scale, shift); BFL's adaLN_modulation.1 emits (shift, scale).
            # Only the output rows move: lora_A mixes inputs and stays as it is.
            up = swap_halves(up)
            bias = None if bias is None else swap_halves(bias)
        layers.append(LoraLayer(module=target.module, down=down, up=up, alpha=alpha, row_offset=target.row_offset,
                                bias=bias, source=source))

    for module, (key, value) in reshapes.items():
        if module != "img_in":
            raise LoraFormatError(f"{name}: {key} reshapes {module}; only img_in is widened by a FLUX Control LoRA")
        values = value.flatten().double()
        if not bool((values == values.round()).all()):
            shown = ", ".join(f"{v:g}" for v in values[:4].tolist())
            raise LoraFormatError(f"{name}: {key} holds [{shown}], not a shape of whole numbers; "
                                  f"the file is damaged: use another copy of this Control LoRA")
        shape = [int(v) for v in values.tolist()]
        if len(shape) != 2 or shape[0] != modules["img_in"][0]:
            raise LoraFormatError(f"{name}: {key} asks for img_in shape {shape}, model's img_in has "
                                  f"{modules['img_in'][0]} outputs; use a Control LoRA made for this FLUX.1 model")
        new_width = _check_inputs(name, "img_in (reshape_weight)", "img_in", shape[1], modules)
        if new_width is not None:
            widened["img_in"] = max(new_width, widened.get("img_in", 0))

    norm_sets = {}
    for key, (file_key, value) in norm_values.items():
        if tuple(value.shape) != (HEAD_DIM,):
            raise LoraFormatError(f"{name}: norm scale {file_key} has shape {tuple(value.shape)}, model's {key} "
                                  f"has ({HEAD_DIM},); use a Control LoRA made for FLUX.1")
        norm_sets[key] = value

    order = {m: i for i, m in enumerate(modules)}
    layers.sort(key=lambda l: (order[l.module], l.row_offset))
    alpha_note = ""
    if from_config:
        scales = ", ".join(f"{v:.4g}" for v in sorted(from_config))
        alpha_note = (f"alpha {config.lora_alpha:g} from the file's {ADAPTER_METADATA}"
                      f"{' (rsLoRA)' if config.use_rslora else ''}{' with alpha_pattern' if config.alpha_pattern else ''}: "
                      f"scale {scales}")
    return ParsedLora(name=name, source_format=family, layers=layers,
                      norm_sets={k: norm_sets[k] for k in sorted(norm_sets, key=_norm_order(modules))},
                      widened=widened, bias_diffs=bias_diffs, text_encoder_keys=te_keys, alpha_note=alpha_note)


def _norm_order(modules):
    order = {k: i for i, k in enumerate(norm_scale_keys(modules))}
    return lambda k: order[k]
