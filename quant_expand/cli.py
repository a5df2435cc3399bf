"""Command line of comfyui-bnb-flux.

    python -m quant_expand.cli demo [--comfyui PATH] [--workdir DIR] [--quant nf4|fp4|int8] [--gpu]

``demo`` runs the pack's main job through ComfyUI's own executor: a Control-LoRA graph (Load BnB Flux
-> Control LoRA + style LoRA -> KSampler with a control latent) on a tiny FLUX it generates, next to
ComfyUI's full-precision path on the same weights, and prints what it did and how close they are.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_comfyui(explicit: str | None) -> str:
    """``--comfyui``, else ``COMFYUI_PATH``, else the ComfyUI whose ``custom_nodes`` holds this pack."""
    candidates = [explicit, os.environ.get("COMFYUI_PATH")]
    parent = os.path.dirname(REPO_ROOT)
    if os.path.basename(parent) == "custom_nodes":
        candidates.append(os.path.dirname(parent))
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "comfy", "model_patcher.py")):
            return os.path.abspath(c)
    tried = ", ".join(repr(c) for c in candidates if c) or "nothing"
    raise SystemExit(f"ComfyUI not found (tried {tried}). Pass --comfyui /path/to/ComfyUI, set COMFYUI_PATH, "
                     f"or clone this pack into ComfyUI/custom_nodes/.")


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def demo(args) -> int:
    comfy_path = find_comfyui(args.comfyui)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bnb-flux-demo-")
    models = os.path.join(workdir, "models")
    print(f"ComfyUI: {comfy_path}\nwork dir: {workdir}")

    from .synthetic import TinyFluxConfig, make_control_lora, make_lora, make_tiny_flux, save_safetensors

    cfg = TinyFluxConfig()
    exact = None if args.quant == "int8" else args.quant
    unet = "tiny_flux_dev.safetensors"
    sd = make_tiny_flux(cfg, seed=0, exact_for=args.quant if args.exact else None)
    save_safetensors(sd, os.path.join(models, "diffusion_models", unet))
    save_safetensors(make_control_lora(cfg, seed=2), os.path.join(models, "loras", "tiny_control_lora.safetensors"))
    save_safetensors(make_lora(cfg, kind="lora", seed=7), os.path.join(models, "loras", "tiny_style_lora.safetensors"))
    n_params = sum(t.numel() for t in sd.values())
    print(f"generated a tiny FLUX.1-dev ({n_params / 1e6:.1f} M parameters, hidden {cfg.hidden_size}, "
          f"{cfg.depth}+{cfg.depth_single_blocks} blocks{', weights exact for ' + exact if exact and args.exact else ''}), "
          f"a BFL-format Control LoRA (img_in 64->128) and a style LoRA")

    from .inprocess import ComfyHost, sampling_graph

    t0 = time.perf_counter()
    host = ComfyHost.start(comfy_path, REPO_ROOT, models, cpu=not args.gpu)
    print(f"started ComfyUI in-process with the pack loaded ({time.perf_counter() - t0:.1f} s)")

    def node(cls, **inputs):
        return {"class_type": cls, "inputs": inputs}

    bnb = {"m": node("LoadBnbFlux", unet_name=unet, quant_type=args.quant, double_quant=args.double_quant,
                     compute_dtype="auto", quantize_img_in=args.quantize_img_in),
           "ctl": node("ApplyControlLora", model=["m", 0], lora_name="tiny_control_lora.safetensors", strength=1.0),
           "sty": node("ApplyControlLora", model=["ctl", 0], lora_name="tiny_style_lora.safetensors", strength=0.6),
           "scale": node("SetLoraScale", model=["sty", 0], lora_name="tiny_control_lora.safetensors", strength=0.85)}
    ref = {"m": node("UNETLoader", unet_name=unet, weight_dtype="default"),
           "ctl": node("LoraLoaderModelOnly", model=["m", 0], lora_name="tiny_control_lora.safetensors", strength_model=0.85),
           "sty": node("LoraLoaderModelOnly", model=["ctl", 0], lora_name="tiny_style_lora.safetensors", strength_model=0.6)}
    size = 32
    g = sampling_graph({f"q_{k}": _rename(v, "q_") for k, v in bnb.items()}, ["q_scale", 0], key="bnb",
                       size=size, steps=args.steps, control_seed=42, prefix="a")
    g = sampling_graph({**g, **{f"r_{k}": _rename(v, "r_") for k, v in ref.items()}}, ["r_sty", 0], key="full",
                       size=size, steps=args.steps, control_seed=42, prefix="b")
    g = sampling_graph(g, ["q_scale", 0], key="bnb_other_control", size=size, steps=args.steps, control_seed=43, prefix="c")
    print("graph: LoadBnbFlux -> Apply Control LoRA(control, 1.0) -> Apply Control LoRA(style, 0.6) -> Set LoRA Scale"
          f"(control, 0.85) -> KSampler (euler, {args.steps} steps, cfg 1, {size * 8}x{size * 8} px, control latent)\n"
          "   vs: UNETLoader (full precision, same file) -> LoraLoaderModelOnly(control, 0.85) -> (style, 0.6) -> same KSampler")
    t0 = time.perf_counter()
    out = host.run(g)
    elapsed = time.perf_counter() - t0
    info = getattr(host.node_output("q_m"), "bnb_info", None)
    if info:
        print(f"Load BnB Flux: {info['quant']}, {info['quantized_layers']} of {info['linear_layers']} Linear layers "
              f"quantized, compute {info['compute_dtype']}, model {info['size_bytes'] / 2**20:.2f} MiB "
              f"(float32: {n_params * 4 / 2**20:.2f} MiB)")
    print(f"executed 3 sampling branches in {elapsed:.1f} s")
    err = _rel(out["bnb"], out["full"])
    ctl = _rel(out["bnb_other_control"], out["bnb"])
    print(f"relative error, quantized vs ComfyUI full precision: {err:.2e}")
    print(f"output change when the control latent changes: {ctl:.2e} (the control image reaches the model)")
    if args.exact and args.quant != "int8" and not args.double_quant and err > 1e-4:
        print("UNEXPECTED: weights survive quantization exactly, the results should agree to float rounding")
        return 1
    return 0


def _rename(node: dict, prefix: str) -> dict:
    inputs = {k: ([prefix + v[0], v[1]] if isinstance(v, list) else v) for k, v in node["inputs"].items()}
    return {"class_type": node["class_type"], "inputs": inputs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quant_expand.cli", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run a Control-LoRA graph through ComfyUI on a generated tiny FLUX")
    d.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH or the ComfyUI this pack is installed in)")
    d.add_argument("--workdir", help="where to write the generated models (default: a new temp dir)")
    d.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "int8"])
    d.add_argument("--double-quant", action="store_true", help="4-bit: quantize the block scales too")
    d.add_argument("--no-exact", dest="exact", action="store_false",
                   help="random weights instead of weights that survive quantization exactly")
    d.add_argument("--keep-img-in", dest="quantize_img_in", action="store_false",
                   help="leave img_in unquantized (default: quantize it too, so the Control LoRA widens a 4-bit layer)")
    d.add_argument("--steps", type=int, default=4)
    d.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (default: --cpu)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
