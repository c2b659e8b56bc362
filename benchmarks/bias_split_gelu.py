"""Issue 26: our BiasSplitGelu kernel (kernels/ort_ops/bias_split_gelu.cu) against ONNX Runtime's
com.microsoft.BiasSplitGelu, alone, at the shapes of SDXL's GEGLU at 1024² with CFG (batch 2): 2 x 4096 x 5120
(the 640-channel blocks, 10 per step) and 2 x 1024 x 10240 (the 1280-channel blocks, 60 per step). One process, one
GPU: each operator in a one-node model on the CUDA provider (a CUDA graph), its kernel's GPU time read by CUPTI
(torch.profiler) over --runs runs, the effective bandwidth from the bytes it must move (input read once, output
written once), and the outputs compared with each other and with a float64 reference of the same fp16 inputs.

    python -m sdxl_trt.kernels.ort_ops build /root/ops
    python benchmarks/bias_split_gelu.py --library /root/ops/libsdxl_trt_ops-cuda-*.so --out bsg.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import datetime, timezone
from math import sqrt
from pathlib import Path

import numpy as np

SHAPES = {"640 channels (64² tokens)": (2, 4096, 2560), "1280 channels (32² tokens)": (2, 1024, 5120)}
PER_STEP = {"640 channels (64² tokens)": 10, "1280 channels (32² tokens)": 60}  # GEGLUs of an SDXL UNet step


def reference(x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """In float64 (torch on the GPU: erf over 40 M values)."""
    import torch

    v = torch.from_numpy(x).cuda().double() + torch.from_numpy(bias).cuda().double()
    half = v.shape[-1] // 2
    a, g = v[..., :half], v[..., half:]
    return (a * 0.5 * g * (1 + torch.erf(g / sqrt(2)))).cpu().numpy()


def run(domain: str, library: str | None, x: np.ndarray, bias: np.ndarray, runs: int) -> tuple[np.ndarray, dict]:
    import onnxruntime as ort
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_pipeline import kernel_profile

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if library:
        so.register_custom_ops_library(library)
    from sdxl_trt.kernels.ort_ops import bias_split_gelu_model

    session = ort.InferenceSession(bias_split_gelu_model(domain), so, providers=[("CUDAExecutionProvider",
                                                                   {"enable_cuda_graph": "1"})])
    binding = session.io_binding()
    keep = [ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0), ort.OrtValue.ortvalue_from_numpy(bias, "cuda", 0)]
    binding.bind_ortvalue_input("x", keep[0])
    binding.bind_ortvalue_input("bias", keep[1])
    y = ort.OrtValue.ortvalue_from_shape_and_type([*x.shape[:-1], x.shape[-1] // 2], np.float16, "cuda", 0)
    binding.bind_ortvalue_output("y", y)
    for _ in range(3):
        session.run_with_iobinding(binding)
    profile = kernel_profile(lambda: session.run_with_iobinding(binding), torch.cuda.synchronize, runs=runs)
    return y.numpy(), profile


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--library", required=True, help="the custom-op library (python -m sdxl_trt.kernels.ort_ops build)")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import onnxruntime as ort
    import torch

    result = {"what": "BiasSplitGelu alone: ONNX Runtime's kernel vs ours (issue 26)",
              "command": shlex.join([Path(sys.executable).name, *sys.argv]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "onnxruntime": ort.__version__,
              "device": torch.cuda.get_device_name(0), "runs": args.runs, "shapes": {}}
    rng = np.random.default_rng(0)
    step_ms = {"onnxruntime": 0.0, "ours": 0.0}
    for label, (b, s, half) in SHAPES.items():
        x = (rng.standard_normal((b, s, 2 * half)) * 2).astype(np.float16)
        bias = (rng.standard_normal(2 * half) * 0.5).astype(np.float16)
        ref = reference(x, bias)
        moved = x.nbytes + x.nbytes // 2  # read the input, write half of it
        row = {"input": list(x.shape), "bytes_moved": moved}
        outs = {}
        for name, domain, library in (("onnxruntime", "com.microsoft", None), ("ours", "sdxl_trt", args.library)):
            out, profile = run(domain, library, x, bias, args.runs)
            outs[name] = out.astype(np.float64)
            ms = profile.get("kernel_ms")
            row[name] = {"kernel_ms": ms, "profile": profile,
                         "GB_per_s": round(moved / (ms * 1e-3) / 1e9, 1) if ms else None,
                         "rel_l2_vs_float64": float(np.linalg.norm(outs[name] - ref) / np.linalg.norm(ref)),
                         "max_abs_vs_float64": float(np.abs(outs[name] - ref).max())}
            if ms:
                step_ms[name] += ms * PER_STEP[label]
        row["ours_vs_onnxruntime"] = {
            "rel_l2": float(np.linalg.norm(outs["ours"] - outs["onnxruntime"]) / np.linalg.norm(outs["onnxruntime"])),
            "max_abs": float(np.abs(outs["ours"] - outs["onnxruntime"]).max())}
        if row["onnxruntime"]["kernel_ms"] and row["ours"]["kernel_ms"]:
            row["speedup"] = round(row["onnxruntime"]["kernel_ms"] / row["ours"]["kernel_ms"], 2)
        result["shapes"][label] = row
        print(json.dumps({label: {k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items()
                                                                        if kk != "profile"}) for k, v in row.items()}}),
              flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    result["per_unet_step_ms"] = {k: round(v, 3) for k, v in step_ms.items()}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["per_unet_step_ms"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
