"""Issue 26: what the VAE decode (1024², one image) gives under other ONNX Runtime settings and files, each against
the fp32 file on the same GPU. One process, one GPU; every session made fresh with ONNX Runtime's CUDA graph, timed
as the median of --runs synchronous runs after 3 warm-up runs (ONNX Runtime synchronises its stream at the end of a
run). Writes JSON (rewritten after every case, so a run cut short keeps what it measured).

    sdxl-trt export --model random:base --components vae_decoder --precision fp32 --out /root/vae
    sdxl-trt optimize /root/vae
    python benchmarks/vae_variants.py --engine shipped=/root/vae [--engine resize16=/root/vae_r16] --out vae.json

Options tried on every file: as shipped (runtime/ort_cuda.py's CUDA_OPTIONS), `fuse_conv_bias` (the convolution's
bias inside cuDNN's graph instead of a separate add), `sdpa_kernel` 16 (unfused attention: the VAE's one attention
has a head of 512, too wide for flash attention, so it runs the memory-efficient kernel), and both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

OPTIONS = {"as shipped": {}, "fuse_conv_bias": {"fuse_conv_bias": "1"}, "sdpa_kernel math": {"sdpa_kernel": "16"},
           "fuse_conv_bias + sdpa_kernel math": {"fuse_conv_bias": "1", "sdpa_kernel": "16"},
           "fuse_conv_bias + sdpa_kernel math + EXHAUSTIVE": {"fuse_conv_bias": "1", "sdpa_kernel": "16",
                                                              "cudnn_conv_algo_search": "EXHAUSTIVE"}}
NP_TYPES = {"tensor(float16)": np.float16, "tensor(float)": np.float32}


def file_of(engine: Path, optimized: bool) -> Path:
    entry = json.loads((engine / "manifest.json").read_text())["components"]["vae_decoder"]
    return engine / (entry["optimized"]["cuda"]["path"] if optimized else entry["precisions"]["fp32"])


def decode(path: Path, options: dict, latent: np.ndarray, runs: int, graph: bool, profile: bool = False):
    """(median ms, output image as fp32, kernel profile or None) of one session on `path`."""
    import onnxruntime as ort

    from sdxl_trt.runtime.ort_cuda import CONV_SEARCH, CUDA_OPTIONS

    so = ort.SessionOptions()
    so.log_severity_level = 3
    for name, value in {"B": 1, "h": latent.shape[2], "w": latent.shape[3]}.items():  # as the runtime's shape sessions
        so.add_free_dimension_override_by_name(name, value)
    cuda = {**CUDA_OPTIONS, "cudnn_conv_algo_search": CONV_SEARCH, **options}
    if graph:
        cuda["enable_cuda_graph"] = "1"
    session = ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", cuda)])
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    x = ort.OrtValue.ortvalue_from_numpy(latent.astype(NP_TYPES[inp.type]), "cuda", 0)
    h, w = latent.shape[2] * 8, latent.shape[3] * 8
    y = ort.OrtValue.ortvalue_from_shape_and_type([1, 3, h, w], NP_TYPES[out.type], "cuda", 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input(inp.name, x)
    binding.bind_ortvalue_output(out.name, y)
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

        kernels = kernel_profile(lambda: session.run_with_iobinding(binding), lambda: None)
    image = y.numpy().astype(np.float32)
    return round(float(np.median(times)), 2), image, kernels


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", action="append", required=True, metavar="LABEL=DIR",
                   help="an engine directory with an optimized VAE decoder (the first one's fp32 file is the reference)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    engines = dict(e.split("=", 1) for e in args.engine)
    latent = np.random.default_rng(0).standard_normal((1, 4, args.size // 8, args.size // 8)).astype(np.float32)
    ref_ms, reference, _ = decode(file_of(Path(next(iter(engines.values()))), False), {}, latent, args.runs, False)
    import onnxruntime as ort

    result = {"what": "VAE decode, one image: ONNX Runtime settings and files (issue 26)",
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "onnxruntime": ort.__version__,
              "size": args.size, "runs": args.runs, "fp32 file, no CUDA graph": {"ms": ref_ms}, "cases": []}
    try:
        import torch
        result["device"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    best = None
    for label, engine in engines.items():
        for name, options in OPTIONS.items():
            case = {"file": label, "options": name}
            try:
                ms, image, _ = decode(file_of(Path(engine), True), options, latent, args.runs, True)
                diff = image - reference
                case.update(ms=ms, rel_l2_vs_fp32=float(np.linalg.norm(diff) / np.linalg.norm(reference)),
                            max_abs_vs_fp32=float(np.abs(diff).max()), finite=bool(np.isfinite(image).all()))
                if best is None or ms < best[0]:
                    best = (ms, engine, options, case)
            except Exception as e:
                case["error"] = f"{type(e).__name__}: {e}"[:300]
            result["cases"].append(case)
            print(json.dumps(case), flush=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    first = next(iter(engines.values()))
    for label, (engine, options) in {"as shipped": (first, {}), "fastest": best[1:3] if best else (first, {})}.items():
        result.setdefault("kernel_profiles", {})[label] = {
            "file": engine, "options": options,
            "profile": decode(file_of(Path(engine), True), options, latent, 5, True, profile=True)[2]}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["kernel_profiles"])[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
