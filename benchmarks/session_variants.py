"""Issue 26: what one component's session gives under other ONNX Runtime settings and files, against the fp32 file on
the same GPU: the VAE decoder or encoder (1024², one image) or the UNet (1024², batch 2: one guided step). One process,
one GPU; every session made fresh for the shape (free dimensions fixed, as the runtime's shape sessions; with the
file's custom-op library registered, `optimize --custom-ops`) with ONNX Runtime's CUDA graph, timed as the median of
--runs synchronous runs after 3 warm-up runs (ONNX Runtime synchronises its stream at the end of a run). With
--rounds N every case is measured N times, the cases taking turns (a fresh session each time), and its figure is the
median of its rounds (a round that fails after one that did not is listed in its `round_errors`; the context
file's time is the last round's): the spread between sessions of one file (≈ 0.1–0.3 ms for the UNet) is the size of
what some options change. Writes JSON (rewritten after every case, so a run cut short keeps what it measured). A variant from
benchmarks/attention_projections.py --context-once, or an engine optimized with the context file (the default), has
its context file run first (once, timed apart) and its outputs bound as the UNet's extra inputs.

    sdxl-trt export --model random:base --components vae_decoder --precision fp32 --out /root/vae
    sdxl-trt optimize /root/vae
    python benchmarks/session_variants.py --engine shipped=/root/vae [--engine resize16=/root/vae_r16] --out vae.json
    python benchmarks/session_variants.py --component unet --engine shipped=/root/full --out unet.json

Options tried on every file (DEFAULT_OPTIONS per component, or --options): none beyond the runtime's CUDA_OPTIONS,
and each of `fuse_conv_bias` (the convolutions' bias inside cuDNN's graph instead of a separate add) and an attention
kernel (`sdpa_kernel`: 16, ONNX Runtime's unfused attention, for the VAEs; 1, its own flash attention instead of
cuDNN's, for the UNets), and both. "as shipped" is what runtime/ort_cuda.py's session_options gives the component today.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from sdxl_trt.runtime.contracts import derived, input_dims

# sdpa_kernel is ONNX Runtime's AttentionBackend bit mask (attention_common.h): 1 its own flash attention, 8 cuDNN's
# flash attention, 16 the unfused "math" path; 0 lets it choose (cuDNN's on the H100 for the UNet's heads of 64)
OPTIONS = {"neither": {"fuse_conv_bias": "0", "sdpa_kernel": "0"},
           "fuse_conv_bias": {"fuse_conv_bias": "1", "sdpa_kernel": "0"},
           "sdpa_kernel math": {"fuse_conv_bias": "0", "sdpa_kernel": "16"},
           "fuse_conv_bias + sdpa_kernel math": {"fuse_conv_bias": "1", "sdpa_kernel": "16"},
           "sdpa_kernel flash": {"fuse_conv_bias": "0", "sdpa_kernel": "1"},
           "fuse_conv_bias + sdpa_kernel flash": {"fuse_conv_bias": "1", "sdpa_kernel": "1"},
           "exhaustive conv search": {"fuse_conv_bias": "0", "sdpa_kernel": "0", "cudnn_conv_algo_search": "EXHAUSTIVE"},
           "fuse_conv_bias + exhaustive conv search": {"fuse_conv_bias": "1", "sdpa_kernel": "0",
                                                       "cudnn_conv_algo_search": "EXHAUSTIVE"}}
# the sets tried by default: the VAEs' one attention has heads of 512 (no flash kernel); the UNet's are 64 wide and
# flash / cuDNN kernels take them (the unfused path would write B·heads·tokens² scores: 0.67 GiB an attention at the
# 64² level of a 1024² image, batch 2)
DEFAULT_OPTIONS = {"vae_decoder": ["neither", "fuse_conv_bias", "sdpa_kernel math", "fuse_conv_bias + sdpa_kernel math"],
                   "unet": ["neither", "fuse_conv_bias", "sdpa_kernel flash", "fuse_conv_bias + sdpa_kernel flash"]}
DEFAULT_OPTIONS["vae_encoder"] = DEFAULT_OPTIONS["vae_decoder"]
DEFAULT_OPTIONS["unet_refiner"] = DEFAULT_OPTIONS["unet"]
NP_TYPES = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int32)": np.int32,
            "tensor(int64)": np.int64}
CONTEXT_MS: dict[str, float] = {}  # context file → its median time, as run_context measured it
PROFILE_TOP = 12  # kernels listed per profile (--profile-top)
DIMS = {"vae_decoder": {"B": 1}, "vae_encoder": {"B": 1}, "unet": {"B": 2, "S": 77}, "unet_refiner": {"B": 2, "S": 77}}


def entry_of(engine: Path, component: str) -> dict:
    return json.loads((engine / "manifest.json").read_text())["components"][component]


def file_of(engine: Path, component: str, optimized: bool) -> Path:
    entry = entry_of(engine, component)
    return engine / (entry["optimized"]["cuda"]["path"] if optimized else entry["precisions"]["fp32"])


def context_of(engine: Path, component: str) -> Path | None:
    """The context file of a variant from benchmarks/attention_projections.py --context-once (None for others)."""
    relative = entry_of(engine, component).get("optimized", {}).get("cuda", {}).get("context")
    return engine / relative if relative else None


def run_context(path: Path, cuda: dict, inputs: dict, runs: int) -> tuple[dict, float]:
    """The context file's outputs for `inputs` (numpy, fp16) and its median time (ms): what the UNet of a
    context-once variant takes as inputs, computed once per image instead of every step."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", cuda)])
    feeds = {spec.name: inputs[spec.name].astype(NP_TYPES[spec.type]) for spec in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, feeds)))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(names, feeds)  # numpy in and out: an upper bound on what the device loop would spend
        times.append((time.perf_counter() - t) * 1e3)
    return outputs, round(float(np.median(times)), 2)


def library_of(path: Path):
    """The custom-op library an optimized file needs (`optimize --custom-ops`), checked as the runtime checks it."""
    from sdxl_trt.runtime.backends import custom_ops_library
    from sdxl_trt.runtime.manifest import load_manifest

    for parent in path.parents:
        if (parent / "manifest.json").is_file():
            return custom_ops_library(load_manifest(parent), path)
    return None


def feeds(entry: dict, dims: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the contract's shapes for `dims`: normal noise, a mid-schedule timestep, SDXL's time ids."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in entry["inputs"]:
        shape = tuple(dims[d] if isinstance(d, str) else d for d in spec["shape"])
        if spec["name"] == "timestep":
            out[spec["name"]] = np.full(shape, 500, np.float32)
        elif spec["name"] == "time_ids":
            pixels = derived(dims)
            h, w = pixels["H"], pixels["W"]
            out[spec["name"]] = np.tile(np.array([h, w, 0, 0, h, w], np.float32), (shape[0], 1))
        else:
            out[spec["name"]] = rng.standard_normal(shape).astype(np.float32)
    return out


def run_session(path: Path, entry: dict, options: dict, dims: dict, inputs: dict, runs: int, graph: bool,
                profile: bool = False, context: Path | None = None):
    """(median ms, first output as fp32, kernel profile or None) of one session on `path`; `context`: a context-once
    variant's context file, run first (once) to make the UNet's extra inputs (its time: CONTEXT_MS)."""
    import onnxruntime as ort

    from sdxl_trt.runtime.contracts import output_shapes
    from sdxl_trt.runtime.ort_cuda import CONV_SEARCH, CUDA_OPTIONS

    so = ort.SessionOptions()
    so.log_severity_level = 3
    library = library_of(path)
    if library is not None:
        so.register_custom_ops_library(str(library))
    for name, value in dims.items():
        so.add_free_dimension_override_by_name(name, value)
    cuda = {**CUDA_OPTIONS, "cudnn_conv_algo_search": CONV_SEARCH, **options}
    if graph:
        cuda["enable_cuda_graph"] = "1"
    session = ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", cuda)])
    if context is not None:
        extra, CONTEXT_MS[str(context)] = run_context(context, {**CUDA_OPTIONS, **options}, inputs, runs)
        inputs = {**inputs, **extra}
    binding = session.io_binding()
    keep = []
    for spec in session.get_inputs():
        value = ort.OrtValue.ortvalue_from_numpy(inputs[spec.name].astype(NP_TYPES[spec.type]), "cuda", 0)
        keep.append(value)
        binding.bind_ortvalue_input(spec.name, value)
    shapes = output_shapes(entry, {k: v.shape for k, v in inputs.items()})
    outputs = []
    for spec in session.get_outputs():
        value = ort.OrtValue.ortvalue_from_shape_and_type(list(shapes[spec.name]), NP_TYPES[spec.type], "cuda", 0)
        outputs.append(value)
        binding.bind_ortvalue_output(spec.name, value)
    for _ in range(3):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append((time.perf_counter() - t) * 1e3)
    kernels = None
    if profile:
        from gpu_pipeline import kernel_profile

        kernels = kernel_profile(lambda: session.run_with_iobinding(binding), lambda: None, top=PROFILE_TOP)
    return round(float(np.median(times)), 2), outputs[0].numpy().astype(np.float32), kernels


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", action="append", required=True, metavar="LABEL=DIR",
                   help="an engine directory with the component optimized (the first one's fp32 file is the reference)")
    p.add_argument("--component", default="vae_decoder", choices=sorted(DIMS))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1, help="measure every case this many times, taking turns (default 1)")
    p.add_argument("--options", nargs="+", choices=sorted(OPTIONS), metavar="SET",
                   help=f"option sets to try on every file (default: per component); any of {sorted(OPTIONS)}")
    p.add_argument("--no-profiles", action="store_true", help="skip the kernel profiles of the shipped and the fastest")
    p.add_argument("--profile-top", type=int, default=PROFILE_TOP, help="kernels listed per profile (default %(default)s)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.rounds < 1 or args.runs < 1:
        p.error(f"--rounds {args.rounds} --runs {args.runs}: each must be at least 1")
    globals()["PROFILE_TOP"] = args.profile_top
    option_sets = {name: OPTIONS[name] for name in (args.options or DEFAULT_OPTIONS[args.component])}
    engines = {label: Path(d) for label, d in (e.split("=", 1) for e in args.engine)}
    first = next(iter(engines.values()))
    entry = entry_of(first, args.component)
    dims = input_dims(entry, {**DIMS[args.component], "h": args.size // 8, "w": args.size // 8})
    inputs = feeds(entry, dims)
    ref_ms, reference, _ = run_session(file_of(first, args.component, False), entry, {}, dims, inputs, args.runs, False)
    import onnxruntime as ort

    from sdxl_trt.runtime.ort_cuda import session_options

    result = {"what": f"{args.component}, one session: ONNX Runtime settings and files (issue 26)",
              "command": shlex.join([Path(sys.executable).name, *sys.argv]),  # option sets' names have spaces
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "onnxruntime": ort.__version__,
              "component": args.component, "dims": dims, "runs": args.runs, "rounds": args.rounds,
              "as shipped": session_options(args.component, dims), "fp32 file, no CUDA graph": {"ms": ref_ms},
              "cases": []}
    try:
        import torch
        result["device"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    cases = [(label, engine, name, options) for label, engine in engines.items() for name, options in option_sets.items()]
    rounds: dict[int, list[float]] = {}
    for turn in range(args.rounds):
        for index, (label, engine, name, options) in enumerate(cases):
            case = {"file": label, "options": name}
            try:
                context = context_of(engine, args.component)
                ms, out, _ = run_session(file_of(engine, args.component, True), entry, options, dims, inputs,
                                         args.runs, True, context=context)
                if context is not None:  # once per image, not per step
                    case["context_ms_once_per_image"] = CONTEXT_MS[str(context)]
                rounds.setdefault(index, []).append(ms)
                diff = out - reference
                case.update(ms=round(float(np.median(rounds[index])), 2),
                            rel_l2_vs_fp32=float(np.linalg.norm(diff) / np.linalg.norm(reference)),
                            max_abs_vs_fp32=float(np.abs(diff).max()), finite=bool(np.isfinite(out).all()))
                if args.rounds > 1:
                    case["ms_rounds"] = rounds[index]
            except Exception as e:
                case["error"] = f"{type(e).__name__}: {e}"[:300]
            if turn == 0:
                result["cases"].append(case)
            elif "error" not in case or "ms" not in result["cases"][index]:
                case.update({k: v for k, v in result["cases"][index].items() if k == "round_errors"})
                result["cases"][index] = case
            else:  # measured in an earlier round: that stays, and the failure is kept beside it
                result["cases"][index].setdefault("round_errors", []).append(case["error"])
            print(json.dumps(case), flush=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    measured = [(c["ms"], i) for i, c in enumerate(result["cases"]) if "ms" in c]
    best = None  # (ms, engine label, options set name)
    if measured:
        ms, index = min(measured)
        best = (ms, cases[index][0], cases[index][2])
    if args.no_profiles:
        return 0
    # keyed by what ran: the first --engine's file with the options the runtime gives it, and the fastest case
    first_label = next(iter(engines))
    profiles = {f"{first_label}, options as shipped": (first, session_options(args.component, dims))}
    if best is not None:
        profiles[f"fastest: {best[1]}, {best[2]}"] = (engines[best[1]], option_sets[best[2]])
    for key, (engine, options) in profiles.items():
        profile = run_session(file_of(engine, args.component, True), entry, options, dims, inputs, 5, True, True,
                              context=context_of(engine, args.component))[2]
        result.setdefault("kernel_profiles", {})[key] = {"file": str(engine), "options": options, "profile": profile}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["kernel_profiles"])[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
