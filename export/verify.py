"""`--verify`: every exported file run on ONNX Runtime CPU against torch, at two shapes, with stated tolerances.

fp32 files must match torch fp32 within rel-L2 1e-4. An fp16 file is held to torch's own fp16 error: its
rel-L2 against torch fp32 may be at most FP16_FACTOR × (rel-L2 of torch fp16 against torch fp32) at the
same inputs — fp16 rounding is the budget, a different accumulation order may spend it up to three times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.errors import VerificationError
from .contract import FLOAT, Component

# One square shape at batch 1, one non-square at batch 3 with a two-window (154-token) context; neither is the
# tracing shape (onnx_export.TRACE_SHAPE).
VERIFY_SHAPES = (dict(batch=1, height=256, width=256), dict(batch=3, height=192, width=320, windows=2))
FP32_TOLERANCE = 1e-4
FP16_FACTOR = 3.0


def rel_l2(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    denom = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / denom) if denom else float(np.linalg.norm(got))


@dataclass
class Reference:
    shape: dict
    inputs: tuple  # torch fp32 inputs
    outputs: list  # torch fp32 outputs (numpy)
    fp16_errors: list = field(default_factory=list)  # torch fp16 vs fp32, per output

    def label(self) -> str:
        s = self.shape
        return f"{s['batch']}×{s['height']}×{s['width']}"


def _run_torch(component: Component, inputs) -> list:
    import torch

    with torch.no_grad():
        out = component.wrapper()(*inputs)
    return [o.float().numpy() for o in (out if isinstance(out, tuple) else (out,))]


def torch_references(component: Component) -> list[Reference]:
    refs = []
    for shape in VERIFY_SHAPES:
        inputs = component.sample_inputs(**shape, seed=1)
        refs.append(Reference(shape, inputs, _run_torch(component, inputs)))
    return refs


def add_fp16_errors(component: Component, refs: list[Reference]) -> None:
    """Torch's own fp16 error; the caller has cast the module to fp16 (it is not cast back: fp16 is lossy)."""
    for ref in refs:
        inputs = tuple(x.half() if x.is_floating_point() and spec.dtype == FLOAT else x
                       for x, spec in zip(ref.inputs, component.inputs()))
        ref.fp16_errors = [rel_l2(o, w) for o, w in zip(_run_torch(component, inputs), ref.outputs)]


def check_onnx(path: Path, component: Component, refs: list[Reference], precision: str) -> list[str]:
    """Run `path` on ONNX Runtime CPU at every reference shape; return report lines, raise beyond tolerance."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    lines = []
    for ref in refs:
        feeds = {}
        for spec, x in zip(component.inputs(), ref.inputs):
            array = x.numpy()
            feeds[spec.name] = array.astype(np.float16) if precision == "fp16" and spec.dtype == FLOAT else array
        got = session.run([t.name for t in component.outputs()], feeds)
        for i, (spec, out, want) in enumerate(zip(component.outputs(), got, ref.outputs)):
            err = rel_l2(out, want)
            factor = getattr(component, "fp16_factor", FP16_FACTOR)
            bound = FP32_TOLERANCE if precision == "fp32" else factor * ref.fp16_errors[i]
            line = (f"{component.name} {precision} {spec.name} at {ref.label()}: rel-L2 {err:.2e} "
                    f"(bound {bound:.2e}{'' if precision == 'fp32' else f' = {factor:g} × torch fp16'})")
            if not np.isfinite(err) or err > bound:
                raise VerificationError(f"verification failed: {line}")
            lines.append(line)
    return lines
