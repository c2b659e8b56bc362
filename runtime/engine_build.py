"""`sdxl-trt build`: TensorRT or TensorRT-RTX engines from an engine directory's ONNX files.

One builder for both (they share the API). Each component's ONNX file is parsed into a strongly typed network
(the precision is the file's: fp16 for the text encoders and UNets, the VAE's as exported or chosen), given one
optimization profile per requested size (profiles.py), and built; what TensorRT reports about the network's IO
tensors and the profiles it was given is checked against the component's contract and recorded in the manifest
beside the engine's sha256. A component whose engine was already built from the same inputs is skipped.

Engines are written to a temporary file and renamed into place, and the manifest is rewritten after each one,
so an interrupted build keeps the engines it finished and never leaves a half-written one.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from . import engines as eng
from . import profiles as prof
from . import tensorrt_api
from .errors import UserError, VerificationError
from .fileio import atomic_file, check_writable
from .interrupts import run_native
from .manifest import Manifest, file_problem, load_manifest, sha256_file

VAE = ("vae_decoder", "vae_encoder")
VAE_PRECISIONS = ("auto", "fp16", "fp32", "bf16")
BF16_FILE = "model.bf16.onnx"
DTYPE_NAMES = {"HALF": "fp16", "FLOAT": "fp32", "BF16": "bf16", "INT32": "int32", "INT64": "int64", "BOOL": "bool"}
CONTRACT_DTYPES = {"float32": "fp32", "int32": "int32"}  # "float" follows the file's precision


@dataclass
class BuildOptions:
    backend: str
    profiles: list[prof.Profile]
    opt_level: int | None = None  # TensorRT's builder optimization level (0-5; its default is 3)
    workspace_mib: int | None = None
    timing_cache: Path | None = None
    refittable: bool = False
    strip_weights: bool = False
    vae_precision: str = "auto"

    def key_options(self) -> dict:
        return {"opt_level": self.opt_level, "workspace_mib": self.workspace_mib, "refittable": self.refittable,
                "strip_weights": self.strip_weights}


@dataclass
class BuildReport:
    root: Path
    backend: str
    rows: list = field(default_factory=list)  # (component, precision, profiles, bytes, seconds, status)
    notes: list = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"{'component':<16}{'precision':<11}{'profiles':>9}{'size':>12}{'time':>9}  status"]
        for name, precision, n, size, seconds, status in self.rows:
            lines.append(f"{name:<16}{precision:<11}{n:>9}{size / 1e6:>9.1f} MB{seconds:>8.1f}s  {status}")
        lines += self.notes
        built = sum(1 for r in self.rows if r[5] == "built")
        lines.append(f"{self.backend}: {built} built, {len(self.rows) - built} cached, in {self.seconds:.0f} s "
                     f"({self.root / eng.ENGINES / self.backend})")
        return "\n".join(lines)


def component_precision(manifest: Manifest, component: str, vae_precision: str) -> str:
    entry = manifest.components[component]
    have = entry["precisions"]
    if entry["contract"] in VAE:
        wanted = ("fp16" if "fp16" in have else "fp32") if vae_precision == "auto" else vae_precision
    else:
        wanted = "fp16"
    if wanted == "bf16" and "fp32" in have:
        return wanted  # derived from the fp32 file when the build starts (onnx_bf16.py)
    if wanted not in have:
        how = ("export with --precision fp16" if wanted == "fp16" and entry["contract"] not in VAE
               else "export with --vae an fp16-safe VAE, or build with --vae-precision fp32")
        raise UserError(f"{manifest.root}: {component} has no {wanted} ONNX file (it has {', '.join(have)}); {how}")
    return wanted


def component_profiles(profiles: list[prof.Profile], contract: str, inputs: list[dict]) -> list[prof.Profile]:
    """The requested profiles, or for a model without a size input (text encoders) one that covers them all."""
    if prof.sized(inputs):
        return profiles
    lo = min(p.images[0] for p in profiles)
    hi = max(p.images[2] for p in profiles)
    windows = (min(p.windows[0] for p in profiles), 1, max(p.windows[2] for p in profiles))
    exact = all(p.exact for p in profiles)
    images = (lo, lo if exact else 1, hi)
    none = (0, 0)  # no size: fixed, so that the cache key does not change with the sized profiles
    return [prof.Profile(prof.ANY_SIZE, none, none, none, 0, images, windows, exact)]


def build_engines(engine_dir: str | Path, options: BuildOptions, components: list[str] | None = None,
                  progress: bool = True) -> BuildReport:
    """Build (or find cached) engines for `components` (default: all) of an engine directory; see module doc."""
    try:
        return _build_engines(engine_dir, options, components, progress)
    except OSError as e:
        raise UserError(f"building in {engine_dir} failed: {e.strerror or e} ({e.filename or engine_dir}); "
                        "engines finished before this are kept") from None


def _build_engines(engine_dir, options: BuildOptions, components, progress: bool) -> BuildReport:
    started = time.perf_counter()
    # the flags' own values first: a wrong one is the mistake to report, whatever the machine has
    if options.opt_level is not None and not 0 <= options.opt_level <= 5:
        raise UserError(f"--opt-level {options.opt_level}: expected 0-5")
    if options.workspace_mib is not None and options.workspace_mib < 1:
        raise UserError(f"--workspace {options.workspace_mib}: expected a positive number of MiB")
    if options.vae_precision not in VAE_PRECISIONS:
        raise UserError(f"--vae-precision {options.vae_precision!r}: expected one of {', '.join(VAE_PRECISIONS)}")
    manifest = load_manifest(engine_dir)
    root = manifest.root
    trt = tensorrt_api.import_trt(options.backend)
    device = tensorrt_api.gpu()
    target = tensorrt_api.target(options.backend, trt, device)
    if options.backend == "tensorrt-rtx" and device is None and (options.refittable or options.strip_weights
                                                                 or options.workspace_mib):
        raise UserError("--refittable, --strip-weights and --workspace need a CUDA GPU at build time with "
                        "TensorRT-RTX (its builder compiles refit kernels and allocates the workspace on the GPU); "
                        "build without them here, or on a machine with a supported GPU")
    names = list(manifest.components) if components is None else list(components)
    for name in names:
        if name not in manifest.components:
            raise UserError(f"--components: {root} has no {name!r} (it has {', '.join(manifest.components)})")
    plan = [(name, component_precision(manifest, name, options.vae_precision)) for name in names]
    if options.backend == "tensorrt" and options.timing_cache is None:
        gpu_slug = re.sub(r"[^A-Za-z0-9]+", "-", target["gpu"]).strip("-").lower()
        options.timing_cache = root / eng.ENGINES / options.backend / f"{target['label']}-{gpu_slug}.timing-cache"
    report = BuildReport(root, options.backend)
    builder = _Builder(trt, options, target)
    if options.backend == "tensorrt-rtx" and options.timing_cache is not None:
        report.notes.append("--timing-cache: ignored, TensorRT-RTX does not time kernels at build time")
    # the engines' size is not known before they are built (kernels as well as weights): writable is what is checked
    check_writable(root / eng.ENGINES / options.backend / f"{plan[0][0]}.engine", f"build {root}")
    with eng.locked(root):
        for name, precision in plan:
            if precision == "bf16":
                manifest = add_bf16_variant(root, name)
        # the ONNX files must be the ones the manifest names: their hashes are the engines' cache keys
        manifest.check_files(only=[f for name, p in plan for f in manifest.components[name]["files"][p]])
        bar = tqdm(plan, desc=f"build {options.backend}", unit="engine", disable=not progress)
        for name, precision in bar:
            bar.set_postfix_str(name)
            manifest = load_manifest(root)
            entry = manifest.components[name]
            profiles = component_profiles(options.profiles, entry["contract"], entry["inputs"])
            key_inputs = {"onnx_sha256": eng.onnx_sha256(manifest, name, precision), "backend": options.backend,
                          "backend_version": trt.__version__, "target": target, "precision": precision,
                          "profiles": [p.to_json() for p in profiles], "options": options.key_options()}
            key = eng.engine_key(key_inputs)
            path = eng.engine_path(options.backend, name, precision, target["label"], key)
            cached = manifest.engines.get(path)
            if cached and cached["key"] == key and file_problem(manifest.path(path), cached, True, "") is None:
                report.rows.append((name, precision, len(profiles), cached["size"], 0.0, "cached"))
                continue
            t = time.perf_counter()
            record = builder.build(manifest, name, precision, profiles, manifest.path(path), progress and bar)
            record.update(key=key, component=name, **{k: key_inputs[k] for k in
                          ("onnx_sha256", "backend", "backend_version", "target", "precision")},
                          options=options.key_options(), build_seconds=round(time.perf_counter() - t, 1),
                          built=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            _record_engine(root, path, record)
            report.rows.append((name, precision, len(profiles), record["size"], record["build_seconds"], "built"))
        bar.close()
        builder.save_timing_cache()
    report.seconds = time.perf_counter() - started
    return report


def add_bf16_variant(root: Path, component: str) -> Manifest:
    """onnx/<component>/model.bf16.onnx from its fp32 file (once), recorded in the manifest like an exported file."""
    from .manifest import file_record
    from .onnx_bf16 import convert_to_bf16

    manifest = load_manifest(root)
    entry = manifest.components[component]
    source = eng.onnx_sha256(manifest, component, "fp32")
    if "bf16" in entry["precisions"] and entry.get("bf16_from") == source:
        return manifest
    manifest.check_files(only=entry["files"]["fp32"])
    fp32 = manifest.path(entry["precisions"]["fp32"])
    dest = convert_to_bf16(fp32, fp32.parent / BF16_FILE)
    relative, record = file_record(root, dest)

    def change(data: dict) -> None:
        data["files"][relative] = record
        data["components"][component]["precisions"]["bf16"] = relative
        data["components"][component]["files"]["bf16"] = [relative]
        data["components"][component]["bf16_from"] = source  # the fp32 file it was derived from

    return eng.update_manifest(root, change)


def _record_engine(root: Path, path: str, record: dict) -> None:
    """Add the engine to the manifest, replacing (and deleting) earlier engines of the same component, backend and
    target: they were built from other inputs and would never be loaded again."""
    replaced: list[str] = []

    def change(data: dict) -> None:
        engines = data.setdefault("engines", {})
        for old, r in list(engines.items()):
            if (r["component"], r["backend"]) == (record["component"], record["backend"]) and old != path and \
                    eng.same_target(r["target"], record["target"]):
                replaced.append(old)
                del engines[old]
        engines[path] = record

    manifest = eng.update_manifest(root, change)
    for old in replaced:
        manifest.path(old).unlink(missing_ok=True)


class _Builder:
    def __init__(self, trt, options: BuildOptions, target: dict):
        self.trt, self.options, self.target = trt, options, target
        self.logger = tensorrt_api.Logger(trt)
        self.builder = trt.Builder(self.logger)
        self.timing_cache = None
        self.timing_cache_path = None
        if options.backend == "tensorrt":
            self.timing_cache_path = options.timing_cache
            config = self.builder.create_builder_config()
            data = b""
            if self.timing_cache_path is not None and Path(self.timing_cache_path).is_file():
                data = Path(self.timing_cache_path).read_bytes()
            self.timing_cache = config.create_timing_cache(data)

    def save_timing_cache(self) -> None:
        if self.timing_cache is None or self.timing_cache_path is None:
            return
        with atomic_file(self.timing_cache_path) as tmp:
            tmp.write_bytes(bytes(self.timing_cache.serialize()))

    def parse(self, onnx_path: Path):
        trt = self.trt
        self.logger.clear()
        network = self.builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
            raise UserError(f"{self.options.backend} cannot parse {onnx_path}: {errors or self.logger.last_error()}")
        return network, parser

    def config(self, precision: str):
        trt, o = self.trt, self.options
        config = self.builder.create_builder_config()
        if precision == "fp32":
            config.set_flag(trt.BuilderFlag.TF32)  # the VAE in fp32: TF32 tensor cores, as torch's default for convs
        if o.opt_level is not None:
            config.builder_optimization_level = o.opt_level
        if o.workspace_mib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, o.workspace_mib << 20)
        if o.refittable:
            config.set_flag(trt.BuilderFlag.REFIT)  # any weights of the same architecture (fine-tunes, LoRA)
        if o.strip_weights:
            config.set_flag(trt.BuilderFlag.STRIP_PLAN)  # weights come from the ONNX file at load
            if not o.refittable:
                config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)  # ... and only those: keeps every optimisation
        if self.timing_cache is not None and not config.set_timing_cache(self.timing_cache, ignore_mismatch=False):
            self.timing_cache = config.create_timing_cache(b"")  # from another GPU or version: start afresh
            config.set_timing_cache(self.timing_cache, ignore_mismatch=False)
        return config

    def build(self, manifest: Manifest, component: str, precision: str, profiles: list[prof.Profile], dest: Path,
              bar) -> dict:
        trt = self.trt
        entry = manifest.components[component]
        onnx_path = manifest.path(entry["precisions"][precision])
        network, _parser = self.parse(onnx_path)
        io = network_io(network, trt)
        check_io(component, entry, precision, io)
        config = self.config(precision)
        built_profiles = []
        for p in profiles:
            shapes = prof.input_shapes(p, entry["contract"], entry["inputs"])
            profile = self.builder.create_optimization_profile()
            for name, (lo, opt, hi) in shapes.items():
                profile.set_shape(name, lo, opt, hi)
            if config.add_optimization_profile(profile) < 0:
                raise UserError(f"{component}: {self.options.backend} rejected the profile {p.label}: "
                                f"{self.logger.last_error()}")
            # what TensorRT holds, read back through its API
            held = {name: [list(s) for s in profile.get_shape(name)] for name in shapes}
            built_profiles.append({**p.to_json(), "shapes": held, "steps": prof.input_steps(p, entry["inputs"])})
        if config.num_optimization_profiles != len(profiles):
            raise VerificationError(f"{component}: the builder holds {config.num_optimization_profiles} profiles, "
                                    f"{len(profiles)} were added")
        monitor = progress_monitor(trt, bar, component)  # also how Ctrl-C stops the builder (run_native)
        config.progress_monitor = monitor
        self.logger.clear()
        serialized = run_native(lambda: self.builder.build_serialized_network(network, config), cancel=monitor.cancel,
                                name=f"build {component}")
        if serialized is None:
            raise UserError(f"{self.options.backend} could not build {component}: {self.logger.last_error()}")
        with atomic_file(dest) as tmp:
            with open(tmp, "wb") as f:
                f.write(memoryview(serialized))
        del serialized
        return {"onnx": entry["precisions"][precision], "io": io, "profiles": built_profiles,
                "sha256": sha256_file(dest), "size": dest.stat().st_size}


def network_io(network, trt) -> list[dict]:
    """The parsed network's IO tensors as TensorRT sees them: name, input/output, dtype, shape (-1: dynamic)."""
    io = []
    for mode, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):
        for i in range(count):
            t = get(i)
            dtype = str(t.dtype).rsplit(".", 1)[-1]
            io.append({"name": t.name, "mode": mode, "dtype": DTYPE_NAMES.get(dtype, dtype.lower()),
                       "shape": list(t.shape)})
    return io


def check_io(component: str, entry: dict, precision: str, io: list[dict]) -> None:
    """The network TensorRT parsed has exactly the contract's tensors, dtypes and fixed dimensions."""
    expected = [("input", t) for t in entry["inputs"]] + [("output", t) for t in entry["outputs"]]
    got = {(t["mode"], t["name"]): t for t in io}
    if set(got) != {(mode, t["name"]) for mode, t in expected} or len(io) != len(expected):
        raise VerificationError(f"{component}: the ONNX file's IO tensors {sorted(n for _, n in got)} differ from "
                                f"its contract's {sorted(t['name'] for _, t in expected)}")
    for mode, spec in expected:
        t = got[(mode, spec["name"])]
        dtype = CONTRACT_DTYPES.get(spec["dtype"], "fp32" if precision == "bf16" else precision)  # bf16: fp32 IO
        fixed = [d if isinstance(d, int) else -1 for d in spec["shape"]]
        if t["dtype"] != dtype or len(t["shape"]) != len(fixed) or any(
                f != -1 and s != f for s, f in zip(t["shape"], fixed)):
            raise VerificationError(f"{component}: {spec['name']} is {t['dtype']} {t['shape']} in the ONNX file, "
                                    f"the contract says {dtype} {spec['shape']}")


def progress_monitor(trt, bar, component: str):
    """Shows the builder's current phase (TensorRT's IProgressMonitor) beside the progress bar (if any), and stops
    the build at its next step once `cancel()` was called (TensorRT's way: `step_complete` returns False)."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.phases: dict[str, tuple[int, int]] = {}
            self.shown = 0.0
            self.cancelled = False

        def cancel(self):
            self.cancelled = True

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.phases[phase_name] = (0, num_steps)
            self._show(phase_name)

        def step_complete(self, phase_name, step):
            self.phases[phase_name] = (step + 1, self.phases.get(phase_name, (0, 0))[1])
            self._show(phase_name)
            return not self.cancelled

        def phase_finish(self, phase_name):
            self.phases.pop(phase_name, None)

        def _show(self, phase_name):
            if not bar or time.monotonic() - self.shown < 1.0:  # phases of small models come and go by the thousand
                return
            self.shown = time.monotonic()
            done, total = self.phases.get(phase_name, (0, 0))
            bar.set_postfix_str(f"{component}: {phase_name} {done}/{total}", refresh=True)

    return _Monitor()
