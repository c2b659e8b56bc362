"""Runtime backends `tensorrt` and `tensorrt-rtx`: engines built by `sdxl-trt build`, run on a CUDA stream.

Per component: the engine is checked against its manifest record (size, sha256, ONNX it was built from, library
version, TensorRT's own header check, GPU) before it is deserialized; weight-stripped engines are refitted from
their ONNX file. One execution context per optimization profile, created when a shape first needs it; the
profile is the first whose ranges hold the request (an error names the built ones otherwise). Device buffers are
sized for the profile's largest shapes when the profile is first used and bound to the context by tensor name,
so that after warm-up a call allocates nothing and can be captured in a CUDA graph (`enqueue` on the stream).

TensorRT-RTX compiles kernels on first load; they are kept in `engines/tensorrt-rtx/runtime-cache.<sm>.bin` and
reused by later processes.
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path

import numpy as np

from . import engines as eng
from . import tensorrt_api
from .cuda import DeviceBuffer, Stream
from .errors import UserError
from .fileio import atomic_file
from .manifest import Manifest
from .profiles import select_profile

log = logging.getLogger(__name__)
NUMPY = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int64": np.int64, "bool": np.bool_}


class TensorRTBackend:
    def __init__(self, manifest: Manifest, name: str, check_hashes: bool = True):
        self.manifest, self.name, self.check_hashes = manifest, name, check_hashes
        self.trt = tensorrt_api.import_trt(name)
        self.device = tensorrt_api.gpu()
        if self.device is None:
            raise UserError(f"backend {name} needs a CUDA GPU and none was found (no driver, or cuda-python missing: "
                            "pip install 'sdxl-trt[gpu]'); ort-cpu runs without one")
        self.logger = tensorrt_api.Logger(self.trt)
        self.runtime = self.trt.Runtime(self.logger)
        self.stream = Stream()
        self._sessions: dict[str, TrtEngine] = {}
        self.runtime_cache = None
        self.runtime_cache_path = None
        if name == "tensorrt-rtx":
            self.runtime_cache_path = manifest.root / eng.ENGINES / name / f"runtime-cache.{self.device.sm}.bin"
        atexit.register(self.close)

    def session(self, component: str) -> TrtEngine:
        if component not in self._sessions:
            self._sessions[component] = TrtEngine(self, component)
        return self._sessions[component]

    def runtime_config(self, engine):
        """TensorRT-RTX: contexts share one runtime cache of JIT-compiled kernels, loaded from disk."""
        config = engine.create_runtime_config()
        if self.runtime_cache is None:
            self.runtime_cache = config.create_runtime_cache()
            if self.runtime_cache_path.is_file():
                self.runtime_cache.deserialize(self.runtime_cache_path.read_bytes())
        config.set_runtime_cache(self.runtime_cache)
        return config

    def save_runtime_cache(self) -> None:
        if self.runtime_cache is None or self.runtime_cache_path is None:
            return
        try:
            with atomic_file(self.runtime_cache_path) as tmp:
                tmp.write_bytes(bytes(self.runtime_cache.serialize()))
        except OSError as e:  # a read-only engine directory: the next process compiles again
            log.warning("could not save the TensorRT-RTX runtime cache to %s (%s)", self.runtime_cache_path, e)

    def close(self) -> None:
        self.save_runtime_cache()
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()
        if self.stream.handle is not None:
            self.stream.close()


class TrtEngine:
    """One component's engine: `set_shapes` + `enqueue` for device-resident loops, `run` for numpy in and out."""

    def __init__(self, backend: TensorRTBackend, component: str):
        self.backend, self.name = backend, component
        manifest = backend.manifest
        path, self.record = eng.find_engine(manifest, backend.name, component, backend.device)
        problem = eng.engine_problem(manifest, path, self.record, backend.device, check_hash=backend.check_hashes)
        if problem:
            raise UserError(f"{component}: cannot load {path}: {problem}; {eng.build_hint(manifest, backend.name)}")
        self.engine = backend.runtime.deserialize_cuda_engine(manifest.path(path).read_bytes())
        if self.engine is None:
            raise UserError(f"{component}: {backend.name} could not load {path}: {backend.logger.last_error()}; "
                            f"{eng.build_hint(manifest, backend.name)}")
        if self.record["options"].get("strip_weights"):
            self._refit(manifest.path(self.record["onnx"]))
        if self.engine.num_optimization_profiles != len(self.record["profiles"]):
            raise UserError(f"{component}: {path} holds {self.engine.num_optimization_profiles} profiles, its manifest "
                            f"record {len(self.record['profiles'])}; {eng.build_hint(manifest, backend.name)}")
        self.io = {t["name"]: t for t in self.record["io"]}
        self.inputs = [n for n, t in self.io.items() if t["mode"] == "input"]
        self.outputs = [n for n, t in self.io.items() if t["mode"] == "output"]
        self.contexts: dict[int, object] = {}
        self.bound: dict[int, dict[str, int]] = {}  # profile → tensor → address bound in its context
        self.buffers = {name: DeviceBuffer(0) for name in self.io}
        self.profile: int | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}

    def _refit(self, onnx_path: Path) -> None:
        trt, logger = self.backend.trt, self.backend.logger
        refitter = trt.Refitter(self.engine, logger)
        parser = trt.OnnxParserRefitter(refitter, logger)
        if not parser.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
            raise UserError(f"{self.name}: refitting the weight-stripped engine from {onnx_path} failed: "
                            f"{logger.last_error()}")

    def _context(self, profile: int):
        if profile not in self.contexts:
            if self.backend.name == "tensorrt-rtx":
                context = self.engine.create_execution_context(self.backend.runtime_config(self.engine))
            else:
                context = self.engine.create_execution_context()
            if context is None:
                raise UserError(f"{self.name}: could not create an execution context "
                                f"({self.backend.logger.last_error()})")
            context.set_optimization_profile_async(profile, self.backend.stream.ptr)
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
        missing = set(self.inputs) - set(shapes)
        if missing:
            raise UserError(f"{self.name}: missing inputs {sorted(missing)}")
        profile = select_profile(self.record["profiles"], {n: tuple(s) for n, s in shapes.items()})
        context = self._context(profile)
        for name, shape in shapes.items():
            if not context.set_input_shape(name, tuple(shape)):
                raise UserError(f"{self.name}: {self.backend.name} rejected {name} {list(shape)}: "
                                f"{self.backend.logger.last_error()}")
        bound = self.bound[profile]
        for name, buffer in self.buffers.items():
            if bound.get(name) != buffer.ptr:
                context.set_tensor_address(name, buffer.ptr)
                bound[name] = buffer.ptr
        self.profile = profile
        self.shapes = {name: tuple(context.get_tensor_shape(name)) for name in self.io}
        return self.shapes

    def enqueue(self, stream: Stream | None = None) -> None:
        """Run on `stream` (the backend's by default) with the shapes last set; no host synchronisation."""
        stream = stream or self.backend.stream
        if self.profile is None or not self.contexts[self.profile].execute_async_v3(stream.ptr):
            raise UserError(f"{self.name}: {self.backend.name} failed to run: {self.backend.logger.last_error()}")

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        arrays = {n: np.ascontiguousarray(v, dtype=NUMPY[self.io[n]["dtype"]]) for n, v in feeds.items()}
        shapes = self.set_shapes(**{n: a.shape for n, a in arrays.items()})
        stream = self.backend.stream
        for name, array in arrays.items():
            self.buffers[name].upload(array, stream)
        self.enqueue(stream)
        out = {n: np.empty(shapes[n], dtype=NUMPY[self.io[n]["dtype"]]) for n in self.outputs}
        for name, array in out.items():
            self.buffers[name].download(array, stream)
        stream.synchronize()
        return out

    def close(self) -> None:
        self.contexts.clear()
        for buffer in self.buffers.values():
            buffer.free()

