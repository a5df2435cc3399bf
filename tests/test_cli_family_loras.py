"""``cli inspect`` on FLUX.2 and Chroma LoRAs in BFL, kohya and diffusers/PEFT names: the family and released
model it names (from the file's layers, its widths, the sizes it fits), line by line, and the model it reads the
file against, checked against ComfyUI 0.33 itself: its model detection and model classes build that model (on
the meta device, from a file of the test model's Linears), its LoRA key map says what its Load LoRA leaves out.

The LoRAs: ``make_family_lora`` (BFL and kohya names) and PEFT's adapter on diffusers' own model class written
by the pipeline's ``save_lora_weights`` (``tests/diffusers_family_files.py``), on the test models' Linears
(``quant_expand.testing.family_models``), at the released models' sizes: only the factors are allocated.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from quant_expand.checkpoint.tensor_files import TensorFile
from quant_expand.cli import main
from quant_expand.lora.naming import norm_scale_keys, preview_keys
from quant_expand.testing.family_models import (
    HEAD_DIM,
    ChromaConfig,
    Flux2Config,
    chroma_linears,
    flux2_linears,
    make_family_lora,
)
from quant_expand.testing.synthetic import TinyFluxConfig, flux_shapes, save_safetensors
from quant_expand.tools.lora_info import implied_model

# the released models' sizes (test model configs), and one FLUX.2 of no released size
FLUX1_DEV = TinyFluxConfig(hidden_size=3072, depth=19, depth_single_blocks=38, context_in_dim=4096, vec_in_dim=768)
FLUX2_DEV = Flux2Config(hidden_size=6144, depth=8, depth_single_blocks=48, context_in_dim=15360, guidance=True)
KLEIN_4B = Flux2Config(hidden_size=3072, depth=5, depth_single_blocks=20, context_in_dim=7680, guidance=False)
KLEIN_9B = Flux2Config(hidden_size=4096, depth=8, depth_single_blocks=24, context_in_dim=12288, guidance=False)
CHROMA = ChromaConfig(context_in_dim=4096, depth=19, depth_single_blocks=38)
FLUX2_TINY = Flux2Config()


def linears(cfg) -> dict[str, tuple[int, int]]:
    """The test model's Linears, BFL name -> (out, in)."""
    if isinstance(cfg, Flux2Config):
        return flux2_linears(cfg)
    if isinstance(cfg, ChromaConfig):
        return chroma_linears(cfg)
    return {k[: -len(".weight")]: v for k, v in flux_shapes(cfg).items() if k.endswith(".weight")}


def comfyui_model(cfg):
    """ComfyUI's own model for a file holding the test model's Linears and norm scales, built on the meta
    device: its model detection reads the file's names and widths, its model classes build every layer."""
    import comfy.model_detection

    lin = linears(cfg)
    sd = {f"{n}.weight": torch.empty(shape, device="meta") for n, shape in lin.items()}
    sd.update({k: torch.empty(HEAD_DIM, device="meta") for k in norm_scale_keys(lin)})
    if isinstance(cfg, ChromaConfig):
        sd.update({f"distilled_guidance_layer.norms.{i}.scale": torch.empty(cfg.approx_hidden, device="meta")
                   for i in range(cfg.approx_layers)})
    config = comfy.model_detection.model_config_from_unet(sd, "")
    return config.get_model(sd, "", device="meta")


def comfyui_linears(cfg) -> dict[str, tuple[int, int]]:
    model = comfyui_model(cfg)
    return {n: tuple(m.weight.shape) for n, m in model.diffusion_model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def inspect_lines(capsys, path) -> list[str]:
    rc = main(["inspect", str(path)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out.splitlines()


def file_line(path) -> str:
    return f"file: {os.path.basename(path)} ({os.path.getsize(path) / 2**20:.1f} MiB)"


LORA = "a FLUX LoRA, not a diffusion model: Load BnB Flux refuses it, Apply Control LoRA applies it"
FORMAT = {"bfl": "format: BFL (BFL layer names, lora_A/lora_B)",
          "kohya": "format: kohya (lora_unet_ layer names, lora_down/lora_up)",
          "diffusers": "format: diffusers/PEFT (diffusers layer names, lora_A/lora_B)"}
SCALE = {"bfl": "scale: 1 (no alpha in the file)", "kohya": "scale: 0.5 (alpha/rank)",  # make_family_lora's alphas
         "diffusers": "scale: alpha 8 from the file's lora_adapter_metadata: scale 1"}  # save_peft_lora's rank 8


def use(stock: str = "ComfyUI's Load LoRA works too") -> str:
    return (f"use: put it in models/loras and pick it in Apply Control LoRA after Load BnB Flux (the quantized "
            f"weights stay untouched; {stock}); Set LoRA Scale changes its strength later")


MADE_FOR_KLEIN_4B = "made for: FLUX.2 (hidden size 3072, as [klein] 4B)"
MADE_FOR_CHROMA = "made for: Chroma (hidden size 3072, as Chroma1-HD and Chroma1-Base)"
FLUX2_RELEASED = ("FLUX.2 [dev]: hidden size 6144, 8 double + 48 single blocks, text width 15360; FLUX.2 [klein] 4B: "
                  "hidden size 3072, 5 double + 20 single blocks, text width 7680; FLUX.2 [klein] 9B: hidden size "
                  "4096, 8 double + 24 single blocks, text width 12288")

# (id, test model, format, targets, "made for" line, the model the file is read against)
CASES = [
    # a layer only FLUX.2 has: its shared modulation
    ("klein4b-bfl-modulation", KLEIN_4B, "bfl", ["double_stream_modulation_img.lin", "single_stream_modulation.lin",
                                                 "double_blocks.4.txt_attn.qkv", "single_blocks.19.linear2"],
     MADE_FOR_KLEIN_4B, KLEIN_4B),
    # only block Linears FLUX.1 and Chroma have too, at their hidden size: the gated MLP's widths tell
    ("klein4b-kohya-mlp", KLEIN_4B, "kohya", ["double_blocks.0.img_mlp.0", "single_blocks.19.linear1"],
     MADE_FOR_KLEIN_4B, KLEIN_4B),
    # attention only, widths every family shares: the text encoder's width tells
    ("klein4b-kohya-text", KLEIN_4B, "kohya", ["txt_in", "double_blocks.0.img_attn.qkv"], MADE_FOR_KLEIN_4B, KLEIN_4B),
    ("klein9b-bfl-mlp", KLEIN_9B, "bfl", ["double_blocks.7.txt_mlp.2", "single_blocks.23.linear1"],
     "made for: FLUX.2 (hidden size 4096, as [klein] 9B)", KLEIN_9B),
    ("dev-kohya-guidance", FLUX2_DEV, "kohya", ["guidance_in.in_layer", "double_stream_modulation_txt.lin",
                                                "final_layer.adaLN_modulation.1", "single_blocks.47.linear1"],
     "made for: FLUX.2 (hidden size 6144, as [dev])", FLUX2_DEV),
    ("flux2-tiny-kohya", FLUX2_TINY, "kohya", list(flux2_linears(FLUX2_TINY)),
     "made for: a FLUX.2-type model with hidden size 256 (at least 1 double + 1 single blocks, text width 64), "
     f"which no released model is ({FLUX2_RELEASED}), so it does not fit them", FLUX2_TINY),
    # a layer only Chroma has: its approximator
    ("chroma-bfl-approximator", CHROMA, "bfl", ["distilled_guidance_layer.in_proj",
                                                "distilled_guidance_layer.layers.4.out_layer",
                                                "double_blocks.18.img_mlp.0", "single_blocks.37.linear1"],
     MADE_FOR_CHROMA, CHROMA),
    ("chroma-kohya-approximator", CHROMA, "kohya", ["distilled_guidance_layer.out_proj", "txt_in", "final_layer.linear"],
     MADE_FOR_CHROMA, CHROMA),
    # Chroma's blocks are FLUX.1's without modulation: block Linears alone do not tell them apart
    ("chroma-bfl-blocks", CHROMA, "bfl", ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.0",
                                          "single_blocks.37.linear2"],
     "made for: FLUX.1 (hidden size 3072, as dev and schnell) or Chroma (hidden size 3072, as Chroma1-HD and "
     "Chroma1-Base); nothing in the file tells FLUX.1 and Chroma apart: no layer or width only one of them has",
     FLUX1_DEV),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_inspect_names_the_family_and_reads_the_file_against_comfyuis_model(host, tmp_path, capsys, case):
    name, cfg, fmt, targets, made_for, model = case
    path = save_safetensors(make_family_lora(linears(cfg), targets, fmt, rank=4, seed=1),
                            tmp_path / f"{name}.safetensors")
    assert inspect_lines(capsys, path) == [
        file_line(path), LORA, f"{FORMAT[fmt]}; {len(targets)} low-rank layers, rank 4", SCALE[fmt], made_for, use()]
    with TensorFile(str(path)) as tensors:
        assert implied_model(tensors, os.path.basename(path)) == comfyui_linears(model)


def test_released_sizes_are_what_comfyui_builds(host):
    """The test models at the released sizes are ComfyUI's models (the cases above compare against ComfyUI's)."""
    for cfg in (FLUX1_DEV, FLUX2_DEV, KLEIN_4B, KLEIN_9B, CHROMA, FLUX2_TINY):
        assert comfyui_linears(cfg) == linears(cfg), cfg


# diffusers names of FLUX.2 [dev]: its shared modulation and guidance embedder (names only FLUX.2 has), a
# gated MLP, a fused single-block Linear, a q/k/v piece, the text embedder, the output adaLN (halves swapped)
FLUX2_DEV_TARGETS = ("double_stream_modulation_img.linear", "time_guidance_embed.guidance_embedder.linear_1",
                     "transformer_blocks.7.ff.linear_in", "single_transformer_blocks.47.attn.to_qkv_mlp_proj",
                     "context_embedder", "transformer_blocks.0.attn.to_k", "norm_out.linear")
CHROMA_TARGETS = ("distilled_guidance_layer.layers.0.linear_1", "distilled_guidance_layer.out_proj",
                  "single_transformer_blocks.37.proj_mlp", "transformer_blocks.18.attn.add_q_proj", "proj_out")


def _comfyui_leaves_out(cfg, keys) -> list[str]:
    """The file's modules ComfyUI's LoRA key map for the model does not know (its Load LoRA skips them)."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(comfyui_model(cfg), {})
    return sorted({k.rsplit(".lora_", 1)[0] for k in keys} - set(key_map))


@pytest.mark.parametrize("cfg,targets,made_for", [
    (FLUX2_DEV, FLUX2_DEV_TARGETS, "made for: FLUX.2 (hidden size 6144, as [dev])"),
    (CHROMA, CHROMA_TARGETS, MADE_FOR_CHROMA),
], ids=["flux2-dev", "chroma"])
def test_inspect_diffusers_loras(host, tmp_path, capsys, cfg, targets, made_for):
    """As diffusers writes the file (``transformer.`` keys, alpha in the metadata), bare and under PEFT's
    prefix; the "use" line names what ComfyUI's own Load LoRA leaves out, as its key map says."""
    from diffusers_family_files import save_peft_lora

    written = save_peft_lora(cfg, targets, str(tmp_path / "peft"))
    with safe_open(written, "pt") as f:
        metadata = f.metadata()
    lora = load_file(written)
    bare = {k[len("transformer."):]: v for k, v in lora.items()}
    spellings = {"transformer": lora, "bare": bare, "peft": {f"base_model.model.{k}": v for k, v in bare.items()}}
    only_this_family = sorted(t for t in targets if t.startswith(("distilled_guidance_layer.", "time_guidance_embed.",
                                                                     "double_stream_modulation_")))
    for spelling, sd in spellings.items():
        path = save_safetensors(sd, tmp_path / f"{spelling}.safetensors", metadata=metadata)
        left_out = _comfyui_leaves_out(cfg, sd)
        if spelling == "peft":
            assert left_out == sorted({k.rsplit(".lora_", 1)[0] for k in sd})
            stock = f"ComfyUI's Load LoRA does not read base_model.model. keys: it would leave out all {len(targets)} layers"
        else:
            assert [m.removeprefix("transformer.") for m in left_out] == only_this_family
            stock = (f"ComfyUI's Load LoRA reads FLUX.1's diffusers names only and would leave out "
                     f"{len(only_this_family)} of its layers: {preview_keys(only_this_family)}")
        assert inspect_lines(capsys, path) == [
            file_line(path), LORA, f"{FORMAT['diffusers']}; {len(targets)} low-rank layers, rank 8",
            SCALE["diffusers"], made_for, use(stock)], spelling
        with TensorFile(str(path)) as tensors:
            assert implied_model(tensors, os.path.basename(path)) == comfyui_linears(cfg), spelling
