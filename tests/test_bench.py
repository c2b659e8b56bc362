"""`sdxl-trt bench` on the tiny model on the CPU: the JSON schema benchmarks/README.md documents, the host-side cost
per denoising step (the CI benchmark: no memory kept per step), diffusers as a contender in the same process, the
charts. Timings are recorded, never asserted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdxl_trt.runtime.bench import Case, flops_per_call, stats_ms, sweep_cases
from sdxl_trt.runtime.cli import main

CASE_FIELDS = {"contender", "mode", "devices", "sweep", "width", "height", "batch", "steps", "guidance", "sampler", "e2e_ms",
               "e2e_p90_ms", "runs", "text_ms", "denoise_ms", "vae_ms", "loop_per_step_ms", "images_per_s",
               "peak_memory_gib", "memory_kind"}


def test_median_and_p90_are_numpys():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 7, 10, 31):
        samples = list(rng.uniform(0.5, 2.0, n))
        got = stats_ms(samples)
        assert got["median"] == round(float(np.median(samples)) * 1e3, 2)
        assert got["p90"] == round(float(np.percentile(samples, 90, method="inverted_cdf")) * 1e3, 2)


def test_sweeps_cover_the_issue_matrix():
    size = (1024, 1024)
    sizes = {(c.width, c.height) for c in sweep_cases("resolution", size)}
    assert (1536, 640) in sizes and (640, 1536) in sizes and (512, 512) in sizes and len(sizes) == 11
    assert [c.batch for c in sweep_cases("batch", size)] == [1, 2, 4]
    assert [c.steps for c in sweep_cases("steps", size)] == [4, 8, 20, 30, 50]
    assert all(c.guidance == 1.0 for c in sweep_cases("cfg", size))
    assert {(c.steps, c.guidance) for c in sweep_cases("throughput", size)} == {(20, 8.0)}  # MLPerf offline


def test_flops_per_call_from_the_counted_table():
    table = json.loads(open("benchmarks/results/unet-flops.json").read())
    per_eval = table["flops"]["base"]["1024x1024"]
    assert 13.4e12 < 2 * per_eval < 13.6e12  # DEVICE.md: 13.5 TFLOP per CFG step at 1024²
    assert flops_per_call(Case("steps", 1024, 1024, steps=30), table) == 30 * 2 * per_eval
    assert flops_per_call(Case("cfg", 1024, 1024, steps=30, guidance=1.0), table) == 30 * per_eval
    refined = flops_per_call(Case("refiner", 1024, 1024, steps=30, refiner_start=0.8), table)
    assert refined == pytest.approx(60 * (0.8 * per_eval + 0.2 * table["flops"]["refiner"]["1024x1024"]))


def test_bench_writes_the_documented_json(tiny_engine, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(tiny_engine), "--sweeps", "batch", "overhead", "--size", "64x64", "--runs", "2",
                 "--warmup", "1", "--flops", "benchmarks/results/unet-flops.json", "--cold-start", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"device", "command", "git", "date", "cases", "overhead", "complete"} <= set(result) and result["complete"]
    assert result["device"] == "CPU" and result["command"].startswith("sdxl-trt bench")
    assert {"python", "numpy", "onnxruntime"} <= set(result["versions"])
    assert [c["batch"] for c in result["cases"]] == [1, 2, 4]
    for case in result["cases"]:
        assert CASE_FIELDS <= set(case), CASE_FIELDS - set(case)
        assert case["e2e_p90_ms"] >= case["e2e_ms"] > 0 and case["contender"] == "sdxl-trt"
        assert case["devices"] == []  # ort-cpu: no GPU (ort-cuda rows name theirs, e.g. [0, 1] with --devices 0,1)
        assert "achieved_tflops" not in case  # 64x64 is not in the SDXL table: no made-up figure
    assert [c["cache"] for c in result["cold_start"]] == ["empty cache", "cache filled"]
    assert all(c["total_s"] >= c["load_s"] > 0 and c["backend"] == "ort-cpu" for c in result["cold_start"])
    overhead = result["overhead"][0]
    print(f"host cost per step (tiny, ort-cpu, 64x64): {overhead['step_ms']} ms, kept {overhead['kept_bytes_per_step']}"
          f" B, peak {overhead['peak_bytes_per_step']} B")
    assert overhead["kept_bytes_per_step"] < 1024  # the loop keeps nothing per step (a leak would show here)


def test_bench_against_diffusers_and_charts(tiny_engine, tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("matplotlib")
    import subprocess
    import sys

    out = tmp_path / "vs.json"
    assert main(["bench", str(tiny_engine), "--sweeps", "refiner", "--size", "64x64", "--runs", "1", "--warmup", "0",
                 "--contenders", "diffusers-eager", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(c["contender"], c["refiner_start"]) for c in result["cases"] if "e2e_ms" in c}
    assert rows == {("sdxl-trt", None), ("sdxl-trt", 0.8), ("diffusers", None), ("diffusers", 0.8)}
    refined = [c for c in result["cases"] if c["refiner_start"] == 0.8]
    assert all(c["refiner_ms"] > 0 and c["denoise_ms"] > 0 for c in refined)
    charts = subprocess.run([sys.executable, "benchmarks/charts.py", str(out)], capture_output=True, text=True)
    assert charts.returncode == 0, charts.stderr
    assert (tmp_path / "vs-stages.png").stat().st_size > 1000 and (tmp_path / "vs-speedup.png").is_file()
    assert "| refiner | diffusers (eager, fp32) | 64x64 |" in charts.stdout


def test_diffusers_refiner_weights_for_a_directory_without_a_refiner(tmp_path):
    """bench --refiner: diffusers runs the refiner cases from those weights; sdxl-trt records why it cannot."""
    pytest.importorskip("diffusers")
    from sdxl_trt.export.engine_dir import export_engine_dir

    engine = tmp_path / "base-only"
    export_engine_dir("tiny:base", engine, progress=False)
    out = tmp_path / "r.json"
    common = ["bench", str(engine), "--sweeps", "refiner", "--size", "64x64", "--runs", "1", "--warmup", "0",
              "--contenders", "diffusers-eager", "--out", str(out)]
    assert main(common) == 0
    cases = {(c["contender"], c["refiner_start"]): c for c in json.loads(out.read_text())["cases"]}
    assert "--refiner SRC" in cases[("diffusers", 0.8)]["skipped"]
    assert main([*common, "--refiner", "tiny:refiner"]) == 0
    cases = {(c["contender"], c["refiner_start"]): c for c in json.loads(out.read_text())["cases"]}
    assert cases[("diffusers", 0.8)]["refiner_ms"] > 0 and "e2e_ms" in cases[("diffusers", None)]
    assert "no refiner" in cases[("sdxl-trt", 0.8)]["skipped"]


@pytest.mark.parametrize("argv, says", [
    (["--runs", "0"], "--runs"),
    (["--sweeps", "latency"], "latency"),
    (["--contenders", "diffusers-magic"], "diffusers-magic"),
    (["--size", "65x64"], "multiples of 8"),
    (["--devices", "0", "0,1"], "--devices 0: --backend ort-cpu runs on the CPU"),
    (["--backend", "tensorrt", "--devices", "0,1"], "tensorrt runs on GPU 0; another GPU, or several"),
    (["--devices", "1,1"], "GPU 1 is given twice"),
    (["--contenders", "diffusers-eager", "--refiner", "/no/such/refiner"], "--refiner"),
    (["--contenders", "diffusers-eager", "--refiner", "tiny:base"], "not a refiner"),
])
def test_bench_bad_input_is_one_line(tiny_engine, tmp_path, argv, says, capsys):
    try:
        code = main(["bench", str(tiny_engine), "--out", str(tmp_path / "x.json"), *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "x.json").exists()


def test_the_cudagraph_contender_needs_a_gpu(tiny_engine, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", str(tiny_engine), "--sweeps", "batch", "--contenders", "diffusers-cudagraph", "--runs", "1",
                 "--warmup", "0", "--size", "64x64", "--out", str(tmp_path / "x.json")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_resume_measures_only_what_is_missing(tiny_engine, tmp_path, capsys):
    out = tmp_path / "parts.json"
    common = ["bench", str(tiny_engine), "--size", "64x64", "--runs", "1", "--warmup", "0", "--out", str(out)]
    assert main([*common, "--sweeps", "batch"]) == 0
    first = json.loads(out.read_text())["cases"]
    assert main([*common, "--sweeps", "batch", "cfg", "--resume"]) == 0
    second = json.loads(out.read_text())
    assert second["cases"][:3] == first  # kept as measured, not run again
    assert [c["sweep"] for c in second["cases"]] == ["batch"] * 3 + ["cfg"] * 2
    assert second["resumed"][0]["command"].endswith("--sweeps batch") and second["complete"]
    capsys.readouterr()
    assert main([*common, "--sweeps", "batch", "--resume"]) == 0
    assert "every case is in" in capsys.readouterr().out
    foreign = json.loads(out.read_text())
    foreign["device"] = "NVIDIA H100 80GB HBM3"
    out.write_text(json.dumps(foreign))
    assert main([*common, "--sweeps", "batch", "--resume"]) == 2
    assert "was measured on 'NVIDIA H100 80GB HBM3'" in capsys.readouterr().err
