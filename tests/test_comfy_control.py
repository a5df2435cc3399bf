"""Apply Control LoRA and Set LoRA Scale through ComfyUI's executor, loaders, patcher and sampler (CPU).

Reference: ComfyUI's stock LoraLoaderModelOnly on a full-precision model holding exactly the values the
quantized model stores (its dequantized weights). Tolerance: relative L2 error 1e-5 on whole latents
(float32 on CPU; ComfyUI merges ``W += s*(B@A)`` where the lazy path adds ``(s*B)@A`` or ``B(Ax)``: the
same sums in another order). Set LoRA Scale vs applying at the same strength builds the same patch
list, so those compare bit for bit.

The nodes' errors (a name Set LoRA Scale finds not applied, a NaN strength, the same LoRA twice, a second
Control LoRA) are cases of tests/test_bad_input.py, which also checks the cached model afterwards.
"""
from __future__ import annotations


import pytest
import torch

from comfy_host import quantized_hash, sample_direct
from quant_expand.testing.prompts import (apply_lora, load_bnb_flux, rel_err, sampling_graph, set_lora_scale, stock_lora,
                                          unet_loader)
from quant_expand.testing.synthetic import TinyFluxConfig, bfl_lora_to_diffusers, make_control_lora, make_lora, make_tiny_flux, save_safetensors

CFG = TinyFluxConfig()
CONTROL, STYLE, STYLE_IMG_IN = "tiny_canny_lora.safetensors", "tiny_style.safetensors", "tiny_style_img_in.safetensors"
STYLE_IMG_IN_PADDED = "tiny_style_img_in_padded.safetensors"
CONTROL_DIFFUSERS, STYLE_KOHYA = "tiny_canny_lora_diffusers.safetensors", "tiny_style_kohya.safetensors"




@pytest.fixture(scope="module")
def files(host):
    for q in ("nf4", "fp4", "int8"):
        save_safetensors(make_tiny_flux(CFG, seed=0, exact_for=q), host.model_path("diffusion_models", f"ctl_exact_{q}.safetensors"))
    save_safetensors(make_control_lora(CFG, seed=2), host.model_path("loras", CONTROL))
    save_safetensors(make_lora(CFG, kind="lora", seed=7), host.model_path("loras", STYLE))
    # a style LoRA that also targets img_in at the original 64-input width
    targets = ["img_in", "double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"]
    style_img_in = make_lora(CFG, kind="lora", seed=8, targets=targets)
    save_safetensors(style_img_in, host.model_path("loras", STYLE_IMG_IN))
    # what zero-padding the old-width lora_A means, written out for ComfyUI's own loader (which cannot
    # apply a 64-input LoRA to a 128-input img_in: it logs a shape error and skips the layer)
    padded = dict(style_img_in)
    padded["diffusion_model.img_in.lora_A.weight"] = torch.nn.functional.pad(padded["diffusion_model.img_in.lora_A.weight"], (0, 64))
    save_safetensors(padded, host.model_path("loras", STYLE_IMG_IN_PADDED))
    save_safetensors(bfl_lora_to_diffusers(make_control_lora(CFG, seed=2), CFG), host.model_path("loras", CONTROL_DIFFUSERS))
    save_safetensors(make_lora(CFG, kind="kohya", seed=9), host.model_path("loras", STYLE_KOHYA))
    return {q: f"ctl_exact_{q}.safetensors" for q in ("nf4", "fp4", "int8")}


def loader(file, quant, dq=False, img_in=False):
    return load_bnb_flux(file, quant, dq, quantize_img_in=img_in)


def dequantized_file(host, file, quant, dq, img_in, name):
    node = host.pack_module("nodes.load_bnb_flux").LoadBnbFlux
    with torch.inference_mode():
        patcher = node.execute(file, quant, dq, "float32", img_in).result[0]
    save_safetensors(host.pack_module("quant_expand.layer_state").dequantized_state_dict(patcher.model.diffusion_model), host.model_path("diffusion_models", name))
    return name, patcher




class TestApplyControlLora:
    """Control + style LoRAs on quantized models equal ComfyUI's own path on full precision."""

    @pytest.mark.parametrize("quant,dq,img_in", [("nf4", False, True), ("nf4", True, False), ("fp4", True, True),
                                                 ("int8", False, True)])
    @pytest.mark.parametrize("size", [16, 64])
    def test_control_and_style_match_stock_loras_on_full_precision(self, host, files, quant, dq, img_in, size):
        deq, _ = dequantized_file(host, files[quant], quant, dq, img_in, f"ctl_deq_{quant}_{dq}_{img_in}.safetensors")
        g = {"q": loader(files[quant], quant, dq, img_in), "qc": apply_lora(["q", 0], CONTROL, 0.85),
             "qs": apply_lora(["qc", 0], STYLE, 0.6),
             "r": unet_loader(deq),
             "rc": stock_lora(["r", 0], CONTROL, 0.85), "rs": stock_lora(["rc", 0], STYLE, 0.6)}
        g = sampling_graph(g, ["qs", 0], key="q", size=size, steps=1, control_seed=42, prefix="a")
        g = sampling_graph(g, ["rs", 0], key="ref", size=size, steps=1, control_seed=42, prefix="b")
        g = sampling_graph(g, ["qs", 0], key="q_other", size=size, steps=1, control_seed=43, prefix="c")
        out = host.run(g)
        assert rel_err(out["q"], out["ref"]) < 1e-5
        # the control latent reaches the model: another control image gives another result
        assert rel_err(out["q_other"], out["q"]) > 1e-2

    @pytest.mark.parametrize("quant,img_in", [("nf4", True), ("int8", True), ("fp4", False)])
    def test_old_width_lora_on_widened_img_in_is_zero_padded(self, host, files, quant, img_in):
        deq, _ = dequantized_file(host, files[quant], quant, False, img_in, f"ctl_deq_pad_{quant}_{img_in}.safetensors")
        g = {"q": loader(files[quant], quant, False, img_in), "qc": apply_lora(["q", 0], CONTROL, 0.85),
             "qs": apply_lora(["qc", 0], STYLE_IMG_IN, 0.6),
             "r": unet_loader(deq),
             "rc": stock_lora(["r", 0], CONTROL, 0.85), "rs": stock_lora(["rc", 0], STYLE_IMG_IN_PADDED, 0.6)}
        g = sampling_graph(g, ["qs", 0], key="q", control_seed=42, prefix="a")
        g = sampling_graph(g, ["rs", 0], key="ref", control_seed=42, prefix="b")
        g = sampling_graph(g, ["qc", 0], key="control_only", control_seed=42, prefix="c")
        out = host.run(g)
        assert rel_err(out["q"], out["ref"]) < 1e-5
        assert rel_err(out["q"], out["control_only"]) > 1e-3

    def test_diffusers_control_lora_equals_bfl_and_kohya_style_equals_stock(self, host, files):
        """The same Control LoRA in diffusers layout (split q/k/v, swapped norm_out halves) gives the BFL
        file's result (ComfyUI's own loader drops its img_in widening, biases and norms); a kohya style
        LoRA matches ComfyUI's loader."""
        q = loader(files["nf4"], "nf4", True, True)
        g = {"q": q, "b": apply_lora(["q", 0], CONTROL, 0.85), "d": apply_lora(["q", 0], CONTROL_DIFFUSERS, 0.85),
             "bk": apply_lora(["b", 0], STYLE_KOHYA, 0.7), "sk": stock_lora(["b", 0], STYLE_KOHYA, 0.7)}
        g = sampling_graph(g, ["b", 0], key="bfl", control_seed=42, prefix="a")
        g = sampling_graph(g, ["d", 0], key="diffusers", control_seed=42, prefix="b")
        g = sampling_graph(g, ["bk", 0], key="kohya_ours", control_seed=42, prefix="c")
        g = sampling_graph(g, ["sk", 0], key="kohya_stock", control_seed=42, prefix="d")
        out = host.run(g)
        assert rel_err(out["diffusers"], out["bfl"]) < 1e-5
        assert rel_err(out["kohya_ours"], out["kohya_stock"]) < 1e-5
        assert rel_err(out["kohya_ours"], out["bfl"]) > 1e-3

    def test_stock_lora_loader_on_quantized_img_in_goes_through_expansion(self, host, files):
        deq, _ = dequantized_file(host, files["nf4"], "nf4", False, True, "ctl_deq_stock.safetensors")
        g = {"q": loader(files["nf4"], "nf4", False, True), "qc": stock_lora(["q", 0], CONTROL, 0.85),
             "r": unet_loader(deq),
             "rc": stock_lora(["r", 0], CONTROL, 0.85)}
        g = sampling_graph(g, ["qc", 0], key="q", control_seed=42, prefix="a")
        g = sampling_graph(g, ["rc", 0], key="ref", control_seed=42, prefix="b")
        out = host.run(g)
        assert rel_err(out["q"], out["ref"]) < 1e-5

    def test_full_precision_model_from_comfy_loader(self, host, files):
        g = {"r": unet_loader(files["fp4"]),
             "a": apply_lora(["r", 0], CONTROL, 0.85), "s": stock_lora(["r", 0], CONTROL, 0.85)}
        g = sampling_graph(g, ["a", 0], key="ours", control_seed=42, prefix="a")
        g = sampling_graph(g, ["s", 0], key="stock", control_seed=42, prefix="b")
        out = host.run(g)
        assert rel_err(out["ours"], out["stock"]) < 1e-6

    def test_img_in_width_seen_by_concat_cond(self, host, files):
        node = host.pack_module("nodes.apply_control_lora").ApplyControlLora
        layers = host.pack_module("quant_expand.layers")
        base = dequantized_file(host, files["nf4"], "nf4", True, True, "unused.safetensors")[1]
        with torch.inference_mode():
            patched = node.execute(base, CONTROL, 0.85).result[0]
        noise = torch.randn(1, 16, 8, 8)
        ctl = torch.randn(1, 16, 8, 8)
        dm = base.model.diffusion_model
        before = quantized_hash(host, base)
        patched.patch_model()
        try:
            assert layers.is_quantized_linear(dm.img_in) and dm.img_in.weight.shape[1] == 128
            assert dm.img_in.weight.quant_state.nested  # still the same kind of 4-bit layer
            cc = patched.model.concat_cond(noise=noise, concat_latent_image=ctl, device=torch.device("cpu"))
            assert cc is not None and cc.shape == (1, 16, 8, 8)
        finally:
            patched.unpatch_model()
        assert dm.img_in.weight.shape[1] == 64 and dm.img_in.in_features == 64
        assert base.model.concat_cond(noise=noise, concat_latent_image=ctl, device=torch.device("cpu")) is None
        assert quantized_hash(host, base) == before


class TestSetLoraScale:
    def test_set_scale_equals_applying_at_that_strength(self, host, files):
        q = loader(files["nf4"], "nf4", True, True)
        g = {"q": q, "c1": apply_lora(["q", 0], CONTROL, 1.0), "s1": apply_lora(["c1", 0], STYLE, 0.3),
             "set": set_lora_scale(["s1", 0], CONTROL, 0.6), "set0": set_lora_scale(["s1", 0], CONTROL, 0.0),
             "c2": apply_lora(["q", 0], CONTROL, 0.6), "s2": apply_lora(["c2", 0], STYLE, 0.3),
             "c0": apply_lora(["q", 0], CONTROL, 0.0), "s0": apply_lora(["c0", 0], STYLE, 0.3)}
        g = sampling_graph(g, ["set", 0], key="set", control_seed=42, prefix="a")
        g = sampling_graph(g, ["s2", 0], key="applied", control_seed=42, prefix="b")
        g = sampling_graph(g, ["set0", 0], key="set0", control_seed=42, prefix="c")
        g = sampling_graph(g, ["s0", 0], key="applied0", control_seed=42, prefix="d")
        g = sampling_graph(g, ["s1", 0], key="full", control_seed=42, prefix="e")
        out = host.run(g)
        assert torch.equal(out["set"], out["applied"])
        assert torch.equal(out["set0"], out["applied0"])
        assert rel_err(out["set"], out["full"]) > 1e-3

    def test_strength_zero_keeps_widening_and_norm_sets(self, host, files):
        """At 0 the LoRA deltas vanish but the widening and the QK-norm scales stay (ComfyUI's LoraLoader
        would skip the file): the result differs from the plain model through the replaced norm scales."""
        g = {"q": loader(files["fp4"], "fp4", False, True), "c0": apply_lora(["q", 0], CONTROL, 0.0)}
        g = sampling_graph(g, ["c0", 0], key="zero", control_seed=42, prefix="a")
        g = sampling_graph(g, ["q", 0], key="plain", control_seed=42, prefix="b")
        out = host.run(g)
        assert rel_err(out["zero"], out["plain"]) > 1e-4  # the norm scales were replaced

    def test_bytes_unchanged_through_apply_rescale_remove(self, host, files):
        node_mod = host.pack_module("nodes.apply_control_lora")
        base = dequantized_file(host, files["nf4"], "nf4", True, True, "unused2.safetensors")[1]
        before = quantized_hash(host, base)
        ref = sample_direct(base)
        with torch.inference_mode():
            m = node_mod.ApplyControlLora.execute(base, CONTROL, 1.0).result[0]
            m = node_mod.ApplyControlLora.execute(m, STYLE, 0.5).result[0]
            a = sample_direct(m, control=torch.randn(1, 16, 16, 16))
            m2 = node_mod.SetLoraScale.execute(m, STYLE, -0.7).result[0]
            b = sample_direct(m2, control=torch.randn(1, 16, 16, 16))
        assert rel_err(a, b) > 1e-4
        assert quantized_hash(host, base) == before
        assert torch.equal(sample_direct(base), ref)


class TestInPlaceSwap:
    def test_switching_clones_swaps_patches_in_place_with_same_results(self, host, files):
        """A loaded model that switches to a clone with other LoRA strengths is re-patched where it is
        (ComfyUI would round-trip it through the offload device); results equal fresh loads."""
        node_mod = host.pack_module("nodes.apply_control_lora")

        def fresh(strength):
            base = dequantized_file(host, files["fp4"], "fp4", True, True, "unused3.safetensors")[1]
            with torch.inference_mode():
                m = node_mod.ApplyControlLora.execute(base, CONTROL, 1.0).result[0]
                m = node_mod.SetLoraScale.execute(m, CONTROL, strength).result[0]
            return base, m

        ctl = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(4))
        _, ref_a = fresh(0.9)
        expect_a = sample_direct(ref_a, control=ctl)
        _, ref_b = fresh(-0.4)
        expect_b = sample_direct(ref_b, control=ctl)
        base, a = fresh(0.9)
        with torch.inference_mode():
            b = node_mod.SetLoraScale.execute(a, CONTROL, -0.4).result[0]
        assert torch.equal(sample_direct(a, control=ctl), expect_a)
        assert b._can_swap_patches_in_place(torch.device("cpu"), False)
        import comfy.utils

        norm_keys = [k for k, plist in b.patches.items() if k.endswith("_norm.weight")
                     and all(isinstance(p[1], tuple) and p[1][0] == "set" for p in plist)]
        assert norm_keys, "the Control LoRA should set norm scales"
        merged_norms = {k: comfy.utils.get_attr(b.model, k) for k in norm_keys}
        assert torch.equal(sample_direct(b, control=ctl), expect_b)
        # a "set" ignores strength: those merges stayed as they were (same tensors), the rest was redone
        assert all(comfy.utils.get_attr(b.model, k) is t for k, t in merged_norms.items())
        assert torch.equal(sample_direct(a, control=ctl), expect_a)
        assert torch.equal(sample_direct(base, control=ctl), sample_direct(fresh(0.9)[0], control=ctl))

    @pytest.mark.parametrize("img_in", [True, False], ids=["img_in-quantized", "img_in-float"])
    @pytest.mark.parametrize("object_patch", [False, True], ids=["no-object-patch", "module-object-patch"])
    def test_swap_back_from_a_widened_clone_restores_img_in(self, host, files, img_in, object_patch):
        """B: a LoRA that touches img_in (through the stock loader); A: a Control LoRA on B (widens img_in
        with an object patch). Sampling B, then A, then B again swaps in place both ways; B's img_in
        delta must land on the layer that is in the model again, not on A's widened one."""
        import copy

        import nodes

        node_mod = host.pack_module("nodes.apply_control_lora")

        def build():
            base = dequantized_file(host, files["nf4"], "nf4", False, img_in, "unused9.safetensors")[1]
            with torch.inference_mode():
                b = nodes.LoraLoaderModelOnly().load_lora_model_only(base, STYLE_IMG_IN, 0.8)[0]
            if object_patch:  # a module object patch, as ModelSamplingFlux nodes add
                b.add_object_patch("model_sampling", copy.deepcopy(b.get_model_object("model_sampling")))
            with torch.inference_mode():
                a = node_mod.ApplyControlLora.execute(b, CONTROL, 1.0).result[0]
            return b, a

        ctl = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(4))
        expect_b = sample_direct(build()[0])
        b, a = build()
        assert torch.equal(sample_direct(b), expect_b)
        sample_direct(a, control=ctl)
        assert b._can_swap_patches_in_place(b.load_device, False)
        assert torch.equal(sample_direct(b), expect_b)

    def test_swap_into_an_object_patched_layer_keeps_each_layers_own_weight(self, host, files):
        """A clone that replaces an unquantized, LoRA-merged layer with another module (object patch)
        and patches it too: the swap merges into the new module from its own weight and backs that up,
        so unloading leaves each module holding its own weight."""
        import copy

        import comfy.model_management as mm

        node_mod = host.pack_module("nodes.apply_control_lora")
        key = "diffusion_model.final_layer.linear"  # kept in the compute dtype; a style LoRA targets it

        def build():
            base = dequantized_file(host, files["nf4"], "nf4", False, False, "unused10.safetensors")[1]
            with torch.inference_mode():
                a = node_mod.ApplyControlLora.execute(base, STYLE, 0.8).result[0]
                b = node_mod.SetLoraScale.execute(a, STYLE, 0.5).result[0]
            other = copy.deepcopy(b.get_model_object(key))
            with torch.no_grad():
                other.weight.mul_(2.0)
            b.add_object_patch(key, other)
            return a, b, other

        _, fresh_b, _ = build()
        expect_b = sample_direct(fresh_b)
        a, b, other = build()
        own = other.weight.detach().clone()
        sample_direct(a)
        assert torch.equal(sample_direct(b), expect_b)
        mm.unload_all_models()
        assert torch.equal(other.weight.detach().to(own.device), own)
        assert torch.equal(sample_direct(b), expect_b)


def test_a_control_lora_applied_after_another_clone_merged_into_img_in_widens_the_unmerged_layer(host, files):
    """ComfyUI merges a loaded clone's LoRA into a plain layer's weight in place and keeps the original in
    the shared backup: a Control LoRA applied while a style LoRA on img_in is merged must widen the original
    img_in, not the merged one. Same patches on the same widened weight: the latents must be the same
    bits as when the Control LoRA was applied to the untouched model."""
    control_copy = "tiny_canny_lora_copy.safetensors"  # another file name: its node runs anew, not cached
    save_safetensors(make_control_lora(CFG, seed=2), host.model_path("loras", control_copy))
    q = loader(files["nf4"], "nf4")
    first = host.run(sampling_graph({"q": q, "c": apply_lora(["q", 0], CONTROL, 1.0)}, ["c", 0], key="x",
                                    control_seed=42))["x"]
    host.run(sampling_graph({"q": q, "s": apply_lora(["q", 0], STYLE_IMG_IN, 1.0)}, ["s", 0], key="style"))
    assert host.node_output("q").backup, "the style clone's merge into img_in is what this test is about"
    later = host.run(sampling_graph({"q": q, "c": apply_lora(["q", 0], control_copy, 1.0)}, ["c", 0], key="x",
                                    control_seed=42))["x"]
    assert torch.equal(later, first), rel_err(later, first)
