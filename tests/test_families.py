"""FLUX families beyond FLUX.1 through ComfyUI's real executor, loaders and sampler (CPU, float32).

Each family's test model (``quant_expand.testing.family_models``) is a bfloat16 file whose quantized
Linears hold values nf4 keeps exactly, so ComfyUI's own UNETLoader on the same file is the exact
reference: the latents must match to 1e-6 (the same float32 matmuls on the same numbers).
"""
from __future__ import annotations

import pytest
import torch

from family_sampling import assert_same_latents, quantized_layer_names, sample_against_unet_loader
from quant_expand.testing.family_models import (
    ChromaConfig,
    Flux2Config,
    chroma_linears,
    chroma_quantized_linears,
    flux2_quantized_linears,
    make_chroma,
    make_flux2,
)
from quant_expand.testing.prompts import apply_lora, load_bnb_flux, sampling_graph
from quant_expand.testing.synthetic import save_safetensors

CHROMA = ChromaConfig()


@pytest.fixture(scope="module")
def chroma_file(host):
    name = "tiny_chroma_bf16.safetensors"
    save_safetensors(make_chroma(CHROMA, seed=0), host.model_path("diffusion_models", name))
    return name


class TestChroma:
    def test_detection_sees_chroma_as_comfyui_does(self, host, chroma_file):
        """ComfyUI's own detection on the file finds Chroma, with the approximator size it fixes."""
        import comfy.model_detection
        import comfy.utils

        sd = comfy.utils.load_torch_file(host.model_path("diffusion_models", chroma_file))
        cfg = comfy.model_detection.detect_unet_config(sd, "")
        assert cfg["image_model"] == "chroma" and cfg["hidden_size"] == 3072
        assert (cfg["depth"], cfg["depth_single_blocks"]) == (1, 1)
        assert (cfg["in_dim"], cfg["hidden_dim"], cfg["out_dim"], cfg["n_layers"]) == (64, 5120, 3072, 5)

    def test_nf4_sampling_equals_unet_loader(self, host, chroma_file):
        def check(patcher):
            dm = patcher.model.diffusion_model
            quantized = quantized_layer_names(patcher, host)
            assert quantized == chroma_quantized_linears(CHROMA)
            assert set(chroma_linears(CHROMA)) - quantized <= {n for n, m in dm.named_modules()
                                                               if isinstance(m, torch.nn.Linear)}
            report = host.pack_module("quant_expand.comfyui.report").load_report(patcher)
            assert "(Chroma)" in report.source
            # the quantized layers hold the file's values exactly
            from safetensors import safe_open
            with safe_open(host.model_path("diffusion_models", chroma_file), "pt") as f:
                for name in ("txt_in", "double_blocks.0.img_attn.qkv", "single_blocks.0.linear2"):
                    deq = dm.get_submodule(name).dequantize(torch.device("cpu"), torch.float32)
                    assert torch.equal(deq, f.get_tensor(f"{name}.weight").float()), name

        out = sample_against_unet_loader(host, load_bnb_flux(chroma_file, "nf4", False), chroma_file, CHROMA,
                                         steps=1, check=check)
        assert_same_latents(out)


FLUX2 = {"dev": Flux2Config(guidance=True), "klein": Flux2Config(guidance=False)}


@pytest.fixture(scope="module")
def flux2_files(host):
    out = {}
    for variant, cfg in FLUX2.items():
        name = f"tiny_flux2_{variant}_bf16.safetensors"
        save_safetensors(make_flux2(cfg, seed=4), host.model_path("diffusion_models", name))
        out[variant] = name
    return out


class TestFlux2:
    @pytest.mark.parametrize("variant", list(FLUX2))
    def test_detection_sees_flux2_as_comfyui_does(self, host, flux2_files, variant):
        import comfy.model_detection
        import comfy.utils

        sd = comfy.utils.load_torch_file(host.model_path("diffusion_models", flux2_files[variant]))
        cfg = comfy.model_detection.detect_unet_config(sd, "")
        assert cfg["image_model"] == "flux2" and cfg["hidden_size"] == FLUX2[variant].hidden_size
        assert cfg["guidance_embed"] is (variant == "dev")

    @pytest.mark.parametrize("quant", ["nf4", "fp4"])
    @pytest.mark.parametrize("variant", list(FLUX2))
    def test_sampling_equals_unet_loader(self, host, flux2_files, variant, quant):
        cfg, name = FLUX2[variant], flux2_files[variant]

        def check(patcher):
            assert quantized_layer_names(patcher, host) == flux2_quantized_linears(cfg)
            report = host.pack_module("quant_expand.comfyui.report").load_report(patcher)
            assert f"(FLUX.2 [{variant}])" in report.source

        assert_same_latents(sample_against_unet_loader(host, load_bnb_flux(name, quant, False), name, cfg, steps=2,
                                                       check=check))


def test_flux1_control_lora_on_flux2_names_the_family(host, flux2_files):
    """A FLUX.1 Control LoRA (Canny/Depth layout) on FLUX.2 [klein] fails naming both, not the layers it misses."""
    from quant_expand.testing.synthetic import TinyFluxConfig, make_control_lora

    save_safetensors(make_control_lora(TinyFluxConfig()), host.model_path("loras", "tiny_flux1_control.safetensors"))
    g = {"q": load_bnb_flux(flux2_files["klein"], "nf4", False),
         "c": apply_lora(["q", 0], "tiny_flux1_control.safetensors", 1.0)}
    g = sampling_graph(g, ["c", 0], key="q", steps=1, size=4, pooled_dim=0, channels=128)
    errors = host.run(g, expect_error=True)["errors"]
    assert len(errors) == 1 and errors[0]["node_type"] == "ApplyControlLora"
    message = errors[0]["exception_message"]
    assert message.startswith("tiny_flux1_control.safetensors: a FLUX.1 Control LoRA, and the model is FLUX.2 [klein]")
    assert "Control LoRAs work with FLUX.1 models only" in message
