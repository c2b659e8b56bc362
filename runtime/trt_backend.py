"""Runtime backends `tensorrt` and `tensorrt-rtx`: engines built by `sdxl-trt build`, run on a CUDA stream.

Per component: the engine is checked against its manifest record (size, sha256, ONNX it was built from, library
version, TensorRT's own header check, GPU) before it is deserialized; weight-stripped engines are refitted from
their ONNX file. One execution context per optimization profile, created when a shape first needs it; the
profile is the first whose ranges hold the request (an error names the built ones otherwise). The contexts share
one scratch allocation (they run one after another on the backend's stream). Device buffers are sized for the
profile's largest shapes when the profile is first used and bound to the context by tensor name, so that after
warm-up a call allocates nothing and can be captured in a CUDA graph (`enqueue` on the backend's stream, which
the caller may supply).

The device loop (device_loop.py) runs on the engines as on ONNX Runtime's sessions, through the same engine
interface: `new_binding` / `bind` (input shapes → the profile; device addresses by tensor name) / `run_bound` (one
`execute_async_v3` on the backend's stream). With a graph id, as ONNX Runtime does for its own CUDA graphs, the first
run of a binding is a plain enqueue (TensorRT must have run a shape once before it is captured) and the second is
captured as a CUDA graph of ours, which that binding's later runs replay; a binding is kept per shape by the device
loop, so each bucket keeps its graphs (`--cuda-graphs step`). `--cuda-graphs loop` captures the whole loop around
plain enqueues; `off` enqueues one by one.

TensorRT-RTX compiles kernels on first load; they are kept in `engines/tensorrt-rtx/runtime-cache.<sm>.bin` and
reused by later processes.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path

import numpy as np

from . import engines as eng
from . import tensorrt_api
from .backends import VAE_FP16_ADVICE, check_cuda_graphs, non_finite
from .cuda import DeviceBuffer, Graph, Stream, capturing, set_device
from .errors import UserError
from .fileio import atomic_file
from .manifest import Manifest
from .profiles import select_profile

log = logging.getLogger(__name__)
NUMPY = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int64": np.int64, "bool": np.bool_}


class RuntimeCache:
    """TensorRT-RTX's cache of kernels it compiles on load, shared by every context and kept on disk."""

    def __init__(self, trt, path: Path):
        self.trt, self.path, self.cache = trt, path, None

    def config(self, engine):
        config = engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.cache is None:
            self.cache = config.create_runtime_cache()
            if self.path.is_file() and not self.cache.deserialize(self.path.read_bytes()):
                log.info("%s was written for another GPU, driver or version: kernels are compiled again", self.path)
        config.set_runtime_cache(self.cache)
        return config

    def save(self) -> None:
        if self.cache is None:
            return
        try:
            with atomic_file(self.path) as tmp:
                tmp.write_bytes(bytes(self.cache.serialize()))
        except OSError as e:  # a read-only engine directory: the next process compiles again
            log.warning("could not save the TensorRT-RTX runtime cache to %s (%s)", self.path, e)


class TensorRTBackend:
    device_loop_usable = True  # the tests' stand-in GPU on the CPU has no kernels to launch: it turns this off

    def __init__(self, manifest: Manifest, name: str, check_hashes: bool = True, stream: Stream | None = None,
                 cuda_graphs: str = "step"):
        """`stream`: the CUDA stream every copy, profile switch and run is queued on (default: a new one).
        `cuda_graphs`: the device loop's mode (step, loop, off: device_loop.py)."""
        check_cuda_graphs(cuda_graphs)
        self.manifest, self.name, self.check_hashes = manifest, name, check_hashes
        self.cuda_graphs = cuda_graphs
        self.trt = tensorrt_api.import_trt(name)
        self.device = tensorrt_api.gpu()
        if self.device is None:
            raise UserError(f"backend {name} needs a CUDA GPU and none was found (no driver, or cuda-python missing: "
                            "pip install 'sdxl-trt[gpu]'); ort-cpu runs without one")
        # engines run on GPU 0 (several GPUs: --backend ort-cuda), current whatever another library left current
        self.device_id = 0
        set_device(self.device_id)
        self.logger = tensorrt_api.Logger(self.trt)
        self.runtime = self.trt.Runtime(self.logger)
        self.stream = stream or Stream()
        self.runtime_cache = None
        if name == "tensorrt-rtx":
            cache_file = manifest.root / eng.ENGINES / name / f"runtime-cache.{self.device.sm}.bin"
            self.runtime_cache = RuntimeCache(self.trt, cache_file)
        from .lora import Adapters

        self.adapters = Adapters()
        self._sessions: dict[str, TrtEngine] = {}
        self._loop = None
        # engines hold no reference to the backend, so it can be collected; then (or at exit) this releases them
        self._finalizer = weakref.finalize(self, _release, self.runtime_cache, self._sessions,
                                           None if stream else self.stream)

    def session(self, component: str) -> TrtEngine:
        if component not in self._sessions:
            self._sessions[component] = TrtEngine(self, component)
        return self._sessions[component]

    # --- what the device loop asks of a backend (device_loop.py) ---------------------------------------------------

    @property
    def device_loop(self):
        """The denoising loop on the device, created on first use."""
        if self._loop is None:
            from .device_loop import DeviceLoop

            self._loop = DeviceLoop(self)
        return self._loop

    def loop_session(self, component: str, input_shapes: dict) -> TrtEngine:
        """One engine serves every shape its profiles hold (the profile is chosen when a binding is made)."""
        return self.session(component)

    def decode_session(self, component: str, latent_shape: tuple[int, ...]) -> TrtEngine:
        return self.session(component)

    def overflowed(self, component: str) -> None:
        """The VAE engine's image held NaN/Inf: there is no other engine to fall back to here."""
        raise UserError(non_finite("the VAE produced", component, self, "the latents it decoded were far outside a "
                                   "sampler's range", VAE_FP16_ADVICE + " (sdxl-trt build --vae-precision fp32)")
                        + "; nothing was written")

    def settle(self) -> None:
        """Nothing is resident beyond the engines themselves."""

    def drop_loop_sessions(self) -> None:
        """Forget every CUDA graph captured on the engines (a capture failed: the loop falls back to another mode)."""
        if self._loop is not None:
            for component in list(self._sessions):
                self._loop.forget(component)

    def set_loras(self, adapters) -> None:
        """Apply LoRA adapters (lora.Adapter) by refitting the loaded engines of the affected components (built with
        `--refittable`); engines loaded later are refitted when they load."""
        changed = self.adapters.set(adapters, self.manifest)
        self.stream.synchronize()  # no run in flight while weights change
        for component in changed:
            if component in self._sessions:
                self._sessions[component].apply_loras(self.adapters)
                if self._loop is not None:  # graphs captured before the refit are captured again after it
                    self._loop.forget(component)

    def close(self) -> None:
        """Save the runtime cache and free every engine's device memory."""
        self._finalizer()


def _release(runtime_cache: RuntimeCache | None, sessions: dict, own_stream: Stream | None) -> None:
    if runtime_cache is not None:
        runtime_cache.save()
    for session in sessions.values():
        session.close()
    sessions.clear()
    if own_stream is not None and own_stream.handle is not None:
        own_stream.close()


class TrtEngine:
    """One component's engine: `set_shapes` + `enqueue` for device-resident loops, `run` for numpy in and out."""

    def __init__(self, backend: TensorRTBackend, component: str):
        self.name, self.backend_name = component, backend.name
        self.trt, self.logger, self.stream = backend.trt, backend.logger, backend.stream
        self.runtime_cache = backend.runtime_cache
        manifest = backend.manifest
        hint = eng.build_hint(manifest, backend.name)
        path, self.record = eng.find_engine(manifest, backend.name, component, backend.device)
        problem = eng.engine_problem(manifest, path, self.record, backend.device, check_hash=backend.check_hashes)
        if problem:
            raise UserError(f"{component}: cannot load {path}: {problem}; {hint}")
        self.logger.clear()
        self.engine = backend.runtime.deserialize_cuda_engine(manifest.path(path).read_bytes())
        if self.engine is None:
            raise UserError(f"{component}: {backend.name} could not load {path}: {self.logger.last_error()}; {hint}")
        if self.record["options"].get("strip_weights"):
            self._refit(manifest.path(self.record["onnx"]))
        self.root, self.onnx_path = manifest.root, manifest.path(self.record["onnx"])
        self.overridden: set[str] = set()  # weights LoRA adapters changed (lora.py)
        self.apply_loras(backend.adapters)
        if self.engine.num_optimization_profiles != len(self.record["profiles"]):
            raise UserError(f"{component}: {path} holds {self.engine.num_optimization_profiles} profiles, its manifest "
                            f"record {len(self.record['profiles'])}; {hint}")
        self.io = {t["name"]: t for t in self.record["io"]}
        self.inputs = [n for n, t in self.io.items() if t["mode"] == "input"]
        self.outputs = [n for n, t in self.io.items() if t["mode"] == "output"]
        self.entry = manifest.components[component]  # the contract (device_loop computes output shapes from it)
        self.output_dtypes = {n: NUMPY[self.io[n]["dtype"]] for n in self.outputs}
        self.cuda_graph = backend.cuda_graphs != "off"  # runs captured after one plain enqueue per shape: run_bound
        self.contexts: dict[int, object] = {}
        self.bound: dict[int, dict[str, int]] = {}  # profile → tensor → address bound in its context
        self.set_shapes_of: dict[int, dict[str, tuple]] = {}  # profile → input shapes last set in its context
        self.buffers = {name: DeviceBuffer(0) for name in self.io}
        self.scratch = DeviceBuffer(self.engine.device_memory_size_v2)  # the largest profile's activations
        self.profile: int | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}

    def _refit(self, onnx_path: Path) -> None:
        trt, logger = self.trt, self.logger
        logger.clear()
        refitter = trt.Refitter(self.engine, logger)
        parser = trt.OnnxParserRefitter(refitter, logger)
        if not parser.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
            raise UserError(f"{self.name}: refitting the weight-stripped engine from {onnx_path} failed: "
                            f"{logger.last_error()}")

    def apply_loras(self, adapters) -> None:
        """Refit the engine with the active adapters' merged weights, and the exported weights back where an earlier
        set changed some that this one does not."""
        overrides = adapters.overrides(self.name, self.onnx_path)
        if not overrides and not self.overridden:
            return
        if not self.record["options"].get("refittable"):
            raise UserError(f"{self.name}: LoRA adapters need an engine built with --refittable (this one was not): "
                            f"rebuild with `sdxl-trt build {self.root} --backend {self.backend_name} "
                            "--refittable`")
        exported = adapters.weights(self.onnx_path, self.name)
        refit_named(self.trt, self.engine, self.logger,
                    {**{name: exported.read(name) for name in self.overridden - overrides.keys()}, **overrides},
                    what=self.name)
        self.overridden = set(overrides)

    def _context(self, profile: int):
        if profile not in self.contexts:
            self.logger.clear()
            if self.runtime_cache is not None:
                context = self.engine.create_execution_context(self.runtime_cache.config(self.engine))
            else:
                context = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise UserError(f"{self.name}: could not create an execution context ({self.logger.last_error()})")
            context.set_device_memory(self.scratch.ptr, self.scratch.nbytes)
            if not context.set_optimization_profile_async(profile, self.stream.ptr):
                raise UserError(f"{self.name}: could not select optimization profile {profile} "
                                f"({self.logger.last_error()})")
            self._reserve(context, profile)
            self.contexts[profile] = context
            self.bound[profile] = {}
        return self.contexts[profile]

    def _reserve(self, context, profile: int) -> None:
        """Size every buffer for this profile's largest shapes (the only allocation this profile ever makes)."""
        largest = {name: shapes[2] for name, shapes in self.record["profiles"][profile]["shapes"].items()}
        for name, shape in largest.items():
            context.set_input_shape(name, shape)
        for name in self.io:
            shape = largest.get(name) or tuple(context.get_tensor_shape(name))
            self.buffers[name].reserve(int(np.prod(shape)) * np.dtype(NUMPY[self.io[name]["dtype"]]).itemsize)

    def set_shapes(self, **shapes: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Pick the profile for these input shapes, set them, bind the buffers; returns every tensor's shape."""
        if set(shapes) != set(self.inputs):
            raise UserError(f"{self.name}: takes inputs {self.inputs}, was given {sorted(shapes)}")
        shapes = {n: tuple(s) for n, s in shapes.items()}
        profile = select_profile(self.record["profiles"], shapes)
        self._context(profile)  # made on first use, which sizes the buffers for its profile: their addresses after
        context = self._apply(profile, shapes, {name: buffer.ptr for name, buffer in self.buffers.items()})
        self.shapes = {name: tuple(context.get_tensor_shape(name)) for name in self.io}
        return self.shapes

    def _apply(self, profile: int, shapes: dict[str, tuple], addresses: dict[str, int]):
        """Make the profile's context hold these input shapes and tensor addresses (only what changed is set)."""
        context = self._context(profile)
        if self.set_shapes_of.get(profile) != shapes:
            self.logger.clear()
            for name, shape in shapes.items():
                if not context.set_input_shape(name, shape):
                    self.set_shapes_of.pop(profile, None)
                    raise UserError(f"{self.name}: {self.backend_name} rejected {name} {list(shape)}: "
                                    f"{self.logger.last_error()}")
            self.set_shapes_of[profile] = dict(shapes)
        bound = self.bound[profile]
        for name, ptr in addresses.items():
            if bound.get(name) != ptr:
                context.set_tensor_address(name, ptr)
                bound[name] = ptr
        self.profile = profile
        return context

    def enqueue(self) -> None:
        """Run on the backend's stream with the shapes last set; no host synchronisation, no allocation."""
        self.logger.clear()
        if self.profile is None or not self.contexts[self.profile].execute_async_v3(self.stream.ptr):
            raise UserError(f"{self.name}: {self.backend_name} failed to run: {self.logger.last_error()}")

    # --- the device loop's engine interface (device_loop.py; ort_cuda.OrtCudaSession has the same) ---------------

    def dtype(self, name: str):
        return NUMPY[self.io[name]["dtype"]]

    def new_binding(self) -> "TrtBinding":
        return TrtBinding()

    def bind(self, binding: "TrtBinding", inputs: dict, outputs: dict) -> None:
        """Bind device memory {name: (address, shape, dtype)}: the profile is chosen from the input shapes now."""
        shapes = {name: tuple(shape) for name, (_, shape, _) in inputs.items()}
        if set(shapes) != set(self.inputs) or set(outputs) != set(self.outputs):
            raise UserError(f"{self.name}: takes inputs {self.inputs} and outputs {self.outputs}, was bound "
                            f"{sorted(inputs)} and {sorted(outputs)}")
        for name, (_, shape, dtype) in {**inputs, **outputs}.items():
            if np.dtype(dtype) != np.dtype(self.dtype(name)):
                raise UserError(f"{self.name}: {name} is {np.dtype(self.dtype(name)).name} in this engine, was bound "
                                f"as {np.dtype(dtype).name}")
        binding.close()
        binding.profile = select_profile(self.record["profiles"], shapes)
        binding.shapes = shapes
        binding.addresses = {name: address for name, (address, _, _) in {**inputs, **outputs}.items()}

    def run_bound(self, binding: "TrtBinding", graph_id: int = -1) -> None:
        """Queue one run of `binding` on the stream; no host synchronisation. With a graph id ≥ 0: a plain enqueue the
        first time, captured as a CUDA graph the second (and launched), the graph replayed from then on."""
        graph = binding.graphs.get(graph_id) if graph_id >= 0 else None
        if graph is not None:
            graph.launch(self.stream)
            return
        self._apply(binding.profile, binding.shapes, binding.addresses)
        if graph_id < 0 or graph_id not in binding.warm:
            self.enqueue()
            if graph_id >= 0:
                binding.warm.add(graph_id)
            return
        graph = Graph()
        try:
            with capturing(), graph.capture(self.stream):
                self.enqueue()
        except BaseException:
            graph.close()
            raise
        binding.graphs[graph_id] = graph
        graph.launch(self.stream)

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        if set(feeds) != set(self.inputs):
            raise UserError(f"{self.name}: takes inputs {self.inputs}, was given {sorted(feeds)}")
        arrays = {n: np.ascontiguousarray(v, dtype=NUMPY[self.io[n]["dtype"]]) for n, v in feeds.items()}
        shapes = self.set_shapes(**{n: a.shape for n, a in arrays.items()})
        for name, array in arrays.items():
            self.buffers[name].upload(array, self.stream)
        self.enqueue()
        out = {n: np.empty(shapes[n], dtype=NUMPY[self.io[n]["dtype"]]) for n in self.outputs}
        for name, array in out.items():
            self.buffers[name].download(array, self.stream)
        self.stream.synchronize()
        return out

    def close(self) -> None:
        self.contexts.clear()
        self.bound.clear()
        self.set_shapes_of.clear()
        for buffer in (*self.buffers.values(), self.scratch):
            buffer.free()


class TrtBinding:
    """One set of device addresses and input shapes for an engine (the device loop keeps one per shape), with the
    CUDA graphs captured on it by graph id."""

    def __init__(self):
        self.profile: int | None = None
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.warm: set[int] = set()  # graph ids that had their plain enqueue
        self.graphs: dict[int, Graph] = {}

    def close(self) -> None:
        for graph in self.graphs.values():
            graph.close()
        self.graphs.clear()
        self.warm.clear()


def refit_named(trt, engine, logger, weights: dict, what: str) -> None:
    """Set these named weights (ONNX initializer names: the parser's names for refittable weights) and refit."""
    import numpy as np

    logger.clear()
    refitter = trt.Refitter(engine, logger)
    arrays = {name: np.ascontiguousarray(array) for name, array in weights.items()}  # alive until the refit is done
    for name, array in arrays.items():
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise UserError(f"{what}: the engine has no refittable weight {name!r} ({logger.last_error()}); rebuild it")
    if not refitter.refit_cuda_engine():
        raise UserError(f"{what}: refitting the engine with LoRA weights failed: {logger.last_error()}")
