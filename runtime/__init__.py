"""The lean SDXL runtime: tokenizer, text encoding, denoising loop, VAE decode.

This package must never import torch, diffusers or transformers (a test checks it in a fresh
interpreter); everything here runs on numpy and the inference backends.
"""

from .errors import UserError, VerificationError
from .pipeline import Pipeline
from .tokenizer import ClipTokenizer

__all__ = ["ClipTokenizer", "Pipeline", "UserError", "VerificationError"]
