"""torch.compile as the compiled rows use it: every FLUX block one graph through ComfyUI's own compile
wrapper, and PyTorch's attention for a CPU dry run."""
from __future__ import annotations


def attention_for_compile_on_cpu():
    """ComfyUI's CPU attention asks psutil for free memory inside every block (a graph break of
    ComfyUI's own); a CPU dry run of the compiled rows uses PyTorch's attention, which GPUs run."""
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention as attention

    comfy.ldm.flux.math.optimized_attention = attention.attention_pytorch


def compiled_per_block(patcher):
    """``patcher`` with every FLUX block compiled as one graph (ComfyUI's ``set_torch_compile_wrapper``,
    inductor, ``fullgraph=True``: any graph break inside a block raises)."""
    from comfy_api.torch_helpers.torch_compile import set_torch_compile_wrapper

    dm = patcher.get_model_object("diffusion_model")
    keys = [f"diffusion_model.double_blocks.{i}" for i in range(len(dm.double_blocks))] + \
           [f"diffusion_model.single_blocks.{i}" for i in range(len(dm.single_blocks))]
    set_torch_compile_wrapper(patcher, backend="inductor", fullgraph=True, keys=keys)
    return patcher
