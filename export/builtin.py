"""The built-in models: `random:base|refiner` (official architectures, full size, random weights, for
benchmarks) and `tiny:base|refiner` (the same topology at tiny widths, for tests and the demo).

Both are deterministic: each component has its own seed, so the refiner's CLIP-G and VAE come out identical
to the base's, as they are in the released SDXL 1.0 weights (the exporter shares them by hash). Modules are
built directly on the target device in the target dtype: a full-size UNet never exists twice in memory.
"""

from __future__ import annotations

import contextlib

from tqdm.auto import tqdm

from .modules import build
from .sources import ModelSource, SourceSpec
from .vocab import cached_tokenizer_dirs

SEEDS = {"clip_l": 1, "clip_g": 2, "vae": 3, "unet": {"base": 4, "refiner": 5}}


@contextlib.contextmanager
def _building(seed: int, dtype, device):
    import torch

    device = torch.device(device)
    old = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)  # parameters are created in `dtype` directly
        try:
            with device:
                yield
        finally:
            torch.set_default_dtype(old)


def load_builtin(src: SourceSpec, *, dtype, device, names: list[str], progress: bool = True) -> ModelSource:
    config_dir = src.config_dir
    modules = {}
    for name in tqdm(names, desc=f"building {src.spec}", disable=not progress, leave=False):
        seed = SEEDS[name][src.role] if name == "unet" else SEEDS[name]
        with _building(seed, dtype, device):
            modules[name] = build(name, config_dir)
    return ModelSource.assemble(src, modules, config_dir, cached_tokenizer_dirs(config_dir))
