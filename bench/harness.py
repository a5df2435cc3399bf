"""What every benchmark here measures with: the sampling harness (``Bench``: 1 + N euler steps through
ComfyUI's sampler, per-step times, memory), the memory and collector samplers, the cold read, and one
command's set-up (``BenchRun``: ComfyUI started on the generated files, the log, the results JSON, the
pack's nodes as calls) with the options every full-pipeline script takes (``bench_parser``)."""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import threading
import time

from inputs import FULL, GIB, MODEL_FILE, REPO_ROOT, SMALL, flux_width, write_inputs
from quant_expand.testing.synthetic import flux_shapes


def drop_page_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cold_read_s(path):
    drop_page_cache(path)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(256 * 2 ** 20)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


class RssAnonPeak:
    """Samples RssAnon of this process (anonymous memory: not the page cache, not mmapped files)."""

    def __init__(self, every=0.02):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    @staticmethod
    def now():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        self.start = self.now()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


class GcPauses:
    """Python's garbage collections while the block runs: count and seconds per generation (a host-bound
    step is as slow as its host; a collection of the oldest generation walks every live object)."""

    def __enter__(self):
        self.count, self.seconds, self._t = [0, 0, 0], [0.0, 0.0, 0.0], None
        gc.callbacks.append(self._callback)
        return self

    def _callback(self, phase, info):
        if phase == "start":
            self._t = time.perf_counter()
        elif self._t is not None:
            self.count[info["generation"]] += 1
            self.seconds[info["generation"]] += time.perf_counter() - self._t

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)


class Bench:
    def __init__(self, host, cfg, res, steps, log):
        import torch

        self.torch, self.host, self.cfg, self.res, self.steps, self.log = torch, host, cfg, res, steps, log
        self.cuda = torch.cuda.is_available() and not host.cpu
        g = torch.Generator().manual_seed(1)
        self.ctx = torch.randn(1, 512 if cfg.hidden_size == FULL.hidden_size else 16, cfg.context_in_dim, generator=g)
        self.pooled = torch.randn(1, cfg.vec_in_dim, generator=g)
        self.results = {}
        self.on_result = None
        self.idle = 0.0  # allocated with no model loaded (measured at each unload)

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def vram(self):
        return (self.torch.cuda.memory_allocated() / GIB) if self.cuda else 0.0

    def sample(self, label, patcher, res=None, control=False, extra=None, preload=True):
        """1 + steps euler steps through comfy.sample.sample; per-step times from its callback."""
        import comfy.sample

        torch = self.torch
        res = res or self.res
        latent = patcher.model.latent_format  # FLUX.1: 16 channels at 1/8; FLUX.2: 128 at 1/16
        side = res // latent.spacial_downscale_ratio
        lat = torch.zeros(1, latent.latent_channels, side, side)
        extra_cond = {"guidance": 3.5}
        if self.pooled is not None:  # FLUX.2's text encoders give no pooled vector
            extra_cond["pooled_output"] = self.pooled
        if control:
            extra_cond["concat_latent_image"] = torch.randn(lat.shape, generator=torch.Generator().manual_seed(2))
        pos = [[self.ctx, extra_cond]]
        neg = [[self.ctx, dict(extra_cond)]]
        noise = comfy.sample.prepare_noise(lat, 0)
        marks = []

        def callback(step, x0, x, total):
            self.sync()
            marks.append(time.perf_counter())

        import comfy.model_management as mm

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.sync()
        t0 = time.perf_counter()
        resident = load_s = None
        if preload:  # "resident": what the loaded model holds on the GPU, before any activation exists
            with torch.inference_mode():
                mm.load_models_gpu([patcher])
            self.sync()
            load_s = time.perf_counter() - t0
            resident = self.vram()  # minus what the process held with no model loaded (cuBLAS workspaces)
        with torch.inference_mode(), GcPauses() as pauses:
            out = comfy.sample.sample(patcher, noise, self.steps + 1, 1.0, "euler", "simple", pos, neg, lat,
                                      denoise=1.0, seed=0, callback=callback, disable_pbar=True)
        steps = [b - a for a, b in zip(marks, marks[1:])]
        r = {"median_step_s": round(statistics.median(steps), 4), "min_step_s": round(min(steps), 4),
             "max_step_s": round(max(steps), 4), "first_step_incl_load_s": round(marks[0] - t0, 3),
             "resident_gib": round((resident - self.idle) if resident is not None else self.vram(), 2),
             "resident_measured": ("allocated after loading minus allocated with no model loaded"
                                   if resident is not None else "allocated after sampling"),
             "allocated_after_loading_gib": round(resident, 3) if resident is not None else None,
             "allocated_with_no_model_gib": round(self.idle, 3),
             "model_size_gib": round(patcher.model_size() / GIB, 2),
             "load_before_sampling_s": round(load_s, 4) if load_s is not None else None,
             "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if self.cuda else 0.0,
             "finite": bool(torch.isfinite(out).all()), "res": res, "step_s": [round(t, 4) for t in steps],
             "gc_collections": pauses.count, "gc_s": [round(t, 4) for t in pauses.seconds]}
        if extra:
            r.update(extra)
        base = self.results.get("bf16" if res == self.res else None)
        if base and label != "bf16":
            r["ratio_to_bf16"] = round(r["median_step_s"] / base["median_step_s"], 3)
        self.results[label] = r
        self.log(f"{label}: {json.dumps(r)}")
        if self.on_result:
            self.on_result()
        return out

    def unload(self):
        import comfy.model_management as mm

        mm.unload_all_models()
        gc.collect()
        mm.soft_empty_cache()
        self.sync()
        self.idle = self.vram()


def scrub_paths(text: str, comfyui: str, workdir: str) -> str:
    """This machine's folders (in tracebacks and log lines) as placeholders: results are committed."""
    import re

    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    names = {}
    for path, name in ((comfyui, "<comfyui>"), (workdir, "<workdir>"), (REPO_ROOT, "<repo>"), (site, "<site-packages>")):
        for form in (os.path.abspath(path), path.rstrip("/")):
            if len(form) > 1:
                names.setdefault(json.dumps(form)[1:-1], name)
    for form in sorted(names, key=len, reverse=True):  # a whole path only, not a prefix of a longer name
        text = re.sub(re.escape(form) + r"(?![\w.-])", names[form], text)
    return text


def bench_parser() -> argparse.ArgumentParser:
    """The options every full-pipeline GPU script here takes: ComfyUI, a folder for the model files
    it writes (kept between runs), and the JSON to write."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", required=True, help="a ComfyUI tree (the kit's)")
    ap.add_argument("--workdir", required=True, help="models/ folder for the generated files")
    ap.add_argument("--out", required=True, help="results JSON")
    return ap


def start_host(comfyui, models, cpu, dynamic_vram=False):
    """ComfyUI in this process on the models folder ``models``: the classic ModelPatcher unless
    ``dynamic_vram`` (a CPU run has neither switch); ``host.cpu`` tells Bench where it samples."""
    from quant_expand.testing.inprocess import ComfyHost

    extra = ["--disable-dynamic-vram"] if not dynamic_vram and not cpu else []
    host = ComfyHost.start(comfyui, REPO_ROOT, models, cpu=cpu, dynamic_vram=dynamic_vram, extra_args=extra)
    host.cpu = cpu
    return host


def machine_info(cpu) -> dict:
    """Where and with which versions a results JSON was measured."""
    import torch

    return {"device": torch.cuda.get_device_name(0) if not cpu else "cpu", "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "bitsandbytes": __import__("bitsandbytes").__version__}


def comfyui_version(comfyui) -> str:
    return open(os.path.join(comfyui, "comfyui_version.py")).read().split('"')[1]


def families_folder(workdir) -> str:
    """ComfyUI's models folder of ``--phase families``: its FLUX.2 files, named by model and shape."""
    folder = os.path.join(workdir, "flux2")
    os.makedirs(os.path.join(folder, "diffusion_models"), exist_ok=True)
    return folder


class BenchRun:
    """One benchmark command: the generated files, ComfyUI started on them, the ``Bench`` that samples,
    the log (kept for the results), the results (``info``, written by ``save``) and the pack's nodes as
    calls. ``args`` carries --comfyui, --workdir, --out, --steps and --cpu. ``models``: ComfyUI's models
    folder when the phase writes its own files there (default: the FLUX.1 files of ``cfg``, written now)."""

    def __init__(self, args, cfg, res, dynamic_vram=False, models=None):
        self.args, self.log_lines, self.info = args, [], {}
        if models is None:
            models = write_inputs(args.workdir, cfg, "cpu" if args.cpu else "cuda", self.log)
        self.model_path = os.path.join(models, "diffusion_models", MODEL_FILE)
        self.host = start_host(args.comfyui, models, args.cpu, dynamic_vram)
        self.bench = Bench(self.host, cfg, res, args.steps, self.log)
        self.load_node = self.host.pack_module("nodes.load_bnb_flux").LoadBnbFlux
        self.lora_nodes = self.host.pack_module("nodes.apply_control_lora")

    def log(self, msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.log_lines.append(line)

    def save(self):
        self.info["log"] = self.log_lines
        with open(self.args.out, "w") as f:
            f.write(scrub_paths(json.dumps(self.info, indent=1), self.args.comfyui, self.args.workdir))

    def load_bnb(self, quant, name=MODEL_FILE):
        import torch

        with torch.inference_mode():
            return self.load_node.execute(name, quant, True, "auto").result[0]

    def apply(self, model, name, strength):
        import torch

        with torch.inference_mode():
            return self.lora_nodes.ApplyControlLora.execute(model, name, strength).result[0]

    def with_styles(self, model):
        """``model`` + the two rank-32 style LoRAs (0.8, 0.6): every "+2style" row."""
        return self.apply(self.apply(model, "style1.safetensors", 0.8), "style2.safetensors", 0.6)

    def bf16_model(self, name=MODEL_FILE):
        import nodes as comfy_nodes
        import torch

        with torch.inference_mode():
            return comfy_nodes.UNETLoader().load_unet(name, "default")[0]

    def bf16_row(self):
        """Stock bf16 (UNETLoader), the baseline of the rows' ratio_to_bf16, unloaded after."""
        m = self.bf16_model()
        self.bench.sample("bf16", m)
        del m
        self.bench.unload()


class PhaseRun(BenchRun):
    """The set-up every phase of bench_gpu.py shares: the model's shape (--small, --blocks), dynamic VRAM
    (--phase dynamic, --dynamic-vram), the run's header and Triton tiles (--tiles) in ``info``, and every
    row saved as it is measured. ``--phase families`` writes its FLUX.2 files itself, into
    ``families_folder``: ComfyUI starts on that folder and no FLUX.1 file is written."""

    def __init__(self, args):
        cfg = SMALL if args.small else FULL
        if args.blocks:  # FLUX.1-dev width with fewer blocks (a quick run; ratios are not the full model's)
            cfg = flux_width(*(int(v) for v in args.blocks.split(",")))
        res = 64 if args.small else 1024
        dynamic = (args.phase == "dynamic" or args.dynamic_vram) and not args.cpu
        families = args.phase == "families"
        super().__init__(args, cfg, res, dynamic, models=families_folder(args.workdir) if families else None)
        self.info = {"phase": args.phase, **machine_info(args.cpu), "comfyui": comfyui_version(args.comfyui),
                     "dynamic_vram": bool(getattr(self.host, "dynamic_vram", False)), "res": res,
                     "timed_steps": args.steps}
        if not families:  # the families phase gives each model's own
            self.info["params_billion"] = round(sum(math.prod(s) for s in flux_shapes(cfg).values()) / 1e9, 3)
        tuning = self.host.pack_module("quant_expand.tuning").TUNING
        if args.tiles:  # tile shapes picked by bench/dequant_kernels.py on this machine
            best = json.load(open(args.tiles))["best_tiles"]
            tuning.plain_tile, tuning.lora_tile = tuple(best["plain"]), tuple(best["lora"])
        self.info["triton_tiles"] = {"plain": list(tuning.plain_tile), "lora": list(tuning.lora_tile)}
        self.bench.on_result = self.save

    def save(self):  # after every row: a command stopped at its time limit keeps what it measured
        self.info["runs"] = self.bench.results
        super().save()
