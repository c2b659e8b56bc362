"""The bad-input catalogue for the commands that write engine directories (export, optimize, build), read them
(inspect) and the input files `generate` takes: each case is a mistake a user can make; the answer is one line on
stderr, exit status 2, no traceback, and nothing written or changed. (More of generate's catalogue: test_cli.py and
test_robustness.py.)"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from sdxl_trt.runtime.cli import main


def tree_digest(root: Path) -> dict:
    """Every file under root with its size and sha256 of the first MiB: what 'nothing changed' compares."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, hashlib.sha256(p.read_bytes()[:1 << 20]).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_engine):
    """Broken sources and engine directories, made once."""
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.safetensors").write_bytes(b"")
    (d / "garbage.safetensors").write_bytes(b"\x89not a safetensors header" * 64)
    (d / "huge-header.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    (d / "model.ckpt").write_bytes(b"\x80\x04\x95pickle")
    (d / "no-index").mkdir()
    (d / "no-index" / "unet").mkdir()
    (d / "a-file").write_text("not a folder")
    (d / "full").mkdir()
    (d / "full" / "keep.txt").write_text("mine")
    broken = d / "broken-manifest"
    shutil.copytree(tiny_engine, broken)
    (broken / "manifest.json").write_text("{ not json")
    foreign = d / "foreign-manifest"
    shutil.copytree(tiny_engine, foreign)
    data = json.loads((foreign / "manifest.json").read_text())
    data["format_version"] = 99
    (foreign / "manifest.json").write_text(json.dumps(data))
    shutil.copytree(tiny_engine, d / "good")
    import numpy as np

    (d / "prompts-latin1.txt").write_bytes("a caf\xe9 at night\n".encode("latin-1"))
    (d / "prompts-blank.txt").write_text("\n   \n\n")
    np.save(d / "latents-shape.npy", np.zeros((1, 4, 9, 8), np.float32))
    np.save(d / "latents-int.npy", np.zeros((1, 4, 8, 8), np.int64))
    np.save(d / "latents-nan.npy", np.full((1, 4, 8, 8), np.nan, np.float32))
    np.save(d / "latents-object.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (d / "not-a-png.png").write_bytes(b"GIF89a nonsense")
    from PIL import Image

    Image.new("RGB", (64, 64)).save(d / "in.png")  # an input image the run must not write over

    Image.new("1", (20000, 20000)).save(d / "bomb.png")  # 400 megapixels in a few kilobytes
    (d / "latents-empty.npy").write_bytes(b"")
    (d / "prompts-folder").mkdir()
    (d / "taken").mkdir()
    (d / "taken" / "x-2.png").mkdir()  # the second image's name of a batch is a folder
    from safetensors.numpy import save_file

    save_file({"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": np.zeros((0, 64), np.float32),
               "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": np.zeros((64, 0), np.float32)},
              str(d / "rank0.safetensors"))
    save_file({"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": np.zeros((4, 64), np.float32),
               "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": np.zeros((64, 4), np.float32)},
              str(d / "offsets.safetensors"))
    raw = (d / "offsets.safetensors").read_bytes()
    (d / "offsets.safetensors").write_bytes(raw.replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1))
    weird = d / "weird-manifest"
    shutil.copytree(tiny_engine, weird)
    data = json.loads((weird / "manifest.json").read_text())
    data["components"]["unet"]["weights_sha256"] = 5
    (weird / "manifest.json").write_text(json.dumps(data))
    deep = d / "deep-manifest"
    deep.mkdir()
    (deep / "manifest.json").write_text('{"a":' * 100000)
    (d / "flops.json").write_text('{"not": "a table"}')
    escape = d / "escaping-manifest"
    shutil.copytree(tiny_engine, escape)
    data = json.loads((escape / "manifest.json").read_text())
    unet = data["components"]["unet"]
    unet["precisions"] = {"fp32": "../../etc/passwd", "fp16": "../../etc/passwd"}
    unet["files"] = {"fp32": ["../../etc/passwd"], "fp16": ["../../etc/passwd"]}
    (escape / "manifest.json").write_text(json.dumps(data))
    return d


CASES = [  # (argv with {bad} / {engine} placeholders, what the one line must say, folder that must stay as it was)
    (["export", "--model", "tiny:base", "--components", "transformer", "--out", "{bad}/out1"], "transformer", "out1"),
    (["export", "--model", "tiny:base", "--components", "unet_refiner", "--out", "{bad}/out2"], "refiner", "out2"),
    (["export", "--model", "{bad}/empty.safetensors", "--out", "{bad}/out3"], "empty.safetensors", "out3"),
    (["export", "--model", "{bad}/garbage.safetensors", "--out", "{bad}/out4"], "garbage.safetensors", "out4"),
    (["export", "--model", "{bad}/huge-header.safetensors", "--out", "{bad}/out5"], "huge-header.safetensors", "out5"),
    (["export", "--model", "{bad}/model.ckpt", "--out", "{bad}/out6"], "--allow-pickle", "out6"),
    (["export", "--model", "{bad}/no-index", "--out", "{bad}/out7"], "no-index", "out7"),
    (["export", "--model", "tiny:base", "--vae", "{bad}/missing.safetensors", "--out", "{bad}/out8"], "missing", "out8"),
    (["export", "--model", "tiny:base", "--out", "{bad}/a-file"], "a-file", "a-file"),
    (["export", "--model", "tiny:base", "--out", "{bad}/full"], "--force", "full"),
    (["export", "--model", "tiny:base", "--precision", "fp8", "--out", "{bad}/out9"], "fp8", "out9"),
    (["export", "--model", "tiny:base", "--vae", "{bad}/in.png", "--out", "{bad}/out10"], "--vae", "out10"),
    (["export", "--model", "tiny:base", "--refiner", "{bad}/in.png", "--out", "{bad}/out11"], "--refiner", "out11"),
    (["export", "--model", "tiny:base", "--components", "controlnet", "--out", "{bad}/out12"], "--controlnet", "out12"),
    (["generate", "{engine}", "--prompts", "{bad}/prompts-latin1.txt", "--out", "{bad}/g.png"], "not UTF-8", "g.png"),
    (["generate", "{engine}", "--prompts", "{bad}/prompts-blank.txt", "--out", "{bad}/g.png"], "no prompt", "g.png"),
    (["generate", "{engine}", "a cat", "--size", "64x64", "--latents", "{bad}/latents-shape.npy", "--out",
      "{bad}/g.png"], "latents", "g.png"),
    (["generate", "{engine}", "a cat", "--size", "64x64", "--latents", "{bad}/latents-int.npy", "--out",
      "{bad}/g.png"], "latents", "g.png"),
    (["generate", "{engine}", "a cat", "--size", "64x64", "--latents", "{bad}/latents-nan.npy", "--out",
      "{bad}/g.png"], "latents", "g.png"),
    (["generate", "{engine}", "a cat", "--size", "64x64", "--latents", "{bad}/latents-object.npy", "--out",
      "{bad}/g.png"], "latents", "g.png"),
    (["generate", "{engine}", "a cat", "--size", "64x64", "--init-image", "{bad}/not-a-png.png", "--out",
      "{bad}/g.png"], "not-a-png.png", "g.png"),
    (["generate", "{bad}/escaping-manifest", "a cat", "--size", "64x64", "--out", "{bad}/g.png"],
     "outside the engine directory", "g.png"),
    (["generate", "{engine}", "a cat", "--size", "64x64", "--init-image", "{bad}/bomb.png", "--out", "{bad}/g.png"],
     "too many pixels", "g.png"),
    (["generate", "{engine}", "a cat", "--size", "64x64", "--latents", "{bad}/latents-empty.npy", "--out",
      "{bad}/g.png"], "--latents", "g.png"),
    (["generate", "{engine}", "--prompts", "{bad}/prompts-folder", "--out", "{bad}/g.png"], "--prompts", "g.png"),
    (["generate", "{engine}", "a cat", "--size", "64x64", "--batch", "2", "--out", "{bad}/taken/x.png"],
     "is a folder", "taken"),
    (["generate", "{engine}", "a cat", "--size", "64x64", "--out", "{bad}/" + "a" * 300 + ".png"], "too long",
     "g.png"),
    (["generate", "{engine}", "a \udcff cat", "--size", "64x64", "--out", "{bad}/g.png"], "not valid text", "g.png"),
    (["generate", "{engine}", "a cat", "--size", "64x64", "--lora", "{bad}/rank0.safetensors", "--out",
      "{bad}/g.png"], "rank 0", "g.png"),
    (["generate", "{engine}", "a cat", "--size", "64x64", "--lora", "{bad}/offsets.safetensors", "--out",
      "{bad}/g.png"], "offsets", "g.png"),
    (["generate", "{bad}/weird-manifest", "a cat", "--size", "64x64", "--out", "{bad}/g.png"], "weights_sha256",
     "g.png"),
    (["inspect", "{bad}/deep-manifest"], "not valid JSON", "deep-manifest"),
    (["export", "--model", "tiny:base", "--out", "{bad}/" + "b" * 300], "too long", "g.png"),
    (["bench", "{engine}", "--out", "{bad}/taken"], ".json", "taken"),
    (["bench", "{engine}", "--out", "{bad}/b.json", "--flops", "{bad}/flops.json"], "--flops", "b.json"),
    (["bench", "{engine}", "--out", "{bad}/b.json", "--flops", "{bad}/no-flops.json"], "no such file", "b.json"),
    (["bench", "{engine}", "--out", "{bad}/b.json", "--compile-limit", "nan"], "--compile-limit", "b.json"),
    (["generate", "{engine}", "a cat", "--size", "64x64", "--init-image", "{bad}/in.png", "--out", "{bad}/in.png"],
     "would write over --init-image", "in.png"),
    (["generate", "{engine}", "a cat", "--size", "64x64", "--refine-strength", "0.01", "--steps", "2", "--out",
      "{bad}/r.png"], "leaves the refiner no step", "r.png"),
    (["generate", "{engine}", "a cat", "--size", "64x64", "--refiner-start", "0.5", "--steps", "1", "--out",
      "{bad}/r.png"], "--refiner-start 0.5 of 1 steps leaves the base no step to run; raise", "r.png"),
    (["generate", "{engine}", "a cat", "--size", "64x64", "--refiner-start", "0.1", "--steps", "4", "--out",
      "{bad}/r.png"], "leaves the base no step", "r.png"),
    (["generate", "{engine}", "a cat", "--size", "64x64", "--refiner-start", "0.9995", "--steps", "2", "--out",
      "{bad}/r.png"], "leaves the refiner no step to run; lower --refiner-start", "r.png"),
    (["optimize", "{bad}/nowhere"], "nowhere", "nowhere"),
    (["optimize", "{bad}/broken-manifest"], "manifest.json", "broken-manifest"),
    (["optimize", "{bad}/foreign-manifest"], "format version 99", "foreign-manifest"),
    (["optimize", "{bad}/escaping-manifest"], "outside the engine directory", "escaping-manifest"),
    (["optimize", "{bad}/no-index", "--target", "tensorrt"], "tensorrt", "no-index"),
    (["inspect", "{bad}/broken-manifest"], "manifest.json", "broken-manifest"),
    (["inspect", "{bad}/a-file"], "a-file", "a-file"),
    (["build", "{bad}/foreign-manifest", "--backend", "tensorrt-rtx"], "format version 99", "foreign-manifest"),
    (["build", "{bad}/escaping-manifest", "--backend", "tensorrt-rtx"], "outside the engine directory",
     "escaping-manifest"),
    (["build", "{bad}/good", "--backend", "tensorrt-rtx", "--max-batch", "0"], "--max-batch",
     "good"),
    (["build", "{bad}/good", "--backend", "tensorrt-rtx", "--static", "7x7"], "7x7", "good"),
    (["build", "{bad}/good", "--backend", "tensorrt-rtx", "--static", "256x256", "--max-batch", "100000"],
     "at most 8 images", "good"),
    (["build", "{bad}/good", "--backend", "tensorrt-rtx", "--profiles", "1000x1001"], "1000x1001",
     "good"),
    (["build", "{bad}/good", "--backend", "tensorrt-rtx", "--opt-level", "9"], "--opt-level",
     "good"),
    (["build", "{bad}/good", "--backend", "tensorrt-rtx", "--workspace", "-1"], "--workspace -1: expected a positive",
     "broken-manifest"),
    (["build", "{bad}/good", "--backend", "cuda"], "cuda", "good"),
    (["build", "{bad}/good", "--backend", "tensorrt-rtx", "--components", "transformer"], "transformer", "good"),
    (["optimize", "{bad}/good", "--components", "transformer"], "transformer", "good"),
]


@pytest.mark.parametrize("argv, says, folder", CASES, ids=[" ".join(c[0][:3]) + f" #{i}" for i, c in enumerate(CASES)])
def test_every_mistake_is_one_line_and_changes_nothing(inputs, argv, says, folder, capsys):
    before = tree_digest(inputs)
    try:
        code = main([a.format(bad=inputs, engine=inputs / "good") for a in argv])
    except SystemExit as e:  # argparse's own errors (one line too: cli._Parser)
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert says in err, err
    assert tree_digest(inputs) == before, f"{folder}: something was written or changed"
    assert not list(inputs.glob(".tmp-*")), "a temporary file or folder was left behind"
