"""The little of the CUDA runtime the engine backends need (through cuda-python's `cuda.bindings.runtime`): device
buffers, a stream, copies. Everything is allocated once and reused; nothing here allocates per call."""

from __future__ import annotations

import contextlib

import numpy as np

from .errors import UserError


def cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        raise UserError("cuda-python is not installed: pip install 'sdxl-trt[gpu]'") from None
    return runtime


def check(result):
    """cuda-python returns (error, *values): raise on an error, else return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        rt = cudart()
        _, name = rt.cudaGetErrorName(err)
        _, text = rt.cudaGetErrorString(err)
        raise UserError(f"CUDA error {name.decode()}: {text.decode()}")
    return values[0] if len(values) == 1 else (values or None)


def device_memory() -> tuple[int, int]:
    """(bytes in use, bytes in all) on the current GPU, every process's allocations counted."""
    free, total = check(cudart().cudaMemGetInfo())
    return int(total) - int(free), int(total)


class Stream:
    def __init__(self):
        rt = cudart()
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle))

    def close(self) -> None:
        if self.handle is not None:
            check(cudart().cudaStreamDestroy(self.handle))
            self.handle = None


class DeviceBuffer:
    """`nbytes` of device memory; grows only through `reserve` (which returns whether the address changed)."""

    def __init__(self, nbytes: int):
        self.ptr, self.nbytes = 0, 0
        self.reserve(nbytes)

    def reserve(self, nbytes: int) -> bool:
        if nbytes <= self.nbytes:
            return False
        self.free()
        self.ptr = int(check(cudart().cudaMalloc(max(nbytes, 1))))
        self.nbytes = nbytes
        return True

    def upload(self, array: np.ndarray, stream: Stream) -> None:
        array = np.ascontiguousarray(array)
        if array.nbytes > self.nbytes:
            raise ValueError(f"{array.nbytes} bytes do not fit a {self.nbytes}-byte buffer")
        rt = cudart()
        check(rt.cudaMemcpyAsync(self.ptr, array.ctypes.data, array.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                 stream.handle))

    def copy_from_host(self, data: np.ndarray, offset: int = 0) -> None:
        """Copy `data`'s bytes to `offset` in this buffer now (synchronous: done when this returns)."""
        if offset + data.nbytes > self.nbytes:
            raise ValueError(f"{data.nbytes} bytes at {offset} do not fit a {self.nbytes}-byte buffer")
        rt = cudart()
        check(rt.cudaMemcpy(self.ptr + offset, data.ctypes.data, data.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice))

    def download(self, out: np.ndarray, stream: Stream, offset: int = 0) -> np.ndarray:
        """Queue a copy of `out.nbytes` from `offset` in this buffer into `out` on `stream`."""
        rt = cudart()
        check(rt.cudaMemcpyAsync(out.ctypes.data, self.ptr + offset, out.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle))
        return out

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr))
            self.ptr, self.nbytes = 0, 0


class BufferPool(dict):
    """Device buffers by name, each grown to the largest size asked of it and then reused: after the largest shape
    has been seen, nothing is allocated."""

    def reserve(self, name: str, nbytes: int) -> DeviceBuffer:
        buffer = self.setdefault(name, DeviceBuffer(0))
        buffer.reserve(nbytes)
        return buffer

    def put(self, name: str, array: np.ndarray, stream: Stream) -> int:
        """Upload `array` into the buffer `name` on `stream`; returns its device address."""
        array = np.ascontiguousarray(array)
        buffer = self.reserve(name, array.nbytes)
        buffer.upload(array, stream)
        return buffer.ptr


class Graph:
    """A CUDA graph recorded from the work queued on a stream, replayed with one launch.

    `with graph.capture(stream): ...` records everything queued on `stream` in the block (in relaxed mode: a library
    that allocates from its memory pool while being captured is allowed to); `launch(stream)` replays it. Device
    addresses are baked in: the buffers it reads and writes must stay where they were."""

    def __init__(self):
        self.graph = self.exec = None

    @contextlib.contextmanager
    def capture(self, stream: Stream):
        rt = cudart()
        check(rt.cudaStreamBeginCapture(stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed))
        try:
            yield self
        except BaseException:
            err, graph = rt.cudaStreamEndCapture(stream.handle)  # leave capture mode whatever happened
            if int(err) == 0 and graph is not None and int(graph):
                rt.cudaGraphDestroy(graph)
            raise
        self.graph = check(rt.cudaStreamEndCapture(stream.handle))
        self.exec = check(rt.cudaGraphInstantiate(self.graph, 0))

    def launch(self, stream: Stream) -> None:
        check(cudart().cudaGraphLaunch(self.exec, stream.handle))

    def close(self) -> None:
        rt = cudart()
        if self.exec is not None:
            rt.cudaGraphExecDestroy(self.exec)
        if self.graph is not None:
            rt.cudaGraphDestroy(self.graph)
        self.graph = self.exec = None
