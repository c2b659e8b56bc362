"""sdxl-trt (`ort-cuda`) against diffusers eager fp16, in one process on one GPU: text-to-image end to end (prompt →
PIL image), plus UNet step, VAE decode, text encoding, peak device memory and cold start. Writes JSON.

    sdxl-trt export --model random:base --refiner random:refiner --out /root/full --precision fp32
    sdxl-trt optimize /root/full
    python benchmarks/gpu_pipeline.py --engine /root/full --out benchmarks/results/h100-sdxl-base-1024.json

Both contenders get the same weights (the built-in random:base: diffusers' copy is built from the same seeds on the
CPU in fp32, then moved to the GPU in fp16; its VAE upcasts to fp32 for decoding, as it ships), the same prompt,
size, steps, sampler (Euler) and guidance. Every figure is a median of --runs runs after --warmup runs, timed with
the device synchronised. sdxl-trt runs with each CUDA graph mode (loop / step / off), which shows the launch
overhead the graphs remove. Cold start runs last, in child processes: `Pipeline.load` (file hashes checked) → first
image, once with an empty cache (kernels, file hashes) and once with it filled. The JSON is rewritten after each
part (`complete` says whether all ran), so a run cut short keeps what it measured. `--profile` adds the GPU
kernels of one UNet step and one decode (CUPTI, through torch.profiler).
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from sdxl_trt.runtime.bench import PROMPT, Timer, cold_starts, device_used_gib, git_state, median_ms


def time_calls(fn, runs: int, warmup: int, sync) -> list[float]:
    return Timer(runs, warmup, sync)(fn)[0]


def kernel_profile(fn, sync, runs: int = 3, top: int = 12) -> dict:
    """GPU time per kernel of `fn` (averaged over `runs`), recorded by CUPTI through torch.profiler, which sees every
    kernel of the process (ONNX Runtime's and ours); wall time alongside, so the gaps between kernels show."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        sync()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(runs):
                fn()
            sync()
        wall = (time.perf_counter() - start) * 1e3 / runs
        rows = []
        for event in prof.key_averages():
            us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
            if us > 0:
                rows.append({"kernel": event.key[:160], "ms": round(us / runs / 1e3, 4), "calls": event.count // runs})
    except Exception as e:  # no CUPTI on this machine: say so instead of failing the benchmark
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    rows.sort(key=lambda r: -r["ms"])
    busy = sum(r["ms"] for r in rows)
    return {"wall_ms_profiled": round(wall, 3), "kernel_ms": round(busy, 4), "kernels": sum(r["calls"] for r in rows),
            "top": rows[:top]}


def vae_variants(args, pipe, latents) -> dict:
    """The "pil" decode with other session settings (a fresh VAE session each), to show what each one buys."""
    from sdxl_trt.runtime import ort_cuda

    default, mode = dict(ort_cuda.CUDA_OPTIONS), pipe.backend.cuda_graphs
    out = {}
    for label, change, graphs in (("as shipped", {}, "step"), ("no CUDA graph", {}, "off"),
                                  ("prefer_nhwc 0", {"prefer_nhwc": "0"}, "step"),
                                  ("cuDNN HEURISTIC search", {"cudnn_conv_algo_search": "HEURISTIC"}, "step")):
        ort_cuda.CUDA_OPTIONS.update(change)
        pipe.backend.cuda_graphs = graphs
        pipe.backend.release("vae_decoder")
        try:
            out[label] = median_ms(time_calls(lambda: pipe.decode_uint8(latents), args.runs, 2,
                                              pipe.backend.stream.synchronize))
        except Exception as e:
            out[label] = f"{type(e).__name__}: {e}"[:200]
        ort_cuda.CUDA_OPTIONS.clear()
        ort_cuda.CUDA_OPTIONS.update(default)
        print(f"VAE decode, {label}: {out[label]}", flush=True)
    pipe.backend.cuda_graphs = mode
    pipe.backend.release("vae_decoder")
    return out


def bench_ours(args, width: int, height: int) -> list[dict]:
    from sdxl_trt.runtime import Pipeline
    from sdxl_trt.runtime.cuda import BufferPool, DeviceBuffer
    from sdxl_trt.runtime.images import to_pil

    before = device_used_gib()
    pipe = Pipeline.load(args.engine, backend="ort-cuda")
    stream = pipe.backend.stream
    call = dict(height=height, width=width, num_inference_steps=args.steps, guidance_scale=args.guidance,
                sampler="euler", seed=0, output_type="pil", progress=False)
    cases = []
    for mode in args.cuda_graphs:
        pipe.backend.cuda_graphs = mode
        stages = {"text": [], "base": [], "vae": []}

        def run(stages=stages):
            result = pipe(PROMPT, **call)
            for k in stages:
                stages[k].append(result.timings[k])

        samples = time_calls(run, args.runs, args.warmup, stream.synchronize)
        runs = {k: v[-args.runs:] for k, v in stages.items()}
        cases.append({"contender": "sdxl-trt", "backend": "ort-cuda", "cuda_graphs": mode,
                      "last_run": pipe.backend.device_loop.last_run, "e2e_ms": median_ms(samples),
                      "text_ms": median_ms(runs["text"]), "denoise_ms": median_ms(runs["base"]),
                      "denoise_per_step_ms": round(median_ms(runs["base"]) / args.steps, 2),
                      "vae_stage_ms": median_ms(runs["vae"])})
        print(f"sdxl-trt ({mode}): {cases[-1]}", flush=True)
    pipeline_gib = device_used_gib() - before  # what the pipeline itself holds (the parts below add sessions)

    # the UNet alone (batch 2: classifier-free guidance), on device buffers: the session for this shape with ONNX
    # Runtime's CUDA graph (what "step" runs), and the session for any shape without (what "off" runs)
    rng = np.random.default_rng(0)
    h, w = height // 8, width // 8
    session = pipe.backend.session("unet")
    arrays = {"sample": rng.standard_normal((2, 4, h, w)).astype(session.dtype("sample")),
              "timestep": np.array([500, 500], np.float32),
              "encoder_hidden_states": rng.standard_normal((2, 77, 2048)).astype(session.dtype("encoder_hidden_states")),
              "text_embeds": rng.standard_normal((2, 1280)).astype(session.dtype("text_embeds")),
              "time_ids": np.array([[height, width, 0, 0, height, width]] * 2, np.float32)}
    buffers = {k: DeviceBuffer(a.nbytes) for k, a in arrays.items()}
    for k, a in arrays.items():
        buffers[k].upload(a, stream)
    out = DeviceBuffer(arrays["sample"].nbytes)
    context_buffers = BufferPool()

    def unet_inputs(session) -> dict:
        """The UNet's bound inputs; an optimized UNet's context file (context_stage.py) run into buffers of its own
        first, as the device loop does once per call (its outputs are the step's K/V inputs)."""
        inputs = {k: (buffers[k].ptr, a.shape, a.dtype) for k, a in arrays.items()}
        if getattr(session, "context", None) is not None:
            inputs.update(session.context.into(context_buffers, inputs["encoder_hidden_states"]))
        return inputs

    pipe.backend.cuda_graphs = "step"
    unet = {}
    for label, graph_id in (("graph", 1000), ("plain", -1)):
        if label == "graph":
            session = pipe.backend.loop_session("unet", {k: a.shape for k, a in arrays.items()})
            if not session.cuda_graph:
                unet[label] = None  # ONNX Runtime refused CUDA graphs for this file (see the log)
                continue
        else:
            session = pipe.backend.session("unet")
        binding = session.new_binding()
        session.bind(binding, unet_inputs(session),
                     {"noise_pred": (out.ptr, arrays["sample"].shape, session.output_dtypes["noise_pred"])})
        samples = time_calls(lambda s=session, b=binding, g=graph_id: s.run_bound(b, g), args.runs * 4, 3,
                             stream.synchronize)
        unet[label] = median_ms(samples)

    # the VAE alone, latents → PIL image as the pipeline decodes for "pil" (NaN/Inf checked, on the device), and the
    # host path ("np": the fp16 image copied back, checked and scaled by numpy)
    latents = rng.standard_normal((1, 4, h, w)).astype(np.float32)
    decode = median_ms(time_calls(lambda: to_pil(pipe.decode_uint8(latents)), args.runs, 1, stream.synchronize))
    decode_host = median_ms(time_calls(lambda: pipe.decode(latents), args.runs, 1, stream.synchronize))
    vae = pipe.backend.decode_session("vae_decoder", latents.shape)
    vae_file = f"{vae.file}{' (fp32 fallback)' if vae.file == 'fp32' else ''}, CUDA graph {vae.cuda_graph}"
    profiles = {}
    if args.profile:  # which kernels the GPU spends the time in (CUPTI through torch.profiler: ONNX Runtime's too)
        unet_session = pipe.backend.loop_session("unet", {k: a.shape for k, a in arrays.items()})
        binding = unet_session.new_binding()
        unet_session.bind(binding, unet_inputs(unet_session),
                          {"noise_pred": (out.ptr, arrays["sample"].shape, unet_session.output_dtypes["noise_pred"])})
        profiles = {"unet_step": kernel_profile(lambda: unet_session.run_bound(binding), stream.synchronize),
                    "vae_decode": kernel_profile(lambda: pipe.decode_uint8(latents), stream.synchronize),
                    "vae_decode_variants_ms": vae_variants(args, pipe, latents)}
    peak = device_used_gib() - before
    for case in cases:
        case.update({"unet_step_ms": unet["graph"], "unet_step_plain_ms": unet["plain"], "vae_decode_ms": decode,
                     "vae_decode_host_ms": decode_host, "vae_file": vae_file, "peak_device_gib": round(pipeline_gib, 2),
                     "device_gib_with_benchmark_sessions": round(peak, 2),
                     **({"kernel_profiles": profiles} if profiles else {})})
    print(f"sdxl-trt: UNet step {unet} ms, VAE decode {decode} ms (host path {decode_host} ms; {vae_file}), "
          f"device memory {pipeline_gib:.1f} GiB ({peak:.1f} with the extra sessions)", flush=True)
    stream.synchronize()
    for b in [*buffers.values(), out, *context_buffers.values()]:
        b.free()
    return cases  # the pipeline goes with this frame: ONNX Runtime frees its sessions' memory


def bench_diffusers(args, width: int, height: int) -> dict:
    import torch

    from sdxl_trt.export.reference import diffusers_pipeline
    from sdxl_trt.export.sources import load_model

    model = load_model(args.model, progress=False)  # CPU fp32 from the seeds the export used: the same weights
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = device_used_gib()
    pipe = diffusers_pipeline(model).to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    del model
    gc.collect()
    sync = torch.cuda.synchronize
    generator = torch.Generator("cuda")

    def run():
        generator.manual_seed(0)
        with torch.no_grad():
            pipe(PROMPT, height=height, width=width, num_inference_steps=args.steps, guidance_scale=args.guidance,
                 generator=generator)  # PIL images, as ours

    e2e = median_ms(time_calls(run, args.runs, args.warmup, sync))
    peak = device_used_gib() - before
    with torch.no_grad():
        text = median_ms(time_calls(lambda: pipe.encode_prompt(PROMPT, device="cuda", do_classifier_free_guidance=True),
                                    args.runs, 1, sync))
        h, w = height // 8, width // 8
        sample = torch.randn(2, 4, h, w, device="cuda", dtype=torch.float16)
        context = torch.randn(2, 77, 2048, device="cuda", dtype=torch.float16)
        added = {"text_embeds": torch.randn(2, 1280, device="cuda", dtype=torch.float16),
                 "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * 2, device="cuda",
                                          dtype=torch.float16)}
        t = torch.tensor(500.0, device="cuda")
        unet = median_ms(time_calls(lambda: pipe.unet(sample, t, context, added_cond_kwargs=added, return_dict=False),
                                    args.runs * 4, 2, sync))
        latents = torch.randn(1, 4, h, w, device="cuda", dtype=torch.float16)

        def decode():  # as the pipeline decodes: the VAE upcast to fp32 (force_upcast), then the image processor
            pipe.upcast_vae()
            image = pipe.vae.decode(latents.float() / pipe.vae.config.scaling_factor, return_dict=False)[0]
            pipe.vae.to(dtype=torch.float16)
            return pipe.image_processor.postprocess(image, output_type="pil")

        vae = median_ms(time_calls(decode, args.runs, 1, sync))
    case = {"contender": "diffusers", "mode": "eager fp16, VAE upcast to fp32", "e2e_ms": e2e, "text_ms": text,
            "unet_step_ms": unet, "vae_decode_ms": vae, "peak_device_gib": round(peak, 2),
            "torch_max_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    print(f"diffusers: {case}", flush=True)
    return case


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True, help="engine directory exported from --model and optimized for cuda")
    p.add_argument("--model", default="random:base", help="the source of that export, for diffusers (a built-in)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--size", default="1024x1024")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cuda-graphs", nargs="+", default=["step", "off", "loop"], choices=["step", "loop", "off"],
                   help="sdxl-trt's CUDA graph modes to time, in this order (loop last: a failed capture falls back)")
    p.add_argument("--git", help="the commit measured, where the working tree has no .git (the device machine)")
    p.add_argument("--skip", nargs="*", default=[], choices=["diffusers", "cold-start"])
    p.add_argument("--profile", action="store_true",
                   help="record the GPU kernels of one UNet step and one decode (skips diffusers: see the JSON)")
    args = p.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    from sdxl_trt.runtime import tensorrt_api

    device = tensorrt_api.gpu()
    common = {"width": width, "height": height, "steps": args.steps, "batch": 1, "guidance": args.guidance,
              "sampler": "euler"}
    git = git_state() if not args.git else {"commit": args.git, "dirty": False}
    result = {"device": device.name if device else None,
              "compute_capability": device.compute_capability if device else None,
              "command": shlex.join([sys.executable, *sys.argv]),
              "git": git, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "runs": args.runs, "warmup": args.warmup, "prompt": PROMPT, "cases": [], "cold_start": [],
              "complete": False}

    def save() -> None:  # after every part, so that a run cut short still leaves what it measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    if args.profile and "diffusers" not in args.skip:  # on the H100: diffusers 4.2 s after profiling, 3.0-3.6 s without
        args.skip.append("diffusers")
        result["skipped"] = {"diffusers": "--profile: CUPTI stays attached to the process and slows torch's launches"}
    result["cases"] = [{**c, **common} for c in bench_ours(args, width, height)]
    save()
    gc.collect()
    if "diffusers" not in args.skip:
        reference = {**bench_diffusers(args, width, height), **common}
        result["cases"].append(reference)
        result["speedup_vs_diffusers"] = {c["cuda_graphs"]: round(reference["e2e_ms"] / c["e2e_ms"], 2)
                                          for c in result["cases"] if c["contender"] == "sdxl-trt"}
        save()
    if "cold-start" not in args.skip:
        gc.collect()  # the children need the device memory the contenders above held
        result["cold_start"] = cold_starts(args.engine, "ort-cuda", width, height, args.steps)
    result["complete"] = True
    save()
    print(json.dumps(result.get("speedup_vs_diffusers", {})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
