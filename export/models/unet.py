"""`unet`: the SDXL base UNet. Context: clip_l ∥ clip_g states; added conditioning: pooled clip_g embedding and six
micro-conditioning values (original height, width; crop top, left; target height, width)."""

from __future__ import annotations

import torch

from ..contract import FLOAT, FLOAT32, TOKENS, Component, TensorSpec, generator

LATENT_FACTOR = 8  # pixels per latent along each side


class UnetWrapper(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=cond,
                         return_dict=False)[0]


class Unet(Component):
    name = "unet"
    module = "unet"
    time_ids = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")

    @property
    def pooled_dim(self) -> int:
        c = self.config
        return c.projection_class_embeddings_input_dim - len(self.time_ids) * c.addition_time_embed_dim

    def inputs(self):
        c = self.config
        return [TensorSpec("sample", FLOAT, ("B", c.in_channels, "h", "w")),
                TensorSpec("timestep", FLOAT32, ("B",)),
                TensorSpec("encoder_hidden_states", FLOAT, ("B", "S", c.cross_attention_dim)),
                TensorSpec("text_embeds", FLOAT, ("B", self.pooled_dim)),
                TensorSpec("time_ids", FLOAT32, ("B", len(self.time_ids)))]

    def outputs(self):
        return [TensorSpec("noise_pred", FLOAT, ("B", self.config.out_channels, "h", "w"))]

    def wrapper(self):
        return UnetWrapper(self.torch_module).eval()

    def time_id_values(self, height: int, width: int) -> list[float]:
        return [height, width, 0, 0, height, width]

    def sample_inputs(self, batch, height, width, windows=1, dtype=None, seed=0):
        g = generator(seed)
        c = self.config
        dtype = dtype or torch.float32
        h, w = height // LATENT_FACTOR, width // LATENT_FACTOR
        return (torch.randn(batch, c.in_channels, h, w, generator=g).to(dtype),
                torch.linspace(999, 1, batch, dtype=torch.float32),
                torch.randn(batch, TOKENS * windows, c.cross_attention_dim, generator=g).to(dtype),
                torch.randn(batch, self.pooled_dim, generator=g).to(dtype),
                torch.tensor([self.time_id_values(height, width)] * batch, dtype=torch.float32))
