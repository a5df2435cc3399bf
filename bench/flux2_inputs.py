"""The FLUX.2 models ``bench_gpu.py --phase families`` samples: full-size [klein] 9B and [dev] with random
Gaussian weights (no download), as a bf16 file, as a pre-quantized NF4 file written directly, or as
ComfyUI's own model built in memory.

Where each full-size number comes from (ComfyUI 0.33 reads none of them from a table: its detection,
``comfy/model_detection.py``, takes the hidden width from ``img_in``/``txt_in``, the context width from
``txt_in`` and the block counts from the keys, with 128-wide heads and mlp_ratio 3):

- context width = the text encoder's hidden size x 3, because ComfyUI's FLUX.2 text encoder
  (``comfy/text_encoders/flux.py``, ``Flux2TEModel``) stacks three of its hidden states: Qwen3-8B is
  4096 wide (``comfy/text_encoders/llama.py``, ``Qwen3_8BConfig``) -> 12288 for [klein] 9B; Mistral 3
  Small is 5120 wide (``Mistral3Small24BConfig``) -> 15360 for [dev].
- [dev]: 8 double + 48 single blocks, 48 heads x 128 = 6144, context 15360 and a guidance embedder are
  the defaults of diffusers 0.42's ``Flux2Transformer2DModel`` (num_layers, num_single_layers,
  num_attention_heads, joint_attention_dim, guidance_embeds), which are [dev]'s release config.
- [klein] 9B: hidden 4096 (32 heads), 8 double + 24 single blocks, no guidance embedder: the released
  transformer config (``FLUX.2-klein-9B/transformer/config.json``) as other ports of it spell it out;
  neither ComfyUI 0.33 nor diffusers 0.42 fixes these. With them the model has 9.1 B
  parameters (``params_billion`` in the results), the size in its name.

Weights are N(0, 0.02^2) in bf16 and the QK-norm scales are ones, as bench/inputs.py makes FLUX.1. Each
tensor is drawn from its own seed (its index in the layout), so the bf16 model, its file and the NF4 file
hold the same values: the NF4 file is exactly what Load BnB Flux would make of the bf16 model on load.
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

from inputs import GIB  # also puts the pack's quant_expand on sys.path

from quant_expand.testing.family_models import HEAD_DIM, Flux2Config, flux2_linears

STD = 0.02


@dataclass(frozen=True)
class Flux2Model:
    key: str      # what --family calls it, and the rows' label
    title: str
    cfg: Flux2Config


KLEIN_9B = Flux2Model("klein9b", "FLUX.2 [klein] 9B", Flux2Config(
    hidden_size=4096, depth=8, depth_single_blocks=24, context_in_dim=12288, guidance=False))
DEV = Flux2Model("dev", "FLUX.2 [dev]", Flux2Config(
    hidden_size=6144, depth=8, depth_single_blocks=48, context_in_dim=15360, guidance=True))
# --small: the same kinds (no guidance embedder / one, different widths) at a size a CPU samples in seconds
KLEIN_SMALL = Flux2Model("klein9b", "FLUX.2 [klein] (small)", Flux2Config(
    hidden_size=256, depth=1, depth_single_blocks=2, context_in_dim=192, guidance=False))
DEV_SMALL = Flux2Model("dev", "FLUX.2 [dev] (small)", Flux2Config(
    hidden_size=384, depth=2, depth_single_blocks=2, context_in_dim=320, guidance=True))


def model_for(key: str, small: bool) -> Flux2Model:
    return {"klein9b": KLEIN_SMALL if small else KLEIN_9B, "dev": DEV_SMALL if small else DEV}[key]


def layout(cfg: Flux2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a FLUX.2 file, BFL names -> shape: the Linears' weights (no biases in FLUX.2) and
    the QK-norm scales."""
    out = {f"{name}.weight": shape for name, shape in flux2_linears(cfg).items()}
    for i in range(cfg.depth):
        for stream in ("img", "txt"):
            for q in ("query", "key"):
                out[f"double_blocks.{i}.{stream}_attn.norm.{q}_norm.scale"] = (HEAD_DIM,)
    for i in range(cfg.depth_single_blocks):
        for q in ("query", "key"):
            out[f"single_blocks.{i}.norm.{q}_norm.scale"] = (HEAD_DIM,)
    return out


def params_billion(cfg: Flux2Config) -> float:
    import math

    return round(sum(math.prod(s) for s in layout(cfg).values()) / 1e9, 3)


def config_info(model: Flux2Model) -> dict:
    c = model.cfg
    return {"title": model.title, "hidden": c.hidden_size, "double_blocks": c.depth, "single_blocks": c.depth_single_blocks,
            "context_in_dim": c.context_in_dim, "guidance_embedder": c.guidance, "params_billion": params_billion(c)}


def tensor(key: str, shape, index: int, device):
    """One tensor of the layout: QK-norm scales ones, weights N(0, STD^2) from the seed ``index``, bf16 on
    ``device``."""
    import torch

    if key.endswith(".scale"):
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    g = torch.Generator(device=device).manual_seed(index)
    return (torch.randn(shape, generator=g, device=device) * STD).to(torch.bfloat16)


def comfy_model_config(cfg: Flux2Config):
    """ComfyUI's model config for this layout, from its own detection on shapes alone (meta tensors)."""
    import comfy.model_detection
    import torch

    shapes = {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in layout(cfg).items()}
    model_config = comfy.model_detection.model_config_from_unet(shapes, "")
    if model_config is None or model_config.unet_config.get("image_model") != "flux2":
        raise RuntimeError(f"ComfyUI does not detect this layout as FLUX.2 (got {model_config})")
    return model_config


def check_layout(cfg: Flux2Config):
    """The layout here equals ComfyUI's model built from it (on the meta device: no memory), tensor for
    tensor: a wrong name or shape would otherwise only show as a warning of UNETLoader's."""
    import torch

    from quant_expand.flux import bfl_file_key

    model_config = comfy_model_config(cfg)
    model_config.set_inference_dtype(torch.bfloat16, None)
    model = model_config.get_model({}, "", device=torch.device("meta"))
    comfy = {bfl_file_key(k): tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()}
    ours = layout(cfg)
    if comfy != ours:
        raise RuntimeError(f"FLUX.2 layout differs from ComfyUI's model: only here {sorted(set(ours) - set(comfy))[:5]}, "
                           f"only in ComfyUI {sorted(set(comfy) - set(ours))[:5]}, shapes differ "
                           f"{[k for k in ours if k in comfy and ours[k] != comfy[k]][:5]}")


def _save_whole(path: str, tensors: dict, metadata=None):
    """safetensors to ``path`` through a temporary name: a command cut at its time limit leaves no
    partial file that the next command would take for a complete one."""
    from safetensors.torch import save_file

    partial = path + ".partial"
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, path)


def write_bf16_file(path: str, cfg: Flux2Config, device, log):
    """The random bf16 model as a file (generated on ``device``); kept if it exists."""
    if os.path.exists(path):
        log(f"model file exists: {path}")
        return
    t = time.perf_counter()
    sd = {key: tensor(key, shape, i, device).cpu() for i, (key, shape) in enumerate(layout(cfg).items())}
    _save_whole(path, sd)
    n = sum(v.numel() for v in sd.values())
    del sd
    gc.collect()
    log(f"wrote {n / 1e9:.2f} B params bf16 ({os.path.getsize(path) / GIB:.1f} GiB) in {time.perf_counter() - t:.0f} s")


def write_nf4_file(path: str, cfg: Flux2Config, device, log) -> dict:
    """The same model as a pre-quantized NF4 file (double quant, blocksize 64), written without a bf16
    file: each Linear generated on ``device`` and quantized there by the pack's own quantizer, the
    Linears FLUX.2 keeps unquantized (``families.FLUX2.unquantized``) stored in bf16, in the layout and
    metadata ``cli quantize`` and Save BnB Flux write. Kept if it exists. Returns the file's metadata."""
    from safetensors import safe_open

    from quant_expand.checkpoint.stored import StoredKind, StoredLinear, linear_tensors, quantize_weight
    from quant_expand.checkpoint.writer import file_metadata
    from quant_expand.families import FLUX2
    from quant_expand.flux import default_should_quantize
    from quant_expand.spec import QuantSpec

    if os.path.exists(path):
        log(f"model file exists: {path}")
        with safe_open(path, "pt") as f:
            return f.metadata()
    t = time.perf_counter()
    spec = QuantSpec(quant_type="nf4", double_quant=True)
    linears, tensors = {}, {}
    for i, (key, shape) in enumerate(layout(cfg).items()):
        w = tensor(key, shape, i, device)
        if not key.endswith(".weight"):
            tensors[key] = w.cpu()
            continue
        name = key[: -len(".weight")]
        if default_should_quantize(name, shape[1], spec, family=FLUX2):
            stored = quantize_weight(w, spec, device=device)
        else:
            stored = StoredLinear(StoredKind.FLOAT, weight=w.cpu())
        del w
        linears[name] = stored
        tensors.update(linear_tensors(name, stored))
    meta = file_metadata(linears, source=f"random {cfg} (bench/flux2_inputs.py)")
    _save_whole(path, tensors, meta)
    del tensors, linears
    gc.collect()
    log(f"wrote pre-quantized nf4 ({meta['quantized_layers']} of {meta['linear_layers']} Linears quantized, "
        f"{os.path.getsize(path) / GIB:.1f} GiB) in {time.perf_counter() - t:.0f} s")
    return meta


def build_bf16_model(cfg: Flux2Config, log):
    """ComfyUI's FLUX.2 model of this layout with the same random weights, built without a file: ComfyUI's
    detection and model class (``get_model``) create the model directly on ComfyUI's device (the GPU,
    where UNETLoader's model would run) with uninitialised weights (ComfyUI's layers skip weight init),
    then each parameter is filled in place from its seed. So the bf16 weights exist once, on the GPU: no
    state dict beside them, no copy in host memory (the stock path, ``load_diffusion_model_state_dict``
    on a GPU state dict, would copy it into a model built in host memory: the whole model twice).

    The patcher's offload device is that device too (what ComfyUI's --highvram gives every model): ComfyUI
    never moves these weights to the host, and dropping the patcher frees them. Dtype and manual cast
    are chosen by ComfyUI's own rules for a bf16 file, as UNETLoader would."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import torch

    from quant_expand.flux import bfl_file_key

    t = time.perf_counter()
    device = mm.get_torch_device()
    model_config = comfy_model_config(cfg)
    shapes = layout(cfg)
    index = {key: i for i, key in enumerate(shapes)}
    supported = list(model_config.supported_inference_dtypes)
    dtype = mm.unet_dtype(device, model_params=params_billion(cfg) * 1e9, supported_dtypes=supported,
                          weight_dtype=torch.bfloat16)
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, device, supported), device=device)
    model = model_config.get_model({}, "", device=device)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            key = bfl_file_key(name)
            p.copy_(tensor(key, shapes[key], index[key], device))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
    log(f"built ComfyUI's {cfg} in memory on {device} ({patcher.model_size() / GIB:.2f} GiB, "
        f"{dtype}) in {time.perf_counter() - t:.1f} s")
    return patcher
