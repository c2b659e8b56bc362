"""`sdxl-trt bench DIR`: latency and throughput over the sweeps users compare runtimes by, every contender in one
process on one machine, written as JSON (schema: benchmarks/README.md) that benchmarks/charts.py turns into charts.

Sweeps (each a list of cases; `--size` is the size the non-resolution sweeps use, default the model's):
  resolution  the SDXL buckets from 1024x1024 to 1536x640 (both orientations), 512², 768²; batch 1, 30 steps, CFG 5
  batch       batch 1, 2, 4
  steps       4, 8, 20, 30, 50 steps
  cfg         guidance off (one UNet evaluation per step: the path of distilled few-step models): 4 steps at 512²
              and 30 steps at --size
  refiner     the refiner as the second expert from 0.8 of the schedule
  throughput  MLPerf's offline SDXL scenario: 20 Euler steps, CFG 8, batch 1, 2, 4 → images/s at the best batch
  overhead    host-side cost per denoising step: 2 and 10 steps, (t10 − t2) / 8 and allocations per step (tracemalloc)
`--cold-start` adds load → first image (30 steps at --size) in fresh processes, with an empty and a filled cache.

Every case: `--warmup` runs, then `--runs` timed runs (device synchronised), median and p90 end to end (prompt →
PIL images), the stages from the pipeline's own timings (text, denoise, refiner, VAE), peak memory, and, with a
FLOP table (benchmarks/unet_flops.py), the UNet work per step and the TFLOP/s achieved in the denoising loop.
Contenders: `sdxl-trt` on the chosen backend (this module, no torch), and diffusers eager / CUDA-graphed UNet /
torch.compile (export/bench_diffusers.py, needs the `export` extra and the `--model` the directory was exported
from).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import shlex
import statistics
import sys
import time
import tracemalloc
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import UserError

BUCKETS = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344), (1536, 640),
           (640, 1536))
SWEEPS = ("resolution", "batch", "steps", "cfg", "refiner", "throughput", "overhead")
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"


@dataclass(frozen=True)
class Case:
    sweep: str
    width: int
    height: int
    batch: int = 1
    steps: int = 30
    guidance: float = 5.0
    sampler: str = "euler"
    refiner_start: float | None = None


def sweep_cases(sweep: str, size: tuple[int, int]) -> list[Case]:
    w, h = size
    if sweep == "resolution":
        return [Case(sweep, *s) for s in (*BUCKETS, (512, 512), (768, 768))]
    if sweep == "batch":
        return [Case(sweep, w, h, batch=b) for b in (1, 2, 4)]
    if sweep == "steps":
        return [Case(sweep, w, h, steps=n) for n in (4, 8, 20, 30, 50)]
    if sweep == "cfg":
        return [Case(sweep, 512, 512, steps=4, guidance=1.0), Case(sweep, w, h, guidance=1.0)]
    if sweep == "refiner":
        return [Case(sweep, w, h), Case(sweep, w, h, refiner_start=0.8)]
    if sweep == "throughput":
        return [Case(sweep, w, h, batch=b, steps=20, guidance=8.0) for b in (1, 2, 4)]
    if sweep == "overhead":
        return [Case(sweep, w, h, steps=2), Case(sweep, w, h, steps=10)]
    raise UserError(f"--sweeps {sweep!r}: expected some of {', '.join(SWEEPS)}")


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile by nearest rank (a value that occurred: numpy's method="inverted_cdf")."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, -(-q * len(ordered) // 100) - 1))]


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 2)


def stats_ms(samples: list[float]) -> dict:
    """Median and p90 (nearest rank) of samples in seconds, as milliseconds."""
    return {"median": median_ms(samples), "p90": round(percentile(samples, 90) * 1e3, 2)}


def unet_evaluations(case: Case) -> int:
    """UNet evaluations per call: one per step and image, two under classifier-free guidance (Euler: one per step)."""
    return case.steps * case.batch * (2 if case.guidance > 1.0 else 1)


def read_flops(path: str) -> dict:
    """--flops: a FLOP table written by benchmarks/unet_flops.py, read (and its shape checked) before any run."""
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--flops {path!r}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"--flops {path!r}: not a JSON file ({e})") from None
    if not (isinstance(table, dict) and isinstance(table.get("flops"), dict)
            and all(isinstance(table["flops"].get(role), dict) for role in ("base", "refiner"))):
        raise UserError(f"--flops {path!r}: not a FLOP table of benchmarks/unet_flops.py (no flops.base / .refiner)")
    return table


def flops_per_call(case: Case, table: dict | None) -> float | None:
    """FLOPs of the UNet work in one call from a benchmarks/unet_flops.py table (base, and the refiner's share)."""
    if not table:
        return None
    size = f"{case.width}x{case.height}"
    base = table["flops"]["base"].get(size)
    if base is None:
        return None
    evaluations = unet_evaluations(case)
    if case.refiner_start is None:
        return base * evaluations
    refiner = table["flops"]["refiner"].get(size)
    if refiner is None:
        return None
    share = 1.0 - case.refiner_start
    return evaluations * (base * (1 - share) + refiner * share)


class Timer:
    """Runs a callable `warmup` + `runs` times, each followed by `sync`; wall-clock samples of the timed runs."""

    def __init__(self, runs: int, warmup: int, sync=None):
        self.runs, self.warmup, self.sync = runs, warmup, sync or (lambda: None)

    def __call__(self, fn) -> tuple[list[float], list]:
        for _ in range(self.warmup):
            fn()
        self.sync()
        samples, results = [], []
        for _ in range(self.runs):
            t = time.perf_counter()
            results.append(fn())
            self.sync()
            samples.append(time.perf_counter() - t)
        return samples, results


def peak_host_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class OursContender:
    """sdxl-trt on one backend: the Pipeline loaded once, every case through its __call__ (PIL images out)."""

    def __init__(self, engine: Path, backend: str, cuda_graphs: str = "step", sizes=(), devices=None):
        """`sizes`: the (W, H) of the cases to run: on ort-cuda each gets sessions made for its shape (resident
        buckets), as SDXL buckets do in use. `devices`: ort-cuda's GPU ids (Pipeline.load)."""
        from .pipeline import Pipeline

        started = time.perf_counter()
        before = device_used_gib() if backend != "ort-cpu" else None
        kw = {"cuda_graphs": cuda_graphs, "buckets": sorted(set(sizes)), "devices": devices} \
            if backend == "ort-cuda" else {}
        self.pipe = Pipeline.load(engine, backend=backend, **kw)
        self.load_s = time.perf_counter() - started
        self.devices = list(getattr(self.pipe.backend, "devices", [0] if backend != "ort-cpu" else []))
        self.name, self.mode = "sdxl-trt", backend + (f", CUDA graphs {cuda_graphs}" if backend == "ort-cuda" else "")
        if len(self.devices) > 1:
            self.mode += f", GPUs {','.join(map(str, self.devices))}"
        self.gpu = backend != "ort-cpu"
        self.sync = self.pipe.backend.stream.synchronize if hasattr(self.pipe.backend, "stream") else None
        self.before = before
        self._shape = None  # (width, height, batch, CFG) of the last case

    def supports(self, case: Case) -> str | None:
        if case.refiner_start is not None and not self.pipe.has_refiner:
            return "the engine directory has no refiner"
        return None

    def call(self, case: Case):
        shape = (case.width, case.height, case.batch, case.guidance > 1.0)
        if self.gpu and self._shape not in (None, shape) and hasattr(self.pipe.backend, "release"):
            # a new shape: free every session made for the last one (per-shape UNet / VAE sessions with their CUDA
            # graphs and arenas), or device memory grows shape by shape (OOM after 7 sizes on the H100)
            for name in self.pipe.manifest.components:
                self.pipe.backend.release(name)
            gc.collect()
        self._shape = shape
        kw = dict(height=case.height, width=case.width, num_inference_steps=case.steps, guidance_scale=case.guidance,
                  sampler=case.sampler, num_images_per_prompt=case.batch, seed=0, progress=False)
        return self.pipe(PROMPT, refiner_start=case.refiner_start, **kw)  # None: the base alone

    @staticmethod
    def stages(result) -> dict:
        t = result.timings
        return {"text_ms": t.get("text"), "denoise_ms": t.get("base"), "refiner_ms": t.get("refiner"),
                "vae_ms": t.get("vae")}

    def memory_gib(self) -> float | None:
        """Device memory in use now, less what was in use before the pipeline loaded (GPU backends)."""
        used = device_used_gib() if self.gpu else None
        return round(used - (self.before or 0.0), 2) if used is not None else None

    def close(self) -> None:
        import gc

        self.pipe = None
        gc.collect()


def device_used_gib() -> float | None:
    """The GPU's memory in use (GiB, every process's), or None where there is no GPU runtime to ask."""
    from .cuda import device_memory

    try:
        return device_memory()[0] / 2**30
    except UserError:
        return None


def measure(contender, case: Case, timer: Timer, flops: dict | None) -> dict:
    """One case on one contender: e2e median/p90, stages (medians), memory, FLOP/s, images/s."""
    skip = contender.supports(case)
    row = {"contender": contender.name, "mode": contender.mode, "devices": getattr(contender, "devices", None),
           **asdict(case)}
    if skip:
        return {**row, "skipped": skip}
    if hasattr(contender, "begin_case"):
        contender.begin_case()
    try:
        samples, results = timer(lambda: contender.call(case))
    except UserError as e:
        return {**row, "skipped": str(e)}
    e2e = stats_ms(samples)
    row.update(e2e_ms=e2e["median"], e2e_p90_ms=e2e["p90"], runs=len(samples))
    stages = [contender.stages(r) for r in results]
    for key in stages[0]:
        values = [s[key] for s in stages if s.get(key) is not None]
        if values:
            row[key] = round(statistics.median(values) * 1e3, 2)
    if row.get("denoise_ms"):  # the whole denoising loop (base, then the refiner's share) per step
        row["loop_per_step_ms"] = round((row["denoise_ms"] + (row.get("refiner_ms") or 0.0)) / case.steps, 2)
    row["images_per_s"] = round(case.batch / (e2e["median"] / 1e3), 3)
    work = flops_per_call(case, flops)
    if work and row.get("denoise_ms") is not None:
        loop_ms = row["denoise_ms"] + (row.get("refiner_ms") or 0.0)
        row["unet_tflop_per_step"] = round(work / case.steps / 1e12, 3)
        row["achieved_tflops"] = round(work / (loop_ms / 1e3) / 1e12, 1)
    row.update(contender.extra() if hasattr(contender, "extra") else {})
    memory = contender.memory_gib()
    row["peak_memory_gib"] = memory if memory is not None else round(peak_host_gib(), 2)
    row["memory_kind"] = "device (in use, over the process's start)" if memory is not None else "host (peak RSS)"
    return row


def host_overhead(contender, size: tuple[int, int], timer: Timer) -> dict:
    """Per denoising step, from 2- and 10-step calls (their difference is 8 steps of the loop alone): wall time (on
    GPU backends the host's share shows as the gap to the kernels; on ort-cpu it includes the UNet), memory kept
    after the call per step (a leak shows here), and the transient peak of Python/numpy allocations per step
    (tracemalloc: numpy reports its buffers to it)."""
    cases = [Case("overhead", *size, steps=n) for n in (2, 10)]
    times = [statistics.median(timer(lambda c=c: contender.call(c))[0]) for c in cases]
    kept, peaks = [], []
    for c in cases:
        contender.call(c)  # warm: lazily made sessions and buffers are not per-step costs
        tracemalloc.start()
        result = contender.call(c)
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del result
        kept.append(current)
        peaks.append(peak)
    steps = cases[1].steps - cases[0].steps
    return {"contender": contender.name, "mode": contender.mode, "sweep": "overhead", "width": size[0],
            "height": size[1], "step_ms": round((times[1] - times[0]) / steps * 1e3, 3),
            "kept_bytes_per_step": round((kept[1] - kept[0]) / steps),
            "peak_bytes_per_step": round((peaks[1] - peaks[0]) / steps), "peak_bytes_10_steps": peaks[1]}


COLD_START = """
import json, sys, time
t0 = time.perf_counter()
from sdxl_trt.runtime import Pipeline
pipe = Pipeline.load(sys.argv[1], backend=sys.argv[2])
t1 = time.perf_counter()
pipe(sys.argv[3], height=int(sys.argv[4]), width=int(sys.argv[5]), num_inference_steps=int(sys.argv[6]), seed=0,
     progress=False)
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "first_image_s": t2 - t1, "total_s": t2 - t0}))
"""


def cold_starts(engine: str | Path, backend: str, width: int, height: int, steps: int) -> list[dict]:
    """`Pipeline.load` (file hashes checked) → first image, in fresh processes: with an empty cache (compiled
    kernels, file hashes) and again with the cache the first one filled."""
    import subprocess
    import tempfile

    out = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "SDXL_TRT_CACHE": cache}
        for label in ("empty cache", "cache filled"):
            run = subprocess.run([sys.executable, "-c", COLD_START, str(engine), backend, PROMPT, str(height),
                                  str(width), str(steps)], env=env, capture_output=True, text=True)
            if run.returncode != 0:
                raise UserError(f"cold start failed: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
            figures = json.loads(run.stdout.splitlines()[-1])
            out.append({"cache": label, "backend": backend, **{k: round(v, 2) for k, v in figures.items()}})
            print(f"cold start ({label}): {out[-1]}", flush=True)
    return out


def script_header(what: str, git: str | None) -> dict:
    """The fields every benchmarks/ script's results JSON starts with: what it measured, on which GPU, the command as
    typed, the commit (`--git`, where the tree has no .git), the date and the versions behind the figures."""
    from . import tensorrt_api

    gpu = tensorrt_api.gpu()
    return {"what": what, "device": gpu.name if gpu else None, "command": "python " + " ".join(sys.argv),
            "git": {"commit": git} if git else None,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions()}


def versions() -> dict:
    """Python and the packages that decide the figures (those installed; nothing is imported)."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("onnxruntime-gpu", "onnxruntime", "numpy", "cuda-python", "cuda-bindings", "tensorrt",
                 "tensorrt-rtx", "torch", "diffusers", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_state() -> dict:
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def run(args) -> dict:
    """The `bench` command: every contender over every case of the chosen sweeps; the JSON is rewritten after each
    case, so a run cut short keeps what it measured."""
    from . import tensorrt_api
    from .fileio import atomic_file, check_writable
    from .manifest import load_manifest
    from .validate import finite, parse_size

    engine = Path(args.dir)
    manifest = load_manifest(engine)
    size = parse_size(args.size) if args.size else (manifest.data["model"]["default_size"],) * 2
    flops = read_flops(args.flops) if args.flops else None
    finite(args.compile_limit, "--compile-limit", low=1)
    out = Path(args.out)
    if out.suffix.lower() != ".json" or out.is_dir():  # said now, not after the runs when the results are saved
        raise UserError(f"--out {str(out)!r}: expected a .json file name" + (" (it is a folder)" if out.is_dir() else ""))
    if args.refiner and args.contenders:  # checked now, not when the first refiner case comes up
        from ..export.sources import resolve

        role = resolve(args.refiner, flag="--refiner").role
        if role != "refiner":
            raise UserError(f"--refiner {args.refiner!r} is an SDXL {role}, not a refiner")
    timer = Timer(args.runs, args.warmup)
    gpu = tensorrt_api.gpu()
    result = {"device": gpu.name if gpu else "CPU", "command": shlex.join(["sdxl-trt", *args.argv]),
              "git": {"commit": args.git, "dirty": False} if args.git else git_state(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
              "engine": str(engine),
              "model": manifest.data.get("sources", {}), "runs": args.runs, "warmup": args.warmup,
              "prompt": PROMPT, "cases": [], "overhead": [], "load_s": {}, "complete": False}
    if args.resume and out.exists():
        resume(result, out)
    check_writable(out, f"--out {str(out)!r}")  # before the first case, not after it

    def save() -> None:
        with atomic_file(out) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")

    sizes = [(c.width, c.height) for sweep in args.sweeps for c in sweep_cases(sweep, size)]
    from .validate import resident_options

    device_sets = [resident_options(args.backend, devices=d)["devices"] for d in args.devices or [None]]
    makers = [(f"sdxl-trt:{args.backend}:{args.cuda_graphs}" + (f":{','.join(map(str, d))}" if d else ""),
               lambda d=d: OursContender(engine, args.backend, args.cuda_graphs, sizes, d)) for d in device_sets]
    for name in args.contenders or []:
        def make(name=name):
            from ..export.bench_diffusers import DiffusersContender  # torch side: only when asked for

            refiner = args.refiner or manifest.data.get("sources", {}).get("refiner", {}).get("spec")
            return DiffusersContender(args.model or manifest_source(manifest), name, refiner=refiner,
                                      compile_limit=args.compile_limit)
        makers.append((name, make))
    for ident, make in makers:  # one at a time: each frees its memory before the next loads
        done = {case_key(r) for r in result["cases"] + result["overhead"] if r.get("contender_id") == ident}
        todo = [c for sweep in args.sweeps for c in sweep_cases(sweep, size) if case_key(asdict(c)) not in done]
        if not todo:
            print(f"{ident}: every case is in {out} already", flush=True)
            continue
        contender = make()
        result["load_s"][f"{contender.name} ({contender.mode})"] = round(contender.load_s, 2)
        timer.sync = contender.sync or (lambda: None)
        for case in todo:
            if case.sweep == "overhead":
                if case.steps == 2:  # one measurement covers the sweep's two cases
                    result["overhead"].append({**host_overhead(contender, size, timer), "contender_id": ident})
                    print(json.dumps(result["overhead"][-1]), flush=True)
                continue
            row = {**measure(contender, case, timer, flops), "contender_id": ident}
            result["cases"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("sweep", "sampler")}), flush=True)
            save()
        if hasattr(contender, "close"):
            contender.close()  # diffusers' weights leave the GPU before the next contender
    if args.cold_start:
        gc.collect()  # the children need the memory the contenders held
        result["cold_start"] = cold_starts(engine, args.backend, *size, 30)
    result["complete"] = True
    save()
    return result


def case_key(row: dict) -> tuple:
    """What identifies a case in results (a row, or a Case as a dict); overhead rows stand for the whole sweep."""
    if row.get("sweep") == "overhead":
        return ("overhead", row["width"], row["height"])
    return tuple(row.get(k) for k in ("sweep", "width", "height", "batch", "steps", "guidance", "sampler",
                                      "refiner_start"))


def resume(result: dict, out: Path) -> None:
    """--resume: keep what an earlier run of the same device wrote to `out` (measured cases only)."""
    from .fileio import read_json

    earlier = read_json(out, "--resume")
    if earlier.get("device") != result["device"]:
        raise UserError(f"--resume: {out} was measured on {earlier.get('device')!r}, this is {result['device']!r}")
    result["cases"] = [c for c in earlier.get("cases", []) if "e2e_ms" in c and c.get("contender_id")]
    result["overhead"] = [c for c in earlier.get("overhead", []) if c.get("contender_id")]
    result["load_s"] = earlier.get("load_s", {})
    result["resumed"] = [*earlier.get("resumed", []), {"date": earlier.get("date"), "command": earlier.get("command"),
                                                       "git": earlier.get("git")}]
    if "cold_start" in earlier:
        result["cold_start"] = earlier["cold_start"]


def manifest_source(manifest) -> str:
    """The built-in model the directory was exported from (diffusers needs the same weights)."""
    spec = manifest.data.get("sources", {}).get("base", {}).get("spec")
    if not spec or ":" not in spec:
        raise UserError("diffusers contenders need --model: the weights this directory was exported from")
    return spec
