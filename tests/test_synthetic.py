"""Tests for quant_expand.testing.synthetic: exact bnb round trips on CPU, and ComfyUI 0.33 really loading
the tiny FLUX model and parsing every synthetic LoRA kind (set COMFYUI_PATH to run those)."""

import logging
import os
import sys
import types

import pytest
import torch
import bitsandbytes.functional as bnbF
from safetensors import safe_open

from quant_expand.testing import synthetic as S
from quant_expand.testing.prompts import rel_err

CFG = S.TinyFluxConfig()
SCHNELL = S.TinyFluxConfig(hidden_size=384, depth=1, depth_single_blocks=2, context_in_dim=96, vec_in_dim=32,
                           guidance_embed=False)


def _dequant_4bit_roundtrip(w, q):
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type=q)
    return bnbF.dequantize_4bit(packed, state)


def _dequant_int8_roundtrip(w):
    cb, scb, _ = bnbF.int8_vectorwise_quant(w)
    return cb.float() * (scb / 127)[:, None]


def _roundtrip(w, exact_for):
    return _dequant_int8_roundtrip(w) if exact_for == "int8" else _dequant_4bit_roundtrip(w, exact_for)


# ---------------------------------------------------------------- CPU only


def test_flux_shapes_inventory():
    shapes = S.flux_shapes(CFG)
    lin = S.linear_modules(CFG)
    assert len(lin) == 23  # 10 per double block, 3 per single, img/txt_in, 3 embedders x2, final x2
    assert set(shapes) == {f"{m}.{p}" for m in lin for p in ("weight", "bias")} | set(S.norm_scale_keys(CFG))
    assert shapes["img_in.weight"] == (256, 64)
    assert shapes["single_blocks.0.linear1.weight"] == (3 * 256 + 1024, 256)
    assert shapes["single_blocks.0.linear2.weight"] == (256, 256 + 1024)
    assert shapes["final_layer.linear.weight"] == (64, 256)
    assert shapes["double_blocks.0.img_attn.norm.key_norm.scale"] == (128,)
    assert not any(k.startswith("guidance_in.") for k in S.flux_shapes(SCHNELL))
    assert "img_in" not in S.default_lora_targets(CFG)
    with pytest.raises(ValueError):
        S.TinyFluxConfig(hidden_size=200)


@pytest.mark.parametrize("exact_for", ["nf4", "fp4", "int8"])
def test_exact_weights_survive_bnb_quantization(exact_for):
    sd = S.make_tiny_flux(CFG, exact_for=exact_for)
    plain = S.make_tiny_flux(CFG)
    for m in S.linear_modules(CFG):
        w = sd[f"{m}.weight"]
        assert w.dtype == torch.float32
        assert torch.equal(_roundtrip(w, exact_for), w), m
        # snapping keeps the init statistics (the forward pass stays well scaled)
        ratio = w.std() / plain[f"{m}.weight"].std()
        assert 0.75 < ratio < 1.3, (m, ratio)
    # non-Linear tensors are untouched by exact_for
    assert torch.equal(sd["img_in.bias"], plain["img_in.bias"])
    assert torch.equal(sd["single_blocks.0.norm.key_norm.scale"], plain["single_blocks.0.norm.key_norm.scale"])


@pytest.mark.parametrize("exact_for", ["nf4", "fp4", "int8"])
def test_plain_weights_do_not_round_trip(exact_for):
    # negative control: the round trip comparison above can fail
    sd = S.make_tiny_flux(CFG)
    exact = [m for m in S.linear_modules(CFG) if torch.equal(_roundtrip(sd[f"{m}.weight"], exact_for), sd[f"{m}.weight"])]
    assert exact == []


def test_exact_helpers_on_odd_shapes():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(7, 45, generator=g) * 0.01  # 315 elements: last 4-bit block is partial
    for q in ("nf4", "fp4"):
        e = S.exact_4bit(w, q)
        assert torch.equal(_dequant_4bit_roundtrip(e, q), e)
    e = S.exact_int8(w)
    assert torch.equal(_dequant_int8_roundtrip(e), e)


def test_make_tiny_flux_determinism_and_prefix():
    a, b = S.make_tiny_flux(CFG, seed=5), S.make_tiny_flux(CFG, seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = S.make_tiny_flux(CFG, seed=6)
    assert not torch.equal(a["txt_in.weight"], c["txt_in.weight"])
    p = S.make_tiny_flux(CFG, seed=5, prefix="model.diffusion_model.")
    assert set(p) == {"model.diffusion_model." + k for k in a}
    scales = torch.cat([a[k] for k in S.norm_scale_keys(CFG)])
    assert (scales - 1).abs().max() < 0.3
    assert all(a[k].abs().max() < 0.2 for k in a if k.endswith(".bias"))
    with pytest.raises(ValueError):
        S.make_tiny_flux(CFG, exact_for="q8")


def test_save_safetensors_round_trip(tmp_path):
    lora = S.make_lora(CFG, "kohya")
    path = S.save_safetensors(lora, tmp_path / "sub" / "k.safetensors", metadata={"rank": 8})
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"rank": "8"}
        assert set(f.keys()) == set(lora)
        for k in lora:
            assert torch.equal(f.get_tensor(k), lora[k])
    assert lora["lora_unet_txt_in.alpha"].shape == ()  # kohya stores alpha as a 0-d tensor


def test_control_lora_layout():
    for rank in (16, 128):
        sd = S.make_control_lora(CFG, rank=rank)
        lin = S.linear_modules(CFG)
        assert len(sd) == 3 * len(lin) + len(S.norm_scale_keys(CFG))
        assert not any("alpha" in k for k in sd)
        assert sd["img_in.lora_A.weight"].shape == (min(rank, 128), 128)
        for m, (o, i) in zip(lin, [S.flux_shapes(CFG)[f"{m}.weight"] for m in lin]):
            r = min(rank, o, 2 * i if m == "img_in" else i)
            assert sd[f"{m}.lora_B.weight"].shape == (o, r)
            assert sd[f"{m}.lora_B.bias"].shape == (o,)
            assert f"{m}.lora_A.bias" not in sd
        for k in S.norm_scale_keys(CFG):
            assert sd[k].shape == (128,)
    assert S.make_control_lora(CFG, rank=128)["final_layer.linear.lora_A.weight"].shape == (64, 256)


# ---------------------------------------------------------------- ComfyUI 0.33


@pytest.fixture(scope="module")
def comfy():
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH not set: point it at a ComfyUI 0.33 checkout to run the ComfyUI parsing tests")
    if path not in sys.path:
        sys.path.insert(0, path)
    saved = sys.argv
    # ComfyUI parses argv when comfy.cli_args is first imported; --cpu avoids CUDA probing
    sys.argv = [saved[0], "--cpu"]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.lora
        import comfy.lora_convert
        import comfy.model_detection
        import comfy.sd
        import comfy.utils
    finally:
        sys.argv = saved
    return types.SimpleNamespace(sd=comfy.sd, lora=comfy.lora, lora_convert=comfy.lora_convert,
                                 utils=comfy.utils, model_detection=comfy.model_detection)


@pytest.fixture(scope="module")
def tiny(comfy, tmp_path_factory):
    """The tiny dev model, loaded by ComfyUI from a real file."""
    path = S.save_safetensors(S.make_tiny_flux(CFG), tmp_path_factory.mktemp("unet") / "tiny_flux.safetensors")
    patcher = comfy.sd.load_diffusion_model(path, {"dtype": torch.float32})
    return patcher, {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}


def _comfy_names(keys):
    """BFL file keys -> ComfyUI model state dict keys (Flux renames `_norm.scale` to `_norm.weight`)."""
    return {"diffusion_model." + (k[: -len(".scale")] + ".weight" if k.endswith("_norm.scale") else k) for k in keys}


@pytest.mark.parametrize("cfg,exact_for,prefix", [(CFG, None, ""), (CFG, "nf4", "model.diffusion_model."),
                                                   (SCHNELL, "int8", "")])
def test_comfy_detects_and_builds_tiny_flux(comfy, tmp_path, cfg, exact_for, prefix):
    path = S.save_safetensors(S.make_tiny_flux(cfg, exact_for=exact_for, prefix=prefix), tmp_path / "m.safetensors")
    patcher = comfy.sd.load_diffusion_model(path, {"dtype": torch.float32})
    mc = patcher.model.model_config
    assert type(mc).__name__ == ("Flux" if cfg.guidance_embed else "FluxSchnell")
    uc = mc.unet_config
    assert (uc["hidden_size"], uc["num_heads"], uc["depth"], uc["depth_single_blocks"]) == \
        (cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.depth_single_blocks)
    assert (uc["in_channels"], uc["context_in_dim"], uc["vec_in_dim"], uc["guidance_embed"]) == \
        (cfg.in_channels, cfg.context_in_dim, cfg.vec_in_dim, cfg.guidance_embed)
    msd = {k: v for k, v in patcher.model.state_dict().items() if k.startswith("diffusion_model.")}
    shapes = S.flux_shapes(cfg)
    assert set(msd) == _comfy_names(shapes)
    for k, shape in shapes.items():
        assert tuple(msd[_comfy_names([k]).pop()].shape) == shape, k
    # weights landed unchanged (exact ones included)
    src = S.make_tiny_flux(cfg, exact_for=exact_for)
    assert torch.equal(msd["diffusion_model.txt_in.weight"], src["txt_in.weight"])


def test_comfy_forward_is_sane(comfy, tiny):
    patcher, _ = tiny
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 32, 32, generator=g)
    ctx = torch.randn(1, 12, CFG.context_in_dim, generator=g)
    y = torch.randn(1, CFG.vec_in_dim, generator=g)
    with torch.no_grad():
        for t in (0.05, 0.5, 1.0):
            out = patcher.model.diffusion_model(x, torch.tensor([t]), ctx, y=y, guidance=torch.tensor([3.5]))
            assert out.shape == x.shape
            assert torch.isfinite(out).all()
            assert 0.3 < out.std().item() < 3.0, (t, out.std().item())


def _load_and_merge(comfy, patcher, base, lora_sd, strength, caplog):
    """Run ComfyUI's own LoRA path (convert -> key map -> load_lora -> add_patches) and merge each
    patched weight with comfy.lora.calculate_weight. Asserts ComfyUI logged nothing: unparsed keys
    ('lora key not loaded'), unmatched targets ('NOT LOADED') and adapter errors are all log lines."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        new, _ = comfy.sd.load_lora_for_models(patcher, None, lora_sd, strength, 0)
        merged = {}
        for k, patches in new.patches.items():
            w = base[k].clone().float()
            shape = comfy.lora.calculate_shape(patches, w, k)
            if tuple(shape) != tuple(w.shape):
                w = comfy.lora.pad_tensor_to_shape(w, shape)
            merged[k] = comfy.lora.calculate_weight(patches, w, k)
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == []
    return merged


EXPECTED_PATCHES = {"lora": 16, "kohya": 16, "loha": 16, "lokr": 16, "glora": 16, "oft": 16, "boft": 16,
                    "diff": 32, "set": 6}


@pytest.mark.parametrize("kind", S.LORA_KINDS)
def test_comfy_parses_every_lora_kind(comfy, tiny, tmp_path, caplog, kind):
    patcher, base = tiny
    scale = 0.05
    lora = S.make_lora(CFG, kind, scale=scale)
    path = S.save_safetensors(lora, tmp_path / f"{kind}.safetensors")
    merged = _load_and_merge(comfy, patcher, base, comfy.utils.load_torch_file(path), 1.0, caplog)

    if kind == "set":
        expected = _comfy_names(S.norm_scale_keys(CFG))
    else:
        expected = {f"diffusion_model.{m}.weight" for m in S.default_lora_targets(CFG)}
        if kind == "diff":
            expected |= {f"diffusion_model.{m}.bias" for m in S.default_lora_targets(CFG)}
    assert set(merged) == expected
    assert len(merged) == EXPECTED_PATCHES[kind]
    for k, w in merged.items():
        if kind == "set":
            assert torch.equal(w, lora[k[: -len(".weight")] + ".set_weight"])
            continue
        rel = rel_err(w, base[k])
        assert scale / 3 < rel < scale * 3, (k, rel)


def test_comfy_lora_can_target_img_in_and_embedders(comfy, tiny, caplog):
    patcher, base = tiny
    merged = _load_and_merge(comfy, patcher, base, S.make_lora(CFG, "lora", targets=S.linear_modules(CFG), alpha=4),
                             1.0, caplog)
    assert set(merged) == {f"diffusion_model.{m}.weight" for m in S.linear_modules(CFG)}
    assert len(merged) == 23


def test_comfy_parses_bfl_control_lora(comfy, tiny, tmp_path, caplog):
    patcher, base = tiny
    lora = S.make_control_lora(CFG, rank=16)
    loaded = comfy.utils.load_torch_file(S.save_safetensors(lora, tmp_path / "control.safetensors"))
    converted = comfy.lora_convert.convert_lora(loaded)
    assert "diffusion_model.img_in.reshape_weight" in converted  # recognised as BFL Control LoRA
    lin, norms = S.linear_modules(CFG), S.norm_scale_keys(CFG)
    merged = _load_and_merge(comfy, patcher, base, loaded, 0.5, caplog)
    assert set(merged) == ({f"diffusion_model.{m}.weight" for m in lin} | {f"diffusion_model.{m}.bias" for m in lin}
                           | _comfy_names(norms))
    assert len(merged) == 52
    w_in = merged["diffusion_model.img_in.weight"]
    assert w_in.shape == (256, 128)  # zero-padded from 64 inputs, then the delta added
    delta = w_in - torch.cat([base["diffusion_model.img_in.weight"], torch.zeros(256, 64)], dim=1)
    expected = 0.5 * lora["img_in.lora_B.weight"] @ lora["img_in.lora_A.weight"]
    assert torch.allclose(delta, expected, atol=1e-6)
    assert delta[:, 64:].abs().mean() > 0.01  # the control channels really do something
    bias = merged["diffusion_model.img_in.bias"] - base["diffusion_model.img_in.bias"]
    assert torch.allclose(bias, 0.5 * lora["img_in.lora_B.bias"], atol=1e-7)
    for k in norms:  # set patches replace at full value whatever the strength
        assert torch.equal(merged[_comfy_names([k]).pop()], lora[k])
