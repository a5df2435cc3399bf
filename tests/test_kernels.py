"""quant_expand.backends.triton_dequant's 4-bit Triton kernel against bitsandbytes' own kernels.

On CUDA: the dequantized weight equals bnb's bit for bit for every 4-bit type, nesting, blocksize and
compute dtype, on shapes that fill no tile exactly; columns past the stored ones (a widened layer) are
+0.0; the merged LoRA epilogue equals ``W + scale * up @ down`` to the compute dtype's rounding. On a
machine without a GPU the same kernel runs in Triton's interpreter (float32 and float16, which numpy
has; the bit-exact comparison there is with bnb's CPU dequantize in float32).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from quant_expand.testing.prompts import rel_err

ROOT = Path(__file__).resolve().parent.parent
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton, bnb's CUDA kernels)")


def quantized(rows, cols, quant_type, nested, blocksize, dtype, device, seed=0):
    import bitsandbytes.functional as bnbf

    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * 0.02).to(device=device, dtype=dtype)
    w[0, :5] = 0
    return bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)


@cuda
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_dequantize_gives_bitsandbytes_bits(quant_type, nested, blocksize, dtype):
    import bitsandbytes.functional as bnbf

    from quant_expand.backends.triton_dequant import Dequant4bit

    dev = torch.device("cuda", torch.cuda.current_device())
    packed, qs = quantized(203, 7 * blocksize, quant_type, nested, blocksize, dtype, dev)
    assert Dequant4bit.supports(packed, qs, dtype) and Dequant4bit.verified(qs, dtype, dev)
    if dtype != torch.float32:
        assert Dequant4bit.epilogue_ok(dtype, dev, blocksize)
    ref = bnbf.dequantize_4bit(packed, qs).to(dtype)
    k = Dequant4bit(packed, qs)
    assert torch.equal(k.dequantize(), ref)
    wide = k.dequantize(7 * blocksize + 64)
    assert torch.equal(wide[:, :7 * blocksize], ref)
    assert torch.equal(wide[:, 7 * blocksize:].view(torch.int16 if dtype != torch.float32 else torch.int32),
                       torch.zeros(203, 64, dtype=torch.int16 if dtype != torch.float32 else torch.int32, device=dev))


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rank", [8, 128, 192])
@pytest.mark.parametrize("vector_scale", [False, True], ids=["uniform", "per-term"])
def test_merged_epilogue_adds_the_low_rank_product(dtype, rank, vector_scale):
    import bitsandbytes.functional as bnbf

    from quant_expand.backends.triton_dequant import Dequant4bit

    dev = torch.device("cuda", torch.cuda.current_device())
    packed, qs = quantized(3072 + 40, 1024, "nf4", True, 64, dtype, dev)  # rows past a tile
    ref = bnbf.dequantize_4bit(packed, qs).double()
    width = 1024 + 64  # a widened layer: the delta reaches the extra columns, the weight does not
    g = torch.Generator().manual_seed(1)
    down = (torch.randn(rank, width, generator=g) * 0.05).to(dev, dtype)
    up = (torch.randn(3112, rank, generator=g) * 0.05).to(dev, dtype)
    scale = (torch.rand(rank, generator=g) + 0.2).to(dev, dtype) if vector_scale else 0.8
    got = Dequant4bit(packed, qs).dequantize(width, down, up, scale)
    scaled_up = (up * scale).double() if vector_scale else 0.8 * up.double()
    exact = torch.nn.functional.pad(ref, (0, 64)) + scaled_up @ down.double()
    eps = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11  # one rounding to the compute dtype
    assert rel_err(got, exact) < eps
    assert rel_err(got[:, 1024:], exact[:, 1024:]) < eps


def test_epilogue_only_where_a_tile_fits():
    """The merged-LoRA epilogue is offered for 16-bit dtypes and blocksizes up to 512 (a tile is at
    least one quantization block wide; wider ones need more shared memory than GPUs have)."""
    from quant_expand.backends.triton_dequant import Dequant4bit

    cpu = torch.device("cpu")
    assert not Dequant4bit.epilogue_ok(torch.float32, cpu, 64)
    assert not Dequant4bit.epilogue_ok(torch.bfloat16, cpu, 1024)
    assert not Dequant4bit.epilogue_ok(torch.float16, cpu, 4096)


def test_kernel_logic_in_the_triton_interpreter(tmp_path):
    """CPU: the kernel source runs in Triton's interpreter, against bnb's CPU dequantize in float32
    (bit for bit; in float16 against that, rounded once) and a float64 reference for the merged epilogue."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (CPU-only torch): the CUDA tests cover the kernel on a GPU")
    script = textwrap.dedent("""
        import copy, sys, torch, bitsandbytes.functional as bnbf
        import triton, triton.language as tl
        from quant_expand.backends.triton_dequant import Dequant4bit
        from quant_expand.testing.prompts import rel_err

        @triton.jit
        def probe(x_ptr, n, B: tl.constexpr):
            for i in range(0, n, B):
                tl.store(x_ptr + i + tl.arange(0, B), tl.full((B,), 1.0, tl.float32))

        x = torch.zeros(8)
        try:  # some Triton/numpy pairs cannot interpret a loop over a runtime bound (the epilogue has one)
            probe[(1,)](x, 8, B=4)
        except Exception as e:
            print(f"interpreter unusable: Triton {triton.__version__}: {type(e).__name__}: {str(e)[-200:]}")
            sys.exit(0)
        assert bool((x == 1).all())
        torch.manual_seed(0)
        for qt in ("nf4", "fp4"):
            for nested in (False, True):
                for dt in (torch.float32, torch.float16):
                    w = torch.randn(72, 320) * 0.02
                    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=qt)
                    # bnb's CPU kernels round float16 in their own way on some CPUs; its float32 products,
                    # rounded once, are what its CUDA kernel (and this one) give
                    ref = bnbf.dequantize_4bit(packed, qs).to(dt)
                    qs = copy.copy(qs)
                    qs.dtype = dt
                    k = Dequant4bit(packed, qs)
                    assert torch.equal(k.dequantize(), ref), (qt, nested, dt)
                    wide = k.dequantize(384)
                    assert torch.equal(wide[:, :320], ref) and not wide[:, 320:].any()
                    assert not torch.signbit(wide[:, 320:]).any()
                    if dt == torch.float16:
                        down = torch.randn(40, 384, dtype=dt) * 0.1
                        up = torch.randn(72, 40, dtype=dt) * 0.1
                        for scale in (0.7, torch.rand(40, dtype=dt)):
                            got = k.dequantize(384, down, up, scale).double()
                            s_up = up.double() * (scale.double() if torch.is_tensor(scale) else scale)
                            exact = torch.nn.functional.pad(ref.double(), (0, 64)) + s_up @ down.double()
                            assert rel_err(got, exact) < 2e-3, (qt, nested)
        assert Dequant4bit.epilogue_ok(torch.float16, torch.device("cpu"), 64)
        assert Dequant4bit.epilogue_ok(torch.float16, torch.device("cpu"), 512)
        # a quantization block wider than a plain tile's column budget: one block per tile row
        w = torch.randn(5, 4096) * 0.02
        packed, qs = bnbf.quantize_4bit(w, blocksize=2048, compress_statistics=True, quant_type="nf4")
        assert torch.equal(Dequant4bit(packed, qs).dequantize(), bnbf.dequantize_4bit(packed, qs))
        # factors that do not fit the weight are refused, not read out of bounds
        k = Dequant4bit(packed, qs)
        for down, up, scale in ((torch.zeros(8, 4096), torch.zeros(6, 8), 1.0),
                                (torch.zeros(8, 4000), torch.zeros(5, 8), 1.0),
                                (torch.zeros(8, 4096), torch.zeros(5, 8), torch.ones(7))):
            try:
                k.dequantize(4096, down, up, scale)
            except ValueError:
                continue
            raise AssertionError((down.shape, up.shape))
        print("interpreter ok")
    """)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    if "interpreter unusable" in out.stdout:
        pytest.skip(out.stdout.strip().splitlines()[-1] + " (the CUDA tests run the kernel on a GPU)")
    assert out.returncode == 0 and "interpreter ok" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
