"""benchmarks/load.py --layouts: one seeded mixed-size load against several server layouts in turn, one JSON (the
four-GPU comparison of issue 24 runs it with Ray Serve replicas; here two plain servers of the tiny model on the CPU,
with and without batching, to check the machinery: every request answered, figures recorded per layout)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layouts_run_the_same_load_against_each_server(tiny_engine, tmp_path):
    out = tmp_path / "layouts.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load.py"), "--engine", str(tiny_engine),
                          "--mixed", "--sizes", "64x64,64x96", "--requests", "4", "--concurrency", "2", "--steps", "2",
                          "--steady-runs", "1", "--layouts", "--max-batch 1", "--max-batch 2 --max-wait-ms 50",
                          "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [l["server_flags"] for l in result["layouts"]] == ["--max-batch 1", "--max-batch 2 --max-wait-ms 50"]
    for layout in result["layouts"]:
        sizes = [(r["width"], r["height"]) for r in layout["requests"]]
        assert layout["errors"] == 0 and len(sizes) == 4 and set(sizes) == {(64, 64), (64, 96)}
        assert layout["requests_per_s"] > 0 and layout["concurrency"] == 2
        assert layout["latency_ms"]["p99"] >= layout["latency_ms"]["p50"] > 0
        assert layout["replica_memory"] == {}  # ort-cpu keeps no sessions per shape (ort-cuda: its /health figures)
    # the same seeded order against each layout
    assert [(r["width"], r["height"]) for r in result["layouts"][0]["requests"]] == \
           [(r["width"], r["height"]) for r in result["layouts"][1]["requests"]]
    assert result["layouts"][0]["throughput_vs_first"] == 1.0
