"""Stand-in GPUs on the host for the denoising loop's own code (runtime/device_loop.py, runtime/parallel_loop.py):
tests only.

On cuda-python's runtime API over host memory (fake_gpu.FakeCudart with several device ids: each allocation, stream
and event belongs to the device current on its thread, peer copies and event records are checked against that), the
device loop runs for real — buffers, bindings, the per-step order, the split across devices and the exchange of
guidance halves — with:
  - `HostKernels`: numpy twins of kernels/step.cu's launchers for euler and euler_a and the decode's (a launch while
    another device is current fails, as a kernel of one device's module does on CUDA);
  - `HostSession`: the component's ONNX Runtime CPU session (fp32) behind the device loop's binding interface (bind
    addresses by name, run on them), refusing an address that is not its device's;
  - `HostDeviceBackend`: what the device loop asks of a backend (its device, stream, sessions, settle).
What this cannot show: CUDA's own ordering of streams and events (here every queued operation is done when queued),
and the speed; the GPU tests run the same code on two H100s.
"""

from __future__ import annotations

import numpy as np

from fake_gpu import FakeCudart, view
from sdxl_trt.runtime import cuda
from sdxl_trt.runtime.backends import OrtCpuBackend
from sdxl_trt.runtime.samplers import KERNEL_COEFFICIENTS, KERNEL_KINDS


class HostKernels:
    def __init__(self, fake, device: int):
        self.fake, self.device = fake, device

    def _on_my_device(self):
        assert self.fake.cudaGetDevice()[1] == self.device, "a kernel launched while another device is current"

    def _f32(self, ptr, n):
        return view(int(ptr), (n,), np.float32)

    def scale_input(self, x, out, out_dtype, coefficients, step, n, copies):
        self._on_my_device()
        scale = self._coef(coefficients, step)[0]
        view(int(out), (copies, n), out_dtype)[:] = self._f32(x, n) / scale

    def select_timestep(self, table, out, step, batch):
        self._on_my_device()
        s = self._step(step)
        self._f32(out, batch)[:] = view(int(table), (s + 1, batch), np.float32)[s]

    def cfg_combine(self, pred, pred_dtype, out, guidance, n):
        self._on_my_device()
        uncond, text = view(int(pred), (2, n), pred_dtype).astype(np.float32)
        self._f32(out, n)[:] = uncond + np.float32(guidance) * (text - uncond)

    def widen(self, pred, pred_dtype, out, n):
        self._on_my_device()
        self._f32(out, n)[:] = view(int(pred), (n,), pred_dtype)

    def accumulate(self, dst, src, dtype, n):
        self._on_my_device()
        out = view(int(dst), (n,), dtype)
        out[:] = (out.astype(np.float32) + view(int(src), (n,), dtype).astype(np.float32)).astype(dtype)

    def zero(self, dst, dtype, n):
        self._on_my_device()
        view(int(dst), (n,), dtype)[:] = 0

    def sampler_step(self, sampler, x, model_output, coefficients, step, prediction_type, n, prev=0, noise=0):
        self._on_my_device()
        assert KERNEL_KINDS[sampler] in (0, 1) and prediction_type == "epsilon", "host twins: euler, euler_a"
        c, s = self._coef(coefficients, step), self._step(step)
        xs, o = self._f32(x, n), self._f32(model_output, n)
        x0 = xs - c[1] * o
        d = (xs - x0) / c[1]
        r = xs + d * c[4]
        if sampler == "euler_a":
            r = r + view(int(noise), (s + 1, n), np.float32)[s] * c[5]
        xs[:] = r

    def unscale_latents(self, x, out, out_dtype, scaling_factor, shift, n):
        self._on_my_device()
        view(int(out), (n,), out_dtype)[:] = self._f32(x, n) / np.float32(scaling_factor) + np.float32(shift)

    def to_uint8(self, image, image_dtype, out, nonfinite, channels, pixels, n):
        self._on_my_device()
        nchw = view(int(image), (n // (channels * pixels), channels, pixels), image_dtype).astype(np.float32)
        if not np.isfinite(nchw).all():
            view(int(nonfinite), (1,), np.int32)[0] = 1
        pixels_out = np.rint(np.clip(nchw / 2 + 0.5, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 1)
        view(int(out), (n,), np.uint8)[:] = pixels_out.reshape(-1)

    def advance_step(self, step):
        self._on_my_device()
        view(int(step), (1,), np.int32)[0] += 1

    def _step(self, step) -> int:
        return int(view(int(step), (1,), np.int32)[0])

    def _coef(self, coefficients, step):
        s = self._step(step)
        return view(int(coefficients), (s + 1, KERNEL_COEFFICIENTS), np.float32)[s]


class HostSession:
    """A component's ONNX Runtime CPU session run on bound host addresses of one stand-in device."""

    cuda_graph = False

    def __init__(self, fake, device: int, session):
        self.fake, self.device, self.session = fake, device, session
        self.entry = session.entry
        self.output_dtypes = {t["name"]: np.float32 for t in session.entry["outputs"]}
        self.runs = 0

    def dtype(self, name):
        return self.session.dtype(name)

    def new_binding(self):
        return {}

    def bind(self, binding, inputs, outputs):
        for name, (address, _, _) in {**inputs, **outputs}.items():
            owner = self.fake.cudaPointerGetAttributes(address)[1].device
            assert owner == self.device, f"{name} bound at an address of device {owner}, not {self.device}"
        binding.clear()
        binding.update(inputs=inputs, outputs=outputs)

    def run_bound(self, binding, graph_id=-1):
        self.fake.cudaSetDevice(self.device)  # as ONNX Runtime's CUDA provider does at the start of a run
        feeds = {name: view(address, shape, dtype).copy() for name, (address, shape, dtype) in binding["inputs"].items()}
        out = self.session.run(**feeds)
        for name, (address, shape, dtype) in binding["outputs"].items():
            view(address, shape, dtype)[:] = out[name]
        self.runs += 1


class HostDeviceBackend:
    """The backend surface the device loop uses, on stand-in device `device`; text encoders on ORT CPU."""

    name = "ort-cuda"
    cuda_graphs = "off"
    device_loop_usable = True

    def __init__(self, manifest, fake, device: int, cpu: OrtCpuBackend):
        self.manifest, self.fake, self.device_id, self.cpu = manifest, fake, device, cpu
        with cuda.on_device(device):
            self.stream = cuda.Stream()
        self.sessions: dict[str, HostSession] = {}
        self.settled = 0
        self.loop = None
        self.decoded_shapes = []  # the latent shapes decode_session was asked for

    @property
    def device_loop(self):
        return self.loop

    def loop_session(self, component, input_shapes):
        if component not in self.sessions:
            self.sessions[component] = HostSession(self.fake, self.device_id, self.cpu.session(component))
        return self.sessions[component]

    def session(self, component):
        return self.cpu.session(component)

    def decode_session(self, component, latent_shape):
        self.decoded_shapes.append(tuple(latent_shape))
        return self.loop_session(component, {"latent": tuple(latent_shape)})

    def settle(self):
        self.settled += 1


def install_host_devices(monkeypatch, devices: int) -> FakeCudart:
    """Stand-in GPUs for the rest of a test: cuda-python's runtime API, the step kernels (HostKernels per device) and
    cuda.core's streams patched; returns the FakeCudart."""
    import types

    import cuda.core as core

    from sdxl_trt.kernels import nvrtc

    fake = FakeCudart(devices=devices)
    monkeypatch.setattr(cuda, "cudart", lambda: fake)
    monkeypatch.setattr(nvrtc.StepKernels, "load", classmethod(
        lambda cls, stream=None, cache=True, device=None: HostKernels(fake, device)))
    monkeypatch.setattr(core, "Stream", types.SimpleNamespace(from_handle=lambda handle: handle))
    return fake
