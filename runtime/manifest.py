"""The engine directory's `manifest.json`: what was exported from what, and how to check every file.

Written by the exporter, read by the runtime (without torch). Layout of an engine directory:

    manifest.json
    tokenizer/, tokenizer_2/          CLIP BPE files (CLIP-L's, CLIP-G's)
    scheduler/scheduler_config.json   the model's default scheduler
    onnx/<component>/model.onnx       fp32 (+ model.onnx.data for large models)
    onnx/<component>/model.fp16.onnx  fp16 variant for GPU backends (+ .data)

Manifest keys: `format`, `format_version`, `created`, `sources` (what each role was exported from),
`versions` (torch, onnx, diffusers, transformers, sdxl-trt), `onnx` (opset, IR version), `model` (config values
the runtime needs), `scheduler`, `tokenizers`, `components` (contract, precisions and files of each exported
model), `pipelines` (which component each role uses for what: the refiner may share the base's clip_g and VAE),
`files` (sha256 and size of every exported file, paths relative to the directory), and, once `sdxl-trt build` has
run, `engines` (one record per TensorRT / TensorRT-RTX engine: see engines.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import UserError
from .fileio import atomic_file, cache_dir

MANIFEST = "manifest.json"
SETTLED_NS = 3_000_000_000  # see checked_sha256
FORMAT = "sdxl-trt-engine-dir"
FORMAT_VERSION = 1
EXPORT_HINT = "re-run `sdxl-trt export` into a fresh directory"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checked_sha256(path: Path) -> str:
    """sha256 of a file, remembered in the cache (`sha256/`) under the file's identity and last change (device,
    inode, size, modification and status-change times): a file not written since it was last hashed is not read
    again, so a second start does not re-read gigabytes of weights. Any write changes the status-change time, which
    no user can set back."""
    stat = path.stat()
    key = f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
    try:
        record = cache_dir("sha256") / (hashlib.sha256(str(path.resolve()).encode()).hexdigest() + ".json")
    except OSError:  # no cache folder to be had: hash every time
        record = None
    if record is not None and record.is_file():
        try:
            cached = json.loads(record.read_text(encoding="utf-8"))
            if isinstance(cached, dict) and cached.get("key") == key and isinstance(cached.get("sha256"), str):
                return cached["sha256"]
        except (OSError, ValueError):
            pass
    digest = sha256_file(path)
    # a file changed within the last seconds could change again within the same clock tick, unseen by its times
    # ("racily clean", as git calls it): remember only files that have been still for a while
    settled = time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > SETTLED_NS
    if record is not None and settled:
        try:
            with atomic_file(record) as tmp:
                tmp.write_text(json.dumps({"path": str(path.resolve()), "key": key, "sha256": digest}), encoding="utf-8")
        except OSError:
            pass  # a read-only cache only costs the next start a re-read
    return digest


def file_record(root: Path, path: Path) -> tuple[str, dict]:
    return path.relative_to(root).as_posix(), {"sha256": sha256_file(path), "size": path.stat().st_size}


def file_problem(path: Path, record: dict, check_hash: bool, changed: str) -> str | None:
    """Why `path` is not the file its manifest record ({"size", "sha256"}) describes, or None. `changed` says since
    when, in the message for a wrong hash."""
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != record["size"]:
        return f"{path} has {size} bytes, the manifest says {record['size']}: truncated or replaced"
    if check_hash and checked_sha256(path) != record["sha256"]:
        return f"{path} does not match its sha256 in the manifest: {changed}"
    return None


def write_manifest(root: Path, data: dict) -> None:
    with atomic_file(root / MANIFEST) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


@dataclass
class Manifest:
    root: Path
    data: dict

    @property
    def components(self) -> dict:
        return self.data["components"]

    @property
    def sha256(self) -> str:
        """A hash of the manifest without its `engines` section: it names every exported file's hash, so it
        identifies what was exported (building engines does not change it)."""
        exported = {k: v for k, v in self.data.items() if k != "engines"}
        return hashlib.sha256(json.dumps(exported, sort_keys=True).encode()).hexdigest()

    def path(self, relative: str) -> Path:
        """An absolute path for a manifest entry; entries may not leave the engine directory."""
        pure = PurePosixPath(relative)
        if pure.is_absolute() or ".." in pure.parts:
            raise UserError(f"{self.root / MANIFEST}: file entry {relative!r} points outside the engine directory")
        return self.root.joinpath(*pure.parts)

    @property
    def engines(self) -> dict:
        """TensorRT / TensorRT-RTX engines built into this directory (see engines.py), by path."""
        return self.data.get("engines", {})

    def check_files(self, hashes: bool = True, only: list[str] | None = None) -> None:
        """Every listed file (or those in `only`) exists with its recorded size (and sha256 with `hashes`)."""
        for relative, record in self.data["files"].items():
            if only is not None and relative not in only:
                continue
            problem = file_problem(self.path(relative), record, hashes, "changed since export")
            if problem:
                raise UserError(f"{problem}; {EXPORT_HINT}")


def load_manifest(root: str | Path) -> Manifest:
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise UserError(f"engine directory {root} does not exist; create one with `sdxl-trt export`")
    if not path.is_file():
        raise UserError(f"{root} has no {MANIFEST}: not an engine directory (or an export that did not finish); "
                        f"{EXPORT_HINT}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); {EXPORT_HINT}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not an sdxl-trt manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has format version {data.get('format_version')}; this sdxl-trt reads version "
                        f"{FORMAT_VERSION}: {EXPORT_HINT} with this version")
    manifest = Manifest(root, data)
    _check_file_lists(manifest)
    return manifest


def _check_file_lists(manifest: Manifest) -> None:
    """Every file a component names stays inside the engine directory and has a size/sha256 record in `files`
    (which is what every later check reads): a hand-edited or foreign manifest is refused here, in one line."""
    records = manifest.data.get("files")
    components = manifest.data.get("components")
    if not isinstance(records, dict) or not isinstance(components, dict):
        raise UserError(f"{manifest.root / MANIFEST} lacks its `files` or `components` table; {EXPORT_HINT}")
    for name, entry in components.items():
        lists = list((entry.get("files") or {}).values())
        lists += [record.get("files", []) for record in (entry.get("optimized") or {}).values()]
        for relative in (r for files in lists for r in files):
            manifest.path(relative)  # refuses a path that leaves the directory
            if relative not in records:
                raise UserError(f"{manifest.root / MANIFEST}: {name} names {relative!r}, which has no size and "
                                f"sha256 record; {EXPORT_HINT}")
