"""Decoding large latents in tiles (`--low-memory`): the VAE sees one tile at a time, so its activations (several GB
for a 2048² image) never exist for the whole image at once.

The tiling is diffusers' (`AutoencoderKL.enable_tiling()`): tiles of `tile` latent pixels stepping by 75 % of a
tile; each decoded tile is blended linearly over 25 % of its height into the tile above and of its width into the
tile to its left, then cropped to 75 % of its size. Same blending, same order (the blended tile above feeds the
blend to the left), so the result is diffusers' tiled decode, and a latent no larger than one tile is decoded whole.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

OVERLAP = 0.25  # diffusers' tile_overlap_factor


def decode_tiled(decode: Callable[[np.ndarray], np.ndarray], latent: np.ndarray, tile: int, scale: int = 8) -> np.ndarray:
    """`decode` ([N,C,h,w] latents → [N,3,h·scale,w·scale] image) applied tile by tile over `latent`."""
    if latent.shape[2] <= tile and latent.shape[3] <= tile:
        return decode(latent)
    stride = int(tile * (1 - OVERLAP))
    sample_tile = tile * scale
    blend = int(sample_tile * OVERLAP)
    keep = sample_tile - blend
    rows = [[decode(latent[:, :, i:i + tile, j:j + tile]).astype(np.float32, copy=False)
             for j in range(0, latent.shape[3], stride)] for i in range(0, latent.shape[2], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        out_row = []
        for j, part in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], part, blend, axis=2)
            if j > 0:
                _blend(row[j - 1], part, blend, axis=3)
            out_row.append(part[:, :, :keep, :keep])
        out_rows.append(np.concatenate(out_row, axis=3))
    return np.concatenate(out_rows, axis=2)


def _blend(before: np.ndarray, part: np.ndarray, extent: int, axis: int) -> None:
    """Fade `part`'s first `extent` rows (axis 2) or columns (axis 3) in from the end of `before`, in place."""
    extent = min(before.shape[axis], part.shape[axis], extent)
    for k in range(extent):
        w = k / extent
        if axis == 2:
            part[:, :, k, :] = before[:, :, -extent + k, :] * (1 - w) + part[:, :, k, :] * w
        else:
            part[:, :, :, k] = before[:, :, :, -extent + k] * (1 - w) + part[:, :, :, k] * w
