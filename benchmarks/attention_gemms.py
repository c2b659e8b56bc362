"""Issue 26 probes, torch eager fp16 on this GPU, SDXL base UNet (random weights), batch 2, 1024²: kernel time of
(a) all cross-attention K/V projections of the 77-token context (step-invariant), (b) self-attention Q, K, V as three
GEMMs against one packed GEMM, (c) cross-attention K, V as two GEMMs against one packed GEMM.

    python benchmarks/attention_gemms.py OUT.json     # from the repository root; torch, diffusers, a GPU
"""
import json
import sys

import torch

sys.path.insert(0, "benchmarks")
from gpu_pipeline import kernel_profile  # noqa: E402

from sdxl_trt.export.sources import load_model  # noqa: E402

unet = load_model("random:base", progress=False).unet
dev, dt, B = "cuda", torch.float16, 2
unet = unet.to(dev, dt).eval()
ctx = torch.randn(B, 77, 2048, device=dev, dtype=dt)
sync = torch.cuda.synchronize
cross = [m for n, m in unet.named_modules() if n.endswith("attn2")]
selfs = [(n, m) for n, m in unet.named_modules() if n.endswith("attn1")]
tokens = {320: 128 * 128, 640: 64 * 64, 1280: 32 * 32}
hidden = {c: torch.randn(B, t, c, device=dev, dtype=dt) for c, t in tokens.items()}
packed_qkv = [torch.cat([m.to_q.weight, m.to_k.weight, m.to_v.weight]) for _, m in selfs]
packed_kv = [torch.cat([m.to_k.weight, m.to_v.weight]) for m in cross]
res = {"what": sys.modules[__name__].__doc__, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
       "cross_attention_modules": len(cross), "self_attention_modules": len(selfs)}
with torch.no_grad():
    res["cross_kv_separate"] = kernel_profile(lambda: [(m.to_k(ctx), m.to_v(ctx)) for m in cross], sync, runs=5, top=4)
    res["cross_kv_packed"] = kernel_profile(lambda: [torch.nn.functional.linear(ctx, w) for w in packed_kv], sync,
                                            runs=5, top=4)
    res["self_qkv_separate"] = kernel_profile(
        lambda: [(m.to_q(h), m.to_k(h), m.to_v(h)) for (_, m) in selfs for h in [hidden[m.to_q.in_features]]],
        sync, runs=5, top=6)
    res["self_qkv_packed"] = kernel_profile(
        lambda: [torch.nn.functional.linear(hidden[w.shape[1]], w) for w in packed_qkv], sync, runs=5, top=6)
json.dump(res, open(sys.argv[1], "w"), indent=1)
for k in ("cross_kv_separate", "cross_kv_packed", "self_qkv_separate", "self_qkv_packed"):
    print(k, {x: res[k].get(x) for x in ("kernel_ms", "wall_ms_profiled", "kernels", "error")})
