"""The step kernels (step.cu) compiled with NVRTC through cuda.core, cached on disk, launched on a stream.

Compiled modules are cached in `$SDXL_TRT_CACHE/nvrtc/<sha256>.cubin`, the hash covering the source, the GPU
architecture, the NVRTC version and the compile options: a second start loads the cubin instead of compiling.
Compilation needs no GPU (CI compiles for several architectures); launching needs one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.errors import UserError
from ..runtime.fileio import atomic_file, cache_dir
from ..runtime.samplers import KERNEL_KINDS

SOURCE = Path(__file__).with_name("step.cu")
KERNELS = ("scale_input_f16", "scale_input_f32", "cfg_combine_f16", "cfg_combine_f32", "step_kernel", "advance_step",
           "select_timestep", "widen_f16", "widen_f32", "accumulate_f16", "accumulate_f32",
           "zero_f16", "zero_f32",
           "unscale_latents_f16", "unscale_latents_f32", "to_uint8_f16", "to_uint8_f32")
# numpy's arithmetic: no fused multiply-add, IEEE division and square root, no flush to zero
OPTIONS = dict(std="c++17", fma=False, prec_div=True, prec_sqrt=True, ftz=False)
BLOCK = 256
PREDICTIONS = {"epsilon": 0, "v_prediction": 1}


def _cuda_core():
    try:
        import cuda.core as core
    except ImportError:
        raise UserError("the GPU kernels need cuda-core and NVRTC: pip install 'sdxl-trt[gpu]'") from None
    return core


def nvrtc_version() -> str:
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    return f"{major}.{minor}"


def compile_cubin(arch: str, cache: bool = True) -> bytes:
    """step.cu as a cubin for `arch` ("sm_90"), from the cache when it has been compiled before."""
    core = _cuda_core()
    source = SOURCE.read_text(encoding="utf-8")
    key = hashlib.sha256(f"{source}\0{arch}\0{nvrtc_version()}\0{sorted(OPTIONS.items())}".encode()).hexdigest()
    path = cache_dir("nvrtc") / f"{key}.cubin"
    if cache and path.is_file():
        return path.read_bytes()
    program = core.Program(source, code_type="c++", options=core.ProgramOptions(name="step.cu", arch=arch, **OPTIONS))
    try:
        cubin = bytes(program.compile("cubin").code)
    except Exception as e:  # NVRTC's log: a bug of ours, but say which architecture
        raise RuntimeError(f"NVRTC could not compile {SOURCE.name} for {arch}: {e}") from e
    if cache:
        with atomic_file(path) as tmp:
            tmp.write_bytes(cubin)
    return cubin


def ptr(value) -> np.uintp:
    """A device pointer argument (passed by value, 8 bytes) from an int address or anything with `.ptr`/`.handle`."""
    for attr in ("ptr", "handle"):
        if hasattr(value, attr):
            value = getattr(value, attr)
            break
    return np.uintp(int(value))


@dataclass
class StepKernels:
    """The loaded module and typed launchers. Pointers are device addresses (ints or buffers); every launch is
    queued on `stream` (a cuda.core Stream), so a stream capture records it."""

    kernels: dict
    stream: object
    sms: int

    @classmethod
    def load(cls, stream=None, cache: bool = True, device: int | None = None) -> StepKernels:
        """The module loaded on `device` (default: the current one), whose kernels then launch only while that
        device is current."""
        core = _cuda_core()
        device = core.Device(device)
        device.set_current()
        arch = f"sm_{''.join(map(str, device.compute_capability))}"
        module = core.ObjectCode.from_cubin(compile_cubin(arch, cache=cache))
        kernels = {name: module.get_kernel(name) for name in KERNELS}
        sms = device.properties.multiprocessor_count
        return cls(kernels, stream or device.create_stream(), sms)

    def _launch(self, name: str, n: int, *args) -> None:
        core = _cuda_core()
        grid = max(1, min((n + BLOCK - 1) // BLOCK, self.sms * 8))
        core.launch(self.stream, core.LaunchConfig(grid=grid, block=BLOCK), self.kernels[name], *args)

    @staticmethod
    def _suffix(dtype) -> str:
        return {np.dtype(np.float16): "f16", np.dtype(np.float32): "f32"}[np.dtype(dtype)]

    def scale_input(self, x, out, out_dtype, coefficients, step, n: int, copies: int) -> None:
        self._launch(f"scale_input_{self._suffix(out_dtype)}", n, ptr(x), ptr(out), ptr(coefficients), ptr(step),
                     np.uint64(n), np.int32(copies))

    def cfg_combine(self, pred, pred_dtype, out, guidance: float, n: int) -> None:
        self._launch(f"cfg_combine_{self._suffix(pred_dtype)}", n, ptr(pred), ptr(out), np.float32(guidance), np.uint64(n))

    def sampler_step(self, sampler: str, x, model_output, coefficients, step, prediction_type: str, n: int,
                     prev=0, noise=0) -> None:
        """One step of `sampler` in place on x (fp32 [n]); coefficients: samplers.coefficient_table on the device;
        prev: dpmpp_2m's state (fp32 [n]); noise: [steps, n] fp32 for samplers that draw noise."""
        self._launch("step_kernel", n, np.int32(KERNEL_KINDS[sampler]), ptr(x), ptr(model_output), ptr(prev), ptr(noise),
                     ptr(coefficients), ptr(step), np.int32(PREDICTIONS[prediction_type]), np.uint64(n))

    def widen(self, pred, pred_dtype, out, n: int) -> None:
        self._launch(f"widen_{self._suffix(pred_dtype)}", n, ptr(pred), ptr(out), np.uint64(n))

    def select_timestep(self, table, out, step, batch: int) -> None:
        """out[:batch] = table[step] of a [steps, batch] fp32 table (the UNet's `timestep` input at a fixed address)."""
        self._launch("select_timestep", batch, ptr(table), ptr(out), ptr(step), np.int32(batch))

    def accumulate(self, dst, src, dtype, n: int) -> None:
        """dst[:n] += src[:n] in `dtype` (fp16 or fp32): several ControlNets' residuals summed."""
        self._launch(f"accumulate_{self._suffix(dtype)}", n, ptr(dst), ptr(src), np.uint64(n))

    def zero(self, dst, dtype, n: int) -> None:
        """dst[:n] = 0 in `dtype` (fp16 or fp32)."""
        self._launch(f"zero_{self._suffix(dtype)}", n, ptr(dst), np.uint64(n))

    def advance_step(self, step) -> None:
        self._launch("advance_step", 1, ptr(step))

    def unscale_latents(self, x, out, out_dtype, scaling_factor: float, shift: float, n: int) -> None:
        self._launch(f"unscale_latents_{self._suffix(out_dtype)}", n, ptr(x), ptr(out), np.float32(scaling_factor),
                     np.float32(shift), np.uint64(n))

    def to_uint8(self, image, image_dtype, out, nonfinite, channels: int, pixels: int, n: int) -> None:
        """NCHW image in [-1, 1] → NHWC uint8 (n = its element count); sets the int32 at `nonfinite` to 1 if any value
        is NaN/Inf (it is not cleared here)."""
        self._launch(f"to_uint8_{self._suffix(image_dtype)}", n, ptr(image), ptr(out), ptr(nonfinite), np.int32(channels),
                     np.uint64(pixels), np.uint64(n))
