"""What issue 26's UNet-file experiments share (context_kv_merge.py, attention_projections.py): an optimized UNet file
rewritten with its weights streamed, and an engine directory of links to another's files but that one rewritten."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

COMPONENT = "unet"

# rewrite(model, read) changes `model` in place (read(name): an initializer's array, its data perhaps outside the
# model) and returns (its result, {file name: model} to write beside the rewritten file)
Rewrite = Callable[[onnx.ModelProto, Callable[[str], np.ndarray]], tuple[object, dict[str, onnx.ModelProto]]]


def rewrite_file(src: Path, dest: Path, rewrite: Rewrite):
    """`dest`: the ONNX file `src` (weights inline or in its data file) rewritten; the weights are streamed from `src`,
    not loaded (only those the rewrite reads are), the companion models (whose initializers leave `dest`) are written
    beside it, every file under a temporary name renamed into place. Returns the rewrite's result."""
    from sdxl_trt.export.fp16 import load_stubbed
    from sdxl_trt.export.onnx_export import has_external_data, read_external, write_model
    from sdxl_trt.runtime.fileio import atomic_file

    model, stubs = load_stubbed(src)
    tensors = {t.name: t for t in model.graph.initializer}

    def read(name: str) -> np.ndarray:
        tensor = tensors[name]
        if name not in stubs:
            return numpy_helper.to_array(tensor)
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.frombuffer(read_external(stubs[name], src.parent), dtype).reshape(tuple(tensor.dims))

    result, companions = rewrite(model, read)
    for name, companion in companions.items():
        with atomic_file(dest.with_name(name)) as tmp:
            onnx.save(companion, str(tmp))
        moved = {t.name for t in companion.graph.initializer}
        stubs = {k: v for k, v in stubs.items() if k not in moved}
    data_path = dest.with_name(dest.name + ".data")
    if not has_external_data(model, stubs):
        with atomic_file(dest) as tmp:
            write_model(model, tmp, src.parent, stubs=stubs)
        return result
    with atomic_file(dest) as tmp, atomic_file(data_path) as tmp_data:
        write_model(model, tmp, src.parent, stubs=stubs, data_path=tmp_data, location=data_path.name)
    return result


def variant_copy(engine: Path, out: Path, rewrite: Rewrite, record_key: str | None = None):
    """`out`: an engine directory of links to `engine`'s files but the UNet's optimized file, written again by
    rewrite_file (with its companions), and a manifest that records the new files as they now are (the runtime's file
    checks pass; `record_key`: the optimized record's key naming the first companion, relative to `out`). Returns the
    rewrite's result."""
    from sdxl_trt.export.onnx_export import model_files
    from sdxl_trt.runtime.manifest import file_records, load_manifest, write_manifest

    engine, out = engine.resolve(), out.resolve()
    if out == engine or out.is_relative_to(engine):
        raise SystemExit(f"--out {out}: must lie outside --engine {engine} (the variant links to its files)")
    manifest = load_manifest(engine)
    record = manifest.components[COMPONENT]["optimized"]["cuda"]
    if record.get("context"):
        raise SystemExit(f"--engine {engine}: its UNet's cross-attention K/V projections are in a context file already "
                         f"({record['context']}); these experiments rewrite a UNet that computes them: "
                         f"`sdxl-trt optimize {engine} --no-context-once --components unet` (or a copy of it) first")
    path = manifest.path(record["path"])
    rewritten = set(model_files(path))
    for f in engine.rglob("*"):
        target = out / f.relative_to(engine)
        if f.is_file() and f not in rewritten and f.name != "manifest.json" and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f)
    dest = out / path.relative_to(engine)
    dest.parent.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def tracked(model, read):
        result, companions = rewrite(model, read)
        written.extend(companions)
        return result, companions

    result = rewrite_file(path, dest, tracked)
    companions = [dest.with_name(name) for name in written]
    records = file_records(out, model_files(dest) + companions)
    data = manifest.data
    for name in record["files"]:
        data["files"].pop(name, None)
    data["files"].update(records)
    optimized = data["components"][COMPONENT]["optimized"]["cuda"]
    optimized["files"] = list(records)
    if record_key and companions:
        optimized[record_key] = companions[0].relative_to(out).as_posix()
    write_manifest(out, data)
    return result
