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
