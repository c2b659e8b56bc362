"""`sdxl-trt refit DIR --model SRC --out NEW`: an engine directory for a fine-tune of the model DIR was exported from,
made from DIR's ONNX files with the fine-tune's weights put in: no tracing, no fp16 conversion.

The architecture must be the same (checked): each module's config (defaults filled in) and parameter shapes equal
those of the model the directory was exported from (named in the manifest; it must still be loadable), and every
weight the files hold is matched to one of that model's parameters by value — as it is, transposed (MatMul
weights), or reshaped (GroupNorm scales folded into [C, 1, 1] constants) — in the file's dtype. Each matched
initializer takes the fine-tune's value of that parameter, in the same layout and dtype; the rest (constants of the
architecture: position ids, timestep frequencies) stay. A weight two parameters share the value of is taken only
if the fine-tune kept them equal too; otherwise, and whenever the architectures differ, the answer is to re-export.

Every refitted fp32 file is then run on ONNX Runtime CPU against torch with the fine-tune's weights at the export's
verification shapes (verify.py's tolerances), so a weight the matching missed cannot pass silently; `--verify` also
checks the fp16 files. Optimized (ort-cuda) files and TensorRT engines are not carried over: run `sdxl-trt
optimize` / `build` on the new directory (TensorRT refit of built engines needs the GPU they were built for).
"""

from __future__ import annotations

import copy
import gc
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..runtime import manifest as mf
from ..runtime.errors import UserError
from ..runtime.fileio import atomic_dir
from .engine_dir import PLAN, _check_out, _contract_role, _load_module, weights_sha256
from .models import COMPONENTS
from .onnx_export import write_model
from .sources import resolve

METADATA = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "use_cache")


@dataclass
class RefitReport:
    out: Path
    rows: list = field(default_factory=list)  # (component, precision, weights replaced, constants kept, seconds)
    verify_lines: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"{'component':<16}{'file':>6}{'weights':>10}{'constants':>11}{'time':>8}"]
        lines += [f"{c:<16}{p:>6}{n:>10}{k:>11}{s:>7.1f}s" for c, p, n, k, s in self.rows]
        lines += self.verify_lines + self.notes
        lines.append(f"refitted into {self.out} in {self.seconds:.0f} s")
        return "\n".join(lines)


def refit_engine_dir(engine_dir: str | Path, out: str | Path, model: str, *, refiner: str | None = None,
                     verify: bool = False, force: bool = False, allow_pickle: bool = False,
                     progress: bool = True) -> RefitReport:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    root, out = Path(engine_dir), Path(out).expanduser()
    manifest = mf.load_manifest(root)
    manifest.check_files()
    # the refitted directory is a copy of this one with new weights: its size is known exactly
    _check_out(out, force, sum(int(r.get("size", 0)) for r in manifest.data["files"].values()))
    if out.resolve() == root.resolve():
        raise UserError("--out: give a new directory (DIR itself is read while the new one is written)")
    sources = manifest.data["sources"]
    new = {}
    for spec in filter(None, (model, refiner)):
        src = resolve(spec, allow_pickle=allow_pickle)
        if src.role not in sources:
            raise UserError(f"{spec!r} is an SDXL {src.role}; {root} has no {src.role} to refit "
                            f"(it has {', '.join(r for r in sources if r != 'vae')})")
        new[src.role] = src
    old = {}
    for role in new:
        try:
            old[role] = resolve(sources[role]["spec"], allow_pickle=allow_pickle)
        except UserError as e:
            raise UserError(f"refit matches weights against the model {root} was exported from "
                            f"({sources[role]['spec']!r}), which cannot be loaded ({e}); re-export instead") from None
    report = RefitReport(out)
    data = copy.deepcopy(manifest.data)
    for record in data["components"].values():
        record.pop("optimized", None)
    data.pop("engines", None)
    done: dict[str, str] = {}  # component → weights hash of the module refitted into it
    with atomic_dir(out) as tmp:
        for path in root.iterdir():  # tokenizers, scheduler: as they are
            if path.is_dir() and path.name not in ("onnx", "engines"):
                shutil.copytree(path, tmp / path.name)
        for role, src in new.items():
            targets = data["pipelines"][role]["components"]
            for module_name, names in PLAN[role]:
                if module_name == "vae" and "vae" in sources:
                    report.notes.append(f"{role}: the VAE came from --vae {sources['vae']['spec']!r}: kept as it was")
                    continue
                wanted = [targets[_contract_role(n)] for n in names if _contract_role(n) in targets]
                if not wanted:
                    continue
                before = _load_module(old[role], module_name, allow_pickle)
                after = _load_module(src, module_name, allow_pickle)
                difference = architecture_difference(before, after)
                if difference:
                    raise UserError(f"{src.spec!r} is not the architecture {root} was exported from ({module_name} "
                                    f"{difference}); re-export it with `sdxl-trt export`")
                digest = weights_sha256(after)
                index = ValueIndex(before)  # once per module: its fp32 and fp16 files (and the VAE's two) use it
                new_params = {n: p.detach().float().numpy().copy() for n, p in after.state_dict().items()}
                del before
                for target in wanted:
                    if target in done:  # shared by base and refiner
                        if done[target] != digest:
                            raise UserError(f"{target} is shared by the base and the refiner in {root}, but the "
                                            f"new {role}'s {module_name} differs from the base's; re-export")
                        continue
                    bar = tqdm(total=len(data["components"][target]["precisions"]), desc=f"refit {target}",
                               disable=not progress, leave=False)
                    _refit_component(root, tmp, data, target, index, new_params, after, verify, report, bar)
                    data["components"][target]["weights_sha256"] = done[target] = digest
                    bar.close()
                del index, new_params, after
                gc.collect()
        for target in data["components"]:  # components the refit does not touch: copied
            if target not in done:
                for f in {f for files in data["components"][target]["files"].values() for f in files}:
                    (tmp / f).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(root / f, tmp / f)
        for role, src in new.items():
            data["sources"][role] = {"spec": src.spec, "kind": src.kind, "architecture": src.architecture,
                                     "refitted_from": sources[role]["spec"]}
        data["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        data["files"] = mf.file_records(tmp, (p for p in sorted(tmp.rglob("*")) if p.is_file()))
        mf.write_manifest(tmp, data)
    report.notes.append("optimized files and TensorRT engines are not carried over: run `sdxl-trt optimize` / "
                        "`sdxl-trt build` on the new directory")
    report.seconds = time.perf_counter() - started
    return report


def _refit_component(root: Path, tmp: Path, data: dict, target: str, index: ValueIndex, new_params: dict, after,
                     verify: bool, report: RefitReport, bar) -> None:
    from .verify import add_fp16_errors, check_onnx, torch_references

    import torch

    record = data["components"][target]
    component = COMPONENTS[record["contract"]](after)  # the export names components by their contract
    refs = torch_references(component)
    weights = {n: p.detach().clone() for n, p in after.state_dict().items()}
    for precision in ("fp32", "fp16"):
        if precision not in record["precisions"]:
            continue
        t = time.perf_counter()
        src = root / record["precisions"][precision]
        dest = tmp / record["precisions"][precision]
        dest.parent.mkdir(parents=True, exist_ok=True)
        replaced, kept = refit_file(src, dest, index, new_params, target)
        report.rows.append((target, precision, replaced, kept, time.perf_counter() - t))
        bar.update()
        if precision == "fp32" or verify:
            if precision == "fp16":
                after.half()  # torch's own fp16 error bounds the fp16 file's (as export --verify)
                add_fp16_errors(component, refs)
            report.verify_lines += check_onnx(dest, component, refs, precision)
    with torch.no_grad():  # fp16 is lossy: the fp32 weights back for the next component of this module
        after.float().load_state_dict(weights)


def architecture_difference(before, after) -> str | None:
    """The first difference between two modules' configs (defaults filled in; file metadata ignored) or parameter
    shapes, as "key: new vs old"; None when they are the same architecture."""
    def config(module) -> dict:
        c = module.config
        items = c.to_dict() if hasattr(c, "to_dict") and not isinstance(c, dict) else dict(c)
        return {k: v for k, v in items.items() if not k.startswith("_") and k not in METADATA}

    a, b = config(before), config(after)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key}: {b.get(key)!r} vs {a.get(key)!r}"
    shapes = [{n: tuple(t.shape) for n, t in m.state_dict().items()} for m in (before, after)]
    for name in sorted(set(shapes[0]) | set(shapes[1])):
        if shapes[0].get(name) != shapes[1].get(name):
            return f"{name}: {shapes[1].get(name)} vs {shapes[0].get(name)}"
    return None


def refit_file(src: Path, dest: Path, index: ValueIndex, new_params: dict, target: str) -> tuple[int, int]:
    """`dest`: the ONNX file `src` with every weight `index` (the original module's parameters) finds replaced by
    that parameter's value in `new_params` (the fine-tune's, fp32: cast per file); (replaced, kept)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src), load_external_data=False)
    replaced = kept = 0
    for tensor in model.graph.initializer:
        value = numpy_helper.to_array(tensor, base_dir=str(src.parent))
        if value.dtype not in (np.float32, np.float16) or value.size < 2:
            kept += 1
            continue
        found = index.find(value)
        if found is None:
            kept += 1
            continue
        names, layout = found
        values = {new_params[n].tobytes() for n in names}
        if len(values) > 1:
            raise UserError(f"{target}: initializer {tensor.name} holds the value of {', '.join(sorted(names)[:3])}, "
                            "which the fine-tune does not keep equal; re-export it with `sdxl-trt export`")
        fresh = as_dtype(layout(new_params[names[0]]), value.dtype).reshape(value.shape)
        tensor.ClearField("external_data")
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = np.ascontiguousarray(fresh).tobytes()
        replaced += 1
    write_model(model, dest, src.parent)
    return replaced, kept


def as_dtype(array: np.ndarray, dtype) -> np.ndarray:
    """fp32 weights in `dtype` as the export wrote them: fp16 through ONNX Runtime's converter, which clamps to
    fp16's finite range and its smallest normal magnitude instead of rounding to subnormals (fp16.py)."""
    if np.dtype(dtype) == np.float16:
        from onnxruntime.transformers import float16

        return float16.convert_np_to_float16(np.asarray(array, np.float32))
    return np.asarray(array, dtype)


class ValueIndex:
    """The parameters of a module by value (a digest of their bytes, per dtype), to find which one an initializer
    holds and in which layout: as it is or reshaped, or transposed (a MatMul's weight)."""

    LAYOUTS = {"same": lambda a: a, "transposed": lambda a: a.T}

    def __init__(self, module):
        self._by_value: dict[tuple, list[str]] = {}
        for name, param in module.state_dict().items():
            array = param.detach().float().numpy()
            if array.size >= 2:
                for dtype in (np.float32, np.float16):
                    self._by_value.setdefault(self.key(as_dtype(array, dtype)), []).append(name)

    @staticmethod
    def key(array: np.ndarray) -> tuple:
        import hashlib

        return array.dtype.str, hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).digest()

    def find(self, value: np.ndarray):
        """(parameter names, layout function) for an initializer's value, or None."""
        candidates = [("same", value)] + ([("transposed", value.T)] if value.ndim == 2 else [])
        for layout, array in candidates:
            names = self._by_value.get(self.key(array))
            if names:
                return names, self.LAYOUTS[layout]
        return None
