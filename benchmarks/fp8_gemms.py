"""Issue 26 probe: what FP8 (E4M3) GEMMs could save in the SDXL base UNet on this GPU, before any custom op is built.

Every nn.Linear call of one UNet evaluation (random full-size weights, batch 2 = one guided image, 1024²) is recorded
with its shape (M × K → N, bias or not); each distinct shape is then timed by CUPTI kernel time (torch.profiler), in
proportion to how often the UNet calls it, three ways:
  fp16        F.linear in fp16 (cuBLAS), what ONNX Runtime runs today (its MatMul + bias, or fused epilogues);
  fp8 GEMM    torch._scaled_mm on E4M3 operands with per-tensor scales, fp16 out, bias in the epilogue, fast
              accumulation: the GEMM alone, as if the activation arrived already quantized (fused into its producer);
  fp8 + quant the same plus quantizing the activation in its own kernels (amax, scale, cast): the cost where the
              quantization cannot be fused.
Weights are quantized once (per-tensor scale). The relative error of each fp8 output against fp16 is reported too
(random weights: a sanity check of the arithmetic, not of image quality). The totals per UNet evaluation bound what
FP8 transformer GEMMs can take off a 1024² step; attention, convolutions and norms stay as they are.

    python benchmarks/fp8_gemms.py OUT.json     # from the repository root; torch ≥ 2.4, diffusers, a Hopper GPU
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

sys.path.insert(0, "benchmarks")
from gpu_pipeline import kernel_profile  # noqa: E402

from sdxl_trt.export.sources import load_model  # noqa: E402

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor E4M3 quantization: (x / scale as fp8, scale as a float32 scalar tensor)."""
    scale = (x.abs().amax().float() / E4M3_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def recorded_linears(unet, sample, timestep, context, added) -> Counter:
    """(M, K, N, has_bias) of every nn.Linear call in one UNet evaluation, with counts."""
    calls: Counter = Counter()

    def hook(module, inputs, output):
        x = inputs[0]
        calls[(x.numel() // x.shape[-1], module.in_features, module.out_features, module.bias is not None)] += 1

    handles = [m.register_forward_hook(hook) for m in unet.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=added)
    for handle in handles:
        handle.remove()
    return calls


def main(out: str) -> None:
    dev, dt, batch = "cuda", torch.float16, 2
    unet = load_model("random:base", progress=False).unet.to(dev, dt).eval()
    sample = torch.randn(batch, 4, 128, 128, device=dev, dtype=dt)
    context = torch.randn(batch, 77, 2048, device=dev, dtype=dt)
    added = {"text_embeds": torch.randn(batch, 1280, device=dev, dtype=dt),
             "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch, device=dev, dtype=dt)}
    calls = recorded_linears(unet, sample, torch.tensor([999.0] * batch, device=dev), context, added)
    del unet
    torch.cuda.empty_cache()
    sync = torch.cuda.synchronize
    rows, totals = [], Counter()
    for (m, k, n, has_bias), count in sorted(calls.items(), key=lambda item: -item[0][0] * item[0][1] * item[0][2]):
        x = torch.randn(m, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5
        b = torch.randn(n, device=dev, dtype=dt) if has_bias else None
        w8, sw = quantize(w)
        x8, sx = quantize(x)
        row = {"M": m, "K": k, "N": n, "bias": has_bias, "calls_per_unet": count}
        if k % 16 or n % 16:
            row["fp8"] = "skipped: K and N must be multiples of 16"
            rows.append(row)
            continue

        def fp16():
            return F.linear(x, w, b)

        def fp8_gemm():
            return torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, bias=b, out_dtype=dt, use_fast_accum=True)

        def fp8_quant():
            xq, s = quantize(x)
            return torch._scaled_mm(xq, w8.t(), scale_a=s, scale_b=sw, bias=b, out_dtype=dt, use_fast_accum=True)

        reference = fp16().float()
        row["fp8_rel_l2"] = round(float((fp8_gemm().float() - reference).norm() / reference.norm()), 5)
        for label, fn in (("fp16", fp16), ("fp8 GEMM", fp8_gemm), ("fp8 + quant", fp8_quant)):
            profile = kernel_profile(fn, sync, runs=20, top=3)
            row[label + " ms"] = profile.get("kernel_ms")
            if "error" in profile:
                row["error"] = profile["error"]
            elif profile.get("kernel_ms") is not None:
                totals[label] += profile["kernel_ms"] * count
        row["tflops_fp16"] = round(2 * m * k * n / (row["fp16 ms"] * 1e9), 1) if row.get("fp16 ms") else None
        rows.append(row)
        print({key: row.get(key) for key in ("M", "K", "N", "calls_per_unet", "fp16 ms", "fp8 GEMM ms", "fp8 + quant ms",
                                             "fp8_rel_l2")}, flush=True)
    result = {"what": __doc__.split("\n\n")[0], "command": " ".join(["python"] + sys.argv),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "unet_evaluation": "random:base, batch 2 (one guided image), 1024x1024 (latents 128x128)",
              "linear_calls_per_unet": sum(calls.values()),
              "per_unet_ms": {label: round(ms, 2) for label, ms in totals.items()}, "shapes": rows}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["per_unet_ms"]), f"over {result['linear_calls_per_unet']} Linear calls")


if __name__ == "__main__":
    main(sys.argv[1])
