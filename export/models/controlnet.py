"""`controlnet`: an SDXL ControlNet (diffusers' ControlNetModel), and `unet_control`: the base UNet that takes its
residuals.

The ControlNet takes the UNet's inputs plus the control image (`controlnet_cond`, [B,3,H,W] in [0, 1]) and one scale
per residual (`conditioning_scale`, [R]): the runtime passes the user's conditioning scale in every slot, or
diffusers' guess-mode ramp (logspace(-1, 0, R) × scale), or zeros outside the net's guidance window, so one file
serves every mode. Its outputs are the down-block residuals (`down_block_0` … in diffusers' order, one per skip
connection of the UNet) and `mid_block`. Several ControlNets' residuals are summed by the runtime.

`unet_control` is a second file of the base UNet with the residuals as extra inputs (diffusers'
`down_block_additional_residuals` / `mid_block_additional_residual`): the plain `unet` file stays as it is, so an
image without ControlNet pays nothing for them.

Residual shapes follow the UNet's levels: level k has the latent size divided by 2^k, rounded up (a stride-2 conv
with padding 1), named `h/2`, `w/2`, `h/4`, … in the contract (runtime/contracts.py computes them).
"""

from __future__ import annotations

import torch

from ...runtime.contracts import derived
from ..contract import FLOAT, FLOAT32, TensorSpec
from .unet import LATENT_FACTOR, Unet, UnetWrapper


def level_dims(level: int) -> tuple[str, str]:
    return ("h", "w") if level == 0 else (f"h/{2 ** level}", f"w/{2 ** level}")


def residual_specs(config) -> list[TensorSpec]:
    """The ControlNet's outputs = the control UNet's extra inputs: conv_in's output, each resnet's and each
    down-sampler's, then the mid block's."""
    channels = list(config.block_out_channels)
    specs = [TensorSpec("down_block_0", FLOAT, ("B", channels[0], *level_dims(0)))]
    for level, c in enumerate(channels):
        for _ in range(config.layers_per_block):
            specs.append(TensorSpec(f"down_block_{len(specs)}", FLOAT, ("B", c, *level_dims(level))))
        if level < len(channels) - 1:
            specs.append(TensorSpec(f"down_block_{len(specs)}", FLOAT, ("B", c, *level_dims(level + 1))))
    specs.append(TensorSpec("mid_block", FLOAT, ("B", channels[-1], *level_dims(len(channels) - 1))))
    return specs


def residual_shape(spec: TensorSpec, batch: int, h: int, w: int) -> tuple[int, ...]:
    values = derived({"B": batch, "h": h, "w": w})
    return tuple(values[d] if isinstance(d, str) else d for d in spec.shape)


class ControlNetWrapper(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, controlnet_cond,
                conditioning_scale):
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        down, mid = self.net(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             controlnet_cond=controlnet_cond, conditioning_scale=1.0, added_cond_kwargs=cond,
                             return_dict=False)
        scale = conditioning_scale.to(mid.dtype)
        return (*(d * scale[i] for i, d in enumerate(down)), mid * scale[len(down)])


class ControlNet(Unet):
    """Inputs: the base UNet's, `controlnet_cond` and `conditioning_scale`; outputs: the residuals."""

    name = "controlnet"
    module = "controlnet"
    # the fp16 file against torch fp32, in multiples of torch fp16's own error: measured 3.6× on the tiny ControlNet's
    # residuals after its first attention block (ONNX Runtime's fp16 attention on the CPU against torch's, which
    # accumulates in fp32), where the UNet's single output stays within verify.FP16_FACTOR (3×)
    fp16_factor = 5.0

    @property
    def residuals(self) -> int:
        return len(residual_specs(self.config))

    def inputs(self):
        return [*super().inputs(), TensorSpec("controlnet_cond", FLOAT, ("B", 3, "H", "W")),
                TensorSpec("conditioning_scale", FLOAT32, (self.residuals,))]

    def outputs(self):
        return residual_specs(self.config)

    def wrapper(self):
        return ControlNetWrapper(self.torch_module).eval()

    def sample_inputs(self, batch, height, width, windows=1, dtype=None, seed=0):
        g = torch.Generator().manual_seed(seed + 101)
        dtype = dtype or torch.float32
        image = torch.rand(batch, 3, height, width, generator=g).to(dtype)
        scales = 0.5 + torch.rand(self.residuals, generator=g)  # not all one: each slot's scale must be its own
        return (*super().sample_inputs(batch, height, width, windows, dtype, seed), image, scales)


class UnetControlWrapper(UnetWrapper):
    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, *residuals):
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=cond,
                         down_block_additional_residuals=residuals[:-1], mid_block_additional_residual=residuals[-1],
                         return_dict=False)[0]


class UnetControl(Unet):
    """The base UNet with the ControlNet residuals as inputs after its own."""

    name = "unet_control"

    def inputs(self):
        return [*super().inputs(), *residual_specs(self.config)]

    def wrapper(self):
        return UnetControlWrapper(self.torch_module).eval()

    def sample_inputs(self, batch, height, width, windows=1, dtype=None, seed=0):
        g = torch.Generator().manual_seed(seed + 202)
        dtype = dtype or torch.float32
        h, w = height // LATENT_FACTOR, width // LATENT_FACTOR
        residuals = tuple(torch.randn(residual_shape(s, batch, h, w), generator=g).to(dtype)
                          for s in residual_specs(self.config))
        return (*super().sample_inputs(batch, height, width, windows, dtype, seed), *residuals)
