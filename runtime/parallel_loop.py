"""The denoising loop over several GPUs (`--devices 0,1`, ort-cuda): one image's guidance halves in parallel, or a
batch's images split across the GPUs.

Every GPU holds the UNets (the primary backend, on the first GPU, holds the text encoders and the VAE too: they run
there) and runs its part of each step as the one-GPU loop does (device_loop.Pass: ONNX Runtime's CUDA graph of the
UNet per shape, our NVRTC kernels around it), all queued from this one thread, each GPU on its own stream:

  - "halves" — one image under guidance (the case latency is bought for): GPU 0 evaluates the UNet on the negative
    prompt, GPU 1 on the prompt, each into its half of a [2, 4, h, w] prediction buffer of its own. Each GPU then
    copies the other's half into its buffer, device to device (cudaMemcpyPeerAsync: NVLink or PCIe peer to peer where
    the GPUs allow it, enabled at start), and both apply the same guidance and sampler kernels to the same bytes, so
    their latents stay bit-identical without any host round trip. Events order the GPUs: a GPU copies the other's
    half once the other has recorded `ready` after its UNet, and overwrites its own half (next step's UNet) only after
    the other has recorded `pulled`, i.e. has copied it. The host never waits inside the loop.
  - "images" — a batch (with or without guidance): the images are split across the GPUs (each image's own rows of
    the conditioning and of the sampler's noise), each GPU runs the whole loop for its images, no exchange.
  - "one" — one image without guidance: nothing to split; it runs on the first GPU.

`--cuda-graphs loop` (one graph of the whole loop) is a one-GPU mode: across GPUs each step's UNet is ONNX Runtime's
graph ("step") and the loop is queued step by step (a warning says so once). Requests the device loop does not take
(inpainting, guidance rescale, samplers without a kernel) run on the first GPU's host loop (pipeline.py warns).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .cuda import Event, copy_peer, enable_peer_access, on_device, set_device
from .device_loop import DeviceLoop, Pass
from .samplers import Sampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """How one denoising call is spread: `kind` "halves", "images" or "one"; `parts`: for "images" each GPU's
    (index into the devices, first image, end image), for "halves" the two GPUs' indices."""

    kind: str
    parts: tuple


def split(images: int, guided: bool, devices: int) -> Split:
    """The split of `images` images (under guidance or not) across `devices` GPUs: the guidance halves for one
    guided image, the images (as evenly as they go, the first GPUs taking one more) for a batch, else one GPU."""
    if devices >= 2 and images == 1 and guided:
        return Split("halves", (0, 1))
    if devices >= 2 and images >= 2:
        used = min(devices, images)
        bounds = np.cumsum([0] + [images // used + (k < images % used) for k in range(used)])
        return Split("images", tuple((k, int(bounds[k]), int(bounds[k + 1])) for k in range(used)))
    return Split("one", (0,))


def split_batch(batch: int, devices: int) -> list[int]:
    """Each GPU's UNet batch for a call whose one-GPU UNet batch is `batch` (what `prepare` makes sessions for): an
    even batch read as guided images (2 → the two halves, one row each), an odd one as images without guidance."""
    guided = batch % 2 == 0
    images = batch // 2 if guided else batch
    plan = split(images, guided, devices)
    if plan.kind == "halves":
        return [images, images] + [0] * (devices - 2)
    if plan.kind == "one":
        return [batch] + [0] * (devices - 1)
    out = [0] * devices
    for k, first, end in plan.parts:
        out[k] = (end - first) * (2 if guided else 1)
    return out


def rows(cond, first: int, end: int, images: int, guided: bool):
    """The conditioning (context, pooled, time_ids; negatives first under guidance) of images first..end-1."""
    index = np.r_[first:end, images + first:images + end] if guided else np.arange(first, end)
    return tuple(np.ascontiguousarray(c[index]) for c in cond)


class ParallelLoop:
    """The device loop across the primary backend's GPU and its partners' (ort_cuda.OrtCudaBackend `devices`): the
    DeviceLoop interface the pipeline uses (denoise, encode, decode), the denoising split as the module says."""

    def __init__(self, primary: DeviceLoop, partners: list[DeviceLoop]):
        self.primary, self.partners = primary, partners
        self.loops = [primary, *partners]
        self.devices = [loop.backend.device_id for loop in self.loops]
        self.direct = enable_peer_access(self.devices)  # {(a, b): whether a reads/writes b's memory directly}
        self._events: dict[int, tuple[Event, Event]] = {}  # device → (ready, pulled), made on that device
        self._timers: dict[int, list[Event]] = {}  # timing events of the exchange on the first GPU, by count
        self._warned: set[str] = set()  # warnings given once per pipeline
        self.last_run = None  # as DeviceLoop.last_run, for the first GPU
        self.last_split = None  # the Split of the last denoising call
        self.last_exchange_ms: list[float] = []  # "halves": the first GPU's copy of the other half, per step
        self.last_passes: list[Pass] = []

    @property
    def backend(self):
        return self.primary.backend

    @property
    def kernels(self):
        return self.primary.kernels

    def encode(self, encoder: str, ids: np.ndarray) -> dict[str, np.ndarray]:
        return self.primary.encode(encoder, ids)

    def decode(self, vae: str, latents: np.ndarray, scaling_factor: float, shift: float) -> np.ndarray:
        return self.primary.decode(vae, latents, scaling_factor, shift)

    def forget(self, component: str) -> None:
        self.primary.forget(component)

    def forget_session(self, session) -> None:
        self.primary.forget_session(session)

    def graphs_held(self) -> int:
        return sum(loop.graphs_held() for loop in self.loops)

    def denoise(self, unet: str, latents: np.ndarray, sampler: Sampler, evals: range, cond, guidance_scale: float,
                noise: np.ndarray | None = None, control=None) -> np.ndarray:
        """DeviceLoop.denoise's contract, spread over the GPUs (`split`); ControlNet calls run on the first GPU."""
        images, guided = latents.shape[0], guidance_scale > 1.0
        plan = split(images, guided, len(self.loops)) if control is None else Split("one", (0,))
        self.last_split = plan
        if control is not None:
            self._warn_once("control", "ControlNet runs on GPU %d alone (the loop across GPUs does not take it yet)",
                            self.devices[0])
            with on_device(self.devices[0]):
                out = self.primary.denoise(unet, latents, sampler, evals, cond, guidance_scale, noise, control)
            self.last_run = self.primary.last_run
            return out
        if plan.kind == "one":
            self._warn_once("one", "one image without guidance has nothing to split: it runs on GPU %d alone",
                            self.devices[0])
            with on_device(self.devices[0]):
                out = self.primary.denoise(unet, latents, sampler, evals, cond, guidance_scale, noise)
            self.last_run = self.primary.last_run
            return out
        if self.backend.cuda_graphs == "loop":
            self._warn_once("loop", "--cuda-graphs loop is for one GPU: across %d GPUs each step's UNet is a CUDA "
                            "graph of its own (step)", len(self.loops))
        previous = self.devices[0]
        try:
            if plan.kind == "halves":
                return self._halves(unet, latents, sampler, evals, cond, guidance_scale, noise)
            return self._images(plan, unet, latents, sampler, evals, cond, guidance_scale, noise)
        finally:
            set_device(previous)  # ONNX Runtime leaves its last run's device current

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def _begin(self, k: int, *args, **kwargs) -> Pass:
        set_device(self.devices[k])
        run = self.loops[k].begin(*args, **kwargs)
        if run.mode == "loop":
            run.mode = "step"
        return run

    def _halves(self, unet, latents, sampler, evals, cond, guidance_scale, noise) -> np.ndarray:
        images = latents.shape[0]
        # GPU 0 the negatives' rows, GPU 1 the prompts'
        runs = [self._begin(k, unet, latents, sampler, evals,
                            tuple(np.ascontiguousarray(c[k * images:(k + 1) * images]) for c in cond), guidance_scale,
                            noise, half=(k, 2)) for k in (0, 1)]
        events = [self._events_on(self.devices[k]) for k in (0, 1)]
        streams = [self.loops[k].backend.stream for k in (0, 1)]
        timers = self._timers_for(2 * len(evals))
        for s in range(len(evals)):
            for k in (0, 1):
                set_device(self.devices[k])
                if s:
                    events[1 - k][1].wait(streams[k])  # the other GPU has copied this GPU's half of the last step
                runs[k].model()
                events[k][0].record(streams[k])
            for k in (0, 1):
                other = 1 - k
                set_device(self.devices[k])
                events[other][0].wait(streams[k])  # the other GPU's half of this step is written
                if k == 0:
                    timers[2 * s].record(streams[k])
                offset = other * runs[k].half_bytes
                copy_peer(runs[k].prediction + offset, self.devices[k], runs[other].prediction + offset,
                          self.devices[other], runs[k].half_bytes, streams[k])
                if k == 0:
                    timers[2 * s + 1].record(streams[k])
                events[k][1].record(streams[k])
                runs[k].update()
        set_device(self.devices[1])
        streams[1].synchronize()
        set_device(self.devices[0])
        out = runs[0].result()
        self.last_exchange_ms = [timers[2 * s].elapsed_ms(timers[2 * s + 1]) for s in range(len(evals))]
        self.last_passes = runs  # tests read the second GPU's latents back: the same bytes
        self.last_run = runs[0].mode
        return out

    def _images(self, plan: Split, unet, latents, sampler, evals, cond, guidance_scale, noise) -> np.ndarray:
        images, guided = latents.shape[0], guidance_scale > 1.0
        runs = [self._begin(k, unet, latents[first:end], sampler, evals, rows(cond, first, end, images, guided),
                            guidance_scale, None if noise is None else np.ascontiguousarray(noise[:, first:end]))
                for k, first, end in plan.parts]
        for _ in evals:
            for (k, _, _), run in zip(plan.parts, runs):
                set_device(self.devices[k])
                run.model()
                run.update()
        parts = []
        for (k, _, _), run in zip(plan.parts, runs):
            set_device(self.devices[k])
            parts.append(run.result())
        self.last_run = runs[0].mode
        self.last_exchange_ms = []
        return np.concatenate(parts)

    def _events_on(self, device: int) -> tuple[Event, Event]:
        if device not in self._events:
            with on_device(device):
                self._events[device] = (Event(), Event())
        return self._events[device]

    def _timers_for(self, count: int) -> list[Event]:
        if count not in self._timers:
            with on_device(self.devices[0]):
                self._timers[count] = [Event(timing=True) for _ in range(count)]
        return self._timers[count]
