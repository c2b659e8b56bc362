"""Atomic writes: an interrupted write leaves the old file (or nothing), never half a file."""

from __future__ import annotations

import pytest

from sdxl_trt.runtime.fileio import atomic_dir, atomic_file


def test_atomic_file_replaces_only_on_success(tmp_path):
    path = tmp_path / "out.png"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    with atomic_file(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and list(tmp_path.iterdir()) == [path]
    assert path.stat().st_mode & 0o644 == 0o644  # readable like any file we write


def test_atomic_dir_swaps_whole_folders(tmp_path):
    path = tmp_path / "engine"
    with atomic_dir(path) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(path) as tmp:
            (tmp / "b").write_text("2")
            raise KeyboardInterrupt
    assert [p.name for p in path.iterdir()] == ["a"] and list(tmp_path.iterdir()) == [path]
    with atomic_dir(path) as tmp:
        (tmp / "c").write_text("3")
    assert [p.name for p in path.iterdir()] == ["c"] and list(tmp_path.iterdir()) == [path]


def test_a_folder_that_cannot_be_moved_aside_is_kept_and_leaves_nothing_beside_it(tmp_path, monkeypatch):
    """A mount point (EBUSY) or a folder of another owner cannot be renamed: the write fails, the folder is as it was,
    and no empty `.old` folder is left beside it."""
    import errno
    import os

    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    real = os.replace

    def busy(src, dst):
        if str(src) == str(out):
            raise OSError(errno.EBUSY, "Device or resource busy", str(src))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", busy)
    with pytest.raises(OSError):
        with atomic_dir(out) as tmp:
            (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_file_hashes_are_remembered_until_the_file_changes(tmp_path, monkeypatch):
    import os

    from sdxl_trt.runtime import manifest as mf

    monkeypatch.setenv("SDXL_TRT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    reads = []
    real = mf.sha256_file
    monkeypatch.setattr(mf, "sha256_file", lambda p: reads.append(p) or real(p))
    expected = real(path)
    assert mf.checked_sha256(path) == expected and len(reads) == 1
    assert mf.checked_sha256(path) == expected and len(reads) == 2  # just written: not trusted to its times yet
    monkeypatch.setattr(mf, "SETTLED_NS", 0)
    assert mf.checked_sha256(path) == expected and len(reads) == 3  # remembered now
    assert mf.checked_sha256(path) == expected and len(reads) == 3  # and not read again
    with open(path, "r+b") as f:  # same size, same inode, bytes changed in place
        f.write(b"b")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - 10**9))  # even with its mtime set back
    assert mf.checked_sha256(path) == real(path) != expected  # the status-change time moved: read again
    (tmp_path / "cache").chmod(0o500)  # a read-only cache: still correct, just not remembered
    try:
        path.write_bytes(b"c" * 1000)
        assert mf.checked_sha256(path) == real(path)
    finally:
        (tmp_path / "cache").chmod(0o700)


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from sdxl_trt.runtime.fileio import atomic_dir, atomic_file
target = Path(sys.argv[1])
with (atomic_dir if sys.argv[2] == "dir" else atomic_file)(target) as tmp:
    if sys.argv[2] == "dir":
        (tmp / "half.onnx").write_bytes(b"x" * 1000)
    else:
        tmp.write_bytes(b"half a png")
    os.kill(os.getpid(), signal.SIGKILL)  # no finally, no atexit: what `kill -9` or the OOM killer does
"""


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_what_a_killed_writer_leaves_is_removed_by_the_next_write(tmp_path, kind):
    import subprocess
    import sys

    target = tmp_path / ("engine" if kind == "dir" else "out.png")
    run = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target), kind], capture_output=True)
    assert run.returncode == -9
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not target.exists() and left and all(name.startswith(f".tmp-{target.name}-") for name in left)
    with (atomic_dir if kind == "dir" else atomic_file)(target) as tmp:
        if kind == "dir":
            (tmp / "model.onnx").write_text("whole")
        else:
            tmp.write_text("a whole png")
    assert list(tmp_path.iterdir()) == [target]  # the dead writer's temporaries are gone


def test_a_live_writers_temporaries_are_left_alone(tmp_path):
    from sdxl_trt.runtime.fileio import sweep_stale

    target = tmp_path / "engine"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
        with atomic_file(tmp_path / "x.png") as png:
            png.write_text("png")
            assert sweep_stale(target) == [] and sweep_stale(tmp_path / "x.png") == []  # both locks held
            assert tmp.exists() and png.exists()
    assert [p.name for p in target.iterdir()] == ["a"]


def test_a_swap_killed_between_its_renames_gets_the_previous_folder_back(tmp_path):
    from sdxl_trt.runtime.fileio import sweep_stale

    target = tmp_path / "engine"
    with atomic_dir(target) as tmp:
        (tmp / "manifest.json").write_text("{}")
    # the state after `os.replace(path, parked)` and before `os.replace(tmp, path)`, its writer dead
    (tmp_path / ".tmp-engine-dead.old").mkdir()
    target.rename(tmp_path / ".tmp-engine-dead.old" / "engine")
    (tmp_path / ".tmp-engine-dead").mkdir()
    (tmp_path / ".tmp-engine-dead.lock").touch()
    assert not target.exists()
    assert len(sweep_stale(target)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["engine"] and (target / "manifest.json").read_text() == "{}"


CONCURRENT_WRITER = """
import sys
from pathlib import Path
from sdxl_trt.runtime.fileio import atomic_file
target, byte = Path(sys.argv[1]), sys.argv[2].encode()
for _ in range(40):
    with atomic_file(target) as tmp:
        tmp.write_bytes(byte * (1 << 20))
"""


def test_two_processes_writing_one_path_never_leave_a_mixed_file(tmp_path):
    """Two writers race on one file while this process reads it: every read is one writer's whole file."""
    import subprocess
    import sys

    target = tmp_path / "out.png"
    writers = [subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, str(target), b]) for b in "ab"]
    reads = 0
    while any(w.poll() is None for w in writers):
        if target.exists():
            data = target.read_bytes()
            assert len(data) == 1 << 20 and data.count(data[:1]) == len(data)  # whole, and from one writer
            reads += 1
    assert [w.returncode for w in writers] == [0, 0]
    assert list(tmp_path.iterdir()) == [target] and reads > 0


def test_an_engine_directory_s_hashes_are_read_once_and_any_change_is_caught(tiny_engine, tmp_path, monkeypatch):
    """Opening a directory a second time reads no weights (the verified-hash record, keyed by device, inode, size and
    modification/status-change times); touching a file makes it be read again (and pass: same bytes); rewriting it
    with other bytes of the same size, or truncating it, is refused in one line naming the file."""
    import os
    import shutil

    from sdxl_trt.runtime import UserError
    from sdxl_trt.runtime import manifest as mf
    from sdxl_trt.runtime.backends import used_files

    monkeypatch.setenv("SDXL_TRT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mf, "SETTLED_NS", 0)
    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine)
    reads = []
    real = mf.sha256_file
    monkeypatch.setattr(mf, "sha256_file", lambda p, *a: reads.append(p.name) or real(p, *a))

    def check():
        manifest = mf.load_manifest(engine)
        manifest.check_files(only=used_files("ort-cpu", manifest))

    check()
    assert len(reads) >= 5  # first open: every file the backend uses is hashed
    reads.clear()
    check()
    assert reads == []  # second open: none
    weights = engine / "onnx" / "unet" / "model.onnx"
    os.utime(weights)  # touched: same bytes, new times
    check()
    assert reads == ["model.onnx"]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))  # same size, one byte changed
    with pytest.raises(UserError, match=r"model\.onnx does not match its sha256"):
        check()
    with open(weights, "r+b") as f:
        f.truncate(len(data) - 100)
    with pytest.raises(UserError, match=r"model\.onnx has \d+ bytes, the manifest says"):
        check()


QUIET = """
import sys, onnx, onnxruntime as ort
from onnx import helper, TensorProto, numpy_helper
import numpy as np
from sdxl_trt.runtime import backends
backends.VERBOSE = sys.argv[1] == "verbose"
backends.quiet_onnxruntime()
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
unused = numpy_helper.from_array(np.ones(2, np.float32), "unused")  # ONNX Runtime warns that it removes it
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [unused])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 10
ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_onnx_runtime_warnings_are_shown_only_with_verbose(mode):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", QUIET, mode], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert ("Removing initializer" in run.stderr) == (mode == "verbose"), run.stderr
