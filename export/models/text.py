"""What both CLIP text encoders share: the traced wrapper and the sample token ids."""

from __future__ import annotations

import torch

from ..contract import TOKENS, Component, generator

BOS, EOS = 49406, 49407  # CLIP's <|startoftext|> and <|endoftext|>


class PenultimateWrapper(torch.nn.Module):
    """Returns the hidden states of the second-to-last layer (what SDXL conditions on), and with `pooled` also
    the projected pooled embedding. The last layer stays in the graph only where the pooled output needs it."""

    def __init__(self, model, pooled: bool):
        super().__init__()
        self.model, self.pooled = model, pooled

    def forward(self, input_ids):
        out = self.model(input_ids.long(), output_hidden_states=True)
        hidden = out.hidden_states[-2]
        return (hidden, out.text_embeds) if self.pooled else hidden


class TextEncoder(Component):
    pooled = False

    def wrapper(self):
        return PenultimateWrapper(self.torch_module, self.pooled).eval()

    def sample_inputs(self, batch, height=None, width=None, windows=1, dtype=None, seed=0):
        """Token rows as a tokenizer makes them: <bos>, words, <eos>, then padding (ids 0 here)."""
        g = generator(seed)
        vocab = self.config.vocab_size
        ids = torch.zeros(batch, TOKENS, dtype=torch.int32)
        for row in ids:
            n = int(torch.randint(1, TOKENS - 1, (1,), generator=g))
            row[0], row[n + 1] = BOS, EOS
            row[1 : n + 1] = torch.randint(1, min(vocab, BOS), (n,), generator=g, dtype=torch.int32)
        return (ids,)
