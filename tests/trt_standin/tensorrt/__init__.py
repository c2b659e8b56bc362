"""A stand-in for the `tensorrt` module (tests only: put tests/trt_standin on sys.path to use it).

TensorRT cannot be installed on the machines here (DEVICE.md), yet `sdxl-trt build --backend tensorrt` and the
`tensorrt` backend are mostly code of ours around its API. This module implements the part of that API our code
calls — Builder / OnnxParser / network / builder config / optimization profiles, Runtime / ICudaEngine /
IExecutionContext (profiles, input shapes, tensor addresses, execute_async_v3 on a stream), Refitter and
OnnxParserRefitter, the logger, enums and validity checks — so that our builder, our engine checks and our runtime
backend (its device loop and CUDA graphs included) run for real against it:

  - an "engine" is a small file: a magic header, then JSON naming the ONNX file it was built from and the profiles
    (min / opt / max per input) the builder was given, so every check of ours (size, sha256, version, header, GPU,
    profiles) runs on it;
  - a context executes the engine with ONNX Runtime, reading its inputs from and writing its outputs to the very
    addresses our backend bound, on the stream it was handed: on a GPU (EXECUTE = "cuda") an ONNX Runtime CUDA
    session per set of input shapes (its free dimensions fixed, `user_compute_stream` = that stream, IOBinding on
    the addresses, no synchronisation), so the work is ordered on the stream and can be captured in a CUDA graph;
    on the CPU (EXECUTE = "cpu", with tests/fake_gpu.FakeCudart's host memory as the "device") a CPU session over
    numpy views of the addresses. On the GPU it runs the component's GPU-optimized file when the engine directory
    has one (the same model, fused — the file the ort-cuda backend runs, which keeps every shape computation on the
    GPU), until a refit changes weights (then the file the engine was built from, whose initializer names are
    the refitter's names);
  - set_input_shape refuses shapes outside the selected profile, as TensorRT does.

What it cannot show: TensorRT's own kernels, tactics, precision choices, memory use and rules for capturing a CUDA
graph (it captures ONNX Runtime's kernels instead). Never a backend users can pick: it lives in tests/ only.
"""

from __future__ import annotations

import ctypes
import enum
import json
from pathlib import Path

import numpy as np

__version__ = "10.99.0+standin"
MAGIC = b"SDXLTRT-STANDIN\n"  # 16 bytes, the header get_engine_validity reads
EXECUTE = "cuda"  # "cuda": ONNX Runtime CUDA on device addresses; "cpu": ONNX Runtime CPU on host addresses
DEVICE_MEMORY = 1 << 20  # bytes each engine asks its user to give a context (set_device_memory)
NUMPY = {"HALF": np.float16, "FLOAT": np.float32, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}
ONNX_TYPES = {1: "FLOAT", 10: "HALF", 6: "INT32", 7: "INT64", 9: "BOOL"}


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    INT64 = 4
    BOOL = 5


NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 5})
BuilderFlag = enum.IntEnum("BuilderFlag", {"TF32": 7, "REFIT": 3, "STRIP_PLAN": 19, "REFIT_IDENTICAL": 20})
MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
ExecutionContextAllocationStrategy = enum.IntEnum("ExecutionContextAllocationStrategy",
                                                  {"STATIC": 0, "ON_PROFILE_CHANGE": 1, "USER_MANAGED": 2})
EngineValidity = enum.IntEnum("EngineValidity", {"VALID": 0, "SUBOPTIMAL": 1, "INVALID": 2})
EngineInvalidityDiagnostics = enum.IntFlag("EngineInvalidityDiagnostics",
                                           {"VERSION_MISMATCH": 1, "UNSUPPORTED_CC": 2, "MALFORMED_ENGINE": 8})


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self):
        pass

    def log(self, severity, msg):
        pass


class IProgressMonitor:
    def __init__(self):
        pass


# --- building ------------------------------------------------------------------------------------------------------

class _Tensor:
    def __init__(self, name: str, dtype: DataType, shape: tuple[int, ...]):
        self.name, self.dtype, self.shape = name, dtype, shape


class _Network:
    def __init__(self):
        self.inputs: list[_Tensor] = []
        self.outputs: list[_Tensor] = []
        self.onnx: Path | None = None

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]


class OnnxParser:
    def __init__(self, network: _Network, logger):
        self.network, self.logger, self.errors = network, logger, []

    num_errors = property(lambda self: len(self.errors))

    def get_error(self, i):
        return self.errors[i]

    def parse_from_file(self, path: str) -> bool:
        import onnx

        graph = onnx.load(path, load_external_data=False).graph
        initializers = {t.name for t in graph.initializer}

        def tensor(value):
            kind = value.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in kind.shape.dim)
            return _Tensor(value.name, DataType[ONNX_TYPES[kind.elem_type]], shape)

        self.network.inputs = [tensor(v) for v in graph.input if v.name not in initializers]
        self.network.outputs = [tensor(v) for v in graph.output]
        self.network.onnx = Path(path).resolve()
        # TensorRT infers output dimensions the exporter left symbolic (CLIP's 77 tokens); the stand-in has no shape
        # inference of its own and takes those fixed dimensions from the component's contract
        entry = _entry_of(self.network.onnx)
        for value in self.network.outputs:
            spec = next(t for t in entry["outputs"] if t["name"] == value.name)
            value.shape = tuple(d if isinstance(d, int) else s for s, d in zip(value.shape, spec["shape"]))
        return True


class IOptimizationProfile:
    def __init__(self):
        self.shapes: dict[str, list[tuple[int, ...]]] = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = [tuple(lo), tuple(opt), tuple(hi)]

    def get_shape(self, name):
        return self.shapes[name]


class _TimingCache:
    def __init__(self, data: bytes):
        self.data = bytes(data)

    def serialize(self):
        return self.data or b"standin timing cache"


class IBuilderConfig:
    def __init__(self):
        self.flags: set[int] = set()
        self.profiles: list[IOptimizationProfile] = []
        self.builder_optimization_level = 3
        self.progress_monitor = None

    def set_flag(self, flag):
        self.flags.add(int(flag))

    def set_memory_pool_limit(self, pool, nbytes):
        pass

    def create_timing_cache(self, data):
        return _TimingCache(data)

    def set_timing_cache(self, cache, ignore_mismatch=False):
        return True

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    num_optimization_profiles = property(lambda self: len(self.profiles))


class Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags=0):
        return _Network()

    def create_builder_config(self):
        return IBuilderConfig()

    def create_optimization_profile(self):
        return IOptimizationProfile()

    def build_serialized_network(self, network: _Network, config: IBuilderConfig):
        plan = {"onnx": str(network.onnx), "refittable": int(BuilderFlag.REFIT) in config.flags,
                "inputs": {t.name: [t.dtype.name, list(t.shape)] for t in network.inputs},
                "outputs": {t.name: [t.dtype.name, list(t.shape)] for t in network.outputs},
                "profiles": [{name: [list(s) for s in shapes] for name, shapes in p.shapes.items()}
                             for p in config.profiles]}
        return MAGIC + json.dumps(plan).encode()


def _value(array: np.ndarray):
    """A refitted weight as an ONNX Runtime value where the session keeps its weights — device memory of ours on the
    GPU (ONNX Runtime takes a user's initializer in place only where it would place it, and only in memory the user
    owns), the array itself on the CPU — with what keeps that memory alive."""
    import onnxruntime as ort

    if EXECUTE != "cuda":
        return ort.OrtValue.ortvalue_from_numpy(array), array
    from sdxl_trt.runtime.cuda import DeviceBuffer
    from sdxl_trt.runtime.weights import KDL_CUDA, dlpack_value

    array = np.ascontiguousarray(array)
    buffer = DeviceBuffer(array.nbytes)
    buffer.copy_from_host(array.reshape(-1).view(np.uint8), 0)
    code = {np.dtype(np.float16): 10, np.dtype(np.float32): 1}[array.dtype]
    return dlpack_value(buffer.ptr, array.shape, code, (KDL_CUDA, 0)), buffer


def _io_types(path: str) -> dict:
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    return {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output] if v.name not in initializers}


def _entry_of(onnx_path: Path) -> dict:
    """The manifest entry (contract) of the component whose file this is, in the engine directory holding it."""
    root = onnx_path.parents[2]
    manifest = json.loads((root / "manifest.json").read_text())
    relative = onnx_path.relative_to(root).as_posix()
    return next(e for e in manifest["components"].values() if relative in e["precisions"].values())


# --- running -------------------------------------------------------------------------------------------------------

class Runtime:
    engine_header_size = len(MAGIC)

    def __init__(self, logger):
        self.logger = logger

    def get_engine_validity(self, header):
        if bytes(header[:len(MAGIC)]) == MAGIC:
            return EngineValidity.VALID, EngineInvalidityDiagnostics(0)
        return EngineValidity.INVALID, EngineInvalidityDiagnostics.MALFORMED_ENGINE

    def deserialize_cuda_engine(self, data):
        data = bytes(data)
        if not data.startswith(MAGIC):
            self.logger.log(ILogger.Severity.ERROR, "stand-in: not an engine file of this stand-in")
            return None
        return ICudaEngine(json.loads(data[len(MAGIC):]))


class ICudaEngine:
    device_memory_size_v2 = DEVICE_MEMORY

    def __init__(self, plan: dict):
        self.plan = plan
        self.weights: dict[str, np.ndarray] = {}  # refitted so far (ONNX initializer names)
        self.refits = 0
        self._sessions: dict = {}  # (file, input shapes, stream) → ONNX Runtime session
        self.root = Path(plan["onnx"]).parents[2]  # DIR/onnx/<component>/<file>
        self.entry = _entry_of(Path(plan["onnx"]))  # its contract's symbolic dimensions are the file's dim_params

    num_optimization_profiles = property(lambda self: len(self.plan["profiles"]))

    def create_execution_context(self, strategy=None):
        return IExecutionContext(self)

    def refit(self, named: dict) -> bool:
        import onnx

        known = {t.name: tuple(t.dims) for t in onnx.load(self.plan["onnx"], load_external_data=False).graph.initializer}
        for name, array in named.items():  # TensorRT's Weights are flat: the engine knows the shapes
            if name not in known or int(np.prod(known[name])) != array.size:
                return False
        for name, array in named.items():
            self.weights[name] = array.reshape(known[name])
        self._sessions.clear()
        self.refits += 1
        return True

    def file(self) -> str:
        """The ONNX file a context executes: the built-from file, or on the GPU the directory's optimized one."""
        optimized = self.entry.get("optimized", {}).get("cuda")
        if EXECUTE != "cuda" or self.weights or not optimized:
            return self.plan["onnx"]
        path = str(self.root / optimized["path"])
        if _io_types(path) != _io_types(self.plan["onnx"]):  # e.g. a VAE whose fp16 file keeps fp32 IO
            return self.plan["onnx"]
        return path

    def output_shapes(self, shapes: dict[str, tuple]) -> dict[str, tuple]:
        from sdxl_trt.runtime.contracts import output_shapes

        return {name: tuple(shape) for name, shape in output_shapes(self.entry, shapes).items()}

    def session(self, shapes: dict[str, tuple], stream: int):
        import onnxruntime as ort

        from sdxl_trt.runtime.contracts import symbol_values

        file = self.file()
        key = (file, tuple(sorted(shapes.items())), stream if EXECUTE == "cuda" else None)
        if key not in self._sessions:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            for name, size in symbol_values(self.entry, shapes).items():
                options.add_free_dimension_override_by_name(name, int(size))
            values = {n: _value(a) for n, a in self.weights.items()}
            for name, (value, _) in values.items():
                options.add_initializer(name, value)
            if values:  # ONNX Runtime's passes would fold the file's weights instead of these (fake_gpu.py says why)
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            if EXECUTE == "cuda":
                provider = ("CUDAExecutionProvider", {"device_id": "0", "user_compute_stream": str(stream),
                                                      "prefer_nhwc": "1", "cudnn_conv_algo_search": "HEURISTIC"})
            else:
                provider = ("CPUExecutionProvider", {})
            self._sessions[key] = (ort.InferenceSession(file, options, providers=[provider]), values)
        return self._sessions[key][0]


def _view(ptr: int, shape, dtype) -> np.ndarray:
    count = int(np.prod(shape))
    raw = (ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine):
        self.engine = engine
        self.profile: dict | None = None
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.memory = None
        self.runs = 0

    def set_device_memory(self, ptr, nbytes):
        if nbytes < self.engine.device_memory_size_v2:
            raise ValueError("stand-in: less device memory than the engine asks for")
        self.memory = ptr

    def set_optimization_profile_async(self, index, stream):
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        self.profile = self.engine.plan["profiles"][index]
        self.shapes.clear()
        return True

    def set_input_shape(self, name, shape):
        if self.profile is None or name not in self.profile:
            return False
        lo, _, hi = self.profile[name]
        if len(shape) != len(lo) or not all(a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return False  # TensorRT refuses a shape outside the context's profile
        self.shapes[name] = tuple(int(s) for s in shape)
        return True

    def get_tensor_shape(self, name):
        if name in self.shapes:
            return self.shapes[name]
        return self.engine.output_shapes(self.shapes)[name]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = int(ptr)

    def execute_async_v3(self, stream):
        plan = self.engine.plan
        if self.memory is None or set(self.shapes) != set(plan["inputs"]):
            return False
        session = self.engine.session(self.shapes, int(stream))
        outputs = self.engine.output_shapes(self.shapes)
        self.runs += 1
        if EXECUTE == "cpu":
            feeds = {n: _view(self.addresses[n], s, NUMPY[plan["inputs"][n][0]]).copy() for n, s in self.shapes.items()}
            for name, value in zip(outputs, session.run(list(outputs), feeds)):
                _view(self.addresses[name], value.shape, NUMPY[plan["outputs"][name][0]])[...] = value
            return True
        import onnxruntime as ort

        binding = session.io_binding()
        for name, shape in self.shapes.items():
            binding.bind_input(name, "cuda", 0, NUMPY[plan["inputs"][name][0]], list(shape), self.addresses[name])
        for name, shape in outputs.items():
            binding.bind_output(name, "cuda", 0, NUMPY[plan["outputs"][name][0]], list(shape), self.addresses[name])
        options = ort.RunOptions()
        options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        session.run_with_iobinding(binding, options)
        return True


# --- refitting -----------------------------------------------------------------------------------------------------

class Weights:
    def __init__(self, array):
        self._array = np.ascontiguousarray(array)

    def numpy(self):
        return self._array


class Refitter:
    def __init__(self, engine: ICudaEngine, logger):
        self.engine, self.logger, self.named = engine, logger, {}

    def set_named_weights(self, name, weights):
        self.named[name] = weights.numpy().reshape(-1).copy()
        return True

    def refit_cuda_engine(self):
        if not self.engine.plan["refittable"] and self.named:
            self.logger.log(ILogger.Severity.ERROR, "stand-in: the engine was not built refittable")
            return False
        return self.engine.refit(self.named)


class OnnxParserRefitter:
    def __init__(self, refitter: Refitter, logger):
        self.refitter = refitter

    def refit_from_file(self, path):
        return True  # a stripped engine's weights are the file's: the stand-in executes that file anyway
