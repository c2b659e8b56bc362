"""`sdxl-trt`: the command line (subcommands as in ARCHITECTURE.md).

Exit status: 0 done; 2 a user error (one line on stderr naming the input and what is accepted); 4 an exported model
failed verification; 130 interrupted (Ctrl-C or SIGTERM: what was being written is removed).
Bugs keep their traceback.
This module imports nothing heavy at start-up: torch is imported only by the subcommands that need it.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
from pathlib import Path
from importlib import metadata

from .errors import UserError, VerificationError

MODEL_HELP = ("SRC: a diffusers SDXL folder, a single-file SDXL .safetensors checkpoint, random:base, "
              "random:refiner (full size, random weights) or tiny:base, tiny:refiner (tiny, for tests)")
DEMO_OUT = "sdxl-trt-demo.png"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cmd_serve(args) -> int:
    from .validate import finite, resident_options

    resident = resident_options(args.backend, args.buckets, args.max_device_memory, args.devices)
    try:
        import uvicorn

        from .server import Limits, check_address, create_app
    except ImportError as e:
        raise UserError(f"serve needs the serve extra ({e.name} is missing): pip install 'sdxl-trt[serve]'") from None
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue), ("--max-n", args.max_n),
                        ("--max-steps", args.max_steps)):
        if value < 1:
            raise UserError(f"{flag} {value}: expected at least 1")
    finite(args.max_wait_ms, "--max-wait-ms", low=0)
    for flag, value in (("--timeout-s", args.timeout_s), ("--max-body-mb", args.max_body_mb)):
        if finite(value, flag) <= 0:
            raise UserError(f"{flag} {value:g}: expected a number above 0")
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: expected 1-65535")
    check_address(args.host, args.port)  # taken or not ours: said now, not by uvicorn after the load (status 3)
    from .manifest import load_manifest

    load_manifest(args.dir)  # a missing or broken directory: said before the server starts
    limits = Limits(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                    timeout_s=args.timeout_s, max_n=args.max_n, max_steps=args.max_steps,
                    max_body_bytes=int(args.max_body_mb * 2**20), lora_dir=args.lora_dir)
    if args.lora_dir and not Path(args.lora_dir).is_dir():
        raise UserError(f"--lora-dir {args.lora_dir}: not a folder")
    if args.ray:
        import json

        from .serve_ray import serve_with_ray

        if args.replicas < 1:
            raise UserError(f"--replicas {args.replicas}: expected at least 1")
        autoscaling = None
        if args.autoscaling:
            try:
                autoscaling = json.loads(args.autoscaling)
            except json.JSONDecodeError as e:
                raise UserError(f"--autoscaling: not JSON ({e})") from None
            if not isinstance(autoscaling, dict):
                raise UserError("--autoscaling: expected a JSON object (Ray Serve's autoscaling_config)")
        serve_with_ray(str(args.dir), args.backend, limits, args.host, args.port, args.replicas, autoscaling, resident,
                       args.gpus_per_replica)
        return 0
    elif args.replicas != 1 or args.autoscaling or args.gpus_per_replica != 1:
        raise UserError("--replicas, --autoscaling and --gpus-per-replica go with --ray")
    from .pipeline import Pipeline

    # loaded before the server starts, so that a broken directory or a backend that cannot run here is one line and
    # exit status 2; the warm-up runs once the server listens (/health answers 503 meanwhile)
    pipe = Pipeline.load(args.dir, backend=args.backend, **resident)
    app = create_app(args.dir, backend=args.backend, limits=limits, pipeline=pipe)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _cmd_bench(args) -> int:
    from .bench import run

    if args.runs < 1 or args.warmup < 0:
        raise UserError(f"--runs {args.runs} --warmup {args.warmup}: expected at least one run and no negative warm-up")
    run(args)
    print(f"wrote {args.out}")
    return 0


def _version() -> str:
    try:
        return metadata.version("sdxl-trt")
    except metadata.PackageNotFoundError:
        return "unknown"


def _cmd_export(args) -> int:
    if not args.model:
        raise UserError(f"--model is required; {MODEL_HELP}")
    from ..export.engine_dir import export_engine_dir

    report = export_engine_dir(args.model, args.out, refiner=args.refiner, vae=args.vae, components=args.components,
                               precision=args.precision, verify=args.verify, force=args.force,
                               allow_pickle=args.allow_pickle, controlnets=args.controlnet)
    for line in report.verify_lines:
        print(line)
    print(report.summary())
    return 0


def _cmd_refit(args) -> int:
    from ..export.refit import refit_engine_dir

    report = refit_engine_dir(args.dir, args.out, args.model, refiner=args.refiner, verify=args.verify,
                              force=args.force, allow_pickle=args.allow_pickle)
    print(report.summary())
    return 0


def _cmd_optimize(args) -> int:
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"sdxl-trt optimize needs {' and '.join(missing)}: pip install 'sdxl-trt[export,gpu]' "
                        "(or [export,cpu]; optimizing needs no GPU)")
    from ..export.optimize import optimize_engine_dir

    print(optimize_engine_dir(args.dir, target=args.target, components=args.components, jobs=args.jobs,
                              custom_ops=args.custom_ops, context_once=not args.no_context_once).summary())
    return 0


def _cmd_build(args) -> int:
    from pathlib import Path

    from .engine_build import BuildOptions, build_engines
    from .manifest import load_manifest
    from .profiles import parse_profiles

    manifest = load_manifest(args.dir)
    bounds = [entry["bounds"] for entry in manifest.components.values()]
    max_windows = max(b["prompt_windows"][1] for b in bounds)
    pixels = (max(b["pixels"][0] for b in bounds), min(b["pixels"][1] for b in bounds))
    most = min(b["batch"][1] for b in bounds)  # images per call the export is meant for (its contracts' bounds)
    if args.max_batch > most:
        raise UserError(f"--max-batch {args.max_batch}: this export's models are meant for at most {most} images a call")
    profiles = parse_profiles(args.profiles, args.static, args.max_batch, max_windows, pixels)
    options = BuildOptions(args.backend, profiles, opt_level=args.opt_level,
                           workspace_mib=args.workspace, refittable=args.refittable, strip_weights=args.strip_weights,
                           timing_cache=Path(args.timing_cache) if args.timing_cache else None,
                           vae_precision=args.vae_precision)
    print(build_engines(args.dir, options, components=args.components).summary())
    if args.verify:
        from .engine_verify import verify_engines

        for line in verify_engines(args.dir, args.backend, args.components):
            print(line)
    return 0


def _cmd_inspect(args) -> int:
    from .inspect import inspect_dir

    print(inspect_dir(args.dir, as_json=args.json))
    return 0


def _cmd_generate(args) -> int:
    if args.backend != "ort-cpu":
        from .cuda import start_in_background

        start_in_background()
    from .generate import generate

    for path in generate(args):
        print(f"wrote {path}")
    return 0


def _cmd_demo(args) -> int:
    from ..export.demo import run_demo

    path = run_demo(args.out, prompt=args.prompt, steps=args.steps, seed=args.seed, size=args.size)
    print(f"wrote {path}")
    return 0


def _resident_flags(parser) -> None:
    """What ort-cuda keeps on the GPU (generate, serve), and --verbose."""
    parser.add_argument("--buckets", metavar="LIST", help="ort-cuda: comma-separated WxH sizes whose sessions and "
                        "CUDA graphs are made for their shape and kept on the GPU (serve makes them all before it "
                        "answers); other sizes run on one session for any shape. Default: the nine SDXL buckets "
                        "(1024x1024, 1152x896, 896x1152, 1216x832, 832x1216, 1344x768, 768x1344, 1536x640, 640x1536) "
                        "and the model's size")
    parser.add_argument("--max-device-memory", type=float, metavar="GIB", help="ort-cuda: most GPU memory the "
                        "kept sessions and weights may hold; the least recently used sessions are freed first "
                        "(default: the GPU's free memory at the start less 10%% of the GPU, at least 2 GiB)")
    parser.add_argument("--devices", metavar="LIST", help="ort-cuda: comma-separated GPU ids (default 0). With "
                        "several, one guided image runs its guidance halves in parallel (one per GPU) and a batch "
                        "is split across them; the text encoders and the VAE run on the first")
    parser.add_argument("--verbose", action="store_true", help="log what happens (sessions made and freed, "
                        "timings) and show ONNX Runtime's warnings")


def typed_options(argv: list[str]) -> set[str]:
    """The destinations of the options typed in `argv`, not filled in by a default: what `generate --from-png`'s
    file must not overrule. argv is parsed again with every subcommand's defaults suppressed (argparse has no public
    way to ask, hence its `_actions`)."""
    parser = build_parser()
    typed = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                for option in command._actions:
                    option.default = argparse.SUPPRESS
                    typed.add(option.dest)
    return typed & set(vars(parser.parse_args(argv)))


def build_parser() -> argparse.ArgumentParser:
    from .backends import BACKENDS, CUDA_GRAPH_MODES
    from .bench import SWEEPS

    p = _Parser(prog="sdxl-trt", description="Stable Diffusion XL as exported engines and a lean runtime.")
    p.add_argument("--version", action="version", version=f"sdxl-trt {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    e = sub.add_parser("export", help="trace SDXL to ONNX into an engine directory")
    e.add_argument("--model", metavar="SRC", help=MODEL_HELP)
    e.add_argument("--out", metavar="DIR", required=True, help="engine directory to write")
    e.add_argument("--refiner", metavar="SRC", help="refiner weights to export beside the base")
    e.add_argument("--vae", metavar="SRC", help="replacement VAE (e.g. an fp16-safe one)")
    e.add_argument("--controlnet", metavar="SRC", action="append",
                   help="a ControlNet for the base model, once per net (controlnet_0, controlnet_1, … in this order): "
                        "a diffusers ControlNetModel folder, a single-file ControlNet .safetensors, tiny:controlnet or "
                        "random:controlnet; the base UNet is also exported as unet_control, which takes the residuals")
    e.add_argument("--components", nargs="+", metavar="NAME",
                   help="subset of clip_l clip_g unet unet_refiner vae_decoder vae_encoder (with --controlnet: "
                        "controlnet, unet_control)")
    e.add_argument("--precision", choices=["fp32", "fp16"], default="fp16",
                   help="fp32: model.onnx only; fp16 (default): model.onnx and model.fp16.onnx for GPU backends")
    e.add_argument("--verify", action="store_true",
                   help="run every file on ONNX Runtime CPU against torch at two shapes and fail beyond tolerance")
    e.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    e.add_argument("--allow-pickle", action="store_true",
                   help="accept pickle checkpoints (.ckpt/.pt/.bin), which can run code when loaded")
    e.set_defaults(func=_cmd_export)

    r = sub.add_parser("refit", help="a fine-tune of the model DIR was exported from, as a new engine directory made "
                       "from DIR's ONNX files (no tracing; same architecture, checked)")
    r.add_argument("dir", metavar="DIR", help="engine directory written by `sdxl-trt export`")
    r.add_argument("--model", metavar="SRC", required=True,
                   help="the fine-tuned weights (diffusers folder or single-file .safetensors) of DIR's base or refiner")
    r.add_argument("--refiner", metavar="SRC", help="fine-tuned refiner weights as well")
    r.add_argument("--out", metavar="DIR", required=True, help="engine directory to write")
    r.add_argument("--verify", action="store_true", help="check the fp16 files against torch too (the fp32 files "
                   "always are)")
    r.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    r.add_argument("--allow-pickle", action="store_true",
                   help="accept pickle checkpoints (.ckpt/.pt/.bin), which can run code when loaded")
    r.set_defaults(func=_cmd_refit)

    o = sub.add_parser("optimize", help="fused fp16 ONNX files for ONNX Runtime's CUDA provider (backend ort-cuda)")
    o.add_argument("dir", metavar="DIR", help="engine directory written by `sdxl-trt export`")
    o.add_argument("--target", choices=["cuda"], default="cuda", help="what to optimize for (default and only: cuda)")
    o.add_argument("--components", nargs="+", metavar="NAME", help="optimize only these (default: every exported one)")
    o.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="optimize N components at once in worker processes (default 1; each full-size UNet needs a "
                        "few GB of RAM)")
    o.add_argument("--custom-ops", action="store_true",
                   help="run the UNets' GEGLU on sdxl-trt's own CUDA kernel (an ONNX Runtime custom-op library built "
                        "into DIR/ops/ here: needs nvcc and ONNX Runtime's C API header, see "
                        "`python -m sdxl_trt.kernels.ort_ops fetch-headers`); without it, files made with it are made "
                        "again without")
    o.add_argument("--no-context-once", action="store_true",
                   help="keep the UNets' cross-attention K/V projections of the prompt in every step (by default they "
                        "move into a context file run once per image: the same numbers, about 0.75 ms less per step "
                        "on an H200); files made the other way are made again")
    o.set_defaults(func=_cmd_optimize)

    b = sub.add_parser("build", help="build TensorRT / TensorRT-RTX engines from an engine directory's ONNX files")
    b.add_argument("dir", metavar="DIR", help="engine directory written by `sdxl-trt export` (with --precision fp16)")
    b.add_argument("--backend", choices=["tensorrt", "tensorrt-rtx"], required=True,
                   help="tensorrt: for this machine's GPU; tensorrt-rtx: for every GPU it supports, built without one")
    b.add_argument("--profiles", metavar="LIST", help="comma-separated WxH sizes, each an exact profile, and `dynamic` "
                   "(512-1536 px, multiples of 64) or `dynamic:LO-HI`; default: the 9 SDXL buckets + dynamic")
    b.add_argument("--static", metavar="WxH", help="one exact shape instead: --max-batch images with guidance, "
                   "prompts of up to 77 tokens (fastest; nothing else runs)")
    b.add_argument("--max-batch", type=int, default=4, help="most images per call (default 4; the UNet sees twice as many "
                   "under classifier-free guidance)")
    b.add_argument("--components", nargs="+", metavar="NAME", help="build only these (default: every exported one)")
    b.add_argument("--opt-level", type=int, metavar="0-5", help="TensorRT's builder optimization level (its default: 3)")
    b.add_argument("--workspace", type=int, metavar="MIB", help="cap on the builder's scratch memory on the GPU, in MiB")
    b.add_argument("--timing-cache", metavar="PATH", help="TensorRT timing cache to read and update (default: "
                   "DIR/engines/tensorrt/<sm>-<gpu>.timing-cache)")
    b.add_argument("--refittable", action="store_true", help="engines whose weights can be replaced at load "
                   "(fine-tunes, LoRA) at some cost in speed")
    b.add_argument("--strip-weights", action="store_true", help="leave the weights out of the engine files; they are "
                   "refitted from the ONNX files at load (with --refittable: from any fine-tune's ONNX)")
    b.add_argument("--vae-precision", choices=["auto", "fp16", "fp32", "bf16"], default="auto",
                   help="auto (default): fp16 if the export has an fp16 VAE (an fp16-safe one), else fp32 with TF32; "
                   "bf16: fp32's range at half the memory traffic (a bf16 ONNX file is derived from the fp32 one)")
    b.add_argument("--verify", action="store_true", help="then run each engine and ONNX Runtime on the same inputs "
                   "(one per profile) on this machine and compare them through polygraphy; one outside its tolerance "
                   "is named and the exit status is 4 (results in the manifest, shown by inspect)")
    b.set_defaults(func=_cmd_build)

    i = sub.add_parser("inspect", help="what an engine directory holds and whether its engines run on this machine")
    i.add_argument("dir", metavar="DIR")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(func=_cmd_inspect)

    g = sub.add_parser("generate", help="text-to-image, img2img and inpainting from an engine directory "
                       "(ONNX Runtime CPU, or engines built by `sdxl-trt build`)")
    g.add_argument("dir", metavar="DIR", help="engine directory written by `sdxl-trt export`")
    g.add_argument("prompt", metavar="PROMPT", nargs="?", help="the prompt (or --prompts FILE; not both)")
    g.add_argument("--prompts", metavar="FILE", help="one prompt per line (UTF-8)")
    g.add_argument("--from-png", metavar="PNG", help="run again what made this PNG (written by sdxl-trt generate or "
                   "serve): its prompt, seed, size, steps, sampler, guidance, … ; flags given beside it override the "
                   "file's values (the backend is this command's)")
    g.add_argument("--negative", default="", help="negative prompt (empty: zero negative conditioning on the base)")
    g.add_argument("--size", help="WxH in pixels, multiples of 8 (default: --init-image's size, else the first "
                   "--control image's, rounded down to multiples of 8; else the model's, 1024x1024 for SDXL)")
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance", type=float, help="classifier-free guidance; ≤ 1 turns it off "
                   "(default 5.0; 7.5 when inpainting, as diffusers)")
    g.add_argument("--guidance-rescale", type=float, default=0.0)
    g.add_argument("--sampler", default="euler", help="euler, euler_a, heun, dpmpp_2m, dpmpp_2m_karras, "
                   "dpmpp_sde_karras, ddim, lcm, tcd")
    g.add_argument("--spacing", choices=["leading", "trailing", "linspace"], help="timestep spacing "
                   "(default: the model's scheduler config)")
    g.add_argument("--seed", type=int, help="image i gets seed S+i (default: random, printed)")
    g.add_argument("--batch", type=int, default=1, help="images per prompt")
    g.add_argument("--backend", default="ort-cpu", help="ort-cpu (default), ort-cuda (a GPU; fastest after `sdxl-trt "
                   "optimize`), tensorrt or tensorrt-rtx (engines from `sdxl-trt build`, on a GPU)")
    g.add_argument("--cuda-graphs", choices=CUDA_GRAPH_MODES, default="step",
                   help="ort-cuda, tensorrt, tensorrt-rtx: a CUDA graph of the UNet replayed each step (step, default), "
                   "the whole denoising loop as one CUDA graph (loop: experimental), or none (off)")
    g.add_argument("--low-memory", action="store_true", help="load each model when its stage starts and free it "
                   "after; decode images larger than the model's size (1024x1024) in tiles")
    _resident_flags(g)
    g.add_argument("--lora", action="append", metavar="PATH[:SCALE]", help="apply a LoRA adapter (.safetensors: "
                   "diffusers/PEFT or kohya) to the UNet and text encoders with this scale (default 1); repeat to "
                   "stack adapters. Backends ort-cpu and ort-cuda; no re-export")
    g.add_argument("--refiner-start", type=float, help="fraction of the schedule after which the refiner takes over")
    g.add_argument("--refine-strength", type=float, help="after the base, run the refiner as img2img on its latents "
                   "with this strength (e.g. 0.3)")
    g.add_argument("--init-image", metavar="PNG", help="img2img: start from this image (size: its own, unless --size)")
    g.add_argument("--strength", type=float, help="how much of the schedule to run, (0, 1]: default 0.3 for img2img, "
                   "0.9999 for inpainting (diffusers' defaults)")
    g.add_argument("--mask", metavar="PNG", help="inpainting mask for --init-image, same size; white = repaint")
    g.add_argument("--control", action="append", metavar="IMAGE[:SCALE]", help="a control image for the directory's "
                   "ControlNets (export --controlnet), once per ControlNet in their order, with its conditioning "
                   "scale (default 1); resized to the output size")
    g.add_argument("--control-start", metavar="F[,F…]", help="fraction of the steps where each ControlNet starts "
                   "(default 0; one value, or one per ControlNet)")
    g.add_argument("--control-end", metavar="F[,F…]", help="fraction of the steps where each ControlNet stops "
                   "(default 1)")
    g.add_argument("--guess-mode", action="store_true", help="ControlNet guess mode (diffusers'): the nets see the "
                   "prompt's half of the guidance batch only, their residuals ramped from 0.1 to 1")
    g.add_argument("--long-prompt", choices=["truncate", "chunk"], default="truncate",
                   help="prompts over 77 tokens: truncate (as diffusers) or chunk into 77-token windows")
    g.add_argument("--latents", metavar="NPY", help="initial noise [N,4,h,w] float32, as diffusers' `latents`")
    g.add_argument("--output-type", choices=["png", "latent"], default="png")
    g.add_argument("--out", metavar="PATH", help="output file (default ./sdxl-trt-SEED.png or .npy); "
                   "with several images, -1, -2, … are inserted before the suffix")
    g.add_argument("--timings", action="store_true", help="print the time of each stage")
    g.set_defaults(func=_cmd_generate, end_process=True)

    bn = sub.add_parser("bench", help="latency and throughput over sweeps (resolution, batch, steps, CFG, refiner, "
                        "MLPerf offline, host overhead), against diffusers in the same process; writes JSON")
    bn.add_argument("dir", metavar="DIR", help="engine directory")
    bn.add_argument("--backend", default="ort-cpu", choices=BACKENDS)
    bn.add_argument("--cuda-graphs", choices=CUDA_GRAPH_MODES, default="step",
                    help="the device loop's mode on ort-cuda, tensorrt, tensorrt-rtx")
    bn.add_argument("--devices", nargs="+", metavar="LIST", help="ort-cuda: GPU id lists, one sdxl-trt run of every "
                    "case per list (e.g. `--devices 0 0,1`: one GPU, then two); each row says its `devices` "
                    "(default: GPU 0)")
    bn.add_argument("--sweeps", nargs="+", default=[s for s in SWEEPS if s != "overhead"], choices=SWEEPS,
                    metavar="NAME",
                    help="some of: resolution batch steps cfg refiner throughput overhead (default: all but overhead; "
                    "benchmarks/README.md says what each runs)")
    bn.add_argument("--size", metavar="WxH", help="the size of the non-resolution sweeps (default: the model's)")
    bn.add_argument("--contenders", nargs="*", metavar="NAME", choices=["diffusers-eager", "diffusers-cudagraph",
                                                                        "diffusers-compile"],
                    help="diffusers variants to run beside sdxl-trt (need the export extra): diffusers-eager, "
                    "diffusers-cudagraph (the UNet under a torch CUDA graph), diffusers-compile (torch.compile)")
    bn.add_argument("--model", metavar="SRC", help="the weights the directory was exported from, for diffusers "
                    "(default: the manifest's built-in source)")
    bn.add_argument("--refiner", metavar="SRC", help="the refiner weights for diffusers' refiner cases (default: the "
                    "manifest's refiner source)")
    bn.add_argument("--compile-limit", type=float, default=900.0, metavar="S",
                    help="give up torch.compile (and record why) if its first call takes longer (default 900 s)")
    bn.add_argument("--runs", type=int, default=5, help="timed runs per case (default 5)")
    bn.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    bn.add_argument("--flops", metavar="JSON", help="FLOP table from benchmarks/unet_flops.py (→ TFLOP/s)")
    bn.add_argument("--resume", action="store_true", help="keep the cases --out already holds (same device) and "
                    "measure only the others: a matrix can be run in parts")
    bn.add_argument("--cold-start", action="store_true", help="also time load → first image in fresh processes "
                    "(empty cache, then filled)")
    bn.add_argument("--git", metavar="COMMIT", help="the commit measured, where the tree has no .git")
    bn.add_argument("--out", metavar="JSON", required=True, help="results file (rewritten after every case)")
    bn.set_defaults(func=_cmd_bench)

    s = sub.add_parser("serve", help="HTTP API (OpenAI-style /v1/images/generations, /health, /metrics) with dynamic "
                       "batching, on uvicorn (the serve extra)")
    s.add_argument("dir", metavar="DIR", help="engine directory")
    s.add_argument("--backend", default="ort-cpu", choices=BACKENDS)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=4, help="most images in one pipeline call (default 4)")
    s.add_argument("--max-wait-ms", type=float, default=20.0,
                   help="how long the first request of a batch waits for compatible ones (default 20)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting, beyond which 429 (default 64)")
    s.add_argument("--timeout-s", type=float, default=300.0, help="a request's longest wait, then 504 (default 300)")
    s.add_argument("--max-n", type=int, default=4, help="most images per request (default 4)")
    s.add_argument("--max-steps", type=int, default=100, help="most steps per request (default 100)")
    s.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body (default 20 MB)")
    _resident_flags(s)
    s.add_argument("--lora-dir", metavar="DIR", help="LoRA adapters requests may apply by name: DIR/<name>.safetensors "
                   "(request field lora: [{\"name\", \"scale\"}]); requests with the same adapters are batched")
    s.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (pip install 'ray[serve]')")
    s.add_argument("--replicas", type=int, default=1, help="with --ray: replicas (--gpus-per-replica GPUs each on GPU "
                   "backends)")
    s.add_argument("--gpus-per-replica", type=int, default=1, metavar="N", help="with --ray: GPUs per replica: 1 "
                   "(default: most images per second per GPU) or 2 on ort-cuda (one image's guidance halves on two "
                   "GPUs: lowest latency)")
    s.add_argument("--autoscaling", metavar="JSON", help="with --ray: Ray Serve's autoscaling_config instead of "
                   "--replicas, e.g. '{\"min_replicas\": 1, \"max_replicas\": 4}'")
    s.set_defaults(func=_cmd_serve)

    d = sub.add_parser("demo", help="run the whole path that exists on the tiny model, on the CPU, and write a PNG")
    d.add_argument("--out", default=DEMO_OUT, metavar="PATH", help=f"PNG to write (default ./{DEMO_OUT})")
    d.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    d.add_argument("--steps", type=int, default=20)
    d.add_argument("--size", default="256x256", help="WxH in pixels, multiples of 8")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_demo)
    return p


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: temporary files removed, locks released, exit 130


def _redeliver_interrupts(hook):
    """A signal handled inside a finalizer (`__del__`, weakref callbacks) raises where Python drops exceptions as
    "unraisable": instead of printing that and carrying on, deliver SIGTERM again a moment later, from a point where
    the interrupt propagates."""
    def handle(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
            return
        hook(unraisable)

    return handle


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given (bench records its command)
    prog = f"sdxl-trt {args.command}"
    if getattr(args, "verbose", False):
        import logging

        from . import backends

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        backends.VERBOSE = True
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate), sys.unraisablehook
        sys.unraisablehook = _redeliver_interrupts(sys.unraisablehook)
    try:
        code = _run(args, prog)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous[0])
            sys.unraisablehook = previous[1]
    from .interrupts import abandoned

    if abandoned():  # a native call that ignored its cancel still runs: shutting the interpreter down under it
        _end_process(code)  # could crash; everything of ours is cleaned up by now, so end here
    if argv is None and getattr(args, "end_process", False):
        _end_process(code)
    return code


def _end_process(code: int):
    """End the process now, once its output is flushed: the interpreter's own teardown (every ONNX Runtime session,
    CUDA graph and device buffer destroyed one by one, the pool threads joined) took 0.4-0.5 s of a one-shot
    `generate` on the H100, while the operating system frees the same memory at exit at once. Only where the command
    line is the process's (`argv` None: not for callers of main() in a process of their own) and for commands whose
    files are all written and closed by the time they return (`end_process` in their defaults)."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone since (the exit code already says so) or a closed stream
            pass
    os._exit(code)


# errors of a path itself (not of the program): a name too long, a folder where a file was expected or the reverse,
# no permission, a read-only or full filesystem
PATH_ERRNOS = {errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
               errno.ENOENT, errno.ELOOP}


def _run(args, prog: str) -> int:
    try:
        code = args.func(args) or 0
        sys.stdout.flush()  # a pipe's reader gone shows here, not in the interpreter's flush at exit
        return code
    except VerificationError as e:
        _end_progress_bars()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 4
    except UserError as e:
        _end_progress_bars()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _end_progress_bars()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # some other pipe (a socket, a child process): a bug, with its traceback
        return _quiet_broken_pipe()
    except OSError as e:  # after BrokenPipeError (an OSError too): a user's path unusable as such, met past the
        # checks made up front (those say more and before any work; this keeps the rest to one line)
        if e.errno not in PATH_ERRNOS or e.filename is None:
            raise
        _end_progress_bars()
        print(f"{prog}: error: {e.filename}: {os.strerror(e.errno)}", file=sys.stderr)
        return 2


def _end_progress_bars() -> None:
    """Close the progress bars an error left open, so that its line starts a line of its own (a bar ends in a
    carriage return, not a newline, until it is closed)."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        bar.close()


def _stdout_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader has gone (poll reports an error on its write end)."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (captured by a test harness)
        return False


def _quiet_broken_pipe() -> int:
    """The reader of our output went away (`| head`): stop quietly, as the shell's own tools do, with 141 (128 +
    SIGPIPE). Python would otherwise print a traceback, and again when it flushes stdout at exit, so stdout is
    pointed at /dev/null first (the recipe in Python's `signal` documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file descriptor (tests capture it): nothing to flush later
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())
