"""What each family's unquantized Linears buy (CPU; run: python bench/unquantized_choice.py --comfyui DIR).

``quant_expand/families.py`` keeps some Linears of each family in the compute dtype (embedders, output
layer, FLUX.2's shared modulation, Chroma's approximator). This measures the choice on ComfyUI's own model
of each family at full width (one double and one single block, random Gaussian weights, float32): the
output's relative error against the unquantized model with the pack's default, with every Linear quantized,
and with the default plus one kept group quantized, next to the bytes each group costs in bf16 and NF4.
Quantized here means bitsandbytes' NF4 round trip (blocksize 64, double quant), what Load BnB Flux's nf4
computes with. Random weights are not trained ones: the errors rank the groups, they are not image quality.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def gaussian_weights(sd: dict, gain) -> dict:
    """``sd`` with every Linear weight (2-D) redrawn from N(0, gain(name)^2 / in_features), stored in bf16
    as a file would hold it; norms and biases as they are."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for key, t in sd.items():
        if key.endswith(".weight") and t.ndim == 2:
            name = key[: -len(".weight")]
            t = torch.randn(t.shape, generator=g) * (gain(name) / math.sqrt(t.shape[1]))
        out[key] = t.to(torch.bfloat16)
    return out


def models():
    """(label, family key, BFL state dict, inputs builder) at full width, one block of each kind."""
    from quant_expand.testing.family_models import ChromaConfig, Flux2Config, make_chroma, make_flux2
    from quant_expand.testing.synthetic import TinyFluxConfig, make_tiny_flux

    def flux1_inputs(g):
        return dict(x=torch.randn(1, 16, 32, 32, generator=g), context=torch.randn(1, 64, 4096, generator=g),
                    y=torch.randn(1, 768, generator=g), guidance=torch.full((1,), 3.5))

    def flux2_inputs(ctx, guidance):
        def make(g):
            kw = dict(x=torch.randn(1, 128, 16, 16, generator=g), context=torch.randn(1, 64, ctx, generator=g))
            if guidance:
                kw["guidance"] = torch.full((1,), 4.0)
            return kw
        return make

    def chroma_inputs(g):
        return dict(x=torch.randn(1, 16, 32, 32, generator=g), context=torch.randn(1, 64, 4096, generator=g),
                    guidance=torch.zeros(1))

    flux1 = TinyFluxConfig(hidden_size=3072, depth=1, depth_single_blocks=1, in_channels=16, context_in_dim=4096,
                           vec_in_dim=768, guidance_embed=True)
    yield ("FLUX.1 dev (hidden 3072)", "flux1", gaussian_weights(make_tiny_flux(flux1), _flux1_gain), flux1_inputs)
    for label, h, ctx, guidance in (("FLUX.2 [klein] 4B (hidden 3072)", 3072, 7680, False),
                                    ("FLUX.2 [klein] 9B (hidden 4096)", 4096, 12288, False)):
        cfg = Flux2Config(hidden_size=h, context_in_dim=ctx, guidance=guidance)
        yield label, "flux2", gaussian_weights(make_flux2(cfg), _flux2_gain), flux2_inputs(ctx, guidance)
    chroma = ChromaConfig(context_in_dim=4096)
    yield "Chroma (hidden 3072)", "chroma", gaussian_weights(make_chroma(chroma), _chroma_gain), chroma_inputs


# the weights' scale per Linear, as the test models use (quant_expand/testing): modulation feeds (1 + scale),
# shifts and gates, and Chroma's approximator output is every block's modulation; smaller keeps activations bounded
def _flux1_gain(name):
    return 0.5 if "mod" in name else 1.0


def _flux2_gain(name):
    return 0.5 if "modulation" in name else 1.0


def _chroma_gain(name):
    return 0.1 if name == "distilled_guidance_layer.out_proj" else 1.0


def nf4_round_trip(w: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(w.float(), blocksize=64, compress_statistics=True, quant_type="nf4")
    return F.dequantize_4bit(packed, state).to(torch.bfloat16)


def measure(label: str, family_key: str, sd: dict, inputs) -> dict:
    import comfy.sd

    from quant_expand.families import BY_KEY
    from quant_expand.flux import default_should_quantize
    from quant_expand.spec import QuantSpec
    from quant_expand.testing.prompts import rel_err

    family = BY_KEY[family_key]
    spec = QuantSpec(quant_type="nf4", double_quant=True)
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.float32})
    dm = patcher.model.diffusion_model.float().cpu()
    linears = {n: m for n, m in dm.named_modules() if isinstance(m, torch.nn.Linear)}
    original = {n: sd[f"{n}.weight"] for n in linears}
    quantized = {n: nf4_round_trip(w) for n, w in original.items() if spec.can_quantize(w.shape[1])}
    default = {n for n in quantized if default_should_quantize(n, linears[n].in_features, spec, family=family)}
    groups = {p: {n for n in quantized if n.startswith(p)} for p in family.unquantized}
    groups = {p: names for p, names in groups.items() if names}

    g = torch.Generator().manual_seed(2)
    runs = [inputs(g) for _ in range(2)]
    timesteps = (torch.tensor([0.9]), torch.tensor([0.4]))

    def forward(names: set) -> list[torch.Tensor]:
        for n, m in linears.items():
            m.weight.data.copy_((quantized[n] if n in names else original[n]).float())
        with torch.inference_mode():
            return [dm(timestep=t, **kw).float() for kw, t in zip(runs, timesteps)]

    reference = forward(set())

    def err(names):
        return max(rel_err(a, b) for a, b in zip(forward(names), reference))

    def nbytes(names, bits):
        params = sum(linears[n].weight.numel() for n in names)
        return params * 2 if bits == 16 else params // 2 + params // 64 + params // 64 // 256 * 4

    row = {"model": label, "family": family.title, "kept": list(family.unquantized),
           "default_rel_err": err(default), "all_quantized_rel_err": err(set(quantized)),
           "kept_bf16_mib": round(nbytes(set(quantized) - default, 16) / 2**20, 1),
           "kept_nf4_mib": round(nbytes(set(quantized) - default, 4) / 2**20, 1),
           "quantized_share_of_params": round(sum(linears[n].weight.numel() for n in default)
                                              / sum(m.weight.numel() for m in linears.values()), 4),
           "groups": {}}
    for prefix, names in groups.items():
        row["groups"][prefix] = {"rel_err_if_quantized": err(default | names),
                                 "bf16_mib": round(nbytes(names, 16) / 2**20, 1),
                                 "nf4_mib": round(nbytes(names, 4) / 2**20, 1)}
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True, help="a ComfyUI tree (imported, not run)")
    ap.add_argument("--out", help="results JSON")
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.comfyui))
    import bitsandbytes
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # read by comfy.model_management at import: these models stay on the CPU
    import comfy.model_management  # noqa: F401

    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for label, family_key, sd, inputs in models():
        start = time.perf_counter()
        row = measure(label, family_key, sd, inputs)
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(f"{label}: default {row['default_rel_err']:.4f}, all quantized {row['all_quantized_rel_err']:.4f}, "
              f"kept {row['kept_bf16_mib']} MiB bf16 ({row['kept_nf4_mib']} MiB as nf4)", flush=True)
        for prefix, grp in row["groups"].items():
            print(f"    + {prefix:32s} quantized: {grp['rel_err_if_quantized']:.4f}  "
                  f"({grp['bf16_mib']} -> {grp['nf4_mib']} MiB)", flush=True)
    if args.out:
        info = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__, "rows": rows}
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
