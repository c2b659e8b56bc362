"""One copy of an exported file's weights for every ONNX Runtime session made from it.

ONNX Runtime gives each session its own copy of the model's initializers. The GPU path makes one session per input
shape (a CUDA graph needs every shape fixed), so without sharing each SDXL bucket would upload and hold its own 5 GB
of UNet weights. `SharedWeights` reads a file's weights once into one buffer — device memory for the CUDA provider,
host memory for the CPU one — and hands every session views into it through `SessionOptions.add_initializer`
(DLPack views: ONNX Runtime uses a user's buffer in place when it sits where the session would place the weight).

Which initializers are shared: only those ONNX Runtime's graph passes leave alone. Its transpose and layout passes
rewrite some initializers in place under the same name (`ApiGraph::TransposeInitializer`), and a session given a
shared value for such a name would read the value as it was before the rewrite. So only inputs of operators those
passes never touch are shared: MatMul, Gemm and Gather weights, LayerNormalization's scale and bias, every
com.microsoft operator (fused attention, NhwcConv, GroupNorm, SkipLayerNormalization, …), and Conv weights where the
provider keeps Conv in NCHW (not under the CUDA provider's `prefer_nhwc`, which converts Conv to NHWC and transposes
its weights). The rest — biases of plain adds, norm parameters of other ops, shape constants — is a few megabytes
that each session reads from the file itself. Sharing is checked, not assumed: tests/test_shared_weights.py shows
two sessions reading one buffer, and the GPU test measures the device memory a second session takes.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from .errors import UserError

log = logging.getLogger(__name__)

MICROSOFT = "com.microsoft"
# (domain, op type) → the inputs that may be shared (weights, never rewritten by ONNX Runtime's passes)
SHARED_INPUTS = {("", "MatMul"): (1,), ("", "Gemm"): (1, 2), ("", "Gather"): (0,), ("", "LayerNormalization"): (1, 2)}
NCHW_ONLY = {("", "Conv"): (1, 2), ("", "ConvTranspose"): (1, 2)}  # shared where the provider keeps NCHW
MIN_ELEMENTS = 256  # smaller tensors are not worth a view (and include the shape constants kept on the host)
ALIGN = 256  # bytes: every tensor starts where cuBLAS and cuDNN take their fastest paths
# ONNX TensorProto data type → (numpy dtype, DLPack type code, bits); bfloat16 is copied as raw 2-byte words
FLOAT_TYPES = {1: (np.float32, 2, 32), 10: (np.float16, 2, 16), 16: (np.uint16, 4, 16)}
KDL_CPU, KDL_CUDA = 1, 2


def shareable(graph, nhwc: bool) -> list:
    """The initializers (TensorProto) of `graph` that every session may take from a shared buffer."""
    allowed = dict(SHARED_INPUTS)
    if not nhwc:
        allowed.update(NCHW_ONLY)
    uses = defaultdict(list)
    for node in graph.node:
        for index, name in enumerate(node.input):
            uses[name].append((node.domain or "", node.op_type, index))
    outputs = {o.name for o in graph.output}
    out = []
    for tensor in graph.initializer:
        if tensor.data_type not in FLOAT_TYPES or int(np.prod(tensor.dims)) < MIN_ELEMENTS:
            continue
        consumers = uses.get(tensor.name)
        if not consumers or tensor.name in outputs:
            continue
        if all(domain == MICROSOFT or index in allowed.get((domain, op), ()) for domain, op, index in consumers):
            out.append(tensor)
    return out


class SharedWeights:
    """The shareable weights of one ONNX file in one buffer on device `device` (a CUDA device id), or in host memory
    for `device` None; `values` maps initializer names to ONNX Runtime values viewing that buffer. Sessions given
    these values must keep this object alive (OrtSession does).

    With `upload` False the buffer is only laid out and allocated: `upload()` fills it later (prepare's loader does,
    one file at a time) while sessions are made on it already — ONNX Runtime reads only the file's own copy of an
    initializer while it makes a session (its passes and constant folding; of the shared ones no operator packs or
    transposes its weight, weights.shareable says which), and takes the address of ours — and every run of those
    sessions first waits for `wait()` (OrtSession does)."""

    def __init__(self, path: Path, device: int | None, nhwc: bool = False, upload: bool = True):
        import onnx

        started = time.perf_counter()
        self.path, self.device = Path(path), device
        model = onnx.load(str(path), load_external_data=False)
        tensors = shareable(model.graph, nhwc)
        offsets, self._copies, total = layout(tensors, self.path.parent)
        self.nbytes = total
        self._memory, self._base, self._kind = _allocate(total, device)
        self.layout = {tensor.name: (offsets[tensor.name], tuple(tensor.dims), tensor.data_type) for tensor in tensors}
        self._values = None
        self._values_lock = threading.Lock()
        self._uploaded = threading.Event()
        self._error: BaseException | None = None
        log.info("allocated %.2f GiB for the weights of %s in %.2f s", total / 2**30, self.path,
                 time.perf_counter() - started)
        if upload:
            self.upload()
            self.wait()

    @property
    def values(self) -> dict:
        """{initializer name: OrtValue viewing its place in the buffer}, made on first use (it needs ONNX Runtime,
        which the loader does not wait for)."""
        with self._values_lock:
            if self._values is None:
                self._values = {name: dlpack_value(self._base + offset, dims, data_type, self._kind)
                                for name, (offset, dims, data_type) in self.layout.items()}
            return self._values

    def upload(self) -> None:
        """Copy the file's weights into the buffer (once); a failure is kept and raised by `wait()` too."""
        if self._uploaded.is_set():
            return
        started = time.perf_counter()
        try:
            if self.device is not None:  # the files' weights through staging buffers, several threads at once
                from .cuda import set_device, upload_file_ranges

                set_device(self.device)  # this thread's copies below go to that device (prepare's loader: its own thread)
                upload_file_ranges([(source, start, nbytes, self._base + offset)
                                    for source, start, nbytes, offset in self._copies if isinstance(source, Path)])
            for source, start, nbytes, offset in self._copies:
                if not isinstance(source, Path):  # weights inside the model file itself (small files)
                    _put(self._memory, np.frombuffer(source, np.uint8, nbytes, start), offset)
                elif self.device is None:
                    _read_into(source, start, self._memory[offset:offset + nbytes])
        except BaseException as e:
            self._error = e
            raise
        finally:
            self._copies = []
            self._uploaded.set()
        log.info("read %.2f GiB of weights of %s into %s memory in %.2f s", self.nbytes / 2**30, self.path,
                 "host" if self.device is None else "device", time.perf_counter() - started)

    def wait(self) -> None:
        """Return once the buffer holds the file's weights (at once after `upload()`); raise the upload's error."""
        if not self._uploaded.is_set():
            self._uploaded.wait()
        if self._error is not None:
            raise self._error

    def view(self, name: str) -> np.ndarray:
        """Host weights only: the array every session reads for `name` (tests change it to show that they do)."""
        if self.device is not None:
            raise ValueError("view() is for weights in host memory")
        offset, dims, data_type = self.layout[name]
        dtype = np.dtype(FLOAT_TYPES[data_type][0])
        return self._memory[offset:offset + int(np.prod(dims)) * dtype.itemsize].view(dtype).reshape(dims)

    def with_overrides(self, overrides: dict[str, np.ndarray]) -> "WeightSet":
        """These weights with some replaced (LoRA merges), the replacements in a buffer of their own."""
        return WeightSet(self, overrides)

    def free(self) -> None:
        """Give the memory back (sessions hold a reference to the weights they use, so this runs when the last of
        them and the backend have let go)."""
        self._values = {}
        memory = getattr(self, "_memory", None)
        if hasattr(memory, "free"):
            memory.free()

    def __del__(self):
        if not sys.is_finalizing():  # at exit the driver frees it; CUDA may already be gone
            self.free()


class WeightSet:
    """A SharedWeights with some values replaced by other arrays (merged LoRA weights), held where the base is."""

    def __init__(self, base: SharedWeights, overrides: dict[str, np.ndarray]):
        self.base, self.device = base, base.device
        arrays = {name: np.ascontiguousarray(a) for name, a in overrides.items()}
        offsets, total = {}, 0
        for name, array in arrays.items():
            offsets[name] = total
            total += _aligned(array.nbytes)
        self.nbytes = total
        self._memory, base_ptr, kind = _allocate(total, self.device)
        values = {}
        for name, array in arrays.items():
            _put(self._memory, array.reshape(-1).view(np.uint8), offsets[name])
            values[name] = dlpack_value(base_ptr + offsets[name], array.shape, _onnx_type(array.dtype), kind)
        self._values = {**base.values, **values}

    @property
    def values(self) -> dict:
        return self._values

    def wait(self) -> None:
        self.base.wait()

    free = SharedWeights.free
    __del__ = SharedWeights.__del__


def _nbytes(tensor) -> int:
    return int(np.prod(tensor.dims)) * np.dtype(FLOAT_TYPES[tensor.data_type][0]).itemsize


def _onnx_type(dtype) -> int:
    for code, (numpy_type, _, _) in FLOAT_TYPES.items():
        if np.dtype(numpy_type) == np.dtype(dtype) and code != 16:
            return code
    raise UserError(f"a LoRA weight of dtype {np.dtype(dtype)} cannot be placed for ONNX Runtime")


MAX_GAP = 1 << 20  # bytes of other data a run of weights read in one piece may span (else a new run starts)


def layout(tensors, folder: Path) -> tuple[dict[str, int], list[tuple], int]:
    """Where each tensor goes in one buffer, and the copies that fill it: ({name: offset}, [(source, start, nbytes,
    offset)], total bytes). Weights in external data files are laid out as in the file — runs of neighbouring
    tensors are read and copied in one piece (with what lies between them, at most MAX_GAP) — so that the buffer is
    filled by a few large sequential reads; `source` is then the file's Path. Weights inside the model file are
    copied one by one from their bytes (`source`: the bytes)."""
    external, inline = [], []
    for tensor in tensors:
        if tensor.data_location == 1:  # EXTERNAL
            info = {e.key: e.value for e in tensor.external_data}
            external.append((info["location"], int(info.get("offset", 0)), tensor))
        else:
            inline.append(tensor)
    sizes = {}
    for location in {loc for loc, _, _ in external}:
        file = folder / location
        if not file.is_file():
            name = next(t.name for loc, _, t in external if loc == location)
            raise UserError(f"{file} is missing (weights of {name}); re-run `sdxl-trt export`")
        sizes[location] = file.stat().st_size
    offsets, copies, total = {}, [], 0
    run = None  # [location, file start, file end, buffer offset]
    for location, start, tensor in sorted(external, key=lambda e: (e[0], e[1])):
        end = start + _nbytes(tensor)
        if end > sizes[location]:
            raise UserError(f"{folder / location} is shorter than its model says (weights of {tensor.name}); "
                            "re-run `sdxl-trt export`")
        if (run is None or run[0] != location or start < run[2] or start - run[2] > MAX_GAP
                or (start - run[1]) % ALIGN):
            if run is not None:
                copies.append((folder / run[0], run[1], run[2] - run[1], run[3]))
                total = _aligned(run[3] + run[2] - run[1])
            run = [location, start, end, total]
        run[2] = max(run[2], end)
        offsets[tensor.name] = run[3] + start - run[1]
    if run is not None:
        copies.append((folder / run[0], run[1], run[2] - run[1], run[3]))
        total = _aligned(run[3] + run[2] - run[1])
    for tensor in inline:
        data = _inline_bytes(tensor)
        offsets[tensor.name] = total
        copies.append((data, 0, len(data), total))
        total = _aligned(total + len(data))
    return offsets, copies, total


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _inline_bytes(tensor) -> bytes:
    from onnx import numpy_helper

    if tensor.raw_data:
        return tensor.raw_data[:_nbytes(tensor)]
    return np.ascontiguousarray(numpy_helper.to_array(tensor)).tobytes()


def _read_into(path: Path, start: int, out: np.ndarray) -> None:
    """Fill `out` (uint8) with `out.size` bytes of the file at `path` from `start`."""
    from .cuda import read_bytes

    if out.size:
        read_bytes(np.memmap(path, np.uint8, mode="r"), start, out)


def _allocate(nbytes: int, device: int | None) -> tuple:
    """One buffer of `nbytes` in host memory (`device` None) or on GPU `device`: (the buffer — a uint8 array or a
    cuda.DeviceBuffer —, its address, its DLPack device)."""
    if device is None:
        memory = np.empty(max(nbytes, 1), np.uint8)
        return memory, memory.ctypes.data, (KDL_CPU, 0)
    from .cuda import DeviceBuffer

    memory = DeviceBuffer(nbytes)
    return memory, memory.ptr, (KDL_CUDA, device)


def _put(memory, raw: np.ndarray, offset: int) -> None:
    """Copy the bytes `raw` (uint8) into `memory` (as _allocate made it) at `offset`."""
    if isinstance(memory, np.ndarray):
        memory[offset:offset + raw.nbytes] = raw
    else:
        memory.copy_from_host(raw, offset)


# --- DLPack views of memory we own, for ONNX Runtime (OrtValue.from_dlpack) ---------------------------------------

class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]
# Each view's DLPack struct (and its shape) lives in one malloc'd block that ONNX Runtime hands to libc's free when it
# lets go of the view: no Python callback, so nothing of ours must still exist when that happens (at interpreter exit
# ONNX Runtime's sessions go after Python's objects; a Python deleter then crashed the process on the H100, exit -11)
_libc = ctypes.CDLL(None)
_libc.malloc.restype, _libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
_FREE = _DELETER(ctypes.cast(_libc.free, ctypes.c_void_p).value)
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def dlpack_value(address: int, shape: tuple[int, ...], onnx_type: int, device: tuple[int, int]):
    """An ONNX Runtime OrtValue viewing `address` (no copy, not owned by ONNX Runtime) as a tensor of `shape` and ONNX
    data type `onnx_type`, on `device` (DLPack device type and id)."""
    import onnxruntime as ort

    _, code, bits = FLOAT_TYPES[onnx_type]
    head = ctypes.sizeof(_DLManagedTensor)
    block = _libc.malloc(head + 8 * max(len(shape), 1))
    if not block:
        raise MemoryError("malloc failed for a DLPack view")
    dims = (ctypes.c_int64 * max(len(shape), 1)).from_address(block + head)
    dims[:len(shape)] = shape
    managed = _DLManagedTensor.from_address(block)
    managed.dl_tensor = _DLTensor(address, _DLDevice(*device), len(shape), _DLDataType(code, bits, 1),
                                  ctypes.cast(block + head, ctypes.POINTER(ctypes.c_int64)), None, 0)
    managed.manager_ctx = None
    managed.deleter = _FREE
    return ort.OrtValue.from_dlpack(_capsule_new(block, b"dltensor", None))
