"""Helpers shared by the ComfyUI tests (the in-process host is the pack's own, also behind the demo)."""
from quant_expand.testing.inprocess import CAPTURED, ComfyHost, TEST_NODES, sample_direct  # noqa: F401


def denoise_once(patcher, context_dim=64, vec_dim=64, size=16, seed=5, control=False):
    """One call of the FLUX denoiser (BaseModel.apply_model) with the patcher's current loading (no
    model management: whatever the patcher placed where stays there); ``control``: with a control latent
    (what InstructPixToPixConditioning adds for a Control LoRA's widened img_in)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, size, size, generator=g)
    ctx, pooled = torch.randn(1, 8, context_dim, generator=g), torch.randn(1, vec_dim, generator=g)
    extra = {"c_concat": torch.randn(1, 16, size, size, generator=g)} if control else {}
    with torch.inference_mode():
        return patcher.model.apply_model(x, torch.tensor([0.7]), c_crossattn=ctx, y=pooled,
                                         guidance=torch.tensor([3.5]), **extra)


def quantized_hash(host, patcher) -> str:
    """Digest of every quantized byte of a loaded model, through the pack's module as ComfyUI loaded it."""
    return host.pack_module("quant_expand.layer_state").quantized_digest(patcher.model.diffusion_model)
