"""Pre-quantized files through ComfyUI's executor, loaders, patcher and sampler (CPU): Save BnB Flux ->
Load BnB Flux round trips, and files in every foreign layout loaded by Load BnB Flux with no extra node.

Comparisons:
- round trips and files holding the very bytes quantize-on-load makes: ``torch.equal`` on every stored
  tensor and on the sampled latents (the same numbers through the same kernels);
- other foreign files (every Linear quantized, double quant, q/k/v de-nested): against ComfyUI's own
  UNETLoader on a float32 file of the loaded model's dequantized weights, relative L2 error < 1e-6 on whole
  latents (float32 matmuls on identical weights; only kernel order may differ), as in test_comfy_load.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors import safe_open

from prequantized_files import diffusers_state_dict, forge_state_dict, save_sharded
from quant_expand.testing.prompts import (apply_lora, load_bnb_flux, node, rel_err, sampling_graph, save_bnb_flux,
                                          unet_loader)
from quant_expand.testing.synthetic import TinyFluxConfig, make_control_lora, make_tiny_flux, save_safetensors

CFG = TinyFluxConfig()
CONTROL = "pq_control_lora.safetensors"


def load_direct(host, file, quant="nf4", dq=True):
    node = host.pack_module("nodes.load_bnb_flux").LoadBnbFlux
    with torch.inference_mode():
        return node.execute(file, quant, dq, "float32").result[0]


def report_of(host, patcher):
    return host.pack_module("quant_expand.comfyui.report").load_report(patcher)


@pytest.fixture(scope="module")
def exact(host):
    out = {}
    for q in ("nf4", "fp4", "int8"):
        out[q] = f"pq_exact_{q}.safetensors"
        save_safetensors(make_tiny_flux(CFG, seed=0, exact_for=q), host.model_path("diffusion_models", out[q]))
    save_safetensors(make_control_lora(CFG, seed=2), host.model_path("loras", CONTROL))
    return out


def stored_tensors(host, patcher) -> dict:
    """Every stored tensor of the diffusion model: the quantized layers' bytes and states, the rest as is."""
    layers = host.pack_module("quant_expand.layers")
    dm = patcher.model.diffusion_model
    out = {}
    quantized = {n for n, m in dm.named_modules() if layers.is_quantized_linear(m)}
    for name in quantized:
        for k, t in host.pack_module("quant_expand.layer_state").quantized_bytes(dm.get_submodule(name)).items():
            out[f"{name}:{k}"] = t
    for name, p in dm.named_parameters():
        if name.rpartition(".")[0] not in quantized or name.endswith(".bias"):
            out[name] = p.detach()
    return out


def assert_same_storage(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].cpu(), b[k].cpu()), k


def saved_file(outdir, prefix):
    folder, base = os.path.split(os.path.join(outdir, prefix))
    found = sorted(n for n in os.listdir(folder) if n.startswith(base + "_") and n.endswith(".safetensors"))
    assert found, f"nothing saved under {folder}"
    return os.path.join(folder, found[-1])


def install(host, path, name):
    shutil.copy(path, host.model_path("diffusion_models", name))
    return name


def write_dequantized(host, patcher, name):
    save_safetensors(host.pack_module("quant_expand.layer_state").dequantized_state_dict(patcher.model.diffusion_model), host.model_path("diffusion_models", name))
    return name


class TestSaveLoadRoundTrip:
    @pytest.mark.parametrize("quant,dq", [("nf4", True), ("fp4", False), ("int8", False)])
    def test_save_then_load_gives_identical_bytes_and_outputs(self, host, exact, outdir, quant, dq):
        prefix = f"diffusion_models/rt_{quant}_{dq}"
        host.run({"q": load_bnb_flux(exact[quant], quant, dq), "save": save_bnb_flux(["q", 0], prefix)})
        path = saved_file(outdir, prefix)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        assert meta["format"] == "bnb-flux" and meta["quant_type"] == quant
        name = install(host, path, f"rt_{quant}_{dq}.safetensors")
        # the reload asks for another scheme: the file's own quantization wins
        other = "int8" if quant != "int8" else "nf4"
        g = sampling_graph({"q": load_bnb_flux(exact[quant], quant, dq)}, ["q", 0], key="orig", prefix="a")
        g = sampling_graph({**g, "r": load_bnb_flux(name, other, not dq)}, ["r", 0], key="reloaded", prefix="b")
        out = host.run(g)
        original, reloaded = host.node_output("q"), host.node_output("r")
        assert report_of(host, reloaded).prequantized and not report_of(host, original).prequantized
        assert report_of(host, reloaded).quant == report_of(host, original).quant
        assert_same_storage(stored_tensors(host, original), stored_tensors(host, reloaded))
        assert torch.equal(out["orig"], out["reloaded"])
        # detection saw logical shapes: the same model config as the full-precision file gave
        assert reloaded.model.model_config.unet_config == original.model.model_config.unet_config

    def test_save_refuses_a_model_with_loras(self, host, exact, outdir):
        g = {"q": load_bnb_flux(exact["nf4"]),
             "l": apply_lora(["q", 0], CONTROL, 1.0),
             "save": save_bnb_flux(["l", 0], "diffusion_models/with_lora")}
        errors = host.run(g, expect_error=True)["errors"]
        assert len(errors) == 1 and errors[0]["node_type"] == "SaveBnbFlux"
        assert "LoRA patches" in errors[0]["exception_message"] and "straight to Load BnB Flux" in errors[0]["exception_message"]

    def test_clones_keep_the_load_report_and_save_names_the_loaded_file(self, host, exact, outdir):
        """ComfyUI's clone() drops a patcher's plain attributes: the report is an attachment, so a clone
        without patches (ComfyUI's RescaleCFG) saves with the loaded file as ``source``, and LoRA clones
        still know what was loaded."""
        loaded = load_direct(host, exact["nf4"])
        report = report_of(host, loaded)
        assert report is not None and report.file == exact["nf4"] and not report.prequantized
        assert report_of(host, loaded.clone()) is report
        lora_nodes = host.pack_module("nodes.apply_control_lora")
        with torch.inference_mode():
            applied = lora_nodes.ApplyControlLora.execute(loaded, CONTROL, 1.0).result[0]
            rescaled = lora_nodes.SetLoraScale.execute(applied, CONTROL, 0.5).result[0]
        assert report_of(host, applied) is report and report_of(host, rescaled) is report
        prefix = "diffusion_models/from_a_clone"
        host.run({"q": load_bnb_flux(exact["nf4"]),
                  "c": node("RescaleCFG", model=["q", 0], multiplier=0.7),
                  "save": save_bnb_flux(["c", 0], prefix)})
        clone = host.node_output("c")
        assert clone is not host.node_output("q") and not clone.patches and not clone.object_patches
        with safe_open(saved_file(outdir, prefix), "pt") as f:
            assert f.metadata()["source"] == exact["nf4"]

    @pytest.mark.parametrize("prefix", ["diffusion_models/a\x00b", "diffusion_models/two\nlines", ""])
    def test_save_refuses_a_prefix_with_control_characters_naming_it(self, host, exact, outdir, prefix):
        """The OS said only "Invalid argument (os error 22)" for a NUL; a newline would end up in a file name."""
        errors = host.run({"q": load_bnb_flux(exact["nf4"]), "save": save_bnb_flux(["q", 0], prefix)},
                          expect_error=True)["errors"]
        assert len(errors) == 1 and errors[0]["node_type"] == "SaveBnbFlux", errors
        msg = errors[0]["exception_message"]
        assert msg.startswith(f"filename_prefix {prefix!r} is not a usable path") and "without control characters" in msg

    def test_save_while_a_control_lora_clone_is_loaded_saves_the_base(self, host, exact, outdir):
        """A Control LoRA branch that sampled last leaves its widened img_in and norm sets in the shared
        module tree; the base model's file must not contain them."""
        import comfy.model_management as mm

        base_g = {"q": load_bnb_flux(exact["fp4"], "fp4", False),
                  "l": apply_lora(["q", 0], CONTROL, 1.0)}
        host.run(sampling_graph(base_g, ["l", 0], key="ctl", control_seed=3))
        base, clone = host.node_output("q"), host.node_output("l")
        mm.load_models_gpu([clone])  # make sure the clone is the one patched into the shared modules now
        dm = base.model.diffusion_model
        assert dm.img_in.in_features == 128, "the Control LoRA clone should be patched in"
        prefix = "diffusion_models/base_while_patched"
        host.run({**base_g, "save": save_bnb_flux(["q", 0], prefix)})
        name = install(host, saved_file(outdir, prefix), "base_while_patched.safetensors")
        mm.unload_all_models()
        assert_same_storage(stored_tensors(host, load_direct(host, exact["fp4"], "fp4", False)),
                            stored_tensors(host, load_direct(host, name, "fp4", False)))


    @pytest.mark.parametrize("quant,dq", [("nf4", True), ("int8", False)])
    def test_cli_converted_file_holds_the_bytes_of_quantize_on_load(self, host, exact, tmp_path, quant, dq):
        """python -m quant_expand.cli quantize once; every later start loads those bytes without quantizing."""
        from quant_expand.cli import main

        src = save_safetensors({k: v.to(torch.bfloat16) for k, v in make_tiny_flux(CFG, seed=11).items()},
                               host.model_path("diffusion_models", f"pq_bf16_{quant}.safetensors"))
        dst = host.model_path("diffusion_models", f"pq_cli_{quant}.safetensors")
        assert main(["quantize", src, dst, "--quant", quant] + ([] if dq else ["--no-double-quant"])) == 0
        on_load = load_direct(host, os.path.basename(src), quant, dq)
        converted = load_direct(host, os.path.basename(dst), "fp4", not dq)
        assert report_of(host, converted).prequantized and report_of(host, converted).quant == report_of(host, on_load).quant
        assert_same_storage(stored_tensors(host, on_load), stored_tensors(host, converted))


class TestForeignFiles:
    def test_forge_all_in_one_from_checkpoints_equals_quantize_on_load(self, host, exact):
        """A Forge v2-style NF4 all-in-one file in models/checkpoints, quantized by bitsandbytes itself on
        the layers Load BnB Flux quantizes: the same bytes, so the same samples, as quantizing on load."""
        spec = host.pack_module("quant_expand.spec").QuantSpec("nf4", False)
        sd = make_tiny_flux(CFG, seed=0, exact_for="nf4")
        policy = lambda n: host.pack_module("quant_expand.flux").default_should_quantize(n, sd[f"{n}.weight"].shape[1], spec)  # noqa: E731
        save_safetensors(forge_state_dict(sd, "nf4", False, quantize=policy),
                         host.model_path("checkpoints", "pq_forge_aio.safetensors"))
        node = host.nodes.NODE_CLASS_MAPPINGS["LoadBnbFlux"]
        assert "pq_forge_aio.safetensors" in node.INPUT_TYPES()["required"]["unet_name"][1]["options"]
        g = sampling_graph({"f": load_bnb_flux("pq_forge_aio.safetensors", "int8", True)}, ["f", 0], key="forge",
                           prefix="a")
        g = sampling_graph({**g, "q": load_bnb_flux(exact["nf4"], "nf4", False)}, ["q", 0], key="on_load", prefix="b")
        out = host.run(g)
        assert_same_storage(stored_tensors(host, host.node_output("f")), stored_tensors(host, host.node_output("q")))
        assert torch.equal(out["forge"], out["on_load"])
        info = report_of(host, host.node_output("f"))
        assert info.prequantized and "lllyasviel/Forge" in info.source
        # what the node shows: what it found, and that its quant_type input did not apply
        node = host.pack_module("nodes.load_bnb_flux").LoadBnbFlux
        with torch.inference_mode():
            text = node.execute("pq_forge_aio.safetensors", "int8", True, "float32").ui["text"][0]
        assert "pq_forge_aio.safetensors: pre-quantized, lllyasviel/Forge bnb 4-bit layout" in text
        assert "14 x nf4 (blocksize 64, no double quant)" in text and "quant_type and double_quant not used" in text

    @pytest.mark.parametrize("quant", ["nf4", "fp4"])
    def test_forge_v1_every_linear_quantized(self, host, exact, quant):
        """Forge NF4 v1 / FP4: double-quantized absmax, every Linear quantized (img_in and the final layer too)."""
        sd = make_tiny_flux(CFG, seed=1)
        name = f"pq_forge_v1_{quant}.safetensors"
        save_safetensors(forge_state_dict(sd, quant, True, all_in_one=False, prefix="model.diffusion_model."),
                         host.model_path("diffusion_models", name))
        patcher = load_direct(host, name, "int8", False)
        layers = host.pack_module("quant_expand.layers")
        dm = patcher.model.diffusion_model
        assert all(layers.is_quantized_linear(m) for m in dm.modules() if isinstance(m, torch.nn.Linear))
        assert dm.img_in.weight.shape == (CFG.hidden_size, 64)  # logical, for concat_cond and LoRA key maps
        assert patcher.model.model_config.unet_config["in_channels"] == 16
        assert patcher.model.model_config.unet_config["hidden_size"] == CFG.hidden_size
        ref = write_dequantized(host, patcher, f"pq_forge_v1_{quant}_deq.safetensors")
        g = sampling_graph({"f": load_bnb_flux(name, "int8", False)}, ["f", 0], key="forge", prefix="a")
        g = sampling_graph({**g, "r": unet_loader(ref)}, ["r", 0], key="ref", prefix="b")
        out = host.run(g)
        assert torch.isfinite(out["forge"]).all() and rel_err(out["forge"], out["ref"]) < 1e-6

    def test_diffusers_bnb_sharded_double_quant(self, host, exact):
        sd = make_tiny_flux(CFG, seed=0, exact_for="nf4")
        folder = os.path.join(host.models_dir, "diffusion_models", "pq_diffusers_nf4")
        # proj_out kept in full precision (llm_int8_skip_modules): the loader keeps the file's choice
        save_sharded(diffusers_state_dict(sd, CFG, "nf4", double_quant=True, skip=("proj_out",)), folder, shards=2)
        shard = "pq_diffusers_nf4/diffusion_pytorch_model-00002-of-00002.safetensors"
        patcher = load_direct(host, shard, "fp4", False)
        info = report_of(host, patcher)
        assert info.prequantized and "diffusers-bnb" in info.source
        assert any("de-nested" in n for n in info.notes)  # the log and the node's text say so
        qkv = patcher.model.diffusion_model.double_blocks[0].img_attn.qkv
        assert qkv.weight.shape == (3 * CFG.hidden_size, CFG.hidden_size) and not qkv.weight.quant_state.nested
        ref = write_dequantized(host, patcher, "pq_diffusers_nf4_deq.safetensors")
        g = sampling_graph({"d": load_bnb_flux(shard, "fp4", False)}, ["d", 0], key="diffusers", prefix="a")
        g = sampling_graph({**g, "r": unet_loader(ref)}, ["r", 0], key="ref", prefix="b")
        out = host.run(g)
        assert rel_err(out["diffusers"], out["ref"]) < 1e-6
        # the file kept proj_out in full precision: so does the loaded model
        assert not host.pack_module("quant_expand.layers").is_quantized_linear(patcher.model.diffusion_model.final_layer.linear)

    def test_llm_int8_diffusers_file(self, host, exact):
        sd = make_tiny_flux(CFG, seed=0, exact_for="int8")
        save_safetensors(diffusers_state_dict(sd, CFG, "int8"), host.model_path("diffusion_models", "pq_int8.safetensors"))
        g = sampling_graph({"i": load_bnb_flux("pq_int8.safetensors", "nf4", True)}, ["i", 0], key="int8", prefix="a")
        g = sampling_graph({**g, "r": unet_loader(exact["int8"])}, ["r", 0], key="ref", prefix="b")
        out = host.run(g)
        patcher = host.node_output("i")
        info = report_of(host, patcher)
        assert info.quant.startswith("int8") and info.quantized_layers == 23  # every Linear
        # exact-survival int8 weights: the file's model is the original full-precision one
        assert rel_err(out["int8"], out["ref"]) < 1e-6


def test_save_node_schema(host):
    spec = host.nodes.NODE_CLASS_MAPPINGS["SaveBnbFlux"].INPUT_TYPES()["required"]
    assert list(spec) == ["model", "filename_prefix"]
    assert spec["filename_prefix"][1]["default"] == "diffusion_models/flux_bnb"
    assert host.nodes.NODE_CLASS_MAPPINGS["SaveBnbFlux"].OUTPUT_NODE
