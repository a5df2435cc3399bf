"""Child process of tests/test_leaks.py: apply -> rescale -> sample -> drop, many times, on a tiny FLUX
loaded once by Load BnB Flux inside ComfyUI (in-process host), recording memory after every cycle.

A process of its own: its memory holds nothing but this loop (no other test's garbage), and the GPU run
starts ComfyUI without ``--cpu``. Prints one JSON object on its last line; with ``--check`` (a machine
without pytest) also the verdict of tests/test_leaks.py's bounds, and exits 1 if one is exceeded.

usage: python tests/leak_cycles.py COMFYUI_PATH WORKDIR cpu|cuda WARMUP CYCLES [--check]
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import statistics
import sys
import weakref

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# bounds on growth over the measured cycles (why these numbers: tests/test_leaks.py)
RSS_BOUND_MIB = 16
CUDA_ALLOCATED_BOUND_MIB = 2


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap():
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so RSS follows live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def main(comfy_path: str, workdir: str, device: str, warmup: int, cycles: int):
    sys.path.insert(0, REPO_ROOT)
    import torch

    torch.set_num_threads(1)  # a tiny model: more threads only wait on a busy machine; memory is the same
    from quant_expand.testing.inprocess import ComfyHost, sample_direct
    from quant_expand.testing.synthetic import TinyFluxConfig, make_control_lora, make_lora, make_tiny_flux, save_safetensors

    host = ComfyHost.start(comfy_path, REPO_ROOT, os.path.join(workdir, "models"), cpu=device == "cpu")
    cfg = TinyFluxConfig()
    save_safetensors(make_tiny_flux(cfg, seed=0, exact_for="nf4"), host.model_path("diffusion_models", "leak.safetensors"))
    control = save_safetensors(make_control_lora(cfg, rank=32, seed=2), host.model_path("loras", "leak_canny.safetensors"))
    style = save_safetensors(make_lora(cfg, kind="lora", rank=32, seed=7), host.model_path("loras", "leak_style.safetensors"))
    nodes = host.pack_module("nodes.apply_control_lora")
    loader = host.pack_module("nodes.load_bnb_flux").LoadBnbFlux
    cuda = device == "cuda"
    if cuda:
        assert torch.cuda.is_available()
    ctl = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(4))

    with torch.inference_mode():
        base = loader.execute("leak.safetensors", "nf4", True, "auto", True).result[0]
    assert base.load_device.type == device, base.load_device

    records, alive = [], []
    for i in range(warmup + cycles):
        with torch.inference_mode():
            m = nodes.ApplyControlLora.execute(base, "leak_canny.safetensors", 1.0).result[0]
            m = nodes.ApplyControlLora.execute(m, "leak_style.safetensors", 0.3 + 0.01 * i).result[0]
            m2 = nodes.SetLoraScale.execute(m, "leak_canny.safetensors", 0.9 - 0.01 * i).result[0]
            out = sample_direct(m2, control=ctl, steps=1)
        assert torch.isfinite(out).all()
        alive.append((weakref.ref(m), weakref.ref(m2)))
        del m, m2, out
        gc.collect()
        _trim_heap()
        rec = {"rss": rss_bytes()}
        if cuda:
            torch.cuda.synchronize()
            rec["cuda_allocated"] = torch.cuda.memory_allocated()
            rec["cuda_reserved"] = torch.cuda.memory_reserved()
        records.append(rec)

    # every dropped clone is gone, except what ComfyUI still holds as the loaded model (the last one)
    survivors = [i for i, refs in enumerate(alive) if any(r() is not None for r in refs)]
    lazy_delta_bytes = sum(m.lora_delta.nbytes() for m in base.model.modules() if getattr(m, "lora_delta", None))
    result = {"device": device, "warmup": warmup, "records": records, "survivors": survivors,
              "lora_file_bytes": os.path.getsize(control) + os.path.getsize(style),
              "lazy_delta_bytes": lazy_delta_bytes, "dynamic_vram": host.dynamic_vram}
    print(json.dumps(result), flush=True)
    return result


def growth_mib(result: dict, field: str) -> float:
    """Median of the last 5 measured cycles minus median of the first 5 (a median ignores one-off spikes)."""
    values = [r[field] for r in result["records"][result["warmup"]:]]
    return (statistics.median(values[-5:]) - statistics.median(values[:5])) / 2**20


def check(result: dict) -> tuple[list[str], str]:
    """(problems, summary) of one run against the bounds."""
    measured = result["records"][result["warmup"]:]
    cycles = len(measured)
    rss = growth_mib(result, "rss")
    summary = (f"{result['device']}: RSS {measured[0]['rss'] / 2**20:.1f} MiB, growth over {cycles} cycles "
               f"{rss:+.2f} MiB (bound {RSS_BOUND_MIB}); per cycle {result['lora_file_bytes'] / 2**20:.1f} MiB of "
               f"LoRA files, {result['lazy_delta_bytes'] / 2**20:.1f} MiB of deltas")
    problems = []
    if result["lora_file_bytes"] * cycles / 2**20 <= 10 * RSS_BOUND_MIB:
        problems.append("the RSS bound is not far below what leaking each cycle's LoRA data would add")
    if rss > RSS_BOUND_MIB:
        problems.append(f"RSS grew {rss:.1f} MiB: {[round(r['rss'] / 2**20, 1) for r in measured]}")
    if "cuda_allocated" in measured[0]:
        alloc = growth_mib(result, "cuda_allocated")
        summary += (f"; CUDA allocated {measured[0]['cuda_allocated'] / 2**20:.1f} MiB, growth {alloc:+.3f} MiB "
                    f"(bound {CUDA_ALLOCATED_BOUND_MIB}), reserved {measured[0]['cuda_reserved'] / 2**20:.1f} -> "
                    f"{measured[-1]['cuda_reserved'] / 2**20:.1f} MiB")
        if alloc > CUDA_ALLOCATED_BOUND_MIB:
            problems.append(f"CUDA allocated grew {alloc:.2f} MiB: {[r['cuda_allocated'] for r in measured]}")
    if not set(result["survivors"]) <= {len(result["records"]) - 1}:
        problems.append(f"patchers of these cycles are still alive: {result['survivors']}")
    return problems, summary


if __name__ == "__main__":
    args = list(sys.argv)  # ComfyHost.start rewrites sys.argv for ComfyUI's own argument parser
    out = main(args[1], args[2], args[3], int(args[4]), int(args[5]))
    if "--check" in args[6:]:
        found, text = check(out)
        print(text)
        print("\n".join(found) or "memory flat: OK")
        sys.exit(1 if found else 0)
