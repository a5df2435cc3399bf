"""A LoRA file of any supported trainer to its canonical form."""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import LoraFormatError
from ..families import Family, family_of_linears
from ..flux import HEAD_DIM, swap_halves
from .canonical import LoraLayer, ParsedLora
from .checks import (
    check_inputs,
    check_magnitude,
    check_missing,
    check_vector,
    layer_name,
    read_tensor,
)
from .naming import (
    detect_lora_format,
    module_and_role,
    norm_key,
    norm_scale_keys,
    other_adapter,
    preview_keys,
    targets_of,
)
from .peft import ADAPTER_METADATA, peft_scaling


def parse_lora(tensors, name: str, modules: dict[str, tuple[int, int]]) -> ParsedLora:
    """Read every tensor of a LoRA file once and return its canonical, model-checked form.

    ``tensors``: a TensorFile or a dict (anything with ``keys()`` and ``get(key)`` / ``[key]``).
    ``modules``: the model's Linears, BFL names -> (out_features, in_features) as the model is now
    (img_in may already be 128 wide after an earlier Control LoRA).

    The file is checked in the order a user fixes it: format, targets, shapes, magnitudes, norms.
    """
    keys = list(tensors.keys())
    family = family_of_linears(modules)
    lora_format, te_keys = detect_lora_format(name, keys, family)
    groups = _KeyGroups.read(tensors, name, keys, lora_format, set(te_keys), family)
    targets = targets_of(lora_format, groups.layers, modules, name)
    check_missing(name, sorted({t.module for t in targets.values() if t.module not in modules}))
    check_missing(name, sorted(set(groups.reshapes) - set(modules)))
    check_missing(name, sorted(set(groups.norms) - set(norm_scale_keys(modules))))

    out = _Canonical(name, lora_format, modules, family, peft_scaling(getattr(tensors, "metadata", None), name))
    for module, group in groups.layers.items():
        out.add_layer(module, group, targets[module])
    for module, (key, value) in groups.reshapes.items():
        out.add_reshape(module, key, value)
    for key, (file_key, value) in groups.norms.items():
        out.add_norm_set(key, file_key, value)
    return out.result(te_keys)


class _KeyGroups:
    """A LoRA file's tensors grouped by what they are for, each read once: per module its roles (down, up,
    alpha, bias) as ``(file key, tensor)``; norm scales by the model's norm key; reshape requests by module."""

    def __init__(self):
        self.layers: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
        self.norms: dict[str, tuple[str, torch.Tensor]] = {}
        self.reshapes: dict[str, tuple[str, torch.Tensor]] = {}

    @classmethod
    def read(cls, tensors, name: str, keys: list[str], lora_format: str, te_keys: set[str],
             family: Family) -> "_KeyGroups":
        groups, unknown = cls(), []
        for key in keys:
            if key in te_keys:
                continue
            parsed = None if other_adapter(key) else module_and_role(key, lora_format)
            if parsed is None:
                unknown.append(key)
                continue
            module, role = parsed
            if role == "norm":
                norm = norm_key(module, lora_format, name, family)
                if norm in groups.norms:
                    raise LoraFormatError(f"{name}: {groups.norms[norm][0]} and {key} both set {norm}; "
                                          f"re-save the LoRA in one format")
                groups.norms[norm] = (key, read_tensor(tensors, key, name))
            elif role == "reshape":
                groups.reshapes[module] = (key, read_tensor(tensors, key, name, numbers=True))
            else:
                group = groups.layers.setdefault(module, {})
                if role in group:
                    raise LoraFormatError(f"{name}: {module} has two {role} tensors ({group[role][0]} and {key}); "
                                          f"re-save the LoRA in one format")
                group[role] = (key, read_tensor(tensors, key, name, numbers=role == "alpha"))
        if unknown:
            kinds = sorted({k for k in map(other_adapter, unknown) if k})
            what = f"{', '.join(kinds)} keys" if kinds else "keys this loader does not understand"
            raise LoraFormatError(f"{name}: {what}: {preview_keys(unknown)}; this loader applies plain low-rank "
                                  f"LoRAs (lora_A/lora_B or lora_down/lora_up): use ComfyUI's LoraLoader for other "
                                  f"adapters")
        return groups


class _Canonical:
    """The canonical form of one file, built group by group, each checked against the model's ``modules``."""

    def __init__(self, name: str, lora_format: str, modules: dict[str, tuple[int, int]], family: Family, config):
        self.name, self.lora_format, self.modules, self.family = name, lora_format, modules, family
        self.config = config
        self.layers: list[LoraLayer] = []
        self.bias_diffs: dict[str, torch.Tensor] = {}
        self.widened: dict[str, int] = {}
        self.norm_sets: dict[str, torch.Tensor] = {}
        self.config_scales: set[float] = set()  # the scales taken from the file's PEFT config

    def _widen(self, module: str, width: Optional[int]):
        if width is not None:
            self.widened[module] = max(width, self.widened.get(module, 0))

    def add_layer(self, module: str, group: dict, target):
        name, lora_format = self.name, self.lora_format
        source = ("" if lora_format in ("bfl", "comfy") else module if lora_format == "diffusers"
                  else "lora_unet_" + module)
        what = layer_name(target, source)
        rows = self.modules[target.module][0] if target.rows is None else target.rows
        if "down" not in group and "up" not in group:
            if lora_format == "comfy" and set(group) == {"bias"}:
                check_vector(name, what, group["bias"], rows, self.family.title)
                self.bias_diffs[target.module] = group["bias"][1]
                return
            present = ", ".join(k for k, _ in group.values())
            raise LoraFormatError(f"{name}: {what} has {present} but no lora_A/lora_B (lora_down/lora_up) pair; "
                                  f"the file is incomplete: download it again")
        down, up = self._factors(what, group, rows)
        self._widen(target.module, check_inputs(name, what, target.module, down.shape[1], self.modules,
                                                self.family.title))
        alpha = self._alpha(module, group, down.shape[0])
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        check_magnitude(name, what, down, up, scale)
        bias = None
        if "bias" in group:
            check_vector(name, what, group["bias"], rows, self.family.title)
            bias_key, bias = group["bias"]
            if not bias_key.endswith(".diff_b") and scale != 1.0:
                bias = bias * scale  # PEFT: lora_B's output, its bias included, times alpha / r
        if target.swap_halves:
            # diffusers' norm_out.linear emits (scale, shift); BFL's adaLN_modulation.1 emits (shift, scale).
            # Only the output rows move: lora_A mixes inputs and stays as it is.
            up = swap_halves(up)
            bias = None if bias is None else swap_halves(bias)
        self.layers.append(LoraLayer(module=target.module, down=down, up=up, alpha=alpha,
                                     row_offset=target.row_offset, bias=bias, source=source))

    def _factors(self, what: str, group: dict, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's lora_A (down) and lora_B (up), checked against each other and the layer's rows."""
        name = self.name
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
                                  f"use a LoRA made for this {self.family.title} model")
        return down, up

    def _alpha(self, module: str, group: dict, rank: int) -> Optional[float]:
        """The layer's alpha: its own alpha tensor, else the file's PEFT config, else None (scale 1)."""
        if "alpha" in group:
            alpha_key, alpha_t = group["alpha"]
            if alpha_t.numel() != 1:
                raise LoraFormatError(f"{self.name}: {alpha_key} has {alpha_t.numel()} values, expected one number")
            return float(alpha_t.reshape(()).item())
        if self.config is None:
            return None
        alpha = self.config.scale(module, rank) * rank  # as an alpha over this rank: LoraLayer.scale is alpha / rank
        self.config_scales.add(alpha / rank)
        return alpha

    def add_reshape(self, module: str, key: str, value: torch.Tensor):
        name = self.name
        if module != "img_in":
            raise LoraFormatError(f"{name}: {key} reshapes {module}; only img_in is widened by a FLUX Control LoRA")
        values = value.flatten().double()
        if not bool((values == values.round()).all()):
            shown = ", ".join(f"{v:g}" for v in values[:4].tolist())
            raise LoraFormatError(f"{name}: {key} holds [{shown}], not a shape of whole numbers; "
                                  f"the file is damaged: use another copy of this Control LoRA")
        shape = [int(v) for v in values.tolist()]
        if len(shape) != 2 or shape[0] != self.modules["img_in"][0]:
            raise LoraFormatError(f"{name}: {key} asks for img_in shape {shape}, model's img_in has "
                                  f"{self.modules['img_in'][0]} outputs; use a Control LoRA made for this FLUX.1 model")
        self._widen("img_in", check_inputs(name, "img_in (reshape_weight)", "img_in", shape[1], self.modules,
                                           self.family.title))

    def add_norm_set(self, key: str, file_key: str, value: torch.Tensor):
        if tuple(value.shape) != (HEAD_DIM,):
            raise LoraFormatError(f"{self.name}: norm scale {file_key} has shape {tuple(value.shape)}, model's {key} "
                                  f"has ({HEAD_DIM},); use a Control LoRA made for FLUX.1")
        self.norm_sets[key] = value

    def result(self, te_keys: list[str]) -> ParsedLora:
        order = {m: i for i, m in enumerate(self.modules)}
        self.layers.sort(key=lambda l: (order[l.module], l.row_offset))
        alpha_note = ""
        if self.config_scales:
            config = self.config
            scales = ", ".join(f"{v:.4g}" for v in sorted(self.config_scales))
            alpha_note = (f"alpha {config.lora_alpha:g} from the file's {ADAPTER_METADATA}"
                          f"{' (rsLoRA)' if config.use_rslora else ''}"
                          f"{' with alpha_pattern' if config.alpha_pattern else ''}: scale {scales}")
        norm_sets = {k: self.norm_sets[k] for k in sorted(self.norm_sets, key=_norm_order(self.modules))}
        return ParsedLora(name=self.name, source_format=self.lora_format, layers=self.layers, norm_sets=norm_sets,
                          widened=self.widened, bias_diffs=self.bias_diffs, text_encoder_keys=te_keys,
                          alpha_note=alpha_note)


def _norm_order(modules):
    order = {k: i for i, k in enumerate(norm_scale_keys(modules))}
    return lambda k: order[k]
