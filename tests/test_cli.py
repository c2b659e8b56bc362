"""The `sdxl-trt` front door: help for every subcommand, one-line errors with exit 2, the demo's PNG."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_trt.runtime.cli import main

SUBCOMMANDS = ["export", "build", "generate", "bench", "serve", "inspect", "demo"]


def console_script() -> str | None:
    """The `sdxl-trt` that pip installed beside this interpreter (the venv's bin/), else one on PATH."""
    beside = Path(sys.executable).parent / "sdxl-trt"
    return str(beside) if beside.is_file() else shutil.which("sdxl-trt")


def run_cli(*args):
    return subprocess.run([console_script(), *args], capture_output=True, text=True, timeout=300)


def test_console_script_is_installed():
    assert console_script(), "pip install put no sdxl-trt script beside python or on PATH"
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("sdxl-trt ")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: sdxl-trt {command}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, names", [
    (["export", "--out", "d"], "--model is required"),
    (["export", "--model", "nowhere/model", "--out", "d"], "'nowhere/model'"),
    (["export", "--model", "tiny:huge", "--out", "d"], "'tiny:huge'"),
    (["export", "--model", "tiny:base", "--refiner", "tiny:base", "--out", "d"], "--refiner 'tiny:base'"),
])
def test_bad_model_is_one_line_and_exit_2(argv, names, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and names in err


def test_export_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "engine"
    assert main(["export", "--model", "tiny:base", "--out", str(out), "--components", "clip_l", "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "clip_l fp32 hidden_states at 3×192×320: rel-L2" in printed and f"wrote {out}" in printed
    assert (out / "onnx" / "clip_l" / "model.fp16.onnx").is_file()
    assert main(["export", "--model", "tiny:base", "--out", str(out), "--components", "clip_l"]) == 2
    assert "--force" in capsys.readouterr().err


def test_bad_model_from_the_shell(tmp_path):
    (tmp_path / "not-sdxl.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    for spec, expect in [(str(tmp_path), "without model_index.json"),
                         (str(tmp_path / "not-sdxl.safetensors"), "not an SDXL checkpoint"),
                         ("random:huge", "unknown built-in")]:
        out = run_cli("export", "--model", spec, "--out", str(tmp_path / "out"))
        assert out.returncode == 2, out.stderr
        assert out.stderr.count("\n") == 1 and expect in out.stderr and "accepted:" in out.stderr
        assert not (tmp_path / "out").exists()


def test_argparse_errors_are_one_line():
    out = run_cli("generate")
    assert out.returncode == 2 and out.stderr.count("\n") == 1


def test_demo_writes_a_png(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--steps", "3", "--size", "64x96", "--seed", "7"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (64, 96) and image.mode == "RGB"
        assert '"seed": 7' in image.text["sdxl-trt"]
    assert [p.name for p in tmp_path.iterdir()] == ["demo.png"]  # no temp file left beside it


@pytest.mark.parametrize("flags, message", [
    (["--size", "100x100"], "multiples of 8"),
    (["--size", "big"], "WIDTHxHEIGHT"),
    (["--steps", "0"], "--steps"),
    (["--out", "{dir}"], "is a folder"),
    (["--out", "{dir}/x.jpg"], "expected a .png file name"),
    (["--out", "{dir}/missing/x.png"], "does not exist"),
    (["--seed", "-1"], "--seed -1: expected a whole number from 0 to"),
])
def test_demo_bad_input_writes_nothing(tmp_path, flags, message, capsys, monkeypatch):
    """Refused before the tiny model is exported (seconds of work), with nothing written."""
    from sdxl_trt.export import engine_dir

    def export(*args, **kwargs):
        raise AssertionError("the demo started exporting before it checked its input")

    monkeypatch.setattr(engine_dir, "export_engine_dir", export)
    flags = [f.format(dir=tmp_path) for f in flags]
    assert main(["demo", *flags]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_generate_writes_pngs_with_their_parameters(tiny_engine, tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert main(["generate", str(tiny_engine), "a cat", "--size", "64x96", "--steps", "3", "--seed", "5",
                 "--batch", "2", "--out", str(out), "--timings"]) == 0
    printed = capsys.readouterr().out
    assert "timings: text" in printed
    paths = [tmp_path / "cat-1.png", tmp_path / "cat-2.png"]
    assert sorted(tmp_path.iterdir()) == paths
    for path, seed in zip(paths, (5, 6)):
        with Image.open(path) as image:
            assert image.size == (64, 96)
            params = json.loads(image.text["sdxl-trt"])
            assert params["seed"] == seed and params["prompt"] == "a cat" and len(params["manifest_sha256"]) == 64


def test_generate_low_memory_and_cuda_graph_flags(tiny_engine, tmp_path, capsys):
    out = tmp_path / "low.png"
    assert main(["generate", str(tiny_engine), "a cat", "--size", "64x96", "--steps", "2", "--seed", "1",
                 "--low-memory", "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size == (64, 96)
    with pytest.raises(SystemExit) as exit:
        main(["generate", str(tiny_engine), "a cat", "--cuda-graphs", "sometimes"])
    assert exit.value.code == 2 and "--cuda-graphs" in capsys.readouterr().err


def test_generate_long_prompt_chunks(tiny_engine, tmp_path):
    out = tmp_path / "long.npy"
    assert main(["generate", str(tiny_engine), "castle " * 150, "--long-prompt", "chunk", "--size", "64x64",
                 "--steps", "2", "--output-type", "latent", "--out", str(out)]) == 0
    assert np.load(out).shape == (1, 4, 8, 8)


def test_generate_latents_and_prompt_files(tiny_engine, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n  a dog  \n", encoding="utf-8")
    out = tmp_path / "z.npy"
    assert main(["generate", str(tiny_engine), "--prompts", str(prompts), "--size", "64x64", "--steps", "2",
                 "--output-type", "latent", "--out", str(out), "--seed", "1"]) == 0
    assert [np.load(p).shape for p in sorted(tmp_path.glob("z-*.npy"))] == [(1, 4, 8, 8)] * 2


@pytest.mark.parametrize("argv, message", [
    (["--size", "65x64"], "multiples of 8"),
    (["--steps", "0"], "--steps"),
    (["--batch", "0"], "--batch"),
    (["--sampler", "plms"], "plms"),
    (["--refiner-start", "1.5"], "between 0 and 1"),
    (["--out", "{tmp}/x.jpg"], ".png"),
    (["--latents", "{tmp}/missing.npy"], "--latents"),
    (["--prompts", "{tmp}/missing.txt"], "--prompts"),
    (["--backend", "magic"], "magic"),
    (["--batch", "17"], "more than the 16"),
    (["--batch", "100000"], "more than the 16"),
    (["--size", "100000x100000"], "megapixels"),
    (["--size", "4104x4104"], "megapixels"),
    (["--guidance", "nan"], "guidance nan: expected a finite number"),
    (["--guidance", "inf"], "guidance inf: expected a finite number"),
    (["--guidance-rescale", "nan"], "--guidance-rescale nan"),
    (["--guidance-rescale", "1.5"], "between 0 and 1"),
    (["--guidance-rescale", "-0.1"], "between 0 and 1"),
    (["--seed", "-5"], "seed -5: expected a whole number from 0"),
    (["--seed", str(2**64)], "expected a whole number from 0"),
])
def test_generate_bad_input_writes_nothing(tiny_engine, tmp_path, argv, message, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    keep = tmp_path / "keep.png"
    keep.write_bytes(b"an earlier result")
    assert main(["generate", str(tiny_engine), "a cat", "--size", "64x64", "--steps", "2",
                 "--out", str(keep), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == [keep] and keep.read_bytes() == b"an earlier result"


def test_generate_img2img_and_refine(tiny_engine, tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((72, 100, 3), np.uint8) + 128).save(tmp_path / "in.png")
    assert main(["generate", str(tiny_engine), "a cat", "--init-image", str(tmp_path / "in.png"), "--strength", "0.6",
                 "--steps", "4", "--seed", "2", "--refine-strength", "0.3", "--out", str(tmp_path / "out.png")]) == 0
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (96, 72)  # the input's size rounded down to a multiple of 8
        assert json.loads(image.text["sdxl-trt"])["strength"] == 0.6


@pytest.mark.parametrize("argv, message", [
    (["--init-image", "{tmp}/missing.png"], "no such file"),
    (["--init-image", "{tmp}/bad.png"], "not a readable image"),
    (["--strength", "0.5"], "goes with --init-image"),
    (["--mask", "m.png"], "goes with --init-image"),
    (["--init-image", "{tmp}/img.png", "--mask", "{tmp}/small.png"], "same size"),
])
def test_generate_bad_images(tiny_engine, tmp_path, argv, message, capsys):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    Image.new("RGB", (64, 64)).save(tmp_path / "img.png")
    Image.new("L", (32, 32)).save(tmp_path / "small.png")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(["generate", str(tiny_engine), "a cat", "--out", str(tmp_path / "x.png"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_generate_inpainting(tiny_engine, tmp_path):
    Image.new("RGB", (96, 64), (40, 90, 200)).save(tmp_path / "in.png")
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 24:72] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["generate", str(tiny_engine), "a window", "--init-image", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "mask.png"), "--steps", "4", "--seed", "1", "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size == (96, 64) and json.loads(image.text["sdxl-trt"])["mask"].endswith("mask.png")


def test_generate_on_a_missing_or_tampered_engine_dir(tiny_engine, tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "a cat"]) == 2
    assert "does not exist" in capsys.readouterr().err
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_engine, copy)
    (copy / "onnx" / "unet" / "model.onnx").write_bytes(b"garbage")
    assert main(["generate", str(copy), "a cat", "--out", str(tmp_path / "x.png")]) == 2
    assert "unet/model.onnx" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_sigterm_during_export_leaves_nothing_behind(tmp_path):
    """SIGTERM (what a service manager or `kill` sends) cleans up like Ctrl-C: exit 130, no partial directory, no
    traceback. (A handler that runs inside a finalizer cannot raise, which was seen in CI: the CLI delivers the
    signal again itself.) The signal is sent mid-export, checked: once the export has visibly started on the UNet
    (its progress line on stderr) and while it has not finished (the process runs, no manifest written). Only if
    it is still running 3 s later is the signal repeated, as a service manager's stop may; a repeat that finds
    main() already returned may then end the process by SIGTERM's default action instead of exit 130."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    out = tmp_path / "engine"
    child = subprocess.Popen([sys.executable, "-m", "sdxl_trt.runtime.cli", "export", "--model", "tiny:base",
                              "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = bytearray()
    reader = threading.Thread(target=lambda: [err.extend(c) for c in iter(lambda: child.stderr.read1(4096), b"")],
                              daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while b"export unet" not in err:  # the text encoders are done, the UNet's export has begun
        assert child.poll() is None, f"exited {child.returncode} before exporting the UNet: {bytes(err)!r}"
        assert time.monotonic() < deadline, "the export never reached the UNet"
        time.sleep(0.02)
    assert child.poll() is None and not (out / "manifest.json").exists(), "the export finished before the signal"
    assert any(p.name.startswith(".tmp-engine") for p in tmp_path.iterdir())  # it is writing its temporary folder
    signals = 0
    while child.poll() is None and signals < 5:
        child.send_signal(signal.SIGTERM)
        signals += 1
        try:
            child.wait(3)
        except subprocess.TimeoutExpired:
            pass
    if child.poll() is None:
        child.kill()
    child.wait(10)
    reader.join(10)
    text = err.decode(errors="replace")
    assert "Traceback" not in text and "Exception ignored" not in text, text
    assert "sdxl-trt export: interrupted" in text, text
    assert child.returncode == 130 or (signals > 1 and child.returncode == -signal.SIGTERM), (signals, text[-2000:])
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary sibling left


def test_an_interrupt_dropped_in_a_finalizer_is_delivered_again(monkeypatch):
    import os
    import signal
    import types

    from sdxl_trt.runtime import cli

    scheduled, printed = [], []

    class Timer:
        def __init__(self, delay, function, args):
            self.call = (function, args)

        def start(self):
            scheduled.append(self.call)

    monkeypatch.setattr(cli.threading, "Timer", Timer)
    hook = cli._redeliver_interrupts(printed.append)
    hook(types.SimpleNamespace(exc_value=KeyboardInterrupt()))  # our SIGTERM handler, run inside a __del__
    hook(types.SimpleNamespace(exc_value=ValueError("a finalizer's own error")))
    assert scheduled == [(os.kill, (os.getpid(), signal.SIGTERM))]
    assert len(printed) == 1 and isinstance(printed[0].exc_value, ValueError)  # other errors are reported as before
