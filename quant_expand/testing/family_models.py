"""Small FLUX.2 and Chroma diffusion models with each family's real key layout, for tests.

Names and shapes are written here from ComfyUI 0.33's model code (comfy/ldm/chroma, comfy/ldm/flux with
FLUX.2's options) and detection (comfy/model_detection.py), apart from ``quant_expand/families.py``, so the
tests do not check the loader against its own table.

Weights the loader quantizes are "binary": each 64-value block holds ``±2**k`` and zeros, with one
nonzero value per block, so bitsandbytes' absmax is ``2**k`` and every value is a code point of nf4 and
fp4 (no double quant), and bfloat16 holds them exactly: a bf16 file then is its own exact
reference. The layers a family keeps unquantized get ordinary random values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

HEAD_DIM = 128   # ComfyUI: num_heads = hidden // sum(axes_dim), axes summing to 128 in both families
BLOCK = 64       # bitsandbytes' 4-bit block size the loader uses


@dataclass
class ChromaConfig:
    """Chroma: ComfyUI fixes the approximator (in 64, hidden 5120, 5 layers, out 3072), and its output
    is the blocks' modulation, so hidden is 3072. One block of each kind: ~0.62 B parameters."""

    context_in_dim: int = 64
    depth: int = 1
    depth_single_blocks: int = 1

    hidden_size = 3072
    mlp_hidden = 4 * 3072
    in_channels = 64           # 16 latent channels x 2 x 2 patch
    approx_in, approx_hidden, approx_layers = 64, 5120, 5


@dataclass
class Flux2Config:
    """FLUX.2: ComfyUI reads hidden and context widths from img_in/txt_in and the block counts from the
    keys; mlp_ratio 3 (gated SiLU, so the first MLP Linear is twice as wide), no biases, 128 latent
    channels and patch 1. ``guidance``: [dev] has a guidance embedder, [klein] none."""

    hidden_size: int = 256
    depth: int = 1
    depth_single_blocks: int = 1
    in_channels: int = 128
    context_in_dim: int = 64
    guidance: bool = True

    @property
    def mlp_hidden(self) -> int:
        return 3 * self.hidden_size


def chroma_linears(cfg: ChromaConfig) -> dict[str, tuple[int, int]]:
    """BFL name -> (out, in) of every Linear of Chroma (all with a bias)."""
    h, m = cfg.hidden_size, cfg.mlp_hidden
    out = {"img_in": (h, cfg.in_channels), "txt_in": (h, cfg.context_in_dim),
           "distilled_guidance_layer.in_proj": (cfg.approx_hidden, cfg.approx_in)}
    for i in range(cfg.approx_layers):
        out[f"distilled_guidance_layer.layers.{i}.in_layer"] = (cfg.approx_hidden, cfg.approx_hidden)
        out[f"distilled_guidance_layer.layers.{i}.out_layer"] = (cfg.approx_hidden, cfg.approx_hidden)
    out["distilled_guidance_layer.out_proj"] = (h, cfg.approx_hidden)
    for i in range(cfg.depth):  # no img_mod/txt_mod: the approximator modulates
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_"
            out.update({p + "attn.qkv": (3 * h, h), p + "attn.proj": (h, h), p + "mlp.0": (m, h), p + "mlp.2": (h, m)})
    for i in range(cfg.depth_single_blocks):
        out[f"single_blocks.{i}.linear1"] = (3 * h + m, h)
        out[f"single_blocks.{i}.linear2"] = (h, h + m)
    out["final_layer.linear"] = (cfg.in_channels, h)  # no adaLN_modulation: the approximator gives it
    return out


def flux2_linears(cfg: Flux2Config) -> dict[str, tuple[int, int]]:
    """BFL name -> (out, in) of every Linear of FLUX.2 (none with a bias)."""
    h, m = cfg.hidden_size, cfg.mlp_hidden
    out = {"img_in": (h, cfg.in_channels), "time_in.in_layer": (h, 256), "time_in.out_layer": (h, h)}
    if cfg.guidance:
        out.update({"guidance_in.in_layer": (h, 256), "guidance_in.out_layer": (h, h)})
    out["txt_in"] = (h, cfg.context_in_dim)
    for i in range(cfg.depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_"
            out.update({p + "attn.qkv": (3 * h, h), p + "attn.proj": (h, h), p + "mlp.0": (2 * m, h), p + "mlp.2": (h, m)})
    for i in range(cfg.depth_single_blocks):
        out[f"single_blocks.{i}.linear1"] = (3 * h + 2 * m, h)
        out[f"single_blocks.{i}.linear2"] = (h, h + m)
    out["final_layer.linear"] = (cfg.in_channels, h)
    out["final_layer.adaLN_modulation.1"] = (2 * h, h)
    out["double_stream_modulation_img.lin"] = (6 * h, h)
    out["double_stream_modulation_txt.lin"] = (6 * h, h)
    out["single_stream_modulation.lin"] = (3 * h, h)
    return out


def _norm_scales(depth: int, singles: int) -> list[str]:
    keys = [f"double_blocks.{i}.{s}_attn.norm.{q}_norm.scale" for i in range(depth) for s in ("img", "txt")
            for q in ("query", "key")]
    return keys + [f"single_blocks.{i}.norm.{q}_norm.scale" for i in range(singles) for q in ("query", "key")]


def binary_weight(out_f: int, in_f: int, std: float, g: torch.Generator) -> torch.Tensor:
    """``±2**k`` and zeros (about a third), one nonzero value at the start of each 64-value block."""
    if (out_f * in_f) % BLOCK:
        raise ValueError(f"{out_f}x{in_f} is not a whole number of {BLOCK}-value blocks")
    k = round(math.log2(std * math.sqrt(1.5)))  # zeros take a third: this keeps the weight's RMS near std
    signs = torch.randint(0, 2, (out_f * in_f // BLOCK, BLOCK), generator=g, dtype=torch.int8) * 2 - 1
    keep = torch.rand(signs.shape, generator=g) > 1 / 3
    keep[:, 0] = True
    return (signs * keep).to(torch.float32).mul_(2.0 ** k).reshape(out_f, in_f)


def _build(linears: dict, norms: list, quantized: set, bias: bool, seed: int, dtype, gain) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (o, i) in linears.items():
        std = gain(name) / math.sqrt(i)
        if name in quantized:
            w = binary_weight(o, i, std, g)
        else:
            w = torch.randn(o, i, generator=g) * std
        sd[f"{name}.weight"] = w.to(dtype)
        if bias:
            sd[f"{name}.bias"] = (0.02 * torch.randn(o, generator=g)).to(dtype)
    for key in norms:
        sd[key] = (1.0 + 0.05 * torch.randn(HEAD_DIM, generator=g)).to(dtype)
    return sd


def chroma_quantized_linears(cfg: ChromaConfig) -> set[str]:
    """What Load BnB Flux quantizes by default: txt_in and the block Linears (written here, not read
    from the loader's table)."""
    return {n for n in chroma_linears(cfg) if n == "txt_in" or n.startswith(("double_blocks.", "single_blocks."))}


def flux2_quantized_linears(cfg: Flux2Config) -> set[str]:
    return {n for n in flux2_linears(cfg) if n == "txt_in" or n.startswith(("double_blocks.", "single_blocks."))}


def make_chroma(cfg: Optional[ChromaConfig] = None, seed: int = 0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A Chroma diffusion model state dict in the single-file release's names (QK-norm and approximator
    norms as ``.scale``)."""
    cfg = cfg or ChromaConfig()
    lin = chroma_linears(cfg)

    def gain(name):  # the approximator's output is every block's shift/scale/gate: keep it small
        return 0.1 if name == "distilled_guidance_layer.out_proj" else 1.0

    sd = _build(lin, _norm_scales(cfg.depth, cfg.depth_single_blocks), chroma_quantized_linears(cfg), True, seed,
                dtype, gain)
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(cfg.approx_layers):
        sd[f"distilled_guidance_layer.norms.{i}.scale"] = (1.0 + 0.05 * torch.randn(cfg.approx_hidden, generator=g)).to(dtype)
    return sd


def make_flux2(cfg: Optional[Flux2Config] = None, seed: int = 0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A FLUX.2 diffusion model state dict in BFL/ComfyUI names (QK-norms as ``.scale``)."""
    cfg = cfg or Flux2Config()
    lin = flux2_linears(cfg)

    def gain(name):  # modulation feeds (1 + scale), shifts and gates: smaller keeps activations bounded
        return 0.5 if "modulation" in name else 1.0

    return _build(lin, _norm_scales(cfg.depth, cfg.depth_single_blocks), flux2_quantized_linears(cfg), False, seed,
                  dtype, gain)


LORA_FORMATS = ("bfl", "kohya")


def make_family_lora(linears: dict[str, tuple[int, int]], targets, fmt: str = "bfl", rank: int = 4, seed: int = 11,
                     alpha: Optional[float] = None, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """An ordinary LoRA for the Linears ``targets`` of a model whose Linears are ``linears`` (BFL name ->
    (out, in), e.g. ``chroma_linears(cfg)``), in a key form ComfyUI 0.33's ``model_lora_keys_unet`` maps
    for every FLUX family: ``fmt`` "bfl" writes ``diffusion_model.<name>.lora_A/lora_B.weight`` (BFL and
    ComfyUI's own spelling, the generic form ComfyUI maps for any diffusion-model weight), "kohya"
    ``lora_unet_<name with underscores>.lora_down/lora_up.weight`` with an alpha.

    Each layer's delta has RMS about ``scale / sqrt(in)``: ``scale`` times the weights' own size here."""
    if fmt not in LORA_FORMATS:
        raise ValueError(f"fmt must be one of {LORA_FORMATS}, got {fmt!r}")
    unknown = [n for n in targets if n not in linears]
    if unknown:
        raise ValueError(f"not Linears of this model: {unknown}")
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in targets:
        o, i = linears[name]
        r = min(rank, o, i)
        a = alpha if alpha is not None else (r / 2 if fmt == "kohya" else None)
        mult = 1.0 if a is None else a / r  # ComfyUI scales B @ A by alpha / rank
        down = torch.randn(r, i, generator=g) / math.sqrt(i)
        up = torch.randn(o, r, generator=g) * (scale / math.sqrt(i) / mult)
        if fmt == "bfl":
            sd[f"diffusion_model.{name}.lora_A.weight"], sd[f"diffusion_model.{name}.lora_B.weight"] = down, up
            if a is not None:
                sd[f"diffusion_model.{name}.alpha"] = torch.tensor(float(a))
        else:
            base = "lora_unet_" + name.replace(".", "_")
            sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = down, up
            sd[f"{base}.alpha"] = torch.tensor(float(a))
    return sd
