"""Unusable numbers (issue 21, item 9): NaN/Inf is reported in terms true for the backend and precision that ran,
out-of-range guidance and LoRA scales are refused up front with their range, and no numpy RuntimeWarning reaches
the user."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest

from sdxl_trt.runtime import Pipeline, UserError
from sdxl_trt.runtime.backends import non_finite, precision_of
from sdxl_trt.runtime.cli import main
from sdxl_trt.runtime.validate import GUIDANCE_RANGE, LORA_SCALE_RANGE

CALL = dict(height=64, width=64, num_inference_steps=1, seed=0, output_type="latent", progress=False)


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return Pipeline.load(tiny_engine)


def refused(call, *args, **kwargs) -> str:
    """The UserError message of `call`, with every numpy RuntimeWarning turned into a failure."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(UserError) as error:
            call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_nan_in_the_fp32_loop_is_not_blamed_on_fp16(pipe):
    """Latents near fp32's limit (finite, so accepted) make the fp32 UNet on ort-cpu produce NaN: the message says
    fp32 on ort-cpu and names the UNet, not an fp16 overflow or guidance."""
    huge = np.full((1, 4, 8, 8), 3e37, np.float32)
    message = refused(pipe, "a cat", latents=huge, **CALL)
    assert "unet in fp32 on ort-cpu" in message and "fp32's range" in message, message
    assert "fp16" not in message and "nothing was written" in message


def test_nan_out_of_the_fp32_vae_is_not_blamed_on_fp16(pipe):
    message = refused(pipe.decode, np.full((1, 4, 8, 8), 1e37, np.float32))
    assert "vae_decoder in fp32 on ort-cpu" in message, message
    assert "fp16" not in message and "run the VAE in fp32" not in message


def test_the_wording_follows_the_precision_that_ran(pipe):
    """ort-cuda runs the tiny directory's fp16 UNet file (its VAE is exported in fp32 only, as SDXL's VAE overflows
    fp16): an overflow in the UNet there is an fp16 overflow, in its VAE (or anything on ort-cpu) it is not; a VAE
    that has fallen back from fp16 to fp32 is fp32."""
    cuda = types.SimpleNamespace(name="ort-cuda", manifest=pipe.manifest, _overflowed=set())
    assert precision_of(cuda, "unet") == "fp16" and precision_of(pipe.backend, "unet") == "fp32"
    message = non_finite("the denoising loop produced", "unet", cuda, "x", "lower the guidance")
    assert "unet in fp16 on ort-cuda" in message and "an fp16 overflow" in message and "lower the guidance" in message
    message = non_finite("the VAE produced", "vae_decoder", cuda, "look at the latents", "use an fp16-safe VAE")
    assert "vae_decoder in fp32 on ort-cuda" in message and "fp16" not in message
    cuda._overflowed.add("unet")
    assert precision_of(cuda, "unet") == "fp32"


@pytest.mark.parametrize("guidance", [1e30, -1e30, 100.5, -0.5])
def test_guidance_outside_its_range_is_refused_with_the_range(pipe, guidance):
    """Guidance 1e30 used to come back as a two-colour image reported as success."""
    message = refused(pipe, "a cat", guidance_scale=guidance, **CALL)
    assert f"between {GUIDANCE_RANGE[0]:g} and {GUIDANCE_RANGE[1]:g}" in message and "guidance_scale" in message


@pytest.mark.parametrize("guidance", [0.0, 1.0, 30.0, GUIDANCE_RANGE[1]])
def test_guidance_users_need_still_runs(pipe, guidance):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        latents = pipe("a cat", guidance_scale=guidance, **CALL).array
    assert np.isfinite(latents).all()


@pytest.mark.parametrize("rescale", [1.5, -0.1, 1e30])
def test_guidance_rescale_outside_0_1_is_refused(pipe, rescale):
    message = refused(pipe, "a cat", guidance_rescale=rescale, **CALL)
    assert "guidance_rescale" in message and "between 0 and 1" in message


def test_cli_refuses_extreme_guidance_naming_its_flag(tiny_engine, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", str(tiny_engine), "a cat", "--size", "64x64", "--steps", "1", "--guidance", "1e30",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--guidance 1e+30: expected a number between 0 and 100" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def lora_file(engine, path, value: float) -> str:
    """A one-layer LoRA (PEFT keys) for the tiny UNet's first transposed linear weight, every entry `value`."""
    from safetensors.numpy import save_file

    from sdxl_trt.runtime.lora import Weights
    from sdxl_trt.runtime.manifest import load_manifest

    manifest = load_manifest(engine)
    weights = Weights(manifest.path(manifest.components["unet"]["precisions"]["fp32"]), "unet")
    module, name = next((m, n) for m, n in weights.modules.items() if n.endswith(".weight.T"))
    n_in, n_out = weights.shape(name)
    save_file({f"unet.{module}.lora_A.weight": np.full((4, n_in), value, np.float32),
               f"unet.{module}.lora_B.weight": np.full((n_out, 4), value, np.float32)}, str(path))
    return str(path)


@pytest.mark.parametrize("scale", [1e38, -1e38, LORA_SCALE_RANGE[1] + 1, float("inf")])
def test_lora_scales_outside_their_range_are_refused(tiny_engine, tmp_path, scale):
    pipe = Pipeline.load(tiny_engine)
    path = lora_file(tiny_engine, tmp_path / "style.safetensors", 0.01)
    message = refused(pipe.set_loras, [(path, scale)])
    assert "loras" in message and "--lora" not in message
    assert ("not a finite number" in message if not np.isfinite(scale) else
            f"outside {LORA_SCALE_RANGE[0]:g} to {LORA_SCALE_RANGE[1]:g}" in message), message
    pipe.set_loras([(path, LORA_SCALE_RANGE[1])])  # the bound itself is allowed
    assert np.isfinite(pipe("a cat", **CALL).array).all()


def test_a_lora_that_overflows_fp32_says_so_without_numpy_warnings(tiny_engine, tmp_path):
    """An adapter whose merged weight leaves fp32's range at an allowed scale: one line naming it and the weight."""
    pipe = Pipeline.load(tiny_engine)
    pipe.set_loras([lora_file(tiny_engine, tmp_path / "huge.safetensors", 1e20)])
    message = refused(pipe, "a cat", **CALL)
    assert "huge.safetensors:1" in message and "float32's range" in message, message


def test_cli_refuses_a_lora_scale_naming_its_flag(tiny_engine, tmp_path, capsys):
    path = lora_file(tiny_engine, tmp_path / "style.safetensors", 0.01)
    assert main(["generate", str(tiny_engine), "a cat", "--size", "64x64", "--steps", "1", "--lora", f"{path}:1e38",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--lora" in err and "outside -20 to 20" in err and "RuntimeWarning" not in err, err
