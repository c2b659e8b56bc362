"""Kernel time (CUPTI) of the SDXL ControlNet, its conditioning embedding alone, and the UNet, at batch 2, 1024²,
fp16 in torch eager on this GPU: how much of a ControlNet step is the step-invariant image embedding.

    python benchmarks/controlnet_kernels.py OUT.json     # from the repository root; torch, diffusers, a GPU
"""
import json
import sys

import torch

sys.path.insert(0, "benchmarks")
from gpu_pipeline import kernel_profile  # noqa: E402

from sdxl_trt.export.controlnet_sources import load_controlnet, resolve_controlnet  # noqa: E402
from sdxl_trt.export.sources import load_model  # noqa: E402

model = load_model("random:base", progress=False)
unet = model.unet
net = load_controlnet(resolve_controlnet("random:controlnet"), 0, dict(unet.config))
dev, dt, B = "cuda", torch.float16, 2
unet, net = unet.to(dev, dt).eval(), net.to(dev, dt).eval()
sample = torch.randn(B, 4, 128, 128, device=dev, dtype=dt)
t = torch.tensor([500.0] * B, device=dev)
ctx = torch.randn(B, 77, 2048, device=dev, dtype=dt)
added = {"text_embeds": torch.randn(B, 1280, device=dev, dtype=dt),
         "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * B, device=dev, dtype=dt)}
cond = torch.rand(B, 3, 1024, 1024, device=dev, dtype=dt)
sync = torch.cuda.synchronize
res = {"what": sys.modules[__name__].__doc__, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
with torch.no_grad():
    res["controlnet"] = kernel_profile(lambda: net(sample, t, ctx, controlnet_cond=cond, conditioning_scale=0.8,
                                                   added_cond_kwargs=added, return_dict=False), sync, runs=5, top=15)
    res["cond_embedding"] = kernel_profile(lambda: net.controlnet_cond_embedding(cond), sync, runs=5, top=10)
    res["unet"] = kernel_profile(lambda: unet(sample, t, ctx, added_cond_kwargs=added, return_dict=False), sync,
                                 runs=5, top=10)
json.dump(res, open(sys.argv[1], "w"), indent=1)
for k in ("controlnet", "cond_embedding", "unet"):
    print(k, {x: res[k].get(x) for x in ("kernel_ms", "wall_ms_profiled", "kernels", "error")})
