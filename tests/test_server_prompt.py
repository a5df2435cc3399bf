"""End to end through a real ComfyUI server process (loopback, CPU): the pack as a user installs it.

A throwaway ``--base-directory`` holds the pack (``custom_nodes/comfyui-bnb-flux``, a symlink to this
repo), a test-only node file for conditioning and an empty latent (tiny FLUX has no usable text
encoder), tiny FLUX files and a LoRA. Prompts go through ``POST /prompt`` as the frontend sends them,
results come back through ``/history`` and the ``.latent`` files SaveLatent writes.

Tolerances (relative L2 error of whole latents after two euler steps, float32 on CPU):
- LoRA, quantized vs full precision: 1e-5. The file's weights survive NF4 exactly (``exact_for="nf4"``,
  double quant off), so both models hold the same float32 numbers; ComfyUI merges ``W + s*(up@down)``
  into the float32 weight while the pack applies the LoRA lazily (``W + (s*up)@down`` or
  ``up(down(x))``): the same sums in another order, float32 eps ~1e-7 amplified a little by the sampler.
- no LoRA, quantized vs quantized (two loader runs): 1e-6, the same computation twice.
- the LoRA must move the latent by more than 1e-3 (it does by a few percent), so 1e-5 above is not
  passed by a LoRA that does nothing.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from quant_expand.testing.prompts import (apply_lora, ksampler, load_bnb_flux, node, rel_err, set_lora_scale,
                                          stock_lora, unet_loader)
from quant_expand.testing.synthetic import TinyFluxConfig, make_lora, make_tiny_flux, save_safetensors
from server_host import PACK_DIR_NAME, REPO_ROOT, running_server

CFG = TinyFluxConfig()
MODEL = "tiny_exact_nf4.safetensors"
LORA = "tiny_lora.safetensors"
NOT_FLUX = "sdxl_like_unet.safetensors"
SEED = 42


def write_files(dirs):
    save_safetensors(make_tiny_flux(CFG, seed=0, exact_for="nf4"), os.path.join(dirs["models/diffusion_models"], MODEL))
    save_safetensors(make_lora(CFG, kind="lora", seed=11), os.path.join(dirs["models/loras"], LORA))
    g = torch.Generator().manual_seed(5)
    save_safetensors({"input_blocks.0.0.weight": torch.randn(32, 4, 3, 3, generator=g),
                      "input_blocks.0.0.bias": torch.randn(32, generator=g),
                      "time_embed.0.weight": torch.randn(64, 32, generator=g),
                      "out.2.weight": torch.randn(4, 32, 3, 3, generator=g)},
                     os.path.join(dirs["models/diffusion_models"], NOT_FLUX))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory, "comfy-server", write_files) as srv:
        yield srv


# --- graph pieces (API format, as the frontend submits) ------------------------------------------

def loader(name=MODEL, quant="nf4", dq=False, dtype="float32"):
    return load_bnb_flux(name, quant, dq, dtype)


def lora(model_ref, strength=0.75):
    return stock_lora(model_ref, LORA, strength)


def conditioning_nodes():
    cond = {"tokens": 8, "context_dim": CFG.context_in_dim, "pooled_dim": CFG.vec_in_dim, "guidance": 3.5}
    return {"pos": node("BnbFluxServerTestConditioning", **cond, seed=1),
            "neg": node("BnbFluxServerTestConditioning", **cond, seed=1001),
            "lat": node("BnbFluxServerTestLatent", seed=0, size=16, scale=0.0)}


def sample_and_save(prefix, model_ref):
    return {f"{prefix}_ks": ksampler(model_ref, ["pos", 0], ["neg", 0], ["lat", 0], seed=SEED, steps=2),
            f"{prefix}_save": node("SaveLatent", samples=[f"{prefix}_ks", 0], filename_prefix=f"latents/{prefix}")}


def saved_latent(server, entry, prefix) -> torch.Tensor:
    from safetensors.torch import load_file

    files = entry["outputs"][f"{prefix}_save"]["latents"]
    assert len(files) == 1 and files[0]["type"] == "output"
    path = os.path.join(server.dirs["output"], files[0]["subfolder"], files[0]["filename"])
    return load_file(path)["latent_tensor"]


def assert_success(entry):
    status = entry["status"]
    errors = [m for m in status["messages"] if m[0] == "execution_error"]
    assert status["status_str"] == "success" and status["completed"] and not errors, errors


# --- tests ----------------------------------------------------------------------------------------

def test_object_info_lists_loader_with_its_inputs(server):
    info = server.get_json("/object_info")["LoadBnbFlux"]
    req = info["input"]["required"]
    assert list(req) == ["unet_name", "quant_type", "double_quant", "compute_dtype"]

    def options(spec):  # COMBO inputs: ["COMBO", {"options": [...]}] (V3) or [[...], {...}] (V1)
        return spec[1]["options"] if spec[0] == "COMBO" else spec[0]

    assert {MODEL, NOT_FLUX} <= set(options(req["unet_name"]))
    assert options(req["quant_type"]) == ["nf4", "fp4", "int8"]
    assert req["double_quant"][0] == "BOOLEAN"
    assert options(req["compute_dtype"]) == ["auto", "bfloat16", "float16", "float32"]
    assert info["output"] == ["MODEL"]
    assert info["python_module"] == f"custom_nodes.{PACK_DIR_NAME}"
    # the test nodes came from the temporary custom_nodes folder, not from the pack
    test_node = server.get_json("/object_info/BnbFluxServerTestConditioning")["BnbFluxServerTestConditioning"]
    assert test_node["python_module"] == "custom_nodes.bnb_flux_test_nodes"


def test_web_directory_is_served(server):
    url = f"/extensions/{PACK_DIR_NAME}/bnb_flux.js"
    assert url in server.get_json("/extensions")
    status, body = server.get(url)
    assert status == 200
    with open(os.path.join(REPO_ROOT, "web", "bnb_flux.js"), "rb") as f:
        assert body == f.read()


def test_lora_prompt_matches_full_precision(server):
    g = {"q": loader(), "ql": lora(["q", 0]),
         "r": unet_loader(MODEL), "rl": lora(["r", 0]), **conditioning_nodes(),
         **sample_and_save("q_lora", ["ql", 0]), **sample_and_save("ref_lora", ["rl", 0]),
         **sample_and_save("q_plain", ["q", 0])}
    t0 = time.monotonic()
    entry = server.run_prompt(g)
    print(f"LoRA prompt (3 branches) ran in {time.monotonic() - t0:.1f} s")
    assert_success(entry)
    q, ref, plain = (saved_latent(server, entry, p) for p in ("q_lora", "ref_lora", "q_plain"))
    assert q.shape == (1, 16, 16, 16) and torch.isfinite(q).all() and q.abs().max() > 0
    err = rel_err(q, ref)
    print(f"rel err quantized+LoRA vs full precision+LoRA: {err:.2e}; LoRA effect: {rel_err(plain, ref):.2e}")
    assert err < 1e-5
    assert rel_err(plain, ref) > 1e-3  # the LoRA really acts


def test_unknown_quant_type_is_rejected_by_validator(server):
    g = {"q": loader(quant="nf5"), **conditioning_nodes(), **sample_and_save("bad", ["q", 0])}
    status, answer = server.post_prompt(g)
    assert status == 400, answer
    assert "q" in answer["node_errors"], answer
    assert any(e.get("extra_info", {}).get("input_name") == "quant_type"
               for e in answer["node_errors"]["q"]["errors"]), answer


def test_non_flux_file_reports_error_then_server_recovers(server):
    g = {"q": loader(name=NOT_FLUX), **conditioning_nodes(), **sample_and_save("notflux", ["q", 0])}
    entry = server.run_prompt(g)
    status = entry["status"]
    assert status["status_str"] == "error" and not status["completed"]
    errors = [m[1] for m in status["messages"] if m[0] == "execution_error"]
    assert len(errors) == 1 and errors[0]["node_id"] == "q" and errors[0]["node_type"] == "LoadBnbFlux", errors
    print(f"non-FLUX file: {errors[0]['exception_type']}: {errors[0]['exception_message'].strip()}")
    assert NOT_FLUX in errors[0]["exception_message"]

    # a following good prompt runs (the loader with new inputs, so it really executes again);
    # "auto" is float32 on a CPU, so it repeats the computation of the plain branch above
    g = {"q_auto": loader(dtype="auto"), "q": loader(), **conditioning_nodes(),
         **sample_and_save("after_auto", ["q_auto", 0]), **sample_and_save("after_f32", ["q", 0])}
    entry = server.run_prompt(g)
    assert_success(entry)
    a, b = saved_latent(server, entry, "after_auto"), saved_latent(server, entry, "after_f32")
    assert torch.isfinite(a).all() and a.abs().max() > 0
    assert rel_err(a, b) < 1e-6


@pytest.mark.skipif(os.environ.get("BNB_FLUX_SERVER_DEVICE") != "gpu", reason="needs a CUDA GPU: GPU run only (BNB_FLUX_SERVER_DEVICE=gpu)")
def test_gpu_server_runs_with_dynamic_vram(server):
    """On NVIDIA, ComfyUI's main.py turns dynamic VRAM on: the stock model gets ModelPatcherDynamic while
    Load BnB Flux keeps its own non-dynamic patcher, in the same server and the same prompt."""
    log = server.log_tail(200000)
    assert "DynamicVRAM support detected and enabled" in log, log[-3000:]


def test_apply_control_lora_set_scale_and_chains_match_full_precision(server):
    """Apply Control LoRA -> Apply Control LoRA (style) -> Set LoRA Scale through /prompt equals ComfyUI's
    stock LoraLoaderModelOnly chain on the full-precision file, prompt after prompt (the loaded model
    is reused and its patches swapped between prompts)."""
    from quant_expand.testing.synthetic import make_control_lora

    control = "tiny_canny_lora.safetensors"
    save_safetensors(make_control_lora(CFG, seed=2), os.path.join(server.dirs["models/loras"], control))

    def graph(scale):
        return {"q": loader(), "qc": apply_lora(["q", 0], control, 1.0),
                "qs": apply_lora(["qc", 0], LORA, 0.5),
                "qx": set_lora_scale(["qs", 0], control, scale),
                "r": unet_loader(MODEL),
                "rc": stock_lora(["r", 0], control, scale), "rs": stock_lora(["rc", 0], LORA, 0.5),
                **conditioning_nodes(), **sample_and_save(f"q_ctl_{scale}", ["qx", 0]),
                **sample_and_save(f"ref_ctl_{scale}", ["rs", 0])}

    results = {}
    for scale in (0.85, 0.3, 0.85):
        entry = server.run_prompt(graph(scale))
        assert_success(entry)
        q, ref = (saved_latent(server, entry, f"{p}_ctl_{scale}") for p in ("q", "ref"))
        assert rel_err(q, ref) < 1e-5, scale
        if scale in results:  # the repeated prompt gives the same result
            assert torch.equal(q, results[scale])
        results[scale] = q
    assert rel_err(results[0.3], results[0.85]) > 1e-3
