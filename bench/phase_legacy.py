"""``bench_gpu.py --phase legacy`` (ComfyUI's classic ModelPatcher): writes a bf16 safetensors of the 11.9
B-parameter model to DIR (kept for the next phase), times a cold read of it and quantize-on-load (peak
RssAnon sampled), then samples at 1024x1024 (euler, 1 + STEPS steps; the first is reported apart): bf16
(UNETLoader), NF4, NF4 + Control LoRA (rank 128 on all 314 Linears, widened img_in, norm sets), Set LoRA
Scale on it (time to the first step, bytes requantized), NF4 + Control + two rank-32 style LoRAs, NF4 +
Control at 512x512, three rounds of bf16 / NF4 / Control / + 2 style (ratios paired round by round), FP4,
int8, and NF4 + Control with ComfyUI's VRAM reserve set so the model does not fit (lowvram).
"""
from __future__ import annotations

import gc
import statistics
import time

from harness import RssAnonPeak, cold_read_s, drop_page_cache
from inputs import GIB
from phase_paired import paired_ratios
from probes import gpu_profile, layer_bytes, quantized_digest, resident_row


def run_legacy(run):
    bench, info = run.bench, run.info
    run.bf16_row()
    nf4 = quantize_on_load(run)
    resident_row(run, "nf4", nf4)
    ctl = run.apply(nf4, "control.safetensors", 1.0)
    kernel_paths_ab(run, nf4, ctl)
    resident_row(run, "nf4+control", ctl, control=True)
    lora_strategy_rows(run, nf4, ctl)
    rescaled = set_lora_scale_row(run, nf4, ctl)
    s2 = run.with_styles(ctl)
    bench.sample("nf4+control+2style", s2, control=True)
    del s2
    bench.sample("nf4+control 512", ctl, res=bench.res // 2, control=True)
    del rescaled
    s2 = run.with_styles(ctl)
    bf = run.bf16_model()
    info["paired"] = paired_ratios(bench, bf, (
        ("nf4", nf4, False), ("nf4+control", ctl, True), ("nf4+control+2style", s2, True)), run.log)
    del s2, bf
    bench.unload()
    run.save()
    del ctl, nf4
    bench.unload()
    if bench.cuda:
        lowvram_row(run)  # before the profile and the other types: a run stopped at its limit still has it
        info["profile"] = gpu_profile(bench, run.load_bnb, run.apply, run.log)
        run.save()
    other_quant_rows(run)
    run.save()


def quantize_on_load(run):
    """A cold read of the bf16 file, then Load BnB Flux (NF4) from a cold page cache, peak RssAnon
    sampled; returns the NF4 model."""
    info = run.info
    info["cold_read_s"] = round(cold_read_s(run.model_path), 2)
    run.log(f"cold read: {info['cold_read_s']} s")
    drop_page_cache(run.model_path)
    gc.collect()
    with RssAnonPeak() as rss:
        t = time.perf_counter()
        nf4 = run.load_bnb("nf4")
        load_s = time.perf_counter() - t
    size = nf4.model_size()
    info["quantize_on_load"] = {
        "quant": "nf4 double quant", "seconds": round(load_s, 2), "ratio_to_cold_read": round(load_s / info["cold_read_s"], 2),
        "rss_anon_peak_gib": round(rss.peak / GIB, 2), "rss_anon_before_gib": round(rss.start / GIB, 2),
        "rss_anon_peak_minus_before_gib": round((rss.peak - rss.start) / GIB, 2),
        "quantized_size_gib": round(size / GIB, 2),
        # reading_s: the reader thread's reads; waiting_for_reads_s: the quantizing side idle
        "load_timing": run.host.pack_module("quant_expand.comfyui.report").load_report(nf4).load_timing}
    run.log(f"quantize-on-load: {info['quantize_on_load']}")
    return nf4


def kernel_paths_ab(run, nf4, ctl):
    """A/B: bnb's own dequantize kernels through their entry points (no Triton), and bnb's torch ops."""
    bench = run.bench
    tuned = run.host.pack_module("quant_expand.tuning").tuned
    with tuned(four_bit_path="bnb"):
        bench.unload()  # the layers look their kernels up again when loaded
        bench.sample("nf4 bnb dequantize kernels", nf4)
        bench.sample("nf4+control bnb dequantize kernels + addmm", ctl, control=True)
    with tuned(four_bit_path="torch"):
        bench.unload()
        bench.sample("nf4 via bnb torch ops", nf4)
    bench.unload()
    bench.sample("nf4 again", nf4)


def lora_strategy_rows(run, nf4, ctl):
    """The same model again (ComfyUI's own per-sampling setup, the baseline for Set LoRA Scale), then
    both exact LoRA paths forced everywhere, for the record."""
    bench = run.bench
    tuned = run.host.pack_module("quant_expand.tuning").tuned
    bench.sample("nf4+control again", ctl, control=True)
    for strategy in ("unmerged", "merged"):
        with tuned(lora_strategy=strategy):
            forced = run.apply(nf4, "control.safetensors", 1.0)
            bench.sample(f"nf4+control {strategy} everywhere", forced, control=True)
            del forced
    bench.sample("nf4+control", ctl, control=True)
    bench.sample("nf4+control again", ctl, control=True)


def set_lora_scale_row(run, nf4, ctl):
    """Set LoRA Scale on NF4 + Control: the time it adds before the first step, the bytes it requantizes,
    then five more changes each loaded. Returns the rescaled model (the caller keeps it for the next rows)."""
    import comfy.model_management as mm
    import torch

    bench = run.bench
    before = quantized_digest(nf4, run.host)
    t = time.perf_counter()
    with torch.inference_mode():
        rescaled = run.lora_nodes.SetLoraScale.execute(ctl, "control.safetensors", 0.7).result[0]
    node_s = time.perf_counter() - t
    bench.sample("nf4+control set_lora_scale", rescaled, control=True)
    r = bench.results["nf4+control set_lora_scale"]
    r["set_lora_scale_node_s"] = round(node_s, 4)
    same = bench.results["nf4+control again"]
    r["added_before_first_step_s"] = round(node_s + r["first_step_incl_load_s"] - same["first_step_incl_load_s"], 4)
    r["baseline_first_step_same_model_s"] = same["first_step_incl_load_s"]
    changed = before != quantized_digest(nf4, run.host)
    r["quantized_bytes_unchanged"] = not changed
    r["bytes_requantized"] = sum(layer_bytes(nf4, run.host)) if changed else 0
    # the change alone, apart from the first step's spread: node + loading the clone (the in-place swap)
    r["node_plus_load_s"] = round(node_s + r["load_before_sampling_s"], 4)
    r["unchanged_model_load_s"] = same["load_before_sampling_s"]
    swaps, current = [], rescaled
    for strength in (0.5, 0.3, 0.9, 0.6, 0.8):
        t = time.perf_counter()
        with torch.inference_mode():
            current = run.lora_nodes.SetLoraScale.execute(current, "control.safetensors", strength).result[0]
            mm.load_models_gpu([current])
        bench.sync()
        swaps.append(time.perf_counter() - t)
    r["set_lora_scale_then_load_s"] = [round(v, 4) for v in swaps]
    r["set_lora_scale_then_load_median_s"] = round(statistics.median(swaps), 4)
    bench.on_result()
    del current
    run.log(f"set lora scale: added {r['added_before_first_step_s']} s before the first step "
            f"(node + swap {r['node_plus_load_s']} s; 5 more: median {r['set_lora_scale_then_load_median_s']} s), "
            f"{r['bytes_requantized']} bytes requantized")
    return rescaled


def lowvram_row(run):
    """NF4 + Control with ComfyUI's --reserve-vram (EXTRA_RESERVED_VRAM) set so that ComfyUI budgets half
    the model for the GPU: it loads it partially and streams the rest from the CPU. The memory stays
    physically free (holding it back with an allocation left ComfyUI's own activation estimate short,
    and it ran out of memory)."""
    import comfy.model_management as mm
    import torch

    bench, log = run.bench, run.log
    m = run.apply(run.load_bnb("nf4"), "control.safetensors", 1.0)
    gc.collect()
    torch.cuda.empty_cache()
    free = mm.get_free_memory(mm.get_torch_device())
    # load_models_gpu gives weights (free - reserve) - minimum_inference_memory(), that is 0.8 GiB + reserve
    reserve = int(free - m.model_size() * 0.5 - 0.8 * GIB)
    saved = mm.EXTRA_RESERVED_VRAM
    mm.EXTRA_RESERVED_VRAM = reserve
    try:
        bench.sample("nf4+control lowvram", m, control=True, preload=False,
                     extra={"reserve_vram_gib": round(reserve / GIB, 2), "free_before_gib": round(free / GIB, 2)})
        r = bench.results["nf4+control lowvram"]
        r["model_lowvram"] = bool(m.model.model_lowvram)
        r["loaded_on_gpu_gib"] = round(m.model.model_loaded_weight_memory / GIB, 2)
        r["model_size_gib"] = round(m.model_size() / GIB, 2)
        bench.on_result()
    except Exception as e:  # report, keep the rest of the run
        bench.results["nf4+control lowvram"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        log(f"lowvram row failed: {e}")
    finally:
        mm.EXTRA_RESERVED_VRAM = saved
    del m
    bench.unload()


def other_quant_rows(run):
    """FP4 and int8, then the three ways to dequantize int8 on the GPU (same bits), side by side."""
    bench = run.bench
    tuning = run.host.pack_module("quant_expand.tuning")
    for quant in ("fp4", "int8"):
        m = run.load_bnb(quant)
        bench.sample(quant, m)
        if quant == "int8":
            default = tuning.TUNING.int8_dequant
            for mode in ("promote", "cast", "triton"):
                if mode != default:
                    with tuning.tuned(int8_dequant=mode):
                        bench.unload()
                        bench.sample(f"int8 dequant {mode}", m)
        del m
        bench.unload()
