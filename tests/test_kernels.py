"""The NVRTC step kernels: compiled here for every supported architecture (no GPU needed), and on a GPU compared
with their numpy twins, the runtime's own code (samplers.py, the pipeline's guidance and decode, images.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("CI"):
    import cuda.core  # noqa: F401  (CI installs sdxl-trt[test], which brings NVRTC: compiling must be tested there)
else:
    pytest.importorskip("cuda.core")
    pytest.importorskip("cuda.bindings.nvrtc")

from sdxl_trt.kernels import nvrtc  # noqa: E402
from sdxl_trt.runtime import images  # noqa: E402
from sdxl_trt.runtime.samplers import KERNEL_KINDS, coefficient_table, make_sampler  # noqa: E402

CONFIG = json.loads((Path(__file__).resolve().parents[1] / "export/configs/sdxl-base/scheduler/scheduler_config.json")
                    .read_text())


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90", "sm_120"])
def test_kernels_compile_for_every_supported_architecture(arch):
    cubin = nvrtc.compile_cubin(arch, cache=False)
    assert cubin[:4] == b"\x7fELF"
    for name in nvrtc.KERNELS:
        assert name.encode() in cubin


def test_compiled_kernels_are_cached_by_source_and_architecture(monkeypatch):
    first = nvrtc.compile_cubin("sm_89")
    cached = list((Path(os.environ["SDXL_TRT_CACHE"]) / "nvrtc").glob("*.cubin"))
    assert cached and any(p.read_bytes() == first for p in cached)

    class NoCompiler:
        def __init__(self, *a, **k):
            raise AssertionError("compiled again")

    import cuda.core

    monkeypatch.setattr(cuda.core, "Program", NoCompiler)
    assert nvrtc.compile_cubin("sm_89") == first  # from the cache
    with pytest.raises(AssertionError):
        nvrtc.compile_cubin("sm_86")  # another architecture: its own entry


# --- on the GPU ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu():
    from sdxl_trt.runtime.cuda import DeviceBuffer, Stream

    kernels = nvrtc.StepKernels.load()
    copy_stream = Stream()
    buffers = []

    def to_device(array):
        array = np.ascontiguousarray(array)
        buffer = DeviceBuffer(array.nbytes)
        buffer.upload(array, copy_stream)
        copy_stream.synchronize()
        buffers.append(buffer)
        return buffer

    def empty(shape, dtype):
        buffers.append(DeviceBuffer(int(np.prod(shape)) * np.dtype(dtype).itemsize))
        return buffers[-1]

    def to_host(buffer, shape, dtype):
        kernels.stream.sync()
        out = buffer.download(np.empty(shape, dtype), copy_stream)
        copy_stream.synchronize()
        return out

    yield kernels, to_device, empty, to_host
    for buffer in buffers:
        buffer.free()


SHAPE = (2, 4, 64, 48)  # two images' latents
GUIDED = (4, 4, 64, 48)  # the UNet's batch under guidance: negatives, then positives
rng = np.random.default_rng(0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("name", ["euler", "ddim"])
def test_scale_input_matches_the_sampler(gpu, dtype, name):
    kernels, to_device, empty, to_host = gpu
    sampler = make_sampler(name, CONFIG, 30)
    x = rng.standard_normal(SHAPE).astype(np.float32) * 14
    coefficients, n = to_device(coefficient_table(sampler)), x.size
    for i in (0, 7, 29):
        out = empty(GUIDED, dtype)
        kernels.scale_input(to_device(x), out, dtype, coefficients, to_device(np.int32([i])), n, copies=2)
        expected = sampler.scale_model_input(np.concatenate([x, x]), i).astype(dtype)  # cast as the session does
        np.testing.assert_array_equal(to_host(out, GUIDED, dtype), expected)


@pytest.mark.gpu
def test_select_timestep_follows_the_step_counter(gpu):
    """The UNet's timestep input at each step of a schedule: the numpy loop's np.full(batch, timesteps[i])."""
    kernels, to_device, empty, to_host = gpu
    sampler = make_sampler("euler", CONFIG, 30)
    batch = 4
    table = to_device(np.repeat(sampler.timesteps[:, None], batch, axis=1).astype(np.float32))
    step = to_device(np.array([3], np.int32))
    out = empty((batch,), np.float32)
    for i in range(3, 30):
        kernels.select_timestep(table, out, step, batch)
        np.testing.assert_array_equal(to_host(out, (batch,), np.float32),
                                      np.full(batch, sampler.timesteps[i], dtype=np.float32))
        kernels.advance_step(step)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_accumulate_adds_residuals_in_their_dtype(gpu, dtype):
    """Several ControlNets' residuals summed as diffusers sums them: in the residuals' dtype (fp16 rounding of an fp32
    sum, numpy's rounding of the same); `zero` clears the first n."""
    kernels, to_device, empty, to_host = gpu
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal(SHAPE).astype(dtype) * 3 for _ in range(2))
    dst = to_device(a)
    kernels.accumulate(dst, to_device(b), dtype, a.size)
    np.testing.assert_array_equal(to_host(dst, SHAPE, dtype), (a.astype(np.float32) + b.astype(np.float32)).astype(dtype))
    kernels.zero(dst, dtype, a.size - 5)  # all but the last five
    np.testing.assert_array_equal(to_host(dst, SHAPE, dtype).reshape(-1)[:-5], 0)
    np.testing.assert_array_equal(to_host(dst, SHAPE, dtype).reshape(-1)[-5:],
                                  (a.astype(np.float32) + b.astype(np.float32)).astype(dtype).reshape(-1)[-5:])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_cfg_combine_matches_the_pipeline(gpu, dtype):
    kernels, to_device, empty, to_host = gpu
    pred = rng.standard_normal(GUIDED).astype(dtype)
    out = empty(SHAPE, np.float32)
    kernels.cfg_combine(to_device(pred), dtype, out, 5.0, int(np.prod(SHAPE)))
    uncond, text = np.split(pred.astype(np.float32), 2)
    np.testing.assert_array_equal(to_host(out, SHAPE, np.float32), uncond + 5.0 * (text - uncond))


@pytest.mark.gpu
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name, steps, begin", [("euler", 30, 0), ("euler_a", 30, 0), ("dpmpp_2m", 30, 0),
                                                ("dpmpp_2m_karras", 25, 0), ("dpmpp_2m", 30, 12), ("ddim", 30, 0),
                                                ("lcm", 8, 0)])
def test_sampler_steps_match_numpy_through_a_whole_schedule(gpu, name, steps, begin, prediction):
    """Every step with the counter on the device (from `begin`, as img2img starts mid-schedule), fed the same model
    outputs and pre-drawn noise as the numpy sampler: each step's latents equal numpy's bit for bit (H100)."""
    kernels, to_device, empty, to_host = gpu
    sampler = make_sampler(name, CONFIG, steps, prediction_type=prediction)
    sampler.set_begin_index(begin)
    n_evals = len(sampler.timesteps)
    x = (rng.standard_normal(SHAPE) * sampler.init_noise_sigma).astype(np.float32)
    noise = rng.standard_normal((n_evals, *SHAPE)).astype(np.float32) if sampler.needs_noise else None
    device_x, step = to_device(x), to_device(np.int32([begin]))
    coefficients = to_device(coefficient_table(sampler, begin))
    prev = empty(SHAPE, np.float32)
    device_noise = to_device(noise) if noise is not None else 0
    for i in range(begin, n_evals):
        model_output = rng.standard_normal(SHAPE).astype(np.float32)
        kernels.sampler_step(name, device_x, to_device(model_output), coefficients, step, prediction, x.size, prev=prev,
                             noise=device_noise)
        kernels.advance_step(step)
        x = sampler.step(model_output, i, x, noise=None if noise is None else noise[i])
        np.testing.assert_array_equal(to_host(device_x, SHAPE, np.float32), x)
    assert to_host(step, (1,), np.int32)[0] == n_evals


def test_every_kernel_sampler_has_coefficients():
    for name in KERNEL_KINDS:
        table = coefficient_table(make_sampler(name, CONFIG, 8))
        assert table.shape == (8, 10) and np.isfinite(table).all() and table[:, 0].min() >= 1.0
    with pytest.raises(NotImplementedError, match="heun has no GPU step kernel"):
        coefficient_table(make_sampler("heun", CONFIG, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_decode_kernels_match_the_pipeline(gpu, dtype):
    kernels, to_device, empty, to_host = gpu
    latents = rng.standard_normal((1, 4, 32, 24)).astype(np.float32)
    out = empty(latents.shape, dtype)
    kernels.unscale_latents(to_device(latents), out, dtype, 0.13025, 0.0, latents.size)
    np.testing.assert_array_equal(to_host(out, latents.shape, dtype), (latents / np.float32(0.13025)).astype(dtype))

    image = (rng.standard_normal((2, 3, 40, 24)) * 0.7).astype(dtype)
    pixels = to_device(image)
    out = empty((2, 40, 24, 3), np.uint8)
    flag = to_device(np.zeros(1, np.int32))
    kernels.to_uint8(pixels, dtype, out, flag, 3, 40 * 24, image.size)
    expected = images.to_uint8(np.clip(image.astype(np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(to_host(out, (2, 40, 24, 3), np.uint8), expected)
    assert to_host(flag, (1,), np.int32)[0] == 0
    for bad in (np.nan, np.inf, -np.inf):  # one non-finite value anywhere raises the flag
        image[1, 2, 39, 23] = bad
        kernels.to_uint8(to_device(image), dtype, out, flag, 3, 40 * 24, image.size)
        assert to_host(flag, (1,), np.int32)[0] == 1, bad
        flag = to_device(np.zeros(1, np.int32))
