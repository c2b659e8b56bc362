"""`sdxl-trt serve DIR`: an HTTP API for one engine directory (FastAPI on uvicorn, the `serve` extra).

    POST /v1/images/generations   OpenAI's images API where it overlaps (prompt, n, size "WxH", response_format
                                  b64_json, output_format) plus what `sdxl-trt generate` takes: negative_prompt,
                                  steps, guidance, guidance_rescale, sampler, spacing, seed, refiner_start or
                                  refine_strength, init_image (base64 PNG/JPEG) with strength and mask (inpainting),
                                  long_prompt, lora ([{"name", "scale"}]: adapters from --lora-dir),
                                  control_images (base64, one per ControlNet) with controlnet_conditioning_scale,
                                  control_guidance_start / _end and guess_mode
                                  → {"created", "data": [{"b64_json", "seed"}], "timings"}; PNGs carry what made
                                  them as generate's do (metadata.py), output_format "latent" gives .npy files
    GET  /health                  200 once the engines are loaded and warmed up, 503 before
    GET  /metrics                 Prometheus text: requests by status, queue depth, batch sizes, latency per stage,
                                  images generated

Requests are checked by the runtime's own checks (the CLI's and the Python API's: sizes, profiles, steps, seeds, …)
plus the server's limits (n, steps, body size); a bad request is a 400 with {"error": {"message", "type"}} whose
message names the request's JSON field (the pipeline's own checks spell its arguments through HTTP_NAMES).

Dynamic batching: requests that can share a pipeline call (same size, steps, sampler, guidance, refiner start, LoRA
adapters; no init image) are merged, up to --max-batch images, for at most --max-wait-ms after the first one arrives.
Each image keeps its own seed's noise stream, so a request gets the images it would get alone. The queue holds at most
--max-queue requests (then 429 with Retry-After); a request waits at most --timeout-s (then 504). A call that runs out
of memory answers 503 with Retry-After (a merged batch first runs again request by request; the sessions kept per
shape are freed, so the next request finds their room). On SIGTERM uvicorn
stops accepting connections and the requests in flight are finished before the process exits.
"""


import asyncio
import base64
import collections
import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .errors import OutOfMemory, UserError

log = logging.getLogger(__name__)


# How the pipeline's errors spell its arguments for HTTP clients: the request's JSON fields (validate.CLI_NAMES is
# the CLI's); backend is the server's start-up flag; low_memory is not one (`serve` keeps its models resident), so an
# out-of-memory answer does not suggest it.
HTTP_NAMES = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "height": "size", "width": "size",
    "num_inference_steps": "steps", "guidance_scale": "guidance", "guidance_rescale": "guidance_rescale",
    "sampler": "sampler", "spacing": "spacing", "num_images_per_prompt": "n", "seed": "seed", "generator": "seed",
    "image": "init_image", "mask_image": "mask", "strength": "strength", "refiner_start": "refiner_start",
    "refine_strength": "refine_strength", "long_prompt": "long_prompt", "output_type": "output_format",
    "loras": "lora", "low_memory": None, "backend": "the server's --backend",
    "control_image": "control_images", "controlnet_conditioning_scale": "controlnet_conditioning_scale",
    "control_guidance_start": "control_guidance_start", "control_guidance_end": "control_guidance_end",
    "guess_mode": "guess_mode",
}


@dataclass
class Limits:
    max_batch: int = 4  # images per pipeline call
    max_wait_ms: float = 20.0
    max_queue: int = 64  # requests waiting
    timeout_s: float = 300.0
    max_n: int = 4  # images per request
    max_steps: int = 100
    max_body_bytes: int = 20 << 20
    lora_dir: str | None = None  # the folder of the LoRA adapters requests may name (None: requests name none)


@dataclass
class Job:
    """One request's work: its pipeline arguments, the images it asked for and where the answer goes."""

    prompt: str
    negative: str | None
    n: int
    seeds: list[int]
    kwargs: dict
    image: object = None  # PIL image (img2img): runs alone
    mask: object = None  # PIL image, grey (inpainting, with image)
    inputs: dict = field(default_factory=dict)  # {"init_image"/"mask": {"sha256"}}: what the PNGs' record keeps
    control: dict = field(default_factory=dict)  # the pipeline's ControlNet arguments (control images: runs alone)
    loras: tuple = ()  # lora.Adapter: applied to the pipeline before the call (jobs with other adapters wait)
    future: asyncio.Future | None = None
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple | None:
        """Requests with equal keys share a call; None: alone."""
        if self.image is not None or self.control.get("control_image") is not None:
            return None
        return self.loras, tuple(sorted(self.kwargs.items()))


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("sdxl_requests", "HTTP requests to the generation endpoint, by status", ["status"],
                                registry=self.registry)
        self.queue = Gauge("sdxl_queue_depth", "requests waiting for the pipeline", registry=self.registry)
        self.batch = Histogram("sdxl_batch_images", "images per pipeline call", buckets=(1, 2, 3, 4, 6, 8, 12, 16),
                               registry=self.registry)
        self.batch_requests = Histogram("sdxl_batch_requests", "requests merged into one pipeline call",
                                        buckets=(1, 2, 3, 4, 6, 8, 16), registry=self.registry)
        buckets = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
        self.latency = Histogram("sdxl_request_seconds", "request latency, queue included", buckets=buckets,
                                 registry=self.registry)
        self.stage = Histogram("sdxl_stage_seconds", "pipeline stage time per call", ["stage"], buckets=buckets,
                               registry=self.registry)
        self.images = Counter("sdxl_images_generated", "images generated", registry=self.registry)
        self.device = Gauge("sdxl_device_memory_bytes", "device memory the pipeline holds (GPU backends)",
                            registry=self.registry)
        self.device_peak = Gauge("sdxl_device_memory_peak_bytes", "most device memory the pipeline held after a stage",
                                 registry=self.registry)
        self.resident = Gauge("sdxl_resident_sessions", "sessions kept per shape (GPU backends)", registry=self.registry)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Batcher:
    """Queues jobs and runs them on one worker thread (the pipeline is not thread safe), merging compatible ones."""

    def __init__(self, pipe, limits: Limits, metrics: Metrics):
        self.pipe, self.limits, self.metrics = pipe, limits, metrics
        self.pending: list[Job] = []
        self.wakeup = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdxl-pipeline")
        self.task: asyncio.Task | None = None
        self.after_call = None  # called on the worker thread with the pipeline after each call (device metrics)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        """After uvicorn has drained the requests: nothing is pending; end the worker."""
        if self.task:
            self.task.cancel()
        self.executor.shutdown(wait=True)

    def submit(self, job: Job) -> asyncio.Future:
        if len(self.pending) >= self.limits.max_queue:
            raise QueueFull()
        job.future = asyncio.get_running_loop().create_future()
        self.pending.append(job)
        self.metrics.queue.set(len(self.pending))
        self.wakeup.set()
        return job.future

    def cancel(self, job: Job) -> None:
        if job in self.pending:
            self.pending.remove(job)
            self.metrics.queue.set(len(self.pending))

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            first = self.pending[0]
            deadline = first.enqueued + self.limits.max_wait_ms / 1e3
            while first.key is not None and self._images(first.key) < self.limits.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            if first not in self.pending:  # it timed out while waiting for company
                continue
            batch = self._take(first)
            self.metrics.queue.set(len(self.pending))
            try:
                outcomes = await loop.run_in_executor(self.executor, self._generate, batch)
            except Exception as e:  # noqa: BLE001 — every job of the batch gets the error
                outcomes = [e] * len(batch)
            try:
                self._answer(batch, outcomes)
            except Exception as e:  # noqa: BLE001 — a bug here must not stop the worker: those requests get a 500
                log.exception("answering a batch failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)

    def _images(self, key) -> int:
        return sum(j.n for j in self.pending if j.key == key)

    def _take(self, first: Job) -> list[Job]:
        batch, images = [first], first.n
        if first.key is not None:
            for job in self.pending[1:]:
                if job.key == first.key and images + job.n <= self.limits.max_batch:
                    batch.append(job)
                    images += job.n
        for job in batch:
            self.pending.remove(job)
        return batch

    def _generate(self, batch: list[Job]) -> list:
        """On the worker thread: one pipeline call for the whole batch, prompts and seeds image by image. If the
        merged call is refused (one request's input the pipeline rejects), each request runs alone, so that only
        the bad one gets the error. Returns, per job, a Result or the exception it ended with."""
        try:
            try:
                return [self._call(batch)] * len(batch)
            except UserError as e:
                if len(batch) == 1:
                    return [e]
            outcomes = []
            for job in batch:
                try:
                    outcomes.append(self._call([job]))
                except Exception as e:  # noqa: BLE001 — handed to that request
                    outcomes.append(e)
            return outcomes
        finally:
            if self.after_call is not None:
                self.after_call(self.pipe)

    def _call(self, batch: list[Job]):
        first = batch[0]
        prompts = [j.prompt for j in batch for _ in range(j.n)]
        negatives = [j.negative or "" for j in batch for _ in range(j.n)]
        seeds = [s for j in batch for s in j.seeds]
        if tuple(first.loras) != tuple(getattr(self.pipe, "loras", ())):  # merged weights cached: switching back is cheap
            self.pipe.set_loras(first.loras, HTTP_NAMES)
        return self.pipe(prompts, negatives if any(j.negative for j in batch) else None, seed=seeds,
                         image=first.image, mask_image=first.mask, progress=False, names=HTTP_NAMES, **first.kwargs,
                         **first.control)

    def _answer(self, batch: list[Job], outcomes: list) -> None:
        """Each job its images (its slice of the Result it shared) or its exception; metrics once per pipeline call."""
        merged = collections.Counter(id(o) for o in outcomes)  # requests per Result
        start: dict[int, int] = {}  # id(Result) → where the next of its jobs' images begin
        for job, outcome in zip(batch, outcomes):
            if isinstance(outcome, BaseException):
                if not job.future.done():
                    job.future.set_exception(outcome)
                continue
            key = id(outcome)
            made = outcome.images if outcome.images is not None else outcome.array  # PIL images, or latents
            if key not in start:
                start[key] = 0
                self.metrics.batch.observe(len(made))
                self.metrics.batch_requests.observe(merged[key])
                self.metrics.images.inc(len(made))
                for stage, seconds in outcome.timings.items():
                    self.metrics.stage.labels(stage).observe(seconds)
            images = made[start[key]:start[key] + job.n]
            start[key] += job.n
            if not job.future.done():
                job.future.set_result((images, job.seeds, outcome.timings, merged[key]))


class QueueFull(Exception):
    pass


def npy_bytes(latent) -> bytes:
    """One image's latents as the .npy file `sdxl-trt generate --output-type latent` writes ([1,4,h,w])."""
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, latent[None])
    return buffer.getvalue()


def decode_image(data: str, name: str = "init_image", mode: str = "RGB"):
    """A request's base64 image field → (PIL image in `mode`, {"sha256": of the bytes sent}), or a UserError naming
    the field."""
    from .images import open_image
    from .metadata import file_sha256

    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError as e:
        raise UserError(f"{name}: not a base64 PNG or JPEG ({str(e).splitlines()[0][:120]})") from None
    image = open_image(io.BytesIO(raw), name, mode, unreadable="not a base64 PNG or JPEG")
    return image, {"sha256": file_sha256(raw)}


def check_address(host: str, port: int) -> None:
    """The address can be listened on, checked before the engines load: uvicorn would say it only after the load and
    exit with its own status 3; here it is one line and status 2, as for any bad input."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host!r}: not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); choose another "
                            "--port, or stop what holds it") from None


def create_app(engine_dir, backend: str = "ort-cpu", limits: Limits | None = None, warmup: bool = True,
               pipeline=None, buckets=None, max_device_memory: float | None = None, warm_up_listening: bool = True,
               devices=None):
    """The ASGI app. `pipeline`: an already loaded Pipeline (tests); else loaded at startup (`buckets`,
    `max_device_memory` and `devices` as Pipeline.load takes them). `warmup`: before answering, make and capture the sessions and
    CUDA graphs of every resident size (the buckets; the model's size on backends without them): with
    `warm_up_listening`, after startup while /health answers 503; else as part of startup (Ray Serve routes to a
    replica once its startup is done)."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    from .images import png_bytes
    from .metadata import control_record, generation_record
    from .pipeline import Pipeline, image_seeds
    from .samplers import SAMPLERS
    from .validate import parse_size

    limits = limits or Limits()
    metrics = Metrics()
    state: dict = {"ready": False, "batcher": None, "status": "loading"}

    # strict: a JSON value of another type is refused, not converted ("seed": "1" or true is not a seed; a JSON
    # integer still fills a float field)
    class LoraChoice(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        name: str
        scale: float = 1.0

    class GenerationRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        prompt: str
        n: int = Field(1, ge=1)
        size: str | None = None
        response_format: str = "b64_json"
        model: str | None = None  # OpenAI clients send it; one engine directory is served
        negative_prompt: str | None = None
        steps: int = Field(30, ge=1)
        guidance: float | None = None
        guidance_rescale: float = Field(0.0, ge=0, le=1)
        sampler: str = "euler"
        spacing: Literal["leading", "trailing", "linspace"] | None = None
        seed: int | None = Field(None, ge=0)
        refiner_start: float | None = Field(None, gt=0, lt=1)
        refine_strength: float | None = Field(None, gt=0, le=1)
        init_image: str | None = None
        strength: float | None = Field(None, gt=0, le=1)
        mask: str | None = None  # inpainting: white = repaint, the init image's size
        long_prompt: Literal["truncate", "chunk"] = "truncate"
        output_format: Literal["png", "latent"] = "png"
        lora: list[LoraChoice] | None = None
        # ControlNet (a directory exported with --controlnet): one base64 image per net, in the directory's order
        control_images: list[str] | None = None
        controlnet_conditioning_scale: float | list[float] | None = None
        control_guidance_start: float | list[float] | None = None
        control_guidance_end: float | list[float] | None = None
        guess_mode: bool = False

    def error(status: int, message: str, kind: str = "invalid_request_error", headers=None):
        metrics.requests.labels(str(status)).inc()
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)

    async def warm_up(batcher: Batcher) -> None:
        """The first call at each size makes sessions, picks algorithms and captures graphs: not a user's request.
        Runs after startup, so that /health can answer 503 meanwhile."""
        loop = asyncio.get_running_loop()
        state["status"] = "warming up"
        started = time.perf_counter()
        try:
            taken = await loop.run_in_executor(batcher.executor, batcher.pipe.warm_up)
            log.info("warm-up: %d sizes in %.1f s", len(taken), time.perf_counter() - started)
        except UserError as e:  # e.g. out of memory at the largest bucket: sizes that fit still work
            log.warning("warm-up stopped: %s", e)
        except Exception:  # noqa: BLE001 — a bug: logged whole; requests still make what they need on first use
            log.exception("warm-up failed")
        state["warmup_s"] = round(time.perf_counter() - started, 2)
        observe_device(batcher.pipe)
        batcher.start()
        state["ready"], state["status"] = True, "ok"

    def observe_device(pipe) -> None:
        resident = getattr(pipe.backend, "resident", None)
        if resident is not None:
            metrics.device.set(resident.used())
            metrics.device_peak.set(resident.peak)
            metrics.resident.set(len(resident))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()
        batcher = Batcher(pipeline, limits, metrics)  # its one thread loads, warms up and runs the pipeline
        batcher.after_call = observe_device
        pipe = pipeline
        if pipe is None:
            pipe = await loop.run_in_executor(batcher.executor, lambda: Pipeline.load(
                engine_dir, backend=backend, buckets=buckets, max_device_memory=max_device_memory, devices=devices))
        batcher.pipe = pipe
        state["batcher"] = batcher
        if warmup and warm_up_listening:
            state["warmup"] = asyncio.create_task(warm_up(batcher))
        elif warmup:
            await warm_up(batcher)
        else:
            batcher.start()
            state["ready"], state["status"] = True, "ok"
        yield
        state["ready"] = False
        if "warmup" in state:
            await asyncio.wait([state["warmup"]])
        await state["batcher"].stop()

    app = FastAPI(title="sdxl-trt", lifespan=lifespan)

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            if int(length) <= 8 * limits.max_body_bytes:  # read and drop it, so the client reads our answer (an
                async for _ in request.stream():         # unread body makes the close a reset); larger: just close
                    pass
            return error(413, f"request body of {length} bytes is over the limit of {limits.max_body_bytes}")
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # FastAPI's own refusals (a body it cannot parse: bytes that are not UTF-8, JSON nested too deep or an integer
        # of thousands of digits; an unknown path or method) in the server's error format, not {"detail": …}
        message = exc.detail if isinstance(exc.detail, str) else "invalid request"
        if exc.status_code == 400 and "parsing the body" in message:
            message = "the body is not valid JSON (not UTF-8, nested too deep, or a number too long)"
        return error(exc.status_code, message, "invalid_request_error" if exc.status_code < 500 else "server_error",
                     headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first['msg']}" if where else first["msg"]
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON ({first['msg']})"
        return error(400, message)

    @app.get("/health")
    async def health():
        if not state["ready"]:
            return JSONResponse({"status": state["status"]}, status_code=503)
        answer = {"status": "ok", "engine": str(engine_dir), "backend": backend, "replica": os.getpid()}
        if "warmup_s" in state:
            answer["warmup_s"] = state["warmup_s"]
        resident = getattr(state["batcher"].pipe.backend, "resident", None)
        if resident is not None:  # what the GPU backend keeps: sessions per shape, device memory (GiB)
            limited = resident.budget is not None
            answer.update(resident_sessions=len(resident), device_gib=round(resident.used() / 2**30, 2),
                          peak_device_gib=round(resident.peak / 2**30, 2), evictions=resident.evictions,
                          budget_gib=round(resident.budget / 2**30, 2) if limited else None,
                          budget=("automatic" if resident.automatic else "--max-device-memory") if limited else None)
        return answer

    @app.get("/metrics")
    async def metrics_text():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/images/generations")
    async def generate(body: GenerationRequest):
        started = time.perf_counter()
        if not state["ready"]:
            return error(503, "the engines are still loading", "unavailable")
        try:
            job = make_job(body)
        except UserError as e:
            return error(400, str(e))
        batcher = state["batcher"]
        try:
            future = batcher.submit(job)
        except QueueFull:
            return error(429, f"the queue is full ({limits.max_queue} requests)", "rate_limit",
                         headers={"Retry-After": "1"})
        try:
            images, seeds, timings, merged = await asyncio.wait_for(asyncio.shield(future), limits.timeout_s)
        except asyncio.TimeoutError:
            batcher.cancel(job)
            return error(504, f"not done within {limits.timeout_s:g} s", "timeout")
        except OutOfMemory as e:  # the server's, not the request's: it may succeed again (the kept sessions were freed)
            return error(503, str(e), "unavailable", headers={"Retry-After": "1"})
        except UserError as e:
            return error(400, str(e))
        except Exception as e:  # noqa: BLE001 — a bug or the machine: a 500 with its first line, logged whole
            log.exception("generation failed")
            return error(500, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", "server_error")
        metrics.requests.labels("200").inc()
        metrics.latency.observe(time.perf_counter() - started)
        files = [npy_bytes(image) if body.output_format == "latent" else png_bytes(image, record(body, job, image, seed))
                 for image, seed in zip(images, seeds)]
        return {"created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(data).decode("ascii"), "seed": seed}
                         for data, seed in zip(files, seeds)],
                "timings": {**{k: round(v, 4) for k, v in timings.items()}, "batched_requests": merged,
                            "total": round(time.perf_counter() - started, 4)}}

    def make_job(body) -> Job:
        if body.response_format != "b64_json":
            raise UserError(f"response_format {body.response_format!r}: only b64_json is served")
        if body.n > limits.max_n:
            raise UserError(f"n {body.n}: at most {limits.max_n} images per request")
        if body.steps > limits.max_steps:
            raise UserError(f"steps {body.steps}: at most {limits.max_steps}")
        kwargs = {"num_inference_steps": body.steps, "sampler": body.sampler, "spacing": body.spacing,
                  "guidance_rescale": body.guidance_rescale, "long_prompt": body.long_prompt,
                  "output_type": "latent" if body.output_format == "latent" else "pil"}
        if body.size:
            width, height = parse_size(body.size, "size")
            kwargs.update(width=width, height=height)
        if body.guidance is not None:
            kwargs["guidance_scale"] = body.guidance
        check_refiner(body)
        kwargs.update({k: v for k in ("refiner_start", "refine_strength") if (v := getattr(body, k)) is not None})
        image = mask = None
        inputs = {}
        if body.init_image is not None:
            image, inputs["init_image"] = decode_image(body.init_image)
            kwargs["strength"] = body.strength
        elif body.strength is not None or body.mask is not None:
            raise UserError(f"{'strength' if body.strength is not None else 'mask'} goes with init_image")
        if body.mask is not None:
            mask, inputs["mask"] = decode_image(body.mask, "mask", mode="L")
            if mask.size != image.size:
                raise UserError(f"mask is {mask.size[0]}x{mask.size[1]} but init_image is "
                                f"{image.size[0]}x{image.size[1]}: they must be the same size")
        if body.sampler not in SAMPLERS:
            raise UserError(f"sampler {body.sampler!r}: expected one of {', '.join(SAMPLERS)}")
        decoded = [decode_image(data, f"control_images[{k}]") for k, data in enumerate(body.control_images or [])]
        control = {"control_image": [image for image, _ in decoded] or None,
                   **{k: getattr(body, k) for k in ("controlnet_conditioning_scale", "control_guidance_start",
                                                    "control_guidance_end", "guess_mode")}}
        if decoded:  # what the PNGs' record keeps of them
            inputs["controls"] = control_record([sha for _, sha in decoded], body.controlnet_conditioning_scale,
                                                body.control_guidance_start, body.control_guidance_end)
            inputs["guess_mode"] = body.guess_mode
        return Job(body.prompt, body.negative_prompt, body.n, image_seeds(body.seed, body.n), kwargs, image,
                   mask=mask, inputs=inputs, loras=request_loras(body.lora or []), control=control)

    def check_refiner(body) -> None:
        """The refiner's two uses, checked before the request waits in the queue."""
        chosen = [k for k in ("refiner_start", "refine_strength") if getattr(body, k) is not None]
        if len(chosen) == 2:
            raise UserError("refiner_start and refine_strength: give one (the refiner as second expert, or as "
                            "img2img after the base), not both")
        if chosen and not state["batcher"].pipe.has_refiner:
            raise UserError(f"{chosen[0]}: the model this server runs has no refiner")

    def record(body, job: Job, image, seed: int) -> dict:
        """What made one image (metadata.generation_record), as `generate` writes it: the PNG can be run again."""
        return generation_record(state["batcher"].pipe, job.kwargs, prompt=body.prompt, negative=body.negative_prompt,
                                 seed=seed, size=image.size, backend=backend,
                                 loras=[{"name": a.path.stem, "scale": a.scale} for a in job.loras], **job.inputs)

    def request_loras(choices) -> tuple:
        """A request's adapters: files `<name>.safetensors` of --lora-dir, nothing outside it."""
        import math
        import re
        from pathlib import Path

        from .lora import Adapter
        from .validate import LORA_SCALE_RANGE

        if choices and not limits.lora_dir:
            raise UserError("lora: this server serves no adapters (start it with --lora-dir)")
        adapters = []
        for choice in choices:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", choice.name):
                raise UserError(f"lora {choice.name!r}: names of --lora-dir's files only (letters, digits, . _ -)")
            path = Path(limits.lora_dir) / f"{choice.name}.safetensors"
            if not path.is_file():
                raise UserError(f"lora {choice.name!r}: no such adapter on this server")
            low, high = LORA_SCALE_RANGE
            if not math.isfinite(choice.scale) or not low <= choice.scale <= high:
                raise UserError(f"lora {choice.name!r}: scale {choice.scale!r}: expected a number from {low:g} to "
                                f"{high:g}")
            adapters.append(Adapter(path, choice.scale))
        return tuple(adapters)

    return app
