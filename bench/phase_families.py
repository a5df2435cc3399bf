"""``bench_gpu.py --phase families``: FLUX.2 [klein] 9B and FLUX.2 [dev] at full size (random weights,
bench/flux2_inputs.py), NF4 through Load BnB Flux against ComfyUI's bf16, at 1024², ComfyUI's legacy
patcher. Per model: a row of each alone (resident GiB, s/step, load time), then paired rounds (bf16
sampled again in each round right before NF4; ratio = that round's NF4 median step over its bf16).

- ``--family klein9b``: the bf16 file (written into --workdir once and reused), bf16 through UNETLoader
  and NF4 quantized on load by Load BnB Flux, each read from a dropped page cache.
- ``--family dev``: its bf16 file is too large to write beside the others, so the NF4 file is written
  directly (each Linear generated and quantized on the GPU) and read
  by Load BnB Flux as a pre-quantized file; the bf16 reference is ComfyUI's own model built on the GPU
  without a file (``build_bf16_model``: one copy of the weights, never in host memory). The NF4 row
  runs first and NF4 then waits in host memory, so the bf16 row's resident is its own; in the rounds
  both are on the GPU together (bench/README says how much memory that takes).
- ``--family both`` (default): klein first, each model unloaded and freed before the next family
  (``after_release`` in the results: what the process still holds).

Sizes, expected durations and the GPU each family needs: bench/README.md.
"""
from __future__ import annotations

import os
import time

from flux2_inputs import (GIB, build_bf16_model, check_layout, config_info, model_for, write_bf16_file,
                          write_nf4_file)
from harness import RssAnonPeak, cold_read_s, drop_page_cache
from phase_paired import paired_ratios

FAMILIES = ("klein9b", "dev")
TOKENS = 512  # ComfyUI pads FLUX.2's context to 512 tokens (model_base.Flux2.extra_conds)


def run_families(run):
    """The rows of ``--family``, one model family after the other, every row saved as it is measured."""
    if run.info["dynamic_vram"]:  # build_bf16_model makes a classic ModelPatcher
        raise SystemExit("--phase families runs on ComfyUI's legacy patcher: leave out --dynamic-vram")
    keys = FAMILIES if run.args.family == "both" else (run.args.family,)
    run.info["families"] = {}
    for key in keys:
        model = model_for(key, run.args.small)
        check_layout(model.cfg)
        info = run.info["families"][key] = config_info(model)
        run.save()
        use_flux2_conditioning(run.bench, model.cfg)
        {"klein9b": klein_rows, "dev": dev_rows}[key](run, model, info)
        info["after_release"] = release(run)
        run.save()


def use_flux2_conditioning(bench, cfg):
    """Random text-encoder states of the model's width, no pooled vector (FLUX.2 has none)."""
    import torch

    bench.ctx = torch.randn(1, TOKENS, cfg.context_in_dim, generator=torch.Generator().manual_seed(1))
    bench.pooled = None


def file_name(model, kind: str) -> str:
    c = model.cfg
    return f"flux2_{model.key}_random_{kind}_w{c.hidden_size}_d{c.depth}_s{c.depth_single_blocks}_c{c.context_in_dim}.safetensors"


def timed(make):
    t = time.perf_counter()
    out = make()
    return out, round(time.perf_counter() - t, 2)


def file_info(path: str) -> dict:
    """Its size and a cold read of it (page cache dropped), what a load from this disk cannot beat."""
    return {"file": os.path.basename(path), "file_gib": round(os.path.getsize(path) / GIB, 2),
            "cold_read_s": round(cold_read_s(path), 2)}


def klein_rows(run, model, info):
    bench, device, key = run.bench, "cpu" if run.args.cpu else "cuda", model.key
    name = file_name(model, "bf16")
    path = os.path.join(run.host.models_dir, "diffusion_models", name)
    write_bf16_file(path, model.cfg, device, run.log)
    info["bf16_file"] = file_info(path)
    run.save()

    bench.unload()
    drop_page_cache(path)
    bf, seconds = timed(lambda: run.bf16_model(name))
    bench.sample(f"{key} bf16", bf, extra={"load_node": "UNETLoader", "load_node_s": seconds})
    bench.unload()  # bf16 back in host memory: the NF4 row's resident is its own
    drop_page_cache(path)
    nf4, seconds = timed(lambda: run.load_bnb("nf4", name))
    bench.sample(f"{key} nf4", nf4, extra={"load_node": "Load BnB Flux, nf4 quantized on load", "load_node_s": seconds,
                                           **load_report(run, nf4)})
    info["paired"] = paired_ratios(bench, bf, [("nf4", nf4, False)], run.log, rounds=run.args.rounds,
                                   prefix=f"{key} paired")
    info["summary"] = summary(bench, key, info["paired"])
    run.save()


def dev_rows(run, model, info):
    bench, device, key = run.bench, "cpu" if run.args.cpu else "cuda", model.key
    name = file_name(model, "nf4")
    path = os.path.join(run.host.models_dir, "diffusion_models", name)
    meta = write_nf4_file(path, model.cfg, device, run.log)
    info["nf4_file"] = {**file_info(path), "metadata": {k: v for k, v in meta.items() if k != "source"}}
    run.save()

    bench.unload()
    drop_page_cache(path)
    nf4, seconds = timed(lambda: run.load_bnb("nf4", name))
    report = load_report(run, nf4)
    if not report["prequantized"]:
        raise RuntimeError(f"{name}: Load BnB Flux quantized it on load instead of reading it as pre-quantized")
    bench.sample(f"{key} nf4", nf4, extra={"load_node": "Load BnB Flux, pre-quantized file", "load_node_s": seconds,
                                           **report})
    bench.unload()  # NF4 back in host memory: the bf16 row's resident is its own
    bf, seconds = timed(lambda: build_bf16_model(model.cfg, run.log))
    bench.sample(f"{key} bf16", bf, extra={"load_node": "none: ComfyUI's model built in memory",
                                           "built_in_memory_s": seconds})
    info["paired"] = paired_ratios(bench, bf, [("nf4", nf4, False)], run.log, rounds=run.args.rounds,
                                   prefix=f"{key} paired")
    info["summary"] = summary(bench, key, info["paired"])
    run.save()


def load_report(run, patcher) -> dict:
    """What Load BnB Flux says it loaded."""
    report = run.host.pack_module("quant_expand.comfyui.report").load_report(patcher)
    return {"prequantized": report.prequantized, "quant": report.quant, "quantized_layers": report.quantized_layers,
            "linear_layers": report.linear_layers, "loaded_size_gib": round(report.size_bytes / GIB, 2),
            "load_timing": {k: round(v, 3) if isinstance(v, float) else v for k, v in report.load_timing.items()}}


def summary(bench, key, paired) -> dict:
    """The figures of one model: resident and step of each alone, NF4 over bf16, the paired ratio."""
    bf, nf4 = bench.results[f"{key} bf16"], bench.results[f"{key} nf4"]
    return {"resident_gib": {"bf16": bf["resident_gib"], "nf4": nf4["resident_gib"]},
            "resident_nf4_over_bf16": round(nf4["resident_gib"] / bf["resident_gib"], 3) if bf["resident_gib"] else None,
            "alone_median_step_s": {"bf16": bf["median_step_s"], "nf4": nf4["median_step_s"]},
            "paired_ratio_nf4_over_bf16": paired["nf4"]["median"], "paired_per_round": paired["nf4"]["per_round"],
            "all_finite": all(r["finite"] for label, r in bench.results.items() if label.startswith(f"{key} "))}


def release(run) -> dict:
    """ComfyUI's models unloaded once the rows' function has returned (no reference left, so they are
    freed): what the process still holds before the next family."""
    import comfy.model_management as mm

    run.bench.unload()
    return {"allocated_gib": round(run.bench.vram(), 3), "loaded_models": len(mm.current_loaded_models),
            "rss_anon_gib": round(RssAnonPeak.now() / GIB, 2)}
