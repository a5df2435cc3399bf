"""Damaged pre-quantized files: each must fail with BnbFluxError naming the file, never crash or load wrong.

Found by fuzzing ``open_flux_checkpoint`` + ``read_linear`` with one damaged quant-state tensor at a time
(dropped, shortened, another dtype) on files bitsandbytes itself wrote (``tests/prequantized_files.py``).
The reader is ``quant_expand.checkpoint.reader``; ``FluxCheckpoint._piece_info`` and
``_check_quant_state_tensors`` validate every quant-state tensor before anything reaches bitsandbytes
(CASES and OPEN_CASES say what each damage did before the checks existed; OPEN_CASES were found
later — integer-typed scales and quant maps, broken quant-state JSON fields):

- ``weight.absmax`` present, with ceil(numel / blocksize) values, float32 (plain) or uint8 (double quant);
- ``weight.quant_map`` float32 with 16 entries;
- double quant (the quant-state JSON has ``nested_offset``/``nested_blocksize``, or ``weight.nested_quant_map``
  is there, or absmax is uint8) requires ``weight.nested_absmax`` (float32, ceil(absmax count /
  nested_blocksize) values) and ``weight.nested_quant_map`` (float32, 256 entries);
- LLM.int8: ``SCB`` floating point with one value per output row;
- the quant-state JSON: ``quant_type`` nf4/fp4, ``blocksize`` (and ``nested_blocksize``) a size bitsandbytes
  supports, every field present, each failure a BnbFluxError.

Reading runs in a child process: a shortened ``nested_absmax`` makes bitsandbytes' CPU kernel read past
the buffer (a segfault here, which would take a ComfyUI server down with it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from quant_expand.testing.synthetic import TinyFluxConfig, make_tiny_flux, save_safetensors

CFG = TinyFluxConfig(hidden_size=128)
MODULE = "double_blocks.0.img_mlp.0"
W = f"{MODULE}.weight"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _undamaged() -> dict[str, dict]:
    from prequantized_files import forge_state_dict

    sd = make_tiny_flux(CFG, seed=0, exact_for="nf4")
    return {"nested": forge_state_dict(sd, "nf4", True, prefix="", all_in_one=False),
            "plain": forge_state_dict(sd, "nf4", False, prefix="", all_in_one=False),
            "int8": forge_state_dict(sd, "int8", False, prefix="", all_in_one=False)}


def _edit_quant_state(f: dict, edit) -> None:
    """Rewrite the quant-state JSON (stored as uint8 bytes) of the damaged layer with ``edit(state)``."""
    key = next(k for k in f if k.startswith(f"{W}.quant_state.bitsandbytes__"))
    state = json.loads(bytes(f[key].numpy()).decode("utf-8"))
    edit(state)
    f[key] = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)


def _damage(case: str, undamaged: dict[str, dict]) -> dict:
    kind = {"uint8_absmax_plain": "plain", "short_scb": "int8", "int8_scb": "int8", "zero_blocksize": "plain",
            "unknown_quant_type": "plain", "empty_weight_format": "int8", **{c: v[0] for c, v in {**STAT_CASES, **JSON_CASES}.items()}}.get(case, "nested")
    f = dict(undamaged[kind])
    if case == "no_absmax":
        del f[f"{W}.absmax"]
    elif case == "no_nested_absmax":
        del f[f"{W}.nested_absmax"]
    elif case == "short_nested_absmax":
        f[f"{W}.nested_absmax"] = f[f"{W}.nested_absmax"][:1].clone()
    elif case == "float_absmax_nested":
        f[f"{W}.absmax"] = f[f"{W}.absmax"].float()
    elif case == "uint8_absmax_plain":
        f[f"{W}.absmax"] = f[f"{W}.absmax"].to(torch.uint8)
    elif case == "short_quant_map":
        f[f"{W}.quant_map"] = f[f"{W}.quant_map"][:8].clone()
    elif case == "short_nested_quant_map":
        f[f"{W}.nested_quant_map"] = f[f"{W}.nested_quant_map"][:100].clone()
    elif case == "short_scb":
        f[f"{MODULE}.SCB"] = f[f"{MODULE}.SCB"][:-3].clone()
    elif case == "int8_scb":
        f[f"{MODULE}.SCB"] = f[f"{MODULE}.SCB"].to(torch.int8)
    elif case in ("int_quant_map", "int_nested_absmax", "int_nested_quant_map"):
        key = f"{W}.{case[len('int_'):]}"
        f[key] = f[key].to(torch.int32)
    elif case == "zero_blocksize":
        _edit_quant_state(f, lambda st: st.update(blocksize=0))
    elif case == "unknown_quant_type":
        _edit_quant_state(f, lambda st: st.update(quant_type="nf5"))
    elif case == "no_nested_blocksize":
        _edit_quant_state(f, lambda st: st.pop("nested_blocksize"))
    elif case == "empty_weight_format":
        f[f"{MODULE}.weight_format"] = torch.zeros(0, dtype=torch.uint8)
    elif case in JSON_CASES:
        field, value = JSON_CASES[case][1:]
        if field is None:  # the whole text
            key = next(k for k in f if k.startswith(f"{W}.quant_state.bitsandbytes__"))
            data = value if isinstance(value, bytes) else value.encode("utf-8")
            f[key] = torch.tensor(list(data), dtype=torch.uint8)
        else:
            _edit_quant_state(f, lambda st: st.update({field: value}))
    elif case in STAT_CASES:
        key, index, value = STAT_CASES[case][1:]
        if key == "nested_offset":
            _edit_quant_state(f, lambda st: st.update(nested_offset=value))
        else:
            full = f"{MODULE}.SCB" if key == "SCB" else f"{W}.{key}"
            f[full] = f[full].clone()
            f[full].view(-1)[index] = value
    return f


CASES = {
    "no_absmax": "weight.absmax missing: KeyError from TensorSet.shape instead of BnbFluxError",
    "no_nested_absmax": "nested_absmax missing on a double-quant weight: taken for plain absmax, the uint8 nested "
                        "codes are read as float scales (weights up to 255x off), a silent wrong load",
    "short_nested_absmax": "nested_absmax shorter than the absmax blocks need: bitsandbytes' CPU dequantize reads past "
                           "the buffer (segfault or garbage weights)",
    "float_absmax_nested": "float32 absmax on a double-quant weight: ValueError 'A must be uint8' from bitsandbytes",
    "uint8_absmax_plain": "uint8 absmax on a plain 4-bit weight: read as float scales, a silent wrong load",
    "short_quant_map": "quant_map with 8 entries instead of 16: used as is, a silent wrong load",
    "short_nested_quant_map": "nested_quant_map with 100 entries instead of 256: used as is, a silent wrong load",
    "short_scb": "SCB with fewer values than output rows: RuntimeError (size mismatch) from torch",
}
# found after the first checks existed (what each did then, and what _piece_info now checks)
OPEN_CASES = {
    "int8_scb": "SCB stored as int8 (bitsandbytes writes float32): truncated scales read as float, a silent wrong "
                "load; SCB must be a float dtype",
    "int_quant_map": "quant_map stored as int32: read as code values, a silent wrong load; quant maps must be float",
    "int_nested_absmax": "nested_absmax stored as int32: read as scales, a silent wrong load; must be float",
    "int_nested_quant_map": "nested_quant_map stored as int32: a silent wrong load; must be float",
    "zero_blocksize": "quant state JSON with blocksize 0: ZeroDivisionError in _piece_info; blocksize must be one "
                      "bitsandbytes supports (a power of two, 32..4096)",
    "unknown_quant_type": "quant state JSON with quant_type 'nf5': ValueError from the reader/bitsandbytes instead "
                          "of BnbFluxError; quant_type must be nf4 or fp4",
    "no_nested_blocksize": "double-quant state JSON without nested_blocksize: KeyError in _piece_info; a nested "
                           "state needs nested_blocksize and nested_offset",
    "empty_weight_format": "an empty int8 weight_format: blamed on an old bitsandbytes' GPU tile layout; now "
                           "called damaged",
}


# damaged values that loaded without a word and gave NaN (or silently wrong) latents: (file kind, tensor or
# quant-state field, flat index, value); each must now fail naming the file, the tensor and the remedy
STAT_CASES = {
    "nan_absmax": ("plain", "absmax", 5, float("nan")),
    "inf_absmax": ("plain", "absmax", 0, float("inf")),
    "negative_absmax": ("plain", "absmax", 3, -0.5),
    "nan_quant_map": ("plain", "quant_map", 7, float("nan")),
    "quant_map_past_one": ("plain", "quant_map", 15, 2.0),
    "nan_nested_absmax": ("nested", "nested_absmax", 0, float("nan")),
    "negative_nested_absmax": ("nested", "nested_absmax", 0, -1.0),
    "inf_nested_quant_map": ("nested", "nested_quant_map", 100, float("-inf")),
    "nan_nested_offset": ("nested", "nested_offset", None, float("nan")),
    "inf_nested_offset": ("nested", "nested_offset", None, float("inf")),
    "nan_scb": ("int8", "SCB", 2, float("nan")),
    "inf_scb": ("int8", "SCB", 0, float("inf")),
    "negative_scb": ("int8", "SCB", 1, -3.0),
}


# quant-state JSON values that raised raw exceptions, or loaded and failed later inside KSampler:
# (file kind, field or None for the whole text, value); each must fail naming the file, tensor and field
JSON_CASES = {
    "deep_nesting": ("plain", None, "[" * 20000 + "]" * 20000),
    "huge_number": ("plain", "blocksize", 1e400),
    "string_blocksize": ("plain", "blocksize", "64"),
    "bool_blocksize": ("plain", "blocksize", True),
    "negative_shape": ("plain", "shape", [-128, 128]),
    "three_d_shape": ("plain", "shape", [2, 64, 128]),
    "dtype_not_a_dtype": ("plain", "dtype", "nn"),
    "dtype_not_a_string": ("plain", "dtype", 16),
    "nested_blocksize_zero": ("nested", "nested_blocksize", 0),
    "nested_blocksize_one": ("nested", "nested_blocksize", 1),
    "nested_blocksize_three": ("nested", "nested_blocksize", 3),
    "nested_blocksize_2_31": ("nested", "nested_blocksize", 2 ** 31),
    "nested_blocksize_true": ("nested", "nested_blocksize", True),
    "nested_offset_text": ("nested", "nested_offset", "abc"),
    "nested_offset_400_digits": ("nested", "nested_offset", 10 ** 400),
    "bogus_nested_dtype": ("nested", "nested_dtype", "float128"),
    "unknown_field": ("plain", "compress", 1),
    "state_is_a_list": ("plain", None, "[1, 2, 3]"),
    "not_utf8": ("plain", None, b"\xff\xfe{}"),
}


def _worker(paths: list[str]):
    """Child process: read each file's damaged Linear; one JSON line before and after each case."""
    from quant_expand.errors import BnbFluxError
    from quant_expand.checkpoint.reader import open_flux_checkpoint

    torch.set_num_threads(1)  # tiny tensors: threads only wait on each other
    expected = make_tiny_flux(CFG, seed=0, exact_for="nf4")[W]
    for path in paths:
        print(json.dumps({"start": path}), flush=True)
        try:
            ckpt = open_flux_checkpoint(path)
            weight = ckpt.read_linear(MODULE).dequantize()
            same = weight.shape == expected.shape and torch.equal(weight.float(), expected)
            result = {"outcome": "loaded" if same else "loaded wrong values"}
        except BnbFluxError as e:
            result = {"outcome": "BnbFluxError", "message": str(e)}
        except Exception as e:  # noqa: BLE001 - what the test reports
            result = {"outcome": type(e).__name__, "message": str(e)[:300]}
        print(json.dumps({"path": path, **result}), flush=True)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("damaged-prequantized")
    undamaged = _undamaged()
    paths = {c: save_safetensors(_damage(c, undamaged), str(folder / f"{c}.safetensors"))
             for c in {**CASES, **OPEN_CASES, **STAT_CASES, **JSON_CASES}}
    todo = list(paths.values())
    results = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.path.join(REPO_ROOT, "tests")]))
    while todo:
        code = "import sys, json; from test_prequantized_damage import _worker; _worker(json.loads(sys.argv[1]))"
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(todo)], capture_output=True, text=True,
                              env=env, timeout=300)
        started = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if "start" in msg:
                started = msg["start"]
            else:
                results[msg["path"]] = msg
                started = None
        if started is None and proc.returncode != 0:
            raise RuntimeError(f"reader child failed outside a case ({proc.returncode}):\n{proc.stderr[-3000:]}")
        if started is not None:  # the child died inside this case
            results[started] = {"outcome": f"process killed by signal {-proc.returncode}" if proc.returncode < 0
                                else f"process exited with {proc.returncode}", "message": proc.stderr[-500:]}
        todo = [p for p in todo if p not in results]
    return {c: results[p] for c, p in paths.items()}


@pytest.mark.parametrize("case", list(CASES) + list(OPEN_CASES))
def test_damaged_quant_state_is_a_clean_error(outcomes, case):
    got = outcomes[case]
    assert got["outcome"] == "BnbFluxError", got
    assert got["message"].startswith(f"{case}.safetensors: "), got["message"]


@pytest.mark.parametrize("case", list(STAT_CASES))
def test_a_damaged_statistic_is_named_not_silently_loaded(outcomes, case):
    kind, key, _index, _value = STAT_CASES[case]
    got = outcomes[case]
    assert got["outcome"] == "BnbFluxError", got
    msg = got["message"]
    tensor = f"{MODULE}.SCB" if key == "SCB" else W if key == "nested_offset" else f"{W}.{key}"
    assert msg.startswith(f"{case}.safetensors: tensor {tensor}"), msg
    assert "download it again" in msg, msg


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_a_damaged_quant_state_field_is_named(outcomes, case):
    _kind, field, value = JSON_CASES[case]
    got = outcomes[case]
    assert got["outcome"] == "BnbFluxError", got
    msg = got["message"]
    assert msg.startswith(f"{case}.safetensors: tensor {W}.quant_state.bitsandbytes__nf4, field "), msg
    shown = repr(field) if case == "unknown_field" else field  # a name from the file is quoted
    assert f"field {shown}:" in msg if field else "field (the whole state):" in msg, msg
    assert "download it again" in msg and len(msg) < 600, msg
    if case == "string_blocksize":
        assert "the string '64'; bitsandbytes writes a number" in msg, msg
