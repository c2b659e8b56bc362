"""`vae_encoder`: image in [-1, 1] → the latent distribution's mean and log-variance (img2img and inpainting
sample from it, or take the mean, with the runtime's own noise)."""

from __future__ import annotations

import torch

from ..contract import FLOAT, Component, TensorSpec, generator


class EncoderWrapper(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        dist = self.vae.encode(image, return_dict=False)[0]
        return dist.mean, dist.logvar


class VaeEncoder(Component):
    name = "vae_encoder"
    module = "vae"
    fp16_needs_safe_weights = True

    def inputs(self):
        return [TensorSpec("image", FLOAT, ("B", self.config.in_channels, "H", "W"))]

    def outputs(self):
        channels = self.config.latent_channels
        return [TensorSpec("latent_mean", FLOAT, ("B", channels, "h", "w")),
                TensorSpec("latent_logvar", FLOAT, ("B", channels, "h", "w"))]

    def wrapper(self):
        return EncoderWrapper(self.torch_module).eval()

    def sample_inputs(self, batch, height, width, windows=1, dtype=None, seed=0):
        image = torch.rand(batch, self.config.in_channels, height, width, generator=generator(seed)) * 2 - 1
        return (image.to(dtype or torch.float32),)
