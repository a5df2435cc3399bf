"""A sharded model's ``*.index.json``, read as a hostile file (no ComfyUI).

The shards are real safetensors files in diffusers' sharded layout (``tests/prequantized_files.py``), the
indexes real JSON. An index may only name ``.safetensors`` files inside its own folder, decided from the
text (relative, no ``..``, no absolute or drive path): the refusal reads the same whether the target exists
or not, and names the index, the tensor and what to do. A shard that is a symlink stays allowed (Hugging
Face cache snapshots are made of them). An index that cannot be read breaks only the model it belongs to.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from prequantized_files import diffusers_state_dict, save_sharded
from quant_expand.errors import BnbFluxError
from quant_expand.checkpoint.tensor_files import INDEX_MAX_BYTES
from quant_expand.checkpoint.reader import open_flux_checkpoint
from quant_expand.testing.synthetic import TinyFluxConfig, linear_modules, make_tiny_flux, save_safetensors

CFG = TinyFluxConfig()
INDEX = "diffusion_pytorch_model.safetensors.index.json"
FIX = "re-download the index with its shards, or pick a single-file model"


@pytest.fixture
def sharded(tmp_path):
    """A two-shard NF4 model in ``tmp_path/model``, and a real safetensors file outside that folder."""
    foreign = diffusers_state_dict(make_tiny_flux(CFG, seed=0, exact_for="nf4"), CFG, "nf4")
    index = save_sharded(foreign, str(tmp_path / "model"), shards=2)
    outside = save_safetensors({"x": torch.zeros(2)}, tmp_path / "outside" / "secret.safetensors")
    return index, str(outside)


def rewrite(index, change):
    with open(index) as f:
        data = json.load(f)
    change(data["weight_map"])
    with open(index, "w") as f:
        json.dump(data, f)


def first_key(index):
    with open(index) as f:
        return sorted(json.load(f)["weight_map"])[0]


HOSTILE = ["../outside/secret.safetensors", "sub/../../outside/secret.safetensors", "C:\\models\\x.safetensors",
           "C:x.safetensors", "a/C:/Windows/x.safetensors", "\\\\server\\share\\x.safetensors", "shard.bin", "",
           "./../outside/secret.safetensors",
           "a\nforged log line.safetensors", "\x1b[31mred.safetensors", "a\x00b.safetensors", 7, ["x"], None]


@pytest.mark.parametrize("entry", HOSTILE, ids=range(len(HOSTILE)))
def test_an_entry_outside_the_folder_is_refused_naming_index_tensor_and_fix(sharded, entry):
    index, _ = sharded
    key = first_key(index)
    rewrite(index, lambda m: m.__setitem__(key, entry))
    with pytest.raises(BnbFluxError) as e:
        open_flux_checkpoint(index)
    msg = str(e.value)
    assert msg.startswith(f"{INDEX}: tensor {key!r} is mapped to ") and FIX in msg
    assert "\n" not in msg and "\x1b" not in msg and "\x00" not in msg


def test_an_absolute_path_is_refused_the_same_whether_or_not_it_exists(sharded):
    index, outside = sharded
    key = first_key(index)
    messages = []
    for target in (outside, outside.replace("secret", "absent")):
        assert os.path.isabs(target)
        rewrite(index, lambda m: m.__setitem__(key, target))
        with pytest.raises(BnbFluxError) as e:
            open_flux_checkpoint(index)
        messages.append(str(e.value).replace(repr(target), "<entry>"))
    assert messages[0] == messages[1]
    assert "<entry>" in messages[0] and "absolute paths, drive letters and '..' are refused" in messages[0]


def test_a_shard_that_is_a_symlink_still_loads(sharded, tmp_path):
    index, _ = sharded
    folder = os.path.dirname(index)
    shard = os.path.join(folder, "diffusion_pytorch_model-00002-of-00002.safetensors")
    store = tmp_path / "blobs"
    store.mkdir()
    blob = store / "0123abcd"
    os.replace(shard, blob)
    os.symlink(blob, shard)
    ckpt = open_flux_checkpoint(os.path.join(folder, "diffusion_pytorch_model-00001-of-00002.safetensors"))
    assert len(ckpt.tensors.files) == 2
    assert {ckpt.read_linear(n).kind for n in linear_modules(CFG)} == {"4bit"}  # the linked shard's layers too


BROKEN = {"nested": "[" * 200_000 + "]" * 200_000, "list map": json.dumps({"weight_map": ["a", "b"]}),
          "unhashable": json.dumps({"weight_map": {"x": ["a.safetensors"]}}), "not json": "{weight_map:",
          "no map": json.dumps({"metadata": {}}), "escape": json.dumps({"weight_map": {"x": "../up.safetensors"}})}


@pytest.mark.parametrize("kind", BROKEN)
def test_a_broken_index_breaks_only_its_own_model(tmp_path, kind):
    folder = tmp_path / "models"
    sd = make_tiny_flux(CFG, seed=3)
    single = save_safetensors(sd, folder / "flux-single-00001-of-00002-fp8.safetensors")
    other = save_safetensors({"x": torch.zeros(2)}, folder / "other-00001-of-00002.safetensors")
    (folder / "other.safetensors.index.json").write_text(BROKEN[kind])
    (folder / "flux.safetensors.index.json").write_text(BROKEN[kind])  # a name that only starts the same
    ckpt = open_flux_checkpoint(str(single))  # an unrelated index beside it changes nothing
    assert not ckpt.is_prequantized and len(ckpt.tensors.files) == 1
    ckpt.close()
    with pytest.raises(BnbFluxError) as e:  # the shard whose index it is: told so
        open_flux_checkpoint(str(other))
    assert str(e.value).startswith("other-00001-of-00002.safetensors: a shard of other.safetensors.index.json: ")
    assert FIX in str(e.value)


def test_an_oversized_index_is_refused_before_it_is_parsed(sharded):
    index, _ = sharded
    with open(index, "a") as f:
        f.truncate(INDEX_MAX_BYTES + 1)
    with pytest.raises(BnbFluxError, match=f"{INDEX}: {INDEX_MAX_BYTES + 1} bytes, too large for a shard index"):
        open_flux_checkpoint(index)


def test_a_leading_dot_segment_is_the_file_itself(sharded):
    """Some converters write ``./model-00001-of-00002.safetensors``: the same file inside the folder."""
    index, _ = sharded
    rewrite(index, lambda m: m.update({k: f"./{v}" for k, v in m.items()}))
    assert len(open_flux_checkpoint(index).tensors.files) == 2
