"""A stand-in GPU for running the TensorRT backend's own code on the CPU (tests only).

Neither TensorRT nor TensorRT-RTX can execute an engine on the machines here, yet most of trt_backend.py is plain
Python around their API: checks, profile selection, contexts, buffer sizing and binding, copies, the runtime
cache. These fakes let that code run for real against:
  - `FakeCudart`: cuda-python's runtime API over host memory (a "device pointer" is a host address), counting
    allocations;
  - `fake_trt(real)`: the real `tensorrt_rtx` module (header checks, enums, version) except for deserializing:
    an "engine" is its manifest record, and its contexts execute the engine's ONNX file on ONNX Runtime CPU,
    reading and writing the bound addresses, after checking shapes against the selected profile as TensorRT does;
    its `Refitter` takes named weights (ONNX initializer names, as TensorRT's parser names refittable weights) and
    the engine runs with them from then on.
What this cannot show is whether TensorRT itself computes the right thing: that is the `gpu` tests' job.
"""

from __future__ import annotations

import ctypes
import threading
import types
from pathlib import Path

import numpy as np

from sdxl_trt.runtime.manifest import load_manifest, sha256_file
from sdxl_trt.runtime.trt_backend import NUMPY


class FakeCudart:
    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    cudaStreamNonBlocking = 1
    cudaHostAllocDefault = 0
    cudaEventDisableTiming = 2
    cudaEventDefault = 0

    def __init__(self, devices: int = 1):
        self.memory: dict[int, ctypes.Array] = {}
        self.mallocs = 0
        self.devices = devices
        self.owner: dict[int, int] = {}  # address → the device it was allocated on
        self.stream_device: dict[int, int] = {}
        self.event_device: dict[int, int] = {}
        self.peer_copies = 0
        self._current = threading.local()

    # devices: each thread has a current one (0 at first), as in the CUDA runtime
    def cudaGetDeviceCount(self):
        return 0, self.devices

    def cudaGetDevice(self):
        return 0, getattr(self._current, "device", 0)

    def cudaSetDevice(self, device):
        if not 0 <= device < self.devices:
            return (101,)  # cudaErrorInvalidDevice
        self._current.device = device
        return (0,)

    def cudaPointerGetAttributes(self, ptr):
        base = max((a for a in self.owner if a <= ptr), default=None)
        return 0, types.SimpleNamespace(device=self.owner.get(base, 0))

    def cudaDeviceCanAccessPeer(self, a, b):
        return 0, 1

    def cudaDeviceEnablePeerAccess(self, peer, flags):
        return (0,)

    def cudaMalloc(self, nbytes):
        block = ctypes.create_string_buffer(nbytes)
        self.memory[ctypes.addressof(block)] = block
        self.owner[ctypes.addressof(block)] = self.cudaGetDevice()[1]
        self.mallocs += 1
        return 0, ctypes.addressof(block)

    def cudaMemcpyPeerAsync(self, dst, dst_device, src, src_device, nbytes, stream):
        """Checked as the driver would: each address on the device named for it."""
        assert self.cudaPointerGetAttributes(dst)[1].device == dst_device, "peer copy: dst is not on dst_device"
        assert self.cudaPointerGetAttributes(src)[1].device == src_device, "peer copy: src is not on src_device"
        ctypes.memmove(dst, src, nbytes)
        self.peer_copies += 1
        return (0,)

    def cudaStreamWaitEvent(self, stream, event, flags):
        return (0,)

    def cudaFree(self, ptr):
        del self.memory[ptr]
        return (0,)

    def cudaHostAlloc(self, nbytes, flags):
        return self.cudaMalloc(nbytes)

    cudaFreeHost = cudaFree

    def cudaEventCreateWithFlags(self, flags):
        event = object()
        self.event_device[id(event)] = self.cudaGetDevice()[1]
        return 0, event

    def cudaEventRecord(self, event, stream):
        # CUDA: an event is recorded on a stream of its own device
        assert self.event_device.get(id(event), 0) == self.stream_device.get(stream, 0), "event of another device"
        return (0,)

    def cudaEventElapsedTime(self, start, end):
        return 0, 0.0  # host memory: copies are done when queued

    def cudaEventSynchronize(self, event):
        return (0,)

    def cudaEventDestroy(self, event):
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaStreamCreateWithFlags(self, flags):
        self._streams = getattr(self, "_streams", 0) + 1
        self.stream_device[self._streams] = self.cudaGetDevice()[1]
        return 0, self._streams

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)


def view(ptr: int, shape, dtype) -> np.ndarray:
    count = int(np.prod(shape))
    raw = (ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.profile, self.scratch = engine, {}, {}, None, None

    def set_device_memory(self, ptr, nbytes):
        assert nbytes >= self.engine.device_memory_size_v2
        self.scratch = ptr

    def set_optimization_profile_async(self, index, stream):
        self.profile = self.engine.record["profiles"][index]
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.profile["shapes"][name]
        if not all(a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return False  # TensorRT refuses a shape outside the context's profile
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        from sdxl_trt.runtime.contracts import output_shapes

        return self.shapes[name] if name in self.shapes else output_shapes(self.engine.contract, self.shapes)[name]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        io = {t["name"]: t for t in self.engine.record["io"]}
        feeds = {n: view(self.addresses[n], self.shapes[n], NUMPY[io[n]["dtype"]]).copy()
                 for n, t in io.items() if t["mode"] == "input"}
        outputs = [n for n, t in io.items() if t["mode"] == "output"]
        for name, value in zip(outputs, self.engine.session.run(outputs, feeds)):
            view(self.addresses[name], value.shape, NUMPY[io[name]["dtype"]])[...] = value
        return True


class FakeEngine:
    device_memory_size_v2 = 4096

    def __init__(self, root, record):
        import onnxruntime as ort

        manifest = load_manifest(root)
        self.record, self.contract = record, manifest.components[record["component"]]
        self.path = manifest.path(record["onnx"])
        self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        self.num_optimization_profiles = len(record["profiles"])
        self.contexts = 0
        self.weights: dict[str, np.ndarray] = {}  # refitted so far
        self.refits = 0

    def refit(self, named: dict) -> bool:
        import onnx
        import onnxruntime as ort

        known = {t.name: (tuple(t.dims), t.data_type) for t in onnx.load(str(self.path), load_external_data=False)
                 .graph.initializer}
        for name, array in named.items():  # TensorRT's Weights are flat: the engine knows the shapes
            if name not in known or int(np.prod(known[name][0])) != array.size:
                return False
            self.weights[name] = array.reshape(known[name][0])
        options = ort.SessionOptions()
        # on the CPU the fp16 MatMuls run behind inserted Casts, which constant folding computes from the file's
        # weights, not the overrides (ONNX Runtime 1.32): no graph optimizations for the refitted stand-in
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.weights.items()}
        for name, value in values.items():
            options.add_initializer(name, value)
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self._values = values
        self.refits += 1
        return True

    def create_runtime_config(self):
        cache = types.SimpleNamespace(serialize=lambda: b"kernels", deserialize=lambda blob: blob == b"kernels")
        return types.SimpleNamespace(set_execution_context_allocation_strategy=lambda s: None,
                                     create_runtime_cache=lambda: cache, set_runtime_cache=lambda c: True)

    def create_execution_context(self, config_or_strategy):
        self.contexts += 1
        return FakeContext(self)


def fake_trt(real, root):
    """`real` (tensorrt_rtx) whose Runtime deserializes an engine file into a FakeEngine for its manifest record."""

    class Runtime:
        def __init__(self, logger):
            self._real = real.Runtime(logger)
            self.engine_header_size = self._real.engine_header_size
            self.engines: list[FakeEngine] = []

        def get_engine_validity(self, header):
            return self._real.get_engine_validity(header)

        def deserialize_cuda_engine(self, data):
            import hashlib

            digest = hashlib.sha256(data).hexdigest()
            manifest = load_manifest(root)
            record = next(r for p, r in manifest.engines.items() if r["sha256"] == digest == sha256_file(manifest.path(p)))
            self.engines.append(FakeEngine(root, record))
            return self.engines[-1]

    class Refitter:
        def __init__(self, engine, logger):
            self.engine, self.named = engine, {}

        def set_named_weights(self, name, weights):
            self.named[name] = weights.numpy().copy()
            return True

        def refit_cuda_engine(self):
            return self.engine.refit(self.named)

    module = types.ModuleType(real.__name__)
    module.__dict__.update({k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
    module.__version__ = real.__version__
    module.Runtime = Runtime
    module.Refitter = Refitter
    return module


def write_lora(root: Path, path: Path) -> Path:
    """A diffusers-style LoRA for the tiny UNet's attention and feed-forward MatMuls (strong enough to see)."""
    from safetensors.numpy import save_file

    from sdxl_trt.runtime.lora import Weights

    manifest = load_manifest(root)
    weights = Weights(manifest.path(manifest.components["unet"]["precisions"]["fp32"]), "unet")
    rng = np.random.default_rng(0)
    tensors = {}
    for module, name in weights.modules.items():
        if "transformer_blocks" in module and module.endswith(("to_q", "to_v", "ff.net.2")):
            inp, out = weights.shape(name)  # MatMul weights, stored transposed
            tensors[f"unet.{module}.lora_A.weight"] = (rng.standard_normal((4, inp)) / np.sqrt(inp)).astype(np.float32)
            tensors[f"unet.{module}.lora_B.weight"] = (rng.standard_normal((out, 4)) * 0.3).astype(np.float32)
    save_file(tensors, path)
    return path
