"""Packaging promises: the runtime stays free of torch, extras keep the ONNX Runtime builds apart, installs work."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
HEAVY = ("torch", "diffusers", "transformers")


def test_runtime_imports_without_torch():
    code = ("import sys, sdxl_trt.runtime, sdxl_trt.runtime.cli, sdxl_trt.runtime.tokenizer, sdxl_trt.runtime.fileio, "
            "sdxl_trt.runtime.validate, sdxl_trt.runtime.engine_build, sdxl_trt.runtime.inspect, "
            "sdxl_trt.runtime.trt_backend, sdxl_trt.kernels; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_help_does_not_import_torch():
    code = ("import sys; from sdxl_trt.runtime.cli import main\n"
            "try: main(['export', '--help'])\nexcept SystemExit: pass\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr.strip().endswith("[]")


def _names(requirements):
    return {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in requirements}


def test_base_install_is_the_lean_runtime():
    assert _names(PYPROJECT["project"]["dependencies"]) == {"numpy", "tokenizers", "pillow", "safetensors", "tqdm"}


def test_onnxruntime_cpu_and_gpu_builds_sit_in_separate_extras():
    extras = {name: _names(reqs) for name, reqs in PYPROJECT["project"]["optional-dependencies"].items()}
    assert set(extras) >= {"export", "gpu", "trt", "rtx", "serve", "test", "cpu"}
    assert [e for e, names in extras.items() if "onnxruntime" in names] == ["cpu"]
    assert [e for e, names in extras.items() if "onnxruntime-gpu" in names] == ["gpu"]
    assert [{"extra": "cpu"}, {"extra": "gpu"}] in PYPROJECT["tool"]["uv"]["conflicts"]


def test_package_dirs_map_to_one_namespace():
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {
        "sdxl_trt.export": "export", "sdxl_trt.runtime": "runtime", "sdxl_trt.kernels": "kernels"}
    assert PYPROJECT["project"]["scripts"]["sdxl-trt"] == "sdxl_trt.runtime.cli:main"


@pytest.mark.slow
def test_regular_wheel_install(tmp_path):
    """A non-editable install holds all three packages, the embedded configs and the console script."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("sdxl_trt-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for expected in ("sdxl_trt/runtime/cli.py", "sdxl_trt/export/sources.py", "sdxl_trt/kernels/step.cu",
                     "sdxl_trt/export/configs/sdxl-base/unet/config.json",
                     "sdxl_trt/export/configs/tiny-refiner/tokenizer_2/tokenizer_config.json"):
        assert expected in names
    assert "sdxl-trt = sdxl_trt.runtime.cli:main" in entry_points
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import sdxl_trt.runtime.cli as c, sdxl_trt.export.vocab as v; "
            "print(c.__file__); print((v.CONFIGS / 'sdxl-base' / 'model_index.json').is_file())")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=tmp_path)
    where, has_configs = out.stdout.split()
    assert where.startswith(str(target)) and has_configs == "True"
