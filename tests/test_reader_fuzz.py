"""Property-based fuzz (hypothesis) of what reads downloaded files: the LoRA parser and the safetensors reader.

The property, for every input: it either loads correctly or raises the project's own error type
(``BnbFluxError``; ``LoraFormatError`` is a subclass) with the file's name in the message. Anything
else (a KeyError, a torch error deep in a kernel, a load that silently drops or misreads a tensor)
is a bug.

"Loads correctly" for a LoRA means: every low-rank layer fits the model shapes given (module exists,
its rows lie inside the layer, lora_A is as wide as the layer or a narrower latent-width img_in LoRA,
ranks agree), every tensor is a finite float of a dtype the loader computes with, the update cannot
overflow float32, norm scales are [128] on norms the model has, widening is only img_in to twice the
latent width, and every tensor of the file was read (nothing silently ignored). A valid LoRA made for
the very model must load. For a safetensors file it means: the header's names, shapes and dtypes
match the tensors read, and an undamaged file gives back exactly what was written.

Inputs: valid LoRAs in every format the parser reads (BFL, Control LoRA, kohya, diffusers, PEFT,
ComfyUI's converted form, text-encoder only), made for this model or another width/depth, then
damaged by a few random mutations (dropped/renamed/duplicated keys, other dtypes, NaN/inf, huge
values, reshaped or replaced tensors); fully random key/tensor dicts from FLUX-like name fragments;
and safetensors files truncated, extended, bit-flipped, with rewritten headers, or random bytes.

Runtime: a fixed number of examples, derandomized (the same inputs on every run, so CI is stable);
``BNB_FLUX_FUZZ_EXAMPLES=5000 BNB_FLUX_FUZZ_RANDOM=1`` runs a longer, randomized search.
"""
from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from quant_expand.testing import synthetic as S  # noqa: E402
from quant_expand.errors import BnbFluxError  # noqa: E402
from quant_expand.checkpoint.tensor_files import TensorFile
from quant_expand.lora.delta import LazyLoraDelta, LoraTerm  # noqa: E402
from quant_expand.flux import HEAD_DIM  # noqa: E402
from quant_expand.lora.canonical import ParsedLora
from quant_expand.lora.naming import norm_scale_keys
from quant_expand.lora.parse import parse_lora


def _fuzz_settings(examples: int):
    n = int(os.environ.get("BNB_FLUX_FUZZ_EXAMPLES", "0")) or examples
    return settings(max_examples=n, deadline=None, database=None,
                    derandomize=not os.environ.get("BNB_FLUX_FUZZ_RANDOM"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: with several threads, each op waits on a busy CPU's thread pool
    (100x slower on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- models and valid LoRAs

CONFIGS = {
    "h128": S.TinyFluxConfig(hidden_size=128),
    "h128_d2_schnell": S.TinyFluxConfig(hidden_size=128, depth=2, depth_single_blocks=2, guidance_embed=False),
    "h256": S.TinyFluxConfig(hidden_size=256),
}
OTHER_CONFIGS = {"h384": S.TinyFluxConfig(hidden_size=384)}  # LoRAs only: another FLUX width
LORA_KINDS = ("bfl", "bfl_alpha", "kohya", "control", "diffusers", "diffusers_control", "peft", "comfy_control",
              "comfy_set", "text_encoder_only")
FLOAT_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn,
                       torch.float8_e5m2)
DTYPES = FLOAT_WEIGHT_DTYPES + (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)
F32_MAX = torch.finfo(torch.float32).max


def modules_of(cfg: S.TinyFluxConfig, widened: bool = False) -> dict[str, tuple[int, int]]:
    mods = {k[: -len(".weight")]: v for k, v in S.flux_shapes(cfg).items() if k.endswith(".weight")}
    if widened:  # after a Control LoRA: img_in takes image + control latent
        mods["img_in"] = (mods["img_in"][0], 2 * mods["img_in"][1])
    return mods


def comfy_converted_control(cfg: S.TinyFluxConfig, seed: int) -> dict:
    """A Control LoRA in ComfyUI's converted key form (what ``comfy.lora_convert`` makes of a BFL file)."""
    out = {}
    for k, v in S.make_control_lora(cfg, rank=4, seed=seed).items():
        k = k.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")
        k = k.replace(".lora_B.bias", ".diff_b").replace("_norm.scale", "_norm.set_weight")
        out["diffusion_model." + k] = v
    out["diffusion_model.img_in.reshape_weight"] = torch.tensor([cfg.hidden_size, 2 * cfg.in_channels * 4])
    return out


_LORA_CACHE: dict = {}


def valid_lora(cfg_name: str, kind: str) -> dict[str, torch.Tensor]:
    key = (cfg_name, kind)
    if key not in _LORA_CACHE:
        cfg = {**CONFIGS, **OTHER_CONFIGS}[cfg_name]
        seed = 3 + LORA_KINDS.index(kind)
        targets = S.default_lora_targets(cfg) + ["img_in"]
        sd = {
            "bfl": lambda: S.make_lora(cfg, "lora", rank=4, seed=seed, targets=targets),
            "bfl_alpha": lambda: S.make_lora(cfg, "lora", rank=4, seed=seed, alpha=2.0),
            "kohya": lambda: S.make_lora(cfg, "kohya", rank=4, seed=seed),
            "control": lambda: S.make_control_lora(cfg, rank=4, seed=seed),
            "diffusers": lambda: S.bfl_lora_to_diffusers(S.make_lora(cfg, "lora", rank=4, seed=seed), cfg),
            "diffusers_control": lambda: S.bfl_lora_to_diffusers(S.make_control_lora(cfg, rank=4, seed=seed), cfg),
            "peft": lambda: S.bfl_lora_to_diffusers(S.make_lora(cfg, "lora", rank=4, seed=seed), cfg,
                                                    prefix="base_model.model.transformer.", peft=True),
            "comfy_control": lambda: comfy_converted_control(cfg, seed),
            "comfy_set": lambda: S.make_lora(cfg, "set", seed=seed),
            "text_encoder_only": lambda: {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                                          torch.randn(4, 32), "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha":
                                          torch.tensor(4.0)},
        }[kind]()
        _LORA_CACHE[key] = sd
    return _LORA_CACHE[key]


# ---------------------------------------------------------------- key and tensor strategies

def _name_fragments():
    cfg = S.TinyFluxConfig(hidden_size=128, depth=2, depth_single_blocks=2)
    bfl = list(modules_of(cfg)) + [k[: -len(".scale")] for k in S.norm_scale_keys(cfg)]
    pieces, norms = S.diffusers_pieces(cfg)
    diffusers = sorted({n for v in pieces.values() for n, _, _ in v} | set(norms.values()))
    odd = ["input_blocks.4.1.transformer_blocks.0.attn1.to_q", "down_blocks.1.attentions.0.proj_in", "img_in.extra",
           "double_blocks.99.img_attn.qkv", "single_blocks.0", "", "transformer_blocks.0.attn.to_qq", "img_in",
           "single_transformer_blocks.7.proj_out", "x_embedder", "norm_out.linear", "final_layer.adaLN_modulation.1"]
    return bfl + diffusers + odd


MODULE_NAMES = _name_fragments()
PREFIXES = ["", "diffusion_model.", "model.diffusion_model.", "transformer.", "base_model.model.transformer.",
            "base_model.model.", "lora_unet_", "lora_te1_", "text_encoder.", "unet.", "lora_transformer_"]
SUFFIXES = [".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".alpha", ".lora_down.weight", ".lora_up.weight",
            ".lora_A.default.weight", ".lora_B.default.weight", ".diff_b", ".set_weight", ".reshape_weight",
            "_norm.scale", ".scale", ".weight", ".bias", ".hada_w1_a", ".lokr_w1", ".oft_blocks", ".diff",
            ".lora_mid.weight", ".dora_scale", ""]


@st.composite
def lora_keys(draw):
    if draw(st.integers(0, 19)) == 0:
        return draw(st.text(max_size=40))  # safetensors allows any string as a name
    prefix = draw(st.sampled_from(PREFIXES))
    module = draw(st.sampled_from(MODULE_NAMES))
    if prefix.startswith("lora_"):
        module = module.replace(".", "_")
    return prefix + module + draw(st.sampled_from(SUFFIXES))


def _dims(hidden=(128, 256, 384)):
    special = [0, 1, 2, 3, 4, 8, 16, 64, 127, 128] + [m * h for h in hidden for m in (1, 2, 3, 6)] + [3 * 128 + 512]
    return st.sampled_from(sorted(set(special)))


def _fill(t: torch.Tensor, seed: int, special: int) -> torch.Tensor:
    if special == 0 or t.numel() == 0 or not t.is_floating_point():
        return t
    t = t.clone()
    i = seed % t.numel()
    t.view(-1)[i] = (float("nan"), float("inf"), float("-inf"), 3e38, 1e30, 0.0)[special - 1]
    return t


@st.composite
def tensors(draw, max_numel=1 << 18):
    shape = draw(st.lists(_dims(), min_size=0, max_size=3))
    numel = 1
    for d in shape:
        numel *= d
    if numel > max_numel:
        shape = shape[:1]
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.1
    t = _fill(t, seed, draw(st.integers(0, 6)))
    return t.to(dtype) if dtype != torch.bool else t > 0


MUTATIONS = ("drop", "dtype", "nonfinite", "huge", "reshape", "rename", "add", "duplicate", "replace")


def _reshape(t: torch.Tensor, how: int) -> torch.Tensor:
    if how == 0 and t.ndim == 2:
        return t.t().contiguous()
    if how == 1:
        return t.reshape(-1)
    if how == 2:
        return t.unsqueeze(0)
    if how == 3 and t.ndim >= 1:
        return t[:-1].clone()
    if how == 4 and t.ndim == 2:
        return t[:, :-1].clone()
    if how == 5 and t.ndim >= 1:
        return t[:0].clone()
    if how == 6 and t.ndim >= 1:
        return torch.cat([t, t])
    return t.reshape(())[()] if t.numel() == 1 else t[..., :1].clone()


@st.composite
def damaged_lora(draw):
    """(model modules, LoRA dict, what was done) for a valid LoRA after 0-3 random mutations."""
    model = draw(st.sampled_from(sorted(CONFIGS)))
    widened = draw(st.booleans())
    lora_cfg = draw(st.sampled_from([model] * 3 + sorted(set(CONFIGS) | set(OTHER_CONFIGS))))
    kind = draw(st.sampled_from(LORA_KINDS))
    sd = dict(valid_lora(lora_cfg, kind))
    done = []
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(MUTATIONS))
        keys = sorted(sd)
        if not keys:
            break
        key = keys[draw(st.integers(0, len(keys) - 1))]
        t = sd[key]
        if op == "drop":
            del sd[key]
        elif op == "dtype":
            dt = draw(st.sampled_from(DTYPES))
            sd[key] = t.to(dt) if dt != torch.bool else t.double() > 0
        elif op == "nonfinite":
            sd[key] = _fill(t.double(), draw(st.integers(0, 2**16)), draw(st.integers(1, 3))).to(t.dtype)
        elif op == "huge":
            factor = draw(st.sampled_from([1e19, 1e30, -1e38]))
            sd[key] = (t.double() * factor).to(t.dtype) if t.is_floating_point() else t
        elif op == "reshape":
            sd[key] = _reshape(t, draw(st.integers(0, 7)))
        elif op == "rename":
            del sd[key]
            sd[draw(lora_keys())] = t
        elif op == "add":
            sd[draw(lora_keys())] = draw(tensors())
        elif op == "duplicate":
            sd[draw(st.sampled_from(PREFIXES[:6])) + key] = t
        elif op == "replace":
            sd[key] = draw(tensors())
        done.append(f"{op} {key}")
    info = (model, widened, lora_cfg, kind, done)
    return Case(modules_of(CONFIGS[model], widened), sd, info,
                recipe=f"model {model}{' (img_in widened)' * widened}, {kind} LoRA for {lora_cfg}, {done}")


@st.composite
def random_lora(draw):
    model = draw(st.sampled_from(sorted(CONFIGS)))
    sd = draw(st.dictionaries(lora_keys(), tensors(max_numel=1 << 16), max_size=8))
    widened = draw(st.booleans())
    recipe = f"model {model}{' (img_in widened)' * widened}: " + ", ".join(
        f"{k!r}: {v.dtype} {list(v.shape)}" for k, v in sd.items())
    return Case(modules_of(CONFIGS[model], widened), sd, None, recipe=recipe)


# ---------------------------------------------------------------- the property

def _event(what: str):
    """Count outcomes for ``--hypothesis-show-statistics`` (how many inputs loaded, how many were refused)."""
    if currently_in_test_context():
        event(what)


class Case(tuple):
    """A generated input whose repr (what hypothesis prints for a failing example) is its short recipe."""

    def __new__(cls, *items, recipe=""):
        self = super().__new__(cls, items)
        self.recipe = recipe
        return self

    def __repr__(self):
        return self.recipe


class RecordingDict:
    """A dict of tensors that remembers which keys the parser read."""

    def __init__(self, sd):
        self.sd = sd
        self.read = set()

    def keys(self):
        return list(self.sd)

    def get(self, key):
        self.read.add(key)
        return self.sd[key]


def _finite_float(t: torch.Tensor) -> bool:
    return t.dtype in FLOAT_WEIGHT_DTYPES and bool(torch.isfinite(t.double()).all())


def check_parse(modules: dict, sd: dict, name: str = "fuzzed-lora.safetensors"):
    """Run the parser and check the property; returns the ParsedLora or None (a clean error)."""
    source = RecordingDict(sd)
    try:
        parsed = parse_lora(source, name, modules)
    except BnbFluxError as e:
        assert str(e).startswith(name + ":"), f"error does not name the file first: {e}"
        _event("clean error")
        return None
    _event("loaded")
    assert isinstance(parsed, ParsedLora)
    latent = modules["final_layer.linear"][0]
    for module, width in parsed.widened.items():
        assert module == "img_in" and width == 2 * latent and width > modules["img_in"][1], parsed.widened
    for layer in parsed.layers:
        assert layer.module in modules, layer.module
        out_features, in_features = modules[layer.module]
        width = parsed.widened.get(layer.module, in_features)
        assert layer.down.ndim == 2 and layer.up.ndim == 2
        assert layer.rank >= 1 and layer.up.shape[1] == layer.rank
        assert 0 <= layer.row_offset and layer.row_offset + layer.rows <= out_features, (layer.module, layer.row_offset)
        narrower_img_in = layer.module == "img_in" and layer.down.shape[1] == latent
        assert layer.down.shape[1] == width or narrower_img_in, (layer.module, tuple(layer.down.shape), width)
        assert _finite_float(layer.down) and _finite_float(layer.up), layer.module
        assert layer.alpha is None or abs(layer.alpha) < float("inf")
        bound = abs(layer.scale) * layer.rank * layer.up.double().abs().max() * layer.down.double().abs().max()
        assert bound <= F32_MAX, f"{layer.module}: update may overflow float32 (bound {bound:.3g})"
        if layer.bias is not None:
            assert tuple(layer.bias.shape) == (layer.rows,) and _finite_float(layer.bias)
        # the lazy delta a quantized layer builds from it accepts it (the bound above keeps its update finite)
        delta = LazyLoraDelta(out_features, width, [LoraTerm(layer.down, layer.up, layer.scale, layer.row_offset)])
        down, up, scale = delta.stacked("cpu", torch.float32)
        assert down.shape == (layer.rank, width) and up.shape == (out_features, layer.rank)
    norms = set(norm_scale_keys(modules))
    for key, value in parsed.norm_sets.items():
        assert key in norms and tuple(value.shape) == (HEAD_DIM,) and _finite_float(value), key
    for module, bias in parsed.bias_diffs.items():
        assert module in modules and tuple(bias.shape) == (modules[module][0],) and _finite_float(bias), module
    unread = set(sd) - source.read - set(parsed.text_encoder_keys)
    assert not unread, f"keys silently ignored: {sorted(unread)[:5]}"
    return parsed


@_fuzz_settings(1000)
@given(damaged_lora())
def test_parse_lora_on_damaged_loras(case):
    modules, sd, (model, widened, lora_cfg, kind, done) = case
    parsed = check_parse(modules, sd)
    if not done and lora_cfg == model and kind != "text_encoder_only":
        # an undamaged LoRA made for this very model must load
        assert parsed is not None, f"valid {kind} LoRA for {model} rejected"


@_fuzz_settings(500)
@given(random_lora())
def test_parse_lora_on_random_key_soup(case):
    modules, sd, _ = case
    check_parse(modules, sd)


def test_valid_loras_of_every_kind_load():
    """The fuzz's own seeds: every kind loads on its model (and the checks above accept it)."""
    for kind in LORA_KINDS:
        if kind == "text_encoder_only":
            continue
        for widened in (False, True):
            parsed = check_parse(modules_of(CONFIGS["h128"], widened), valid_lora("h128", kind))
            assert parsed is not None, kind
            assert parsed.is_control == (kind in ("control", "diffusers_control", "comfy_control", "comfy_set"))


# ---------------------------------------------------------------- safetensors files

SAFETENSORS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn,
                      torch.float8_e5m2, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)
HEADER_DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "I64", "I32",
                 "I16", "I8", "U64", "U32", "U16", "U8", "BOOL", "C64", "XYZ", ""]


class _Touch:
    """Pickle payload: unpickling it would create a file (it must never be unpickled)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.path),)


@st.composite
def state_dicts(draw):
    n = draw(st.integers(1, 4))
    sd = {}
    for i in range(n):
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        dtype = draw(st.sampled_from(SAFETENSORS_DTYPES))
        t = torch.randn(shape, generator=torch.Generator().manual_seed(i + 7 * n))
        sd[draw(st.text(min_size=1, max_size=12)) if draw(st.booleans()) else f"t{i}"] = \
            t.to(dtype) if dtype != torch.bool else t > 0
    return sd


def _split(raw: bytes):
    n = struct.unpack("<Q", raw[:8])[0]
    return raw[8:8 + n], raw[8 + n:]


def _with_header(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


@st.composite
def damaged_files(draw, tmp_dir):
    sd = draw(state_dicts())
    meta = draw(st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)))
    path = os.path.join(tmp_dir, "base.safetensors")
    save_file(sd, path, metadata=meta)
    with open(path, "rb") as f:
        raw = f.read()
    how = draw(st.sampled_from(["intact", "truncate", "append", "flip", "header_length", "header", "random", "empty",
                                "pickle"]))
    if how == "truncate":
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif how == "append":
        raw = raw + draw(st.binary(min_size=1, max_size=64))
    elif how == "flip":
        raw = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << draw(st.integers(0, 7))
        raw = bytes(raw)
    elif how == "header_length":
        raw = struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + raw[8:]
    elif how == "header":
        header_bytes, data = _split(raw)
        header = json.loads(header_bytes)
        names = [k for k in header if k != "__metadata__"]
        k = names[draw(st.integers(0, len(names) - 1))]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "metadata"]))
        if field == "dtype":
            header[k]["dtype"] = draw(st.sampled_from(HEADER_DTYPES))
        elif field == "shape":
            header[k]["shape"] = draw(st.lists(st.integers(-2, 40), max_size=4))
        elif field == "data_offsets":
            header[k]["data_offsets"] = draw(st.lists(st.integers(-1, len(data) + 8), min_size=0, max_size=3))
        elif field == "drop":
            del header[k]
        else:
            header["__metadata__"] = draw(st.sampled_from([{"a": 1}, [], "x", {"a": None}, {"a": "b"}]))
        raw = _with_header(header, data)
    elif how == "random":
        raw = draw(st.binary(max_size=300))
    elif how == "empty":
        raw = b""
    elif how == "pickle":
        raw = pickle.dumps(_Touch(os.path.join(tmp_dir, "PICKLE_RAN")))
    ext = draw(st.sampled_from([".safetensors"] * 6 + [".sft", ".SafeTensors", ".ckpt", ".pt", ".bin", ".pth"]))
    target = os.path.join(tmp_dir, "fuzzed" + ext)
    with open(target, "wb") as f:
        f.write(raw)
    return Case(target, sd, how, recipe=f"{how} {os.path.basename(target)} of {[(k, v.dtype, list(v.shape)) for k, v in sd.items()]}"
                                        f" ({len(raw)} bytes)")


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tensorfile-fuzz"))


def test_tensor_file_on_damaged_files(fuzz_dir):
    @_fuzz_settings(500)
    @given(damaged_files(fuzz_dir))
    def run(case):
        path, written, how = case
        name = os.path.basename(path)
        try:
            tf = TensorFile(path)
            loaded = {}
            for key in tf.keys():
                try:
                    dtype = tf.dtype(key)
                except BnbFluxError:
                    continue  # a dtype the loader does not read is refused by name
                shape = tf.shape(key)
                t = tf.get(key)
                assert t.dtype == dtype and tuple(t.shape) == tuple(shape), (key, t.dtype, dtype, t.shape, shape)
                loaded[key] = t
            meta = tf.meta_state_dict(list(loaded))
            assert {k: (v.shape, v.dtype) for k, v in meta.items()} == {k: (v.shape, v.dtype) for k, v in loaded.items()}
            tf.close()
        except BnbFluxError as e:
            _event(f"{how}: clean error")
            assert str(e).startswith(name + ":"), e
            assert how != "intact" or not path.lower().endswith((".safetensors", ".sft")), e
            return
        finally:
            assert not os.path.exists(os.path.join(fuzz_dir, "PICKLE_RAN")), "a pickle was unpickled"
        _event(f"{how}: loaded")
        assert path.lower().endswith((".safetensors", ".sft")), "a non-safetensors name was read"
        assert how not in ("truncate", "empty", "pickle"), f"{how}: the damaged file was read as {sorted(loaded)}"
        if how == "intact":
            assert set(loaded) == set(written)
            for k, v in written.items():
                assert torch.equal(loaded[k].view(torch.uint8) if v.dtype.is_floating_point and v.element_size() == 1
                                   else loaded[k], v.view(torch.uint8) if v.dtype.is_floating_point and
                                   v.element_size() == 1 else v), k

    run()


# ---------------------------------------------------------------- what the fuzz found, pinned

def _style(cfg_name="h128"):
    return dict(valid_lora(cfg_name, "bfl"))


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.bool, torch.uint16,
                                   torch.float8_e8m0fnu])
def test_non_float_lora_weights_are_refused(dtype):
    """An int8/bool/uint16/e8m0 lora_A was accepted and its codes used as weights."""
    sd = _style()
    key = "diffusion_model.txt_in.lora_A.weight"
    sd[key] = (sd[key] * 100).to(dtype) if dtype != torch.bool else sd[key] > 0
    with pytest.raises(BnbFluxError, match=rf"^odd\.safetensors: tensor {key} has dtype .*must be floating point"):
        parse_lora(sd, "odd.safetensors", modules_of(CONFIGS["h128"]))


def test_bool_alpha_and_fractional_reshape_are_refused():
    sd = _style()
    sd["diffusion_model.txt_in.alpha"] = torch.tensor(True)
    with pytest.raises(BnbFluxError, match=r"txt_in\.alpha has dtype bool, but it must be a number"):
        parse_lora(sd, "a.safetensors", modules_of(CONFIGS["h128"]))
    sd = dict(valid_lora("h128", "comfy_control"))
    sd["diffusion_model.img_in.reshape_weight"] = torch.tensor([128.4, 128.0])  # was truncated to [128, 128]
    with pytest.raises(BnbFluxError, match=r"reshape_weight holds \[128\.4.*not a shape of whole numbers"):
        parse_lora(sd, "r.safetensors", modules_of(CONFIGS["h128"]))


@pytest.mark.parametrize("where,expected", [
    ("lora_B", r"has values so large .* overflows float32"),
    # below float32's limit, above what float16 holds and a bf16 matmul survives
    ("lora_B_2.4e36", r"has values so large .* overflows float16 and breaks a bf16 matmul"),
    ("alpha", r"has alpha/rank 7.5e\+36; .* a damaged file"),
    ("int64_alpha_2^62", r"has alpha/rank 1.15e\+18; .* a damaged file"),
])
def test_update_that_overflows_the_compute_dtype_is_refused(where, expected):
    """A flipped exponent bit: finite numbers whose product is inf in the model."""
    sd = _style()
    key = "diffusion_model.txt_in.lora_B.weight"
    if where.startswith("lora_B"):
        sd[key] = sd[key].clone()
        sd[key][0, 0] = 2.4e36 if where.endswith("2.4e36") else 3e38
    elif where == "alpha":
        sd["diffusion_model.txt_in.alpha"] = torch.tensor(3e37)
    else:
        sd["diffusion_model.txt_in.alpha"] = torch.tensor(2 ** 62, dtype=torch.int64)
    with pytest.raises(BnbFluxError, match=r"^big\.safetensors: lora for txt_in " + expected):
        parse_lora(sd, "big.safetensors", modules_of(CONFIGS["h128"]))
    # the same file at sane magnitudes loads
    assert parse_lora(_style(), "big.safetensors", modules_of(CONFIGS["h128"])).layers


def test_a_high_rank_lora_whose_worst_case_bound_is_large_loads_when_its_update_is_small():
    """rank x max|lora_B| x max|lora_A| bounds every update entry; an SVD-extracted LoRA of high rank can
    pass 65504 with a small update (here its rank-one terms cancel): what counts is the update itself."""
    sd = _style()
    r = 256
    down = torch.full((r, sd["diffusion_model.txt_in.lora_A.weight"].shape[1]), 20.0)
    down[1::2] *= -1  # each pair of terms cancels
    sd["diffusion_model.txt_in.lora_A.weight"] = down
    sd["diffusion_model.txt_in.lora_B.weight"] = torch.full((sd["diffusion_model.txt_in.lora_B.weight"].shape[0], r), 20.0)
    sd.pop("diffusion_model.txt_in.alpha", None)
    layer = next(x for x in parse_lora(sd, "svd.safetensors", modules_of(CONFIGS["h128"])).layers if x.module == "txt_in")
    assert layer.rank == r
