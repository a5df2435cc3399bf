"""diffusers/PEFT LoRAs on FLUX.2 [dev] and Chroma through ComfyUI's real executor (CPU, float32): PEFT's
adapter on diffusers' own transformer class, written by the pipeline's ``save_lora_weights``
(``tests/diffusers_family_files.py``), and the same keys without ``transformer.`` and as PEFT's
``base_model.model.``, on the Load BnB Flux model through Apply Control LoRA, Set LoRA Scale and stock
LoraLoaderModelOnly.

ComfyUI 0.33's LoRA key map (``comfy.lora.model_lora_keys_unet``) has FLUX.1's diffusers table for every
FLUX: for FLUX.2 it lacks the time/guidance embedders and the global modulation (``time_guidance_embed.*``,
``*_modulation.linear``), for Chroma the approximator (``distilled_guidance_layer.*``), and it drops those
keys (checked below). So the references are, on UNETLoader of the same BFL file:
- stock LoraLoaderModelOnly of the diffusers file alone: what the stock loader does on the quantized model too;
- that, then stock LoraLoaderModelOnly of a BFL-named file holding the LoRA pairs ComfyUI dropped, renamed by
  diffusers' own converter: the whole LoRA, what Apply Control LoRA and Set LoRA Scale must give.
The quantized graph runs first and ComfyUI's model loads only after it (one model in memory at a time).
The test models hold values nf4 keeps exactly: latents match to 1e-6.
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_family_files import linear_names, owner_renames, save_peft_lora
from quant_expand.testing.family_models import (
    ChromaConfig,
    Flux2Config,
    chroma_linears,
    flux2_linears,
    make_chroma,
    make_flux2,
)
from quant_expand.testing.prompts import (
    apply_lora,
    load_bnb_flux,
    rel_err,
    sampling_graph,
    set_lora_scale,
    stock_lora,
    unet_loader,
)
from quant_expand.testing.synthetic import save_safetensors

DEV = Flux2Config(guidance=True)
CHROMA = ChromaConfig()
STRENGTH = 0.8
# what ComfyUI 0.33 does not map for each family, by diffusers module name
FLUX2_UNMAPPED = {"time_guidance_embed.timestep_embedder.linear_1", "time_guidance_embed.timestep_embedder.linear_2",
                  "time_guidance_embed.guidance_embedder.linear_1", "time_guidance_embed.guidance_embedder.linear_2",
                  "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
                  "single_stream_modulation.linear"}
# Chroma's model is ~50x FLUX.2's: one Linear of each kind, the split q/k/v and proj_mlp slices of the fused
# ones included, the approximator's in/inner/out Linears, the unquantized embedders and output layer
CHROMA_TARGETS = ("x_embedder", "context_embedder", "distilled_guidance_layer.in_proj",
                  "distilled_guidance_layer.layers.0.linear_1", "distilled_guidance_layer.layers.4.linear_2",
                  "distilled_guidance_layer.out_proj", "transformer_blocks.0.attn.to_k",
                  "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.attn.to_add_out",
                  "transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.attn.to_q",
                  "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out", "proj_out")
CHROMA_UNMAPPED = {t for t in CHROMA_TARGETS if t.startswith("distilled_guidance_layer.")}


def _variants(lora: dict) -> dict[str, dict]:
    """The file as diffusers writes it and the two other spellings of its keys (the metadata stays)."""
    bare = {k[len("transformer."):]: v for k, v in lora.items()}
    return {"transformer": lora, "bare": bare, "peft": {f"base_model.model.{k}": v for k, v in bare.items()}}


def _write_loras(host, stem: str, cfg, bfl: dict, targets, unmapped: set, seed: int) -> dict:
    """The diffusers LoRA in its three spellings, and the BFL-named file of its ``unmapped`` pairs;
    names by "transformer", "bare", "peft", "rest"."""
    path = save_peft_lora(cfg, targets, host.model_path("loras", f"{stem}_peft"), seed=seed)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    lora = load_file(path)
    names = {}
    for spelling, sd in _variants(lora).items():
        names[spelling] = f"{stem}_{spelling}.safetensors"
        save_safetensors(sd, host.model_path("loras", names[spelling]), metadata=metadata)
    renames = owner_renames(cfg, bfl)
    rest = {f"diffusion_model.{renames[m]}.{ab}.weight": lora[f"transformer.{m}.{ab}.weight"]
            for m in unmapped for ab in ("lora_A", "lora_B")}
    names["rest"] = f"{stem}_rest_bfl.safetensors"
    save_safetensors(rest, host.model_path("loras", names["rest"]))
    return names


def _run(host, unet: str, loras: dict, common: dict, spellings=("transformer",), stock: bool = True) -> dict:
    """Latents: the quantized model with Apply Control LoRA at 1.0 then Set LoRA Scale (``qset``), Apply
    Control LoRA per spelling (``qa:<spelling>``) and, with ``stock``, the stock loader (``qs``); then
    UNETLoader with no LoRA (``base``), with the stock loader of the diffusers file (``ref_stock``, with
    ``stock``) and then of the rest too (``ref``). ``comfy_unmapped``: what ComfyUI's key map lacks."""
    g = {"q": load_bnb_flux(unet, "nf4", False), "q1": apply_lora(["q", 0], loras["transformer"], 1.0),
         "qset": set_lora_scale(["q1", 0], loras["transformer"], STRENGTH)}
    g = sampling_graph(g, ["qset", 0], key="qset", prefix="qset_", **common)
    for spelling in spellings:
        g[f"qa_{spelling}"] = apply_lora(["q", 0], loras[spelling], STRENGTH)
        g = sampling_graph(g, [f"qa_{spelling}", 0], key=f"qa:{spelling}", prefix=f"qa_{spelling}_", **common)
    if stock:
        g["qs"] = stock_lora(["q", 0], loras["transformer"], STRENGTH)
        g = sampling_graph(g, ["qs", 0], key="qs", prefix="qs_", **common)
    out = host.run(g)
    host.free_models()
    ref = {"r": unet_loader(unet), "rs": stock_lora(["r", 0], loras["transformer"], STRENGTH),
           "rf": stock_lora(["rs", 0], loras["rest"], STRENGTH)}
    ref = sampling_graph(ref, ["r", 0], key="base", prefix="rb_", **common)
    if stock:
        ref = sampling_graph(ref, ["rs", 0], key="ref_stock", prefix="rs_", **common)
    ref = sampling_graph(ref, ["rf", 0], key="ref", prefix="rf_", **common)
    out.update(host.run(ref))
    out["comfy_unmapped"] = _unmapped_by_comfyui(host.node_output("r"), host.model_path("loras", loras["transformer"]))
    host.free_models()
    return out


def _unmapped_by_comfyui(patcher, lora_path: str) -> set:
    """The diffusers modules of the LoRA file ComfyUI's own key map for the model does not know."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    modules = {k.rsplit(".lora_", 1)[0] for k in load_file(lora_path)}
    return {m[len("transformer."):] for m in modules if m not in key_map}


def _assert_equal_references(out: dict, unmapped: set):
    assert out["comfy_unmapped"] == unmapped
    for key in ["qset", *(k for k in out if k.startswith("qa:"))]:
        assert torch.isfinite(out[key]).all(), key
        assert rel_err(out[key], out["ref"]) < 1e-6, (key, rel_err(out[key], out["ref"]))
    assert rel_err(out["ref"], out["base"]) > 1e-3  # the LoRA acts
    if "qs" in out:
        assert rel_err(out["qs"], out["ref_stock"]) < 1e-6, rel_err(out["qs"], out["ref_stock"])
        # both parts act: what ComfyUI maps, and what only the pack does
        assert rel_err(out["ref_stock"], out["base"]) > 1e-3 and rel_err(out["ref"], out["ref_stock"]) > 1e-3


def test_flux2_dev(host):
    unet = "tiny_flux2_dev_peft_base_bf16.safetensors"
    bfl = make_flux2(DEV, seed=4)
    save_safetensors(bfl, host.model_path("diffusion_models", unet))
    loras = _write_loras(host, "tiny_flux2_dev_diffusers", DEV, bfl, linear_names(DEV), FLUX2_UNMAPPED, seed=31)
    common = dict(steps=2, size=4, pooled_dim=0, channels=DEV.in_channels, context_dim=DEV.context_in_dim)
    out = _run(host, unet, loras, common, spellings=("transformer", "bare", "peft"))
    _assert_equal_references(out, FLUX2_UNMAPPED)


def test_chroma(host):
    """One quantized sampling (Apply Control LoRA, then Set LoRA Scale: sampling Chroma costs seconds;
    the stock loader and the spellings are sampled on FLUX.2 above); the other spellings must parse to the
    same layers."""
    unet = "tiny_chroma_peft_base_bf16.safetensors"
    bfl = make_chroma(CHROMA, seed=0)
    save_safetensors(bfl, host.model_path("diffusion_models", unet))
    loras = _write_loras(host, "tiny_chroma_diffusers", CHROMA, bfl, CHROMA_TARGETS, CHROMA_UNMAPPED, seed=32)
    del bfl
    out = _run(host, unet, loras, dict(steps=1, size=4, pooled_dim=0), spellings=(), stock=False)
    _assert_equal_references(out, CHROMA_UNMAPPED)

    parse_lora = host.pack_module("quant_expand.lora.parse").parse_lora
    TensorFile = host.pack_module("quant_expand.checkpoint.tensor_files").TensorFile
    parsed = {}
    for spelling in ("transformer", "bare", "peft"):
        with TensorFile(host.model_path("loras", loras[spelling])) as tensors:
            parsed[spelling] = parse_lora(tensors, loras[spelling], chroma_linears(CHROMA))
    want = [(l.module, l.row_offset, l.rows, l.scale, l.down, l.up) for l in parsed["transformer"].layers]
    assert len(want) == len(CHROMA_TARGETS)
    for spelling in ("bare", "peft"):
        got = [(l.module, l.row_offset, l.rows, l.scale, l.down, l.up) for l in parsed[spelling].layers]
        assert [g[:4] for g in got] == [w[:4] for w in want], spelling
        assert all(torch.equal(g[4], w[4]) and torch.equal(g[5], w[5]) for g, w in zip(got, want)), spelling


FLUX1_SPELLINGS_ON_FLUX2 = {"time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
                            "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
                            "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
                            "transformer_blocks.0.ff_context.net.0.proj", "transformer_blocks.0.ff_context.net.2",
                            "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                            "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp",
                            "single_transformer_blocks.0.proj_out"}


@pytest.mark.parametrize("family", ["flux2", "chroma"])
def test_names_agree_with_comfyui_where_both_map(host, family):
    """The pack's diffusers names of each Linear against ComfyUI's table (comfy.utils.flux_to_diffusers, which
    its LoRA key map uses for every FLUX): the same rows and swap wherever both have a name. Only the pack
    names FLUX.2's embedders and global modulation and Chroma's approximator; only ComfyUI maps FLUX.1's
    spellings onto FLUX.2's embedders and blocks (its table is FLUX.1's; its proj_mlp slice has FLUX.1's
    4 x hidden rows, FLUX.2's gated MLP 6 x hidden), names no diffusers FLUX.2 model has."""
    import comfy.utils

    cfg, modules = (DEV, flux2_linears(DEV)) if family == "flux2" else (CHROMA, chroma_linears(CHROMA))
    table = comfy.utils.flux_to_diffusers({"depth": cfg.depth, "depth_single_blocks": cfg.depth_single_blocks,
                                           "hidden_size": cfg.hidden_size})
    comfy_names = {}
    for key, v in table.items():
        target, offset, fn = (v, None, None) if isinstance(v, str) else (v[0], v[1], v[2] if len(v) > 2 else None)
        if key.endswith(".weight") and target[: -len(".weight")] in modules:
            comfy_names[key[: -len(".weight")]] = (target[: -len(".weight")], offset and tuple(offset), fn is not None)
    ours = {d: (t.module, None if t.rows is None else (0, t.row_offset, t.rows), t.swap_halves)
            for d, t in host.pack_module("quant_expand.lora.naming").diffusers_linear_map(modules).items()}
    both = set(ours) & set(comfy_names)
    assert both and {d: ours[d] for d in both} == {d: comfy_names[d] for d in both}
    pack_only = FLUX2_UNMAPPED if family == "flux2" else {n for n in ours if n.startswith("distilled_guidance_layer.")}
    assert set(ours) - set(comfy_names) == pack_only
    assert len(pack_only) == (7 if family == "flux2" else 2 + 2 * CHROMA.approx_layers)
    assert set(comfy_names) - set(ours) == (FLUX1_SPELLINGS_ON_FLUX2 if family == "flux2" else set())


def _lora(modules: dict, names, prefix: str = "") -> dict:
    """lora_A/lora_B pairs for diffusers or BFL ``names`` (file spelling -> BFL Linear whose shape it takes)."""
    g = torch.Generator().manual_seed(3)
    out = {}
    for name, bfl in names.items():
        o, i = modules[bfl]
        out[f"{prefix}{name}.lora_A.weight"] = torch.randn(2, i, generator=g) / i
        out[f"{prefix}{name}.lora_B.weight"] = torch.randn(o, 2, generator=g) / i
    return out


def test_bare_keys_under_roots_both_namings_share():
    """Chroma's approximator and FLUX.2's global modulation have the same top-level name in BFL and diffusers
    names: a bare key there reads as the rest of its file does, and a file of only such keys as the names
    say (``linear_1`` and ``.linear`` are diffusers', ``in_layer`` and ``.lin`` BFL's)."""
    from quant_expand.lora.parse import parse_lora

    chroma = chroma_linears(CHROMA)
    approx_diffusers = {"distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
                        "distilled_guidance_layer.layers.1.linear_2": "distilled_guidance_layer.layers.1.out_layer"}
    approx_bfl = {"distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
                  "distilled_guidance_layer.layers.1.out_layer": "distilled_guidance_layer.layers.1.out_layer"}
    cases = [
        (chroma, {**approx_diffusers, "transformer_blocks.0.attn.to_add_out": "double_blocks.0.txt_attn.proj"}, "diffusers"),
        (chroma, {**approx_bfl, "double_blocks.0.img_attn.qkv": "double_blocks.0.img_attn.qkv"}, "bfl"),
        (chroma, approx_diffusers, "diffusers"),
        (chroma, approx_bfl, "bfl"),
        (flux2_linears(DEV), {"double_stream_modulation_img.linear": "double_stream_modulation_img.lin"}, "diffusers"),
        (flux2_linears(DEV), {"double_stream_modulation_img.lin": "double_stream_modulation_img.lin"}, "bfl"),
    ]
    for modules, names, fmt in cases:
        parsed = parse_lora(_lora(modules, names), "shared.safetensors", modules)
        assert parsed.source_format == fmt, names
        assert sorted(l.module for l in parsed.layers) == sorted(set(names.values())), names


def test_another_familys_diffusers_names_are_refused_naming_the_model():
    from quant_expand.errors import LoraFormatError
    from quant_expand.lora.parse import parse_lora
    from quant_expand.testing.synthetic import TinyFluxConfig, flux_shapes

    flux2 = flux2_linears(DEV)
    flux1 = {k[: -len(".weight")]: v for k, v in flux_shapes(TinyFluxConfig()).items() if k.endswith(".weight")}
    with pytest.raises(LoraFormatError, match=r"transformer_blocks\.0\.norm1\.linear is not a FLUX\.2 diffusers layer "
                                               r"name; the LoRA was made for another model: use a LoRA made for FLUX\.2"):
        parse_lora(_lora({"x": (6 * 256, 256)}, {"transformer_blocks.0.norm1.linear": "x"}, "transformer."),
                   "flux1.safetensors", flux2)
    with pytest.raises(LoraFormatError, match=r"time_guidance_embed\.timestep_embedder\.linear_1 is not a FLUX\.1 "
                                               r"diffusers layer name"):
        parse_lora(_lora(flux2, {"time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer"}, "transformer."),
                   "flux2.safetensors", flux1)
