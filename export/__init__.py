"""The torch side: load SDXL weights from any supported source and (later) trace them to ONNX.

Nothing is ever downloaded: the hub is switched off before diffusers or transformers are imported.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # silences "CLIPImageProcessor requires torchvision" notes

from .sources import ModelSource, SourceSpec, load_model, resolve  # noqa: E402

__all__ = ["ModelSource", "SourceSpec", "load_model", "resolve"]
