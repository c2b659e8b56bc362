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


def level_sizes(side: str, value: int) -> dict[str, int]:
    """The UNet's down-sampled sizes of a latent side (`h` or `w`) = `value`: the contract's `h/2`, `h/4`, … (the
    ControlNet residuals' sizes), rounded up as a stride-2 convolution with padding 1 rounds."""
    return {f"{side}/{k}": -(-value // k) for k in (2, 4, 8, 16)}


def input_dims(entry: dict, dims: dict[str, int]) -> dict[str, int]:
    """Every symbolic dimension of `entry`'s inputs from the latent-side ones (B, S, h, w): H, W = 8 × h, w and the
    down-sampled levels (level_sizes). These are the symbol_values of the input shapes a call at those dims gives
    the component, by which a session made for one shape is kept (ort_cuda.shape_session)."""
    known = dict(dims)
    for small, big in (("h", "H"), ("w", "W")):
        if small in dims:
            known = {**level_sizes(small, dims[small]), big: dims[small] * 8, **known}
    used = dict.fromkeys(d for spec in entry["inputs"] for d in spec["shape"] if isinstance(d, str))
    return {d: known[d] for d in used if d in known}


def output_shapes(entry: dict, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A component's output shapes from its input shapes, through the contract's symbolic dimensions
    (B, S, h, w, H, W; pixels = 8 × latent)."""
    symbols = symbol_values(entry, input_shapes)
    for big, small in (("H", "h"), ("W", "w")):
        if small in symbols:
            symbols.setdefault(big, symbols[small] * 8)
        if big in symbols:
            symbols.setdefault(small, symbols[big] // 8)
    for side in ("h", "w"):
        if side in symbols:
            symbols = {**level_sizes(side, symbols[side]), **symbols}
    return {spec["name"]: tuple(symbols[d] if isinstance(d, str) else d for d in spec["shape"]) for spec in entry["outputs"]}
