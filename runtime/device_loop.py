"""The denoising loop on the GPU: latents, the UNet's input and output, the guided prediction, the sampler's state,
its per-step coefficients and the step counter all stay in device memory; each step queues the input-scaling
kernel, the timestep selection, the UNet (IOBinding on those buffers), the guidance kernel, the sampler's step
kernel and the counter's advance on one stream, with no host synchronisation until the final latents are read back.

CUDA graphs (the backend's `cuda_graphs`), on a UNet session made for the loop's shape (ort_cuda.loop_session):
  - "step" (default): ONNX Runtime's own CUDA graph of the UNet (one `gpu_graph_id` per shape), captured on its
    first runs and replayed each step, our kernels queued between the replays.
  - "loop" (experimental): the whole loop for one (UNet, shape, sampler, steps, guidance) captured as one CUDA graph
    of ours on its first call (after running it once normally, which also warms up cuDNN's algorithm search) and
    replayed by one launch on later calls. Inputs are uploaded into the same device buffers each call; if a buffer
    had to move, the graph is captured again. ONNX Runtime 1.31 waits on a host event inside a run of a session
    that copies shape values to the GPU, which breaks a capture (seen on the H100 with an unoptimized file) and
    leaves that session unusable; a failed capture warns, drops that session and falls back to "step".
  - "off": every kernel and UNet run launched one by one.
Every buffer a graph reads sits at a fixed address per shape (the timestep too: `select_timestep` copies the
current step's row into it), so the per-step work is the same each time and only the counter on the device moves.

The text encoders (`encode`) and the VAE (`decode`) run here too, each on a session made for its shape with ONNX
Runtime's CUDA graph, so that a prompt's hundreds of small kernels are one launch.

The kernels (kernels/step.cu) compute exactly what the numpy loop of pipeline.py computes; per-step noise is drawn
in advance on the host from each image's own generator in the order the numpy loop draws it, so the streams are
the CPU runtime's. Not here: inpainting, guidance rescale, heun / dpmpp_sde_karras / tcd (the pipeline keeps its
numpy loop for those).

ControlNets (`control`): each step runs the ControlNets whose guidance window holds it after the timestep selection
and before the UNet, on the UNet's own input buffers, its conditioning scale for the step picked from a per-step table
by the same kernel as the timestep, the residuals summed by the `accumulate` kernel into the buffers the UNet that
takes them reads. A net outside its window is not run (diffusers runs it at scale 0, which adds nothing; the host
loop skips it too): a step outside every window runs the UNet alone.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from dataclasses import dataclass, field

import numpy as np

from .contracts import output_shapes
from .cuda import BufferPool, Graph, capturing, on_device
from .samplers import KERNEL_KINDS, Sampler, coefficient_table

log = logging.getLogger(__name__)
# images per VAE decode: the VAE's activations at 1024² hold about 4 GiB an image (per resident session:
# h100-resident-buckets-sequence.json), so sessions for a server's batch sizes would keep several times that per bucket,
# and ran it out of device memory (h100x4-serve-layouts-oom-b0a6c96.json); one at a time costs little: four 1024²
# images decode in 160 ms at once and 4 × 48 ms one by one on the H100 (the batch sweep of h100-matrix.json)
DECODE_BATCH = 1


def _on_backend_device(method):
    """Run a DeviceLoop entry point with its backend's GPU current (a backend on GPU 1, or called from a thread that
    is on another GPU); backends without a `device` run on the thread's current one."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        device = getattr(self.backend, "device_id", None)
        with contextlib.nullcontext() if device is None else on_device(device):
            return method(self, *args, **kwargs)

    return wrapper


def supported(sampler: Sampler, guidance_rescale: float, inpainting: bool) -> bool:
    return sampler.name in KERNEL_KINDS and guidance_rescale == 0 and not inpainting


def unsupported_reason(sampler: Sampler, guidance_rescale: float, inpainting: bool, on_device: bool = True) -> str:
    """Why a call runs the host loop instead (for warnings)."""
    if not on_device:
        return "the device loop is off (--low-memory, or turned off)"
    if sampler.name not in KERNEL_KINDS:
        return f"sampler {sampler.name} has no GPU kernel"
    return "guidance rescale" if guidance_rescale else "inpainting"


@dataclass
class _Shape:
    """Device buffers and the ONNX Runtime binding for one UNet input shape: CUDA graphs point into them."""

    graph_id: int
    buffers: BufferPool = field(default_factory=BufferPool)
    binding: object = None
    loops: dict = field(default_factory=dict)  # loop key → (Graph, buffer addresses it was captured with)


def _close_binding(shape: _Shape) -> None:
    """Release what a shape's binding holds of its own (a TensorRT binding's CUDA graphs; ONNX Runtime's have none)."""
    if shape.binding is not None and hasattr(shape.binding[0], "close"):
        shape.binding[0].close()


@dataclass
class _Net:
    """One ControlNet bound for a pass: its session and shape, its per-step scale table and the buffer its
    `conditioning_scale` input reads, the (dst, src, dtype, count) additions that sum its residuals into the
    first net's (none for the first), at which schedule steps it runs (`active`: a nonzero scale row), and the first
    net's (dst, dtype, count) outputs in the UNet's residual inputs (`writes`: zeroed at a step it does not run)."""

    session: object
    shape: _Shape
    scales: int
    scale: int
    residuals: int
    sums: list
    active: tuple
    writes: list


class Pass:
    """One denoising call set up on a device (DeviceLoop.begin): each step is `model()` (the input scaling, the
    timestep, the UNet) then `update()` (guidance, the sampler's step, the step counter), both queued on the backend's
    stream; `result()` reads the final latents back. A loop over several devices (parallel_loop.py) queues the
    devices' parts in turn and moves predictions between them in between."""

    def __init__(self, loop: DeviceLoop, shape: _Shape, session, mode: str, latent_shape: tuple, a: dict,
                 half_bytes: int):
        self.loop, self.shape, self.session, self.mode, self.latent_shape = loop, shape, session, mode, latent_shape
        self.a = a
        self.half_bytes = half_bytes  # bytes of one UNet run's prediction
        self.prediction = a["pred"]  # the [2N] (guided) or [N] prediction the update reads
        self.nets: list[_Net] = []  # ControlNets run before the UNet each step (begin's `control`)
        self.index = 0  # the schedule step the next model() evaluates, as the host knows it (the device's `step`)

    def model(self) -> None:
        """The step's UNet evaluation (with ONNX Runtime's graph of this shape in "step" mode), after the ControlNets
        whose window holds this step (the others are not run: the host loop skips them too, diffusers runs them at
        scale 0, which adds nothing)."""
        a, k = self.a, self.loop.kernels
        k.scale_input(a["x"], a["sample"], a["sample_dtype"], a["coefficients"], a["step"], a["n"], a["copies"])
        k.select_timestep(a["timesteps"], a["timestep"], a["step"], a["batch"])
        if self.nets and not self.nets[0].active[self.index]:  # the sums below start from zero residuals
            for dst, dtype, count in self.nets[0].writes:
                k.zero(dst, dtype, count)
        for net in self.nets:  # ControlNets: their residuals summed into the buffers the UNet reads
            if not net.active[self.index]:
                continue
            k.select_timestep(net.scales, net.scale, a["step"], net.residuals)
            net.session.run_bound(net.shape.binding[0], net.shape.graph_id if self.mode == "step" else -1)
            for dst, src, dtype, count in net.sums:
                k.accumulate(dst, src, dtype, count)
        graph_id = self.shape.graph_id if self.mode == "step" else -1
        self.session.run_bound(self.shape.binding[0], graph_id)

    def steps(self, evals: range) -> None:
        """Queue the steps of `evals`, each model() then update()."""
        self.index = evals.start
        for _ in evals:
            self.model()
            self.update()

    def update(self) -> None:
        self.index += 1
        a, k = self.a, self.loop.kernels
        if a["guided"]:
            k.cfg_combine(a["pred"], a["out_dtype"], a["eps"], a["guidance"], a["n"])
        else:
            k.widen(a["pred"], a["out_dtype"], a["eps"], a["n"])
        k.sampler_step(a["sampler"], a["x"], a["eps"], a["coefficients"], a["step"], a["prediction_type"], a["n"],
                       prev=a["prev"], noise=a["noise"])
        k.advance_step(a["step"])

    def result(self) -> np.ndarray:
        """The final latents (the host waits for the stream)."""
        backend = self.loop.backend
        out = self.shape.buffers["x"].download(np.empty(self.latent_shape, np.float32), backend.stream)
        backend.stream.synchronize()
        backend.settle()
        return out


class DeviceLoop:
    def __init__(self, backend):
        import time

        started = time.perf_counter()
        import cuda.core as core

        from ..kernels.nvrtc import StepKernels

        self.backend = backend
        self.kernels = StepKernels.load(stream=core.Stream.from_handle(backend.stream.ptr),
                                        device=getattr(backend, "device_id", None))
        self._shapes: dict[tuple, _Shape] = {}
        self._graph_ids = itertools.count()  # ONNX Runtime's gpu_graph_id: one per shape, never reused
        self.last_run = None  # how the last call ran: "off", "step", "loop-capture" or "loop-replay"
        log.info("loaded the step kernels in %.2f s", time.perf_counter() - started)

    def graphs_held(self) -> int:
        """CUDA graphs of ours this loop holds: whole loops per shape and per-step graphs in TensorRT bindings
        (ONNX Runtime keeps its own per-step graphs inside its sessions, not counted here)."""
        return sum(len(getattr(s.binding[0], "graphs", {})) + len(s.loops) for s in self._shapes.values()
                   if s.binding is not None)

    @_on_backend_device
    def denoise(self, unet: str, latents: np.ndarray, sampler: Sampler, evals: range, cond, guidance_scale: float,
                noise: np.ndarray | None = None, control=None) -> np.ndarray:
        """`evals` of `sampler` from `latents` [N,4,h,w] fp32 with cond = (context, pooled, time_ids) as the numpy
        loop takes them (negatives first under guidance); `noise`: [n_evals, N,4,h,w] for samplers that draw it;
        `control`: ControlNets (controlnet.Control) run before the UNet at each step, `unet` then the UNet that
        takes their residuals."""
        run = self.begin(unet, latents, sampler, evals, cond, guidance_scale, noise, control=control)
        mode = run.mode
        loop_key = (sampler.name, sampler.prediction_type, len(sampler.timesteps), evals.start, len(evals),
                    guidance_scale, noise is not None,
                    None if control is None else (tuple(control.nets), control.guess_mode,
                                                  tuple(net.active for net in run.nets)))
        shape, stream = run.shape, self.backend.stream
        if mode == "loop" and loop_key in shape.loops:
            shape.loops[loop_key][0].launch(stream)
            self.last_run = "loop-replay"
        else:
            run.steps(evals)
            self.last_run = mode
            if mode == "loop":
                self._capture(shape, loop_key, lambda: run.steps(evals))
        return run.result()

    def begin(self, unet: str, latents: np.ndarray, sampler: Sampler, evals: range, cond, guidance_scale: float,
              noise: np.ndarray | None = None, half: tuple[int, int] | None = None, control=None) -> Pass:
        """Everything `denoise` needs on the device for one call (inputs uploaded, buffers bound), as a Pass whose
        `model()` and `update()` queue one step's two parts. `half` = (k, 2): guidance split across two devices
        (parallel_loop.py): `cond` holds only this device's half of the guidance batch (k 0: the negatives, 1: the
        prompts), the UNet runs on those N rows and writes its half of the [2N] prediction; the other half is copied
        in from the other device between `model()` and `update()` (Pass.prediction says where). `control`
        (controlnet.Control, one device only): `unet` is the UNet that takes residuals, and each step runs the
        ControlNets first (see `_bind_nets`)."""
        embeds, pooled, time_ids = cond
        guided = guidance_scale > 1.0
        copies = 2 if guided and half is None else 1
        n = latents.size
        batch = copies * latents.shape[0]
        sample_shape = (batch, *latents.shape[1:])
        unet_shapes = {"sample": sample_shape, "timestep": (batch,), "encoder_hidden_states": embeds.shape,
                       "text_embeds": pooled.shape, "time_ids": time_ids.shape}
        residual_shapes = {}
        if control is not None:
            net_entry = self.backend.manifest.data["components"][control.nets[0]]
            residual_shapes = output_shapes(net_entry, {**unet_shapes, "controlnet_cond": control.images[0].shape,
                                                        "conditioning_scale": (control.residuals,)})
            residual_shapes = {name: (batch, *dims[1:]) for name, dims in residual_shapes.items()}
        session = self.backend.loop_session(unet, {**unet_shapes, **residual_shapes})
        sample_dtype = session.dtype("sample")
        out_dtype = session.output_dtypes["noise_pred"]
        shape = self._shape((unet, sample_shape, embeds.shape, pooled.shape, time_ids.shape, half))
        stream = self.backend.stream
        pool = shape.buffers

        def put(name, array):
            return pool.put(name, np.ascontiguousarray(array), stream)

        def empty(name, nbytes):
            return pool.reserve(name, nbytes).ptr

        begin = evals.start
        x = put("x", latents.astype(np.float32))
        coefficients = put("coefficients", coefficient_table(sampler, begin))
        step = put("step", np.array([begin], np.int32))
        timesteps = put("timesteps", np.repeat(sampler.timesteps[:, None], batch, axis=1).astype(np.float32))
        inputs = {"encoder_hidden_states": put("embeds", embeds.astype(session.dtype("encoder_hidden_states"))),
                  "text_embeds": put("pooled", pooled.astype(session.dtype("text_embeds"))),
                  "time_ids": put("time_ids", time_ids.astype(np.float32)),
                  "timestep": empty("timestep", batch * 4),
                  "sample": empty("sample", int(np.prod(sample_shape)) * np.dtype(sample_dtype).itemsize)}
        half_bytes = int(np.prod(sample_shape)) * np.dtype(out_dtype).itemsize
        pred = empty("pred", half_bytes * (2 if half else 1))
        eps = empty("eps", n * 4)
        prev = empty("prev", n * 4)
        noise_ptr = put("noise", noise.astype(np.float32)) if noise is not None else 0
        shapes = {"encoder_hidden_states": embeds.shape, "text_embeds": pooled.shape, "time_ids": time_ids.shape,
                  "timestep": (batch,), "sample": sample_shape, **residual_shapes}
        for name, dims in residual_shapes.items():
            inputs[name] = empty(f"residual {name}", int(np.prod(dims)) * np.dtype(session.dtype(name)).itemsize)
        bound = {k: (v, shapes[k], session.dtype(k)) for k, v in inputs.items()}
        context = getattr(session, "context", None)
        if context is not None:  # the cross-attentions' K and V of this call's prompts, computed now, read every step
            bound.update(context.into(pool, bound["encoder_hidden_states"]))
        own = pred + (half[0] * half_bytes if half else 0)  # where this device's UNet writes its prediction
        if self._bind(shape, session, bound, {"noise_pred": (own, sample_shape, out_dtype)}):
            for graph, _ in shape.loops.values():  # captured with the old buffers or session
                graph.close()
            shape.loops.clear()
        # ONNX Runtime's graph of this shape ("step"), or plain runs. Graphs need a session on an optimized file, which
        # ONNX Runtime accepted for CUDA graphs (every compute node on the GPU: no host copies inside a run)
        mode = self.backend.cuda_graphs if session.cuda_graph else "off"
        nets = []
        if control is not None:
            nets = self._bind_nets(control, sampler, shape, inputs, shapes, session, guided, latents.shape[0])
            mode = mode if all(net.session.cuda_graph for net in nets) else "off"
        run = Pass(self, shape, session, mode, latents.shape, dict(
            x=x, sample=inputs["sample"], sample_dtype=sample_dtype, coefficients=coefficients, step=step,
            timesteps=timesteps, timestep=inputs["timestep"], pred=pred, out_dtype=out_dtype, eps=eps, prev=prev,
            noise=noise_ptr, n=n, copies=copies, batch=batch, guided=guided, guidance=guidance_scale,
            sampler=sampler.name, prediction_type=sampler.prediction_type), half_bytes)
        run.nets = nets
        run.index = evals.start
        return run

    def _bind_nets(self, control, sampler: Sampler, unet_shape: _Shape, inputs: dict, shapes: dict, unet_session,
                   guided: bool, images: int) -> list[_Net]:
        """Bind each ControlNet to the pass's buffers: it reads the UNet's scaled sample, timestep and conditioning
        where the UNet reads them (in guess mode under guidance only the prompt's half: the second N rows), its
        control image and its scale row of the step (a [steps, R] table: controlnet.Control.scale_vector at every
        step of the schedule), and writes its residuals into the UNet's residual inputs (the first net; in guess
        mode into their second half, the first staying zero) or into buffers of its own that are then added. A net
        runs only at the steps of its window; at a step where the first does not run, its residuals are zeroed
        before the others' are added (so a whole-loop graph is one per pattern of windows: denoise's loop key)."""
        stream = self.backend.stream
        half = guided and control.guess_mode
        batch = shapes["sample"][0]
        rows = images if half else batch
        skip = batch - rows  # the rows of the guidance batch the nets do not see (guess mode: the negatives)
        residual_names = [name for name in shapes if name.startswith(("down_block_", "mid_block"))]
        nets = []
        for k, name in enumerate(control.nets):
            image = control.images[k] if not guided or half else np.concatenate([control.images[k]] * 2)
            net_shapes = {key: (rows, *shapes[key][1:]) for key in
                          ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")}
            net_shapes.update(controlnet_cond=image.shape, conditioning_scale=(control.residuals,))
            session = self.backend.loop_session(name, net_shapes)
            net = self._shape((name, tuple(net_shapes.items())))
            pool = net.buffers
            table = np.stack([control.scale_vector(k, i) for i in range(len(sampler.timesteps))]).astype(np.float32)
            scales = pool.put("scales", table, stream)
            scale = pool.reserve("scale", control.residuals * 4).ptr
            cond = pool.put("controlnet_cond", np.ascontiguousarray(image, session.dtype("controlnet_cond")), stream)
            feeds = {"controlnet_cond": (cond, image.shape, session.dtype("controlnet_cond")),
                     "conditioning_scale": (scale, (control.residuals,), np.float32)}
            for key in ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"):
                dtype = np.dtype(unet_session.dtype(key))
                if np.dtype(session.dtype(key)) != dtype:
                    raise ValueError(f"{name} takes {key} as {np.dtype(session.dtype(key))}, the UNet as {dtype}")
                row = int(np.prod(shapes[key][1:])) * dtype.itemsize
                feeds[key] = (inputs[key] + skip * row, net_shapes[key], dtype)
            outputs, sums, writes = {}, [], []
            for res in residual_names:
                dtype = np.dtype(unet_session.dtype(res))
                if np.dtype(session.output_dtypes[res]) != dtype:
                    raise ValueError(f"{name} writes {res} as {np.dtype(session.output_dtypes[res])}, the UNet reads "
                                     f"{dtype}")
                dims = (rows, *shapes[res][1:])
                count = int(np.prod(dims))
                target = inputs[res] + skip * (count // rows) * dtype.itemsize
                if k == 0:
                    outputs[res] = (target, dims, dtype)
                    writes.append((target, dtype, count))
                    if skip:  # the negatives' residuals: zero, written once
                        unet_shape.buffers[f"residual {res}"].upload(np.zeros(skip * count // rows, dtype), stream)
                else:
                    own = pool.reserve(res, count * dtype.itemsize).ptr
                    outputs[res] = (own, dims, dtype)
                    sums.append((target, own, dtype, count))
            if self._bind(net, session, feeds, outputs, also=tuple(sorted((key, v[0]) for key, v in
                                                                      {**feeds, **outputs}.items()))):
                for graph, _ in unet_shape.loops.values():  # a whole loop captured with the old binding
                    graph.close()
                unet_shape.loops.clear()
            nets.append(_Net(session, net, scales, scale, control.residuals, sums,
                             tuple(bool(row.any()) for row in table), writes))
        return nets

    @_on_backend_device
    def decode(self, vae: str, latents: np.ndarray, scaling_factor: float, shift: float) -> np.ndarray:
        """Latents [N,4,h,w] fp32 → images [N,H,W,3] uint8, as Pipeline.decode + images.to_uint8 compute them, on the
        device: the unscaling kernel, the VAE (IOBinding; ONNX Runtime's CUDA graph per shape as for the UNet), then
        the kernel that writes uint8 NHWC pixels and flags NaN/Inf; only the pixels come back. A flagged image goes to
        the backend's overflow handling (the fp32 VAE from then on, or an error), then is decoded again. A batch is
        decoded DECODE_BATCH images at a time, on the sessions (and graphs) of that batch size."""
        parts = []
        for start in range(0, len(latents), DECODE_BATCH):
            part = latents[start:start + DECODE_BATCH]
            while True:
                session = self.backend.decode_session(vae, part.shape)
                images = self._decode_on(session, vae, part, scaling_factor, shift)
                if images is not None:
                    break
                self.backend.overflowed(vae)
            parts.append(images)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _decode_on(self, session, vae: str, latents: np.ndarray, scaling_factor: float, shift: float):
        shape = self._shape((vae, latents.shape))
        stream, pool, k = self.backend.stream, shape.buffers, self.kernels
        image_shape = output_shapes(session.entry, {"latent": latents.shape})["image"]
        n_images, channels, height, width = image_shape
        latent_dtype, image_dtype = session.dtype("latent"), session.output_dtypes["image"]
        x = pool.put("x", latents.astype(np.float32), stream)
        latent = pool.reserve("latent", latents.size * np.dtype(latent_dtype).itemsize).ptr
        image = pool.reserve("image", int(np.prod(image_shape)) * np.dtype(image_dtype).itemsize).ptr
        pixels = pool.reserve("pixels", int(np.prod(image_shape))).ptr
        nonfinite = pool.put("nonfinite", np.zeros(1, np.int32), stream)
        self._bind(shape, session, {"latent": (latent, latents.shape, latent_dtype)},
                   {"image": (image, image_shape, image_dtype)})
        k.unscale_latents(x, latent, latent_dtype, scaling_factor, shift, latents.size)
        session.run_bound(shape.binding[0], shape.graph_id if session.cuda_graph else -1)
        k.to_uint8(image, image_dtype, pixels, nonfinite, channels, height * width, int(np.prod(image_shape)))
        out = pool["pixels"].download(np.empty((n_images, height, width, channels), np.uint8), stream)
        flag = pool["nonfinite"].download(np.empty(1, np.int32), stream)
        stream.synchronize()
        self.backend.settle()
        return None if flag[0] else out

    @_on_backend_device
    def encode(self, encoder: str, ids: np.ndarray) -> dict[str, np.ndarray]:
        """A text encoder on token ids [B, 77], as its session's `run` computes it, on a session made for this shape
        with ONNX Runtime's CUDA graph (the encoders are hundreds of small kernels each: launched one by one they
        take far longer than they compute): the ids are uploaded into the same device buffer every call and the
        outputs read back. Without graphs (--cuda-graphs off, no optimized file, graphs refused) a plain run."""
        session = self.backend.loop_session(encoder, {"input_ids": ids.shape})
        if not session.cuda_graph:
            out = session.run(input_ids=ids)
            self.backend.settle()
            return out
        shape = self._shape((encoder, ids.shape))
        stream, pool = self.backend.stream, shape.buffers
        ids = np.ascontiguousarray(ids, dtype=session.dtype("input_ids"))
        pool.put("input_ids", ids, stream)
        out = {name: np.empty(dims, session.output_dtypes[name])
               for name, dims in output_shapes(session.entry, {"input_ids": ids.shape}).items()}
        self._bind(shape, session, {"input_ids": (pool["input_ids"].ptr, ids.shape, ids.dtype)},
                   {name: (pool.reserve(name, array.nbytes).ptr, array.shape, array.dtype) for name, array in out.items()})
        # while sessions are made on other threads (prepare), no capture: their allocations would break it
        session.run_bound(shape.binding[0], -1 if getattr(self.backend, "preparing", False) else shape.graph_id)
        for name, array in out.items():
            pool[name].download(array, stream)
        stream.synchronize()
        self.backend.settle()
        return out

    def _shape(self, key: tuple) -> _Shape:
        """The buffers, binding and graph id kept for one (component, shapes) key, made on first use."""
        if key not in self._shapes:
            self._shapes[key] = _Shape(graph_id=next(self._graph_ids))
        return self._shapes[key]

    @staticmethod
    def _bind(shape: _Shape, session, inputs: dict, outputs: dict, also: tuple = ()) -> bool:
        """Bind `session` to `shape`'s device buffers ({name: (address, shape, dtype)}, every buffer reserved), unless
        the binding kept is for these addresses and this session already; True when it was made again. `also`: more
        that the binding depends on (a ControlNet's: the addresses in the UNet's buffers it reads and writes)."""
        addresses = {name: buffer.ptr for name, buffer in shape.buffers.items()}
        addresses[None] = also
        if shape.binding is not None and shape.binding[1] == addresses and shape.binding[2] is session:
            return False
        _close_binding(shape)
        binding = session.new_binding()
        session.bind(binding, inputs, outputs)
        shape.binding = (binding, addresses, session)
        return True

    def forget(self, component: str) -> None:
        """Drop the buffers, bindings and graphs kept for a component's shapes (a UNet's, a VAE's, a text encoder's)."""
        self._drop([k for k in self._shapes if k[0] == component])

    def forget_session(self, session) -> None:
        """Drop what was kept for the shapes bound to `session` (the backend let it go: its memory goes with it)."""
        self._drop([k for k, shape in self._shapes.items() if shape.binding is not None and shape.binding[2] is session])

    def _drop(self, keys: list) -> None:
        for key in keys:
            shape = self._shapes.pop(key)
            for graph, _ in shape.loops.values():
                graph.close()
            _close_binding(shape)
            for buffer in shape.buffers.values():
                buffer.free()

    def _capture(self, shape: _Shape, loop_key: tuple, queue_loop) -> None:
        """Record the loop (already run once, so every algorithm is chosen and memory is pooled) as one graph."""
        stream = self.backend.stream
        graph = Graph()
        try:
            stream.synchronize()
            with capturing(), graph.capture(stream):
                queue_loop()
        except Exception as e:  # a library call that cannot be captured: per-step graphs on a fresh session
            graph.close()
            log.warning("the denoising loop could not be captured as one CUDA graph (%s); using ONNX Runtime's "
                        "per-step CUDA graphs instead", str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
            self.backend.cuda_graphs = "step"
            self.backend.drop_loop_sessions()
            for unet in {key[0] for key in self._shapes}:
                self.forget(unet)
            return
        shape.loops[loop_key] = (graph, dict(shape.binding[1]))
        self.last_run = "loop-capture"
