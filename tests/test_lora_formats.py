"""quant_expand.lora: every LoRA key format -> one canonical form, and every way a file can be wrong.

Reference for every comparison: the dense update a BFL file describes, computed here straight from its
keys (``scale * B @ A`` on the module's rows, ``lora_B.bias``, full norm scales). Tolerances:
- torch.equal where the parser only moves data (BFL, kohya, ComfyUI's converted form: the same
  tensors, the same float32 product);
- relative L2 error < 1e-6 for diffusers files, whose q/k/v (and proj_mlp) pieces are multiplied
  separately: the same dot products, blocked differently by the matmul kernel (float32 eps ~ 1.2e-7).
The ComfyUI tests (COMFYUI_PATH) check the diffusers name table against ``comfy.utils.flux_to_diffusers``
and the parsed deltas against the weights ComfyUI's own LoRA loader computes.
"""
from __future__ import annotations


import pytest
import torch

from quant_expand.testing import synthetic as S
from quant_expand.errors import BnbFluxError
from quant_expand.checkpoint.tensor_files import TensorFile
from quant_expand.errors import LoraFormatError
from quant_expand.lora.canonical import ParsedLora
from quant_expand.lora.parse import parse_lora
from quant_expand.testing.prompts import rel_err

CFG = S.TinyFluxConfig()  # hidden 256, 1 double + 1 single block, img_in 64 -> 256
DEV = S.TinyFluxConfig(hidden_size=3072, depth=19, depth_single_blocks=38, context_in_dim=4096, vec_in_dim=768)


def modules_of(cfg: S.TinyFluxConfig, img_in_width: int | None = None) -> dict[str, tuple[int, int]]:
    mods = {k[: -len(".weight")]: v for k, v in S.flux_shapes(cfg).items() if k.endswith(".weight")}
    if img_in_width is not None:
        mods["img_in"] = (mods["img_in"][0], img_in_width)
    return mods


MODS = modules_of(CFG)
MODS_WIDE = modules_of(CFG, img_in_width=128)  # after a Control LoRA widened img_in


# ---------------------------------------------------------------- reference and converters


def dense_from_bfl(sd: dict, modules: dict) -> dict:
    """What a BFL (or ``diffusion_model.``-prefixed) LoRA file does, read straight from its keys.

    module -> [weight delta [out, width], bias delta [out]]; "norms" -> {key: value}.
    """
    plain = {k[len("diffusion_model."):] if k.startswith("diffusion_model.") else k: v for k, v in sd.items()}
    out: dict = {"norms": {}}
    for key, a in plain.items():
        if key.endswith("_norm.scale"):
            out["norms"][key] = a
        if not key.endswith(".lora_A.weight"):
            continue
        m = key[: -len(".lora_A.weight")]
        b = plain[f"{m}.lora_B.weight"]
        alpha = plain.get(f"{m}.alpha")
        scale = 1.0 if alpha is None else alpha.item() / a.shape[0]
        o, i = modules[m]
        w = torch.zeros(o, max(i, a.shape[1]))
        w[:, : a.shape[1]] = scale * (b @ a)
        bias = plain.get(f"{m}.lora_B.bias", torch.zeros(o)).clone()
        out[m] = [w, bias]
    return out


def dense_from_parsed(p: ParsedLora, modules: dict) -> dict:
    """The canonical form's update: scale * up @ down placed at row_offset (down zero-padded), + biases."""
    out: dict = {"norms": dict(p.norm_sets)}
    for layer in p.layers:
        o, i = modules[layer.module]
        width = max(i, p.widened.get(layer.module, i))
        w, b = out.setdefault(layer.module, [torch.zeros(o, width), torch.zeros(o)])
        rows = slice(layer.row_offset, layer.row_offset + layer.rows)
        w[rows, : layer.down.shape[1]] += layer.scale * (layer.up @ layer.down)
        if layer.bias is not None:
            b[rows] += layer.bias
    for m, bias in p.bias_diffs.items():
        o, i = modules[m]
        out.setdefault(m, [torch.zeros(o, i), torch.zeros(o)])[1] += bias
    return out


def assert_same_update(got: dict, want: dict, exact: bool):
    assert set(got) == set(want), set(got) ^ set(want)
    assert set(got["norms"]) == set(want["norms"])
    for k, v in want["norms"].items():
        assert torch.equal(got["norms"][k], v), k
    for m in want:
        if m == "norms":
            continue
        for g, w, what in zip(got[m], want[m], ("weight", "bias")):
            assert g.shape == w.shape, (m, what)
            if exact:
                assert torch.equal(g, w), (m, what)
            else:
                assert rel_err(g, w) < 1e-6, (m, what, rel_err(g, w))


def to_comfy(bfl: dict, up_down=False) -> dict:
    """BFL Control LoRA -> ComfyUI's converted key form (what comfy.lora_convert hands its loader)."""
    out = {}
    for k, v in bfl.items():
        k = k.replace(".lora_B.bias", ".diff_b").replace("_norm.scale", "_norm.set_weight")
        if up_down:
            k = k.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")
        out["diffusion_model." + k] = v
    if "img_in.lora_A.weight" in bfl:
        out["diffusion_model.img_in.reshape_weight"] = torch.tensor(
            [bfl["img_in.lora_B.weight"].shape[0], bfl["img_in.lora_A.weight"].shape[1]])
    return out


def kohya_to_bfl(sd: dict, cfg=CFG) -> dict:
    """kohya -> BFL keys, by the known module list (not by the parser's name matching)."""
    names = {"lora_unet_" + m.replace(".", "_"): m for m in S.linear_modules(cfg)}
    out = {}
    for k, v in sd.items():
        stem, suffix = k.split(".", 1)
        suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(suffix, suffix)
        out[f"{names[stem]}.{suffix}"] = v
    return out


class CountingReader:
    """A TensorFile stand-in that counts reads (the parser must read each tensor once)."""

    def __init__(self, sd):
        self.sd, self.reads = sd, {}

    def keys(self):
        return list(self.sd)

    def get(self, key):
        self.reads[key] = self.reads.get(key, 0) + 1
        return self.sd[key]


# ---------------------------------------------------------------- formats parse to the BFL update


@pytest.mark.parametrize("alpha", [None, 4.0])
def test_bfl_lora_with_diffusion_model_prefix(alpha):
    sd = S.make_lora(CFG, kind="lora", rank=8, alpha=alpha)
    assert all(k.startswith("diffusion_model.") for k in sd)
    p = parse_lora(sd, "style.safetensors", MODS)
    assert p.source_format == "bfl" and not p.is_control and p.widened == {} and p.norm_sets == {}
    assert len(p.layers) == len(S.default_lora_targets(CFG))
    for layer in p.layers:
        assert torch.equal(layer.down, sd[f"diffusion_model.{layer.module}.lora_A.weight"])
        assert torch.equal(layer.up, sd[f"diffusion_model.{layer.module}.lora_B.weight"])
        assert layer.alpha == alpha and layer.row_offset == 0 and layer.bias is None
        assert layer.scale == (1.0 if alpha is None else alpha / 8)
    assert_same_update(dense_from_parsed(p, MODS), dense_from_bfl(sd, MODS), exact=True)


@pytest.mark.parametrize("prefix", ["", "diffusion_model.", "model.diffusion_model."])
def test_bfl_control_lora(prefix):
    raw = S.make_control_lora(CFG, rank=16)
    sd = {prefix + k: v for k, v in raw.items()}
    reader = CountingReader(sd)
    p = parse_lora(reader, "canny.safetensors", MODS)
    assert reader.reads == {k: 1 for k in sd}  # every tensor read exactly once
    assert p.source_format == "bfl" and p.is_control
    assert p.widened == {"img_in": 128}
    assert set(p.norm_sets) == set(S.norm_scale_keys(CFG))
    assert len(p.layers) == len(S.linear_modules(CFG)) and all(l.bias is not None for l in p.layers)
    assert [l.module for l in p.layers] == S.linear_modules(CFG)  # model order
    assert_same_update(dense_from_parsed(p, MODS), dense_from_bfl(raw, MODS), exact=True)


def test_control_lora_on_already_widened_model_and_old_lora_on_widened_img_in():
    control = parse_lora(S.make_control_lora(CFG), "canny.safetensors", MODS_WIDE)
    assert control.widened == {} and control.is_control  # img_in is already 128 wide
    # a LoRA made for the 64-input img_in still applies: its lora_A is zero-padded to 128
    sd = S.make_lora(CFG, kind="lora", targets=["img_in", "txt_in"])
    p = parse_lora(sd, "style.safetensors", MODS_WIDE)
    assert p.widened == {} and p.layers[0].down.shape == (8, 64)
    assert_same_update(dense_from_parsed(p, MODS_WIDE), dense_from_bfl(sd, MODS_WIDE), exact=True)


def test_kohya():
    sd = S.make_lora(CFG, kind="kohya", rank=8)  # alpha rank/2 -> scale 0.5
    p = parse_lora(sd, "kohya.safetensors", MODS)
    assert p.source_format == "kohya" and {l.alpha for l in p.layers} == {4.0}
    assert {l.source for l in p.layers} == {"lora_unet_" + m.replace(".", "_") for m in S.default_lora_targets(CFG)}
    assert_same_update(dense_from_parsed(p, MODS), dense_from_bfl(kohya_to_bfl(sd), MODS), exact=True)


@pytest.mark.parametrize("up_down", [False, True])
def test_comfy_converted_control_lora_equals_bfl(up_down):
    raw = S.make_control_lora(CFG)
    bfl = parse_lora(raw, "canny.safetensors", MODS)
    p = parse_lora(to_comfy(raw, up_down=up_down), "canny.safetensors", MODS)
    assert p.source_format == "comfy" and p.widened == bfl.widened == {"img_in": 128}
    assert len(p.layers) == len(bfl.layers)
    for a, b in zip(p.layers, bfl.layers):
        assert (a.module, a.row_offset, a.alpha) == (b.module, b.row_offset, b.alpha)
        assert torch.equal(a.down, b.down) and torch.equal(a.up, b.up) and torch.equal(a.bias, b.bias)
    assert p.norm_sets.keys() == bfl.norm_sets.keys()
    assert all(torch.equal(p.norm_sets[k], bfl.norm_sets[k]) for k in p.norm_sets)


def test_comfy_set_and_lone_bias_diff():
    sets = S.make_lora(CFG, kind="set")
    p = parse_lora(sets, "norms.safetensors", MODS)
    assert p.source_format == "comfy" and p.layers == [] and p.is_control and p.widened == {}
    assert {f"diffusion_model.{k[:-len('.scale')]}.set_weight" for k in p.norm_sets} == set(sets)
    # ComfyUI's old spelling "<norm>.scale.set_weight" reads the same
    old = {k.replace("_norm.set_weight", "_norm.scale.set_weight"): v for k, v in sets.items()}
    assert parse_lora(old, "norms.safetensors", MODS).norm_sets.keys() == p.norm_sets.keys()
    # a diff_b without a low-rank pair on its module is a plain bias diff
    lone = {"diffusion_model.txt_in.diff_b": torch.randn(256),
            **{k: v for k, v in S.make_lora(CFG, kind="lora", targets=["img_in"]).items()}}
    p = parse_lora(lone, "bias.safetensors", MODS)
    assert p.source_format == "comfy" and list(p.bias_diffs) == ["txt_in"]
    assert torch.equal(p.bias_diffs["txt_in"], lone["diffusion_model.txt_in.diff_b"])
    assert [l.module for l in p.layers] == ["img_in"]


@pytest.mark.parametrize("prefix,peft", [("transformer.", False), ("", False), ("base_model.model.", True),
                                         ("base_model.model.transformer.", True)])
def test_diffusers_lora(prefix, peft):
    targets = S.linear_modules(CFG)  # every Linear, the fused and the swapped ones included
    bfl = S.make_lora(CFG, kind="lora", rank=8, alpha=2.0, targets=targets)
    p = parse_lora(S.bfl_lora_to_diffusers(bfl, prefix=prefix, peft=peft), "ai-toolkit.safetensors", MODS)
    assert p.source_format == "diffusers" and not p.is_control
    qkv = [l for l in p.layers if l.module == "double_blocks.0.img_attn.qkv"]
    assert [(l.row_offset, l.rows, l.source) for l in qkv] == [
        (0, 256, "transformer_blocks.0.attn.to_q"), (256, 256, "transformer_blocks.0.attn.to_k"),
        (512, 256, "transformer_blocks.0.attn.to_v")]
    lin1 = [(l.row_offset, l.rows) for l in p.layers if l.module == "single_blocks.0.linear1"]
    assert lin1 == [(0, 256), (256, 256), (512, 256), (768, 1024)]
    # pure data movement: every piece is the BFL tensor's rows, norm_out's back in BFL order
    a = bfl["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"]
    b = bfl["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"]
    for l in qkv:
        assert torch.equal(l.down, a) and torch.equal(l.up, b[l.row_offset:l.row_offset + l.rows])
    (ada,) = [l for l in p.layers if l.module == "final_layer.adaLN_modulation.1"]
    assert torch.equal(ada.up, bfl["diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight"])
    assert_same_update(dense_from_parsed(p, MODS), dense_from_bfl(bfl, MODS), exact=False)


def test_diffusers_control_lora():
    raw = S.make_control_lora(CFG)
    p = parse_lora(S.bfl_lora_to_diffusers(raw), "canny-diffusers.safetensors", MODS)
    assert p.source_format == "diffusers" and p.widened == {"img_in": 128}
    assert set(p.norm_sets) == set(S.norm_scale_keys(CFG))
    (ada,) = [l for l in p.layers if l.module == "final_layer.adaLN_modulation.1"]
    assert torch.equal(ada.bias, raw["final_layer.adaLN_modulation.1.lora_B.bias"])
    assert_same_update(dense_from_parsed(p, MODS), dense_from_bfl(raw, MODS), exact=False)


@pytest.mark.parametrize("swap_b,swap_a", [(False, False), (True, True)])
def test_wrong_norm_out_order_is_detected(swap_b, swap_a):
    # negative control: unswapped lora_B, or diffusers' converter bug of swapping lora_A as well,
    # must give a different update (the comparison above can fail)
    raw = S.make_control_lora(CFG)
    p = parse_lora(S.bfl_lora_to_diffusers(raw, swap_b=swap_b, swap_a=swap_a), "bad.safetensors", MODS)
    got, want = dense_from_parsed(p, MODS), dense_from_bfl(raw, MODS)
    m = "final_layer.adaLN_modulation.1"
    assert rel_err(got[m][0], want[m][0]) > 0.1
    assert rel_err(got["txt_in"][0], want["txt_in"][0]) < 1e-6


def test_tensor_file_and_text_encoder_keys(tmp_path):
    sd = S.make_lora(CFG, kind="kohya", targets=["txt_in"])
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 768)
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(3072, 4)
    path = S.save_safetensors(sd, tmp_path / "with-te.safetensors")
    tf = TensorFile(path)
    p = parse_lora(tf, tf.name, MODS)
    assert p.source_format == "kohya" and [l.module for l in p.layers] == ["txt_in"]
    assert sorted(p.text_encoder_keys) == sorted(k for k in sd if k.startswith("lora_te1_"))
    assert p.describe() == "with-te.safetensors: kohya LoRA, 1 low-rank layer"


def test_full_size_dev_names():
    mods = modules_of(DEV)
    from quant_expand.lora.naming import diffusers_linear_map, diffusers_norm_map
    lin, norms = diffusers_linear_map(mods), diffusers_norm_map(mods)
    assert len(norms) == 2 * 2 * 19 + 2 * 38 == 152  # BFL Control LoRA: 152 norm tensors
    assert lin["single_transformer_blocks.37.proj_mlp"] == ("single_blocks.37.linear1", 9216, 12288, False)
    assert lin["norm_out.linear"] == ("final_layer.adaLN_modulation.1", 0, None, True)
    assert {t.module for t in lin.values()} == set(mods)  # every Linear has a diffusers name


# ---------------------------------------------------------------- errors


def _raises(sd, name, *fragments, modules=MODS):
    with pytest.raises(LoraFormatError) as info:
        parse_lora(sd, name, modules)
    msg = str(info.value)
    assert msg.startswith(name + ": "), msg
    for f in fragments:
        assert f in msg, (f, msg)
    assert isinstance(info.value, BnbFluxError)
    return msg


def _bfl(m, a, b, bias=None, prefix="diffusion_model."):
    sd = {f"{prefix}{m}.lora_A.weight": a, f"{prefix}{m}.lora_B.weight": b}
    if bias is not None:
        sd[f"{prefix}{m}.lora_B.bias"] = bias
    return sd


def test_sdxl_and_other_models_are_rejected():
    sdxl = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 4),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768)}
    _raises(sdxl, "sdxl-style.safetensors", "not a FLUX LoRA (keys look like SDXL/SD1 UNet: lora_unet_input_blocks_4",
            "use a LoRA made for FLUX.1")
    diffusers_sd = {"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 640)}
    _raises(diffusers_sd, "sd15.safetensors", "not a FLUX LoRA", "SDXL/SD1 UNet: unet.down_blocks.1")
    _raises({"foo.weight": torch.zeros(2)}, "odd.safetensors", "not a FLUX LoRA (no key names a FLUX.1 layer: foo.weight")
    _raises({"lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}, "te-only.safetensors",
            "only text-encoder keys", "diffusion model only")
    _raises({}, "empty.safetensors", "no tensors")
    _raises({"lora_transformer_single_transformer_blocks_0_proj_out.lora_down.weight": torch.zeros(4, 256)},
            "onetrainer.safetensors", "OneTrainer")


def test_layers_the_model_does_not_have():
    big = S.TinyFluxConfig(depth=2, depth_single_blocks=2)
    _raises(S.make_lora(big, kind="lora"), "big.safetensors", "does not have: double_blocks.1.img_attn.proj",
            "(13 in all)", "made for a larger or different FLUX model")
    sd = _bfl("double_blocks.40.img_attn.qkv", torch.zeros(4, 256), torch.zeros(768, 4))
    _raises(sd, "deep.safetensors", "does not have: double_blocks.40.img_attn.qkv")
    kohya = {"lora_unet_double_blocks_40_img_attn_qkv.lora_down.weight": torch.zeros(4, 256),
             "lora_unet_double_blocks_40_img_attn_qkv.lora_up.weight": torch.zeros(768, 4)}
    _raises(kohya, "deep-kohya.safetensors", "does not have: double_blocks.40.img_attn.qkv")
    diff = S.bfl_lora_to_diffusers(S.make_lora(big, kind="lora", targets=["double_blocks.1.img_attn.qkv"]), cfg=big)
    _raises(diff, "deep-diffusers.safetensors", "does not have: double_blocks.1.img_attn.qkv")
    schnell = modules_of(S.TinyFluxConfig(guidance_embed=False))
    _raises(S.make_lora(CFG, kind="lora", targets=["guidance_in.in_layer"]), "dev.safetensors",
            "guidance_in.in_layer", modules=schnell)
    norm = {"double_blocks.3.img_attn.norm.key_norm.scale": torch.ones(128)}
    _raises(norm, "norm.safetensors", "does not have: double_blocks.3.img_attn.norm.key_norm.scale")
    _raises({"transformer.transformer_blocks.0.attn.to_qq.lora_A.weight": torch.zeros(4, 256)},
            "typo.safetensors", "transformer_blocks.0.attn.to_qq is not a FLUX.1 diffusers layer name")


def test_input_width_mismatches():
    r = 4
    msg = _raises(_bfl("img_in", torch.zeros(r, 96), torch.zeros(256, r)), "acc-lora.safetensors")
    assert msg.startswith("acc-lora.safetensors: lora for img_in has 96 inputs, model has 64 (or 128 after a Control LoRA)")
    _raises(_bfl("img_in", torch.zeros(r, 96), torch.zeros(256, r)), "acc-lora.safetensors",
            "lora for img_in has 96 inputs, model has 128 (64 before a Control LoRA widened it)", modules=MODS_WIDE)
    _raises(_bfl("img_in", torch.zeros(r, 256), torch.zeros(256, r)), "wide.safetensors",
            "lora for img_in has 256 inputs", modules=MODS_WIDE)
    # only img_in is ever widened: narrower or wider inputs elsewhere are errors
    _raises(_bfl("txt_in", torch.zeros(r, 32), torch.zeros(256, r)), "narrow.safetensors",
            "lora for txt_in has 32 inputs, model has 64")
    _raises(_bfl("txt_in", torch.zeros(r, 128), torch.zeros(256, r)), "wider.safetensors",
            "lora for txt_in has 128 inputs, model has 64")
    diff = S.bfl_lora_to_diffusers(_bfl("img_in", torch.zeros(r, 96), torch.zeros(256, r), prefix=""))
    _raises(diff, "acc-diffusers.safetensors", "lora for img_in (x_embedder) has 96 inputs")


def test_row_and_rank_mismatches():
    _raises(_bfl("double_blocks.0.img_attn.qkv", torch.zeros(4, 256), torch.zeros(769, 4)), "rows.safetensors",
            "lora for double_blocks.0.img_attn.qkv has 769 outputs, model has 768")
    bad_q = S.bfl_lora_to_diffusers(S.make_lora(CFG, kind="lora", targets=["double_blocks.0.img_attn.qkv"]))
    bad_q["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] = torch.zeros(300, 8)
    _raises(bad_q, "rows-diffusers.safetensors",
            "lora for double_blocks.0.img_attn.qkv rows 0:256 (transformer_blocks.0.attn.to_q) has 300 outputs, model has 256")
    _raises(_bfl("txt_in", torch.zeros(8, 64), torch.zeros(256, 4)), "rank.safetensors",
            "lora for txt_in", "rank of diffusion_model.txt_in.lora_A.weight (8) does not match",
            "diffusion_model.txt_in.lora_B.weight (4)")
    _raises(_bfl("txt_in", torch.zeros(0, 64), torch.zeros(256, 0)), "rank0.safetensors",
            "lora for txt_in has rank 0 (diffusion_model.txt_in.lora_A.weight (0, 64)", "an empty LoRA layer")
    _raises(_bfl("txt_in", torch.zeros(4, 64, 1), torch.zeros(256, 4)), "conv.safetensors", "lora for txt_in has shapes")
    _raises(_bfl("txt_in", torch.zeros(4, 64), torch.zeros(256, 4), bias=torch.zeros(255)), "bias.safetensors",
            "bias diffusion_model.txt_in.lora_B.bias for txt_in has shape (255,), expected (256,)")
    control = S.make_control_lora(CFG)
    control["single_blocks.0.norm.key_norm.scale"] = torch.ones(64)
    _raises(control, "norm-shape.safetensors", "norm scale single_blocks.0.norm.key_norm.scale has shape (64,)")
    sd = S.make_lora(CFG, kind="kohya", targets=["txt_in"])
    sd["lora_unet_txt_in.alpha"] = torch.tensor([1.0, 2.0])
    _raises(sd, "alpha.safetensors", "lora_unet_txt_in.alpha has 2 values")


def test_incomplete_pairs():
    sd = S.make_lora(CFG, kind="lora", targets=["txt_in", "img_in"])
    no_b = {k: v for k, v in sd.items() if k != "diffusion_model.txt_in.lora_B.weight"}
    _raises(no_b, "no-b.safetensors", "txt_in has diffusion_model.txt_in.lora_A.weight but no matching lora_B")
    no_a = {k: v for k, v in sd.items() if k != "diffusion_model.img_in.lora_A.weight"}
    _raises(no_a, "no-a.safetensors", "img_in has diffusion_model.img_in.lora_B.weight but no matching lora_A")
    kohya = S.make_lora(CFG, kind="kohya", targets=["txt_in"])
    del kohya["lora_unet_txt_in.lora_up.weight"]
    _raises(kohya, "no-up.safetensors",
            "txt_in (lora_unet_txt_in) has lora_unet_txt_in.lora_down.weight but no matching lora_B/lora_up")
    bias_only = {"txt_in.lora_B.bias": torch.zeros(256), **S.make_control_lora(CFG)}
    del bias_only["txt_in.lora_A.weight"], bias_only["txt_in.lora_B.weight"]
    _raises(bias_only, "bias-only.safetensors", "txt_in has txt_in.lora_B.bias but no lora_A/lora_B")
    dup = dict(S.bfl_lora_to_diffusers(S.make_lora(CFG, kind="lora", targets=["txt_in"])))
    dup["transformer.context_embedder.lora_A.default.weight"] = dup["transformer.context_embedder.lora_A.weight"]
    _raises(dup, "dup.safetensors", "context_embedder has two down tensors")
    sets = S.make_lora(CFG, kind="set", targets=["single_blocks.0.norm.key_norm.scale"])
    sets["diffusion_model.single_blocks.0.norm.key_norm.scale"] = torch.ones(128)
    _raises(sets, "dup-norm.safetensors", "both set single_blocks.0.norm.key_norm.scale")


@pytest.mark.parametrize("key", ["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight",
                                 "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
                                 "diffusion_model.double_blocks.0.img_attn.qkv.alpha"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(key, bad):
    sd = S.make_lora(CFG, kind="lora", alpha=4.0)
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = bad
    _raises(sd, "nan.safetensors", f"tensor {key} contains NaN or inf")


def test_non_finite_bf16_and_norms():
    control = {k: v.to(torch.bfloat16) for k, v in S.make_control_lora(CFG).items()}
    control["single_blocks.0.norm.query_norm.scale"][3] = float("nan")
    _raises(control, "canny-bf16.safetensors", "tensor single_blocks.0.norm.query_norm.scale contains NaN")


def test_unsupported_adapters_and_mixed_formats():
    _raises(S.make_lora(CFG, kind="loha"), "loha.safetensors", "LyCORIS LoHa keys: lora_unet_", "plain low-rank")
    _raises(S.make_lora(CFG, kind="diff"), "diff.safetensors", "full weight diff keys")
    img = {"diffusion_model.img_in.set_weight": torch.zeros(256, 64)}
    _raises(img, "set.safetensors", "full weight replacement keys: diffusion_model.img_in.set_weight")
    mixed = {**S.make_lora(CFG, kind="kohya", targets=["txt_in"]), **S.bfl_lora_to_diffusers(S.make_lora(CFG, targets=["img_in"]))}
    _raises(mixed, "mixed.safetensors", "mixes LoRA key formats", "diffusers: transformer.x_embedder", "kohya: lora_unet_txt_in")
    stray = {**S.make_lora(CFG, targets=["txt_in"]), "something_else": torch.zeros(1)}
    _raises(stray, "stray.safetensors", "keys that name no FLUX.1 layer: something_else")
    full = {"transformer.x_embedder.weight": torch.zeros(256, 64)}
    _raises(full, "full.safetensors", "x_embedder.weight is a full weight, not a LoRA")
    reshape = {**to_comfy(S.make_control_lora(CFG)), "diffusion_model.txt_in.reshape_weight": torch.tensor([256, 128])}
    _raises(reshape, "reshape.safetensors", "reshapes txt_in; only img_in")
    reshape = {**to_comfy(S.make_control_lora(CFG)), "diffusion_model.img_in.reshape_weight": torch.tensor([256, 96])}
    _raises(reshape, "reshape.safetensors", "lora for img_in (reshape_weight) has 96 inputs")


# ---------------------------------------------------------------- ComfyUI 0.33 (COMFYUI_PATH)


def comfy_name_table(comfy_utils, cfg, modules):
    """comfy.utils.flux_to_diffusers as {diffusers module: (BFL module, offset, swapped)} + norm map.

    Only targets the FLUX.1 model has (ComfyUI also maps controlnet_x_embedder -> pos_embed_input, a
    ControlNet-only layer); ComfyUI names norm scales ``.weight`` because its Flux renames BFL's
    ``.scale`` at load (supported_models.Flux.process_unet_state_dict)."""
    key_map = comfy_utils.flux_to_diffusers({"depth": cfg.depth, "depth_single_blocks": cfg.depth_single_blocks,
                                             "hidden_size": cfg.hidden_size}, output_prefix="")
    linear, norms = {}, {}
    for dkey, v in key_map.items():
        dname, end = dkey.rsplit(".", 1)
        target, offset, fn = (v, None, None) if isinstance(v, str) else (v[0], v[1], v[2] if len(v) > 2 else None)
        tmod, tend = target.rsplit(".", 1)
        assert tend == end, dkey
        if tmod.endswith("_norm"):
            norms[dname] = tmod + ".scale"
        elif tmod in modules:
            assert fn in (None, comfy_utils.swap_scale_shift), dkey
            entry = (tmod, None if offset is None else tuple(offset), fn is not None)
            assert linear.setdefault(dname, entry) == entry, dkey  # .weight and .bias agree
    return linear, norms


@pytest.mark.parametrize("cfg", [CFG, DEV], ids=["tiny", "flux1-dev"])
def test_diffusers_names_equal_comfyui(host, cfg):
    import comfy.utils

    modules = modules_of(cfg)
    want_linear, want_norms = comfy_name_table(comfy.utils, cfg, modules)
    got_linear = {d: (t.module, None if t.rows is None else (0, t.row_offset, t.rows), t.swap_halves)
                  for d, t in host.pack_module("quant_expand.lora.naming").diffusers_linear_map(modules).items()}
    assert got_linear == want_linear
    assert host.pack_module("quant_expand.lora.naming").diffusers_norm_map(modules) == want_norms
    assert len(want_norms) == len(host.pack_module("quant_expand.lora.naming").norm_scale_keys(modules))


def test_comfyui_converted_control_lora_parses_like_bfl(host):
    import comfy.lora_convert

    raw = S.make_control_lora(CFG)
    converted = comfy.lora_convert.convert_lora(dict(raw))
    p = host.pack_module("quant_expand.lora.parse").parse_lora(converted, "canny.safetensors", MODS)
    assert p.source_format == "comfy" and p.widened == {"img_in": 128}
    assert_same_update(dense_from_parsed(p, MODS), dense_from_bfl(raw, MODS), exact=True)


@pytest.fixture(scope="module")
def comfy_tiny(host):
    import comfy.sd

    path = S.save_safetensors(S.make_tiny_flux(CFG), host.model_path("diffusion_models", "lora_formats_tiny.safetensors"))
    patcher = comfy.sd.load_diffusion_model(path, {"dtype": torch.float32})
    return patcher, {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}


def comfy_merged(patcher, sd):
    """Every weight ComfyUI's own LoRA path (convert -> key map -> load_lora -> calculate_weight) produces."""
    import comfy.lora
    import comfy.lora_convert

    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    converted = comfy.lora_convert.convert_lora(dict(sd))
    patches = comfy.lora.load_lora(converted, key_map, log_missing=False)
    clone = patcher.clone()
    loaded = clone.add_patches(patches, 1.0)
    assert len(loaded) == len(patches)
    base = patcher.model.state_dict()
    return {k: comfy.lora.calculate_weight(p, base[k].detach().clone().float(), k) for k, p in clone.patches.items()}


@pytest.mark.parametrize("fmt", ["bfl", "kohya", "diffusers", "control"])
def test_deltas_equal_comfyui_lora_loader(host, comfy_tiny, fmt):
    """Base + canonical update == ComfyUI's merged weights (1e-6: same float32 sums, another order)."""
    patcher, base = comfy_tiny
    targets = S.linear_modules(CFG)
    sd = {"bfl": lambda: S.make_lora(CFG, kind="lora", alpha=2.0, targets=targets),
          "kohya": lambda: S.make_lora(CFG, kind="kohya", targets=targets),
          "diffusers": lambda: S.bfl_lora_to_diffusers(S.make_lora(CFG, kind="lora", alpha=2.0, targets=targets)),
          "control": lambda: S.make_control_lora(CFG)}[fmt]()
    p = host.pack_module("quant_expand.lora.parse").parse_lora(sd, f"{fmt}.safetensors", MODS)
    mine = dense_from_parsed(p, MODS)
    want = comfy_merged(patcher, sd)
    expected_keys = {f"diffusion_model.{m}.{w}" for m in targets for w in ("weight", "bias") if fmt == "control" or w == "weight"}
    expected_keys |= {"diffusion_model." + k[: -len(".scale")] + ".weight" for k in p.norm_sets}
    assert set(want) == expected_keys
    for m in targets:
        key = f"diffusion_model.{m}.weight"
        w = base[key]
        w = torch.nn.functional.pad(w, (0, mine[m][0].shape[1] - w.shape[1]))
        assert rel_err(w + mine[m][0], want[key]) < 1e-6, m
        if fmt == "control":
            bkey = f"diffusion_model.{m}.bias"
            assert rel_err(base[bkey] + mine[m][1], want[bkey]) < 1e-6, m
    for k, v in p.norm_sets.items():
        assert torch.equal(want["diffusion_model." + k[: -len(".scale")] + ".weight"], v)
    # negative control: the comparison notices a wrong update
    m = "double_blocks.0.img_attn.qkv"
    assert rel_err(base[f"diffusion_model.{m}.weight"] + 0.9 * mine[m][0], want[f"diffusion_model.{m}.weight"]) > 1e-4


def test_names_from_a_file_cannot_flood_or_forge_the_message():
    """A key name is text from the file: a megabyte of it, newlines and ANSI escapes in it must not reach
    the log, /history and the websocket as such (one bounded line, control characters spelled out)."""
    huge = "\n[ComfyUI] prompt executed\x1b[31m" + "x" * 1_000_000
    sd = _bfl("txt_in", torch.zeros(4, 64), torch.zeros(256, 4))
    sd[f"diffusion_model.txt_in{huge}.lora_A.weight"] = torch.zeros(4, 64)
    sd[f"diffusion_model.txt_in{huge}.lora_B.weight"] = torch.zeros(256, 4)
    msg = _raises(sd, "flood.safetensors")
    assert len(msg) <= 2000 and "\n" not in msg and "\x1b" not in msg, (len(msg), msg[:300])
    assert "characters cut" in msg and "\\n[ComfyUI] prompt executed\\x1b[31m" in msg
