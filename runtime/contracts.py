"""Shapes from a component's contract (the manifest's `inputs` / `outputs` with symbolic dimensions B, S, h, w, H, W):
what every backend, the device loop and the engine builder's checks compute the same way."""

from __future__ import annotations


def symbol_values(entry: dict, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The contract's symbolic dimensions (B, S, h, w, …) as given by concrete input shapes."""
    symbols: dict[str, int] = {}
    for spec in entry["inputs"]:
        for dim, value in zip(spec["shape"], input_shapes[spec["name"]]):
            if isinstance(dim, str):
                symbols[dim] = int(value)
    return symbols


def output_shapes(entry: dict, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A component's output shapes from its input shapes, through the contract's symbolic dimensions
    (B, S, h, w, H, W; pixels = 8 × latent)."""
    symbols = symbol_values(entry, input_shapes)
    for big, small in (("H", "h"), ("W", "w")):
        if small in symbols:
            symbols.setdefault(big, symbols[small] * 8)
        if big in symbols:
            symbols.setdefault(small, symbols[big] // 8)
    for side in ("h", "w"):  # the UNet's down-sampled levels (ControlNet residuals), rounded up as a stride-2 conv
        if side in symbols:
            for k in (2, 4, 8):
                symbols.setdefault(f"{side}/{k}", -(-symbols[side] // k))
    return {spec["name"]: tuple(symbols[d] if isinstance(d, str) else d for d in spec["shape"]) for spec in entry["outputs"]}
