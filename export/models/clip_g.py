"""`clip_g`: OpenCLIP ViT-bigG/14 text encoder: penultimate hidden states and the projected pooled embedding."""

from ..contract import FLOAT, INT32, TOKENS, TensorSpec
from .text import TextEncoder


class ClipG(TextEncoder):
    name = "clip_g"
    module = "clip_g"
    pooled = True

    def inputs(self):
        return [TensorSpec("input_ids", INT32, ("B", TOKENS))]

    def outputs(self):
        config = self.config
        return [TensorSpec("hidden_states", FLOAT, ("B", TOKENS, config.hidden_size)),
                TensorSpec("text_embeds", FLOAT, ("B", config.projection_dim))]
