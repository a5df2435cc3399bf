"""``cli inspect`` and ``cli quantize`` on real files: what they say about models and LoRAs, the exit status,
the same refusal messages as the nodes (Load BnB Flux and Apply Control LoRA, run by the in-process ComfyUI),
and what ``quantize`` leaves on disk when it must not or cannot write."""
from __future__ import annotations

import inspect as pyinspect
import os
import subprocess
import sys

import pytest
import torch

from prequantized_files import forge_state_dict
from quant_expand.checkpoint.reader import open_flux_checkpoint
from quant_expand.cli import BNB_HUB_KERNEL_WARNING, main
from quant_expand.lora.parse import parse_lora
from quant_expand.testing.prompts import apply_lora, load_bnb_flux, sampling_graph
from quant_expand.testing.synthetic import (TinyFluxConfig, bfl_lora_to_diffusers, make_control_lora, make_lora,
                                            make_tiny_flux, save_safetensors)
from quant_expand.tools.lora_info import implied_model

CFG = TinyFluxConfig()
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL, CONTROL, STYLE = "cli_model.safetensors", "cli_control.safetensors", "cli_style.safetensors"


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0][len("error: "):]


# ---------------------------------------------------------------- files, in the in-process ComfyUI's folders

@pytest.fixture(scope="module")
def files(host):
    model = lambda n: host.model_path("diffusion_models", n)  # noqa: E731
    lora = lambda n: host.model_path("loras", n)  # noqa: E731
    sd = make_tiny_flux(CFG, seed=0, exact_for="nf4")
    save_safetensors(sd, model(MODEL))
    save_safetensors(make_control_lora(CFG, seed=2), lora(CONTROL))
    style = make_lora(CFG, kind="lora", seed=7, alpha=4.0)
    save_safetensors(style, lora(STYLE))
    save_safetensors(make_lora(CFG, kind="kohya", seed=3), lora("cli_kohya.safetensors"))
    save_safetensors(bfl_lora_to_diffusers(make_lora(CFG, kind="lora", seed=4), CFG), lora("cli_diffusers.safetensors"))
    save_safetensors(make_lora(CFG, kind="loha", seed=5), lora("cli_loha.safetensors"))
    # FLUX.1 dev's real width, on two layers only (a full-size LoRA would be hundreds of MB)
    save_safetensors(make_lora(TinyFluxConfig(hidden_size=3072), kind="lora", rank=4, seed=6,
                               targets=["double_blocks.0.img_attn.qkv", "single_blocks.0.linear2"]),
                     lora("cli_flux1_size.safetensors"))

    nan = dict(style)
    nan["diffusion_model.single_blocks.0.linear1.lora_B.weight"] = nan["diffusion_model.single_blocks.0.linear1.lora_B.weight"].clone()
    nan["diffusion_model.single_blocks.0.linear1.lora_B.weight"][3, 1] = float("nan")
    save_safetensors(nan, lora("cli_nan_lora.safetensors"))
    ranks = dict(style)
    key_a = "diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight"
    ranks[key_a] = torch.randn(6, ranks[key_a].shape[1])
    save_safetensors(ranks, lora("cli_rank_lora.safetensors"))
    save_safetensors({k: (v * 100).to(torch.int8) for k, v in style.items()}, lora("cli_int8_lora.safetensors"))
    save_safetensors({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(4, 640),
                      "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(640, 4)},
                     lora("cli_sdxl_lora.safetensors"))

    incomplete = dict(sd)
    del incomplete["single_blocks.0.linear2.weight"]
    save_safetensors(incomplete, model("cli_incomplete.safetensors"))
    for name, key in (("cli_nan_final.safetensors", "final_layer.linear.weight"),
                      ("cli_nan_bias.safetensors", "txt_in.bias")):
        damaged = dict(sd)
        damaged[key] = damaged[key].clone()
        damaged[key].view(-1)[1] = float("nan")
        save_safetensors(damaged, model(name))
    with open(model(MODEL), "rb") as f:
        raw = f.read()
    with open(model("cli_truncated.safetensors"), "wb") as f:
        f.write(raw[: len(raw) // 2])
    save_safetensors({"input_blocks.0.0.weight": torch.randn(32, 4, 3, 3), "time_embed.0.weight": torch.randn(64, 32)},
                     model("cli_sdxl_unet.safetensors"))
    cut = forge_state_dict(make_tiny_flux(CFG, seed=0, exact_for="nf4"), "nf4", True, all_in_one=False)
    del cut["model.diffusion_model.double_blocks.0.img_mlp.0.weight.absmax"]
    save_safetensors(cut, model("cli_no_absmax.safetensors"))
    return {"model": model, "lora": lora}


def node_error(host, graph: dict, node_id: str) -> str:
    res = host.run(graph, expect_error=True)
    assert "validation" not in res, res
    (err,) = res["errors"]
    assert err["node_id"] == node_id, err
    return err["exception_message"].rstrip("\n")  # ComfyUI ends it with a newline


def loader_error(host, name: str) -> str:
    """The message Load BnB Flux fails with on this file."""
    return node_error(host, sampling_graph({"q": load_bnb_flux(name)}, ["q", 0], steps=1), "q")


def apply_lora_error(host, name: str) -> str:
    """The message Apply Control LoRA fails with on this file (on the tiny model)."""
    g = {"q": load_bnb_flux(MODEL), "c": apply_lora(["q", 0], name, 1.0)}
    return node_error(host, sampling_graph(g, ["c", 0], steps=1), "c")


# ---------------------------------------------------------------- inspect: LoRAs

def test_inspect_describes_a_control_lora_as_apply_control_lora_parses_it(files, capsys):
    rc, out, err = cli(capsys, "inspect", files["lora"](CONTROL))
    assert rc == 0, err
    assert "a FLUX Control LoRA, not a diffusion model" in out
    assert "format: BFL" in out and "23 low-rank layers, rank 16" in out
    assert "6 QK-norm scales replaced, img_in widened to 128 inputs" in out
    assert "hidden size 256" in out and "does not fit them" in out
    assert "Apply Control LoRA" in out and "InstructPixToPixConditioning" in out
    assert "cli quantize" not in out and "full precision" not in out
    # the model the file implies is the model it was made for, Linear by Linear
    ckpt = open_flux_checkpoint(files["model"](MODEL))
    real = {n: ckpt.linear_shape(n) for n in ckpt.linear_names()}
    ckpt.close()
    from quant_expand.checkpoint.tensor_files import TensorFile

    lora = TensorFile(files["lora"](CONTROL))
    try:
        assert implied_model(lora, CONTROL) == real
        on_model = parse_lora(lora, CONTROL, real)  # what Apply Control LoRA builds on the real model
    finally:
        lora.close()
    assert len(on_model.layers) == 23 and on_model.widened == {"img_in": 128} and len(on_model.norm_sets) == 6


@pytest.mark.parametrize("name,phrases", [
    (STYLE, ["a FLUX LoRA, not a diffusion model", "format: BFL", "16 low-rank layers, rank 8", "scale: 0.5 (alpha/rank)"]),
    ("cli_kohya.safetensors", ["format: kohya", "16 low-rank layers, rank 8"]),
    ("cli_diffusers.safetensors", ["format: diffusers/PEFT", "low-rank layers, rank 8"]),
    ("cli_flux1_size.safetensors", ["2 low-rank layers, rank 4", "made for: FLUX.1 (hidden size 3072, as dev and schnell)"]),
])
def test_inspect_describes_ordinary_loras(files, capsys, name, phrases):
    rc, out, err = cli(capsys, "inspect", files["lora"](name))
    assert rc == 0, err
    for phrase in phrases:
        assert phrase in out, (phrase, out)
    assert "widened" not in out and "a FLUX Control LoRA" not in out and "a FLUX LoRA, not a diffusion model" in out
    assert "use: put it in models/loras and pick it in Apply Control LoRA" in out and "Set LoRA Scale" in out
    assert "cli quantize" not in out and "full precision" not in out


@pytest.mark.parametrize("name", ["cli_nan_lora.safetensors", "cli_rank_lora.safetensors", "cli_int8_lora.safetensors",
                                  "cli_loha.safetensors", "cli_sdxl_lora.safetensors"])
def test_inspect_refuses_a_lora_with_apply_control_loras_message(host, files, capsys, name):
    rc, out, err = cli(capsys, "inspect", files["lora"](name))
    assert rc == 1 and out == ""
    assert one_error_line(err) == apply_lora_error(host, name)


# ---------------------------------------------------------------- inspect: models Load BnB Flux refuses

@pytest.mark.parametrize("name", ["cli_incomplete.safetensors", "cli_truncated.safetensors", "cli_no_absmax.safetensors"])
def test_inspect_refuses_a_model_with_load_bnb_fluxs_message(host, files, capsys, name):
    rc, out, err = cli(capsys, "inspect", files["model"](name))
    assert rc == 1 and out == ""
    assert one_error_line(err) == loader_error(host, name)


def test_inspect_refuses_what_is_no_flux_model(host, files, capsys):
    """Load BnB Flux names what ComfyUI's model detection found; inspect, which runs without ComfyUI, names the
    FLUX tensors it did not find. Both refuse the file as no FLUX model."""
    name = "cli_sdxl_unet.safetensors"
    rc, out, err = cli(capsys, "inspect", files["model"](name))
    assert rc == 1 and out == ""
    line = one_error_line(err)
    assert line.startswith(f"{name}: not a FLUX diffusion model (no double_blocks.0.img_attn.norm")
    assert line.endswith("Load BnB Flux reads FLUX.1 dev/schnell, FLUX.2 dev/klein and Chroma safetensors, with "
                         "BFL/ComfyUI or diffusers key names")
    assert loader_error(host, name).startswith(f"{name}: not a FLUX diffusion model")


def test_inspect_verify_finds_damaged_values_as_the_loader_does(host, files, capsys):
    path = files["model"]("cli_nan_final.safetensors")
    rc, out, _ = cli(capsys, "inspect", path)
    assert rc == 0 and "verified" not in out  # the header is sound; the values are not read without --verify
    rc, out, err = cli(capsys, "inspect", "--verify", path)
    assert rc == 1 and out == ""
    assert one_error_line(err) == loader_error(host, "cli_nan_final.safetensors")
    rc, out, err = cli(capsys, "inspect", "--verify", files["model"]("cli_nan_bias.safetensors"))
    assert rc == 1 and one_error_line(err) == loader_error(host, "cli_nan_bias.safetensors")
    rc, out, err = cli(capsys, "inspect", "--verify", files["model"](MODEL))
    assert rc == 0 and "verified: every tensor read" in out, err


def test_inspect_missing_file(tmp_path, capsys):
    rc, out, err = cli(capsys, "inspect", str(tmp_path / "nothing.safetensors"))
    assert rc == 1 and one_error_line(err) == f"{tmp_path / 'nothing.safetensors'}: no such file"


def test_inspect_help_documents_the_exit_status(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 the pack's nodes read the file" in text and "1 they refuse it" in text


# ---------------------------------------------------------------- quantize

def test_quantize_keeps_an_existing_out_unless_told(files, tmp_path, capsys):
    src, dst = files["model"](MODEL), tmp_path / "out.safetensors"
    dst.write_bytes(b"an earlier file")
    rc, out, err = cli(capsys, "quantize", src, str(dst))
    assert rc == 1 and one_error_line(err) == f"{dst} exists; pass --overwrite to replace it, or choose another OUT"
    assert dst.read_bytes() == b"an earlier file"
    rc, out, err = cli(capsys, "quantize", src, str(dst), "--overwrite", "--device", "cpu")
    assert rc == 0, err
    assert "layout: lllyasviel/Forge bnb 4-bit layout" in out and "14 x nf4" in out
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]  # no temporary file left beside it
    rc, out, err = cli(capsys, "inspect", str(dst))
    assert rc == 0 and "Linear layers: 23 (14 4-bit, 0 int8, 9 full precision)" in out


@pytest.mark.parametrize("existing", [False, True])
def test_quantize_that_cannot_finish_writing_leaves_no_partial_file(files, tmp_path, existing):
    """A real write failure (the process may write at most 1 MiB per file; the NF4 file is ~3 MiB): the output
    is written under a temporary name and renamed at the end, so nothing half-written remains and an older
    OUT stays as it was."""
    dst = tmp_path / "out.safetensors"
    if existing:
        dst.write_bytes(b"an earlier file")
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
            "from quant_expand.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "quantize", files["model"](MODEL), str(dst), "--overwrite",
                           "--device", "cpu"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {dst}: not written (") and "File too large" in line, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path)) == (["out.safetensors"] if existing else [])
    if existing:
        assert dst.read_bytes() == b"an earlier file"


@pytest.mark.parametrize("name,where,phrase", [
    (CONTROL, "lora", "a LoRA, not a diffusion model; apply it with Apply Control LoRA"),
    ("cli_nan_bias.safetensors", "model", "tensor txt_in.bias holds NaN or inf values"),
    ("cli_incomplete.safetensors", "model", "single_blocks.0.linear2.weight is missing"),
])
def test_quantize_refuses_what_load_bnb_flux_refuses(files, tmp_path, capsys, name, where, phrase):
    dst = tmp_path / "out.safetensors"
    rc, out, err = cli(capsys, "quantize", files[where](name), str(dst), "--device", "cpu")
    assert rc == 1
    line = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(line) == 1 and line[0].startswith(f"error: {name}: ") and phrase in line[0], err
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- bitsandbytes' hub kernel warning

def test_the_cli_drops_only_bitsandbytes_hub_kernel_warning(files):
    """bitsandbytes' CPU backend logs this message when its optional hub kernel cannot load; the command line
    drops that one message (its source must still say it that way, or the filter is stale) and no other."""
    import bitsandbytes.backends.cpu.ops as cpu_ops

    assert f'"{BNB_HUB_KERNEL_WARNING}: %s.' in pyinspect.getsource(cpu_ops)
    code = ("import logging, sys\n"
            "from quant_expand.cli import main\n"
            "rc = main(sys.argv[1:])\n"
            "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
            f"log.warning({BNB_HUB_KERNEL_WARNING + ': %s. (emitted again by the test)'!r}, 'reason')\n"
            "log.warning('another bitsandbytes warning')\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code, "inspect", files["model"](MODEL)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "kernels-community" not in proc.stderr and "another bitsandbytes warning" in proc.stderr, proc.stderr
    assert "Linear layers: 23" in proc.stdout


def test_bitsandbytes_hub_kernel_warning_is_what_the_readme_explains():
    """What the README says about the warning, checked against bitsandbytes itself: its CPU backend is the one
    that asks the hub, only for the fused 4-bit GEMV, and the pack never calls that op."""
    import bitsandbytes.backends.cpu.ops as cpu_ops

    source = pyinspect.getsource(cpu_ops)
    at = source.index(BNB_HUB_KERNEL_WARNING)
    assert "gemm_4bit_forward" in source[:at] and 'register_kernel("bitsandbytes::gemv_4bit", "cpu")' in source[at:]
    pack = []
    for folder, _, names in os.walk(os.path.join(REPO_ROOT, "quant_expand")):
        pack += [open(os.path.join(folder, n), encoding="utf-8").read() for n in names if n.endswith(".py")]
    assert not any("gemv_4bit" in text or "matmul_4bit" in text for text in pack)
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        assert "kernels-community" in f.read()


def test_quantize_names_a_device_it_cannot_use(files, tmp_path, capsys):
    dst = tmp_path / "out.safetensors"
    rc, out, err = cli(capsys, "quantize", files["model"](MODEL), str(dst), "--device", "gpu")
    assert rc == 1 and one_error_line(err) == "--device gpu: not a device; use auto, cpu, cuda or cuda:N"
    rc, out, err = cli(capsys, "quantize", files["model"](MODEL), str(dst), "--device", f"cuda:{torch.cuda.device_count()}")
    assert rc == 1 and one_error_line(err).startswith(f"--device cuda:{torch.cuda.device_count()}: no such CUDA device")
    assert os.listdir(tmp_path) == []


def test_float8_files_are_checked_and_quantized(tmp_path, capsys):
    """torch has no isfinite for float8_e4m3fn: the value checks widen such weights first."""
    sd = make_tiny_flux(CFG, seed=0)
    src = save_safetensors({k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in sd.items()},
                           tmp_path / "fp8.safetensors")
    rc, out, err = cli(capsys, "inspect", "--verify", src)
    assert rc == 0 and "verified: every tensor read" in out, err
    rc, out, err = cli(capsys, "quantize", src, str(tmp_path / "nf4.safetensors"), "--device", "cpu")
    assert rc == 0 and "14 x nf4" in out, err
    broken = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in sd.items()}
    broken["img_in.weight"] = broken["img_in.weight"].clone()
    broken["img_in.weight"].view(torch.uint8)[0, 0] = 0x7F  # e4m3fn's NaN
    rc, out, err = cli(capsys, "inspect", "--verify", save_safetensors(broken, tmp_path / "fp8_nan.safetensors"))
    assert rc == 1 and one_error_line(err) == ("fp8_nan.safetensors: tensor img_in.weight holds NaN or inf values; "
                                               "the file is damaged: download it again")
