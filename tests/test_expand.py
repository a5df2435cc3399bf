"""expand_in_features on real bitsandbytes layers (CPU, and CUDA when present): every quantization
attribute kept, the original bytes untouched and shared, the new input columns exact zeros."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bitsandbytes as bnb
from quant_expand import LazyLoraDelta, LoraTerm, QuantSpec, as_quant_linear, expand_in_features, unexpand
from quant_expand.layer_state import quantized_bytes
from quant_expand.layers import quantized_linear_from_float
from quant_expand.testing.prompts import rel_err
from quant_expand.testing.synthetic import exact_4bit, exact_int8

SPECS = [QuantSpec("nf4", False), QuantSpec("nf4", True), QuantSpec("fp4", False), QuantSpec("fp4", True),
         QuantSpec("int8")]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def exact_weight(spec, out_f=256, in_f=64, seed=0):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) / in_f ** 0.5
    return exact_int8(w) if spec.quant_type == "int8" else exact_4bit(w, spec.quant_type)


def layer_attrs(layer):
    """Everything bnb keeps on a layer and its weight, minus what expansion must change."""
    skip = {"in_features", "_parameters", "expanded_from", "lora_delta", "training"}
    attrs = {k: v for k, v in vars(layer).items() if k not in skip}
    wattrs = {k: v for k, v in vars(layer.weight).items() if k not in ("logical_shape", "module")}
    return attrs, wattrs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_expansion_keeps_scheme_bytes_and_zero_columns(spec, device):
    layer = quantized_linear_from_float(exact_weight(spec), torch.randn(256), spec, store_device=device)
    before = {k: v.clone() for k, v in quantized_bytes(layer).items()}
    wide = expand_in_features(layer, 128)
    assert type(wide) is type(layer)
    assert wide.weight.shape == (256, 128) and wide.in_features == 128 and layer.weight.shape == (256, 64)
    # every attribute bnb set on the layer and on its parameter is carried over unchanged
    a0, w0 = layer_attrs(layer)
    a1, w1 = layer_attrs(wide)
    assert a0.keys() == a1.keys() and w0.keys() == w1.keys()
    for k in a0:
        assert a1[k] is a0[k] or a1[k] == a0[k], k
    if spec.is_4bit:
        qs0, qs1 = layer.weight.quant_state, wide.weight.quant_state
        assert (qs1.quant_type, qs1.blocksize, qs1.nested, qs1.dtype) == (qs0.quant_type, qs0.blocksize, qs0.nested, qs0.dtype)
        assert wide.weight.quant_storage == layer.weight.quant_storage and wide.compute_dtype == layer.compute_dtype
        assert isinstance(wide, bnb.nn.Linear4bit)
    else:
        assert isinstance(wide, bnb.nn.Linear8bitLt)
        assert wide.state.has_fp16_weights == layer.state.has_fp16_weights and wide.state.threshold == layer.state.threshold
    # the stored bytes are the original storage, unchanged
    assert wide.weight.data.data_ptr() == layer.weight.data.data_ptr()
    assert all(torch.equal(before[k], v) for k, v in quantized_bytes(wide).items())
    # original columns bit-identical, new columns exact zeros
    w_orig, w_wide = layer.dequantize(device, torch.float32), wide.dequantize(device, torch.float32)
    assert torch.equal(w_wide[:, :64], w_orig) and torch.equal(w_wide[:, 64:], torch.zeros_like(w_wide[:, 64:]))
    x = torch.randn(3, 128, device=device)
    assert torch.equal(wide(x), layer(x[:, :64]))
    # restoring gives back the very same layer object
    assert unexpand(wide) is layer and expand_in_features(wide, 64) is layer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_lora_on_expanded_layer_pads_old_width(spec, device):
    layer = quantized_linear_from_float(exact_weight(spec), None, spec, store_device=device)
    wide = expand_in_features(layer, 128)
    g = torch.Generator().manual_seed(3)
    control = LoraTerm(torch.randn(8, 128, generator=g), torch.randn(256, 8, generator=g) * 0.1, 1.0)
    style = LoraTerm(torch.randn(4, 64, generator=g), torch.randn(256, 4, generator=g) * 0.1, 0.5)  # old width
    wide.lora_delta = LazyLoraDelta(256, 128, [control, style])
    ref_w = wide.dequantize(device, torch.float64)
    ref_w += control.up.double().to(device) @ control.down.double().to(device)
    ref_w[:, :64] += 0.5 * style.up.double().to(device) @ style.down.double().to(device)
    for tokens in (5, 4096):
        x = torch.randn(tokens, 128, device=device)
        assert rel_err(wide(x), x.double() @ ref_w.T) < 1e-6


def test_plain_bnb_layers_are_adopted():
    lin = bnb.nn.Linear4bit(64, 128, bias=False, quant_type="fp4", compress_statistics=False)
    lin.weight = bnb.nn.Params4bit(exact_4bit(torch.randn(128, 64) / 8, "fp4"), requires_grad=False,
                                   quant_type="fp4", compress_statistics=False)
    lin = lin.to("cpu")  # bnb quantizes on the move
    ours = as_quant_linear(lin)
    assert ours.weight.shape == (128, 64) and ours.weight.data.data_ptr() == lin.weight.data.data_ptr()
    wide = expand_in_features(lin, 128)
    assert wide.weight.shape == (128, 128)
    x = torch.randn(2, 128)
    deq = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    assert torch.equal(wide(x), F.linear(x[:, :64], deq))
    with pytest.raises(TypeError, match="Linear4bit or Linear8bitLt"):
        as_quant_linear(torch.nn.Linear(4, 4))


def test_cannot_narrow():
    spec = QuantSpec("nf4", False)
    layer = quantized_linear_from_float(exact_weight(spec), None, spec)
    with pytest.raises(ValueError, match="narrow"):
        expand_in_features(layer, 32)
