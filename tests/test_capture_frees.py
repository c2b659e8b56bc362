"""Device memory freed while a CUDA graph is being captured waits until the capture ends (runtime/cuda.py).

ONNX Runtime captures its graphs in global mode: a cudaFree from any thread meanwhile breaks the capture ("operation
failed due to a previous error during capture", seen once in seven runs of a GPU test on the H100 while the garbage
collector could finalize an earlier pipeline's weights on another thread). Here on cuda-python's API over host
memory (tests/fake_gpu.py): what is freed inside `capturing()` is freed when the last capture ends, on any thread."""

from __future__ import annotations

import threading

import pytest

from sdxl_trt.runtime import cuda
from fake_gpu import FakeCudart


@pytest.fixture
def fake(monkeypatch):
    cudart = FakeCudart()
    monkeypatch.setattr(cuda, "cudart", lambda: cudart)
    return cudart


def test_a_buffer_freed_during_a_capture_is_freed_when_the_capture_ends(fake):
    kept, freed = cuda.DeviceBuffer(64), cuda.DeviceBuffer(128)
    with cuda.capturing():
        freed.free()
        assert freed.ptr == 0 and len(fake.memory) == 2  # ours forgets it; the device keeps it until the end
        with cuda.capturing():  # a nested capture (a graph captured inside a run that captures) ends first
            pass
        assert len(fake.memory) == 2
    assert list(fake.memory) == [kept.ptr]
    kept.free()
    assert not fake.memory  # outside a capture a free is immediate


def test_a_free_from_another_thread_waits_for_the_capture_on_this_one(fake):
    buffer = cuda.DeviceBuffer(256)
    done = threading.Event()
    with cuda.capturing():
        worker = threading.Thread(target=lambda: (buffer.free(), done.set()))
        worker.start()
        assert done.wait(10)  # the other thread is not blocked: its free is queued
        assert len(fake.memory) == 1
    worker.join()
    assert not fake.memory


def test_a_capture_that_fails_still_frees_what_was_queued(fake):
    buffer = cuda.DeviceBuffer(32)
    with pytest.raises(RuntimeError, match="capture failed"):
        with cuda.capturing():
            buffer.free()
            raise RuntimeError("capture failed")
    assert not fake.memory
