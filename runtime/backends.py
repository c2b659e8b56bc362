"""What the inference backends share (loading.load_backend picks one by name). Each runs an engine directory's
components by their contract names.

`ort-cpu`: ONNX Runtime's CPU execution provider on the fp32 files, numpy in and out; the reference path that every
faster backend is held to. `ort-cuda`: ONNX Runtime's CUDA execution provider on the fp16 files, through
device buffers (ort_cuda.py). `tensorrt` and `tensorrt-rtx`: engines built by `sdxl-trt build` (trt_backend.py).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np

from .errors import UserError
from .manifest import Manifest

BACKENDS = ("ort-cpu", "ort-cuda", "tensorrt", "tensorrt-rtx")
CUDA_GRAPH_MODES = ("step", "loop", "off")  # the device loop's --cuda-graphs (device_loop.py says what each does)
DTYPES = {"float": {"fp32": np.float32, "fp16": np.float16}, "float32": np.float32, "int32": np.int32}


def check_cuda_graphs(mode: str) -> None:
    """A backend with a device loop (ort-cuda, tensorrt, tensorrt-rtx) refuses a --cuda-graphs mode it has not."""
    if mode not in CUDA_GRAPH_MODES:
        raise UserError(f"--cuda-graphs {mode!r}: expected one of {', '.join(CUDA_GRAPH_MODES)}")


def check_onnxruntime_install() -> None:
    """The CPU and GPU builds of ONNX Runtime install the same module; with both present neither works reliably."""
    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            installed.append(dist)
        except metadata.PackageNotFoundError:
            pass
    if len(installed) == 2:
        raise UserError("both onnxruntime and onnxruntime-gpu are installed and overwrite each other: "
                        "pip uninstall -y onnxruntime onnxruntime-gpu, then install sdxl-trt[cpu] or sdxl-trt[gpu]")
    if not installed:
        raise UserError("ONNX Runtime is not installed: install sdxl-trt[cpu] (or sdxl-trt[gpu] on a GPU machine)")


# ONNX Runtime's graph optimizations for sessions on shared weights or LoRA overrides (see OrtSession; the
# optimized files are fused already: benchmarks/cold_start.py times the levels' session creation and steps)
SHARED_OPTIMIZATION = "ORT_ENABLE_EXTENDED"


class OrtSession:
    """One exported component on ONNX Runtime; `run` takes and returns numpy arrays by contract name."""

    def __init__(self, manifest: Manifest, component: str, precision: str, providers: list, path: str | None = None,
                 dims: dict[str, int] | None = None, adapters=None, shared=None):
        """`path`: a file other than the component's `precision` file (an optimized one), in that precision.
        `dims`: values for the contract's symbolic dimensions (B, S, h, w): a session for that one shape, in which
        ONNX Runtime folds the shape arithmetic away. `adapters` (lora.Adapters): LoRA weights merged into the
        file's initializers, given to ONNX Runtime as host-memory overrides (the file is not changed). `shared`
        (weights.SharedWeights or WeightSet): the file's weights in a buffer every session of the file uses in
        place (with any LoRA merges already in it)."""
        import onnxruntime as ort

        entry = manifest.components.get(component)
        if entry is None:
            raise UserError(f"{manifest.root}: this engine directory has no {component!r} "
                            f"(it has {', '.join(manifest.components)}); export it with `sdxl-trt export`")
        if path is None and precision not in entry["precisions"]:
            raise UserError(f"{manifest.root}: {component} has no {precision} file "
                            f"(it has {', '.join(entry['precisions'])})")
        self.name, self.precision, self.entry = component, precision, entry
        self.inputs = {t["name"]: t for t in entry["inputs"]}
        self.output_names = [t["name"] for t in entry["outputs"]]
        options = ort.SessionOptions()
        options.log_severity_level = log_severity()
        for name, value in (dims or {}).items():
            options.add_free_dimension_override_by_name(name, int(value))
        self.dims = dict(dims or {})
        self.path = manifest.path(path or entry["precisions"][precision])
        # the values (and the memory they view) must outlive the session: ONNX Runtime uses that memory in place
        self._shared = shared
        self._shared_ready = shared is None
        self._overrides = dict(shared.values) if shared is not None else {}
        overrides = adapters.overrides(component, self.path) if adapters else {}
        for name, array in overrides.items():
            self._overrides[name] = ort.OrtValue.ortvalue_from_numpy(array)  # wraps the array's memory
        for name, value in self._overrides.items():
            options.add_initializer(name, value)
        if shared is not None and providers == ["CPUExecutionProvider"]:
            # the CPU provider packs MatMul weights into a copy of its own per session (seen on 1.32: a weight changed
            # in the shared buffer had no effect): shared weights would save nothing and go unread
            options.add_session_config_entry("session.disable_prepacking", "1")
        # ONNX Runtime's layout-level passes (ORT_ENABLE_ALL) rewrite weights from the file's values, not the overrides:
        # the CPU provider's NCHWc pass (a convolution LoRA had no effect on fp32 files, 1.32) and, on fp16 files,
        # whatever takes the weights at that level (a text-encoder LoRA had no effect on the optimized files on the
        # CPU). fp32 files on the CPU keep every pass but NCHWc; other sessions with overrides or shared weights stop
        # one level lower, the CUDA provider's too (its ENABLE_ALL adds no pass of its own; weights.py says which
        # initializers are safe to share at all)
        library = custom_ops_library(manifest, self.path)
        if library is not None:
            check_custom_ops_gpu(library, providers, manifest)
            try:
                options.register_custom_ops_library(str(library))
            except Exception as e:  # noqa: BLE001 — ONNX Runtime's error types; the first line says why
                raise UserError(f"{library}: ONNX Runtime could not load this custom-op library "
                                f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
                                f"build it again: `sdxl-trt optimize {manifest.root} --custom-ops`") from None
        disabled = None
        if overrides and shared is None and providers == ["CPUExecutionProvider"] and precision == "fp32":
            disabled = ["NchwcTransformer"] if any(a.ndim == 4 for a in overrides.values()) else None
        elif self._overrides:
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, SHARED_OPTIMIZATION)
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=providers,
                                                 disabled_optimizers=disabled)
        except Exception as e:  # noqa: BLE001 — ONNX Runtime's own error types; their first line says what failed
            raise onnxruntime_error(e, f"{component} ({self.path})") from e

    def dtype(self, input_name: str):
        return self.spec_dtype(self.inputs[input_name])

    def spec_dtype(self, spec: dict):
        """The numpy dtype of a contract tensor in this file's precision."""
        kind = DTYPES[spec["dtype"]]
        return kind[self.precision] if isinstance(kind, dict) else kind

    def weights_ready(self) -> None:
        """Wait, before a run, for the shared weights this session was made on to be in their buffer (prepare makes
        sessions while the weights still go up; weights.SharedWeights)."""
        if self._shared is not None:
            self._shared.wait()
            self._shared_ready = True

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        arrays = {name: np.ascontiguousarray(value, dtype=self.dtype(name)) for name, value in feeds.items()}
        if not self._shared_ready:
            self.weights_ready()
        return dict(zip(self.output_names, self._session.run(self.output_names, arrays)))


def custom_ops_library(manifest: Manifest, path: Path) -> Path | None:
    """The custom-op library (`sdxl-trt optimize --custom-ops`, kernels/ort_ops.py) the optimized file at `path`
    needs, checked before ONNX Runtime loads it: built from this installation's sources (its name is their hash: a
    library an engine directory brings from elsewhere is never loaded) and the file its manifest record describes.
    None for a file that needs none."""
    from importlib import metadata

    from ..kernels.ort_ops import OPS_API_VERSION, library_path
    from .manifest import file_problem

    for entry in manifest.components.values():
        for record in (entry.get("optimized") or {}).values():
            if record.get("custom_ops") and manifest.path(record["path"]) == path:
                relative = record["custom_ops"]
                again = f"build it again: `sdxl-trt optimize {manifest.root} --custom-ops`"
                if relative != library_path(cuda=True):
                    raise UserError(f"{manifest.path(relative)}: not the custom-op library this sdxl-trt builds "
                                    f"({library_path(cuda=True)}; another version made it, or it came from "
                                    f"elsewhere, and sdxl-trt loads no native code it did not build); {again}")
                library = manifest.path(relative)
                problem = file_problem(library, manifest.data["files"][relative], True,
                                       "changed since `sdxl-trt optimize` built it")
                if problem:
                    raise UserError(f"{problem}; {again}")
                version = _onnxruntime_version(metadata)
                if version is not None and version < (1, OPS_API_VERSION):
                    raise UserError(f"{library} needs ONNX Runtime 1.{OPS_API_VERSION} or newer (this is "
                                    f"{'.'.join(map(str, version))})")
                return library
    return None


def check_custom_ops_gpu(library: Path, providers: list, manifest: Manifest) -> None:
    """A session on the CUDA provider loads the custom-op library only on a GPU its kernels were built for (an older
    one would fail at the first run, deep in ONNX Runtime, with "no kernel image is available")."""
    from ..kernels.ort_ops import gpu_problem

    for provider in providers:
        name, options = provider if isinstance(provider, tuple) else (provider, {})
        if name == "CUDAExecutionProvider":
            from .cuda import compute_capability

            device = int(options.get("device_id", 0))
            problem = gpu_problem(compute_capability(device))
            if problem:
                raise UserError(f"{library.name}: {problem} (GPU {device}); make the UNet's files without them: "
                                f"`sdxl-trt optimize {manifest.root}`")


def _onnxruntime_version(metadata) -> tuple[int, int] | None:
    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            major, minor = metadata.version(dist).split(".")[:2]
            return int(major), int(minor)
        except (metadata.PackageNotFoundError, ValueError):
            continue
    return None


VERBOSE = False  # --verbose: ONNX Runtime's warnings are printed too (set by the CLI)


def log_severity() -> int:
    """ONNX Runtime's log level for our sessions and its process-wide logger: errors only, unless --verbose (then
    warnings). Its warnings are mostly noise for a user ("No registered plugin EP device found" three times per
    process on 1.31), but they also said when LoRA overrides were ignored: --verbose shows them."""
    return 2 if VERBOSE else 3


def quiet_onnxruntime() -> None:
    import onnxruntime as ort

    ort.set_default_logger_severity(log_severity())


def onnxruntime_error(error: Exception, what: str) -> Exception:
    """ONNX Runtime's failure to make a session as one line (UserError) when it is about the input (a file it
    cannot read, a model it cannot run: its error types Fail, InvalidGraph, InvalidProtobuf, NoSuchFile,
    NotImplemented, InvalidArgument); the error itself otherwise (a bug keeps its traceback)."""
    kind = type(error).__name__
    if kind in ("Fail", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NotImplemented", "InvalidArgument"):
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), kind)
        if any(marker in first for marker in ("out of memory", "Failed to allocate memory")):
            return error  # the pipeline says what to reduce
        return UserError(f"ONNX Runtime could not load {what}: {first[:300]}")
    return error


class OrtCpuBackend:
    name = "ort-cpu"
    precision = "fp32"

    def __init__(self, manifest: Manifest):
        from .lora import Adapters

        check_onnxruntime_install()
        quiet_onnxruntime()
        self.manifest = manifest
        self.adapters = Adapters()
        self._sessions: dict[str, OrtSession] = {}

    def session(self, component: str) -> OrtSession:
        if component not in self._sessions:
            self._sessions[component] = OrtSession(self.manifest, component, self.precision, ["CPUExecutionProvider"],
                                                   adapters=self.adapters)
        return self._sessions[component]

    def set_loras(self, adapters) -> None:
        """Apply these LoRA adapters (lora.Adapter) from the next call on; () for the model as exported."""
        for component in self.adapters.set(adapters, self.manifest):
            self.release(component)

    def release(self, component: str) -> None:
        self._sessions.pop(component, None)


def used_files(name: str, manifest: Manifest) -> list[str] | None:
    """The exported files backend `name` reads (None: all of them), so that opening an engine directory hashes only
    those: the fp32 files on ort-cpu; on ort-cuda each component's optimized file, else fp16, else fp32 (and a VAE
    with an overflow check also its fp32 fallback)."""
    from ..kernels.ort_ops import OPS_DIR

    if name not in ("ort-cpu", "ort-cuda"):
        return None
    files = [f for f in manifest.data["files"] if not f.startswith(("onnx/", f"{OPS_DIR}/"))]  # tokenizers, scheduler
    for component, entry in manifest.components.items():
        if name == "ort-cpu":
            files += precision_files(manifest, component, "fp32", name)
            continue
        kind = session_file(entry)[0]
        if kind != "cuda":
            files += precision_files(manifest, component, kind, name)
            continue
        optimized = entry["optimized"]["cuda"]
        files += optimized["files"]  # its custom-op library: checked by custom_ops_library when a session loads it
        if optimized.get("overflow_check"):
            files += precision_files(manifest, component, "fp32", name)
    return files


def precision_files(manifest: Manifest, component: str, precision: str, backend: str) -> list[str]:
    """A component's files of one precision, or one line saying the backend needs a precision it was not exported in."""
    files = manifest.components[component]["files"]
    if precision not in files:
        raise UserError(f"{manifest.root}: {component} has no {precision} file, which {backend} runs (it has "
                        f"{', '.join(files)}); re-export it: `{manifest.export_command()}`")
    return files[precision]


# The recipe `sdxl-trt optimize` makes its files by (export/optimize.py), kept in each file's manifest record: a file
# made by an older recipe still runs, only slower, and `optimize` makes it again. 1: the first; 2: Resize in fp16
# (export/fp16.py), 1.4 ms off a 1024² VAE decode on the H100 (benchmarks/results/h100-vae-variants-ce83b03.json);
# 3: the VAE encoder's Pads folded into its convolutions (export/optimize.py fold_pads_into_convs, tried on every
# file); 4: the UNets' cross-attention K/V projections in a context file run once per image
# (export/context_projections.py), 0.9 ms a 1024² step on the H200 (benchmarks/results/h200-unet-context-once.json).
# Each with the contracts whose files it changed (None: every contract's), so that a new recipe makes only those again.
RECIPES = ((1, None), (2, None), (3, None), (4, ("unet", "unet_refiner", "unet_control")))
OPTIMIZE_RECIPE = RECIPES[-1][0]


def current_recipe(contract: str) -> int:
    """The latest recipe that changed what `optimize` makes of a `contract` component: its records from this recipe
    on (up to OPTIMIZE_RECIPE) are up to date."""
    return max(recipe for recipe, contracts in RECIPES if contracts is None or contract in contracts)


def recipe_state(entry: dict, target: str = "cuda") -> str | None:
    """"older" when a component's optimized files for `target` were made by an older recipe than today's for its
    contract (they run, slower), "newer" when by a recipe this sdxl-trt does not know; None when they are today's (or
    there are none)."""
    record = entry.get("optimized", {}).get(target)
    if record is None:
        return None
    recipe = record.get("recipe", 1)
    return "newer" if recipe > OPTIMIZE_RECIPE else "older" if recipe < current_recipe(entry["contract"]) else None


def stale_optimized(manifest, target: str = "cuda") -> list[str]:
    """The components whose optimized files for `target` an older recipe made."""
    return [name for name, entry in manifest.components.items() if recipe_state(entry, target) == "older"]


def check_optimized_readable(manifest, target: str = "cuda") -> None:
    """A one-line error for optimized files of a newer recipe than this sdxl-trt knows (a newer `sdxl-trt optimize`
    made them: their inputs or operators may be ones this runtime does not feed or have)."""
    newer = {name: entry["optimized"][target]["recipe"] for name, entry in manifest.components.items()
             if recipe_state(entry, target) == "newer"}
    if newer:
        raise UserError(f"{manifest.root}: the optimized files of {', '.join(newer)} were made by a newer sdxl-trt "
                        f"(recipe {max(newer.values())}; this one reads up to {OPTIMIZE_RECIPE}): upgrade sdxl-trt, "
                        f"or make them again with this one: `sdxl-trt optimize {manifest.root}`")


def session_file(entry: dict, file: str | None = None) -> tuple[str, str, str | None]:
    """Which file ort-cuda runs a component from: (file kind, precision, path or None for the precision's own file):
    the optimized file if there is one, else fp16, else fp32; or the `file` asked for ("context": an optimized UNet's
    context file, export/context_projections.py)."""
    optimized = entry.get("optimized", {}).get("cuda")
    if file is None:
        file = "cuda" if optimized else "fp16" if "fp16" in entry.get("precisions", {}) else "fp32"
    if file in ("cuda", "context"):
        return file, optimized["precision"], optimized["path" if file == "cuda" else "context"]
    return file, file, None


def context_file(entry: dict) -> str | None:
    """The context file (export/context_projections.py) the UNet file ort-cuda runs needs, relative to the engine
    directory; None when its file computes the cross-attentions' K and V itself."""
    return entry["optimized"]["cuda"].get("context") if session_file(entry)[0] == "cuda" else None


def precision_of(backend, component: str) -> str:
    """The precision `component` computes in on `backend`, for messages about its numbers: ort-cpu's fp32; on ort-cuda
    its file's (fp32 once an fp16 VAE has fallen back); a loaded TensorRT engine's build precision."""
    if getattr(backend, "precision", None):  # ort-cpu: one precision for everything
        return backend.precision
    entry = backend.manifest.components.get(component, {})
    if backend.name == "ort-cuda":
        return "fp32" if component in getattr(backend, "_overflowed", ()) else session_file(entry)[1]
    record = getattr(getattr(backend, "_sessions", {}).get(component), "record", None)
    return record["precision"] if record else "its engine's precision"


def non_finite(what: str, component: str, backend, advice: str, fp16_advice: str | None = None) -> str:
    """The message for NaN/Inf out of `component`, true for the precision it ran in on `backend`: an fp16 overflow
    only where fp16 computed it; in fp32 (or bf16, with fp32's range) the inputs or the weights are to blame, since
    nothing sane reaches ±3.4e38. `advice`: what the user can change (`fp16_advice` instead after an fp16 overflow)."""
    precision = precision_of(backend, component)
    where = f"{component} in {precision} on {backend.name}"
    if precision == "fp16":
        return (f"{what} NaN/Inf ({where}): an fp16 overflow, some value passed ±65504, fp16's largest; "
                f"{fp16_advice or advice}")
    return (f"{what} NaN/Inf ({where}): values left {precision}'s range (±3.4e38) or became undefined (0/0, ∞−∞), "
            f"which sane inputs do not cause in {precision}; {advice}")


VAE_FP16_ADVICE = "export with an fp16-safe VAE (sdxl-trt export --vae SRC) or build the VAE in fp32"
