"""The little of the CUDA runtime the engine backends need (through cuda-python's `cuda.bindings.runtime`): device
buffers, a stream, copies. Everything is allocated once and reused; nothing here allocates per call."""

from __future__ import annotations

import contextlib
import ctypes
import threading

import numpy as np

from .errors import UserError


def cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        raise UserError("cuda-python is not installed: pip install 'sdxl-trt[gpu]'") from None
    return runtime


def start_in_background() -> None:
    """Start CUDA (the driver and the device's primary context: 0.2-0.3 s on the H100) on a thread of its own, so that
    it overlaps with importing and loading ONNX Runtime, which hold the GIL while cuda-python's calls release it; the
    first CUDA call of the main thread then finds the context made (or waits for it inside the driver). A process
    without a GPU or cuda-python loses nothing: any failure here is left for that first call to report."""
    def start():
        try:
            cudart().cudaFree(0)
        except Exception:  # noqa: BLE001 - reported, in the backend's words, by the first call that needs the GPU
            pass

    # not a daemon: a process ending meanwhile (a call refused at once) waits for the driver instead of tearing the
    # interpreter down under a thread inside it
    threading.Thread(target=start, name="cuda-start", daemon=False).start()


def check(result):
    """cuda-python returns (error, *values): raise on an error, else return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        rt = cudart()
        _, name = rt.cudaGetErrorName(err)
        _, text = rt.cudaGetErrorString(err)
        raise UserError(f"CUDA error {name.decode()}: {text.decode()}")
    return values[0] if len(values) == 1 else (values or None)


def device_count() -> int:
    """CUDA devices this process sees (0 without a driver or cuda-python)."""
    try:
        return int(check(cudart().cudaGetDeviceCount()))
    except (UserError, ImportError):
        return 0


def current_device() -> int:
    return int(check(cudart().cudaGetDevice()))


def compute_capability(device: int) -> tuple[int, int]:
    """(major, minor) of GPU `device`, e.g. (9, 0) for an H100."""
    rt = cudart()
    return tuple(int(check(rt.cudaDeviceGetAttribute(getattr(rt.cudaDeviceAttr, f"cudaDevAttrComputeCapability{part}"),
                                                     device))) for part in ("Major", "Minor"))


def set_device(device: int) -> None:
    """Make `device` this thread's current device: what it allocates, the streams and events it makes and the kernels
    it launches are that device's (cheap: a few microseconds; ONNX Runtime sets its session's device at each run)."""
    check(cudart().cudaSetDevice(device))


@contextlib.contextmanager
def on_device(device: int):
    """`device` current for the block, the thread's previous device again after it."""
    previous = current_device()
    if previous == device:
        yield
        return
    set_device(device)
    try:
        yield
    finally:
        set_device(previous)


def pointer_device(ptr: int) -> int:
    """The device a device address belongs to."""
    return int(check(cudart().cudaPointerGetAttributes(ptr)).device)


def enable_peer_access(devices) -> dict[tuple[int, int], bool]:
    """Let each device of `devices` read and write the others' memory directly (NVLink / PCIe peer to peer) where the
    hardware allows; {(a, b): direct} for every ordered pair. Copies between a pair without it still work (staged by
    the driver), slower."""
    rt = cudart()
    direct = {}
    for a in devices:
        for b in devices:
            if a == b:
                continue
            direct[(a, b)] = bool(check(rt.cudaDeviceCanAccessPeer(a, b)))
            if direct[(a, b)]:
                with on_device(a):
                    err = rt.cudaDeviceEnablePeerAccess(b, 0)
                    err = err[0] if isinstance(err, tuple) else err
                    if int(err) != 0 and int(err) != int(rt.cudaError_t.cudaErrorPeerAccessAlreadyEnabled):
                        check(err)
    return direct


def copy_peer(dst: int, dst_device: int, src: int, src_device: int, nbytes: int, stream: Stream) -> None:
    """Queue a copy of `nbytes` from `src` on `src_device` to `dst` on `dst_device` on `stream`."""
    check(cudart().cudaMemcpyPeerAsync(dst, dst_device, src, src_device, nbytes, stream.handle))


class Event:
    """A CUDA event of the current device, to order work across streams (and devices) without the host waiting."""

    def __init__(self, timing: bool = False):
        rt = cudart()
        self.handle = check(rt.cudaEventCreateWithFlags(rt.cudaEventDefault if timing else rt.cudaEventDisableTiming))

    def elapsed_ms(self, end: Event) -> float:
        """Milliseconds from this event to `end` (both made with `timing`, both recorded and done)."""
        return float(check(cudart().cudaEventElapsedTime(self.handle, end.handle)))

    def record(self, stream: Stream) -> None:
        check(cudart().cudaEventRecord(self.handle, stream.handle))

    def wait(self, stream: Stream) -> None:
        """Work queued on `stream` from now on starts after the work before the last `record` (none recorded: at once)."""
        check(cudart().cudaStreamWaitEvent(stream.handle, self.handle, 0))

    def close(self) -> None:
        if self.handle is not None:
            cudart().cudaEventDestroy(self.handle)
            self.handle = None


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


_captures = {"running": 0, "deferred": []}  # CUDA graph captures in flight, and the frees waiting for them to end
_captures_lock = threading.Lock()


@contextlib.contextmanager
def capturing():
    """Around work that may capture a CUDA graph (an ONNX Runtime run with a graph id, our own loop capture): ONNX
    Runtime captures in global mode, where a cudaFree from any thread meanwhile breaks the capture ("operation failed
    due to a previous error during capture"). Our device memory freed meanwhile (free_device: e.g. the weights of a
    pipeline that the garbage collector finalizes on another thread) is freed once no capture runs."""
    with _captures_lock:
        _captures["running"] += 1
    try:
        yield
    finally:
        with _captures_lock:
            _captures["running"] -= 1
            if not _captures["running"]:
                pending, _captures["deferred"] = _captures["deferred"], []
                for ptr, device in pending:
                    _free(ptr, device)


def free_device(ptr: int, device: int | None = None) -> None:
    """cudaFree (on `device`, the one it was allocated on, from whichever thread), or later if a CUDA graph is being
    captured (capturing). The lock is held through the free, so a capture starts only after a free already under way
    has finished."""
    with _captures_lock:
        if _captures["running"]:
            _captures["deferred"].append((ptr, device))
        else:
            _free(ptr, device)


def _free(ptr: int, device: int | None) -> None:
    with contextlib.nullcontext() if device is None else on_device(device):
        check(cudart().cudaFree(ptr))


class DeviceBuffer:
    """`nbytes` of device memory; grows only through `reserve` (which returns whether the address changed)."""

    def __init__(self, nbytes: int):
        self.ptr, self.nbytes, self.device = 0, 0, None
        self.reserve(nbytes)

    def reserve(self, nbytes: int) -> bool:
        """Grow to `nbytes` on the current device (the first allocation's device: the thread must be on it)."""
        if nbytes <= self.nbytes:
            return False
        self.free()
        self.ptr = int(check(cudart().cudaMalloc(max(nbytes, 1))))
        self.nbytes, self.device = nbytes, current_device()
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
            free_device(self.ptr, self.device)
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


UPLOAD_READ = "mmap"  # how upload_file_ranges reads files by default (benchmarks/cold_start.py times both ways)
UPLOAD_WORKERS = 4


def upload_file_ranges(copies, workers: int | None = None, chunk: int = 32 << 20, read: str | None = None) -> None:
    """Copy byte ranges of files to device memory: `copies` holds (path, file offset, nbytes, device address).

    The bytes go through page-locked staging buffers, copied from there asynchronously, on `workers` threads at once,
    each with its own stream and two buffers (one filling while the other is copied), in pieces of `chunk` bytes —
    not tensor by tensor from pageable memory, which the driver stages through its own buffer one copy at a time.
    `read`: "mmap" copies from a mapping of the file, "pread" reads with pread(2). Returns when every byte is on the
    device."""
    import os
    import threading

    rt = cudart()
    workers, read = workers or UPLOAD_WORKERS, read or UPLOAD_READ
    pieces = [(path, offset + done, min(chunk, nbytes - done), address + done)
              for path, offset, nbytes, address in copies for done in range(0, nbytes, chunk)]
    if not pieces:
        return
    workers = max(1, min(workers, len(pieces)))
    size = min(chunk, max(n for _, _, n, _ in pieces))
    device = pointer_device(pieces[0][3])  # each worker's stream on the device it fills (a thread starts on device 0)
    errors: list[BaseException] = []

    def work(share):
        set_device(device)
        stream = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))
        slots = []
        files = {}
        try:
            for _ in range(2):
                host = int(check(rt.cudaHostAlloc(size, rt.cudaHostAllocDefault)))
                slots.append((host, memoryview((ctypes.c_char * size).from_address(host)).cast("B"),
                              check(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming))))
            for i, (path, offset, nbytes, address) in enumerate(share):
                host, view, event = slots[i % 2]
                check(rt.cudaEventSynchronize(event))  # this buffer's previous copy is done
                if path not in files:
                    files[path] = np.memmap(path, np.uint8, mode="r") if read == "mmap" else os.open(path, os.O_RDONLY)
                read_bytes(files[path], offset, view[:nbytes])
                check(rt.cudaMemcpyAsync(address, host, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
                check(rt.cudaEventRecord(event, stream))
            check(rt.cudaStreamSynchronize(stream))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            errors.append(e)
        finally:
            rt.cudaStreamSynchronize(stream)
            for host, view, event in slots:
                view.release()
                rt.cudaEventDestroy(event)
                rt.cudaFreeHost(host)
            rt.cudaStreamDestroy(stream)
            for file in files.values():
                if isinstance(file, int):
                    os.close(file)

    threads = [threading.Thread(target=work, args=(pieces[i::workers],), daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def read_bytes(file, offset: int, out) -> None:
    """Fill the writable buffer `out` with the bytes of `file` (a numpy memmap, or a file descriptor) from `offset`."""
    import os

    out = memoryview(out).cast("B")
    if not isinstance(file, int):
        if offset + out.nbytes > file.size:
            raise UserError(f"{file.filename} ended early (at byte {file.size}); re-run `sdxl-trt export`")
        np.frombuffer(out, np.uint8)[:] = file[offset:offset + out.nbytes]
        return
    done = 0
    while done < out.nbytes:
        n = os.preadv(file, [out[done:]], offset + done)
        if n <= 0:
            raise UserError(f"a weights file ended early (at byte {offset + done}); re-run `sdxl-trt export`")
        done += n
