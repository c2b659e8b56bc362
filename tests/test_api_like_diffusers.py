"""The Python API takes what diffusers users hand it (issue 21, item 11 and the diffusers-style API): numpy scalars
wherever numbers go, `generator=` beside `seed=`, images as PIL, numpy or a path, one side of the size alone as
diffusers defaults the other; every bad argument is a one-line UserError naming the argument as the caller spells it
(API: argument names; CLI: flags)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdxl_trt.runtime import Pipeline, UserError
from sdxl_trt.runtime.cli import main

CALL = dict(prompt="a cat", height=64, width=64, num_inference_steps=2, seed=3, output_type="latent", progress=False)


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return Pipeline.load(tiny_engine)


@pytest.fixture(scope="module")
def photo():
    """A 64x64 RGB picture with structure (a gradient and a square), as uint8 [H, W, 3]."""
    y, x = np.mgrid[0:64, 0:64]
    pixels = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    pixels[16:40, 20:44] = (250, 30, 90)
    return pixels


def run(pipe, **kwargs):
    call = {**CALL, **kwargs}
    return pipe(call.pop("prompt"), **call).array


def refusal(pipe, **kwargs) -> str:
    call = {**CALL, **kwargs}
    with pytest.raises(UserError) as error:
        pipe(call.pop("prompt"), **call)
    message = str(error.value)
    assert "\n" not in message
    return message


# --- numpy scalars: every numeric argument, the same result as with Python numbers ---------------------------------

NUMPY_SCALARS = [
    ("num_inference_steps", np.int64(2), 2),
    ("num_inference_steps", np.uint8(2), 2),
    ("num_images_per_prompt", np.int32(2), 2),
    ("height", np.int64(64), 64),
    ("width", np.uint16(72), 72),
    ("seed", np.uint64(2**64 - 1), 2**64 - 1),
    ("seed", [np.int64(4)], [4]),
    ("guidance_scale", np.float32(7.5), 7.5),
    ("guidance_scale", np.int64(3), 3),
    ("guidance_rescale", np.float32(0.5), float(np.float32(0.5))),
    ("aesthetic_score", np.float16(6.0), 6.0),
    ("original_size", (np.int64(96), np.int32(80)), (96, 80)),
    ("target_size", np.array([64, 72]), (64, 72)),
    ("crops_coords_top_left", (np.int64(8), np.int64(0)), (8, 0)),
    ("denoising_end", np.float64(0.5), 0.5),
    ("guidance_scale", np.array(5.0), 5.0),  # a 0-d array, as numpy reductions return
]


@pytest.mark.parametrize("name, numpy_value, python_value", NUMPY_SCALARS,
                         ids=[f"{n}-{type(v).__name__}" for n, v, _ in NUMPY_SCALARS])
def test_numpy_scalars_work_wherever_python_numbers_do(pipe, name, numpy_value, python_value):
    """`num_inference_steps=np.int64(2)` used to be refused; now it gives exactly the Python number's image."""
    np.testing.assert_array_equal(run(pipe, **{name: numpy_value}), run(pipe, **{name: python_value}))


def test_numpy_scalars_for_img2img_and_the_refiner(pipe, photo):
    image = Image.fromarray(photo)
    for kwargs, same in [(dict(image=image, strength=np.float32(0.5)), dict(image=image, strength=float(np.float32(0.5)))),
                         (dict(refiner_start=np.float64(0.5)), dict(refiner_start=0.5)),
                         (dict(refine_strength=np.float32(0.5)), dict(refine_strength=0.5))]:  # 1 of the 2 steps
        np.testing.assert_array_equal(run(pipe, **kwargs), run(pipe, **same))


def test_numpy_numbers_for_loras_and_load_options():
    from sdxl_trt.runtime.validate import resident_options

    assert resident_options("ort-cuda", [(np.int64(1024), np.int64(1024))], np.float32(2.5),
                            [np.int64(0), np.int64(1)]) == \
        {"buckets": [(1024, 1024)], "max_device_memory": 2.5, "devices": (0, 1)}
    from sdxl_trt.runtime.lora import as_adapters

    assert as_adapters([("a.safetensors", np.float32(0.5))])[0].scale == 0.5


# --- bad types and out-of-range values: one line naming the argument, never a CLI flag -----------------------------

BAD = [
    ("num_inference_steps", "2", "num_inference_steps '2': expected a whole number ≥ 1"),
    ("num_inference_steps", np.float64(2.0), "num_inference_steps 2.0: expected a whole number"),
    ("num_inference_steps", 0, "num_inference_steps 0: expected a whole number ≥ 1"),
    ("num_inference_steps", True, "num_inference_steps True"),
    ("num_images_per_prompt", np.int64(0), "num_images_per_prompt 0: expected a whole number ≥ 1"),
    ("num_images_per_prompt", 17, "(prompts × num_images_per_prompt) is more than the 16"),
    ("height", 64.0, "height 64.0: expected a whole number"),
    ("height", np.int64(65), "width 64, height 65: width and height must be positive multiples of 8"),
    ("width", "64", "width '64'"),
    ("seed", np.int64(-1), "seed -1: expected a whole number from 0"),
    ("seed", 2.5, "seed 2.5"),
    ("seed", ["x"], "seed 'x'"),
    ("guidance_scale", "5", "guidance_scale '5': expected a finite number"),
    ("guidance_scale", np.float32(np.nan), "guidance_scale nan: expected a finite number"),
    ("guidance_scale", np.float64(1e30), "guidance_scale 1e+30: expected a number between 0 and 100"),
    ("guidance_rescale", np.float32(2), "guidance_rescale 2.0: expected a number between 0 and 1"),
    ("aesthetic_score", None, "aesthetic_score None: expected a finite number"),
    ("negative_aesthetic_score", np.inf, "negative_aesthetic_score inf"),
    ("original_size", (0, 64), "original_size (0, 64): expected two whole numbers ≥ 1"),
    ("target_size", (64.5, 64), "target_size (64.5, 64)"),
    ("crops_coords_top_left", (np.int64(-1), 0), "crops_coords_top_left"),
    ("denoising_end", np.float32(2), "denoising_end 2.0: expected a number between 0 and 1"),
    ("refiner_start", "half", "refiner_start 'half': expected a finite number"),
    ("refine_strength", 1.5, "refine_strength 1.5"),
    ("strength", "0.5", "strength '0.5': expected a finite number"),
    ("long_prompt", "zzz", "long_prompt 'zzz': expected truncate or chunk"),
    ("output_type", "jpeg", "output_type 'jpeg': expected pil, np or latent"),
    ("negative_prompt", 7, "negative_prompt: expected a string"),
    ("latents", np.zeros((1, 4, 8, 8), np.int32), "latents of shape (1, 4, 8, 8) (int32): expected float"),
    ("generator", 5, "generator int: expected a numpy.random.Generator or a list"),
    ("generator", [np.random.default_rng(0)] * 3, "generator: 3 given for 1 images"),
    ("image", 5, "image: expected a PIL image, a numpy array or a path, got int"),
    ("image", np.zeros((64, 64, 2), np.uint8), "image: an array of shape [64, 64, 2]"),
    ("image", np.full((64, 64, 3), 1.5), "image: a float array must hold values in [0, 1]"),
    ("image", np.zeros((64, 64, 3), np.int32), "image: an array of int32"),
    ("image", "/nonexistent/cat.png", "image '/nonexistent/cat.png': no such file"),
    ("mask_image", np.zeros((64, 64), np.uint8), "mask_image needs the image it masks (image)"),
]


@pytest.mark.parametrize("name, value, message", BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_bad_arguments_are_one_line_naming_the_argument(pipe, name, value, message):
    got = refusal(pipe, **{name: value}, **({"seed": None} if name == "generator" else {}))
    assert message in got, got
    assert "--" not in got, f"an API error names a CLI flag: {got}"


def test_both_seed_and_generator_is_refused(pipe):
    assert "give seed or generator, not both" in refusal(pipe, seed=1, generator=np.random.default_rng(1))


def test_a_bad_lora_scale_is_a_user_error(pipe):
    """set_loras used to raise a plain ValueError (float('abc')) or TypeError for a malformed entry."""
    for loras, message in [([("style.safetensors", "abc")], "scale 'abc' is not a number"),
                           ([("style.safetensors", 1, 2)], "expected \"path[:scale]\""),
                           ([42], "loras 42"), (3.5, "loras: expected a list")]:
        with pytest.raises(UserError, match="loras") as error:
            pipe.set_loras(loras)
        assert message in str(error.value) and "--lora" not in str(error.value)


def test_out_of_memory_advice_uses_the_callers_names(tiny_engine, monkeypatch):
    pipe = Pipeline.load(tiny_engine)

    def fail(**feeds):
        raise RuntimeError("Failed to allocate memory for requested buffer of size 40000000000")

    monkeypatch.setattr(pipe.backend.session("unet"), "run", fail)
    message = refusal(pipe)
    assert "lower height and width or num_images_per_prompt, or use low_memory" in message and "--" not in message
    from sdxl_trt.runtime.validate import CLI_NAMES

    message = refusal(pipe, names=CLI_NAMES)
    assert "lower --size or --batch, or use --low-memory" in message
    from sdxl_trt.runtime.server import HTTP_NAMES

    message = refusal(pipe, names=HTTP_NAMES)  # `serve` has no --low-memory to suggest
    assert message.startswith("out of memory: lower size or n (") and "low-memory" not in message
    pipe.low_memory = True  # already on: not suggested again
    message = refusal(pipe, names=CLI_NAMES)
    assert message.startswith("out of memory: lower --size or --batch (") and "--low-memory" not in message


@pytest.mark.parametrize("argv, message", [
    (["--guidance-rescale", "1.5"], "--guidance-rescale 1.5: expected a number between 0 and 1"),
    (["--guidance", "1e30"], "--guidance 1e+30: expected a number between 0 and 100"),
    (["--size", "64x64", "--steps", "3", "--init-image", "{img}", "--strength", "0.1"],
     "--strength 0.1 of 3 steps leaves no step to run; raise --strength or --steps"),
    (["--refiner-start", "0.5", "--refine-strength", "0.3"], "either from --refiner-start or with --refine-strength"),
])
def test_cli_errors_from_the_pipeline_name_flags(tiny_engine, tmp_path, capsys, argv, message, photo):
    Image.fromarray(photo).save(tmp_path / "in.png")
    argv = [a.format(img=tmp_path / "in.png") for a in argv]
    assert main(["generate", str(tiny_engine), "a cat", "--size", "64x64", "--steps", "2", *argv,
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


# --- generator= ------------------------------------------------------------------------------------------------------

def test_one_generator_draws_the_batch_as_one_call_would(pipe):
    """As diffusers with one torch Generator: the initial latents of the whole call are one draw of [n, 4, h, w]
    (a deterministic sampler then gives the same result as passing those latents)."""
    expected = np.random.default_rng(7).standard_normal((2, 4, 8, 8), dtype=np.float32)
    got = pipe("a cat", height=64, width=64, num_inference_steps=2, num_images_per_prompt=2,
               generator=np.random.default_rng(7), output_type="latent", progress=False)
    np.testing.assert_array_equal(got.array, run(pipe, latents=expected, num_images_per_prompt=2, seed=None))
    assert got.seeds == [None, None]
    again = pipe("a cat", height=64, width=64, num_inference_steps=2, num_images_per_prompt=2,
                 generator=np.random.default_rng(7), output_type="latent", progress=False)
    np.testing.assert_array_equal(got.array, again.array)


def test_a_list_of_seeds_or_generators_one_per_image(pipe):
    by_seed = run(pipe, seed=[11, 12], num_images_per_prompt=2)
    seeds = pipe("a cat", height=64, width=64, num_inference_steps=2, num_images_per_prompt=2, generator=[11, 12],
                 output_type="latent", progress=False)
    np.testing.assert_array_equal(seeds.array, by_seed)
    assert seeds.seeds == [11, 12]
    philox = [np.random.Generator(np.random.Philox(key=s)) for s in (11, 12)]  # each image's own stream
    np.testing.assert_array_equal(run(pipe, seed=None, generator=philox, num_images_per_prompt=2), by_seed)
    mixed = run(pipe, seed=None, generator=[11, np.random.Generator(np.random.Philox(key=12))], num_images_per_prompt=2)
    np.testing.assert_array_equal(mixed, by_seed)


# --- images as PIL, numpy or a path ------------------------------------------------------------------------------------

def test_images_as_numpy_or_path_give_the_pil_result(pipe, photo, tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[20:44, 20:44] = 255
    Image.fromarray(photo).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    for kw in (dict(), dict(mask_image=Image.fromarray(mask))):
        reference = run(pipe, image=Image.fromarray(photo), strength=0.6, num_inference_steps=4, **kw)
        given_mask = {} if not kw else dict(mask_image=mask)
        for image in (photo, photo.astype(np.float32) / 255, photo.astype(np.float64) / 255, str(tmp_path / "in.png"),
                      tmp_path / "in.png", np.dstack([photo, np.full((64, 64), 255, np.uint8)])):
            got = run(pipe, image=image, strength=0.6, num_inference_steps=4, **given_mask)
            np.testing.assert_array_equal(got, reference)
        if kw:
            for mask_given in (mask[..., None], mask.astype(np.float32) / 255, str(tmp_path / "mask.png")):
                got = run(pipe, image=photo, strength=0.6, num_inference_steps=4, mask_image=mask_given)
                np.testing.assert_array_equal(got, reference)


# --- one side of the size alone, as diffusers ----------------------------------------------------------------------

def test_height_alone_defaults_width_as_diffusers(pipe, tiny_base):
    """diffusers' StableDiffusionXLPipeline: `width = width or default_sample_size * vae_scale_factor` (the model's
    default side, not the given height's aspect); run the reference itself and compare the latent shapes."""
    torch = pytest.importorskip("torch")
    from sdxl_trt.export.reference import diffusers_pipeline

    reference = diffusers_pipeline(tiny_base)
    for given in (dict(height=64), dict(width=96)):
        theirs = reference("a cat", num_inference_steps=1, output_type="latent",
                           generator=torch.Generator().manual_seed(0), **given).images
        ours = pipe("a cat", num_inference_steps=1, output_type="latent", progress=False, seed=0, **given).array
        assert ours.shape == tuple(theirs.shape), (given, ours.shape, tuple(theirs.shape))


def test_height_alone_with_an_image_takes_the_images_width_as_diffusers(pipe, photo):
    """diffusers' VaeImageProcessor.get_default_height_width: a side not given is the image's (rounded down to the
    VAE's factor). The given height used to be dropped in favour of the image's."""
    pytest.importorskip("torch")
    from diffusers.image_processor import VaeImageProcessor

    image = Image.fromarray(photo).resize((100, 64))
    processor = VaeImageProcessor(vae_scale_factor=pipe.model["vae_scale_factor"])
    for given in (dict(height=48), dict(width=48), dict()):
        height, width = processor.get_default_height_width(image, **given)
        ours = run(pipe, image=image, strength=0.5, **{"height": None, "width": None, **given})
        assert ours.shape[2:] == (height // 8, width // 8), (given, ours.shape, (height, width))


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler="lcm", num_inference_steps=60), "too many for lcm"),
    (dict(sampler="tcd", num_inference_steps=51), "too many for tcd"),
    (dict(sampler="euler", num_inference_steps=1001), "out of range"),
    (dict(spacing="quadratic"), "unknown timestep spacing"),
    (dict(sampler="unipc"), "unknown sampler"),
])
def test_a_schedule_the_samplers_refuse_fails_before_any_model_runs(pipe, monkeypatch, kwargs, message):
    """The sampler's schedule is made before the text encoders run: a refusal costs no model time (it used to come
    after the prompts were encoded)."""
    def ran(*args, **kw):
        raise AssertionError("a model ran before the schedule was checked")

    monkeypatch.setattr(pipe, "encode_prompt", ran)
    assert message in refusal(pipe, **kwargs)
