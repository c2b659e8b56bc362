"""Shared fixtures: the built-in tiny models (deterministic, seconds to build) and their tokenizer folders."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_configure(config):
    # ONNX Runtime's C API header for the custom-op library, where `python -m sdxl_trt.kernels.ort_ops fetch-headers`
    # put it (the user's cache: read, not written), before the throw-away cache below hides it
    from sdxl_trt.kernels import ort_ops
    from sdxl_trt.runtime.errors import UserError

    if not os.environ.get(ort_ops.INCLUDE_ENV):
        try:
            found = ort_ops.include_dir(required=False)
        except UserError:  # fetched but damaged (or by an older sdxl-trt): the tests that need them say so
            found = None
        if found is not None:
            os.environ[ort_ops.INCLUDE_ENV] = str(found)
    # Tests never write into the user's cache: tokenizer folders and the like go to a throw-away one.
    config._sdxl_trt_cache = tempfile.mkdtemp(prefix="sdxl-trt-test-cache-")
    os.environ["SDXL_TRT_CACHE"] = config._sdxl_trt_cache


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "_sdxl_trt_cache", ""), ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_base():
    from sdxl_trt.export.sources import load_model

    return load_model("tiny:base", progress=False)


@pytest.fixture(scope="session")
def tiny_refiner():
    from sdxl_trt.export.sources import load_model

    return load_model("tiny:refiner", progress=False)


@pytest.fixture(scope="session")
def tokenizer_dirs(tiny_base):
    return tiny_base.tokenizer_dirs


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory):
    """tiny:base + tiny:refiner exported (fp32 + fp16) and verified: an engine directory for runtime tests."""
    from sdxl_trt.export.engine_dir import export_engine_dir

    out = tmp_path_factory.mktemp("engine") / "tiny"
    report = export_engine_dir("tiny:base", out, refiner="tiny:refiner", verify=True, progress=False)
    assert len(report.verify_lines) >= 20
    return out


def optimized_copy(engine_dir, tmp_path_factory, name: str = "optimized", custom_ops: bool = False,
                   context_once: bool = True):
    """A copy of an engine directory with `sdxl-trt optimize --target cuda` run on it (fused fp16 files for ort-cuda;
    `custom_ops`: with --custom-ops, which builds our custom-op library with nvcc; `context_once` False: with
    --no-context-once)."""
    import shutil

    from sdxl_trt.export.optimize import optimize_engine_dir

    out = tmp_path_factory.mktemp(name) / "tiny"
    shutil.copytree(engine_dir, out)
    optimize_engine_dir(out, progress=False, custom_ops=custom_ops, context_once=context_once)
    return out


def need_custom_op_build(cuda: bool = True) -> None:
    """Skip where the custom-op library cannot be built (no nvcc / C++ compiler, no ONNX Runtime header); CI sets
    SDXL_TRT_REQUIRE_CUSTOM_OPS=1 (it fetches the header), where a missing piece fails the test instead."""
    from sdxl_trt.kernels import ort_ops

    from sdxl_trt.runtime.errors import UserError

    missing = []
    for what, find in (("nvcc", ort_ops._nvcc if cuda else None), ("a C++ compiler", None if cuda else ort_ops._cxx),
                       ("ONNX Runtime's C API header (python -m sdxl_trt.kernels.ort_ops fetch-headers)",
                        lambda: ort_ops.include_dir(required=False))):
        try:
            if find is not None and not find():
                missing.append(what)
        except UserError as e:  # $CUDA_HOME without nvcc, an unbalanced $CXX, damaged cached headers: said as found
            missing.append(f"{what} ({e})")
    if missing:
        why = f"building the custom-op library needs {' and '.join(missing)}"
        if os.environ.get("SDXL_TRT_REQUIRE_CUSTOM_OPS") == "1":
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="session")
def tiny_optimized(tiny_engine, tmp_path_factory):
    """tiny_engine optimized (optimized_copy)."""
    return optimized_copy(tiny_engine, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_optimized_whole(tiny_engine, tmp_path_factory):
    """tiny_engine optimized with --no-context-once: the UNets compute the cross-attentions' K and V at every step."""
    return optimized_copy(tiny_engine, tmp_path_factory, name="optimized-whole", context_once=False)
