"""`clip_l`: CLIP ViT-L/14 text encoder, penultimate hidden states (SDXL's first context half)."""

from ..contract import FLOAT, INT32, TOKENS, TensorSpec
from .text import TextEncoder


class ClipL(TextEncoder):
    name = "clip_l"
    module = "clip_l"

    def inputs(self):
        return [TensorSpec("input_ids", INT32, ("B", TOKENS))]

    def outputs(self):
        return [TensorSpec("hidden_states", FLOAT, ("B", TOKENS, self.config.hidden_size))]
