"""Charts and a README table from a `sdxl-trt bench` JSON file (matplotlib, in the `test` extra):

    python benchmarks/charts.py benchmarks/results/h100-matrix.json [more.json …] [--stem PATH]

writes, beside the JSON, `<name>-resolution.png` (latency by size), `-batch.png`, `-steps.png` (latency by batch and
by steps), `-stages.png` (stage breakdown at the sweeps' size), `-speedup.png` (speedup over diffusers eager per
case) for the sweeps the files hold, and prints a Markdown table of every case (the README's performance table is
pasted from it, with the commands from the JSON). Several files of one device are merged: a matrix too long for one
device session can be run a contender or a sweep at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def label(case: dict) -> str:
    return f"{case['contender']} ({case['mode']})"


def measured(cases: list[dict], sweep: str) -> list[dict]:
    return [c for c in cases if c.get("sweep") == sweep and "e2e_ms" in c]


def series(cases: list[dict], x) -> dict[str, tuple[list, list]]:
    """{contender label: (x values, e2e medians)} in x order."""
    out = defaultdict(lambda: ([], []))
    for case in sorted(cases, key=x):
        xs, ys = out[label(case)]
        xs.append(x(case))
        ys.append(case["e2e_ms"])
    return dict(out)


def bar_chart(path: Path, title: str, groups: list[str], values: dict[str, list], ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, len(groups) * 0.9), 4))
    width = 0.8 / max(1, len(values))
    for i, (name, ys) in enumerate(values.items()):
        xs = [g + i * width for g in range(len(groups))]
        bars = ax.bar(xs, [y if y is not None else 0 for y in ys], width, label=name)
        ax.bar_label(bars, labels=[(f"{y:.0f}" if y >= 100 else f"{y:.3g}") if y is not None else "–" for y in ys],
                     fontsize=6)  # milliseconds whole, ratios with their decimals
    ax.set_xticks([g + width * (len(values) - 1) / 2 for g in range(len(groups))], groups, rotation=30, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def charts(result: dict, stem: Path) -> list[Path]:
    cases = result["cases"]
    written = []
    for sweep, x, fmt, title in (
            ("resolution", lambda c: (c["width"] * c["height"], c["width"]), None, "by image size"),
            ("batch", lambda c: c["batch"], str, "by batch (images per call)"),
            ("steps", lambda c: c["steps"], str, "by steps")):
        rows = measured(cases, sweep)
        if not rows:
            continue
        data = series(rows, x)
        if sweep == "resolution":
            groups = sorted({(c["width"] * c["height"], c["width"], f"{c['width']}x{c['height']}") for c in rows})
            names = [g[2] for g in groups]
            values = {name: [next((c["e2e_ms"] for c in rows if label(c) == name
                                   and f"{c['width']}x{c['height']}" == g), None) for g in names] for name in data}
        else:
            names = [fmt(v) for v in sorted({x(c) for c in rows})]
            values = {name: [next((c["e2e_ms"] for c in rows if label(c) == name and fmt(x(c)) == g), None)
                             for g in names] for name in data}
        path = stem.with_name(f"{stem.name}-{sweep}.png")
        bar_chart(path, f"end to end {title} — {result['device']}", names, values, "ms (median)")
        written.append(path)
    first = next((c for c in cases if "e2e_ms" in c and c["batch"] == 1), None)
    base = [c for c in cases if first and "e2e_ms" in c and c["sweep"] == first["sweep"] and c["batch"] == 1
            and (c["width"], c["height"], c["steps"]) == (first["width"], first["height"], first["steps"])]
    if base:  # the first batch-1 case of the first sweep, each contender (and refiner variant) side by side
        stages = ("text_ms", "denoise_ms", "refiner_ms", "vae_ms")
        names = [label(c) + (f" + refiner from {c['refiner_start']}" if c.get("refiner_start") else "") for c in base]
        values = {s[:-3]: [c.get(s) for c in base] for s in stages if any(c.get(s) for c in base)}
        path = stem.with_name(f"{stem.name}-stages.png")
        bar_chart(path, f"stages at {base[0]['width']}x{base[0]['height']}, {base[0]['steps']} steps", names, values,
                  "ms (median)")
        written.append(path)
    speedups = speedup_rows(cases)
    if speedups:
        path = stem.with_name(f"{stem.name}-speedup.png")
        bar_chart(path, "speedup over diffusers eager (same process)", [s[0] for s in speedups],
                  {"×": [s[1] for s in speedups]}, "× faster")
        written.append(path)
    return written


def case_key(c: dict) -> tuple:
    return c["sweep"], c["width"], c["height"], c["batch"], c["steps"], c["guidance"], c.get("refiner_start")


def speedup_rows(cases: list[dict]) -> list[tuple[str, float]]:
    eager = {case_key(c): c["e2e_ms"] for c in cases if c["contender"] == "diffusers" and "e2e_ms" in c
             and c["mode"].startswith("eager")}
    rows = []
    for c in cases:
        if c["contender"] == "sdxl-trt" and "e2e_ms" in c and case_key(c) in eager:
            name = f"{c['sweep']} {c['width']}x{c['height']} b{c['batch']} {c['steps']}st"
            rows.append((name, round(eager[case_key(c)] / c["e2e_ms"], 2)))
    return rows


def table(result: dict) -> str:
    head = ("| sweep | contender | size | batch | steps | CFG | refiner | e2e median (p90) ms | per step ms | "
            "TFLOP/s | images/s | memory GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in result["cases"]:
        if "e2e_ms" not in c:
            lines.append(f"| {c['sweep']} | {label(c)} | {c['width']}x{c['height']} | {c['batch']} | {c['steps']} | "
                         f"{c['guidance']} | {c.get('refiner_start') or ''} | skipped: {c.get('skipped', '?')} | | | | |")
            continue
        lines.append(f"| {c['sweep']} | {label(c)} | {c['width']}x{c['height']} | {c['batch']} | {c['steps']} | "
                     f"{c['guidance']} | {c.get('refiner_start') or ''} | {c['e2e_ms']:.0f} ({c['e2e_p90_ms']:.0f}) | "
                     f"{c.get('loop_per_step_ms', '')} | {c.get('achieved_tflops', '')} | {c['images_per_s']} | "
                     f"{c.get('peak_memory_gib', '')} |")
    return "\n".join(lines)


def side_by_side(result: dict) -> str:
    """One row per sdxl-trt case: its figures, every other contender's median on the same case, and the speedup over
    diffusers eager (the README's performance table)."""
    others = sorted({label(c) for c in result["cases"] if c["contender"] != "sdxl-trt" and "e2e_ms" in c})
    by_case = {(label(c), case_key(c)): c for c in result["cases"] if "e2e_ms" in c}
    head = ("| sweep | size | batch | steps | CFG | refiner | sdxl-trt ms (p90) | per step ms | TFLOP/s | images/s | "
            + " | ".join(f"{o} ms" for o in others) + " | speedup over diffusers eager |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in result["cases"]:
        if c["contender"] != "sdxl-trt" or "e2e_ms" not in c:
            continue
        theirs = [by_case.get((o, case_key(c))) for o in others]
        eager = next((t for o, t in zip(others, theirs) if t and "eager" in o), None)
        speedup = f"{eager['e2e_ms'] / c['e2e_ms']:.2f}×" if eager else ""
        lines.append(f"| {c['sweep']} | {c['width']}x{c['height']} | {c['batch']} | {c['steps']} | "
                     f"{'off' if c['guidance'] <= 1 else c['guidance']} | {c.get('refiner_start') or ''} | "
                     f"{c['e2e_ms']:.0f} ({c['e2e_p90_ms']:.0f}) | {c.get('loop_per_step_ms', '')} | "
                     f"{c.get('achieved_tflops', '')} | {c['images_per_s']} | "
                     + " | ".join(f"{t['e2e_ms']:.0f}" if t else "not run" for t in theirs)
                     + f" | {speedup} |")
    return "\n".join(lines)


def merge(paths: list[Path]) -> dict:
    """Several `sdxl-trt bench` files of one device (e.g. one contender per device session) as one result."""
    results = [json.loads(p.read_text()) for p in paths]
    devices = {r["device"] for r in results}
    if len(devices) > 1:
        raise SystemExit(f"charts.py: these files come from different devices ({', '.join(sorted(devices))})")
    merged = dict(results[0])
    merged["cases"] = [c for r in results for c in r["cases"]]
    merged["commands"] = [r["command"] for r in results]
    return merged


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="JSON written by `sdxl-trt bench` (several: merged, same device)")
    p.add_argument("--stem", help="path prefix of the PNGs (default: the first JSON's, without .json)")
    args = p.parse_args()
    paths = [Path(r) for r in args.results]
    result = merge(paths)
    for written in charts(result, Path(args.stem) if args.stem else paths[0].with_suffix("")):
        print(f"wrote {written}")
    commands = "; ".join(f"`{c}`" for c in result.get("commands", [result["command"]]))
    print(f"\n{result['device']}, {commands} (commit {result['git'].get('commit')})\n")
    print(table(result))
    print("\nSide by side:\n")
    print(side_by_side(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
