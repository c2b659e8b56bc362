"""`sdxl-trt build --verify`: each built engine against ONNX Runtime on this machine, through polygraphy's comparator.

For every component, the engine (loaded and checked by the runtime backend, as `generate` would) and an ONNX Runtime
session on the ONNX file it was built from (the CUDA provider where there is one, else the CPU) run the same inputs:
one feed per optimization profile at its opt shape, made from the component's contract (token ids in the
vocabulary, time ids of the profile's size, a mid-schedule timestep, unit-normal latents and embeddings; seeded).
polygraphy compares every output with the component's tolerance (|engine - onnxruntime| <= atol + rtol * |onnxruntime|
on the mean of each output's elementwise error): a component outside it is named with its error and the build exits
4. The tolerances and the measured errors are written into the engine's manifest record (`verify`) and shown by
`sdxl-trt inspect`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import engines as eng
from .errors import UserError, VerificationError
from .manifest import load_manifest

# (rtol, atol) on the mean elementwise error of each output, fp16 engine against ONNX Runtime on its fp16 file. fp16
# kernels of two libraries differ by a few fp16 ulps per element (2^-10 relative): the mean stays well under 1e-2 of
# the values' scale (unit-normal latents, CLIP states of a few units), while a wrong weight, layout or profile shape
# moves it by the values' own scale
TOLERANCE = (1e-2, 1e-2)  # every contract alike; recorded per engine in the manifest
VOCAB = 49408  # CLIP's token ids


def contract_feeds(entry: dict, engine, profile: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One input per tensor of the contract at the profile's opt shape, in the engine's dtypes."""
    shapes = {name: tuple(s[1]) for name, s in profile["shapes"].items()}
    feeds = {}
    for spec in entry["inputs"]:
        name, shape = spec["name"], shapes[spec["name"]]
        if name == "input_ids":
            value = rng.integers(0, VOCAB, shape)
        elif name == "timestep":
            value = np.full(shape, 500.0)
        elif name == "time_ids":
            h, w = (8 * shapes["sample"][2], 8 * shapes["sample"][3]) if "sample" in shapes else (1024, 1024)
            value = np.tile(np.array([h, w, 0, 0, h, w][:shape[-1]], np.float64), (shape[0], 1))
        else:
            value = rng.standard_normal(shape)
        feeds[name] = np.ascontiguousarray(value, dtype=engine.dtype(name))
    return feeds


def verify_engines(engine_dir, backend: str, components: list[str] | None = None) -> list[str]:
    """Compare each engine of `backend` (of `components`, default all) with ONNX Runtime; record the results; return
    one line per component; raise VerificationError naming the components outside their tolerance."""
    try:
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from polygraphy.comparator import Comparator, SimpleCompareFunc
    except ImportError:
        raise UserError("--verify compares engines with ONNX Runtime through polygraphy, which is not installed: "
                        "pip install polygraphy (it comes with sdxl-trt[trt] and sdxl-trt[rtx])") from None
    import onnxruntime as ort
    from polygraphy.logger import G_LOGGER

    from .trt_backend import TensorRTBackend

    G_LOGGER.module_severity = G_LOGGER.ERROR  # its per-run chatter; what matters is printed by us, one line each

    runner = _make_runner_class()
    manifest = load_manifest(engine_dir)
    trt_backend = TensorRTBackend(manifest, backend)
    providers = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers() else \
        ["CPUExecutionProvider"]
    lines, failures, results = [], [], {}
    names = components or [r["component"] for r in eng.records(manifest, backend).values()]
    try:
        for component in dict.fromkeys(names):
            engine = trt_backend.session(component)
            entry = manifest.components[component]
            rtol, atol = TOLERANCE
            rng = np.random.default_rng(0)
            feeds = [contract_feeds(entry, engine, profile, rng) for profile in engine.record["profiles"]]
            onnx_path = manifest.path(engine.record["onnx"])
            runners = [runner(engine, f"{backend}:{component}"),
                       OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=providers), name=f"onnxruntime:{component}")]
            run = Comparator.run(runners, data_loader=feeds)
            passed = bool(Comparator.compare_accuracy(run, compare_func=SimpleCompareFunc(
                rtol=rtol, atol=atol, check_error_stat="mean")))
            errors = _errors(run)
            results[component] = {"against": f"onnxruntime {ort.__version__} {providers[0]}", "rtol": rtol,
                                  "atol": atol, "error_stat": "mean", "feeds": len(feeds), "passed": passed, **errors}
            line = (f"{component}: {'matches' if passed else 'DIFFERS FROM'} ONNX Runtime ({providers[0]}) over "
                    f"{len(feeds)} profile(s): mean |diff| {errors['mean_abs']:.2e}, max {errors['max_abs']:.2e} "
                    f"(tolerance rtol {rtol:g}, atol {atol:g} on the mean)")
            lines.append(line)
            if not passed:
                failures.append(line)
    finally:
        trt_backend.close()
    _record(Path(manifest.root), backend, results)
    if failures:
        raise VerificationError("; ".join(failures) + f"; the engines stay built: rebuild after checking the export "
                                f"(`sdxl-trt build {manifest.root} --backend {backend}`)")
    return lines


def _errors(run) -> dict:
    """The largest and the mean absolute difference between the two runners' outputs, over every feed and output."""
    (_, ours), (_, theirs) = list(run.items())
    max_abs, means = 0.0, []
    for a, b in zip(ours, theirs):
        for name in a.keys():
            diff = np.abs(np.asarray(a[name], np.float64) - np.asarray(b[name], np.float64))
            max_abs = max(max_abs, float(diff.max()))
            means.append(float(diff.mean()))
    return {"max_abs": max_abs, "mean_abs": float(np.mean(means)) if means else 0.0}


def _record(root: Path, backend: str, results: dict) -> None:
    def change(data: dict) -> None:
        for record in data.get("engines", {}).values():
            if record["backend"] == backend and record["component"] in results:
                record["verify"] = results[record["component"]]

    with eng.locked(root):
        eng.update_manifest(root, change)


def _make_runner_class():
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class EngineRunner(BaseRunner):
        """polygraphy's view of one of our engines: inputs as the engine record lists them, `run` for inference."""

        def __init__(self, engine, name: str):
            super().__init__(name=name, prefix="sdxl-trt-engine")
            self.engine = engine

        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for name in self.engine.inputs:
                meta.add(name, np.dtype(self.engine.dtype(name)), self.engine.io[name]["shape"])
            return meta

        def infer_impl(self, feed_dict):
            started = time.perf_counter()
            out = dict(self.engine.run(**feed_dict))
            self.inference_time = time.perf_counter() - started
            return out

    return EngineRunner
