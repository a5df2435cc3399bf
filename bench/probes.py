"""What the GPU holds and runs while a model samples: resident memory by owner, the quantized layers'
stored bytes (did anything requantize?), and torch.profiler's GPU time by kernel."""
from __future__ import annotations

import gc

from inputs import GIB


def resident_breakdown(patcher, host, device_type="cuda"):
    """What the GPU holds while ``patcher`` is loaded, by owner (GiB): the model's state dict (packed bytes,
    quantization state, unquantized weights), the layers' stacked LoRA factors and bias deltas, and what
    else live tensors hold (largest by shape). Tensors only C++ holds (cuBLAS workspaces) are not seen."""
    import torch

    layers = host.pack_module("quant_expand.layers")
    import warnings

    storages = {}
    with warnings.catch_warnings():  # isinstance() on every object touches deprecated module attributes
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        tensors = [o for o in objects if isinstance(o, torch.Tensor)]
    for o in tensors:
        try:
            if o.device.type == device_type:
                st = o.untyped_storage()
                storages.setdefault(st.data_ptr(), (st.nbytes(), tuple(o.shape), str(o.dtype)))
        except Exception:  # tensor subclasses without storage
            continue

    def ptrs(tensors):
        return {t.untyped_storage().data_ptr() for t in tensors
                if isinstance(t, torch.Tensor) and t.device.type == device_type}

    model = patcher.model.diffusion_model
    owned = {"state_dict": ptrs(patcher.model.state_dict().values())}
    lora = []
    for m in model.modules():
        if layers.is_quantized_linear(m) and m.lora_delta is not None:
            lora += m.lora_delta.device_tensors()
    owned["lora_factors_and_bias_deltas"] = ptrs(lora) - owned["state_dict"]
    out, counted = {}, set()
    for name, ps in owned.items():
        out[name] = round(sum(storages[p][0] for p in ps if p in storages) / GIB, 4)
        counted |= ps
    rest = sorted((v for p, v in storages.items() if p not in counted), key=lambda v: -v[0])
    out["other_live_tensors"] = round(sum(v[0] for v in rest) / GIB, 4)
    out["largest_other"] = [f"{v[1]} {v[2]} {v[0] / 2**20:.1f} MiB" for v in rest[:8]]
    if device_type == "cuda":
        out["allocated"] = round(torch.cuda.memory_allocated() / GIB, 4)
    return out


def layer_bytes(patcher, host):
    layers = host.pack_module("quant_expand.layers")
    return [sum(t.nbytes for t in host.pack_module("quant_expand.layer_state").quantized_bytes(m).values())
            for m in patcher.model.diffusion_model.modules() if layers.is_quantized_linear(m)]


def quantized_digest(patcher, host):
    """SHA-256 over every stored byte of every quantized layer: any rewrite changes it."""
    return host.pack_module("quant_expand.layer_state").quantized_digest(patcher.model.diffusion_model)


def profiled_kernels(bench, label, model, control):
    """A warm-up sampling run, then one of 1 + 2 steps under torch.profiler: the ops and kernels with
    GPU time (``name``, ``calls``, ``gpu_ms``; largest first) and the host's own time in ms."""
    from torch.profiler import ProfilerActivity, profile

    bench.sample(f"{label} (warm-up for profile)", model, control=control)
    steps = bench.steps
    bench.steps = 2
    try:
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            bench.sample(f"{label} (profiled)", model, control=control)
    finally:
        bench.steps = steps
    rows, cpu_us = [], 0.0
    for e in prof.key_averages():
        cpu_us += e.self_cpu_time_total
        cuda_us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if cuda_us > 0:
            rows.append({"name": e.key[:120], "calls": e.count, "gpu_ms": round(cuda_us / 1000, 2)})
    rows.sort(key=lambda r: -r["gpu_ms"])
    return rows, round(cpu_us / 1000, 1)


def gpu_profile(bench, load_bnb, apply, log):
    """GPU time by kernel for three 1024x1024 steps (1 + 2) of NF4 and of NF4 + Control (torch.profiler):
    where a quantized step's time goes."""
    import torch

    out = {}
    m = load_bnb("nf4")
    for label, model, control in (("nf4", m, False), ("nf4+control", apply(m, "control.safetensors", 1.0), True)):
        rows, _ = profiled_kernels(bench, label, model, control)
        total = sum(r["gpu_ms"] for r in rows)
        out[label] = {"gpu_ms_total_3_steps": round(total, 1), "top_kernels": rows[:18]}
        log(f"profile {label}: GPU busy {total:.1f} ms over 3 steps; top: " +
            "; ".join(f"{r['name'][:50]} {r['gpu_ms']} ms" for r in rows[:6]))
        del model
    del m
    bench.unload()
    torch.cuda.synchronize()
    return out


def resident_row(run, label, model, control=False):
    """The row ``label`` of ``model``, with the GPU's resident memory by owner beside it (on a GPU)."""
    bench = run.bench
    bench.sample(label, model, control=control)
    if bench.cuda:
        bench.results[label]["resident_breakdown_gib"] = resident_breakdown(model, run.host)
        run.log(f"{label} resident: {bench.results[label]['resident_breakdown_gib']}")
