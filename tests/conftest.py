"""Shared fixtures: the built-in tiny models (deterministic, seconds to build) and their tokenizer folders."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_configure(config):
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


def optimized_copy(engine_dir, tmp_path_factory, name: str = "optimized"):
    """A copy of an engine directory with `sdxl-trt optimize --target cuda` run on it (fused fp16 files for ort-cuda)."""
    import shutil

    from sdxl_trt.export.optimize import optimize_engine_dir

    out = tmp_path_factory.mktemp(name) / "tiny"
    shutil.copytree(engine_dir, out)
    optimize_engine_dir(out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_optimized(tiny_engine, tmp_path_factory):
    """tiny_engine optimized (optimized_copy)."""
    return optimized_copy(tiny_engine, tmp_path_factory)
