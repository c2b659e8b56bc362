"""diffusers as a contender of `sdxl-trt bench` (runtime/bench.py), on the same weights as the engine directory:
`StableDiffusionXLPipeline` (+ `StableDiffusionXLImg2ImgPipeline` as the refiner expert), fp16 on a GPU (its VAE
upcasts to fp32 for decoding, as it ships), fp32 on the CPU, in one of three modes:

  diffusers-eager      as users run it
  diffusers-cudagraph  the UNet's forward captured as one torch CUDA graph per input shape (static input buffers,
                       replayed every step): the launch overhead of eager PyTorch removed, nothing else changed
  diffusers-compile    `torch.compile(unet, mode="reduce-overhead", fullgraph=True)`, diffusers' documented recipe;
                       the first call per shape (compilation) is timed and reported; cases after one whose first call
                       took longer than `compile_limit` seconds are skipped with that reason

Stage times (text, VAE) come from the pipeline's own calls with the device synchronised around them (four
synchronisations per image: negligible next to a call); `denoise_ms` is the rest of the call.
"""

from __future__ import annotations

import gc
import time

from ..runtime.bench import PROMPT, Case, device_used_gib
from ..runtime.errors import UserError
from .reference import diffusers_pipeline
from .sources import load_model

MODES = {"diffusers-eager": "eager", "diffusers-cudagraph": "UNet as a torch CUDA graph",
         "diffusers-compile": "torch.compile reduce-overhead"}


class DiffusersContender:
    name = "diffusers"

    def __init__(self, model: str, variant: str, refiner: str | None = None, compile_limit: float = 900.0):
        import torch

        if variant not in MODES:
            raise UserError(f"--contenders {variant!r}: expected one of {', '.join(MODES)}")
        self.torch = torch
        self.cuda = torch.cuda.is_available()
        if variant == "diffusers-cudagraph" and not self.cuda:
            raise UserError("diffusers-cudagraph needs a CUDA GPU")
        started = time.perf_counter()
        self.device, self.dtype = ("cuda", torch.float16) if self.cuda else ("cpu", torch.float32)
        self.devices = [torch.cuda.current_device()] if self.cuda else []  # the GPU ids a bench row reports
        self.before = device_used_gib() if self.cuda else None
        self.pipe = self._load(model)
        self.refiner_source, self.refiner = refiner, None
        self.variant, self.compile_limit = variant, compile_limit
        self.mode = f"{MODES[variant]}, {'fp16' if self.cuda else 'fp32'}" + (", VAE upcast to fp32" if self.cuda else "")
        self.compile_s: dict[str, float] = {}
        self.too_slow: str | None = None
        if variant == "diffusers-cudagraph":
            graph_unet(self.pipe.unet)
        elif variant == "diffusers-compile":
            self.pipe.unet = torch.compile(self.pipe.unet, mode="reduce-overhead", fullgraph=True)
        self.stage_s: dict[str, float] = {}
        self._time_stages(self.pipe)
        self.sync = torch.cuda.synchronize if self.cuda else None
        self.load_s = time.perf_counter() - started

    def _load(self, spec: str):
        pipe = diffusers_pipeline(load_model(spec, progress=False)).to(self.device, self.dtype)
        pipe.set_progress_bar_config(disable=True)
        gc.collect()
        return pipe

    def _time_stages(self, pipe) -> None:
        """Accumulate the time of prompt encoding and VAE decoding of `pipe` into self.stage_s."""
        def timed(stage, fn):
            def run(*args, **kwargs):
                self._sync()
                t = time.perf_counter()
                out = fn(*args, **kwargs)
                self._sync()
                self.stage_s[stage] = self.stage_s.get(stage, 0.0) + time.perf_counter() - t
                return out
            return run

        pipe.encode_prompt = timed("text", pipe.encode_prompt)
        pipe.vae.decode = timed("vae", pipe.vae.decode)

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def supports(self, case: Case) -> str | None:
        if self.too_slow:
            return self.too_slow
        if case.refiner_start is not None and not self.refiner_source:
            return "no refiner weights (the engine directory has no refiner; bench --refiner SRC)"
        return None

    def call(self, case: Case):
        torch = self.torch
        generator = torch.Generator(self.device).manual_seed(0)
        self.stage_s = {}
        key = f"{case.width}x{case.height}x{case.batch}"
        first = self.variant == "diffusers-compile" and key not in self.compile_s
        started = time.perf_counter()
        kw = dict(height=case.height, width=case.width, num_inference_steps=case.steps, guidance_scale=case.guidance,
                  num_images_per_prompt=case.batch, generator=generator)
        with torch.no_grad():
            if case.refiner_start is None:
                images = self.pipe(PROMPT, **kw).images
                refiner_s = None
            else:
                latents = self.pipe(PROMPT, denoising_end=case.refiner_start, output_type="latent", **kw).images
                refiner = self._refiner()
                self._sync()
                t, before = time.perf_counter(), dict(self.stage_s)
                images = refiner(PROMPT, image=latents, denoising_start=case.refiner_start,
                                 **{k: v for k, v in kw.items() if k not in ("height", "width")}).images
                self._sync()
                # as sdxl-trt counts it: the refiner's prompt encoding is part of the refiner stage, its decode is VAE
                self.stage_s["text"] = before.get("text", 0.0)
                refiner_s = time.perf_counter() - t - (self.stage_s.get("vae", 0.0) - before.get("vae", 0.0))
        self._sync()
        total = time.perf_counter() - started
        if first:
            self.compile_s[key] = round(total, 1)
            if total > self.compile_limit:
                self.too_slow = f"torch.compile's first call at {key} took {total:.0f} s (> {self.compile_limit:.0f} s)"
        text, vae = self.stage_s.get("text", 0.0), self.stage_s.get("vae", 0.0)
        return {"images": images, "text": text, "vae": vae, "refiner": refiner_s,
                "base": total - text - vae - (refiner_s or 0.0)}

    def _refiner(self):
        if self.refiner is None:
            self.refiner = self._load(self.refiner_source)
            self._time_stages(self.refiner)
            if self.variant == "diffusers-cudagraph":
                graph_unet(self.refiner.unet)
            elif self.variant == "diffusers-compile":
                self.refiner.unet = self.torch.compile(self.refiner.unet, mode="reduce-overhead", fullgraph=True)
        return self.refiner

    @staticmethod
    def stages(result) -> dict:
        return {"text_ms": result["text"], "denoise_ms": result["base"], "refiner_ms": result["refiner"],
                "vae_ms": result["vae"]}

    def begin_case(self) -> None:
        """torch's allocator keeps what earlier (larger) cases cached: hand it back, so that the memory measured after
        this case is this case's (the H100 matrix's diffusers rows stayed at their batch-4 peak without this)."""
        if self.cuda:
            gc.collect()
            self.torch.cuda.empty_cache()

    def memory_gib(self) -> float | None:
        if not self.cuda:
            return None
        used = device_used_gib()
        return round(used - (self.before or 0.0), 2) if used is not None else None

    def extra(self) -> dict:
        return {"compile_s": self.compile_s} if self.compile_s else {}

    def close(self) -> None:
        self.pipe = self.refiner = None
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def graph_unet(unet) -> None:
    """Replace `unet.forward` by replays of one torch CUDA graph per input signature: inputs are copied into static
    buffers, the graph captured on first use (after two warm-up runs on a side stream, as torch's docs do), and the
    static output returned; every other attribute of the module stays as it was."""
    import torch

    forward = unet.forward
    graphs: dict = {}

    def signature(args, kwargs):
        tensors = [*args, *kwargs.values(), *(kwargs.get("added_cond_kwargs") or {}).values()]
        return tuple((tuple(t.shape), t.dtype) if torch.is_tensor(t) else repr(t) for t in tensors)

    def graphed(sample, timestep, encoder_hidden_states, added_cond_kwargs=None, **kwargs):
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(timestep, device=sample.device)
        added = dict(added_cond_kwargs or {})
        key = signature((sample, timestep, encoder_hidden_states), {**kwargs, "added_cond_kwargs": added})
        if key not in graphs:
            static = {"sample": sample.clone(), "timestep": timestep.clone(), "context": encoder_hidden_states.clone(),
                      "added": {k: v.clone() for k, v in added.items()}}

            def step():
                return forward(static["sample"], static["timestep"], static["context"],
                               added_cond_kwargs=static["added"], **kwargs)

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
            graphs[key] = (graph, static, out)
        graph, static, out = graphs[key]
        static["sample"].copy_(sample)
        static["timestep"].copy_(timestep)
        static["context"].copy_(encoder_hidden_states)
        for k, v in added.items():
            static["added"][k].copy_(v)
        graph.replay()
        return out

    unet.forward = graphed
