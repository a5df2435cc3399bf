"""Tiny synthetic FLUX.1 models and LoRAs, written as real safetensors files for tests and demos.

Longer than the product's modules on purpose: it writes FLUX's names and shapes a second time, apart from
``quant_expand/flux.py``, so that the tests do not check the reader against its own table.

Pure torch + safetensors (+ bitsandbytes only for the 4-bit code books); never imports ComfyUI.
Key names follow BFL's FLUX.1 files and the LoRA formats ComfyUI 0.33's own loader parses.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from safetensors.torch import save_file

__all__ = [
    "TinyFluxConfig",
    "flux_shapes",
    "linear_modules",
    "norm_scale_keys",
    "default_lora_targets",
    "make_tiny_flux",
    "exact_4bit",
    "exact_int8",
    "save_safetensors",
    "LORA_KINDS",
    "make_lora",
    "make_control_lora",
    "diffusers_pieces",
    "bfl_lora_to_diffusers",
]

# ComfyUI's FLUX detection fixes these: head_dim = sum(axes_dim) = 128, patch 2x2, 16 latent
# output channels whatever in_channels is, and the sinusoidal time/guidance embedding width.
HEAD_DIM = 128
PATCH = 2
OUT_CHANNELS = 16
TIME_EMBED_DIM = 256
BNB_BLOCKSIZE = 64


@dataclass
class TinyFluxConfig:
    """Shape parameters of a FLUX.1 diffusion model; defaults give a ~4 M parameter model."""

    hidden_size: int = 256
    depth: int = 1
    depth_single_blocks: int = 1
    in_channels: int = 16
    context_in_dim: int = 64
    vec_in_dim: int = 64
    mlp_ratio: float = 4.0
    guidance_embed: bool = True

    def __post_init__(self):
        # ComfyUI derives num_heads = hidden_size // 128; anything else builds a different model.
        if self.hidden_size <= 0 or self.hidden_size % HEAD_DIM:
            raise ValueError(f"hidden_size must be a positive multiple of {HEAD_DIM}, got {self.hidden_size}")
        if self.depth < 1 or self.depth_single_blocks < 1:
            # detection and Control LoRA recognition look at block 0 of each kind
            raise ValueError("FLUX needs at least one double and one single block")

    @property
    def num_heads(self) -> int:
        return self.hidden_size // HEAD_DIM

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


def _linear_shapes(cfg: TinyFluxConfig) -> dict[str, tuple[int, int]]:
    """Every nn.Linear of FLUX.1 in module order: BFL module name -> (out_features, in_features)."""
    h, m = cfg.hidden_size, cfg.mlp_hidden
    out: dict[str, tuple[int, int]] = {
        "img_in": (h, cfg.in_channels * PATCH * PATCH),
        "time_in.in_layer": (h, TIME_EMBED_DIM),
        "time_in.out_layer": (h, h),
        "vector_in.in_layer": (h, cfg.vec_in_dim),
        "vector_in.out_layer": (h, h),
    }
    if cfg.guidance_embed:
        out["guidance_in.in_layer"] = (h, TIME_EMBED_DIM)
        out["guidance_in.out_layer"] = (h, h)
    out["txt_in"] = (h, cfg.context_in_dim)
    for i in range(cfg.depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_"
            out[p + "mod.lin"] = (6 * h, h)
            out[p + "attn.qkv"] = (3 * h, h)
            out[p + "attn.proj"] = (h, h)
            out[p + "mlp.0"] = (m, h)
            out[p + "mlp.2"] = (h, m)
    for i in range(cfg.depth_single_blocks):
        p = f"single_blocks.{i}."
        out[p + "linear1"] = (3 * h + m, h)
        out[p + "linear2"] = (h, h + m)
        out[p + "modulation.lin"] = (3 * h, h)
    out["final_layer.linear"] = (PATCH * PATCH * OUT_CHANNELS, h)
    out["final_layer.adaLN_modulation.1"] = (2 * h, h)
    return out


def linear_modules(cfg: TinyFluxConfig) -> list[str]:
    """BFL names (no ``.weight``) of every Linear layer, in module order."""
    return list(_linear_shapes(cfg))


def norm_scale_keys(cfg: TinyFluxConfig) -> list[str]:
    """Keys of the QK-norm scales (BFL spelling ``...norm.{query,key}_norm.scale``)."""
    keys = []
    for i in range(cfg.depth):
        for s in ("img", "txt"):
            keys += [f"double_blocks.{i}.{s}_attn.norm.query_norm.scale", f"double_blocks.{i}.{s}_attn.norm.key_norm.scale"]
    for i in range(cfg.depth_single_blocks):
        keys += [f"single_blocks.{i}.norm.query_norm.scale", f"single_blocks.{i}.norm.key_norm.scale"]
    return keys


def default_lora_targets(cfg: TinyFluxConfig) -> list[str]:
    """What a typical style LoRA trains: all block Linears, txt_in and the final layer (not img_in/embedders)."""
    return [n for n in linear_modules(cfg)
            if n.startswith(("double_blocks.", "single_blocks.", "final_layer.")) or n == "txt_in"]


def flux_shapes(cfg: TinyFluxConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a FLUX.1 diffusion model file (BFL names) -> shape, in module order."""
    lin = _linear_shapes(cfg)
    norms = set(norm_scale_keys(cfg))
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (o, i) in lin.items():
        shapes[f"{name}.weight"] = (o, i)
        shapes[f"{name}.bias"] = (o,)  # FLUX.1 has a bias on every Linear, qkv included
        # each attention's QK-norm lives beside it: <blk>.<s>_attn.norm.* / single_blocks.<i>.norm.*
        if name.endswith(("attn.qkv", "linear2")):
            owner = name.rsplit(".", 1)[0]
            for which in ("query", "key"):
                shapes[f"{owner}.norm.{which}_norm.scale"] = (HEAD_DIM,)
    assert norms == {k for k in shapes if k.endswith("_norm.scale")}
    return shapes


# Per-layer weight gain (times 1/sqrt(in)): modulation layers feed (1 + scale), shift and the
# residual gates, so they are kept smaller to stop activations growing through the blocks.
def _gain(name: str) -> float:
    if name.endswith(("mod.lin", "modulation.lin", "adaLN_modulation.1")):
        return 0.5
    return 1.0


def _weight_std(name: str, in_features: int) -> float:
    return _gain(name) / math.sqrt(in_features)


def exact_4bit(w: torch.Tensor, quant_type: str, blocksize: int = BNB_BLOCKSIZE) -> torch.Tensor:
    """Snap ``w`` onto values that bnb 4-bit (no double quant) reproduces exactly.

    Each ``blocksize`` block of the row-major flattening becomes ``code[i] * 2**k`` with one
    element at ``±2**k``, so bnb's absmax is a power of two and every value is a code point.
    """
    from bitsandbytes.functional import get_4bit_type  # only the code book, no kernels

    code = get_4bit_type(quant_type, device="cpu").to(torch.float32)
    flat = w.detach().to(torch.float32).flatten()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    # 2**ceil(log2(absmax)) >= absmax keeps the normalised block inside [-1, 1]
    k = torch.ceil(torch.log2(absmax.clamp_min(torch.finfo(torch.float32).tiny)))
    scale = torch.exp2(k)
    y = blocks / scale
    levels = torch.unique(code)  # sorted; fp4 lists 0 twice (+0 and -0)
    q = levels[torch.bucketize(y, (levels[1:] + levels[:-1]) / 2)]  # nearest code point
    # force the largest element to exactly ±1 so absmax is exactly 2**k (a zero block gets +1)
    top = blocks.abs().argmax(dim=1, keepdim=True)
    sign = torch.where(blocks.gather(1, top) < 0, -1.0, 1.0)
    q.scatter_(1, top, sign)
    if pad:
        # the padding zeros are not part of the tensor: keep the ±1 inside the real elements
        last = q[-1, : blocksize - pad]
        if last.abs().max() < 1:
            j = int(blocks[-1, : blocksize - pad].abs().argmax())
            last[j] = -1.0 if blocks[-1, j] < 0 else 1.0
    return (q * scale).flatten()[:n].view_as(w).contiguous()


def exact_int8(w: torch.Tensor) -> torch.Tensor:
    """Snap ``w`` onto values bnb LLM.int8 (per-row absmax) reproduces exactly: rows ``j * 2**-k``, max |j| = 127."""
    rows = w.detach().to(torch.float32).reshape(w.shape[0], -1)
    absmax = rows.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    step = torch.exp2(torch.ceil(torch.log2(absmax / 127)))
    j = torch.round(rows / step).clamp(-127, 127)
    top = rows.abs().argmax(dim=1, keepdim=True)
    j.scatter_(1, top, torch.where(rows.gather(1, top) < 0, -127.0, 127.0))
    return (j * step).view_as(w).contiguous()


def make_tiny_flux(cfg: Optional[TinyFluxConfig] = None, seed: int = 0, exact_for: Optional[str] = None,
                   prefix: str = "") -> dict[str, torch.Tensor]:
    """Random float32 FLUX.1 state dict (BFL names, optional key prefix) whose forward pass is well scaled.

    ``exact_for`` in {None, "nf4", "fp4", "int8"} snaps every Linear weight onto values that survive
    that bnb quantization exactly (blocksize 64, double quant off, quantized from float32).
    """
    cfg = cfg or TinyFluxConfig()
    if exact_for not in (None, "nf4", "fp4", "int8"):
        raise ValueError(f"exact_for must be None, 'nf4', 'fp4' or 'int8', got {exact_for!r}")
    g = torch.Generator().manual_seed(seed)
    lin = _linear_shapes(cfg)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in flux_shapes(cfg).items():
        module = key.rsplit(".", 1)[0]
        if key.endswith("_norm.scale"):
            t = 1.0 + 0.05 * torch.randn(shape, generator=g)
        elif key.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * _weight_std(module, lin[module][1])
            if exact_for == "int8":
                t = exact_int8(t)
            elif exact_for is not None:
                t = exact_4bit(t, exact_for)
        sd[prefix + key] = t.contiguous()
    return sd


def save_safetensors(sd: dict[str, torch.Tensor], path: str | os.PathLike, metadata: Optional[dict] = None) -> str:
    """Write ``sd`` (tensors made contiguous, detached, on CPU) to ``path``; metadata values become strings."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    save_file(tensors, path, metadata=meta)
    return path


# ---------------------------------------------------------------- LoRAs

LORA_KINDS = ("lora", "kohya", "loha", "lokr", "glora", "oft", "boft", "diff", "set")


def _kohya(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g)


def _rescale_to(delta_rms_now: float, target: float) -> float:
    return target / max(delta_rms_now, 1e-30)


def _factor(n: int, m: int, pref: int = 4) -> int:
    """Largest of pref, pref/2, ..., 1 dividing both dims (LoKr Kronecker factor)."""
    f = pref
    while f > 1 and (n % f or m % f):
        f //= 2
    return f


def make_lora(cfg: Optional[TinyFluxConfig] = None, kind: str = "lora", rank: int = 8, seed: int = 1,
              targets: Optional[Iterable[str]] = None, alpha: Optional[float] = None,
              scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Synthetic FLUX LoRA of one ``kind`` (see LORA_KINDS) in a key format ComfyUI 0.33 loads.

    ``targets``: BFL module names (default: ``default_lora_targets``; for "set", the QK-norm scales).
    The merged delta per weight has RMS about ``scale`` times the base weight's init RMS, whatever
    alpha/rank are. ``alpha=None``: "lora" writes no alpha key; "kohya"/"loha"/"lokr"/"glora" write
    rank/2 (their trainers always store one); "oft"/"boft" write 0 (their norm constraint: none).
    Formats: lora ``diffusion_model.<m>.lora_A/lora_B.weight``; kohya ``lora_unet_<m_>.lora_down/
    lora_up.weight``; LyCORIS kinds ``lora_unet_<m_>.<hada_*|lokr_*|a1..b2.weight|oft_blocks>``;
    diff ``diffusion_model.<m>.diff``/``.diff_b``; set ``diffusion_model.<norm>.set_weight``.

    Long on purpose: one short branch per kind, side by side, so the key formats read as one table.
    """
    cfg = cfg or TinyFluxConfig()
    if kind not in LORA_KINDS:
        raise ValueError(f"kind must be one of {LORA_KINDS}, got {kind!r}")
    if alpha is not None and alpha <= 0 and kind not in ("oft", "boft"):
        raise ValueError("alpha must be > 0 (ComfyUI scales by alpha/rank; 0 would zero the LoRA)")
    g = torch.Generator().manual_seed(seed)
    lin = _linear_shapes(cfg)
    sd: dict[str, torch.Tensor] = {}

    if kind == "set":
        # full replacement values for norm scales: near 1, clearly different from the base
        norms = [k[: -len(".scale")] for k in norm_scale_keys(cfg)]
        names = [n[: -len(".scale")] if n.endswith(".scale") else n for n in (targets or norms)]
        if any(n not in norms for n in names):
            raise ValueError(f"'set' targets must be QK-norm scales of this config, got {names}")
        for n in names:
            sd[f"diffusion_model.{n}.set_weight"] = 1.0 + scale * _randn(g, HEAD_DIM).abs() + scale
        return sd

    names = list(targets) if targets is not None else default_lora_targets(cfg)
    unknown = [n for n in names if n not in lin]
    if unknown:
        raise ValueError(f"not Linear modules of this FLUX config: {unknown}")

    def alpha_for(r: int) -> Optional[float]:
        if alpha is not None:
            return float(alpha)
        if kind in ("oft", "boft"):
            # LyCORIS always stores the constraint (0 = none). ComfyUI 0.33's BOFT needs the key:
            # without it `alpha > 0` raises on None, is logged, and the patch silently does nothing.
            return 0.0
        return r / 2 if kind in ("kohya", "loha", "lokr", "glora") else None

    for n in names:
        o, i = lin[n]
        target_rms = scale * _weight_std(n, i)
        r = max(1, min(rank, o, i))
        a = alpha_for(r)
        mult = (a / r) if a is not None and kind not in ("oft", "boft") else 1.0  # ComfyUI's alpha/rank

        if kind in ("lora", "kohya"):
            down = _randn(g, r, i) / math.sqrt(i)
            up = _randn(g, o, r) / math.sqrt(r)
            up *= _rescale_to(mult * (up @ down).pow(2).mean().sqrt().item(), target_rms)
            if kind == "lora":
                base = f"diffusion_model.{n}"
                sd[f"{base}.lora_A.weight"], sd[f"{base}.lora_B.weight"] = down, up
            else:
                base = _kohya(n)
                sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = down, up
        elif kind == "loha":
            base = _kohya(n)
            w1a, w1b = _randn(g, o, r), _randn(g, r, i)
            w2a, w2b = _randn(g, o, r), _randn(g, r, i)
            # delta = (w1a @ w1b) * (w2a @ w2b) * alpha / rank; split the rescale over both factors
            c = math.sqrt(_rescale_to(mult * ((w1a @ w1b) * (w2a @ w2b)).pow(2).mean().sqrt().item(), target_rms))
            sd[f"{base}.hada_w1_a"], sd[f"{base}.hada_w1_b"] = w1a * c, w1b
            sd[f"{base}.hada_w2_a"], sd[f"{base}.hada_w2_b"] = w2a * c, w2b
        elif kind == "lokr":
            base = _kohya(n)
            f = _factor(o, i)
            r = max(1, min(rank, o // f, i // f))
            a = alpha_for(r)
            mult = (a / r) if a is not None else 1.0  # dim = lokr_w2_b.shape[0]
            w1 = _randn(g, f, f)
            w2a, w2b = _randn(g, o // f, r), _randn(g, r, i // f)
            c = _rescale_to(mult * torch.kron(w1, w2a @ w2b).pow(2).mean().sqrt().item(), target_rms)
            sd[f"{base}.lokr_w1"], sd[f"{base}.lokr_w2_a"], sd[f"{base}.lokr_w2_b"] = w1, w2a * c, w2b
        elif kind == "glora":
            # ComfyUI's (and current LyCORIS') layout: a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in];
            # delta = (W @ a1 @ a2 + b1 @ b2) * alpha / rank. The W term is relative to W by
            # construction; each term gets RMS scale/sqrt(2) so together they make ~scale.
            base = _kohya(n)
            a1 = _randn(g, i, r) / math.sqrt(i)
            a2 = _randn(g, r, i) * (scale / math.sqrt(2) / mult / math.sqrt(r))
            b1, b2 = _randn(g, o, r), _randn(g, r, i) / math.sqrt(i)
            b1 *= _rescale_to(mult * (b1 @ b2).pow(2).mean().sqrt().item(), target_rms / math.sqrt(2))
            sd[f"{base}.a1.weight"], sd[f"{base}.a2.weight"] = a1, a2
            sd[f"{base}.b1.weight"], sd[f"{base}.b2.weight"] = b1, b2
        elif kind == "oft":
            # ComfyUI rotates output rows in blocks: oft_blocks [out // b, b, b]; R = Cayley(Q - Q^T)
            # ~ I + 2(Q - Q^T), so delta RMS ~ 2 * rms(Q - Q^T) * sqrt(b) * rms(W).
            base = _kohya(n)
            b = math.gcd(o, r if r > 1 else 2)
            q = _randn(g, o // b, b, b) * (scale / (2 * math.sqrt(2 * b)))
            sd[f"{base}.oft_blocks"] = q
        elif kind == "boft":
            # oft_blocks [m, out // b, b, b] with even b; stage s pairs rows 2**s * b/2 apart, so
            # out must be divisible by 2**m * b / 2. m = 2 stages, b = 4.
            base = _kohya(n)
            b, m = 4, 2
            if o % (2 ** (m - 1) * b):
                raise ValueError(f"boft: out_features {o} of {n} not divisible by {2 ** (m - 1) * b}")
            q = _randn(g, m, o // b, b, b) * (scale / (2 * math.sqrt(2 * b) * math.sqrt(m)))
            sd[f"{base}.oft_blocks"] = q
        elif kind == "diff":
            base = f"diffusion_model.{n}"
            sd[f"{base}.diff"] = _randn(g, o, i) * target_rms
            sd[f"{base}.diff_b"] = _randn(g, o) * (scale * 0.02)

        if a is not None and kind in ("lora", "kohya", "loha", "lokr", "glora", "oft", "boft"):
            sd[f"{base}.alpha"] = torch.tensor(float(a), dtype=torch.float32)
    return {k: v.to(torch.float32).contiguous() for k, v in sd.items()}


def make_control_lora(cfg: Optional[TinyFluxConfig] = None, rank: int = 16, seed: int = 2,
                      scale: float = 0.05) -> dict[str, torch.Tensor]:
    """BFL Control LoRA (FLUX.1-Canny/Depth-dev-lora layout) for this config, unprefixed BFL keys.

    Every Linear gets ``lora_A.weight`` [r, in] (no bias) and ``lora_B.weight`` [out, r] +
    ``lora_B.bias`` [out], r = min(rank, in, out); ``img_in.lora_A`` takes 2x the latent channels
    (image + control latent); every QK-norm ``.scale`` ships as a full tensor. No alpha keys.
    """
    cfg = cfg or TinyFluxConfig()
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for n, (o, i) in _linear_shapes(cfg).items():
        i_file = 2 * i if n == "img_in" else i
        r = max(1, min(rank, o, i_file))
        a = _randn(g, r, i_file) / math.sqrt(i_file)
        if n == "img_in":
            # the control half multiplies zero-padded base columns: give it the base weight's own
            # magnitude so the control image visibly matters; the image half is a small delta
            a[:, :i] *= scale
        b = _randn(g, o, r) / math.sqrt(r)
        target = _weight_std(n, i) * (1.0 if n == "img_in" else scale)
        b *= _rescale_to((b @ a).pow(2).mean().sqrt().item(), target)
        sd[f"{n}.lora_A.weight"] = a
        sd[f"{n}.lora_B.weight"] = b
        sd[f"{n}.lora_B.bias"] = _randn(g, o) * (scale * 0.02)
    for k in norm_scale_keys(cfg):
        sd[k] = 1.0 + 0.1 * _randn(g, HEAD_DIM)
    return {k: v.to(torch.float32).contiguous() for k, v in sd.items()}


# ---------------------------------------------------------------- diffusers layout

def diffusers_pieces(cfg: TinyFluxConfig) -> tuple[dict, dict]:
    """BFL module -> [(diffusers name, first row, rows or None)], and BFL norm key -> diffusers norm name.

    Written from diffusers' FluxTransformer2DModel layout, independently of the parser's table."""
    h, mlp = cfg.hidden_size, cfg.mlp_hidden
    full = lambda name: [(name, 0, None)]  # noqa: E731
    t = {"img_in": full("x_embedder"), "txt_in": full("context_embedder"),
         "time_in.in_layer": full("time_text_embed.timestep_embedder.linear_1"),
         "time_in.out_layer": full("time_text_embed.timestep_embedder.linear_2"),
         "vector_in.in_layer": full("time_text_embed.text_embedder.linear_1"),
         "vector_in.out_layer": full("time_text_embed.text_embedder.linear_2"),
         "guidance_in.in_layer": full("time_text_embed.guidance_embedder.linear_1"),
         "guidance_in.out_layer": full("time_text_embed.guidance_embedder.linear_2"),
         "final_layer.linear": full("proj_out"), "final_layer.adaLN_modulation.1": full("norm_out.linear")}
    norms = {}
    for i in range(cfg.depth):
        d, x = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        t[d + "img_attn.qkv"] = [(x + "attn.to_q", 0, h), (x + "attn.to_k", h, h), (x + "attn.to_v", 2 * h, h)]
        t[d + "txt_attn.qkv"] = [(x + "attn.add_q_proj", 0, h), (x + "attn.add_k_proj", h, h),
                                 (x + "attn.add_v_proj", 2 * h, h)]
        t[d + "img_attn.proj"] = full(x + "attn.to_out.0")
        t[d + "txt_attn.proj"] = full(x + "attn.to_add_out")
        t[d + "img_mlp.0"], t[d + "img_mlp.2"] = full(x + "ff.net.0.proj"), full(x + "ff.net.2")
        t[d + "txt_mlp.0"], t[d + "txt_mlp.2"] = full(x + "ff_context.net.0.proj"), full(x + "ff_context.net.2")
        t[d + "img_mod.lin"], t[d + "txt_mod.lin"] = full(x + "norm1.linear"), full(x + "norm1_context.linear")
        for s, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            norms[f"{d}{s}_attn.norm.query_norm.scale"] = x + "attn." + q
            norms[f"{d}{s}_attn.norm.key_norm.scale"] = x + "attn." + k
    for i in range(cfg.depth_single_blocks):
        d, x = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        t[d + "linear1"] = [(x + "attn.to_q", 0, h), (x + "attn.to_k", h, h), (x + "attn.to_v", 2 * h, h),
                            (x + "proj_mlp", 3 * h, mlp)]
        t[d + "linear2"] = full(x + "proj_out")
        t[d + "modulation.lin"] = full(x + "norm.linear")
        norms[d + "norm.query_norm.scale"] = x + "attn.norm_q"
        norms[d + "norm.key_norm.scale"] = x + "attn.norm_k"
    return t, norms


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


def bfl_lora_to_diffusers(bfl: dict, cfg: Optional[TinyFluxConfig] = None, prefix="transformer.", peft=False, swap_b=True, swap_a=False) -> dict:
    """A BFL-named LoRA (or Control LoRA) in diffusers/PEFT key layout: fused rows split into q/k/v (and
    proj_mlp), norm_out's scale/shift halves of lora_B and its bias swapped. ``swap_b=False`` /
    ``swap_a=True`` write the two classic conversion mistakes, for negative tests."""
    pieces, norms = diffusers_pieces(cfg or TinyFluxConfig())
    a_sfx, b_sfx = (".lora_A.default.weight", ".lora_B.default.weight") if peft else (".lora_A.weight", ".lora_B.weight")
    out = {}
    for key, v in bfl.items():
        key = key[len("diffusion_model."):] if key.startswith("diffusion_model.") else key
        if key.endswith("_norm.scale"):
            out[f"{prefix}{norms[key]}.weight"] = v.clone()
            continue
        for suffix, role in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "bias"), (".alpha", "alpha")):
            if key.endswith(suffix):
                m = key[: -len(suffix)]
                break
        adaln = m == "final_layer.adaLN_modulation.1"
        for name, start, rows in pieces[m]:
            t = v if role in ("A", "alpha") or rows is None else v[start:start + rows]
            if adaln and ((role in ("B", "bias") and swap_b) or (role == "A" and swap_a)):
                t = _swap_halves(t)
            out[prefix + name + {"A": a_sfx, "B": b_sfx, "bias": ".lora_B.bias", "alpha": ".alpha"}[role]] = t.clone()
    return out
