"""Command line of comfyui-bnb-flux.

    python -m quant_expand.cli demo [--comfyui PATH] [--workdir DIR] [--quant nf4|fp4|int8] [--gpu]
    python -m quant_expand.cli demo --gpu --unet FLUX --lora CANNY_LORA --clip-l F --t5 F --vae F --image IMG
    python -m quant_expand.cli quantize IN OUT [--quant nf4|fp4|int8] [--no-double-quant] [--quantize-img-in] [--device D]
                                       [--overwrite]
    python -m quant_expand.cli inspect FILE [--verify]
    python -m quant_expand.cli run WORKFLOW.json [--server URL] [--output-dir DIR]

``demo`` runs the pack's main job through ComfyUI's own executor: a Control-LoRA graph (Load BnB Flux
-> Control LoRA + style LoRA -> KSampler with a control latent) on a tiny FLUX it generates, next to
ComfyUI's full-precision path on the same weights, and prints what it did and how close they are.
Given real files, it runs the Canny Control-LoRA graph on them instead and saves the image.

``quantize`` writes a pre-quantized FLUX file (4-bit in the lllyasviel/Forge bnb key layout, int8 in
bitsandbytes' SCB layout) that Load BnB Flux reads without quantizing; ``inspect`` says what a file holds
(a FLUX model or a LoRA) and what the pack's nodes would do with it. Neither needs ComfyUI.

``run`` submits an API-format workflow to a running ComfyUI server, prints its progress as the
websocket reports it and downloads the output files (standard library only, ``quant_expand.tools.client``).

This module imports only the standard library at the top, so ``run`` starts without torch or bitsandbytes;
each other command imports what it needs.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

EXIT_CODES = """exit status: 0 done; 1 refused or failed ("error: ..." on stderr names the file or server and
what to do); 2 wrong arguments; 130 interrupted (Ctrl-C)."""

INSPECT_EXIT_CODES = """exit status: 0 the pack's nodes read the file (a FLUX model: Load BnB Flux; a LoRA: Apply Control
LoRA); 1 they refuse it: one line on stderr, "error: ...", with the message the node would give (not a FLUX
model, damaged, incomplete, an unsupported format); 2 wrong arguments."""

# bitsandbytes >= 0.50, on CPUs with AVX512-BF16, tries at import to fetch an optional CPU kernel for its fused
# 4-bit GEMV from the Hugging Face hub (the `kernels` package) and logs this when it cannot (package missing,
# offline, untrusted). It falls back to its built-in kernel, and the command line never runs that op (quantize
# and inspect do no matmul; the pack's CPU forward dequantizes and calls torch), so only this one message is
# dropped, only in this process; every other bitsandbytes warning still shows.
BNB_HUB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


def hide_bnb_hub_kernel_warning():
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not str(record.msg).startswith(BNB_HUB_KERNEL_WARNING))


def error(message) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_ERROR


def quantize(args) -> int:
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        return error(f"{args.output}: OUT must be another file than IN")
    if os.path.exists(args.output) and not args.overwrite:
        return error(f"{args.output} exists; pass --overwrite to replace it, or choose another OUT")
    from tqdm import tqdm

    import torch

    from .checkpoint.stored import default_quantize_device
    from .errors import BnbFluxError
    from .spec import QuantSpec
    from .tools.convert import inspect_file, quantize_file

    spec = QuantSpec(args.quant, args.double_quant)
    try:
        device = default_quantize_device() if args.device == "auto" else torch.device(args.device)
    except RuntimeError:
        return error(f"--device {args.device}: not a device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        return error(f"--device {args.device}: no such CUDA device here ({torch.cuda.device_count()} found); "
                     f"use --device cpu or auto")
    t0 = time.perf_counter()
    try:
        print(f"quantizing on {device}", file=sys.stderr)
        meta = quantize_file(args.input, args.output, spec, quantize_img_in=args.quantize_img_in, device=device,
                             progress=lambda n: tqdm(total=n, unit="layer", desc="quantizing", file=sys.stderr))
    except BnbFluxError as e:
        return error(e)
    except KeyboardInterrupt:
        print(f"interrupted: {args.output} was not written", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"wrote {args.output} in {time.perf_counter() - t0:.1f} s "
          f"({meta['quantized_layers']} of {meta['linear_layers']} Linear layers quantized, {meta['quant_type']})")
    print(inspect_file(args.output))
    return EXIT_OK


def inspect(args) -> int:
    from .errors import BnbFluxError
    from .tools.convert import inspect_file

    try:
        print(inspect_file(args.file, verify=args.verify))
    except BnbFluxError as e:
        return error(e)
    return EXIT_OK


def run(args) -> int:
    from .tools.client import ClientError, ComfyClient, load_api_workflow

    client = None
    try:
        prompt = load_api_workflow(args.workflow)
        client = ComfyClient(args.server, timeout=args.timeout)
        result = client.run(prompt, args.output_dir)
    except ClientError as e:
        return error(e)
    except KeyboardInterrupt:
        if client is not None and client.prompt_id is not None:
            print(f"interrupted: prompt {client.prompt_id} stays queued on {client.server} and runs to the end there; "
                  f"cancel it in ComfyUI's queue if you do not want it", file=sys.stderr)
        else:
            print("interrupted: nothing was queued", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result["status"] != "success":
        return error(result["error"])
    print(f"finished {result['prompt_id']}: {len(result['files'])} file(s) in {args.output_dir}")
    return EXIT_OK


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quant_expand.cli", description=__doc__.split("\n\n")[0],
                                     epilog=EXIT_CODES)
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
    real = d.add_argument_group("real files (instead of the generated tiny FLUX)")
    real.add_argument("--unet", help="FLUX.1-dev diffusion model safetensors")
    real.add_argument("--lora", help="Control LoRA, e.g. flux1-canny-dev-lora.safetensors")
    real.add_argument("--clip-l", help="CLIP-L text encoder")
    real.add_argument("--t5", help="T5-XXL text encoder")
    real.add_argument("--vae", help="FLUX VAE (ae.safetensors)")
    real.add_argument("--image", help="control image (its Canny edges guide the result)")
    real.add_argument("--prompt", default="a photograph of a house by a lake, golden hour")
    q = sub.add_parser("quantize", help="write a pre-quantized FLUX file that Load BnB Flux reads without quantizing",
                       epilog=EXIT_CODES)
    q.add_argument("input", metavar="IN", help="FLUX.1, FLUX.2 or Chroma safetensors (full precision or "
                                               "pre-quantized; BFL names, FLUX.1 also diffusers names; a shard or the "
                                               "index of a sharded model)")
    q.add_argument("output", metavar="OUT", help="the .safetensors file to write")
    q.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "int8"])
    q.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="4-bit: keep the block scales in float32 (default: quantize them too, as Load BnB Flux does)")
    q.add_argument("--quantize-img-in", action="store_true", help="quantize img_in too (as the node's quantize_img_in)")
    q.add_argument("--device", default="auto", help="where to quantize: auto (the GPU if there is one, as Load BnB "
                                                    "Flux does; bnb's GPU and CPU kernels round a few values "
                                                    "differently), cpu, cuda, cuda:1, ...")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (default: refuse). OUT is "
                                                             "written under a temporary name beside it and renamed "
                                                             "at the end, so an interrupted run leaves no partial file")
    i = sub.add_parser("inspect", help="say what a FLUX model or LoRA file holds and what the pack's nodes would do "
                                       "with it", epilog=INSPECT_EXIT_CODES)
    i.add_argument("file", metavar="FILE", help="a .safetensors file (a model, a shard or the index of a sharded "
                                                "model, or a LoRA)")
    i.add_argument("--verify", action="store_true", help="also read every tensor as Load BnB Flux does, to find "
                                                         "damaged values (NaN, inf, bad scales) that the header "
                                                         "cannot show; reads the whole file")
    r = sub.add_parser("run", help="submit an API-format workflow to a running ComfyUI, follow its progress over "
                                   "the websocket and save its output files", epilog=EXIT_CODES)
    r.add_argument("workflow", metavar="WORKFLOW.json", help="API format (Workflow > Export (API); "
                                                            "example_workflows/api/)")
    r.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI's address (default %(default)s)")
    r.add_argument("--output-dir", default="comfyui-outputs", help="where output files go (default %(default)s)")
    r.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the server (default %(default)s)")
    args = parser.parse_args(argv)
    hide_bnb_hub_kernel_warning()
    try:
        if args.command == "demo":
            from .tools.demo import demo

            return demo(args)
        if args.command == "quantize":
            return quantize(args)
        if args.command == "inspect":
            return inspect(args)
        if args.command == "run":
            return run(args)
    except KeyboardInterrupt:  # while a command imports torch, or in the demo
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
