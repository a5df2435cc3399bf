"""Command line of comfyui-bnb-flux.

    python -m quant_expand.cli demo [--comfyui PATH] [--workdir DIR] [--quant nf4|fp4|int8] [--gpu]
    python -m quant_expand.cli demo --gpu --unet FLUX --lora CANNY_LORA --clip-l F --t5 F --vae F --image IMG
    python -m quant_expand.cli quantize IN OUT [--quant nf4|fp4|int8] [--no-double-quant] [--quantize-img-in] [--device D]
    python -m quant_expand.cli inspect FILE
    python -m quant_expand.cli run WORKFLOW.json [--server URL] [--output-dir DIR]

``demo`` runs the pack's main job through ComfyUI's own executor: a Control-LoRA graph (Load BnB Flux
-> Control LoRA + style LoRA -> KSampler with a control latent) on a tiny FLUX it generates, next to
ComfyUI's full-precision path on the same weights, and prints what it did and how close they are.
Given real files, it runs the Canny Control-LoRA graph on them instead and saves the image.

``quantize`` writes a pre-quantized FLUX file (4-bit in the lllyasviel/Forge bnb key layout, int8 in
bitsandbytes' SCB layout) that Load BnB Flux reads without quantizing; ``inspect`` says what a file holds
and what Load BnB Flux would do with it. Neither needs ComfyUI.

``run`` submits an API-format workflow to a running ComfyUI server, prints its progress as the
websocket reports it and downloads the output files (standard library only, ``quant_expand.tools.client``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def quantize(args) -> int:
    from tqdm import tqdm

    import torch

    from .checkpoint.stored import default_quantize_device
    from .errors import BnbFluxError
    from .spec import QuantSpec
    from .tools.convert import inspect_file, quantize_file

    spec = QuantSpec(args.quant, args.double_quant)
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise SystemExit("OUT must differ from IN (IN is read while OUT is written)")
    t0 = time.perf_counter()
    try:
        device = default_quantize_device() if args.device == "auto" else torch.device(args.device)
        print(f"quantizing on {device}", file=sys.stderr)
        meta = quantize_file(args.input, args.output, spec, quantize_img_in=args.quantize_img_in, device=device,
                             progress=lambda n: tqdm(total=n, unit="layer", desc="quantizing", file=sys.stderr))
    except BnbFluxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} in {time.perf_counter() - t0:.1f} s "
          f"({meta['quantized_layers']} of {meta['linear_layers']} Linear layers quantized, {meta['quant_type']})")
    print(inspect_file(args.output))
    return 0


def inspect(args) -> int:
    from .errors import BnbFluxError
    from .tools.convert import inspect_file

    try:
        print(inspect_file(args.file))
    except BnbFluxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run(args) -> int:
    from .tools.client import ClientError, ComfyClient, load_api_workflow

    try:
        prompt = load_api_workflow(args.workflow)
        result = ComfyClient(args.server, timeout=args.timeout).run(prompt, args.output_dir)
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result["status"] != "success":
        print(f"error: {result['error']}", file=sys.stderr)
        return 1
    print(f"finished {result['prompt_id']}: {len(result['files'])} file(s) in {args.output_dir}")
    return 0


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
    real = d.add_argument_group("real files (instead of the generated tiny FLUX)")
    real.add_argument("--unet", help="FLUX.1-dev diffusion model safetensors")
    real.add_argument("--lora", help="Control LoRA, e.g. flux1-canny-dev-lora.safetensors")
    real.add_argument("--clip-l", help="CLIP-L text encoder")
    real.add_argument("--t5", help="T5-XXL text encoder")
    real.add_argument("--vae", help="FLUX VAE (ae.safetensors)")
    real.add_argument("--image", help="control image (its Canny edges guide the result)")
    real.add_argument("--prompt", default="a photograph of a house by a lake, golden hour")
    q = sub.add_parser("quantize", help="write a pre-quantized FLUX file that Load BnB Flux reads without quantizing")
    q.add_argument("input", metavar="IN", help="FLUX.1 safetensors (full precision or pre-quantized; BFL or diffusers "
                                               "names; a shard or the index of a sharded model)")
    q.add_argument("output", metavar="OUT", help="the .safetensors file to write")
    q.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "int8"])
    q.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="4-bit: keep the block scales in float32 (default: quantize them too, as Load BnB Flux does)")
    q.add_argument("--quantize-img-in", action="store_true", help="quantize img_in too (as the node's quantize_img_in)")
    q.add_argument("--device", default="auto", help="where to quantize: auto (the GPU if there is one, as Load BnB "
                                                    "Flux does; bnb's GPU and CPU kernels round a few values "
                                                    "differently), cpu, cuda, cuda:1, ...")
    i = sub.add_parser("inspect", help="say what a FLUX file holds and what Load BnB Flux would do with it")
    i.add_argument("file", metavar="FILE")
    r = sub.add_parser("run", help="submit an API-format workflow to a running ComfyUI, follow its progress over "
                                   "the websocket and save its output files")
    r.add_argument("workflow", metavar="WORKFLOW.json", help="API format (Workflow > Export (API); "
                                                            "example_workflows/api/)")
    r.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI's address (default %(default)s)")
    r.add_argument("--output-dir", default="comfyui-outputs", help="where output files go (default %(default)s)")
    r.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the server (default %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .tools.demo import demo

        return demo(args)
    if args.command == "quantize":
        return quantize(args)
    if args.command == "inspect":
        return inspect(args)
    if args.command == "run":
        return run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
