"""TensorRT / TensorRT-RTX engines in an engine directory: names, cache keys, manifest records and checks.

    engines/<backend>/<component>.<precision>.<target>.<key>.engine
    engines/tensorrt/<sm>-<gpu>.timing-cache          TensorRT's timing cache (builds)
    engines/<backend>/runtime-cache.<sm>.bin         TensorRT-RTX's cache of kernels compiled on load

<target> is the GPU's `sm86` for TensorRT and `rtx` for TensorRT-RTX (one engine for all the GPUs it supports);
<key> is the first 12 hex digits of the sha256 of everything the engine depends on: the ONNX files' sha256,
backend and version, target, precision, profiles and build options. The manifest's `engines` section holds one
record per engine file (keyed by its path) with that key, the engine's sha256 and size, and what TensorRT's
API reported about the built network (IO tensors) and its optimization profiles.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from . import tensorrt_api
from .errors import UserError
from .manifest import Manifest, file_problem, load_manifest, write_manifest

ENGINES = "engines"
LOCK = ".build.lock"


def build_hint(manifest: Manifest, backend: str) -> str:
    return f"rebuild with `sdxl-trt build {manifest.root} --backend {backend}`"


def onnx_sha256(manifest: Manifest, component: str, precision: str) -> str:
    """One hash for an ONNX model and its external data, from the manifest's per-file hashes."""
    h = hashlib.sha256()
    for relative in manifest.components[component]["files"][precision]:
        h.update(f"{relative}:{manifest.data['files'][relative]['sha256']}\n".encode())
    return h.hexdigest()


def engine_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def same_target(a: dict, b: dict) -> bool:
    """Engines for the same GPU (TensorRT: model and compute capability) or, for TensorRT-RTX, the same list."""
    return a["label"] == b["label"] and a.get("gpu") == b.get("gpu")


def engine_path(backend: str, component: str, precision: str, target_label: str, key: str) -> str:
    return f"{ENGINES}/{backend}/{component}.{precision}.{target_label}.{key[:12]}.engine"


def records(manifest: Manifest, backend: str | None = None) -> dict[str, dict]:
    engines = manifest.data.get("engines", {})
    return {path: r for path, r in engines.items() if backend is None or r["backend"] == backend}


def find_engine(manifest: Manifest, backend: str, component: str, device: tensorrt_api.Gpu | None) -> tuple[str, dict]:
    """The engine of `component` for `backend` on this machine: for TensorRT the one built for this GPU."""
    candidates = [(p, r) for p, r in records(manifest, backend).items() if r["component"] == component]
    if not candidates:
        raise UserError(f"{manifest.root}: no {backend} engine for {component}; {build_hint(manifest, backend)}")
    if backend == "tensorrt" and device is not None:
        here = {"label": device.sm, "gpu": device.name}
        for path, record in candidates:
            if same_target(record["target"], here):
                return path, record
    return candidates[0]


def engine_problem(manifest: Manifest, path: str, record: dict, device: tensorrt_api.Gpu | None,
                   check_hash: bool = True) -> str | None:
    """Why the engine at `path` cannot be loaded here (missing, truncated, changed, stale, for another GPU or
    version), or None if it can."""
    backend = record["backend"]
    file = manifest.path(path)
    problem = file_problem(file, record, check_hash, "changed since it was built")
    if problem:
        return problem
    entry = manifest.components.get(record["component"], {})
    if record["precision"] not in entry.get("files", {}):
        return f"stale: this directory no longer has a {record['precision']} {record['component']}"
    if record["onnx_sha256"] != onnx_sha256(manifest, record["component"], record["precision"]):
        return f"stale: built from an earlier export of {entry['precisions'][record['precision']]}"
    installed = tensorrt_api.version(backend)
    if installed is None:
        return f"{backend} is not installed (pip install '{tensorrt_api.EXTRAS[backend]}')"
    if installed != record["backend_version"]:
        return f"built with {backend} {record['backend_version']}, this machine has {installed}"
    problem = tensorrt_api.target_problem(record["target"], backend, device)
    if device is None or problem:  # said first: clearer than the header check's "unsupported cc"
        return problem
    with open(file, "rb") as f:
        header = f.read(4096)
    trt = tensorrt_api.import_trt(backend)
    problem = tensorrt_api.header_problem(trt, tensorrt_api.Logger(trt), header)
    if problem:
        return f"{file}: {backend} rejects the engine header ({problem})"
    return None


@contextlib.contextmanager
def locked(root: Path, required: bool = True) -> Iterator[None]:
    """One command at a time changes an engine directory (build and optimize rewrite its manifest, export --force
    replaces it). `required` False: a directory where the lock file cannot be made (read-only) goes unlocked, as no
    command can be changing it either."""
    try:
        f = open(root / LOCK, "a+")
    except OSError as e:
        if not required:
            yield
            return
        raise UserError(f"{root}: cannot build here ({e.strerror}); the engine directory must be writable") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{root}: another sdxl-trt command (build, optimize or export --force) is changing this "
                            "engine directory; run this again once it has ended") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_manifest(root: Path, change: Callable[[dict], None]) -> Manifest:
    """Re-read the manifest, apply `change` to its data and write it back atomically."""
    manifest = load_manifest(root)
    change(manifest.data)
    write_manifest(root, manifest.data)
    return load_manifest(root)

