"""GPU benchmark: full-size FLUX.1-dev architecture (random weights, no download) through the pack's own
loader and nodes, ComfyUI's model management and ComfyUI's sampler, ratios to bf16 measured in the
same run.

    python bench/bench_gpu.py --comfyui PATH --phase legacy  --workdir DIR --out FILE
    python bench/bench_gpu.py --comfyui PATH --phase dynamic --workdir DIR --out FILE
    python bench/bench_gpu.py --comfyui PATH --phase paired  --workdir DIR --out FILE [--compiled]
    python bench/bench_gpu.py --comfyui PATH --phase lowvram --workdir DIR --out FILE [--dynamic-vram]
    python bench/bench_gpu.py --comfyui PATH --phase legacy --small --cpu ...   (a quick dry run)

legacy (ComfyUI's classic ModelPatcher): writes a bf16 safetensors of the 11.9 B-parameter model to
DIR (kept for the next phase), times a cold read of it and quantize-on-load (peak RssAnon sampled),
then samples at 1024x1024 (euler, 1 + STEPS steps; the first is reported apart): bf16 (UNETLoader),
NF4, NF4 + Control LoRA (rank 128 on all 314 Linears, widened img_in, norm sets), Set LoRA Scale on
it (time to the first step, bytes requantized), NF4 + Control + two rank-32 style LoRAs, NF4 + Control
at 512x512, three rounds of bf16 / NF4 / Control / + 2 style (ratios paired round by round), FP4,
int8, and NF4 + Control with ComfyUI's VRAM reserve set so the model does not fit (lowvram).
dynamic (ComfyUI's dynamic VRAM, set up as main.py does): bf16, NF4, NF4 + Control, and NF4 + Control
under torch.compile, each block one graph, then ComfyUI's TorchCompileModel node, graph breaks counted.
paired (legacy patcher): only the paired rounds, for every quantization; --compiled adds rounds of
bf16 and NF4 + Control with every block compiled.
lowvram: a really smaller card (8, 6, 4 GiB free, held by a ballast process), one command per memory mode
(--dynamic-vram for dynamic VRAM); see bench/lowvram_phase.py.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

from compiling import attention_for_compile_on_cpu, compiled_per_block
from harness import PhaseRun, RssAnonPeak, cold_read_s, drop_page_cache
from inputs import GIB, MODEL_FILE
from probes import gpu_profile, layer_bytes, quantized_digest, resident_breakdown


def pack_copy(path: str):
    """Another checkout of this pack (``git worktree add DIR COMMIT``) imported beside the one ComfyUI
    loaded, under a package name of its own (the pack's imports are all relative), its nodes not
    registered: ``--before`` pairs its rows with today's in the same rounds. Returns a submodule getter."""
    import importlib
    import importlib.util

    path = os.path.abspath(path)
    name = "bnb_flux_before"
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return lambda sub: importlib.import_module(f"{name}.{sub}")


def paired_ratios(bench, base, models, log, rounds=3, prefix="paired"):
    """Ratios to the bf16 model ``base`` sampled again in every round, right before the quantized
    ``models`` (``(label, patcher, control)``), all kept loaded: on some GPU machines later rows of a
    long run come out a few percent slower (four NF4 + Control models averaged 0.2125, 0.2166, 0.2189
    s/step in three successive rounds on an H200, bench/strength_probe.py), which a ratio to a bf16
    row measured minutes earlier takes for the model's cost. Ratio = median step / the same round's
    bf16 median."""
    per = {label: [] for label, _, _ in models}
    for r in range(rounds):
        bench.sample(f"{prefix} r{r} bf16", base)
        ref = bench.results[f"{prefix} r{r} bf16"]["median_step_s"]
        for label, m, control in (models if r % 2 == 0 else models[::-1]):  # no row always sampled last
            bench.sample(f"{prefix} r{r} {label}", m, control=control)
            per[label].append(round(bench.results[f"{prefix} r{r} {label}"]["median_step_s"] / ref, 3))
    out = {label: {"per_round": v, "median": round(statistics.median(v), 3)} for label, v in per.items()}
    log(f"{prefix} ratios to bf16: {out}")
    return out


def run(args):
    import torch

    bench_run = PhaseRun(args)
    import comfy.model_management as mm
    import nodes as comfy_nodes

    bench, host, info, log, save = bench_run.bench, bench_run.host, bench_run.info, bench_run.log, bench_run.save
    load_bnb, apply, bf16_model, bf16_stock = bench_run.load_bnb, bench_run.apply, bench_run.bf16_model, bench_run.bf16_row
    model_file, model_path, res, ctl_mod = MODEL_FILE, bench_run.model_path, bench.res, bench_run.lora_nodes

    if args.phase == "lowvram":  # a really smaller card (bench/lowvram_phase.py)
        from lowvram_phase import run_lowvram

        run_lowvram(args, bench, host, load_bnb, apply, bf16_model, info, save, log)
        log(f"wrote {args.out}")
        return

    if args.phase == "paired":  # only the paired ratios, every quantization (about 4 minutes)
        nf4 = load_bnb("nf4")
        ctl = apply(nf4, "control.safetensors", 1.0)
        s2 = apply(apply(ctl, "style1.safetensors", 0.8), "style2.safetensors", 0.6)
        models = [("nf4", nf4, False), ("nf4+control", ctl, True), ("nf4+control+2style", s2, True),
                  ("fp4", load_bnb("fp4"), False), ("int8", load_bnb("int8"), False)]
        if args.before:  # the same rows from an earlier checkout, in the same rounds: before / after
            old = pack_copy(args.before)
            with torch.inference_mode():
                old_nf4 = old("nodes.load_bnb_flux").LoadBnbFlux.execute(model_file, "nf4", True, "auto").result[0]
                old_ctl = old("nodes.apply_control_lora").ApplyControlLora.execute(
                    old_nf4, "control.safetensors", 1.0).result[0]
            models = [("before nf4+control", old_ctl, True), ("nf4+control", ctl, True),
                      ("nf4", nf4, False), ("before nf4", old_nf4, False)]
            info["before"] = args.before_label or os.path.basename(os.path.abspath(args.before))
        bf = bf16_model()
        info["paired"] = paired_ratios(bench, bf, models, log, rounds=args.rounds)
        save()
        if args.compiled:  # compiled against compiled: each block one graph, bf16 and NF4 + Control
            import torch._dynamo

            if args.cpu:
                attention_for_compile_on_cpu()
            torch._dynamo.reset()
            bfc, ctlc = compiled_per_block(bf.clone()), compiled_per_block(ctl.clone())
            info["paired_compiled"] = paired_ratios(bench, bfc, [("nf4+control", ctlc, True)], log,
                                                    rounds=args.rounds, prefix="paired compiled")
            info["paired_compiled_graph_breaks"] = sum(torch._dynamo.utils.counters.get("graph_break", {}).values())
            save()
        log(f"wrote {args.out}")
        return

    bf16_stock()

    if args.phase == "legacy":
        info["cold_read_s"] = round(cold_read_s(model_path), 2)
        log(f"cold read: {info['cold_read_s']} s")
        drop_page_cache(model_path)
        gc.collect()
        with RssAnonPeak() as rss:
            t = time.perf_counter()
            nf4 = load_bnb("nf4")
            load_s = time.perf_counter() - t
        size = nf4.model_size()
        info["quantize_on_load"] = {
            "quant": "nf4 double quant", "seconds": round(load_s, 2), "ratio_to_cold_read": round(load_s / info["cold_read_s"], 2),
            "rss_anon_peak_gib": round(rss.peak / GIB, 2), "rss_anon_before_gib": round(rss.start / GIB, 2),
            "rss_anon_peak_minus_before_gib": round((rss.peak - rss.start) / GIB, 2),
            "quantized_size_gib": round(size / GIB, 2),
            # reading_s: the reader thread's reads; waiting_for_reads_s: the quantizing side idle
            "load_timing": host.pack_module("quant_expand.comfyui.report").load_report(nf4).load_timing}
        log(f"quantize-on-load: {info['quantize_on_load']}")
    else:
        nf4 = load_bnb("nf4")

    bench.sample("nf4", nf4)
    if bench.cuda:
        bench.results["nf4"]["resident_breakdown_gib"] = resident_breakdown(nf4, host)
        log(f"nf4 resident: {bench.results['nf4']['resident_breakdown_gib']}")
    tuned = host.pack_module("quant_expand.tuning").tuned
    ctl = apply(nf4, "control.safetensors", 1.0)
    if args.phase == "legacy":
        # A/B: bnb's own dequantize kernels through their entry points (no Triton), and bnb's torch ops
        with tuned(four_bit_path="bnb"):
            bench.unload()  # the layers look their kernels up again when loaded
            bench.sample("nf4 bnb dequantize kernels", nf4)
            bench.sample("nf4+control bnb dequantize kernels + addmm", ctl, control=True)
        with tuned(four_bit_path="torch"):
            bench.unload()
            bench.sample("nf4 via bnb torch ops", nf4)
        bench.unload()
        bench.sample("nf4 again", nf4)
    bench.sample("nf4+control", ctl, control=True)
    if bench.cuda:
        bench.results["nf4+control"]["resident_breakdown_gib"] = resident_breakdown(ctl, host)
        log(f"nf4+control resident: {bench.results['nf4+control']['resident_breakdown_gib']}")

    if args.phase == "legacy":
        # the same model again: ComfyUI's own per-sampling setup, the baseline for Set LoRA Scale
        bench.sample("nf4+control again", ctl, control=True)
        for strategy in ("unmerged", "merged"):  # both exact paths, forced everywhere, for the record
            with tuned(lora_strategy=strategy):
                forced = apply(nf4, "control.safetensors", 1.0)
                bench.sample(f"nf4+control {strategy} everywhere", forced, control=True)
                del forced
        bench.sample("nf4+control", ctl, control=True)
        bench.sample("nf4+control again", ctl, control=True)
        before = quantized_digest(nf4, host)
        t = time.perf_counter()
        with torch.inference_mode():
            rescaled = ctl_mod.SetLoraScale.execute(ctl, "control.safetensors", 0.7).result[0]
        node_s = time.perf_counter() - t
        bench.sample("nf4+control set_lora_scale", rescaled, control=True)
        r = bench.results["nf4+control set_lora_scale"]
        r["set_lora_scale_node_s"] = round(node_s, 4)
        same = bench.results["nf4+control again"]
        r["added_before_first_step_s"] = round(node_s + r["first_step_incl_load_s"] - same["first_step_incl_load_s"], 4)
        r["baseline_first_step_same_model_s"] = same["first_step_incl_load_s"]
        changed = before != quantized_digest(nf4, host)
        r["quantized_bytes_unchanged"] = not changed
        r["bytes_requantized"] = sum(layer_bytes(nf4, host)) if changed else 0
        # the change itself, apart from the first step's own spread: node + ComfyUI loading the clone
        # (the in-place swap), against loading the unchanged model (a no-op)
        r["node_plus_load_s"] = round(node_s + r["load_before_sampling_s"], 4)
        r["unchanged_model_load_s"] = same["load_before_sampling_s"]
        swaps, current = [], rescaled
        for strength in (0.5, 0.3, 0.9, 0.6, 0.8):
            t = time.perf_counter()
            with torch.inference_mode():
                current = ctl_mod.SetLoraScale.execute(current, "control.safetensors", strength).result[0]
                mm.load_models_gpu([current])
            bench.sync()
            swaps.append(time.perf_counter() - t)
        r["set_lora_scale_then_load_s"] = [round(v, 4) for v in swaps]
        r["set_lora_scale_then_load_median_s"] = round(statistics.median(swaps), 4)
        bench.on_result()
        del current
        log(f"set lora scale: added {r['added_before_first_step_s']} s before the first step "
            f"(node + swap {r['node_plus_load_s']} s; 5 more: median {r['set_lora_scale_then_load_median_s']} s), "
            f"{r['bytes_requantized']} bytes requantized")
        s2 = apply(apply(ctl, "style1.safetensors", 0.8), "style2.safetensors", 0.6)
        bench.sample("nf4+control+2style", s2, control=True)
        del s2
        bench.sample("nf4+control 512", ctl, res=res // 2, control=True)
        del rescaled
        s2 = apply(apply(ctl, "style1.safetensors", 0.8), "style2.safetensors", 0.6)
        bf = bf16_model()
        info["paired"] = paired_ratios(bench, bf, (
            ("nf4", nf4, False), ("nf4+control", ctl, True), ("nf4+control+2style", s2, True)), log)
        del s2, bf
        bench.unload()
        save()
    del ctl, nf4
    bench.unload()

    def lowvram_row():
        # ComfyUI's --reserve-vram (EXTRA_RESERVED_VRAM), set so that ComfyUI budgets half the NF4 +
        # Control model for the GPU: it loads it partially and streams the rest from the CPU. The memory
        # stays physically free (holding it back with an allocation left ComfyUI's own activation
        # estimate short and ran out of memory twice).
        m = apply(load_bnb("nf4"), "control.safetensors", 1.0)
        gc.collect()
        torch.cuda.empty_cache()
        free = mm.get_free_memory(mm.get_torch_device())
        # load_models_gpu budgets at least (free - reserve) - minimum_inference_memory() for weights,
        # and minimum_inference_memory() is 0.8 GiB + the reserve
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

    if args.phase == "legacy" and bench.cuda:
        lowvram_row()  # before the profile and the other types: a run stopped at its limit still has it
        info["profile"] = gpu_profile(bench, load_bnb, apply, log)
        save()
    if args.phase == "legacy":
        for quant in ("fp4", "int8"):
            m = load_bnb(quant)
            bench.sample(quant, m)
            if quant == "int8":  # the three ways to dequantize int8 on the GPU (same bits), side by side
                default = host.pack_module("quant_expand.tuning").TUNING.int8_dequant
                for mode in ("promote", "cast", "triton"):
                    if mode != default:
                        with tuned(int8_dequant=mode):
                            bench.unload()
                            bench.sample(f"int8 dequant {mode}", m)
            del m
            bench.unload()
    else:
        import torch._dynamo

        m = apply(load_bnb("nf4"), "control.safetensors", 1.0)
        if args.cpu:
            attention_for_compile_on_cpu()

        def compiled_row(label, make, control=True):
            """Sample the compiled model ``make()`` builds (the first step includes compiling), with
            dynamo's counts; a failure is the row's result, and the run goes on."""
            try:
                torch._dynamo.reset()
                patcher = make()
                counters = torch._dynamo.utils.counters
                counters.clear()
                bench.sample(label, patcher, control=control)
                breaks = dict(counters.get("graph_break", {}))
                r = bench.results[label]
                r["graph_breaks"] = sum(breaks.values())
                r["graph_break_reasons"] = {str(k)[:160]: v for k, v in list(breaks.items())[:10]}
                r["unique_graphs"] = counters["stats"].get("unique_graphs", 0)
                r["recompiles"] = sum(counters.get("recompiles", {}).values())
                r["first_step_includes"] = "compiling"
                bench.on_result()
            except Exception as e:  # report, don't lose the other numbers
                bench.results[label] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                log(f"{label} failed: {e}")
            patcher = None  # dropped before unloading, so the baseline after it is measured without it
            bench.unload()

        def torch_compile_model():
            node = comfy_nodes.NODE_CLASS_MAPPINGS["TorchCompileModel"]
            with torch.inference_mode():
                if hasattr(node, "execute") and hasattr(node, "define_schema"):
                    return node.execute(m, "inductor").result[0]
                return node().patch(m, "inductor")[0]

        # Each block one graph first (fullgraph=True raises on any break inside a block; the 57 blocks
        # share two graphs: ~15 s to compile on an H200), bf16 the same way (what compiling alone
        # gains), then the whole model through ComfyUI's TorchCompileModel node (one graph: ~95 s)
        compiled_row("nf4+control compiled per block fullgraph", lambda: compiled_per_block(m.clone()))
        compiled_row("bf16 compiled per block fullgraph", lambda: compiled_per_block(bf16_model()), control=False)
        compiled_row("nf4+control compiled", torch_compile_model)
        del m
        bench.unload()

    save()
    log(f"wrote {args.out}")


def bench_parser() -> argparse.ArgumentParser:
    """The options every full-pipeline GPU script here takes: ComfyUI, a folder for the model files
    it writes (kept between runs), and the JSON to write."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", required=True, help="a ComfyUI tree (the kit's)")
    ap.add_argument("--workdir", required=True, help="models/ folder for the generated files")
    ap.add_argument("--out", required=True, help="results JSON")
    return ap


def main():
    ap = bench_parser()
    ap.add_argument("--phase", choices=["legacy", "dynamic", "paired", "lowvram"], default="legacy")
    ap.add_argument("--dynamic-vram", action="store_true", help="--phase lowvram: with ComfyUI's dynamic VRAM")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --phase paired, and per budget of --phase lowvram")
    ap.add_argument("--before", help="--phase paired: a checkout of this pack at an earlier commit; only NF4 "
                    "and NF4 + Control, each beside the earlier code's in the same rounds")
    ap.add_argument("--before-label", help="what --before is (a commit), for the results")
    ap.add_argument("--budgets", help="--phase lowvram: free GiB to cap at, comma-separated (default 8,6,4)")
    ap.add_argument("--profile", action="store_true",
                    help="--phase lowvram: one more NF4 + Control run per budget under torch.profiler")
    ap.add_argument("--compiled", action="store_true",
                    help="--phase paired: also bf16 and NF4 + Control with every block compiled")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    ap.add_argument("--small", action="store_true", help="tiny model at 64x64 (dry run)")
    ap.add_argument("--blocks", help="DOUBLE,SINGLE: FLUX.1-dev width with this many blocks")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--tiles", help="JSON from bench/dequant_kernels.py: use its best Triton tile shapes")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
