"""The demo: a tiny FLUX, Control LoRA and LoRA built here and sampled through ComfyUI, or the real files."""
from __future__ import annotations

import os
import tempfile
import time

from ..testing.inprocess import ComfyHost
from ..testing.prompts import (apply_lora, ksampler, load_bnb_flux, node, rel_err, sampling_graph, set_lora_scale,
                               stock_lora, unet_loader)
from ..testing.synthetic import (
    TinyFluxConfig,
    make_control_lora,
    make_lora,
    make_tiny_flux,
    save_safetensors,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def _rename(entry: dict, prefix: str) -> dict:
    inputs = {k: ([prefix + v[0], v[1]] if isinstance(v, list) else v) for k, v in entry["inputs"].items()}
    return node(entry["class_type"], **inputs)


def canny_graph(unet, lora, clip_l, t5, vae, image, prompt, *, quant="nf4", double_quant=True, strength=0.85,
                steps=20, seed=0, guidance=30.0, width_height=None, prefix="bnb_flux_canny"):
    """The real-files main job (API format): Load BnB Flux -> Apply Control LoRA -> KSampler with
    Canny edges of ``image`` through InstructPixToPixConditioning; text from CLIP-L + T5; VAE decode."""
    return {
        "unet": load_bnb_flux(unet, quant, double_quant, "auto"),
        "lora": apply_lora(["unet", 0], lora, strength),
        "clip": node("DualCLIPLoader", clip_name1=clip_l, clip_name2=t5, type="flux", device="default"),
        "pos": node("CLIPTextEncode", text=prompt, clip=["clip", 0]),
        "neg": node("CLIPTextEncode", text="", clip=["clip", 0]),
        "guid": node("FluxGuidance", conditioning=["pos", 0], guidance=guidance),
        "vae": node("VAELoader", vae_name=vae),
        "img": node("LoadImage", image=image),
        "canny": node("Canny", image=["img", 0], low_threshold=0.15, high_threshold=0.3),
        "ip2p": node("InstructPixToPixConditioning", positive=["guid", 0], negative=["neg", 0], vae=["vae", 0],
                     pixels=["canny", 0]),
        "ks": ksampler(["lora", 0], ["ip2p", 0], ["ip2p", 1], ["ip2p", 2], seed=seed, steps=steps),
        "dec": node("VAEDecode", samples=["ks", 0], vae=["vae", 0]),
        "save": node("SaveImage", images=["dec", 0], filename_prefix=prefix),
    }


def demo_real_files(args, comfy_path: str) -> int:
    """Run the Canny graph on the user's own files (found where they are: nothing is copied)."""
    paths = {"unet": args.unet, "lora": args.lora, "clip_l": args.clip_l, "t5": args.t5, "vae": args.vae,
             "image": args.image}
    missing = [f"--{k.replace('_', '-')}" for k, v in paths.items() if not v]
    if missing:
        raise SystemExit(f"real files mode needs {', '.join(missing)} as well")
    for k, v in paths.items():
        if not os.path.isfile(v):
            raise SystemExit(f"--{k.replace('_', '-')}: no such file: {v}")
    host = ComfyHost.start(comfy_path, REPO_ROOT, os.path.join(args.workdir or tempfile.mkdtemp(), "models"),
                           cpu=not args.gpu)
    import folder_paths

    for kind, key in (("diffusion_models", "unet"), ("loras", "lora"), ("text_encoders", "clip_l"),
                      ("text_encoders", "t5"), ("vae", "vae")):
        folder_paths.add_model_folder_path(kind, os.path.dirname(os.path.abspath(paths[key])))
    folder_paths.set_input_directory(os.path.dirname(os.path.abspath(args.image)))
    out_dir = args.workdir or os.getcwd()
    folder_paths.set_output_directory(out_dir)
    g = canny_graph(*(os.path.basename(paths[k]) for k in ("unet", "lora", "clip_l", "t5", "vae", "image")),
                    args.prompt, quant=args.quant, double_quant=args.double_quant, steps=args.steps)
    print("graph: LoadBnbFlux -> Apply Control LoRA -> KSampler <- InstructPixToPixConditioning(Canny(image)) "
          f"-> VAEDecode -> SaveImage ({args.steps} steps, {args.quant})")
    t0 = time.perf_counter()
    host.run(g)
    print(f"done in {time.perf_counter() - t0:.1f} s; image saved under {out_dir}")
    return 0


def demo(args) -> int:
    comfy_path = find_comfyui(args.comfyui)
    if args.unet or args.lora:
        return demo_real_files(args, comfy_path)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bnb-flux-demo-")
    models = os.path.join(workdir, "models")
    print(f"ComfyUI: {comfy_path}\nwork dir: {workdir}")

    cfg = TinyFluxConfig()
    exact = None if args.quant == "int8" else args.quant
    unet, control, style = "tiny_flux_dev.safetensors", "tiny_control_lora.safetensors", "tiny_style_lora.safetensors"
    sd = make_tiny_flux(cfg, seed=0, exact_for=args.quant if args.exact else None)
    save_safetensors(sd, os.path.join(models, "diffusion_models", unet))
    save_safetensors(make_control_lora(cfg, seed=2), os.path.join(models, "loras", control))
    save_safetensors(make_lora(cfg, kind="lora", seed=7), os.path.join(models, "loras", style))
    n_params = sum(t.numel() for t in sd.values())
    print(f"generated a tiny FLUX.1-dev ({n_params / 1e6:.1f} M parameters, hidden {cfg.hidden_size}, "
          f"{cfg.depth}+{cfg.depth_single_blocks} blocks{', weights exact for ' + exact if exact and args.exact else ''}), "
          f"a BFL-format Control LoRA (img_in 64->128) and a style LoRA")

    t0 = time.perf_counter()
    host = ComfyHost.start(comfy_path, REPO_ROOT, models, cpu=not args.gpu)
    print(f"started ComfyUI in-process with the pack loaded ({time.perf_counter() - t0:.1f} s)")

    bnb = {"m": load_bnb_flux(unet, args.quant, args.double_quant, "auto", quantize_img_in=args.quantize_img_in),
           "ctl": apply_lora(["m", 0], control, 1.0),
           "sty": apply_lora(["ctl", 0], style, 0.6),
           "scale": set_lora_scale(["sty", 0], control, 0.85)}
    ref = {"m": unet_loader(unet),
           "ctl": stock_lora(["m", 0], control, 0.85),
           "sty": stock_lora(["ctl", 0], style, 0.6)}
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
    info = host.pack_module("quant_expand.comfyui.report").load_report(host.node_output("q_m"))
    if info is not None:
        print(f"Load BnB Flux: {info.quant}, {info.quantized_layers} of {info.linear_layers} Linear layers "
              f"quantized, compute {info.compute_dtype}, model {info.size_bytes / 2**20:.2f} MiB "
              f"(float32: {n_params * 4 / 2**20:.2f} MiB)")
    print(f"executed 3 sampling branches in {elapsed:.1f} s")
    err = rel_err(out["bnb"], out["full"])
    ctl = rel_err(out["bnb_other_control"], out["bnb"])
    print(f"relative error, quantized vs ComfyUI full precision: {err:.2e}")
    print(f"output change when the control latent changes: {ctl:.2e} (the control image reaches the model)")
    if args.exact and args.quant != "int8" and not args.double_quant and err > 1e-4:
        print("UNEXPECTED: weights survive quantization exactly, the results should agree to float rounding")
        return 1
    return 0
