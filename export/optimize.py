"""`sdxl-trt optimize DIR --target cuda`: GPU-optimized fp16 files for the `ort-cuda` backend, beside the exported ones.

From each component's fp32 file (the reference), in memory:
  1. attention as one node (fuse_attention.py: com.microsoft MultiHeadAttention, Q/K/V projections kept apart),
  2. ONNX Runtime's transformer fusions for its model type (unet / vae / clip): LayerNorm, SkipLayerNorm,
     BiasSplitGelu, GroupNorm and SkipGroupNorm (channels-last), NhwcConv, BiasAdd; its own attention fusion and
     Q/K/V packing are off (they do not match this export, and packing would stop LoRA from changing one of them),
  3. ONNX Runtime's float16 conversion with the blocks of fp16.py (timestep embeddings in fp32),
     type information from its symbolic shape inference (which knows the fused operators),
  4. CLIP-G's end-of-text ArgMax on fp32 token ids (the CUDA provider has no integer ArgMax; a node left on the CPU
     would keep the encoder from running as a CUDA graph),
  5. the UNets' cross-attention K/V projections of the text context moved into a context file run once per image
     (context_projections.py; unless --no-context-once).
This is ONNX Runtime's own recipe for Stable Diffusion (`onnxruntime.transformers.models.stable_diffusion`) plus the
attention pass it is missing for this export. The fused operators run on the CUDA provider (GroupNorm, NhwcConv
and BiasSplitGelu have no CPU kernels), so the result is checked on the GPU (tests/test_ort_cuda.py).

The SDXL 1.0 VAE overflows fp16; its optimized file is fp16 anyway and flagged `overflow_check` in the manifest:
`ort-cuda` checks every decoded image for NaN / Inf and decodes again with the fp32 file (with a warning) if
it finds any, so a black image is never written.

Each file is written atomically and recorded in the manifest under the component's `optimized` → `cuda` with the
sha256 of the fp32 file it came from and the recipe that made it (runtime/backends.py's OPTIMIZE_RECIPE); running the
command again skips what is up to date and makes again what an older recipe made (only the components a later recipe
changed: runtime/backends.py's RECIPES) or a newer sdxl-trt's recipe.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from tqdm.auto import tqdm

from ..kernels.ort_ops import OPS_DIR
from ..runtime import engines as eng
from ..runtime.backends import OPTIMIZE_RECIPE, recipe_state
from ..runtime.errors import UserError
from ..runtime.fileio import atomic_file, check_writable
from ..runtime.manifest import file_problem, file_records, load_manifest
from .context_projections import CONTEXT_CONTRACTS, context_path, split_context_projections
from .fuse_attention import drop_dead_nodes, import_ms_domain
from .onnx_export import has_external_data, model_files, write_model

TARGETS = ("cuda",)
MODEL_TYPES = {"unet": "unet", "unet_refiner": "unet", "unet_control": "unet", "controlnet": "unet",
               "vae_decoder": "vae", "vae_encoder": "vae",
               "clip_l": "clip", "clip_g": "clip"}  # by contract
FILE_NAMES = {"cuda": "model.cuda.fp16.onnx"}
FUSED_OPS = ("MultiHeadAttention", "LayerNormalization", "SkipLayerNormalization", "BiasSplitGelu", "GroupNorm",
             "SkipGroupNorm", "NhwcConv", "BiasAdd")


@dataclass
class OptimizeReport:
    root: Path
    rows: list = field(default_factory=list)  # (component, fused counts, bytes, seconds or None if up to date)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"{'component':<16}{'attention':>10}{'groupnorm':>10}{'layernorm':>10}{'nhwcconv':>9}{'size':>12}"
                 f"{'time':>9}"]
        for name, fused, size, seconds in self.rows:
            norms = fused.get("GroupNorm", 0) + fused.get("SkipGroupNorm", 0)
            layer = fused.get("LayerNormalization", 0) + fused.get("SkipLayerNormalization", 0)
            took = "cached" if seconds is None else f"{seconds:.1f}s"
            lines.append(f"{name:<16}{fused.get('MultiHeadAttention', 0):>10}{norms:>10}{layer:>10}"
                         f"{fused.get('NhwcConv', 0):>9}{size / 1e6:>9.1f} MB{took:>9}")
        lines.append(f"optimized {self.root} for cuda in {self.seconds:.0f} s")
        return "\n".join(lines)


def optimize_engine_dir(engine_dir: str | Path, target: str = "cuda", components: list[str] | None = None,
                        progress: bool = True, jobs: int = 1, custom_ops: bool = False,
                        context_once: bool = True) -> OptimizeReport:
    """Optimize the components of `engine_dir` (all, or `components`) for `target`; up-to-date ones are skipped.

    `custom_ops`: the UNets' GEGLU runs on our BiasSplitGelu kernel (kernels/ort_ops.py) instead of ONNX Runtime's;
    the library is built into `engine_dir/ops/` (nvcc and ONNX Runtime's C API header needed) and named in each
    such file's record, so the runtime registers it. Without it, files made with it are made again without.

    `context_once`: the UNets' cross-attention K/V projections go into a context file run once per image
    (context_projections.py); False keeps them in the step (files made with them split are made again whole).

    `jobs` > 1 optimizes that many components at once in worker processes (the passes are single-threaded
    Python; a full-size UNet's peak memory is a few GB, so base + refiner + the rest fit a GPU server's RAM).
    The manifest is updated by this process as each one finishes, under the engine directory's lock."""
    started = time.perf_counter()
    root = Path(engine_dir)
    if target not in TARGETS:
        raise UserError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: expected 1 or more")
    manifest = load_manifest(root)
    names = list(manifest.components) if components is None else list(dict.fromkeys(components))  # each once
    for name in names:
        if name not in manifest.components:
            raise UserError(f"--components: {root} has no {name!r} (it has {', '.join(manifest.components)})")
        if "fp32" not in manifest.components[name]["precisions"]:
            raise UserError(f"{root}: {name} has no fp32 file to optimize from; re-export it")
    if custom_ops and not any(_takes_custom_ops(manifest.components[n]) for n in names):
        takers = [n for n, e in manifest.components.items() if _takes_custom_ops(e)]
        raise UserError(f"--custom-ops: {', '.join(names)} take{'s' if len(names) == 1 else ''} none of sdxl-trt's custom "
                        f"operators (the UNets' GEGLU does: {', '.join(takers) if takers else 'this directory has no UNet'})")
    report = OptimizeReport(root)
    with eng.locked(root):
        library = _build_custom_ops(root, manifest, progress) if custom_ops else None
        bar = None
        try:  # from here, interrupted or failed too: no library stays recorded that no file names
            todo = []
            for name in names:
                entry = manifest.components[name]
                source = eng.onnx_sha256(manifest, name, "fp32")
                done = entry.get("optimized", {}).get(target)
                ops = library if _takes_custom_ops(entry) else None
                split = context_once and entry["contract"] in CONTEXT_CONTRACTS
                if (done and done["from"] == source and recipe_state(entry, target) is None
                        and (done.get("custom_ops") is None) == (ops is None)
                        and ("ContextProjections" in done["fused"]) == split
                        and not any(file_problem(manifest.path(f), manifest.data["files"][f], True, "")
                                    for f in done["files"])):  # a file missing or changed is made again
                    if done.get("custom_ops") != ops:
                        # the same file, for the library this installation builds (the graph names only the
                        # operators, which OPTIMIZE_RECIPE versions; a library of other sources needs no new file)
                        _repoint(root, target, name, ops)
                    report.rows.append((name, done["fused"],
                                        sum(manifest.data["files"][f]["size"] for f in done["files"]), None))
                    continue
                manifest.check_files(only=entry["files"]["fp32"])
                src = manifest.path(entry["precisions"]["fp32"])
                todo.append((name, source, ops, src, src.with_name(FILE_NAMES[target]), MODEL_TYPES[entry["contract"]],
                             _fp32_io(entry), ops is not None, split))
            if todo:  # fp16 files: about half their fp32 sources (the old versions are replaced one by one)
                need = sum(manifest.data["files"][f]["size"] for job in todo
                           for f in manifest.components[job[0]]["files"]["fp32"]) // 2
                check_writable(todo[0][4], f"optimize {root}", need)
            bar = tqdm(total=len(todo), desc=f"optimize for {target}", unit="model", disable=not progress)
            for name, source, ops, dest, fused, seconds in _run_jobs(todo, jobs):
                _record(root, target, name, source, dest, fused, ops)
                report.rows.append((name, fused, sum(f.stat().st_size for f in _written(dest)), seconds))
                bar.update()
        finally:
            if bar is not None:
                bar.close()
            _drop_unused_libraries(root)
    report.seconds = time.perf_counter() - started
    return report


def _run_jobs(todo: list[tuple], jobs: int):
    """Yields (name, source sha, custom-op library, dest, fused counts, seconds) per job, in order of completion."""
    if jobs == 1 or len(todo) < 2:
        for name, source, ops, *job in todo:
            yield name, source, ops, job[1], *_timed_optimize_file(*job)
        return
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(min(jobs, len(todo)), initializer=_worker_signals)
    try:
        for i, fused, seconds in pool.imap_unordered(_job, list(enumerate(job[3:] for job in todo))):
            name, source, ops, _, dest, *_ = todo[i]
            yield name, source, ops, dest, fused, seconds
    except BaseException:  # Ctrl-C, SIGTERM or an error: the workers stop now (SIGTERM), removing what they were writing
        pool.terminate()
        pool.join()
        raise
    # all done: the workers end on their own (a SIGTERM now would reach one in its interpreter's shutdown, where the
    # handler's SystemExit is printed as "Exception ignored in threading._shutdown")
    pool.close()
    pool.join()


def _worker_signals() -> None:
    """In a worker: SIGTERM (the pool's terminate) and Ctrl-C unwind, so its temporary files are removed, and end it
    quietly (multiprocessing prints a traceback for any other exception; the parent says "interrupted"). Once: a
    Ctrl-C reaches the workers, then the pool's SIGTERM follows, and that second signal must not cut short the
    cleanup the first one started (Python would print it as an exception ignored in a finalizer)."""
    import signal

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SystemExit(130)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def _job(numbered: tuple) -> tuple:
    i, job = numbered
    return i, *_timed_optimize_file(*job)


def _timed_optimize_file(src: Path, dest: Path, model_type: str, keep: list[str], custom_ops: bool,
                         context_once: bool) -> tuple[dict, float]:
    t = time.perf_counter()
    fused = optimize_file(src, dest, model_type, keep_io_types=keep, custom_ops=custom_ops, context_once=context_once)
    return fused, time.perf_counter() - t


def _written(dest: Path) -> list[Path]:
    """The files optimize_file wrote for `dest`: the model and its data, and a UNet's context file and its data."""
    context = context_path(dest)
    return model_files(dest) + (model_files(context) if context.is_file() else [])


# the model types whose files take our custom operators (kernels/ort_ops.py: BiasSplitGelu, the UNets' GEGLU)
CUSTOM_OPS_MODEL_TYPES = ("unet",)


def _takes_custom_ops(entry: dict) -> bool:
    return MODEL_TYPES[entry["contract"]] in CUSTOM_OPS_MODEL_TYPES


def _build_custom_ops(root: Path, manifest, progress: bool) -> str:
    """Build (or find) the custom-op library in root/ops/ (optimize_engine_dir has checked that a component to
    optimize takes it); its path relative to `root`, recorded in the manifest's files. Refused at once on a GPU too
    old for its kernels (optimize runs where the engine directory will be used; without a GPU here the runtime checks
    the one it runs on)."""
    from ..kernels import ort_ops
    from ..runtime.tensorrt_api import gpu

    device = gpu()
    problem = device and ort_ops.gpu_problem(device.compute_capability)
    if problem:
        raise UserError(f"--custom-ops: {problem} ({device.name}); optimize without it")
    relative = ort_ops.library_path(cuda=True)
    record = manifest.data["files"].get(relative)
    if manifest.path(relative).is_file() and (record is None or file_problem(manifest.path(relative), record, True, "")):
        manifest.path(relative).unlink()  # not the file this directory recorded: never adopt it, build it again
    library = ort_ops.build(root / ort_ops.OPS_DIR, cuda=True, quiet=not progress)
    records = file_records(root, [library])
    eng.update_manifest(root, lambda data: data["files"].update(records))
    return relative


def _record(root: Path, target: str, name: str, source: str, dest: Path, fused: dict, custom_ops: str | None) -> None:
    """The optimized files of `name` into the manifest: sizes and hashes, the fp32 file they came from, the
    custom-op library they need (if any; libraries no record names any more are removed)."""
    manifest = load_manifest(root)
    entry = manifest.components[name]
    files = _written(dest)
    records = file_records(root, files)
    overflow = entry["contract"].startswith("vae") and "fp16" not in entry["precisions"]
    record = {"precision": "fp16", "path": files[0].relative_to(root).as_posix(), "files": list(records),
              "from": source, "recipe": OPTIMIZE_RECIPE, "fused": fused, "overflow_check": overflow}
    if custom_ops:
        record["custom_ops"] = custom_ops
    if context_path(dest).is_file():
        record["context"] = context_path(dest).relative_to(root).as_posix()

    def change(data: dict) -> None:
        before = data["components"][name].get("optimized", {}).get(target, {}).get("files", [])
        for gone in set(before) - set(records):  # a context file made before, now removed
            data["files"].pop(gone, None)
        data["files"].update(records)
        data["components"][name].setdefault("optimized", {})[target] = record

    eng.update_manifest(root, change)


def _repoint(root: Path, target: str, name: str, library: str) -> None:
    """An up-to-date optimized file's record names `library` (this installation's build) instead of an older one."""
    def change(data: dict) -> None:
        data["components"][name]["optimized"][target]["custom_ops"] = library

    eng.update_manifest(root, change)


def _drop_unused_libraries(root: Path) -> None:
    """Custom-op libraries in root/ops/ that no optimized file names any more (an older build, or files made again
    without --custom-ops): out of the manifest, then off the disk."""
    unused = []

    def change(data: dict) -> None:
        named = {r.get("custom_ops") for e in data["components"].values() for r in (e.get("optimized") or {}).values()}
        unused[:] = [f for f in data["files"] if f.startswith(f"{OPS_DIR}/") and f not in named]
        for f in unused:
            del data["files"][f]

    eng.update_manifest(root, change)
    for f in unused:
        (root / f).unlink(missing_ok=True)


def _fp32_io(entry: dict) -> list[str]:
    return [t["name"] for t in entry["inputs"] + entry["outputs"] if t["dtype"] == "float32"]


def optimize_file(src: Path, dest: Path, model_type: str, keep_io_types: list[str], custom_ops: bool = False,
                  context_once: bool = False) -> dict[str, int]:
    """Fused fp16 `dest` from the fp32 ONNX file `src`; returns the count of each fused operator. `custom_ops`:
    BiasSplitGelu in our domain (kernels/ort_ops.py), fused at any even width our kernel takes. `context_once`: the
    cross-attention K/V projections into `dest`'s context file (context_projections.py; counted as
    "ContextProjections", the K and V MatMuls moved), written with `dest`; without it, or when there are none, no
    context file is left beside `dest`.

    Large weights never enter memory: the graph is rewritten around data-less stubs of them (fp16.load_stubbed;
    norms and biases, which the fusions read, are loaded), and they are streamed from `src`'s data file into `dest`'s,
    converted to fp16 (and, for NHWC convolutions, transposed) on the way. A full-size UNet takes seconds and
    little memory instead of holding 10 GB of fp32 weights."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from .fp16 import fp16_options, load_stubbed, stub_to_fp16, stub_value_info, tidy_converted
    from .fuse_attention import fuse_attention

    model, stubs = load_stubbed(src, load_below=LOAD_BELOW)
    fold_pads_into_convs(model)
    attention = fuse_attention(model)
    options = FusionOptions(model_type)
    options.enable_attention = False  # done above; ORT's unet/vae patterns do not match an SDPA export
    options.enable_packed_qkv = options.enable_packed_kv = False
    with (_quiet_onnxruntime_logs(), stub_value_info(), _nhwc_weights_as_transposes(stubs),
          _cuda_kernel_shapes_only(any_bias_split_gelu=custom_ops)):
        optimized = optimize_model(model, model_type=model_type, opt_level=0, optimization_options=options,
                                   use_gpu=True)
        fused = {op: len(optimized.get_nodes_by_op_type(op)) for op in FUSED_OPS}
        fused["MultiHeadAttention"] = attention
        optimized.convert_float_to_float16(use_symbolic_shape_infer=True,
                                           **fp16_options(optimized.model, keep_io_types))
    model = optimized.model
    import_ms_domain(model)  # ONNX Runtime's CLIP fusions add com.microsoft nodes without importing the domain
    if custom_ops:
        use_custom_ops(model)
    transposed = _fold_weight_transposes(model, stubs)
    drop_dead_nodes(model.graph)  # the folded Transposes, and initializers the fusions replaced
    tidy_converted(model)
    _argmax_on_floats(model)
    del model.graph.value_info[:]  # types only, and some from before the conversion: ORT infers them again

    def transform(tensor, data: bytes) -> bytes:
        if tensor.name in transposed:  # an NHWC convolution's weight: [out, in, kh, kw] → [out, kh, kw, in]
            data = np.frombuffer(data, np.float32).reshape(transposed[tensor.name]).transpose(0, 2, 3, 1).tobytes()
        return stub_to_fp16(tensor, data)

    context = split_context_projections(model) if context_once else None
    if context_once:  # counted when asked for, 0 for a UNet with none to move (so a run again finds it up to date)
        fused["ContextProjections"] = len(context.graph.output) if context is not None else 0
    parts = [(model, dest)] + ([(context, context_path(dest))] if context is not None else [])
    stale = [] if context is not None else model_files(context_path(dest))  # a previous version's context file
    # every file under a temporary name, renamed into place once all are complete — the weights before the model
    # files that name them, the UNet's model file last: an interrupted run leaves the previous version whole
    with contextlib.ExitStack() as stack:
        for part, path in parts:
            data_path = path.with_name(path.name + ".data")
            if not has_external_data(part, stubs):
                write_model(part, stack.enter_context(atomic_file(path)), src.parent, stubs=stubs, transform=transform)
                stale.append(data_path)
                continue
            tmp_path, tmp_data = stack.enter_context(atomic_file(path)), stack.enter_context(atomic_file(data_path))
            write_model(part, tmp_path, src.parent, stubs=stubs, transform=transform, data_path=tmp_data,
                        location=data_path.name)
    for path in stale:
        path.unlink(missing_ok=True)
    return fused


def fold_pads_into_convs(model: onnx.ModelProto) -> int:
    """A zero Pad of the spatial sides whose only reader is a convolution becomes that convolution's own padding
    (ONNX Conv pads may differ at the two ends; cuDNN's graph API takes them as pre and post padding). The SDXL VAE
    encoder pads each downsampler's input by one row and column before a stride-2 convolution (diffusers'
    Downsample2D with padding=0); ONNX Runtime's Pad kernel took 29 ms of a 54 ms 1024² encode on the H100
    (benchmarks/results/h100-vae-encoder-variants-68bf3ed.json); folded, a 1024² encode on the H200 takes 17.6 ms
    instead of 39.8 (22.8 instead of 45.0 without the VAE provider options; h200-vae-encoder-pad-fold.json, same
    process). Exact: the same zeros enter the same sums. Returns how many were folded."""
    from .fuse_attention import Graph

    graph = Graph(model.graph)
    outputs = {o.name for o in model.graph.output}
    folded = []
    for node in model.graph.node:
        if node.op_type != "Pad" or node.output[0] in outputs or len(node.input) < 2:
            continue
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
        pads = graph.constant(node.input[1])
        value = graph.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
        readers = graph.consumers.get(node.output[0], [])
        if (mode != "constant" or len(node.input) > 3 or pads is None or value is None or pads.shape != (8,)
                or np.any(value != 0) or np.any(pads < 0) or np.any(pads[[0, 1, 4, 5]] != 0) or len(readers) != 1):
            continue
        conv = readers[0]
        attrs = {a.name: a for a in conv.attribute}
        auto_pad = attrs["auto_pad"].s if "auto_pad" in attrs else b"NOTSET"
        if conv.op_type != "Conv" or conv.input[0] != node.output[0] or auto_pad not in (b"NOTSET", b""):
            continue
        before = list(attrs["pads"].ints) if "pads" in attrs else [0, 0, 0, 0]
        after = [before[0] + int(pads[2]), before[1] + int(pads[3]), before[2] + int(pads[6]), before[3] + int(pads[7])]
        if "pads" in attrs:
            conv.attribute.remove(attrs["pads"])
        conv.attribute.append(onnx.helper.make_attribute("pads", after))
        conv.input[0] = node.input[0]
        folded.append(node)
    for node in folded:
        model.graph.node.remove(node)
    if folded:
        drop_dead_nodes(model.graph)  # the pads' constants
    return len(folded)


def _argmax_on_floats(model: onnx.ModelProto) -> None:
    """CLIP's pooled output picks the end-of-text token with an ArgMax over the int32 token ids, which the CUDA
    provider has no kernel for (float types only): that node would run on the CPU, with copies, and keep the encoder
    from being captured as a CUDA graph. Cast its input to fp32 first (token ids < 2^24 are exact; ties still go
    to the first index)."""
    ints = {onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
            onnx.TensorProto.INT16}
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    types.update({n.output[0]: a.i for n in model.graph.node if n.op_type == "Cast" for a in n.attribute
                  if a.name == "to"})
    nodes = []
    for node in model.graph.node:
        if node.op_type == "ArgMax" and types.get(node.input[0]) in ints:
            cast = f"{node.input[0]}_as_float_for_{node.name or 'ArgMax'}"
            nodes.append(onnx.helper.make_node("Cast", [node.input[0]], [cast], to=onnx.TensorProto.FLOAT,
                                               name=f"{node.name}_cast_input"))
            node.input[0] = cast
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


LOAD_BELOW = 1 << 20  # bytes: weights smaller than this are read for the fusions (norm scales, biases)


@contextlib.contextmanager
def _nhwc_weights_as_transposes(stubs: dict):
    """ONNX Runtime's NhwcConv fusion transposes each weight in memory; have it insert a Transpose node instead
    (folded by _fold_weight_transposes), and let its 4-D check see a stub's shape (a private hook: ort_internals)."""
    from onnx import numpy_helper

    from .ort_internals import nhwc_weights_as_transposes

    def to_array(tensor):
        if tensor.name in stubs:
            return np.broadcast_to(np.float32(0), tuple(tensor.dims))  # shape only, no memory
        return numpy_helper.to_array(tensor)

    with nhwc_weights_as_transposes(to_array):
        yield


BIAS_SPLIT_GELU_SIZES = (2560, 5120, 6144, 10240, 12288)  # the hidden sizes ONNX Runtime's CUDA kernel takes


def _cuda_kernel_shapes_only(any_bias_split_gelu: bool = False):
    """Fuse GroupNorm and BiasSplitGelu only where ONNX Runtime's CUDA kernels take the shape (they fail at run time
    otherwise): GroupNorm with an even number of channels per group, BiasSplitGelu at the hidden sizes its kernel
    is built for (any width with `any_bias_split_gelu`: our kernel's). SDXL's layers all qualify; a model with, say,
    32 channels in 32 groups keeps the plain form there, which runs anywhere. (FusionOptions can only turn a fusion
    off for the whole model: a private hook, ort_internals.fused_only_where.)"""
    from .ort_internals import fused_only_where

    return fused_only_where({"GroupNorm": _cuda_group_norm_supports,
                             "BiasSplitGelu": _any_bias_split_gelu if any_bias_split_gelu
                             else _cuda_bias_split_gelu_supports})


def _any_bias_split_gelu(model, node) -> bool:
    bias = model.get_initializer(node.input[1])
    return bias is not None and len(bias.dims) == 1 and bias.dims[0] % 2 == 0


def use_custom_ops(model: onnx.ModelProto) -> int:
    """ONNX Runtime's com.microsoft BiasSplitGelu nodes become ours (the same inputs, output and meaning; 70 per SDXL
    UNet); returns how many."""
    from ..kernels.ort_ops import DOMAIN

    count = 0
    for node in model.graph.node:
        if node.op_type == "BiasSplitGelu" and node.domain == "com.microsoft":
            node.domain = DOMAIN
            count += 1
    if count and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return count


def _cuda_bias_split_gelu_supports(model, node) -> bool:
    bias = model.get_initializer(node.input[1])
    return bias is not None and len(bias.dims) == 1 and bias.dims[0] // 2 in BIAS_SPLIT_GELU_SIZES


def _cuda_group_norm_supports(model, node) -> bool:
    groups = next((a.i for a in node.attribute if a.name == "groups"), 0)
    gamma = model.get_initializer(node.input[1])
    channels = gamma.dims[0] if gamma is not None and len(gamma.dims) == 1 else 0
    return groups > 0 and channels % groups == 0 and (channels // groups) % 2 == 0


def _fold_weight_transposes(model, stubs: dict) -> dict[str, tuple]:
    """Replace Transpose(weight, perm 0,2,3,1) by a transposed weight: in memory for loaded weights; for stubs, a new
    stub over the same data, to be transposed when written. Returns {new stub: source dims}."""
    from onnx import numpy_helper

    weights = {t.name: t for t in model.graph.initializer}
    transposed, folded = {}, {}
    for node in model.graph.node:
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        if node.op_type != "Transpose" or perm != [[0, 2, 3, 1]] or node.input[0] not in weights:
            continue
        source = weights[node.input[0]]
        name = f"{source.name}_nhwc"
        if source.name in stubs:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(source)
            tensor.name = name
            del tensor.dims[:]
            tensor.dims.extend([source.dims[i] for i in (0, 2, 3, 1)])
            stubs[name] = stubs[source.name]
            transposed[name] = tuple(source.dims)
        else:
            tensor = numpy_helper.from_array(numpy_helper.to_array(source).transpose(0, 2, 3, 1), name)
        model.graph.initializer.append(tensor)
        folded[node.output[0]] = name
    for node in model.graph.node:  # the Transposes themselves are left for drop_dead_nodes
        for i, name in enumerate(node.input):
            if name in folded:
                node.input[i] = folded[name]
    return transposed


@contextlib.contextmanager
def _quiet_onnxruntime_logs():
    """ONNX Runtime's fusion scripts log every pattern they try at INFO / WARNING; keep errors only."""
    logger = logging.getLogger("onnxruntime.transformers")
    names = [n for n in logging.root.manager.loggerDict if n.startswith(("onnx_model", "fusion", "float16",
                                                                         "shape_infer", "symbolic"))]
    loggers = [logger] + [logging.getLogger(n) for n in names]
    levels = [x.level for x in loggers]
    for x in loggers:
        x.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for x, level in zip(loggers, levels):
            x.setLevel(level)
