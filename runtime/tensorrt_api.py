"""What the builder, the runtime backend and `inspect` share about TensorRT and TensorRT-RTX.

Both libraries have the same Python API (modules `tensorrt` and `tensorrt_rtx`). Differences that matter here:
  - TensorRT builds for the GPU it runs on: an engine is tied to that GPU model and the TensorRT version.
  - TensorRT-RTX builds ahead of time without a GPU and compiles kernels just in time on first load
    (kept in a runtime cache on disk); its runtime supports only the compute capabilities it lists
    (not Hopper, sm 9.0). Engines are tied to the TensorRT-RTX version.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from .errors import UserError

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
EXTRAS = {"tensorrt": "sdxl-trt[trt]", "tensorrt-rtx": "sdxl-trt[rtx]"}


def module_name(backend: str) -> str:
    if backend not in MODULES:
        raise UserError(f"--backend {backend!r}: expected one of {', '.join(MODULES)}")
    return MODULES[backend]


def installed(backend: str) -> bool:
    return importlib.util.find_spec(module_name(backend)) is not None


def import_trt(backend: str):
    """The TensorRT module for `backend`, or a one-line error saying how to install it."""
    name = module_name(backend)
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"{backend} is not installed ({e}); pip install '{EXTRAS[backend]}'") from None


def version(backend: str) -> str | None:
    if not installed(backend):
        return None
    try:
        return import_trt(backend).__version__
    except UserError:
        return None


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str  # "8.6"

    @property
    def sm(self) -> str:
        return "sm" + self.compute_capability.replace(".", "")


def gpu() -> Gpu | None:
    """The current CUDA device (device 0, or CUDA_VISIBLE_DEVICES' first), or None without a usable GPU."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    try:
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count < 1:
            return None
        err, device = cudart.cudaGetDevice()
        err, props = cudart.cudaGetDeviceProperties(device)
        if int(err) != 0:
            return None
    except Exception:  # no driver library at all: cuda-python raises its own loader errors
        return None
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return Gpu(name.rstrip("\x00").strip(), f"{props.major}.{props.minor}")


RTX_MIN_CC = (8, 0)  # TensorRT-RTX 1.7's runtime on an H100: "Supported compute capabilities: 8.0 8.6 8.9 12.0 12.1"


def rtx_compute_capabilities(trt) -> list[str]:
    """The compute capabilities TensorRT-RTX engines run on: its build-target enum (SM80 → "8.0"), less those its
    runtime refuses (the enum also lists SM75, which the runtime does not accept)."""
    found = []
    for name in trt.ComputeCapability.__members__:
        if name.startswith("SM") and name[2:].isdigit():
            major, minor = int(name[2:-1]), int(name[-1])
            if (major, minor) >= RTX_MIN_CC:
                found.append(f"{major}.{minor}")
    return found


def target(backend: str, trt, device: Gpu | None) -> dict:
    """What an engine built now is for: `label` goes into file names, the rest into the manifest."""
    if backend == "tensorrt":
        if device is None:
            raise UserError("TensorRT builds engines for the GPU it runs on, and no CUDA GPU was found "
                            "(is cuda-python installed and the driver loaded?); TensorRT-RTX builds without one: "
                            "--backend tensorrt-rtx")
        return {"label": device.sm, "gpu": device.name, "compute_capability": device.compute_capability}
    # TensorRT-RTX: ahead-of-time engines for every GPU it supports, specialised just in time on first load
    return {"label": "rtx", "gpu": None, "compute_capabilities": rtx_compute_capabilities(trt)}


def target_problem(record_target: dict, backend: str, device: Gpu | None) -> str | None:
    """Why an engine built for `record_target` cannot run on this machine's GPU, or None."""
    if device is None:
        return "no CUDA GPU on this machine (or no driver / cuda-python)"
    if backend == "tensorrt":
        if record_target["compute_capability"] != device.compute_capability or record_target["gpu"] != device.name:
            return (f"built for {record_target['gpu']} (sm {record_target['compute_capability']}), this GPU is "
                    f"{device.name} (sm {device.compute_capability}); TensorRT engines run only on the GPU model "
                    "they were built on")
        return None
    supported = record_target["compute_capabilities"]
    if device.compute_capability not in supported:
        return (f"TensorRT-RTX does not run on {device.name} (sm {device.compute_capability}); it supports "
                f"sm {' '.join(supported)}: use --backend tensorrt or ort-cuda on this GPU")
    return None


class Logger:
    """A TensorRT logger that keeps messages (for one-line errors) instead of printing them."""

    def __new__(cls, trt, min_severity=None):
        class _Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.messages: list[tuple[object, str]] = []
                self.min_severity = min_severity if min_severity is not None else trt.ILogger.Severity.WARNING

            def log(self, severity, msg):
                if int(severity) <= int(self.min_severity):
                    self.messages.append((severity, msg))

            def clear(self) -> None:
                """Forget earlier messages, so that an error reported next is the one the next call logged."""
                self.messages.clear()

            def errors(self) -> list[str]:
                return [m for s, m in self.messages if int(s) <= int(trt.ILogger.Severity.ERROR)]

            def last_error(self) -> str:
                errors = self.errors()
                return " ".join(errors[-1].split()) if errors else "no error message"

        return _Logger()


def header_problem(trt, logger, data: bytes) -> str | None:
    """TensorRT's own check of an engine's header (magic number, version, compute capability): what is wrong, or
    None when it is valid or cannot be told (TensorRT needs a GPU driver to judge the compute capability)."""
    try:
        runtime = trt.Runtime(logger)
    except (TypeError, RuntimeError):  # full TensorRT cannot create a runtime without a working CUDA driver
        return None
    if not hasattr(runtime, "get_engine_validity"):  # TensorRT releases before the check existed
        return None
    validity, diagnostics = runtime.get_engine_validity(data[: runtime.engine_header_size])
    if validity != trt.EngineValidity.INVALID:
        return None
    reasons = [name.lower().replace("_", " ") for name, flag in trt.EngineInvalidityDiagnostics.__members__.items()
               if int(diagnostics) & int(flag)]
    return ", ".join(reasons) or None
