"""Core layers with real bitsandbytes on CPU (no ComfyUI): shapes, exact dequantization, forward, moves.

Exactness: weights from ``synthetic.exact_4bit`` / ``exact_int8`` survive quantization bit for bit, so
dequantization is compared with ``torch.equal``; forwards are compared with our own float32 matmul of
the dequantized weight (bnb's CPU forward computes in bf16 and repacks the weight in place).
"""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from quant_expand import LazyLoraDelta, LoraTerm, QLinear4bit, QLinear8bit, QuantSpec, QuantSpecError
from quant_expand.layer_state import dequantized_state_dict, quantized_bytes
from quant_expand.tuning import TUNING
from quant_expand.layers import quantized_linear_from_float
from quant_expand.testing.prompts import rel_err
from quant_expand.testing.synthetic import exact_4bit, exact_int8

SPECS = [QuantSpec("nf4", False), QuantSpec("nf4", True), QuantSpec("fp4", False), QuantSpec("fp4", True),
         QuantSpec("int8")]


def exact_weight(spec, out_f=192, in_f=128, seed=0):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) / in_f ** 0.5
    return exact_int8(w) if spec.quant_type == "int8" else exact_4bit(w, spec.quant_type)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_logical_shape_and_storage(spec):
    w = exact_weight(spec)
    layer = quantized_linear_from_float(w, torch.zeros(192), spec)
    assert isinstance(layer, QLinear4bit if spec.is_4bit else QLinear8bit)
    assert layer.weight.shape == (192, 128)  # what ComfyUI reads
    if spec.is_4bit:
        assert layer.weight.data.shape == (192 * 128 // 2, 1) and layer.weight.dtype == torch.uint8
        assert layer.weight.quant_state.nested == spec.double_quant
        assert layer.weight.quant_state.quant_type == spec.quant_type
    else:
        assert layer.weight.dtype == torch.int8 and layer.weight.SCB.shape == (192,)
    # detach (used by state_dict) is the stored tensor: byte-true sizes and files
    assert layer.weight.detach().shape == layer.weight.data.shape


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_dequantize_is_exact_for_exact_weights(spec):
    w = exact_weight(spec)
    layer = quantized_linear_from_float(w, None, spec)
    deq = layer.dequantize(dtype=torch.float32)
    if spec.double_quant:  # absmax itself is 8-bit quantized: close, not exact
        assert 0 < rel_err(deq, w) < 2e-2
    else:
        assert torch.equal(deq, w)


def test_generic_weights_do_not_survive_exactly():
    # negative control: the exactness above comes from the weights, not from a no-op quantizer
    w = torch.randn(64, 128)
    for spec in (QuantSpec("nf4", False), QuantSpec("int8")):
        assert not torch.equal(quantized_linear_from_float(w, None, spec).dequantize(dtype=torch.float32), w)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_forward_equals_matmul_of_dequantized_weight(spec):
    layer = quantized_linear_from_float(exact_weight(spec), torch.randn(192), spec)
    x = torch.randn(2, 7, 128)
    expected = F.linear(x, layer.dequantize(dtype=torch.float32), layer.bias)
    before = {k: v.clone() for k, v in quantized_bytes(layer).items()}
    assert torch.equal(layer(x), expected)
    # forward never repacks or rewrites the stored bytes (bnb's CPU forward would)
    assert all(torch.equal(before[k], v) for k, v in quantized_bytes(layer).items())


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_bf16_forward_close_to_float32(spec):
    layer = quantized_linear_from_float(exact_weight(spec), None, spec.with_compute_dtype(torch.bfloat16))
    x = torch.randn(4, 128)
    ref = F.linear(x, layer.dequantize(dtype=torch.float32))
    assert rel_err(layer(x.bfloat16()).float(), ref) < 1e-2  # bf16 has 8 mantissa bits (~4e-3 per rounding)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_module_moves_keep_bytes_and_ignore_dtype_casts(spec):
    layer = quantized_linear_from_float(exact_weight(spec), torch.randn(192), spec)
    before = {k: v.clone() for k, v in quantized_bytes(layer).items()}
    x = torch.randn(3, 128)
    layer.to(torch.float16)  # a model-wide cast must not cast packed bytes
    assert layer.weight.dtype == (torch.uint8 if spec.is_4bit else torch.int8)
    assert layer.bias.dtype == torch.float16
    layer.to(torch.float32).to("cpu")
    assert all(torch.equal(before[k], v) for k, v in quantized_bytes(layer).items())
    # the bias went through float16 and back; the weight did not move at all
    assert torch.equal(layer(x), F.linear(x, exact_weight(spec) if not spec.double_quant else layer.dequantize(), layer.bias))


def test_transient_device_copy_does_not_touch_shared_state():
    spec = QuantSpec("nf4", True)
    layer = quantized_linear_from_float(exact_weight(spec), None, spec)
    qs = layer.weight.quant_state
    ids = (id(qs.absmax), id(qs.state2.absmax), qs.dtype)
    layer.dequantize_stored(torch.device("cpu"), torch.bfloat16)
    assert (id(qs.absmax), id(qs.state2.absmax), qs.dtype) == ids


def test_deepcopy_and_state_dict_roundtrip_keys():
    spec = QuantSpec("nf4", True)
    layer = quantized_linear_from_float(exact_weight(spec), torch.randn(192), spec)
    keys = set(layer.state_dict())
    assert {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"} <= keys
    clone = copy.deepcopy(layer)
    assert torch.equal(clone.dequantize(), layer.dequantize())
    int8 = quantized_linear_from_float(exact_weight(QuantSpec("int8")), None, QuantSpec("int8"))
    assert {"weight", "SCB", "weight_format"} <= set(int8.state_dict())


def test_spec_validation():
    with pytest.raises(QuantSpecError, match="unknown quant_type"):
        QuantSpec("nf5")
    with pytest.raises(QuantSpecError, match="blocksize"):
        QuantSpec("nf4", blocksize=48)


# -- lazy LoRA deltas ---------------------------------------------------------------------------

def make_terms(out_f=192, in_f=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [LoraTerm(torch.randn(4, in_f, generator=g), torch.randn(out_f, 4, generator=g) * 0.1, 0.7),
            LoraTerm(torch.randn(2, in_f, generator=g), torch.randn(64, 2, generator=g) * 0.1, -1.3, row_offset=64)]


def merged_reference(layer, terms):
    w = layer.dequantize(dtype=torch.float64)
    for t in terms:
        w[t.row_offset:t.row_offset + t.up.shape[0]] += t.scale * (t.up.double() @ t.down.double())
    return w


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("tokens", [3, 4096])  # few tokens: unmerged B(Ax); many: merged into W
def test_lazy_delta_matches_merged_weight(spec, tokens):
    layer = quantized_linear_from_float(exact_weight(spec), torch.randn(192), spec)
    terms = make_terms()
    layer.lora_delta = LazyLoraDelta(192, 128, terms)
    assert layer.lora_delta.prefer_merged(tokens) == (tokens > 192 * 128 / (192 + 128))
    before = {k: v.clone() for k, v in quantized_bytes(layer).items()}
    x = torch.randn(1, tokens, 128)
    y = layer(x)
    ref = F.linear(x.double(), merged_reference(layer, terms), layer.bias.double())
    assert rel_err(y.double(), ref) < 1e-6  # float32 vs float64: only rounding differs
    assert all(torch.equal(before[k], v) for k, v in quantized_bytes(layer).items())
    layer.lora_delta = None
    assert torch.equal(layer(x), F.linear(x, layer.dequantize(dtype=torch.float32), layer.bias))


@pytest.mark.parametrize("spec", [QuantSpec("nf4", True), QuantSpec("int8")], ids=str)
@pytest.mark.parametrize("tokens", [3, 4096])
def test_forward_traces_as_one_graph(spec, tokens):
    """torch.compile (dynamo, fullgraph=True: a graph break raises) traces the forward with a lazy delta
    on both paths and without one, and gives the eager result. The "eager" backend needs no compiler; the
    full inductor run through ComfyUI is tests/test_compile.py."""
    torch._dynamo.reset()
    layer = quantized_linear_from_float(exact_weight(spec), torch.randn(192), spec)
    x = torch.randn(1, tokens, 128)
    for delta in (LazyLoraDelta(192, 128, make_terms(), bias=torch.randn(192)), None):
        layer.lora_delta = delta
        eager = layer(x)  # looks the run state up (at load time in ComfyUI), as a loaded model has it
        compiled = torch.compile(layer, backend="eager", fullgraph=True, dynamic=False)
        assert torch.equal(compiled(x), eager)
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_bias_delta_rounds_once_from_float32(dtype):
    """The summed bias delta is formed in float32 and rounded once to the compute dtype; with one term in
    that dtype it takes one kernel, which must give the same bits."""
    g = torch.Generator().manual_seed(3)
    b1, b2 = (torch.randn(4099, generator=g) * 3).to(dtype), (torch.randn(4099, generator=g) * 3).to(dtype)
    cpu = torch.device("cpu")
    for scale in (0.7, -1.3, 0.123456789, 1e-3):
        one = LazyLoraDelta(4099, 8, bias_terms=[(b1, scale)]).bias_on(cpu, dtype)
        assert torch.equal(one, (b1.float() * scale).to(dtype))
        two = LazyLoraDelta(4099, 8, bias_terms=[(b1, scale), (b2, 0.5)]).bias_on(cpu, dtype)
        assert torch.equal(two, (b1.float() * scale + b2.float() * 0.5).to(dtype))
    wider = LazyLoraDelta(4099, 8, bias_terms=[(b1.float(), 0.7)]).bias_on(cpu, dtype)  # file dtype != compute
    assert torch.equal(wider, (b1.float() * 0.7).to(dtype))


def test_lazy_delta_bias_and_weight_fn():
    spec = QuantSpec("fp4", False)
    layer = quantized_linear_from_float(exact_weight(spec), None, spec)
    extra = torch.randn(192, 128) * 0.01
    bias = torch.randn(192)
    layer.lora_delta = LazyLoraDelta(192, 128, make_terms(), weight_fn=lambda w: w + extra, bias=bias)
    x = torch.randn(5, 128)
    ref = F.linear(x.double(), merged_reference(layer, make_terms()) + extra.double(), bias.double())
    assert rel_err(layer(x).double(), ref) < 1e-6


@pytest.mark.parametrize("tokens", [3, 4096])
def test_lazy_delta_uniform_and_per_term_scales(tokens):
    """One strength for every term rides on the GEMM's alpha (a float); different strengths need the
    scale vector. Both give the merged reference, and a cached base + delta bias follows a new base."""
    spec = QuantSpec("nf4", True)
    layer = quantized_linear_from_float(exact_weight(spec), torch.randn(192), spec)
    x = torch.randn(1, tokens, 128)
    for scales in ([0.7, 0.7], [0.7, -1.3]):
        terms = [replace(t, scale=s) for t, s in zip(make_terms(), scales)]
        bias_delta = torch.randn(192)
        layer.lora_delta = LazyLoraDelta(192, 128, terms, bias=bias_delta)
        scale = layer.lora_delta.stacked(torch.device("cpu"), torch.float32)[2]
        assert isinstance(scale, float) == (scales[0] == scales[1])
        ref = F.linear(x.double(), merged_reference(layer, terms), (layer.bias + bias_delta).double())
        assert rel_err(layer(x).double(), ref) < 1e-6
        layer.bias = torch.nn.Parameter(layer.bias.detach() * 2, requires_grad=False)  # a merged bias patch
        ref = F.linear(x.double(), merged_reference(layer, terms), (layer.bias + bias_delta).double())
        assert rel_err(layer(x).double(), ref) < 1e-6


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_forward_dequantizes_like_bitsandbytes(spec):
    """The forward calls bnb's kernels directly: the weight it uses equals bnb's own dequantize_4bit
    bit for bit (generic weights, so every code and nested absmax path is exercised)."""
    import bitsandbytes.functional as bnbf

    from quant_expand.backends.bnb_cuda import dequantize_4bit_unchecked

    w = torch.randn(192, 128, generator=torch.Generator().manual_seed(3))
    layer = quantized_linear_from_float(w, None, spec)
    run = layer._run_state(torch.device("cpu"), torch.float32)
    if spec.is_4bit:
        assert torch.equal(dequantize_4bit_unchecked(layer.weight.data, layer.weight.quant_state),
                           bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    assert torch.equal(run.dequantize(), layer.dequantize_stored("cpu", torch.float32))
    x = torch.randn(4, 128)
    y = layer(x)
    assert torch.equal(y, F.linear(x, layer.dequantize_stored("cpu", torch.float32)))
    # a copy looks its own tensors up: changing the copy's bytes changes the copy's output only
    twin = copy.deepcopy(layer)
    assert twin.__dict__.get("_run") is None
    twin.weight.data.zero_()
    assert torch.equal(layer(x), y) and not torch.equal(twin(x), y)
    # a move drops the run state (it would keep the old placement's tensors alive)
    layer.to(torch.device("cpu"), torch.float16)
    assert layer.__dict__.get("_run") is None
    assert torch.equal(layer(x), y)


def test_lazy_delta_rejects_terms_that_do_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        LazyLoraDelta(64, 128, [LoraTerm(torch.randn(4, 128), torch.randn(65, 4), 1.0)])


def test_dequantized_state_dict_names_every_parameter():
    spec = QuantSpec("nf4", False)
    root = torch.nn.Module()
    root.q = quantized_linear_from_float(exact_weight(spec), torch.randn(192), spec)
    root.norm = torch.nn.LayerNorm(128)
    sd = dequantized_state_dict(root)
    assert set(sd) == {"q.weight", "q.bias", "norm.weight", "norm.bias"}
    assert torch.equal(sd["q.weight"], exact_weight(spec))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bnb's CUDA kernels)")
@pytest.mark.parametrize("spec", [s for s in SPECS if s.is_4bit], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_kernels_called_directly_match_bitsandbytes(spec, dtype):
    """On CUDA the forward calls bnb's kernels through its ctypes entry points: the dequantized weight
    equals bnb's dequantize_4bit bit for bit, and the fused few-token path (FLUX's modulation layers)
    equals a matmul of that weight to the kernel's rounding. Lazy deltas ride on both paths."""
    import bitsandbytes.functional as bnbf

    from quant_expand.layers import _SMALL_M

    w = torch.randn(3072, 1024, generator=torch.Generator().manual_seed(4)) * 0.02
    layer = quantized_linear_from_float(w, torch.randn(3072) * 0.1, spec.with_compute_dtype(dtype),
                                        store_device="cuda").to("cuda")
    dev = torch.device("cuda", torch.cuda.current_device())
    run = layer._run_state(dev, dtype)
    assert run.small_matmul is not None
    ref_w = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
    assert torch.equal(run.dequantize(), ref_w)
    bias = layer.bias.detach()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for tokens in (1, _SMALL_M, _SMALL_M + 1, 300):
        x = torch.randn(1, tokens, 1024, device="cuda", dtype=dtype)
        ref = F.linear(x.float(), ref_w.float(), bias.float())
        assert rel_err(layer(x).float(), ref) < tol, tokens
    terms = [LoraTerm(torch.randn(16, 1024) * 0.05, torch.randn(3072, 16) * 0.05, 0.8)]
    layer.lora_delta = LazyLoraDelta(3072, 1024, terms)
    full = ref_w.float() + 0.8 * (terms[0].up.cuda() @ terms[0].down.cuda())
    # 2048 tokens take the merged path: in one Triton kernel for 16-bit dtypes, else dequantize + addmm_
    assert (run.merged is not None) == (dtype == torch.bfloat16)
    for tokens in (1, 300, 2048):
        x = torch.randn(1, tokens, 1024, device="cuda", dtype=dtype)
        assert rel_err(layer(x).float(), F.linear(x.float(), full, bias.float())) < tol, tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["promote", "cast", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_int8_dequantize_modes_give_the_same_bits(mode, dtype, monkeypatch):
    w = torch.randn(3072, 1024, generator=torch.Generator().manual_seed(6)) * 0.02
    layer = quantized_linear_from_float(w, None, QuantSpec("int8", compute_dtype=dtype), store_device="cuda").to("cuda")
    monkeypatch.setattr(TUNING, "int8_dequant", mode)
    dev = torch.device("cuda", torch.cuda.current_device())
    got = layer._run_state(dev, dtype).dequantize()
    assert torch.equal(got, layer.dequantize_stored(dev, dtype))
