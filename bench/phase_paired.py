"""``bench_gpu.py --phase paired`` (legacy patcher): only the paired rounds, for every quantization; bf16
sampled again at the start of every round, ratios round by round. ``--before DIR`` pairs an earlier
checkout's NF4 rows with today's in the same rounds; ``--compiled`` adds rounds of bf16 and NF4 + Control
with every block compiled.
"""
from __future__ import annotations

import os
import statistics
import sys

from compiling import attention_for_compile_on_cpu, compiled_per_block
from inputs import MODEL_FILE


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
    long run come out a few percent slower (the same models, round after round: bench/strength_probe.py),
    which a ratio to a bf16 row measured minutes earlier takes for the model's cost. Ratio = median
    step / the same round's bf16 median."""
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


def run_paired(run):
    """The paired ratios of every quantization (``--before``: NF4 and NF4 + Control, before and after)."""
    args, info = run.args, run.info
    nf4 = run.load_bnb("nf4")
    ctl = run.apply(nf4, "control.safetensors", 1.0)
    if args.before:  # the same rows from an earlier checkout, in the same rounds: before / after
        models = before_and_after(run, nf4, ctl)
    else:
        models = [("nf4", nf4, False), ("nf4+control", ctl, True), ("nf4+control+2style", run.with_styles(ctl), True),
                  ("fp4", run.load_bnb("fp4"), False), ("int8", run.load_bnb("int8"), False)]
    bf = run.bf16_model()
    info["paired"] = paired_ratios(run.bench, bf, models, run.log, rounds=args.rounds)
    run.save()
    if args.compiled:
        compiled_rounds(run, bf, ctl)


def before_and_after(run, nf4, ctl):
    """NF4 and NF4 + Control from the checkout ``--before`` beside today's, as paired_ratios' models."""
    import torch

    args = run.args
    old = pack_copy(args.before)
    with torch.inference_mode():
        old_nf4 = old("nodes.load_bnb_flux").LoadBnbFlux.execute(MODEL_FILE, "nf4", True, "auto").result[0]
        old_ctl = old("nodes.apply_control_lora").ApplyControlLora.execute(
            old_nf4, "control.safetensors", 1.0).result[0]
    run.info["before"] = args.before_label or os.path.basename(os.path.abspath(args.before))
    return [("before nf4+control", old_ctl, True), ("nf4+control", ctl, True),
            ("nf4", nf4, False), ("before nf4", old_nf4, False)]


def compiled_rounds(run, bf, ctl):
    """Compiled against compiled: each block one graph, bf16 and NF4 + Control, in paired rounds."""
    import torch._dynamo

    args, info = run.args, run.info
    if args.cpu:
        attention_for_compile_on_cpu()
    torch._dynamo.reset()
    bfc, ctlc = compiled_per_block(bf.clone()), compiled_per_block(ctl.clone())
    info["paired_compiled"] = paired_ratios(run.bench, bfc, [("nf4+control", ctlc, True)], run.log,
                                            rounds=args.rounds, prefix="paired compiled")
    info["paired_compiled_graph_breaks"] = sum(torch._dynamo.utils.counters.get("graph_break", {}).values())
    run.save()
