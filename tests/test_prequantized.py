"""Pre-quantized files without ComfyUI: every foreign layout read back exactly, our files readable by
bitsandbytes itself, the q/k/v fusion rule, the command line, and errors that name the file.

Foreign files are written by bitsandbytes' own ``Linear4bit`` / ``Linear8bitLt`` state dicts (whose 4-bit
keys are ``QuantState.as_dict(packed=True)``) under BFL names (lllyasviel/Forge) or diffusers names
(``tests/prequantized_files.py``). Weights come from ``make_tiny_flux(exact_for=...)``: they survive NF4 /
FP4 (no double quant) / int8 exactly, so "loads and matches" is ``torch.equal`` on whole tensors. With
double quant the absmax itself is quantized, so the reference is bitsandbytes' own dequantization of
the same bytes (still ``torch.equal``: the same kernel on the same bytes).
"""
from __future__ import annotations

import json
import os

import bitsandbytes.functional as bnbf
import pytest
import torch
from bitsandbytes.functional import QuantState
from safetensors import safe_open
from safetensors.torch import load_file

from prequantized_files import (ALL_IN_ONE_EXTRAS, bnb_linear_state, diffusers_state_dict, forge_state_dict,
                                save_sharded)
from quant_expand.cli import main
from quant_expand.errors import BnbFluxError
from quant_expand.checkpoint.fusion import PieceInfo, assemble_rows, plan_rows
from quant_expand.checkpoint.stored import StoredKind, StoredLinear, quantize_weight
from quant_expand.flux import default_should_quantize
from quant_expand.tools.convert import inspect_file, quantize_file
from quant_expand.checkpoint.reader import open_flux_checkpoint
from quant_expand.spec import QuantSpec
from quant_expand.testing.prompts import rel_err
from quant_expand.testing.synthetic import TinyFluxConfig, linear_modules, make_tiny_flux, save_safetensors

CFG = TinyFluxConfig()
LINEARS = linear_modules(CFG)
FORGE_KEYS = {"weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__{q}", "bias"}
NESTED_KEYS = {"weight.nested_absmax", "weight.nested_quant_map"}


def exact_sd(quant):
    return make_tiny_flux(CFG, seed=0, exact_for=quant)


def bnb_dequantized(state: dict, quant: str) -> torch.Tensor:
    """bitsandbytes' own reading of a Linear's state dict (keys relative to the module)."""
    if quant == "int8":
        return state["weight"].float() * (state["SCB"].float() / 127)[:, None]
    qs = QuantState.from_dict({k[len("weight."):]: v for k, v in state.items() if k.startswith("weight.")},
                              device=torch.device("cpu"))
    qs.dtype = torch.float32
    return bnbf.dequantize_4bit(state["weight"], qs)


def module_state(sd: dict, module: str) -> dict:
    return {k[len(module) + 1:]: v for k, v in sd.items() if k.startswith(module + ".")}


class TestForgeLayout:
    """lllyasviel/Forge NF4 v1 (double-quantized absmax) and v2 (float32 absmax), FP4, all-in-one or not."""

    @pytest.mark.parametrize("quant,dq", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
    @pytest.mark.parametrize("all_in_one", [True, False])
    def test_reads_bytes_and_values_exactly(self, tmp_path, quant, dq, all_in_one):
        sd = exact_sd(quant)
        prefix = "model.diffusion_model." if all_in_one else ""
        foreign = forge_state_dict(sd, quant, dq, prefix=prefix, all_in_one=all_in_one)
        path = save_safetensors(foreign, tmp_path / "forge.safetensors")
        ckpt = open_flux_checkpoint(path)
        assert ckpt.layout == "bfl" and ckpt.prefix == prefix and ckpt.is_prequantized
        assert sorted(ckpt.skipped) == (sorted(ALL_IN_ONE_EXTRAS) if all_in_one else [])
        assert sorted(ckpt.linear_names()) == sorted(LINEARS)  # Forge quantizes every Linear
        for name in LINEARS:
            stored = ckpt.read_linear(name)
            state = module_state(foreign, prefix + name)
            assert stored.kind == "4bit" and stored.quant_state.nested == dq and stored.quant_state.quant_type == quant
            # the very bytes bnb wrote
            assert torch.equal(stored.packed, state["weight"])
            assert torch.equal(stored.quant_state.absmax, state["weight.absmax"])
            if dq:
                assert torch.equal(stored.quant_state.state2.absmax, state["weight.nested_absmax"])
            assert torch.equal(stored.dequantize(), bnb_dequantized(state, quant))
            if not dq:  # exact-survival weights come back bit for bit
                assert torch.equal(stored.dequantize(), sd[f"{name}.weight"])
            assert torch.equal(stored.bias, sd[f"{name}.bias"])
        for key in ckpt.other_keys():
            assert torch.equal(ckpt.read(key), sd[key])

    def test_detection_sees_logical_shapes(self, tmp_path):
        sd = exact_sd("nf4")
        path = save_safetensors(forge_state_dict(sd, "nf4", True), tmp_path / "forge.safetensors")
        meta = open_flux_checkpoint(path).meta_state_dict()
        assert set(meta) == set(sd)
        assert {k: tuple(v.shape) for k, v in meta.items()} == {k: tuple(v.shape) for k, v in sd.items()}
        assert all(v.device.type == "meta" for v in meta.values())

    def test_subset_quantized_rest_full_precision(self, tmp_path):
        sd = exact_sd("fp4")
        quantized = {n for n in LINEARS if n.startswith("double_blocks.")}
        foreign = forge_state_dict(sd, "fp4", False, quantize=lambda n: n in quantized)
        ckpt = open_flux_checkpoint(save_safetensors(foreign, tmp_path / "part.safetensors"))
        kinds = {n: ckpt.read_linear(n).kind for n in LINEARS}
        assert kinds == {n: "4bit" if n in quantized else "float" for n in LINEARS}
        assert all(torch.equal(ckpt.read_linear(n).dequantize(), sd[f"{n}.weight"]) for n in LINEARS)


class TestDiffusersLayout:
    """diffusers-bnb transformers: q/k/v (+ proj_mlp) fused into BFL's qkv / linear1, norm_out halves swapped."""

    def test_no_double_quant_fuses_to_the_bytes_of_quantizing_the_fused_weight(self, tmp_path):
        sd = exact_sd("nf4")
        # proj_out kept in full precision (llm_int8_skip_modules), the rest quantized by bnb
        ckpt = open_flux_checkpoint(save_safetensors(diffusers_state_dict(sd, CFG, "nf4", skip=("proj_out",)),
                                                     tmp_path / "d.safetensors"))
        assert ckpt.layout == "diffusers" and sorted(ckpt.linear_names()) == sorted(LINEARS)
        spec = QuantSpec("nf4", double_quant=False)
        for name in LINEARS:
            stored = ckpt.read_linear(name)
            assert torch.equal(stored.bias, sd[f"{name}.bias"])
            if name == "final_layer.linear":  # the file's choice: kept unquantized
                assert stored.kind == "float" and torch.equal(stored.weight, sd[f"{name}.weight"])
                continue
            # blocks never straddle q/k/v: the fused bytes are those of quantizing BFL's fused weight
            ref = quantize_weight(sd[f"{name}.weight"], spec)
            assert torch.equal(stored.packed, ref.packed), name
            assert torch.equal(stored.quant_state.absmax, ref.quant_state.absmax), name
            assert torch.equal(stored.dequantize(), sd[f"{name}.weight"]), name
        assert {p.method for p in map(ckpt.plan, LINEARS)} == {"read", "concat"}

    def test_double_quant_denests_qkv_and_keeps_norm_out_nested(self, tmp_path):
        sd = exact_sd("fp4")
        foreign = diffusers_state_dict(sd, CFG, "fp4", double_quant=True)
        ckpt = open_flux_checkpoint(save_safetensors(foreign, tmp_path / "d.safetensors"))
        h = CFG.hidden_size
        for name, pieces in (("double_blocks.0.img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
                             ("single_blocks.0.linear1", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"])):
            block = "transformer_blocks.0." if name.startswith("double") else "single_transformer_blocks.0."
            stored = ckpt.read_linear(name)
            # q/k/v were quantized separately: each has its own absmax mean (offset), so the nested codes
            # cannot be shared; the absmax is de-nested to bnb's own float32 values -> identical weights
            assert ckpt.plan(name).method == "concat-denest" and not stored.quant_state.nested
            expected = torch.cat([bnb_dequantized(module_state(foreign, block + p), "fp4") for p in pieces])
            assert torch.equal(stored.dequantize(), expected)
        # norm_out: both halves come from one tensor (one offset) and span whole nested blocks of 256
        # absmax values (h*h/64 = 1024): swapped on the nested codes, still double-quantized
        stored = ckpt.read_linear("final_layer.adaLN_modulation.1")
        assert ckpt.plan("final_layer.adaLN_modulation.1").method == "concat" and stored.quant_state.nested
        diff = bnb_dequantized(module_state(foreign, "norm_out.linear"), "fp4")
        assert torch.equal(stored.dequantize(), torch.cat([diff[h:], diff[:h]]))

    def test_sharded_with_index(self, tmp_path):
        sd = exact_sd("nf4")
        foreign = diffusers_state_dict(sd, CFG, "nf4", double_quant=True)
        index = save_sharded(foreign, str(tmp_path / "sharded"), shards=3)
        single = open_flux_checkpoint(save_safetensors(foreign, tmp_path / "one.safetensors"))
        shard = os.path.join(os.path.dirname(index), json.load(open(index))["weight_map"]["x_embedder.weight"])
        for path in (index, shard):  # the index itself, or any shard (what ComfyUI lists)
            ckpt = open_flux_checkpoint(path)
            assert len(ckpt.tensors.files) == 3
            for name in LINEARS:
                a, b = ckpt.read_linear(name), single.read_linear(name)
                assert torch.equal(a.dequantize(), b.dequantize()) and torch.equal(a.bias, b.bias)

    def test_missing_shard_is_named(self, tmp_path):
        index = save_sharded(diffusers_state_dict(exact_sd("nf4"), CFG, "nf4"), str(tmp_path / "s"), shards=2)
        os.remove(os.path.join(tmp_path, "s", "diffusion_pytorch_model-00002-of-00002.safetensors"))
        with pytest.raises(BnbFluxError, match="shard diffusion_pytorch_model-00002-of-00002.safetensors is missing"):
            open_flux_checkpoint(index)

    def test_full_precision_diffusers_file(self, tmp_path):
        sd = make_tiny_flux(CFG, seed=4)
        ckpt = open_flux_checkpoint(save_safetensors(diffusers_state_dict(sd, CFG, None), tmp_path / "fp.safetensors"))
        assert not ckpt.is_prequantized
        for name in LINEARS:
            assert torch.equal(ckpt.read_linear(name).weight, sd[f"{name}.weight"])
        assert all(torch.equal(ckpt.read(k), sd[k]) for k in ckpt.other_keys())


class TestFusionRule:
    """plan_rows on pieces that do not line up with the blocks: dequantize, join, quantize again."""

    def test_misaligned_pieces_are_requantized_and_reported(self):
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(3, 40, generator=g), torch.randn(5, 40, generator=g)  # 120 / 200 elements: no 64-multiple
        spec = QuantSpec("nf4", double_quant=False)
        sa, sb = quantize_weight(a, spec), quantize_weight(b, spec)
        plan = plan_rows([(PieceInfo.of("a", sa), 0, 3), (PieceInfo.of("b", sb), 0, 5)])
        assert plan.method == "requantize" and not plan.exact and "block boundaries" in plan.reason
        out = assemble_rows(plan, {"a": sa, "b": sb})
        assert out.kind == "4bit" and out.shape == (8, 40) and "quantized again" in out.note
        ref = torch.cat([sa.dequantize(), sb.dequantize()])
        # NF4 has 16 levels per block: requantizing already-quantized values moves them by under half a
        # level step relative to the block scale (~0.1); measured ~5e-2 on random data
        assert 0 < rel_err(out.dequantize(), ref) < 0.15

    def test_int8_rows_always_concatenate(self):
        g = torch.Generator().manual_seed(1)
        a, b = torch.randn(3, 40, generator=g), torch.randn(5, 40, generator=g)
        sa, sb = quantize_weight(a, QuantSpec("int8")), quantize_weight(b, QuantSpec("int8"))
        plan = plan_rows([(PieceInfo.of("a", sa), 0, 3), (PieceInfo.of("b", sb), 0, 5)])
        out = assemble_rows(plan, {"a": sa, "b": sb})
        assert plan.exact and torch.equal(out.cb, torch.cat([sa.cb, sb.cb])) and torch.equal(out.scb, torch.cat([sa.scb, sb.scb]))


class TestInt8Layout:
    @pytest.mark.parametrize("names", ["bfl", "diffusers"])
    def test_llm_int8_file(self, tmp_path, names):
        sd = exact_sd("int8")
        if names == "bfl":
            foreign = forge_state_dict(sd, "int8", False, prefix="", all_in_one=False)
        else:
            foreign = diffusers_state_dict(sd, CFG, "int8")
        ckpt = open_flux_checkpoint(save_safetensors(foreign, tmp_path / "i8.safetensors"))
        for name in LINEARS:
            stored = ckpt.read_linear(name)
            assert stored.kind == "int8"  # every Linear: Forge's layout and diffusers 0.42 alike
            assert torch.equal(stored.dequantize(), sd[f"{name}.weight"]), name
        if names == "bfl":
            state = module_state(foreign, "txt_in")
            stored = ckpt.read_linear("txt_in")
            assert torch.equal(stored.cb, state["weight"]) and torch.equal(stored.scb, state["SCB"])

    def test_tile_layout_is_refused_with_advice(self, tmp_path):
        foreign = forge_state_dict(exact_sd("int8"), "int8", False, prefix="", all_in_one=False)
        foreign["txt_in.weight_format"] = torch.tensor(2, dtype=torch.uint8)  # col_turing
        with pytest.raises(BnbFluxError, match=r"i8\.safetensors: txt_in\.weight is stored in a GPU tile layout"):
            open_flux_checkpoint(save_safetensors(foreign, tmp_path / "i8.safetensors"))


class TestWriting:
    """quantize_file writes the Forge layout bitsandbytes reads with QuantState.from_dict, and int8 in bnb's SCB layout."""

    @pytest.mark.parametrize("quant,dq", [("nf4", True), ("fp4", False), ("int8", False)])
    def test_written_file_is_bnb_layout_with_scheme_metadata(self, tmp_path, quant, dq):
        sd = make_tiny_flux(CFG, seed=5)
        src = save_safetensors({k: v.to(torch.bfloat16) for k, v in sd.items()}, tmp_path / "in.safetensors")
        dst = str(tmp_path / "out.safetensors")
        spec = QuantSpec(quant, dq)
        quantize_file(src, dst, spec, log=lambda s: None)
        written = load_file(dst)
        with safe_open(dst, "pt") as f:
            meta = f.metadata()
        assert meta["format"] == "bnb-flux" and meta["quant_type"] == quant
        if quant != "int8":
            assert meta["double_quant"] == str(dq).lower() and meta["blocksize"] == "64"
        for name in LINEARS:
            state = module_state(written, name)
            if not default_should_quantize(name, sd[f"{name}.weight"].shape[1], spec):
                assert set(state) == {"weight", "bias"} and torch.equal(state["weight"], sd[f"{name}.weight"].bfloat16())
                continue
            if quant == "int8":
                assert set(state) == {"weight", "bias", "SCB", "weight_format"} and int(state["weight_format"]) == 0
            else:
                keys = {k.format(q=quant) for k in FORGE_KEYS} | (NESTED_KEYS if dq else set())
                assert set(state) == keys
            # bitsandbytes reads it by itself, and it holds what quantizing on load holds
            ref = quantize_weight(sd[f"{name}.weight"].bfloat16(), spec)
            assert torch.equal(bnb_dequantized(state, quant), ref.dequantize()), name
            assert torch.equal(state["bias"], sd[f"{name}.bias"].bfloat16())
        assert torch.equal(written["double_blocks.0.img_attn.norm.key_norm.scale"],
                           sd["double_blocks.0.img_attn.norm.key_norm.scale"].bfloat16())

    def test_write_read_round_trip_is_byte_exact(self, tmp_path):
        sd = make_tiny_flux(CFG, seed=6)
        src = save_safetensors(sd, tmp_path / "in.safetensors")
        dst = str(tmp_path / "out.safetensors")
        spec = QuantSpec("nf4", True)
        quantize_file(src, dst, spec, quantize_img_in=True, log=lambda s: None)
        ckpt = open_flux_checkpoint(dst)
        for name in LINEARS:
            stored, ref = ckpt.read_linear(name), None
            if default_should_quantize(name, sd[f"{name}.weight"].shape[1], spec, quantize_img_in=True):
                ref = quantize_weight(sd[f"{name}.weight"], spec)
                qs, rqs = stored.quant_state, ref.quant_state
                assert torch.equal(stored.packed, ref.packed) and torch.equal(qs.absmax, rqs.absmax)
                assert torch.equal(qs.state2.absmax, rqs.state2.absmax) and torch.equal(qs.code, rqs.code)
                assert torch.equal(torch.as_tensor(qs.offset), torch.as_tensor(rqs.offset))
            else:
                assert torch.equal(stored.weight, sd[f"{name}.weight"])

    def test_diffusers_bnb_converted_to_forge_layout_without_requantizing(self, tmp_path):
        sd = exact_sd("nf4")
        src = save_safetensors(diffusers_state_dict(sd, CFG, "nf4"), tmp_path / "d.safetensors")
        dst = str(tmp_path / "forge.safetensors")
        logs = []
        quantize_file(src, dst, QuantSpec("fp4"), log=logs.append)  # --quant does not apply: the file wins
        assert any("its quantization is kept" in line for line in logs)
        ckpt = open_flux_checkpoint(dst)
        assert ckpt.layout == "bfl"
        for name in LINEARS:
            stored = ckpt.read_linear(name)
            assert stored.kind == "4bit" and stored.quant_state.quant_type == "nf4"
            assert torch.equal(stored.dequantize(), sd[f"{name}.weight"])


class TestErrorsAndCli:
    def test_missing_quant_state_names_file_tensor_and_fix(self, tmp_path):
        foreign = forge_state_dict(exact_sd("nf4"), "nf4", True)
        del foreign["model.diffusion_model.double_blocks.0.img_mlp.0.weight.quant_state.bitsandbytes__nf4"]
        path = save_safetensors(foreign, tmp_path / "cut.safetensors")
        with pytest.raises(BnbFluxError) as e:
            open_flux_checkpoint(path)
        msg = str(e.value)
        assert msg.startswith("cut.safetensors: tensor model.diffusion_model.double_blocks.0.img_mlp.0.weight has no "
                              "weight.quant_state.bitsandbytes__nf4")
        assert "incomplete" in msg and "download it again" in msg

    def test_truncated_packed_weight_is_reported(self, tmp_path):
        foreign = forge_state_dict(exact_sd("nf4"), "nf4", False, prefix="", all_in_one=False)
        foreign["txt_in.weight"] = foreign["txt_in.weight"][:-2]
        with pytest.raises(BnbFluxError, match=r"bad\.safetensors: txt_in\.weight holds .* the file is damaged"):
            open_flux_checkpoint(save_safetensors(foreign, tmp_path / "bad.safetensors"))

    def test_cli_quantize_and_inspect(self, tmp_path, capsys):
        src = save_safetensors(make_tiny_flux(CFG, seed=7, prefix="model.diffusion_model."), tmp_path / "in.safetensors")
        dst = str(tmp_path / "out.safetensors")
        assert main(["quantize", src, dst, "--quant", "fp4", "--no-double-quant"]) == 0
        out = capsys.readouterr()
        assert "quantizing" in out.err  # tqdm's bar
        assert f"wrote {dst}" in out.out and "14 of 23 Linear layers quantized, fp4" in out.out
        assert main(["inspect", dst]) == 0
        text = capsys.readouterr().out
        assert "layout: lllyasviel/Forge bnb 4-bit layout" in text and "written by comfyui-bnb-flux" in text
        assert "Linear layers: 23 (14 4-bit, 0 int8, 9 full precision)" in text
        assert "14 x fp4 (blocksize 64, no double quant)" in text
        assert "Load BnB Flux: uses the file's own quantization as stored" in text
        assert main(["inspect", src]) == 0
        text = capsys.readouterr().out
        assert "full precision" in text and "python -m quant_expand.cli quantize" in text
        assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 1
        assert "missing.safetensors" in capsys.readouterr().err

    def test_inspect_reports_fusion(self, tmp_path):
        foreign = diffusers_state_dict(exact_sd("nf4"), CFG, "nf4", double_quant=True)
        text = inspect_file(save_safetensors(foreign, tmp_path / "d.safetensors"))
        assert "layout: diffusers-bnb 4-bit" in text
        assert "1 on the stored bytes, 3 with absmax de-nested (both exact), 0 requantized (lossy)" in text
        assert "23 4-bit, 0 int8, 0 full precision" in text  # diffusers 0.42 quantizes proj_out too


def test_stored_linear_dequantize_matches_bnb(tmp_path):
    """The reader's dequantize is bitsandbytes' own on the same state (the reference every test uses)."""
    w = make_tiny_flux(CFG, seed=8)["txt_in.weight"]
    state = bnb_linear_state(w, None, "nf4", True)
    qs = QuantState.from_dict({k[len("weight."):]: v for k, v in state.items() if k != "weight"}, torch.device("cpu"))
    stored = StoredLinear(StoredKind.FOUR_BIT, packed=state["weight"], quant_state=qs)
    assert torch.equal(stored.dequantize(), bnb_dequantized(state, "nf4"))
