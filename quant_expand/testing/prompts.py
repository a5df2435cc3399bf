"""API-format prompt pieces for the pack's nodes, ComfyUI's stock nodes they are compared with, and the
in-process host's test nodes; and the error measure the comparisons use.

A prompt is ``{node_id: {"class_type": ..., "inputs": {...}}}``; a link to another node's output is
``[node_id, output_index]``. Builders return one node (put it under an id of your choosing), except
``sampling_graph``, which adds the nodes that sample a model and capture the latent. Nothing here imports
ComfyUI or torch (``rel_err`` takes torch tensors), so tests, the demo and bench/ build prompts before a host runs.
"""
from __future__ import annotations

import json


def rel_err(a, b) -> float:
    """Relative L2 error of whole tensors, ``||a - b|| / ||b||``, computed in float64.

    A zero reference ``b`` gives 0.0 when ``a`` is zero too and ``inf`` otherwise, so ``rel_err(x, x)``
    is 0.0 for every ``x`` and a nonzero ``a`` never passes ``rel_err(a, 0) < tol``."""
    a, b = a.double(), b.double()
    diff, ref = (a - b).norm().item(), b.norm().item()
    if ref == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / ref


def node(class_type: str, **inputs) -> dict:
    """One node of an API-format prompt."""
    return {"class_type": class_type, "inputs": inputs}


# --- the pack's nodes

def load_bnb_flux(unet_name: str, quant: str = "nf4", double_quant: bool = True, compute_dtype: str = "float32",
                  **optional) -> dict:
    """Load BnB Flux; ``optional``: its optional inputs (``quantize_img_in=...``), sent only when given."""
    return node("LoadBnbFlux", unet_name=unet_name, quant_type=quant, double_quant=double_quant,
                compute_dtype=compute_dtype, **optional)


def apply_lora(model_ref, lora_name: str, strength: float = 1.0) -> dict:
    """Apply Control LoRA (any LoRA, Control LoRA or not) on ``model_ref``."""
    return node("ApplyControlLora", model=model_ref, lora_name=lora_name, strength=strength)


def lora_stack(model_ref, *slots) -> dict:
    """Apply LoRA Stack; ``slots``: ``(lora_name, strength)`` or ``(lora_name, strength, on)``, from slot 1 on
    (the rest stay out of the prompt: optional inputs, empty by default)."""
    inputs = {"model": model_ref}
    for i, slot in enumerate(slots, start=1):
        name, strength, on = (*slot, True) if len(slot) == 2 else slot
        inputs.update({f"lora_{i}": name, f"strength_{i}": strength, f"on_{i}": on})
    return node("ApplyLoraStack", **inputs)


def set_lora_scale(model_ref, lora_name: str, strength: float) -> dict:
    """Set LoRA Scale: a new strength for a LoRA applied upstream by Apply Control LoRA."""
    return node("SetLoraScale", model=model_ref, lora_name=lora_name, strength=strength)


def save_bnb_flux(model_ref, filename_prefix: str) -> dict:
    """Save BnB Flux: the loaded model's quantized weights to a file under ComfyUI's output directory."""
    return node("SaveBnbFlux", model=model_ref, filename_prefix=filename_prefix)


# --- ComfyUI's stock nodes

def unet_loader(unet_name: str, weight_dtype: str = "default") -> dict:
    """ComfyUI's UNETLoader (Load Diffusion Model), full precision unless ``weight_dtype`` says otherwise."""
    return node("UNETLoader", unet_name=unet_name, weight_dtype=weight_dtype)


def stock_lora(model_ref, lora_name: str, strength: float) -> dict:
    """ComfyUI's LoraLoaderModelOnly."""
    return node("LoraLoaderModelOnly", model=model_ref, lora_name=lora_name, strength_model=strength)


def ksampler(model_ref, positive, negative, latent_image, *, seed: int = 0, steps: int = 2, cfg: float = 1.0) -> dict:
    """ComfyUI's KSampler: euler, simple scheduler, full denoise."""
    return node("KSampler", model=model_ref, seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                scheduler="simple", positive=positive, negative=negative, latent_image=latent_image, denoise=1.0)


# --- the in-process host's test nodes (quant_expand.testing.inprocess.TEST_NODES)

def linked_value(value) -> dict:
    """BnbFluxTestValue: ``value`` reaching an input through a link (ComfyUI checks only widget values
    against the input's schema)."""
    return node("BnbFluxTestValue", value=json.dumps(value))


def sampling_graph(model_nodes: dict, model_ref, *, seed=0, steps=2, size=16, cfg=1.0, key="out",
                   control_seed=None, cond_seed=1, context_dim=64, pooled_dim=64, prefix="s", channels=16):
    """``model_nodes`` plus nodes for: conditioning (+ optional control latent) -> KSampler on
    ``model_ref`` -> capture under ``key`` (ids start with ``prefix``, so several fit in one prompt).
    ``pooled_dim`` 0: no pooled vector (Chroma, FLUX.2); ``channels``: the latent's (FLUX.2: 128)."""
    g = dict(model_nodes)
    g[f"{prefix}_lat"] = node("BnbFluxTestLatent", seed=seed, size=size, scale=0.0, channels=channels)
    cond_inputs = {"seed": cond_seed, "tokens": 8, "context_dim": context_dim, "pooled_dim": pooled_dim, "guidance": 3.5}
    if control_seed is not None:
        g[f"{prefix}_ctl"] = node("BnbFluxTestLatent", seed=control_seed, size=size, scale=1.0)
        cond_inputs["control"] = [f"{prefix}_ctl", 0]
    g[f"{prefix}_pos"] = node("BnbFluxTestConditioning", **cond_inputs)
    g[f"{prefix}_neg"] = node("BnbFluxTestConditioning", **dict(cond_inputs, seed=cond_seed + 1000))
    g[f"{prefix}_ks"] = ksampler(model_ref, [f"{prefix}_pos", 0], [f"{prefix}_neg", 0], [f"{prefix}_lat", 0],
                                 seed=seed, steps=steps, cfg=cfg)
    g[f"{prefix}_cap"] = node("BnbFluxTestCapture", samples=[f"{prefix}_ks", 0], key=key)
    return g
