"""The streaming plan of a partially loaded model, through ComfyUI's own legacy ``ModelPatcher.load`` (CPU).

On CPU nothing is really offloaded (ComfyUI's load and offload devices are the same), so these tests check
the plan, not the speed: which layers ComfyUI leaves offloaded under a budget and that exactly those
stream, grouped by FLUX block; that ComfyUI's sizes include the LoRA factors; that the unquantized modules
stay resident; how many bytes a forward and a Set LoRA Scale copy; and that a streamed model computes the
same bits as the fully loaded one (the same kernels on the same numbers: ``torch.equal``). The GPU side
(pinned sources, side stream, device-level peaks) is ``bench/bench_gpu.py --phase lowvram``.
"""
from __future__ import annotations

import pytest
import torch

from comfy_host import denoise_once
from model_files import write_flux_with_loras
from quant_expand.testing.synthetic import TinyFluxConfig

CFG = TinyFluxConfig(depth=4, depth_single_blocks=8)  # blocks enough that a budget holds the slots and more
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def files(host):
    write_flux_with_loras(CFG, host.model_path("diffusion_models", ""), host.model_path("loras", ""),
                          "stream_flux.safetensors", "stream_control.safetensors", "stream_style.safetensors")
    return "stream_flux.safetensors"


def loaded(host, files):
    node = host.pack_module("nodes.load_bnb_flux").LoadBnbFlux
    apply = host.pack_module("nodes.apply_control_lora").ApplyControlLora
    with torch.inference_mode():
        base = node.execute(files, "nf4", False, "float32").result[0]
        ctl = apply.execute(base, "stream_control.safetensors", 1.0).result[0]
        return base, apply.execute(ctl, "stream_style.safetensors", 0.6).result[0]


def partial(patcher):
    """A budget that holds the streaming slots and about half of the quantized layers."""
    import comfy.model_management as mm

    mm.unload_all_models()
    reserve = patcher._streaming_reserve()
    budget = reserve + (patcher.model_size() - reserve) // 2
    patcher.patch_model(device_to=CPU, lowvram_model_memory=budget)
    return budget


def test_model_size_counts_the_lora_factors(host, files):
    base, styled = loaded(host, files)
    expected = 0
    for name, module in styled._quantized_modules():
        for patch in styled.patches.get(f"{name}.weight", []):
            down = patch[1].weights[1]  # LoRAAdapter weights: (up, down, alpha, ...)
            expected += down.shape[0] * (module.in_features + module.out_features) * 4  # float32 compute
        expected += module.out_features * 4 if f"{name}.bias" in styled.patches else 0
    assert expected > 0 and styled.lora_bytes() == expected
    assert styled.model_size() == base.model_size() + expected
    assert isinstance(styled, host.pack_module("quant_expand.comfyui.patcher").BnbModelPatcher)


def test_offloaded_quantized_layers_stream_by_block_and_the_rest_stays_resident(host, files):
    adapter = host.pack_module("quant_expand.comfyui.partial_load")
    layers = host.pack_module("quant_expand.layers")
    _, styled = loaded(host, files)
    partial(styled)
    try:
        streamer = getattr(styled.model, adapter.STREAMER_ATTR)
        assert streamer is not None and styled.model.model_lowvram
        dm = styled.model.diffusion_model
        offloaded = {n for n, m in dm.named_modules() if layers.is_quantized_linear(m) and adapter.is_offloaded(m)}
        streamed = {n for n, m in dm.named_modules() if layers.is_quantized_linear(m) and "_stream" in m.__dict__}
        assert offloaded and streamed == offloaded
        assert any(not adapter.is_offloaded(m) for _, m in dm.named_modules() if layers.is_quantized_linear(m))
        # units are whole blocks (or top-level layers), in the order FLUX runs them
        names = [u.name for u in streamer.units]
        blocks = [n for n in names if ".double_blocks." in n or ".single_blocks." in n]
        expected = [f"diffusion_model.double_blocks.{i}" for i in range(CFG.depth)] + \
                   [f"diffusion_model.single_blocks.{i}" for i in range(CFG.depth_single_blocks)]
        assert blocks == [n for n in expected if n in blocks] and set(names) - set(blocks) <= {"diffusion_model.txt_in"}
        # every unquantized module with weights is resident and merged the usual way (ComfyUI's backups)
        for name, module in dm.named_modules():
            if not layers.is_quantized_linear(module) and hasattr(module, "comfy_cast_weights"):
                assert not adapter.is_offloaded(module), name
        assert any(k.startswith("diffusion_model.img_in") for k in styled.backup)
        # a unit holds its layers' stored bytes, statistics and stacked LoRA factors
        adapter_unit = host.pack_module("quant_expand.streaming").stream_unit_name
        for unit in streamer.units:
            members = [m for n, m in dm.named_modules()
                       if "_stream" in m.__dict__ and adapter_unit(f"diffusion_model.{n}") == unit.name]
            own = sum(t.nbytes for m in members for t in m.stream_sources())
            lora = sum(m.lora_delta.stack_bytes(torch.float32) for m in members if m.lora_delta is not None)
            assert members and sum(t.nbytes for t in unit.sources) == own + lora
        assert styled.model.model_loaded_weight_memory >= streamer.device_bytes
    finally:
        styled.unpatch_model(CPU)
    assert getattr(styled.model, adapter.STREAMER_ATTR) is None
    assert all("_stream" not in m.__dict__ for m in styled.model.diffusion_model.modules())


def test_a_streamed_model_computes_the_same_bits_and_copies_each_unit_once_per_forward(host, files):
    import comfy.model_management as mm

    adapter = host.pack_module("quant_expand.comfyui.partial_load")
    _, styled = loaded(host, files)
    mm.unload_all_models()
    styled.patch_model(device_to=CPU, lowvram_model_memory=0)
    full = denoise_once(styled, control=True)
    styled.unpatch_model(CPU)
    partial(styled)
    streamer = getattr(styled.model, adapter.STREAMER_ATTR)
    streamer.bytes_copied = 0
    got = [denoise_once(styled, control=True) for _ in range(2)]
    copied = streamer.bytes_copied
    per_forward, in_slots = sum(u.nbytes for u in streamer.units), streamer.slots
    styled.unpatch_model(CPU)
    assert all(torch.equal(g, full) for g in got)
    # on CPU a unit is copied when it is entered (nothing runs ahead), so once per unit and forward
    assert in_slots >= 1 and copied == 2 * per_forward


def test_set_lora_scale_under_a_partial_load_swaps_in_place(host, files):
    """A strength change keeps the streamer, its sources and the resident bytes: only numbers change,
    and the result equals the LoRA applied at that strength from the start."""
    adapter = host.pack_module("quant_expand.comfyui.partial_load")
    node = host.pack_module("nodes.load_bnb_flux").LoadBnbFlux
    apply = host.pack_module("nodes.apply_control_lora").ApplyControlLora
    _, styled = loaded(host, files)
    partial(styled)
    streamer = getattr(styled.model, adapter.STREAMER_ATTR)
    digest = host.pack_module("quant_expand.layer_state").quantized_digest(styled.model.diffusion_model)
    resident = {n: m.weight.data.data_ptr() for n, m in styled._quantized_modules() if not adapter.is_offloaded(m)}
    rescaled = host.pack_module("quant_expand.comfyui.loras").set_lora_scale(styled, "stream_style.safetensors", 0.25)
    assert rescaled._can_swap_patches_in_place(CPU, False)
    copied = streamer.bytes_copied
    rescaled.partially_load(CPU, extra_memory=0)
    assert getattr(rescaled.model, adapter.STREAMER_ATTR) is streamer and streamer.bytes_copied == copied
    assert {n: m.weight.data.data_ptr() for n, m in rescaled._quantized_modules() if n in resident} == resident
    assert host.pack_module("quant_expand.layer_state").quantized_digest(rescaled.model.diffusion_model) == digest
    got = denoise_once(rescaled, control=True)
    rescaled.unpatch_model(CPU)
    with torch.inference_mode():
        fresh = apply.execute(apply.execute(node.execute(files, "nf4", False, "float32").result[0],
                                            "stream_control.safetensors", 1.0).result[0],
                              "stream_style.safetensors", 0.25).result[0]
    partial(fresh)
    ref = denoise_once(fresh, control=True)
    fresh.unpatch_model(CPU)
    assert torch.equal(got, ref)


def test_another_lora_is_a_new_plan_not_a_swap(host, files):
    apply = host.pack_module("nodes.apply_control_lora").ApplyControlLora
    base, styled = loaded(host, files)
    partial(styled)
    with torch.inference_mode():
        control_only = apply.execute(base, "stream_control.safetensors", 1.0).result[0]
    assert not control_only._can_swap_patches_in_place(CPU, False)
    styled.unpatch_model(CPU)


def test_partially_unloading_streams_what_it_offloads_and_keeps_the_unquantized_modules(host, files):
    """ComfyUI frees memory for another model by offloading the smallest modules first: here only
    quantized layers go, and they stream."""
    import comfy.model_management as mm

    adapter = host.pack_module("quant_expand.comfyui.partial_load")
    layers = host.pack_module("quant_expand.layers")
    _, styled = loaded(host, files)
    mm.unload_all_models()
    styled.patch_model(device_to=CPU, lowvram_model_memory=0)
    full = denoise_once(styled, control=True)
    freed = styled.partially_unload(CPU, memory_to_free=styled.model_size() // 3)
    try:
        assert freed > 0 and styled.model.model_lowvram
        dm = styled.model.diffusion_model
        assert all(not adapter.is_offloaded(m) for m in dm.modules()
                   if not layers.is_quantized_linear(m) and hasattr(m, "comfy_cast_weights"))
        streamed = [m for m in dm.modules() if "_stream" in m.__dict__]
        assert streamed and all(adapter.is_offloaded(m) for m in streamed)
        assert torch.equal(denoise_once(styled, control=True), full)
    finally:
        styled.unpatch_model(CPU)
