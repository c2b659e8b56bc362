"""Backend `ort-cuda`: ONNX Runtime's CUDA execution provider, run through IOBinding on device buffers that are sized
once per shape and reused, on one CUDA stream that ONNX Runtime computes on too (`user_compute_stream`), so copies,
runs and our kernels are ordered without host synchronisation. `run` takes and returns numpy arrays, like the CPU
backend.

Files: a component's GPU-optimized file (`sdxl-trt optimize DIR --target cuda`: fused attention, GroupNorm, NHWC
convolutions, fp16) where the engine directory has one, else its fp16 file, else fp32 (with TF32). UNets, text
encoders and the VAE on an optimized file run in the device loop (device_loop.py) on a session made for the shape
(free dimensions fixed, so ONNX Runtime folds the shape arithmetic that would otherwise need host copies) with ONNX
Runtime's CUDA graphs (`enable_cuda_graph`, a `gpu_graph_id` per shape). A VAE whose optimized fp16 file may
overflow (the SDXL 1.0 VAE: `overflow_check` in the manifest) is checked after every decode: NaN or Inf in the
image → a warning and the fp32 file from then on.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from . import tensorrt_api
from .backends import (CUDA_GRAPH_MODES, OrtSession, check_onnxruntime_install, output_shapes, session_file,
                       symbol_values)
from .cuda import BufferPool, Stream
from .errors import UserError
from .manifest import Manifest

log = logging.getLogger(__name__)
PLAIN_RUN = -1  # gpu_graph_id that runs without capturing or replaying a CUDA graph


class OrtCudaBackend:
    name = "ort-cuda"

    def __init__(self, manifest: Manifest, stream: Stream | None = None, cuda_graphs: str = "step"):
        """`cuda_graphs`: "step" (ONNX Runtime's CUDA graph of the UNet, replayed each step), "loop" (the whole
        denoising loop captured as one CUDA graph of our own: experimental, see device_loop.py) or "off"."""
        check_onnxruntime_install()
        import onnxruntime as ort

        if cuda_graphs not in CUDA_GRAPH_MODES:
            raise UserError(f"--cuda-graphs {cuda_graphs!r}: expected one of {', '.join(CUDA_GRAPH_MODES)}")
        if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* wheels, where the system has none
            ort.preload_dlls()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError("this ONNX Runtime has no CUDA execution provider: pip uninstall -y onnxruntime "
                            "onnxruntime-gpu, then pip install 'sdxl-trt[gpu]'")
        if tensorrt_api.gpu() is None:
            raise UserError("backend ort-cuda needs a CUDA GPU and none was found; ort-cpu runs without one")
        from .lora import Adapters

        self.manifest = manifest
        self.adapters = Adapters()
        self.stream = stream or Stream()
        self.cuda_graphs = cuda_graphs
        self._sessions: dict[str, OrtCudaSession | CheckedSession] = {}
        self._shaped: dict[str, OrtCudaSession] = {}  # component → its session for one shape (CUDA graphs)
        self._loop = None

    @property
    def device_loop(self):
        """The denoising loop on the device (device_loop.py), created on first use."""
        if self._loop is None:
            from .device_loop import DeviceLoop

            self._loop = DeviceLoop(self)
        return self._loop

    def session(self, component: str):
        """The component's session for any shape (plain runs)."""
        if component not in self._sessions:
            entry = self.manifest.components.get(component, {})
            make = functools.partial(OrtCudaSession, self.manifest, component, self.stream, adapters=self.adapters)
            if session_file(entry)[0] == "cuda" and entry["optimized"]["cuda"].get("overflow_check"):
                self._sessions[component] = CheckedSession(component, make, functools.partial(make, file="fp32"))
            else:
                self._sessions[component] = make()
        return self._sessions[component]

    def loop_session(self, component: str, input_shapes: dict[str, tuple[int, ...]]):
        """The session the device loop runs `component` (a UNet, a text encoder, the VAE) with at these input shapes:
        with CUDA graphs on and an optimized file, a session made for exactly this shape (ONNX Runtime then folds the
        shape arithmetic that would otherwise run on the host, which CUDA graphs require), the last one kept per
        component; otherwise the component's session for any shape."""
        entry = self.manifest.components[component]
        if self.cuda_graphs == "off" or session_file(entry)[0] != "cuda":
            return self.session(component)
        dims = symbol_values(entry, input_shapes)
        current = self._shaped.get(component)
        if current is None or current.dims != dims:
            self._shaped.pop(component, None)  # one full-size UNet's weights at a time
            self._shaped[component] = OrtCudaSession(self.manifest, component, self.stream, cuda_graph=True,
                                                     dims=dims, adapters=self.adapters)
        return self._shaped[component]

    def decode_session(self, component: str, latent_shape: tuple[int, ...]) -> OrtCudaSession:
        """The session that decodes `latent_shape` on the device (device_loop.decode): the fp32 file once the fp16 VAE
        has overflowed; else, like a UNet, one made for this shape with ONNX Runtime's CUDA graph."""
        checked = self._sessions.get(component)
        if isinstance(checked, CheckedSession) and checked.fallback is not None:
            return checked.fallback
        session = self.loop_session(component, {"latent": tuple(latent_shape)})
        return session.fast if isinstance(session, CheckedSession) else session

    def overflowed(self, component: str) -> None:
        """A decode on the device gave NaN/Inf: for an fp16 VAE that may overflow (`overflow_check`), a warning and
        the fp32 file from now on; otherwise an error (nothing to fall back to)."""
        self._shaped.pop(component, None)  # the fp16 session made for one shape, if any
        session = self.session(component)
        if not isinstance(session, CheckedSession) or session.fallback is not None:
            raise UserError(f"{component}: the VAE produced NaN/Inf (an fp16 overflow?); nothing was written")
        session.fall_back()

    def set_loras(self, adapters) -> None:
        """Apply these LoRA adapters (lora.Adapter) from the next call on; () for the model as exported. The affected
        sessions are made again (their merged weights are kept for the last sets, so switching back is cheap)."""
        for component in self.adapters.set(adapters, self.manifest):
            self.release(component)

    def drop_loop_sessions(self) -> None:
        self._shaped.clear()

    def release(self, component: str) -> None:
        """Free a component's sessions (and the device loop's buffers for it): ONNX Runtime frees their memory."""
        self._sessions.pop(component, None)
        self._shaped.pop(component, None)
        if self._loop is not None:
            self._loop.forget(component)


# the CUDA execution provider's options for every session (benchmarks/gpu_pipeline.py --profile times alternatives)
CUDA_OPTIONS = {"cudnn_conv_algo_search": "EXHAUSTIVE", "cudnn_conv_use_max_workspace": "1", "prefer_nhwc": "1"}


class OrtCudaSession(OrtSession):
    def __init__(self, manifest: Manifest, component: str, stream: Stream, file: str | None = None,
                 cuda_graph: bool = False, dims: dict[str, int] | None = None, adapters=None):
        entry = manifest.components.get(component, {})
        self.file, precision, path = session_file(entry, file)
        cuda = {"device_id": "0", "user_compute_stream": str(stream.ptr), **CUDA_OPTIONS}
        self.cuda_graph = cuda_graph and self.file == "cuda"  # unfused files keep shape arithmetic on the CPU
        if self.cuda_graph:
            cuda["enable_cuda_graph"] = "1"
        try:
            super().__init__(manifest, component, precision, [("CUDAExecutionProvider", cuda)], path=path, dims=dims,
                             adapters=adapters)
        except Exception as e:  # ONNX Runtime refuses CUDA graphs when a node needs a host copy (shape arithmetic)
            if not self.cuda_graph:
                raise
            log.warning("%s: no CUDA graphs (%s)", component, str(e).splitlines()[0][:200])
            self.cuda_graph = False
            del cuda["enable_cuda_graph"]
            super().__init__(manifest, component, precision, [("CUDAExecutionProvider", cuda)], path=path, dims=dims,
                             adapters=adapters)
        self.stream = stream
        self.buffers = BufferPool()
        self.binding = self._session.io_binding()
        self._run_options = {}
        self.output_dtypes = {t["name"]: self.spec_dtype(t) for t in entry["outputs"]}

    def run_options(self, graph_id: int = PLAIN_RUN):
        """Run options that leave the stream running (the caller synchronises when it needs to); with a CUDA graph
        session, `graph_id` ≥ 0 names the graph captured (on the first runs) and replayed for one set of bindings."""
        if graph_id not in self._run_options:
            import onnxruntime as ort

            options = ort.RunOptions()
            options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            if self.cuda_graph:
                options.add_run_config_entry("gpu_graph_id", str(graph_id))
            self._run_options[graph_id] = options
        return self._run_options[graph_id]

    def bind(self, binding, inputs: dict, outputs: dict) -> None:
        """Bind device memory {name: (address, shape, dtype)} to `binding`."""
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, (address, shape, dtype) in inputs.items():
            binding.bind_input(name, "cuda", 0, np.dtype(dtype), list(shape), address)
        for name, (address, shape, dtype) in outputs.items():
            binding.bind_output(name, "cuda", 0, np.dtype(dtype), list(shape), address)

    def run_bound(self, binding, graph_id: int = PLAIN_RUN) -> None:
        """Queue one run of `binding` on the stream; no host synchronisation."""
        self._session.run_with_iobinding(binding, self.run_options(graph_id))

    def new_binding(self):
        return self._session.io_binding()

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        if set(feeds) != set(self.inputs):
            raise UserError(f"{self.name}: takes inputs {list(self.inputs)}, was given {sorted(feeds)}")
        arrays = {name: np.ascontiguousarray(value, dtype=self.dtype(name)) for name, value in feeds.items()}
        shapes = output_shapes(self.entry, {n: a.shape for n, a in arrays.items()})
        inputs = {name: (self.buffers.put(name, array, self.stream), array.shape, array.dtype)
                  for name, array in arrays.items()}
        out = {name: np.empty(shape, dtype=self.output_dtypes[name]) for name, shape in shapes.items()}
        outputs = {name: (self.buffers.reserve(name, array.nbytes).ptr, array.shape, array.dtype)
                   for name, array in out.items()}
        self.bind(self.binding, inputs, outputs)
        self.run_bound(self.binding)
        for name, array in out.items():
            self.buffers[name].download(array, self.stream)
        self.stream.synchronize()
        return out


class CheckedSession:
    """A VAE on an fp16 file that may overflow: every output is checked for NaN / Inf; on the first bad one, a
    warning, and the fp32 file computes this and every later call (so no black image is ever returned). Both
    sessions are made when first needed: a decode on the device (device_loop.decode) that overflows switches to fp32
    without ever loading the fp16 file for any shape here."""

    def __init__(self, name: str, make_fast, make_fallback):
        self.name, self.make_fast, self.make_fallback = name, make_fast, make_fallback
        self._fast = self.fallback = None

    @property
    def fast(self):
        if self._fast is None:
            self._fast = self.make_fast()
        return self._fast

    def __getattr__(self, name):
        return getattr(self.fallback or self.fast, name)

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        if self.fallback is None:
            out = self.fast.run(**feeds)
            if all(np.isfinite(v).all() for v in out.values()):
                return out
            self.fall_back()
        return self.fallback.run(**feeds)

    def fall_back(self) -> None:
        log.warning("%s: the fp16 VAE overflowed (NaN/Inf in the image); decoding in fp32 from now on "
                    "(slower; export with --vae an fp16-safe VAE to avoid this)", self.name)
        self.fallback, self._fast = self.make_fallback(), None  # the fp16 session's memory goes
