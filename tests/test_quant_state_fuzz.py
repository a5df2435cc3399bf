"""Property-based fuzz (hypothesis) of a pre-quantized layer's quant state: its JSON fields and statistics.

Files are written by bitsandbytes' own ``Linear4bit`` / ``Linear8bitLt`` state dicts (Forge layout,
``tests/prequantized_files.py``), then one to three of these damages: a quant-state JSON field set to a
random JSON value (numbers of every size, NaN, inf, strings, booleans, null, lists, objects) or removed,
an unknown field added; one value of ``absmax``, ``quant_map``, ``nested_absmax``, ``nested_quant_map`` or
``SCB`` replaced by a random float (NaN, inf, negative, huge included).

The property, for every file: reading the layer either raises the pack's own error naming the file, or
loads weights that equal bitsandbytes' own ``QuantState.from_dict`` + dequantize of the same tensors (int8:
its ``CB * SCB / 127``), all finite. Never a raw exception, never NaN or inf weights.

A fixed number of examples, derandomized; ``BNB_FLUX_FUZZ_EXAMPLES=2000 BNB_FLUX_FUZZ_RANDOM=1`` searches longer.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import bitsandbytes.functional as bnbf  # noqa: E402
from bitsandbytes.functional import QuantState  # noqa: E402

from prequantized_files import forge_state_dict  # noqa: E402
from quant_expand.errors import BnbFluxError  # noqa: E402
from quant_expand.checkpoint.stored import QS_JSON_FIELDS, QS_NESTED_FIELDS  # noqa: E402
from quant_expand.checkpoint.reader import open_flux_checkpoint
from quant_expand.testing.synthetic import TinyFluxConfig, make_tiny_flux, save_safetensors  # noqa: E402

CFG = TinyFluxConfig(hidden_size=128)
MODULE = "double_blocks.0.img_mlp.0"
W = f"{MODULE}.weight"
EXAMPLES = int(os.environ.get("BNB_FLUX_FUZZ_EXAMPLES", "0")) or 150
FIELDS = [*QS_JSON_FIELDS, *QS_NESTED_FIELDS]


@pytest.fixture(scope="module")
def files():
    torch.set_num_threads(1)
    sd = make_tiny_flux(CFG, seed=0, exact_for="nf4")
    return {"plain": forge_state_dict(sd, "nf4", False, prefix="", all_in_one=False),
            "nested": forge_state_dict(sd, "nf4", True, prefix="", all_in_one=False),
            "int8": forge_state_dict(sd, "int8", False, prefix="", all_in_one=False)}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from([0, 1, 3, 32, 64, 128, 256, 2 ** 31, "nf4", "fp4", "float16", "float32", "bfloat16", [64, 128]]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
    max_leaves=6)
stat_values = st.sampled_from([float("nan"), float("inf"), float("-inf"), -1.0, 2.0, 1e5, 1e30, -0.0]) | st.floats()
STATS = {"plain": ["absmax", "quant_map"], "nested": ["nested_absmax", "nested_quant_map"], "int8": ["SCB"]}


def damages_for(kind: str):
    stat = st.tuples(st.just("stat"), st.sampled_from(STATS[kind]),
                     st.tuples(st.integers(min_value=0, max_value=15), stat_values))
    if kind == "int8":  # no quant-state JSON
        return stat
    fields = [*QS_JSON_FIELDS, *(QS_NESTED_FIELDS if kind == "nested" else ())]
    return st.one_of(st.tuples(st.just("field"), st.sampled_from(FIELDS + ["compress"]), json_values),
                     st.tuples(st.just("drop"), st.sampled_from(fields), st.none()), stat)


def damaged(f: dict, damages) -> dict:
    f = dict(f)
    qs_key = next((k for k in f if k.startswith(f"{W}.quant_state.bitsandbytes__")), None)
    for kind, name, value in damages:
        if kind in ("field", "drop") and qs_key is not None:
            state = json.loads(bytes(f[qs_key].numpy()).decode("utf-8"))
            if kind == "drop":
                state.pop(name, None)
            else:
                state[name] = value
            f[qs_key] = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
        elif kind == "stat":
            key = f"{MODULE}.SCB" if name == "SCB" else f"{W}.{name}"
            if key in f and f[key].is_floating_point():
                index, v = value
                t = f[key].clone()
                t.view(-1)[index % t.numel()] = torch.tensor(v, dtype=torch.float64).to(t.dtype)  # inf past its range
                f[key] = t
    return f


def bnb_reference(f: dict) -> torch.Tensor:
    """bitsandbytes' own reading of the layer's tensors (what a loaded layer must equal)."""
    if f"{MODULE}.SCB" in f:
        return f[W].float() * (f[f"{MODULE}.SCB"].float() / 127.0)[:, None]
    qs = QuantState.from_dict({k: v for k, v in f.items() if k.startswith(f"{W}.")}, device=torch.device("cpu"))
    return bnbf.dequantize_4bit(f[W].view(torch.uint8).reshape(-1, 1), qs).float()


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not os.environ.get("BNB_FLUX_FUZZ_RANDOM"),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_damaged_quant_state_loads_as_bitsandbytes_reads_it_or_is_refused(files, tmp_path_factory, data):
    kind = data.draw(st.sampled_from(["plain", "nested", "int8"]), label="kind")
    damages = data.draw(st.lists(damages_for(kind), min_size=1, max_size=3), label="damages")
    f = damaged(files[kind], damages)
    path = save_safetensors(f, str(tmp_path_factory.mktemp("qs") / "fuzzed.safetensors"))
    try:
        ckpt = open_flux_checkpoint(path)
        stored = ckpt.read_linear(MODULE)
        weight = stored.dequantize().float()
    except BnbFluxError as e:
        assert str(e).startswith("fuzzed.safetensors: "), str(e)
        event("refused")
        return
    event("loaded")
    assert torch.isfinite(weight).all(), damages
    assert torch.equal(weight, bnb_reference(f)), damages
