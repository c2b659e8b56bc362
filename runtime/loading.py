"""`load_backend`: a backend by name (ort-cpu, ort-cuda, tensorrt, tensorrt-rtx). The one module that knows every
backend: backends.py holds what they share, each backend module its own class, and nothing below imports this."""

from __future__ import annotations

from .backends import BACKENDS, OrtCpuBackend
from .errors import UserError
from .manifest import Manifest
from .validate import resident_options


def load_backend(name: str, manifest: Manifest, check_hashes: bool = True, cuda_graphs: str = "step",
                 buckets=None, max_device_memory: float | None = None, devices=None):
    """`buckets`, `max_device_memory` (GiB) and `devices` are ort-cuda's (ort_cuda.OrtCudaBackend says what they
    do)."""
    if name not in BACKENDS:
        raise UserError(f"--backend {name!r}: unknown; accepted: {', '.join(BACKENDS)}")
    resident = resident_options(name, buckets, max_device_memory, devices)
    if name == "ort-cuda":
        from .ort_cuda import OrtCudaBackend

        return OrtCudaBackend(manifest, cuda_graphs=cuda_graphs, buckets=resident["buckets"],
                              max_device_memory=resident["max_device_memory"], devices=resident["devices"] or (0,))
    if name in ("tensorrt", "tensorrt-rtx"):
        from .trt_backend import TensorRTBackend

        return TensorRTBackend(manifest, name, check_hashes=check_hashes, cuda_graphs=cuda_graphs)
    return OrtCpuBackend(manifest)
