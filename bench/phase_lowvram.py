"""``bench_gpu.py --phase lowvram``: a really smaller card, through ComfyUI's model management.

A ballast process holds all but N GiB of the GPU for each budget (8, 6, 4 GiB free), so ``mem_get_info``,
NVML and ComfyUI's estimates all see N and an overshoot is a real out-of-memory error; ComfyUI keeps its
default reserve. Rows: stock bf16 + Control (UNETLoader + LoraLoaderModelOnly), NF4 + Control and NF4 +
Control + two style LoRAs (Load BnB Flux + Apply Control LoRA), each sampled uncapped first (``--rounds``
rounds, at least two, bf16 again in each), then per budget in as many rounds, and uncapped bf16 + Control
again after each budget. Per row: ratio to uncapped bf16 + Control (``ratio_paired``: to the bf16 steps
just before and just after the budget, the figure to trust; ``ratio_to_uncapped_bf16``: to the first ones),
the device's lowest free memory during the row (sampled ``mem_get_info``: torch's counters miss other
allocators), host-to-device bytes per step (the pack's streamer counts them; for stock, ComfyUI's
offloaded bytes), the floor max(compute, bytes / pinned bandwidth) with both measured in this run, and
whether the capped latents equal the uncapped ones bit for bit. One command per memory mode
(``--dynamic-vram``: ComfyUI's dynamic VRAM, set up as main.py does).
"""
from __future__ import annotations

import gc
import gzip
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from inputs import GIB

BUDGETS_GIB = (8, 6, 4)

BALLAST = r"""
import sys, torch
keep = int(float(sys.argv[1]) * 2**30)
torch.cuda.init()
free, total = torch.cuda.mem_get_info()
hold = []
while free > keep + 64 * 2**20:
    chunk = min(free - keep, 2 * 2**30)
    hold.append(torch.empty(chunk, dtype=torch.uint8, device="cuda"))
    free, total = torch.cuda.mem_get_info()
print(f"ready {free} {sum(t.numel() for t in hold)}", flush=True)
sys.stdin.read()
"""


class Ballast:
    """A second process on the same GPU that takes all but ``free_gib`` (measured after its own CUDA
    context exists) and holds it until ``close``."""

    def __init__(self, free_gib: float):
        self.proc = subprocess.Popen([sys.executable, "-c", BALLAST, str(free_gib)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "ready":
            raise RuntimeError(f"ballast did not start: {line}")
        self.free, self.held = int(line[1]), int(line[2])

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class FreeMemoryFloor:
    """The lowest ``mem_get_info`` free memory while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        import torch

        self.torch, self._stop, self.low = torch, threading.Event(), 0
        if not torch.cuda.is_available():  # a CPU dry run
            self.thread = None
            return self
        self.low = torch.cuda.mem_get_info()[0]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.low = min(self.low, self.torch.cuda.mem_get_info()[0])
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        if self.thread is not None:
            self.thread.join()


def _union(intervals):
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _minus(intervals, cover):
    """The parts of ``intervals`` (a union) that ``cover`` (a union) does not cover."""
    out, j = [], 0
    for a, b in intervals:
        while j < len(cover) and cover[j][1] <= a:
            j += 1
        k, start = j, a
        while k < len(cover) and cover[k][0] < b:
            if cover[k][0] > start:
                out.append([start, cover[k][0]])
            start = max(start, cover[k][1])
            k += 1
        if start < b:
            out.append([start, b])
    return out


def timeline_summary(trace_path: str, step_s: float, steps: int = 4) -> dict:
    """What a ``torch.profiler`` chrome trace of a sampling run says about its last ``steps`` steps (the
    first holds the model's load), per step in seconds: the compute stream's busy time (kernels) and idle
    time (waiting for copies, for the host, launch gaps), the host-to-device copy time, and the part of it
    no kernel of the compute stream overlaps. ``step_s``: the run's median step, which sets the window."""
    with gzip.open(trace_path) if trace_path.endswith(".gz") else open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    kernels, copies = {}, []
    for e in events:
        dur = e.get("dur")
        if dur is None:
            continue
        span = (e["ts"] / 1e6, (e["ts"] + dur) / 1e6)
        if e.get("cat") == "kernel":
            kernels.setdefault(e.get("args", {}).get("stream"), []).append(span)
        elif e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", ""):
            copies.append(span)
    if not kernels:
        return {}
    busy = _union(kernels[max(kernels, key=lambda k: sum(b - a for a, b in kernels[k]))])
    hi = busy[-1][1]
    lo = hi - steps * step_s

    def clip(intervals):
        return [[max(a, lo), min(b, hi)] for a, b in intervals if b > lo and a < hi]

    busy, copy = clip(busy), _union(clip(copies))
    return {"steps": steps, "step_s": round(step_s, 4),
            "compute_busy_per_step_s": round(_length(busy) / steps, 4),
            "compute_idle_per_step_s": round((hi - lo - _length(busy)) / steps, 4),
            "h2d_copy_per_step_s": round(_length(copy) / steps, 4),
            "h2d_not_under_compute_per_step_s": round(_length(_minus(copy, busy)) / steps, 4)}


def pinned_bandwidth_gbps():
    import torch

    out = {}
    for pinned in (True, False):
        src = torch.empty(GIB, dtype=torch.uint8, pin_memory=pinned)
        dst = torch.empty(GIB, dtype=torch.uint8, device="cuda")
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out["pinned" if pinned else "pageable"] = round(GIB / statistics.median(times) / 1e9, 1)
        del src, dst
    torch.cuda.empty_cache()
    return out


def run_lowvram(run):
    """Uncapped rounds, then each budget under its ballast, the tables saved as they grow."""
    phase = LowVramPhase(run)
    phase.uncapped_rounds()
    if getattr(run.args, "profile", False) and run.bench.cuda:
        phase.profile("profiled uncapped nf4+control", "nf4+control", None)
    budgets = tuple(int(b) for b in run.args.budgets.split(",")) if getattr(run.args, "budgets", None) else BUDGETS_GIB
    for budget in budgets if run.bench.cuda else ():  # a CPU dry run stops here
        phase.budget(budget)
    run.info["table"] = phase.table
    run.save()


class LowVramPhase:
    """The phase's models (stock bf16 + Control, NF4 + Control, + 2 style) and what its rows share: the
    uncapped latents each capped row is compared with, the ratio tables, the bf16 references."""

    def __init__(self, run):
        import torch

        self.run, self.bench, self.args, self.torch = run, run.bench, run.args, torch
        bench, info = run.bench, run.info
        self.adapter = run.host.pack_module("quant_expand.comfyui.partial_load")
        info["host_to_device_GBps"] = pinned_bandwidth_gbps() if bench.cuda else {"pinned": 1.0, "pageable": 1.0}
        self.bw = info["host_to_device_GBps"]["pinned"] * 1e9
        run.log(f"host to device: {info['host_to_device_GBps']} GB/s")
        self.steps_per_run = bench.steps + 1
        self.rounds = max(2, getattr(self.args, "rounds", 2))
        self.nf4 = run.load_bnb("nf4")
        ctl = run.apply(self.nf4, "control.safetensors", 1.0)
        self.ours = {"nf4+control": ctl, "nf4+control+2style": run.with_styles(ctl)}
        self.latents, self.table = {}, {}
        self.uncapped = {"bf16+control": [], "nf4+control": [], "nf4+control+2style": []}
        self.bf = None

    def stock_control(self):
        import nodes as comfy_nodes

        with self.torch.inference_mode():
            return comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(
                self.run.bf16_model(), "control.safetensors", 1.0)[0]

    def row(self, label, key, model, budget):
        """One sampling run; returns the row's result dict (or its error)."""
        bench, adapter = self.bench, self.adapter

        def streamer():
            return getattr(model.model, adapter.STREAMER_ATTR, None)

        before = streamer()
        before_bytes = before.bytes_copied if before is not None else 0
        try:
            with FreeMemoryFloor() as floor:
                out = bench.sample(label, model, control=True, preload=False)
        except Exception as e:  # an out-of-memory error is a result
            bench.results[label] = {"error": f"{type(e).__name__}: {e}"[:1500]}
            self.run.log(f"{label} failed: {e}")
            bench.unload()
            return bench.results[label]
        r = bench.results[label]
        s = streamer()
        r["lowest_free_gib"] = round(floor.low / GIB, 3)
        r["model_lowvram"] = bool(getattr(model.model, "model_lowvram", False))
        r["loaded_gib"] = round(model.loaded_size() / GIB, 3)  # dynamic VRAM: mapped VBAR pages included
        r["model_size_gib"] = round(model.model_size() / GIB, 3)
        if s is not None:
            copied = s.bytes_copied - (before_bytes if s is before else 0)
            r["h2d_bytes_per_step_gib"] = round(copied / self.steps_per_run / GIB, 3)
            r["streamed_units"] = len(s.units)
            r["slot_gib"] = round(s.device_bytes / GIB, 3)
            r["pageable_mib"] = round(s.pageable_bytes / 2**20, 1)
            r["streamer"] = type(s).__name__
        elif r["model_lowvram"]:  # stock: ComfyUI casts its offloaded weights every step
            r["h2d_bytes_per_step_gib"] = round((model.model_size() - model.model.model_loaded_weight_memory) / GIB, 3)
        if key in self.ours:
            ref = self.latents.get((key, None))
            if budget is None and ref is None:
                self.latents[(key, None)] = out.clone()
            elif ref is not None:
                r["bitwise_equal_to_uncapped"] = bool(self.torch.equal(out, ref))
        bench.on_result()
        return r

    def uncapped_rounds(self):
        """Every row uncapped, ``rounds`` times: the base of the ratios and the reference latents."""
        run, uncapped = self.run, self.uncapped
        self.bf = self.stock_control()
        for rnd in range(self.rounds):
            for key, model in (("bf16+control", self.bf), *self.ours.items()):
                r = self.row(f"uncapped r{rnd} {key}", key, model, None)
                if "median_step_s" in r:
                    uncapped[key].append(r["median_step_s"])
        self.bench.unload()
        self.base = statistics.median(uncapped["bf16+control"])
        self.table["all"] = {k: round(statistics.median(v) / self.base, 3) for k, v in uncapped.items() if v}
        self.compute = {k: statistics.median(v) for k, v in uncapped.items() if v}
        run.info["uncapped_bf16_control_s"] = uncapped["bf16+control"]
        run.log(f"uncapped ratios: {self.table['all']}")
        run.save()
        self.paired_table = {"all": self.table["all"]}
        self.reference = [self.base]  # uncapped bf16 + Control, measured again after each budget (paired)

    def profile(self, label, key, budget):
        """One more run of a row under torch.profiler (its time is not a ratio: the profiler slows the host
        side); its trace summarised by timeline_summary, the gzipped trace kept beside the results JSON."""
        from torch.profiler import ProfilerActivity, profile as torch_profile

        name = label.replace(" ", "-").replace("+", "_")
        trace = os.path.join(os.path.dirname(os.path.abspath(self.args.out)), f"trace-{name}.json")
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            r = self.row(label, key, self.ours[key], budget)
        prof.export_chrome_trace(trace)
        with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
            dst.write(src.read())
        os.remove(trace)
        summary = timeline_summary(trace + ".gz", r["median_step_s"]) if "median_step_s" in r else {}
        self.run.info.setdefault("timelines", {})[label] = summary
        self.run.log(f"{label} timeline: {summary}")

    def uncapped_again(self, after):
        """Uncapped bf16 + Control and NF4 + Control sampled right after a budget's ballast is gone: the
        budget's ratios are to the mean of the bf16 steps just before and just after it, so a GPU that
        runs a few percent slower minutes into the command does not show as a cost of streaming."""
        for key in ("bf16+control", "nf4+control"):
            for attempt in range(2):
                model = self.bf if key == "bf16+control" else self.ours[key]
                r = self.row(f"uncapped after {after} GiB {key}", key, model, None)
                if "median_step_s" in r or key != "bf16+control" or attempt:
                    break
                # ComfyUI 0.33 cannot reload a partially loaded widened img_in: a fresh model
                self.bf = None
                self.bench.unload()
                self.bf = self.stock_control()
            if key == "bf16+control" and "median_step_s" in r:
                self.reference.append(r["median_step_s"])
        self.bench.unload()

    def capped_rounds(self, budget):
        """Every row ``rounds`` times with a ballast holding all but ``budget`` GiB; returns each row's
        median steps."""
        import comfy.model_management as mm

        bench, torch = self.bench, self.torch
        bench.unload()
        mm.unload_all_models()
        gc.collect()
        torch.cuda.empty_cache()
        ballast = Ballast(budget)
        self.run.log(f"{budget} GiB: ballast holds {ballast.held / GIB:.2f} GiB, {ballast.free / GIB:.2f} GiB free")
        per = {k: [] for k in self.uncapped}
        try:
            for rnd in range(self.rounds):
                for key, model in (("bf16+control", self.bf), *self.ours.items()):
                    r = self.row(f"{budget} GiB r{rnd} {key}", key, model, budget)
                    r["free_gib_at_start"] = round(ballast.free / GIB, 2)
                    if "median_step_s" in r:
                        per[key].append(r["median_step_s"])
                        moved = r.get("h2d_bytes_per_step_gib", 0) * GIB
                        r["ratio_to_uncapped_bf16"] = round(r["median_step_s"] / self.base, 3)
                        r["floor_ratio"] = round(max(self.compute[key], moved / self.bw) / self.base, 3)
                bench.unload()
            if getattr(self.args, "profile", False):
                self.profile(f"profiled {budget} GiB nf4+control", "nf4+control", budget)
                bench.unload()
        finally:
            ballast.close()
        return per

    def budget(self, budget):
        """One budget: its capped rounds, uncapped bf16 again, and its ratios (to the first uncapped bf16
        and, paired, to the bf16 just before and after)."""
        run, info, table, paired_table = self.run, self.run.info, self.table, self.paired_table
        per = self.capped_rounds(budget)
        measured = len(self.reference)
        self.uncapped_again(budget)
        ref = statistics.mean(self.reference[measured - 1:])  # bf16 just before the budget and, if it ran, after
        for rnd in range(self.rounds):
            for key in per:
                r = self.bench.results.get(f"{budget} GiB r{rnd} {key}", {})
                if "median_step_s" in r:
                    r["ratio_paired"] = round(r["median_step_s"] / ref, 3)
        paired_table[f"{budget} GiB"] = {k: (round(statistics.median(v) / ref, 3) if v else "error")
                                         for k, v in per.items()}
        info["paired_table"] = paired_table
        info["bf16_references_s"] = self.reference
        table[f"{budget} GiB"] = {k: (round(statistics.median(v) / self.base, 3) if v else "error") for k, v in per.items()}
        run.log(f"{budget} GiB free: {table[f'{budget} GiB']}, paired: {paired_table[f'{budget} GiB']}")
        info["table"] = table
        run.save()
