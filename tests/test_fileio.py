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
