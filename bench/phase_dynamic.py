"""``bench_gpu.py --phase dynamic`` (ComfyUI's dynamic VRAM, set up as main.py does): bf16, NF4, NF4 + Control,
and NF4 + Control under torch.compile, each block one graph, then ComfyUI's TorchCompileModel node, graph
breaks counted.
"""
from __future__ import annotations

from compiling import attention_for_compile_on_cpu, compiled_per_block
from probes import resident_row


def run_dynamic(run):
    """The eager rows, resident memory beside NF4's, then the compiled rows."""
    run.bf16_row()
    nf4 = run.load_bnb("nf4")
    resident_row(run, "nf4", nf4)
    ctl = run.apply(nf4, "control.safetensors", 1.0)
    resident_row(run, "nf4+control", ctl, control=True)
    del ctl, nf4
    run.bench.unload()
    compiled_rows(run)
    run.save()


def compiled_rows(run):
    """The torch.compile rows, each on a fresh dynamo (compiled_row): each block one graph first
    (``fullgraph=True`` raises on any break inside a block; all blocks of a kind share one graph), bf16
    the same way (what compiling alone gains), then the whole model through ComfyUI's TorchCompileModel
    node (one graph)."""
    m = run.apply(run.load_bnb("nf4"), "control.safetensors", 1.0)
    if run.args.cpu:
        attention_for_compile_on_cpu()
    compiled_row(run, "nf4+control compiled per block fullgraph", lambda: compiled_per_block(m.clone()))
    compiled_row(run, "bf16 compiled per block fullgraph", lambda: compiled_per_block(run.bf16_model()),
                 control=False)
    compiled_row(run, "nf4+control compiled", lambda: torch_compile_model(m))
    m = None  # dropped before unloading (the lambdas above close over m, so not del)
    run.bench.unload()


def compiled_row(run, label, make, control=True):
    """Sample the compiled model ``make()`` builds (the first step includes compiling), with
    dynamo's counts; a failure is the row's result, and the run goes on."""
    import torch._dynamo

    bench = run.bench
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
        run.log(f"{label} failed: {e}")
    patcher = None  # dropped before unloading, so the baseline after it is measured without it
    bench.unload()


def torch_compile_model(m):
    """``m`` through ComfyUI's TorchCompileModel node (inductor), the node API either version has."""
    import nodes as comfy_nodes
    import torch

    node = comfy_nodes.NODE_CLASS_MAPPINGS["TorchCompileModel"]
    with torch.inference_mode():
        if hasattr(node, "execute") and hasattr(node, "define_schema"):
            return node.execute(m, "inductor").result[0]
        return node().patch(m, "inductor")[0]
