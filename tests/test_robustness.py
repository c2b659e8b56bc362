"""Whatever a user gives `sdxl-trt generate`, the answer is an image or a one-line error with exit status 2, never a
traceback (property-based, hypothesis); and a long run in one process keeps its memory and its results (soak)."""

from __future__ import annotations

import gc
import math
import sys
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sdxl_trt.runtime import Pipeline  # noqa: E402
from sdxl_trt.runtime.cli import main  # noqa: E402

SAMPLERS = ["euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_sde_karras", "ddim", "lcm", "tcd"]
prompts = st.one_of(st.text(max_size=60), st.text(alphabet=st.characters(codec="utf-8"), min_size=300, max_size=5000),
                    st.sampled_from(["", " ", "🚀🎨 a rocket", "a\x00b\x1b[31mred", "日本の城", "\u202e reversed"]))
sizes = st.one_of(st.tuples(st.sampled_from([64, 72, 96]), st.sampled_from([64, 80])).map(lambda s: f"{s[0]}x{s[1]}"),
                  st.sampled_from(["63x64", "0x64", "-64x64", "64", "64x64x64", "axb", "", "1e9x64", "64X64"]))
numbers = st.one_of(st.integers(-3, 3).map(str), st.sampled_from(["nan", "inf", "-inf", "1e400", "2.5", "", "x"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(prompt=prompts, size=sizes, steps=numbers, guidance=numbers, seed=st.one_of(numbers, st.just(str(2**70))),
       sampler=st.one_of(st.sampled_from(SAMPLERS), st.text(max_size=8)), batch=numbers,
       strength=st.one_of(st.none(), numbers))
def test_generate_answers_every_input_cleanly(tiny_engine, tmp_path_factory, capsys, prompt, size, steps, guidance,
                                              seed, sampler, batch, strength):
    out = tmp_path_factory.mktemp("out") / "x.npy"
    argv = ["generate", str(tiny_engine), prompt, "--size", size, "--steps", steps, "--guidance", guidance,
            "--seed", seed, "--sampler", sampler, "--batch", batch, "--output-type", "latent", "--out", str(out)]
    if strength is not None:
        argv += ["--strength", strength]
    try:
        status = main(argv)
    except SystemExit as e:  # argparse: not a number where one is needed
        status = e.code
    err = capsys.readouterr().err
    assert status in (0, 2), err
    if status == 0:
        assert out.exists() or any(out.parent.iterdir())
    else:
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert not any(out.parent.iterdir())  # nothing written on failure


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return Pipeline.load(tiny_engine)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists() or sys.platform != "linux", reason="reads /proc")
def test_soak_300_generations_keep_memory_and_results(pipe):
    kw = dict(height=64, width=64, num_inference_steps=2, seed=3, output_type="np", progress=False)
    first = pipe("a soak test, 🚀", **kw).array
    for _ in range(30):  # warm-up: allocator pools and ONNX Runtime's arenas reach their size
        pipe("a soak test, 🚀", **kw)
    gc.collect()
    before = rss_bytes()
    for i in range(300):
        got = pipe("a soak test, 🚀", **kw).array
        assert np.array_equal(got, first), f"generation {i} differs"
    gc.collect()
    after = rss_bytes()
    growth = after / before - 1
    print(f"RSS {before / 1e6:.0f} MB → {after / 1e6:.0f} MB after 300 generations ({growth:+.1%})")
    assert growth < 0.05 and not math.isnan(growth)


def test_running_out_of_memory_is_a_clear_error(tiny_engine, monkeypatch):
    """What ONNX Runtime raises when its arena cannot grow, turned into a one-line error with what to reduce."""
    pipe = Pipeline.load(tiny_engine)  # its own: the test replaces a session's run
    session = pipe.backend.session("unet")

    def fail(**feeds):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : bfc_arena.cc:360 Failed to allocate memory for requested "
                           "buffer of size 40000000000")

    monkeypatch.setattr(session, "run", fail)
    dropped = []  # a GPU backend's sessions kept per shape: freed, so that the next call has their room
    monkeypatch.setattr(pipe.backend, "drop_loop_sessions", lambda: dropped.append(True), raising=False)
    from sdxl_trt.runtime import UserError
    from sdxl_trt.runtime.errors import OutOfMemory

    with pytest.raises(OutOfMemory, match="out of memory: lower height and width or num_images_per_prompt, or use "
                                          "low_memory"):
        pipe("a cat", height=64, width=64, num_inference_steps=1, progress=False)
    assert dropped == [True] and issubclass(OutOfMemory, UserError)  # one line and exit 2 from the CLI
    with pytest.raises(ZeroDivisionError):  # anything else is a bug and keeps its traceback
        monkeypatch.setattr(session, "run", lambda **feeds: 1 / 0)
        pipe("a cat", height=64, width=64, num_inference_steps=1, progress=False)
    assert dropped == [True]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=None), "prompt: expected a string or a list of strings, got NoneType"),
    (dict(prompt=5), "got int"),
    (dict(prompt=["a", 3]), "got list"),
    (dict(prompt=[]), "no prompt given"),
    (dict(prompt=["a", "b"], negative_prompt=["x"]), "one negative_prompt, or one per prompt"),
    (dict(negative_prompt=7), "negative_prompt: expected a string"),
    (dict(image=5, num_inference_steps=5), "image: expected a PIL image, a numpy array or a path, got int"),
    (dict(mask_image=b"x"), "mask_image: expected a PIL image"),
    (dict(height=64.0), "height 64.0: expected a whole number"),
    (dict(width="64"), "width '64'"),
    (dict(num_inference_steps=2.5), "num_inference_steps 2.5"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt 0"),
    (dict(guidance_scale="5"), "guidance_scale '5': expected a finite number"),
    (dict(sampler="nope"), "unknown sampler 'nope'"),
    (dict(spacing="nope"), "unknown timestep spacing"),
    (dict(strength="0.5"), "strength '0.5': expected a finite number"),
    (dict(crops_coords_top_left=(-1, 0)), "crops_coords_top_left (-1, 0): expected two whole numbers ≥ 0"),
    (dict(original_size=(0, 64)), "original_size (0, 64)"),
    (dict(target_size=(64,)), "target_size (64,)"),
    (dict(aesthetic_score=float("nan")), "aesthetic_score nan"),
    (dict(denoising_end=2.0), "denoising_end 2.0: expected a number between 0 and 1"),
    (dict(refiner_start="half"), "refiner_start 'half'"),
    (dict(long_prompt="zzz"), "long_prompt 'zzz'"),
    (dict(seed=1.5), "seed 1.5"),
    (dict(seed=-1), "seed -1"),
    (dict(latents=np.zeros((1, 4, 8, 8), np.int32)), "expected float (1, 4, 8, 8)"),
    (dict(latents=np.full((1, 4, 8, 8), np.nan, np.float32)), "latents hold NaN or Inf"),
    (dict(output_type="jpeg"), "output_type 'jpeg'"),
])
def test_the_python_api_answers_bad_input_with_one_line(pipe, kwargs, message):
    """The same checks as the CLI's, for callers of Pipeline (the catalogue of the API side)."""
    from sdxl_trt.runtime import UserError

    call = dict(prompt="a cat", height=64, width=64, num_inference_steps=1, progress=False, output_type="latent")
    call.update(kwargs)
    if "mask_image" in kwargs:
        from PIL import Image

        call["image"] = Image.new("RGB", (64, 64))
    prompt = call.pop("prompt")
    with pytest.raises(UserError) as error:
        pipe(prompt, **call)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_export_and_generate_never_touch_the_network(tmp_path, monkeypatch):
    """The whole path (export of the tiny model, engine directory, generate) with every socket connection refused:
    nothing is downloaded, nothing phones home."""
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    engine, image = tmp_path / "engine", tmp_path / "cat.png"
    assert main(["export", "--model", "tiny:base", "--out", str(engine), "--precision", "fp32"]) == 0
    assert main(["generate", str(engine), "a cat", "--size", "64x64", "--steps", "2", "--out", str(image)]) == 0
    assert image.is_file() and attempts == []
