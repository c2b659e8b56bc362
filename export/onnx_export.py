"""Tracing one component to ONNX: trace, fold shape arithmetic, drop dead nodes, write weights as one external file.

We use the TorchScript exporter: at these sizes it traces the full-size SDXL UNet in about two minutes on two
cores within 15 GB (torch 2.13, measured), where the torch.export-based exporter is many times slower and
specialises the UNet's size-dependent branches. Tracing happens at a small, deliberately awkward shape: a
latent of 25×17 is not a multiple of the UNet's down-sampling factor, so diffusers takes its general path that
up-samples to the skip connection's size, and the traced graph is valid for every latent size (every
multiple of 8 pixels). The fp16 variant is traced from the module cast to fp16, so it computes what torch
fp16 computes (timestep embeddings in fp32, as diffusers does), rather than being converted after the fact.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path

import onnx

from .contract import Component

OPSET = 17
IR_VERSION = 8  # the IR version of opset 17; ONNX Runtime 1.2x/1.3x and TensorRT ≥ 8.6 read it
TRACE_SHAPE = dict(batch=2, height=200, width=136, windows=2)  # see the module doc
INLINE_LIMIT = 1024  # bytes: tensors larger than this go to the external data file of a large model
# bytes of weights above which a model keeps them in `<file>.data` (protobuf caps at 2 GiB): a file read by offset
# uploads in a few large pieces (runtime/weights.py) and parses in milliseconds; inline, the 232 MB CLIP-L took 0.8 s
EXTERNAL_ABOVE = 64 << 20
PRECISION_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx"}


def export_onnx(component: Component, folder: Path, precision: str) -> Path:
    """Trace `component` (its torch module already in the precision's dtype) to `folder/<model file>`."""
    import torch

    dtype = torch.float16 if precision == "fp16" else torch.float32
    args = component.sample_inputs(**TRACE_SHAPE, dtype=dtype)
    path = folder / PRECISION_FILES[precision]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".trace-{component.name}-", dir=folder) as raw:
        raw_path = Path(raw) / "model.onnx"
        wrapper = component.wrapper()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about size-dependent Python branches, checked above
            torch.onnx.export(wrapper, args, str(raw_path), dynamo=False, opset_version=OPSET,
                              input_names=[t.name for t in component.inputs()],
                              output_names=[t.name for t in component.outputs()],
                              dynamic_axes=component.dynamic_axes(), do_constant_folding=True)
        model = onnx.load(str(raw_path), load_external_data=False)
        name_weights(model, wrapper, Path(raw))
        with contextlib.chdir(raw):  # lazily loaded external weights are found relative to the raw export
            model = clean_graph(model)
        write_model(model, path, Path(raw))
    return path


TRANSPOSED = ".T"  # suffix of an initializer that holds a parameter transposed (a Linear weight under MatMul)


def name_weights(model: onnx.ModelProto, module, raw_dir: Path) -> int:
    """Give the weights that constant folding left anonymous (`onnx::MatMul_123`: a Linear's weight, transposed for
    MatMul) the name of the parameter they hold, with TRANSPOSED appended when transposed — matched by value, so
    names are the same in every export of the same architecture (TensorRT refit and LoRA find weights by them).
    A value two parameters share stays anonymous. Returns the number renamed.

    Matching: each parameter (and each 2-D one transposed, as a view) is filed under a fingerprint of its shape and
    a sample of its values (`fingerprint`), each anonymous weight looked up by its own, and a name taken only where
    the whole values are equal: no copy or hash of every weight (a full-size UNet's 10 GB were hashed twice)."""
    import numpy as np
    from onnx import numpy_helper

    anonymous = [t for t in model.graph.initializer if t.name.startswith("onnx::") and len(t.dims) >= 2]
    if not anonymous:
        return 0
    shapes = {tuple(t.dims) for t in anonymous}
    candidates: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    for name, param in module.named_parameters():
        value = param.detach().cpu().numpy()
        for suffix, array in (("", value), (TRANSPOSED, value.T if value.ndim == 2 else None)):
            if array is not None and tuple(array.shape) in shapes:
                candidates.setdefault(fingerprint(array), []).append((name + suffix, array))
    renames = {}
    for tensor in anonymous:
        data = numpy_helper.to_array(tensor, base_dir=str(raw_dir))
        names = [name for name, array in candidates.get(fingerprint(data), []) if np.array_equal(array, data)]
        if len(names) == 1:
            renames[tensor.name] = names[0]
    taken = {t.name for t in model.graph.initializer}
    targets = [new for new in renames.values()]
    renames = {old: new for old, new in renames.items() if new not in taken and targets.count(new) == 1}
    for tensor in model.graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    return len(renames)


def fingerprint(array, samples: int = 4096) -> tuple:
    """(shape, dtype, bytes of `samples` values at evenly spaced positions of the array in C order): equal arrays
    have equal fingerprints; a transposed view is sampled in place, never copied whole."""
    import numpy as np

    count = array.size
    flat = np.linspace(0, count - 1, num=min(count, samples)).astype(np.int64) if count else np.zeros(0, np.int64)
    sample = np.ascontiguousarray(array[np.unravel_index(flat, array.shape)]) if count else np.zeros(0, array.dtype)
    return tuple(array.shape), array.dtype.str, sample.tobytes()


def clean_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold what the dynamic axes leave constant, remove dead nodes and unused initializers, sort topologically."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.fold_constants(size_threshold=INLINE_LIMIT * 64).cleanup(remove_unused_graph_inputs=False).toposort()
    cleaned = gs.export_onnx(graph, do_type_check=False)
    cleaned.producer_name, cleaned.producer_version = model.producer_name, model.producer_version
    del cleaned.opset_import[:]
    cleaned.opset_import.extend(model.opset_import)
    return cleaned


def toposort_nodes(model: onnx.ModelProto) -> None:
    """Order the graph's nodes so that each comes after the producers of its inputs (in place, weights untouched;
    ORT's fp16 converter appends its input casts at the end)."""
    nodes = list(model.graph.node)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}  # "": an omitted optional output
    done, order = set(), []

    def visit(i: int) -> None:
        stack = [(i, False)]
        while stack:
            j, expanded = stack.pop()
            if j in done:
                continue
            if expanded:
                done.add(j)
                order.append(nodes[j])
                continue
            stack.append((j, True))
            stack.extend((producer[x], False) for x in nodes[j].input if x in producer and producer[x] not in done)

    for i in range(len(nodes)):
        visit(i)
    del model.graph.node[:]
    model.graph.node.extend(order)


def initializers(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def external_info(tensor: onnx.TensorProto) -> dict | None:
    """{location, offset, length} of a tensor stored outside the model file, else None."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def read_external(info: dict, src_dir: Path) -> bytes:
    with open(src_dir / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"])) if "length" in info else f.read()


def has_external_data(model: onnx.ModelProto, stubs: dict | None = None) -> bool:
    """Whether write_model puts this model's weights in a `.data` file (large models, and weights already outside)."""
    tensors = [t for t in initializers(model) if t.name in (stubs or {}) or external_info(t) or t.raw_data]
    return bool(stubs) or any(external_info(t) for t in tensors) or \
        sum(len(t.raw_data) for t in tensors) > EXTERNAL_ABOVE


def write_model(model: onnx.ModelProto, path: Path, src_dir: Path, stubs: dict | None = None,
                transform=None, data_path: Path | None = None, location: str | None = None) -> None:
    """Save with our IR version; the weights of a large model go, tensor by tensor, into one `<name>.data` file
    (never the whole model in memory twice).

    `data_path` (default `<path>.data`) and `location` (the data file's name recorded in the model, default
    `data_path`'s) let a caller write both files under temporary names and rename them into place.
    `stubs` maps tensor names to the external location of their data in `src_dir` for tensors that carry no data
    in `model`; `transform(tensor, data)` may rewrite a stub's bytes on the way (the fp16 conversion does)."""
    stubs = stubs or {}
    model.ir_version = IR_VERSION
    tensors = [t for t in initializers(model) if t.name in stubs or external_info(t) or t.raw_data]
    external = has_external_data(model, stubs)
    data_path = data_path or path.with_name(path.name + ".data")
    location = location or data_path.name
    if external:
        offset = 0
        with open(data_path, "wb") as out:
            for tensor in tensors:
                info = stubs.get(tensor.name) or external_info(tensor)
                if info is None and len(tensor.raw_data) <= INLINE_LIMIT:
                    continue
                data = read_external(info, src_dir) if info else tensor.raw_data
                if tensor.name in stubs and transform is not None:
                    data = transform(tensor, data)
                pad = -offset % 256  # aligned, so that backends can map weights in place (and upload runs of them)
                out.write(b"\0" * pad)
                offset += pad
                out.write(data)
                _point_to(tensor, location, offset, len(data))
                offset += len(data)
            out.flush()
            os.fsync(out.fileno())
    onnx.save_model(model, str(path))


def _point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make `tensor` an external tensor stored at `location`[offset:offset+length]."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def model_files(path: Path) -> list[Path]:
    """The ONNX file and its external data file, if it has one."""
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]
