"""The denoising loop on the GPU: latents, the UNet's input and output, the guided prediction, the sampler's state,
its per-step coefficients and the step counter all stay in device memory; each step queues the input-scaling
kernel, the UNet (IOBinding on those buffers), the guidance kernel, the sampler's step kernel and the counter's
advance on one stream, with no host synchronisation until the final latents are read back.

The kernels (kernels/step.cu) compute exactly what the numpy loop of pipeline.py computes; per-step noise is drawn
in advance on the host from each image's own generator in the order the numpy loop draws it, so the streams are
the CPU runtime's. Not here yet: inpainting, guidance rescale, heun / dpmpp_sde_karras / tcd (the pipeline
keeps its numpy loop for those), and capturing the loop as a CUDA graph (issue 7).
"""

from __future__ import annotations

import numpy as np

from .cuda import BufferPool
from .samplers import KERNEL_KINDS, Sampler, coefficient_table


def supported(sampler: Sampler, guidance_rescale: float, inpainting: bool) -> bool:
    return sampler.name in KERNEL_KINDS and guidance_rescale == 0 and not inpainting


class DeviceLoop:
    def __init__(self, backend):
        import cuda.core as core

        from ..kernels.nvrtc import StepKernels

        self.backend = backend
        self.kernels = StepKernels.load(stream=core.Stream.from_handle(backend.stream.ptr))
        self.buffers = BufferPool()

    def _put(self, name: str, array: np.ndarray) -> int:
        return self.buffers.put(name, array, self.backend.stream)

    def _empty(self, name: str, nbytes: int) -> int:
        return self.buffers.reserve(name, nbytes).ptr

    def denoise(self, unet: str, latents: np.ndarray, sampler: Sampler, evals: range, cond, guidance_scale: float,
                noise: np.ndarray | None = None) -> np.ndarray:
        """`evals` of `sampler` from `latents` [N,4,h,w] fp32 with cond = (context, pooled, time_ids) as the numpy
        loop takes them (negatives first under guidance); `noise`: [n_evals, N,4,h,w] for samplers that draw it."""
        session = self.backend.session(unet)
        embeds, pooled, time_ids = cond
        guided = guidance_scale > 1.0
        copies = 2 if guided else 1
        n = latents.size
        batch = copies * latents.shape[0]
        sample_shape = (batch, *latents.shape[1:])
        sample_dtype = session.dtype("sample")
        out_dtype = session.output_dtypes["noise_pred"]
        begin = evals.start
        x = self._put("x", latents.astype(np.float32))
        coefficients = self._put("coefficients", coefficient_table(sampler, begin))
        step = self._put("step", np.array([begin], np.int32))
        timesteps = self._put("timesteps", np.repeat(sampler.timesteps[:, None], batch, axis=1).astype(np.float32))
        fixed = {"encoder_hidden_states": (self._put("embeds", embeds.astype(session.dtype("encoder_hidden_states"))),
                                           embeds.shape, session.dtype("encoder_hidden_states")),
                 "text_embeds": (self._put("pooled", pooled.astype(session.dtype("text_embeds"))), pooled.shape,
                                 session.dtype("text_embeds")),
                 "time_ids": (self._put("time_ids", time_ids.astype(np.float32)), time_ids.shape, np.float32)}
        sample = self._empty("sample", int(np.prod(sample_shape)) * np.dtype(sample_dtype).itemsize)
        pred = self._empty("pred", int(np.prod(sample_shape)) * np.dtype(out_dtype).itemsize)
        eps = self._empty("eps", n * 4)
        prev = self._empty("prev", n * 4)
        noise_ptr = self._put("noise", noise.astype(np.float32)) if noise is not None else 0
        k = self.kernels
        for i in evals:
            k.scale_input(x, sample, sample_dtype, coefficients, step, n, copies)
            session.run_device({"sample": (sample, sample_shape, sample_dtype),
                                "timestep": (timesteps + i * batch * 4, (batch,), np.float32), **fixed},
                               {"noise_pred": (pred, sample_shape, out_dtype)})
            if guided:
                k.cfg_combine(pred, out_dtype, eps, guidance_scale, n)
            else:
                k.widen(pred, out_dtype, eps, n)
            k.sampler_step(sampler.name, x, eps, coefficients, step, sampler.prediction_type, n, prev=prev,
                           noise=noise_ptr)
            k.advance_step(step)
        out = self.buffers["x"].download(np.empty(latents.shape, np.float32), self.backend.stream)
        self.backend.stream.synchronize()
        return out
