"""What a PNG says about how it was made: AUTOMATIC1111's `parameters` text that PNG-info readers parse, our JSON
record with every value used (never null), and `generate --from-png FILE` making the same image again.

The reader below is written from the format's published description (A1111's infotext, as its
`parse_generation_parameters` documents it), not from our writer: the prompt's lines; a line starting
`Negative prompt:` and the lines after it; then the last line, taken as the settings when it holds at least three
`Key: value` pairs separated by commas, where a value holding a comma, colon or newline is a JSON string.
"""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from sdxl_trt.runtime.cli import main

SETTING = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def read_a1111(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings) of an A1111 infotext."""
    *lines, last = text.strip().split("\n")
    if len(SETTING.findall(last)) < 3:
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    settings = {key.strip(): json.loads(value) if value.startswith('"') else value.strip()
                for key, value in SETTING.findall(last)}
    return "\n".join(prompt), "\n".join(negative), settings


def no_nulls(value) -> bool:
    if isinstance(value, dict):
        return all(no_nulls(v) for v in value.values())
    if isinstance(value, list):
        return all(no_nulls(v) for v in value)
    return value is not None


def chunks(path) -> tuple[str, dict, np.ndarray]:
    with Image.open(path) as image:
        return image.text["parameters"], json.loads(image.text["sdxl-trt"]), np.asarray(image.convert("RGB"))


def test_the_reader_parses_the_published_example():
    """The reader against the example A1111 documents (so that a broken reader cannot pass the tests below)."""
    text = ("girl with an artist's beret, determined, blue eyes, desert scene\n"
            "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry]\n"
            "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b, "
            'Lora hashes: "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef"')
    prompt, negative, settings = read_a1111(text)
    assert prompt == "girl with an artist's beret, determined, blue eyes, desert scene"
    assert negative == "ugly, fat, obese, chubby, (((deformed))), [blurry]"
    assert settings == {"Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086",
                        "Size": "512x512", "Model hash": "45dee52b",
                        "Lora hashes": "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef"}


def test_generate_png_reads_as_a1111_and_runs_again_from_png(tiny_engine, tmp_path, caplog):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    prompt = "a cat, oil painting: warm light"
    assert main(["generate", str(tiny_engine), prompt, "--negative", "blurry, dark", "--size", "64x96",
                 "--steps", "3", "--seed", "5", "--sampler", "dpmpp_2m_karras", "--out", str(first)]) == 0
    text, record, pixels = chunks(first)
    read_prompt, negative, settings = read_a1111(text)
    assert (read_prompt, negative) == (prompt, "blurry, dark")
    assert {k: settings[k] for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size")} == {
        "Steps": "3", "Sampler": "DPM++ 2M Karras", "CFG scale": "5.0", "Seed": "5", "Size": "64x96"}
    assert re.fullmatch(r"[0-9a-f]{10}", settings["Model hash"]) and settings["Model"] == "tiny:base"
    # the record says what ran: defaults resolved, never null
    assert no_nulls(record), record
    assert {k: record[k] for k in ("prompt", "negative_prompt", "seed", "steps", "sampler", "spacing", "guidance",
                                   "guidance_rescale", "size", "long_prompt", "backend")} == {
        "prompt": prompt, "negative_prompt": "blurry, dark", "seed": 5, "steps": 3, "sampler": "dpmpp_2m_karras",
        "spacing": "leading", "guidance": 5.0, "guidance_rescale": 0.0, "size": "64x96", "long_prompt": "truncate",
        "backend": "ort-cpu"}
    assert "strength" not in record and "refiner_start" not in record
    assert main(["generate", str(tiny_engine), "--from-png", str(first), "--out", str(again)]) == 0
    assert "other weights" not in caplog.text  # same directory: no warning that the image will differ
    text_again, record_again, pixels_again = chunks(again)
    assert np.array_equal(pixels_again, pixels) and record_again == record and text_again == text


def test_flags_beside_from_png_override_the_file(tiny_engine, tmp_path):
    source, overridden, direct = tmp_path / "source.png", tmp_path / "overridden.png", tmp_path / "direct.png"
    common = ["--size", "64x64", "--seed", "9", "--negative", "grey"]
    assert main(["generate", str(tiny_engine), "a kite", *common, "--steps", "2", "--out", str(source)]) == 0
    # --steps typed as the default's value still wins over the file's 2
    assert main(["generate", str(tiny_engine), "--from-png", str(source), "--steps", "30", "--guidance", "3",
                 "--out", str(overridden)]) == 0
    assert main(["generate", str(tiny_engine), "a kite", *common, "--steps", "30", "--guidance", "3",
                 "--out", str(direct)]) == 0
    _, record, pixels = chunks(overridden)
    assert (record["steps"], record["guidance"], record["seed"], record["prompt"], record["negative_prompt"]) == \
        (30, 3.0, 9, "a kite", "grey")
    assert np.array_equal(pixels, chunks(direct)[2]) and not np.array_equal(pixels, chunks(source)[2])
    # a new prompt beside --from-png replaces the file's, the rest stays
    assert main(["generate", str(tiny_engine), "a boat", "--from-png", str(source), "--out", str(direct)]) == 0
    assert chunks(direct)[1]["prompt"] == "a boat" and chunks(direct)[1]["steps"] == 2


def test_inpainting_records_the_defaults_it_resolved_and_runs_again(tiny_engine, tmp_path, capsys):
    Image.new("RGB", (64, 64), (40, 90, 200)).save(tmp_path / "in.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out, again = tmp_path / "out.png", tmp_path / "again.png"
    assert main(["generate", str(tiny_engine), "a window", "--init-image", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "mask.png"), "--steps", "4", "--seed", "1", "--refine-strength", "0.5",
                 "--out", str(out)]) == 0
    text, record, pixels = chunks(out)
    assert no_nulls(record), record
    assert (record["guidance"], record["strength"], record["refine_strength"], record["aesthetic_score"]) == \
        (7.5, 0.9999, 0.5, 6.0)  # diffusers' inpainting defaults, the refiner's aesthetic score
    assert len(record["init_image_sha256"]) == len(record["mask_sha256"]) == 64
    settings = read_a1111(text)[2]
    assert (settings["CFG scale"], settings["Denoising strength"], settings["Refine strength"]) == \
        ("7.5", "0.9999", "0.5")
    assert settings["Refiner"].startswith("tiny:refiner [")
    assert main(["generate", str(tiny_engine), "--from-png", str(out), "--out", str(again)]) == 0
    assert np.array_equal(chunks(again)[2], pixels)
    # the init image changed since: said in one line, nothing written
    Image.new("RGB", (64, 64), (41, 90, 200)).save(tmp_path / "in.png")
    capsys.readouterr()
    assert main(["generate", str(tiny_engine), "--from-png", str(out), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has changed" in err and "--init-image" in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("make, says", [
    (lambda p: Image.new("RGB", (8, 8)).save(p), "no sdxl-trt parameters"),
    (lambda p: Image.new("RGB", (8, 8)).save(p, pnginfo=_a1111_only()), "no sdxl-trt parameters"),
    (lambda p: p.write_bytes(b"not a png"), "not a readable image"),
    (lambda p: None, "no such file"),
])
def test_from_png_without_our_record_is_one_line(tiny_engine, tmp_path, make, says, capsys):
    path = tmp_path / "foreign.png"
    make(path)
    assert main(["generate", str(tiny_engine), "--from-png", str(path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "--from-png" in err, err
    assert not (tmp_path / "x.png").exists()


def _a1111_only():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 8x8")
    return info


@pytest.fixture(scope="module")
def client(tiny_engine):
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from sdxl_trt.runtime import Pipeline
    from sdxl_trt.runtime.server import create_app

    with TestClient(create_app(tiny_engine, pipeline=Pipeline.load(tiny_engine), warmup=False)) as c:
        yield c


def test_server_png_reads_as_a1111_and_runs_again_from_png(tiny_engine, client, tmp_path):
    answer = client.post("/v1/images/generations", json={
        "prompt": "a lighthouse, at dawn", "negative_prompt": "fog", "size": "64x96", "steps": 3, "seed": 21,
        "sampler": "euler_a", "guidance": 4.5, "guidance_rescale": 0.3})
    assert answer.status_code == 200, answer.text
    served = tmp_path / "served.png"
    served.write_bytes(base64.b64decode(answer.json()["data"][0]["b64_json"]))
    text, record, pixels = chunks(served)
    prompt, negative, settings = read_a1111(text)
    assert (prompt, negative) == ("a lighthouse, at dawn", "fog")
    assert {k: settings[k] for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Guidance rescale")} == {
        "Steps": "3", "Sampler": "Euler a", "CFG scale": "4.5", "Seed": "21", "Size": "64x96",
        "Guidance rescale": "0.3"}
    assert no_nulls(record) and record["spacing"] == "leading" and record["backend"] == "ort-cpu"
    again = tmp_path / "again.png"
    assert main(["generate", str(tiny_engine), "--from-png", str(served), "--out", str(again)]) == 0
    assert np.array_equal(chunks(again)[2], pixels)


def test_server_img2img_png_asks_for_the_image_it_was_sent(tiny_engine, client, tmp_path, capsys):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    answer = client.post("/v1/images/generations", json={
        "prompt": "a red square", "steps": 4, "seed": 3, "init_image": base64.b64encode(buffer.getvalue()).decode()})
    assert answer.status_code == 200, answer.text
    served = tmp_path / "served.png"
    served.write_bytes(base64.b64decode(answer.json()["data"][0]["b64_json"]))
    record = chunks(served)[1]
    assert record["strength"] == 0.3 and "init_image" not in record  # no path: it came in the request
    assert main(["generate", str(tiny_engine), "--from-png", str(served), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--init-image" in err
    (tmp_path / "in.png").write_bytes(buffer.getvalue())
    assert main(["generate", str(tiny_engine), "--from-png", str(served), "--init-image", str(tmp_path / "in.png"),
                 "--out", str(tmp_path / "x.png")]) == 0
    assert np.array_equal(chunks(tmp_path / "x.png")[2], chunks(served)[2])


def test_from_png_made_with_other_weights_warns_that_the_image_will_differ(tiny_engine, tmp_path, caplog):
    from sdxl_trt.runtime.metadata import png_info

    source = tmp_path / "source.png"
    assert main(["generate", str(tiny_engine), "a kite", "--size", "64x64", "--steps", "1", "--seed", "2",
                 "--out", str(source)]) == 0
    text, record, pixels = chunks(source)
    Image.fromarray(pixels).save(source, pnginfo=png_info({**record, "model_hash": "0123456789"}))
    assert main(["generate", str(tiny_engine), "--from-png", str(source), "--out", str(tmp_path / "x.png")]) == 0
    assert "other weights (model hash 0123456789" in caplog.text  # a warning on stderr outside pytest


def _record_png(path, **changes):
    """A PNG whose sdxl-trt record is a valid one with `changes` (None: the key removed)."""
    from PIL.PngImagePlugin import PngInfo

    record = {"schema": "sdxl-trt/1", "prompt": "a cat", "negative_prompt": "", "seed": 1, "steps": 2,
              "sampler": "euler", "spacing": "leading", "guidance": 5.0, "guidance_rescale": 0.0, "size": "64x64",
              "long_prompt": "truncate", "loras": [], "model_hash": "0123456789"}
    for key, value in changes.items():
        if value is None:
            record.pop(key)
        else:
            record[key] = value
    info = PngInfo()
    info.add_text("sdxl-trt", json.dumps(record))
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)


@pytest.mark.parametrize("changes, says", [
    (dict(model_hash=None), "'model_hash'"),  # was a KeyError traceback
    (dict(prompt=None), "'prompt'"), (dict(seed="1"), "'seed'"), (dict(steps=2.5), "'steps'"),
    (dict(guidance="high"), "'guidance'"), (dict(size=[64, 64]), "'size'"), (dict(seed=True), "'seed'"),
    (dict(loras=["x.safetensors"]), "'loras'"), (dict(loras={"a": 1}), "'loras'"),
    (dict(strength="0.5"), "'strength'"),
])
def test_from_png_with_a_broken_record_is_one_line(tiny_engine, tmp_path, changes, says, capsys):
    """A record edited by hand (or from another version): one line naming the key, nothing generated."""
    path = tmp_path / "edited.png"
    _record_png(path, **changes)
    assert main(["generate", str(tiny_engine), "--from-png", str(path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "--from-png" in err, err
    assert not (tmp_path / "x.png").exists()
