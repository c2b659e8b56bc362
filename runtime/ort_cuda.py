"""Backend `ort-cuda`: ONNX Runtime's CUDA execution provider on the fp16 files (fp32 where there is no fp16
variant: the SDXL VAE), run through IOBinding on device buffers that are sized once per shape and reused, on one
CUDA stream that ONNX Runtime computes on too (`user_compute_stream`), so copies, runs and our kernels are ordered
without host synchronisation. `run` takes and returns numpy arrays, like the CPU backend.

Not yet (issue 7): the fused graphs (attention, GroupNorm, NHWC) and ONNX Runtime's CUDA graphs.
"""

from __future__ import annotations

import numpy as np

from . import tensorrt_api
from .backends import OrtSession, check_onnxruntime_install, output_shapes
from .cuda import BufferPool, Stream
from .errors import UserError
from .manifest import Manifest


class OrtCudaBackend:
    name = "ort-cuda"

    def __init__(self, manifest: Manifest, stream: Stream | None = None):
        check_onnxruntime_install()
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* wheels, where the system has none
            ort.preload_dlls()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError("this ONNX Runtime has no CUDA execution provider: pip uninstall -y onnxruntime "
                            "onnxruntime-gpu, then pip install 'sdxl-trt[gpu]'")
        if tensorrt_api.gpu() is None:
            raise UserError("backend ort-cuda needs a CUDA GPU and none was found; ort-cpu runs without one")
        self.manifest = manifest
        self.stream = stream or Stream()
        self._sessions: dict[str, OrtCudaSession] = {}
        self._loop = None

    @property
    def device_loop(self):
        """The denoising loop on the device (device_loop.py), created on first use."""
        if self._loop is None:
            from .device_loop import DeviceLoop

            self._loop = DeviceLoop(self)
        return self._loop

    def session(self, component: str) -> OrtCudaSession:
        if component not in self._sessions:
            self._sessions[component] = OrtCudaSession(self.manifest, component, self.stream)
        return self._sessions[component]


class OrtCudaSession(OrtSession):
    def __init__(self, manifest: Manifest, component: str, stream: Stream):
        entry = manifest.components.get(component, {})
        precision = "fp16" if "fp16" in entry.get("precisions", {}) else "fp32"
        cuda = {"device_id": "0", "user_compute_stream": str(stream.ptr), "cudnn_conv_algo_search": "EXHAUSTIVE",
                "cudnn_conv_use_max_workspace": "1", "prefer_nhwc": "1"}
        super().__init__(manifest, component, precision, [("CUDAExecutionProvider", cuda)])
        self.stream = stream
        self.buffers = BufferPool()
        self.binding = self._session.io_binding()
        import onnxruntime as ort

        self.async_run = ort.RunOptions()  # leave the stream running: the caller synchronises when it needs to
        self.async_run.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.output_dtypes = {t["name"]: self.spec_dtype(t) for t in entry["outputs"]}

    def run_device(self, inputs: dict[str, tuple[int, tuple, object]], outputs: dict[str, tuple[int, tuple, object]]):
        """Queue one run on the stream over device memory: {name: (address, shape, dtype)}; no host synchronisation."""
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        for name, (address, shape, dtype) in inputs.items():
            self.binding.bind_input(name, "cuda", 0, np.dtype(dtype), list(shape), address)
        for name, (address, shape, dtype) in outputs.items():
            self.binding.bind_output(name, "cuda", 0, np.dtype(dtype), list(shape), address)
        self._session.run_with_iobinding(self.binding, self.async_run)

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        if set(feeds) != set(self.inputs):
            raise UserError(f"{self.name}: takes inputs {list(self.inputs)}, was given {sorted(feeds)}")
        arrays = {name: np.ascontiguousarray(value, dtype=self.dtype(name)) for name, value in feeds.items()}
        shapes = output_shapes(self.entry, {n: a.shape for n, a in arrays.items()})
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        for name, array in arrays.items():
            address = self.buffers.put(name, array, self.stream)
            self.binding.bind_input(name, "cuda", 0, array.dtype, list(array.shape), address)
        out = {}
        for name, shape in shapes.items():
            out[name] = np.empty(shape, dtype=self.output_dtypes[name])
            buffer = self.buffers.reserve(name, out[name].nbytes)
            self.binding.bind_output(name, "cuda", 0, out[name].dtype, list(shape), buffer.ptr)
        self._session.run_with_iobinding(self.binding)
        for name, array in out.items():
            self.buffers[name].download(array, self.stream)
        self.stream.synchronize()
        return out
