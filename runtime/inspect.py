"""`sdxl-trt inspect DIR`: what an engine directory holds, and whether each engine can run on this machine."""

from __future__ import annotations

import json

from . import engines as eng
from . import tensorrt_api
from .manifest import WORK, file_problem, load_manifest


def inspect_data(engine_dir) -> dict:
    manifest = load_manifest(engine_dir)
    data = manifest.data
    device = tensorrt_api.gpu()
    sizes = {}
    for name, entry in manifest.components.items():
        sizes[name] = {p: sum(data["files"][f]["size"] for f in files) for p, files in entry["files"].items()}
        for target, record in entry.get("optimized", {}).items():  # `sdxl-trt optimize`
            sizes[name][f"{target} {record['precision']}"] = sum(data["files"][f]["size"] for f in record["files"])
    damaged = {relative: problem for relative, record in data["files"].items()  # sizes only: hashing is generate's
               if (problem := file_problem(manifest.path(relative), record, False, "changed since export"))}
    problems = list(damaged.values())
    engines = []
    for path, record in manifest.engines.items():
        problem = eng.engine_problem(manifest, path, record, device, check_hash=False)
        engines.append({"path": path, "backend": record["backend"], "backend_version": record["backend_version"],
                        "component": record["component"], "precision": record["precision"],
                        "target": record["target"], "size": record["size"], "built": record.get("built"),
                        "build_seconds": record.get("build_seconds"), "options": record.get("options", {}),
                        "profiles": [p["label"] for p in record["profiles"]], "verify": record.get("verify"),
                        "usable": problem is None, "why_not": problem})
    machine = {"gpu": None if device is None else {"name": device.name, "compute_capability": device.compute_capability},
               "backends": {b: tensorrt_api.version(b) for b in tensorrt_api.MODULES}}
    return {"dir": str(manifest.root), "created": data.get("created"), "sources": data.get("sources", {}),
            "components": {name: {"contract": entry["contract"], "precisions": sizes[name],
                                  **recipe_info(manifest, entry), **custom_ops_info(manifest, entry, device)}
                           for name, entry in manifest.components.items()},
            "pipelines": {role: p["components"] for role, p in data.get("pipelines", {}).items()},
            "file_problems": problems,  # missing files or files of another size than recorded (a copy cut short)
            "work": {work: manifest.missing(work) or _damaged(manifest, work, damaged) for work in WORK},  # None: it can
            "engines": engines, "machine": machine}


def _damaged(manifest, work: str, damaged: dict[str, str]) -> str | None:
    """Why `work` is refused until a file is made again: the first damaged exported file of a component it runs."""
    for name in manifest.work_components(work):
        for files in manifest.components[name]["files"].values():
            for relative in files:
                if relative in damaged:
                    return f"{damaged[relative]}; re-export it: `{manifest.export_command()}`"
    return None


def recipe_info(manifest, entry: dict) -> dict:
    """{"optimized": {target: {recipe, current, why_not}}} for a component with `sdxl-trt optimize`d files: whether
    they are today's recipe for the component (runtime/backends.py RECIPES); {} for one with none."""
    from .backends import OPTIMIZE_RECIPE, current_recipe, recipe_state

    found = {}
    for target, record in (entry.get("optimized") or {}).items():
        recipe, state, why = record.get("recipe", 1), recipe_state(entry, target), None
        if state == "newer":
            why = (f"made by a newer sdxl-trt (recipe {recipe}; this one reads up to {OPTIMIZE_RECIPE}): ort-cuda refuses "
                   f"it; upgrade sdxl-trt, or make it again with this one: `sdxl-trt optimize {manifest.root}`")
        elif state == "older":
            why = (f"an older recipe ({recipe}; today's is {current_recipe(entry['contract'])}): it runs, slower; "
                   f"`sdxl-trt optimize {manifest.root}` makes it again")
        found[target] = {"recipe": recipe, "current": why is None, "why_not": why}
    return {"optimized": found} if found else {}


def custom_ops_info(manifest, entry: dict, device) -> dict:
    """{"custom_ops": {target: {library, usable, why_not}}} for a component whose optimized files need our custom-op
    library (`sdxl-trt optimize --custom-ops`); {} for one that needs none. Usable: this installation builds that
    library (the runtime loads no other) and this machine's GPU, if any, runs its kernels."""
    from ..kernels.ort_ops import gpu_problem, library_path

    found = {}
    for target, record in (entry.get("optimized") or {}).items():
        if record.get("custom_ops"):
            why = file_problem(manifest.path(record["custom_ops"]), manifest.data["files"][record["custom_ops"]],
                               False, "changed since `sdxl-trt optimize` built it")
            if why:
                why += f": `sdxl-trt optimize {manifest.root} --custom-ops` builds it again"
            elif record["custom_ops"] != library_path(cuda=True):
                why = (f"another sdxl-trt built it (this one builds {library_path(cuda=True)}): "
                       f"`sdxl-trt optimize {manifest.root} --custom-ops` builds it again")
            elif device is not None:
                why = gpu_problem(device.compute_capability)
            found[target] = {"library": record["custom_ops"], "usable": why is None, "why_not": why}
    return {"custom_ops": found} if found else {}


def inspect_dir(engine_dir, as_json: bool = False) -> str:
    info = inspect_data(engine_dir)
    if as_json:
        return json.dumps(info, indent=2)
    lines = [f"engine directory {info['dir']} (exported {info['created']})"]
    lines += [f"  {role}: {s['spec']} ({s['kind']})" for role, s in info["sources"].items()]
    lines.append("components:")
    for name, c in info["components"].items():
        files = ", ".join(f"{p} {size / 1e6:.1f} MB" for p, size in c["precisions"].items())
        lines.append(f"  {name:<14} {files}")
        for target, made in c.get("optimized", {}).items():
            if not made["current"]:
                lines.append(f"  {'':<14} {target} file: {made['why_not']}")
        for target, ops in c.get("custom_ops", {}).items():
            usable = "usable here" if ops["usable"] else f"not usable here: {ops['why_not']}"
            lines.append(f"  {'':<14} {target} file's custom operators: {ops['library']} ({usable})")
    for role, comps in info["pipelines"].items():
        lines.append(f"  {role} pipeline: " + ", ".join(f"{k}={v}" if k != v else k for k, v in comps.items()))
    if info["file_problems"]:
        lines.append(f"files: {len(info['file_problems'])} damaged (work that needs one of them is refused until it is made again):")
        lines += [f"  {problem}" for problem in info["file_problems"]]
    else:
        lines.append("files: all present, of their recorded sizes")
    lines.append("work: " + ", ".join(f"{work} {'yes' if why is None else 'no'}" for work, why in info["work"].items()))
    lines += [f"  {work}: {why}" for work, why in info["work"].items() if why is not None]
    lines.append("engines:" if info["engines"] else "engines: none (build them with `sdxl-trt build DIR --backend ...`)")
    for e in info["engines"]:
        t = e["target"]
        target = f"{t['gpu']} sm {t['compute_capability']}" if t.get("gpu") else \
            "any GPU of sm " + " ".join(t.get("compute_capabilities", []))
        flags = [k.replace("_", "-") for k in ("refittable", "strip_weights") if e["options"].get(k)]
        lines.append(f"  {e['backend']} {e['backend_version']}  {e['component']} {e['precision']}  "
                     f"{e['size'] / 1e6:.1f} MB  for {target}" + (f"  [{', '.join(flags)}]" if flags else ""))
        lines.append(f"      {e['path']}")
        lines += [f"      profile {label}" for label in e["profiles"]]
        v = e.get("verify")
        if v:
            lines.append(f"      verified against {v['against']}: {'passed' if v['passed'] else 'FAILED'}, mean |diff| "
                         f"{v['mean_abs']:.2e} (max {v['max_abs']:.2e}) within rtol {v['rtol']:g} / atol {v['atol']:g}")
        lines.append("      usable here: yes" if e["usable"] else f"      usable here: no: {e['why_not']}")
    m = info["machine"]
    gpu = f"{m['gpu']['name']} (sm {m['gpu']['compute_capability']})" if m["gpu"] else "no CUDA GPU"
    backends = ", ".join(f"{b} {v}" if v else f"{b} not installed" for b, v in m["backends"].items())
    lines.append(f"this machine: {gpu}; {backends}")
    return "\n".join(lines)
