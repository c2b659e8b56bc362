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


def shape_key(component: str, dims: dict[str, int]) -> tuple:
    """One key for a component's session made for one shape (its dimensions, sorted): what a backend keeps such a
    session under (resident.Resident) and what a plan of sessions to make is deduplicated by."""
    return component, tuple(sorted(dims.items()))


def derived(symbols: dict[str, int]) -> dict[str, int]:
    """`symbols` with the dimensions that follow from them: pixels = 8 × latent (H, W from h, w and back) and the
    down-sampled levels (level_sizes); given values win."""
    out = dict(symbols)
    for big, small in (("H", "h"), ("W", "w")):
        if small in out:
            out.setdefault(big, out[small] * 8)
        if big in out:
            out.setdefault(small, out[big] // 8)
    for side in ("h", "w"):
        if side in out:
            out = {**level_sizes(side, out[side]), **out}
    return out


def input_dims(entry: dict, dims: dict[str, int]) -> dict[str, int]:
    """Every symbolic dimension of `entry`'s inputs from the latent-side ones (B, S, h, w). These are the
    symbol_values of the input shapes a call at those dims gives the component, by which a session made for one
    shape is kept (ort_cuda.shape_session)."""
    known = derived(dims)
    used = dict.fromkeys(d for spec in entry["inputs"] for d in spec["shape"] if isinstance(d, str))
    return {d: known[d] for d in used if d in known}


def output_shapes(entry: dict, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A component's output shapes from its input shapes, through the contract's symbolic dimensions
    (B, S, h, w, H, W; pixels = 8 × latent)."""
    symbols = derived(symbol_values(entry, input_shapes))
    return {spec["name"]: tuple(symbols[d] if isinstance(d, str) else d for d in spec["shape"]) for spec in entry["outputs"]}
