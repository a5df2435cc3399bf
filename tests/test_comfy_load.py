"""Load BnB Flux through ComfyUI's real executor, loaders, LoRA nodes, patcher and sampler (CPU).

Reference for every comparison: ComfyUI's own full-precision path (UNETLoader, stock LoRA nodes)
on a float32 file that holds exactly the values the quantized model stores (its dequantized weights).
Tolerances (relative L2 error of whole latents after two euler steps, float32 on CPU):
- no LoRA: 1e-6, the same float32 matmuls run on the same numbers (only kernel order may differ);
- with LoRAs: 1e-5, ComfyUI merges ``W += s * (up @ down)`` while the lazy path computes
  ``W + (s*up) @ down`` or ``up(down(x))``: the same sums in another order (float32 eps ~ 1e-7,
  amplified a little by the sampler).
"""
from __future__ import annotations


import pytest
import torch

from comfy_host import denoise_once, quantized_hash, sample_direct
from quant_expand.testing.prompts import load_bnb_flux, rel_err, sampling_graph, stock_lora, unet_loader
from quant_expand.testing.synthetic import TinyFluxConfig, make_lora, make_tiny_flux, save_safetensors

CFG = TinyFluxConfig()
SCHEMES = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True), ("int8", False)]




@pytest.fixture(scope="module")
def files(host):
    """Tiny FLUX files whose Linear weights survive each scheme exactly, plus one generic file."""
    out = {}
    for q in ("nf4", "fp4", "int8"):
        name = f"tiny_exact_{q}.safetensors"
        save_safetensors(make_tiny_flux(CFG, seed=0, exact_for=q), host.model_path("diffusion_models", name))
        out[q] = name
    name = "tiny_prefixed_bf16.safetensors"
    sd = make_tiny_flux(CFG, seed=3, prefix="model.diffusion_model.")
    save_safetensors({k: v.to(torch.bfloat16) for k, v in sd.items()}, host.model_path("diffusion_models", name))
    out["prefixed_bf16"] = name
    return out


def load_direct(host, file, quant, dq, dtype="float32"):
    node = host.pack_module("nodes.load_bnb_flux").LoadBnbFlux
    with torch.inference_mode():
        return node.execute(file, quant, dq, dtype).result[0]


def write_dequantized(host, patcher, name):
    sd = host.pack_module("quant_expand.layer_state").dequantized_state_dict(patcher.model.diffusion_model)
    save_safetensors(sd, host.model_path("diffusion_models", name))
    return name




class TestLoadBnbFlux:
    """The node builds a real quantized model ComfyUI recognises and samples like full precision."""

    def test_model_is_quantized_with_logical_shapes(self, host, files):
        patcher = load_direct(host, files["nf4"], "nf4", True)
        layers = host.pack_module("quant_expand.layers")
        dm = patcher.model.diffusion_model
        quantized = [n for n, m in dm.named_modules() if layers.is_quantized_linear(m)]
        assert "double_blocks.0.img_attn.qkv" in quantized and "txt_in" in quantized
        assert not layers.is_quantized_linear(dm.img_in)
        qkv = dm.double_blocks[0].img_attn.qkv
        assert isinstance(qkv, layers.QLinear4bit)
        assert qkv.weight.shape == (3 * CFG.hidden_size, CFG.hidden_size)  # logical, not packed
        assert qkv.weight.data.shape[1] == 1 and qkv.weight.dtype == torch.uint8
        assert qkv.weight.quant_state.quant_type == "nf4" and qkv.weight.quant_state.nested
        # ComfyUI's model size sees the real (packed) bytes: far below float32's 4 bytes per weight
        params = sum(p.numel() for p in make_tiny_flux(CFG).values())
        assert patcher.model_size() < params * 4 * 0.25
        assert host.pack_module("quant_expand.comfyui.report").load_report(patcher).quantized_layers == len(quantized)

    @pytest.mark.parametrize("quant,dq", SCHEMES)
    def test_sampling_equals_full_precision_of_dequantized_weights(self, host, files, quant, dq):
        patcher = load_direct(host, files[quant], quant, dq)
        deq = write_dequantized(host, patcher, f"deq_{quant}_{dq}.safetensors")
        if not dq:  # exact-survival weights: the dequantized model is the original file, bit for bit
            from safetensors.torch import load_file
            orig, back = load_file(host.model_path("diffusion_models", files[quant])), \
                load_file(host.model_path("diffusion_models", deq))
            assert all(torch.equal(orig[k], back[k.replace("_norm.scale", "_norm.weight")]) for k in orig)
        g = sampling_graph({"q": load_bnb_flux(files[quant], quant, dq)}, ["q", 0], key="q", prefix="a")
        g = sampling_graph({**g, "ref": unet_loader(deq)}, ["ref", 0], key="ref", prefix="b")
        out = host.run(g)
        assert torch.isfinite(out["q"]).all() and out["q"].abs().max() > 0
        assert rel_err(out["q"], out["ref"]) < 1e-6

    def test_plain_float8_file_loads_as_its_float32_values(self, host, files):
        """A FLUX file with float8_e4m3fn weights and no scales (as fp8 copies of FLUX.1-dev are shared):
        the value checks widen float8 (torch has no isfinite for it), and the model quantized from it is the
        one quantized from a float32 file of the same values: the same latents, bit for bit."""
        from safetensors.torch import load_file

        sd = load_file(host.model_path("diffusion_models", files["nf4"]))
        fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in sd.items()}
        save_safetensors(fp8, host.model_path("diffusion_models", "tiny_plain_fp8.safetensors"))
        save_safetensors({k: v.float() for k, v in fp8.items()}, host.model_path("diffusion_models", "tiny_fp8_as_f32.safetensors"))
        g = sampling_graph({"q": load_bnb_flux("tiny_plain_fp8.safetensors", "nf4", True)}, ["q", 0], key="q", prefix="a")
        g = sampling_graph({**g, "ref": load_bnb_flux("tiny_fp8_as_f32.safetensors", "nf4", True)}, ["ref", 0],
                           key="ref", prefix="b")
        out = host.run(g)
        assert out["q"].abs().max() > 0 and torch.equal(out["q"], out["ref"])

    def test_prefixed_bf16_file_loads(self, host, files):
        out = host.run(sampling_graph({"q": load_bnb_flux(files["prefixed_bf16"], "fp4", True, "auto")}, ["q", 0], key="q"))
        assert torch.isfinite(out["q"]).all()


LORA_KINDS = ["lora", "kohya", "loha", "lokr", "diff", "glora", "oft", "boft"]


@pytest.fixture(scope="module")
def lora_files(host):
    out = {}
    for kind in LORA_KINDS:
        name = f"tiny_{kind}.safetensors"
        save_safetensors(make_lora(CFG, kind=kind, seed=11), host.model_path("loras", name))
        out[kind] = name
    return out


class TestStockLoraNodes:
    """Stock LoRA nodes on the quantized model equal the same LoRAs on full precision, applied lazily."""

    @pytest.mark.parametrize("kind", LORA_KINDS)
    @pytest.mark.parametrize("size", [16, 64])  # 64 img tokens (unmerged B(Ax)) / 1024 (merged into W)
    def test_lora_matches_full_precision(self, host, files, lora_files, kind, size):
        patcher = load_direct(host, files["nf4"], "nf4", False)
        deq = write_dequantized(host, patcher, "deq_nf4_False.safetensors")
        g = {"q": load_bnb_flux(files["nf4"], "nf4", False),
             "ql": stock_lora(["q", 0], lora_files[kind], 0.8),
             "r": unet_loader(deq),
             "rl": stock_lora(["r", 0], lora_files[kind], 0.8)}
        g = sampling_graph(g, ["ql", 0], key="q", size=size, steps=1, prefix="a")
        g = sampling_graph(g, ["rl", 0], key="ref", size=size, steps=1, prefix="b")
        g = sampling_graph(g, ["q", 0], key="base", size=size, steps=1, prefix="c")
        out = host.run(g)
        assert rel_err(out["q"], out["ref"]) < 1e-5
        # the LoRA really acts: without it the result is clearly different
        assert rel_err(out["base"], out["ref"]) > 1e-3

    def test_other_branch_unaffected(self, host, files, lora_files):
        alone = host.run(sampling_graph({"q": load_bnb_flux(files["fp4"], "fp4", True)}, ["q", 0], key="alone"))["alone"]
        g = {"q": load_bnb_flux(files["fp4"], "fp4", True), "ql": stock_lora(["q", 0], lora_files["lora"], 1.0),
             "ql2": stock_lora(["ql", 0], lora_files["loha"], 0.5)}
        g = sampling_graph(g, ["ql2", 0], key="lora", prefix="a")
        g = sampling_graph(g, ["q", 0], key="plain", prefix="b")
        out = host.run(g)
        assert torch.equal(out["plain"], alone)
        assert rel_err(out["lora"], alone) > 1e-3

    def test_quantized_bytes_unchanged_by_lora_apply_sample_remove(self, host, files, lora_files):
        import comfy.sd
        import comfy.utils

        model = load_direct(host, files["nf4"], "nf4", True)
        before = quantized_hash(host, model)
        base = sample_direct(model)
        for kind, strength in (("lora", 1.0), ("lokr", 0.5), ("oft", 1.0)):
            lora_sd = comfy.utils.load_torch_file(host.model_path("loras", lora_files[kind]), safe_load=True)
            patched, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, strength, 0)
            assert rel_err(sample_direct(patched), base) > 1e-3
            assert quantized_hash(host, model) == before
        assert torch.equal(sample_direct(model), base)  # removing the LoRAs restores the exact output
        assert quantized_hash(host, model) == before


class TestModelManagement:
    """ComfyUI's legacy patcher paths: lowvram partial loading, clones, rebuilding from cached_patcher_init."""

    def lora_model(self, host, files, lora_files):
        import comfy.sd
        import comfy.utils

        model = load_direct(host, files["nf4"], "nf4", False)
        lora_sd = comfy.utils.load_torch_file(host.model_path("loras", lora_files["lora"]), safe_load=True)
        diff_sd = comfy.utils.load_torch_file(host.model_path("loras", lora_files["diff"]), safe_load=True)
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 0.9, 0)
        patched, _ = comfy.sd.load_lora_for_models(patched, None, diff_sd, 0.5, 0)
        return model, patched

    def test_lowvram_partial_load_equals_full_load(self, host, files, lora_files):
        import comfy.model_management as mm

        layers = host.pack_module("quant_expand.layers")
        model, patched = self.lora_model(host, files, lora_files)
        mm.unload_all_models()
        patched.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=0)
        full = denoise_once(patched)
        patched.unpatch_model(torch.device("cpu"))
        patched.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=patched.model_size() // 3)
        dm = patched.model.diffusion_model
        offloaded = [m for m in dm.modules() if getattr(m, "comfy_cast_weights", False) and layers.is_quantized_linear(m)]
        assert patched.model.model_lowvram and offloaded, "the budget should force some quantized layers to lowvram"
        assert all(m.lora_delta is not None for m in offloaded)  # lazy deltas replace ComfyUI's LowVramPatch
        partial = denoise_once(patched)
        assert rel_err(partial, full) < 1e-6
        patched.unpatch_model(torch.device("cpu"))
        assert all(m.lora_delta is None and not m.weight_function for m in dm.modules() if layers.is_quantized_linear(m))
        plain = denoise_once(model)
        assert rel_err(plain, full) > 1e-3

    def test_clone_disable_dynamic_and_rebuild_from_cached_init(self, host, files, lora_files):
        adapter = host.pack_module("quant_expand.comfyui.patcher")
        model, patched = self.lora_model(host, files, lora_files)
        clone = patched.clone(disable_dynamic=True)
        assert type(clone) is adapter.BnbModelPatcher
        ref = sample_direct(patched)
        assert torch.equal(sample_direct(clone), ref)
        loader, args = model.cached_patcher_init
        rebuilt = loader(*args, disable_dynamic=True)
        assert type(rebuilt) is adapter.BnbModelPatcher and rebuilt.model is not model.model
        assert torch.equal(sample_direct(rebuilt), sample_direct(model))
