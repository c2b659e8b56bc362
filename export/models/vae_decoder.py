"""`vae_decoder`: latents (already divided by the VAE scaling factor) → image in [-1, 1], not yet clamped."""

from __future__ import annotations

import torch

from ..contract import FLOAT, Component, TensorSpec, generator
from .unet import LATENT_FACTOR


class DecoderWrapper(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class VaeDecoder(Component):
    name = "vae_decoder"
    module = "vae"
    fp16_needs_safe_weights = True  # the SDXL 1.0 VAE overflows fp16 (diffusers: config.force_upcast)

    def inputs(self):
        return [TensorSpec("latent", FLOAT, ("B", self.config.latent_channels, "h", "w"))]

    def outputs(self):
        return [TensorSpec("image", FLOAT, ("B", self.config.out_channels, "H", "W"))]

    def wrapper(self):
        return DecoderWrapper(self.torch_module).eval()

    def sample_inputs(self, batch, height, width, windows=1, dtype=None, seed=0):
        c = self.config
        latent = torch.randn(batch, c.latent_channels, height // LATENT_FACTOR, width // LATENT_FACTOR,
                             generator=generator(seed))
        return (latent.to(dtype or torch.float32),)
