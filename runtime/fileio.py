"""Writing files and folders so that a reader never sees them half-written.

Everything goes to a temporary sibling first and is renamed into place at the end: an interrupted process leaves
at most a `.tmp-*` sibling behind, never a truncated PNG, manifest or engine. Two processes writing the same path
each write their own temporary and the last rename wins whole. A writer holds an advisory lock (flock) on its
temporary file, or on a `.lock` beside its temporary folder, for as long as it writes; the kernel drops it when the
process dies, even by SIGKILL, so the next write of the same path removes the temporaries nobody holds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

# what only writing raises: the place cannot take the bytes (full, over quota, read-only, file too large)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _unheld(lock: Path) -> bool:
    """Whether nobody holds the flock on `lock` (its writer finished or died); False if it cannot be opened."""
    try:
        with open(lock, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
    except OSError:  # held (BlockingIOError), gone, or not ours to open
        return False


def sweep_stale(path: str | os.PathLike) -> list[Path]:
    """Remove what dead writers of `path` left beside it: temporary files whose flock nobody holds; for a folder, the
    temporary `.tmp-<name>-*` and the previous version parked as `<that>.old` during the swap, under a `<that>.lock`
    nobody holds (the previous version is moved back if the writer died between its two renames)."""
    path = Path(path)
    removed = []
    for entry in sorted(path.parent.glob(f".tmp-{path.name}-*")):
        if entry.suffix == ".lock":
            if not _unheld(entry):
                continue
            base = entry.with_suffix("")
            parked = base.with_name(base.name + ".old")
            if (parked / path.name).exists() and not path.exists():
                os.replace(parked / path.name, path)
            for folder in (base, parked):
                if folder.exists():
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder)
            entry.unlink(missing_ok=True)
        elif entry.is_file() and _unheld(entry):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


# the longest file name the writers here can use: the filesystem's 255 bytes less the room of the temporary name they
# write first (atomic_file: ".tmp-<name>-" + 8 random characters)
NAME_MAX = 255 - 16


def check_name(path: str | os.PathLike, what: str) -> None:
    """Every part of `path` short enough to be a file name here (and for the temporary name written first)."""
    for part in Path(path).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise UserError(f"{what}: the name {part[:24]}… is too long ({len(os.fsencode(part))} bytes; the limit "
                            f"is {NAME_MAX})")


def check_writable(path: str | os.PathLike, what: str, need_bytes: int = 0) -> None:
    """Before the work starts: `path` (a file or folder still to be written) can be, in the folder it will be
    written in (the nearest existing one, for folders still to be made), and that folder's filesystem has
    `need_bytes` free (0: the size is not known beforehand). `what` leads the error (the flag and its value).
    A probe file is made and removed, because permission bits say nothing for root, nor about read-only mounts."""
    check_name(path, what)
    path = Path(path).expanduser().absolute()
    folder = path.parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=folder)  # swept like any dead writer's
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what}: cannot write in {folder} ({e.strerror})") from None
    if need_bytes:
        stat = os.statvfs(folder)
        free = stat.f_bavail * stat.f_frsize
        if free < need_bytes:
            raise UserError(f"{what}: {folder} has {_size(free)} free, the result needs about "
                            f"{_size(need_bytes)}; free some space or write elsewhere")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


@contextlib.contextmanager
def _write_errors_said(path: Path) -> Iterator[None]:
    """A write that fails because the place is full or read-only: one line naming the path (the temporary is
    removed by the caller's `finally`, so `path` keeps its previous version, or stays absent)."""
    try:
        yield
    except OSError as e:
        code = e.errno
        if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list):  # copytree's: reasons as text
            reasons = [str(why) for *_, why in e.args[0]]
            code = next((n for n in WRITE_ERRNOS if any(f"[Errno {n}]" in why for why in reasons)), None)
        if code not in WRITE_ERRNOS:
            raise
        raise UserError(f"cannot write {path}: {os.strerror(code)} (in {path.parent}); it was left as it was") from None


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`. A full or read-only
    filesystem is a UserError naming `path`."""
    path = Path(path)
    with _write_errors_said(path):
        with _atomic_file(path) as tmp:
            yield tmp


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    tmp = Path(tmp)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until the rename: the temporary is ours while we live
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600; give it the mode a plain open() would
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` (an existing folder is swapped out).
    A full or read-only filesystem is a UserError naming `path`."""
    path = Path(path)
    with _write_errors_said(path):
        with _atomic_dir(path) as tmp:
            yield tmp


@contextlib.contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    lock = tmp.with_name(tmp.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it 0700
        parked = tmp.with_name(tmp.name + ".old")  # the previous version, under the same lock while swapping
        if path.exists():
            parked.mkdir()
            try:
                os.replace(path, parked / path.name)
            except OSError:
                parked.rmdir()  # nothing was moved: no empty folder left beside `path`
                raise
        os.replace(tmp, path)
        shutil.rmtree(parked, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lock.unlink(missing_ok=True)
        os.close(fd)


def read_json(path: str | os.PathLike, what: str) -> dict:
    """A JSON object from a file the user gave us; missing or broken is their input error, named with its path."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what}: {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what}: {path} does not hold a JSON object")
    return data


def cache_dir(*parts: str, create: bool = True) -> Path:
    """Our cache folder (`$SDXL_TRT_CACHE`, else `$XDG_CACHE_HOME/sdxl-trt`, else `~/.cache/sdxl-trt`), created
    unless `create` is False."""
    root = os.environ.get("SDXL_TRT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdxl-trt"
    path = Path(root).joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path
