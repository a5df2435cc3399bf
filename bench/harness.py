"""What every benchmark here measures with: the sampling harness (``Bench``: 1 + N euler steps through
ComfyUI's sampler, per-step times, memory), the memory and collector samplers, the cold read, and the
results' paths scrubbed."""
from __future__ import annotations

import gc
import json
import os
import statistics
import threading
import time

from inputs import FULL, GIB, REPO_ROOT


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
        lat = torch.zeros(1, 16, res // 8, res // 8)
        extra_cond = {"pooled_output": self.pooled, "guidance": 3.5}
        if control:
            extra_cond["concat_latent_image"] = torch.randn(1, 16, res // 8, res // 8, generator=torch.Generator().manual_seed(2))
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

