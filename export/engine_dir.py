"""`sdxl-trt export`: SDXL weights → an engine directory (ONNX files, tokenizers, scheduler, manifest).

One torch module is in memory at a time: it is loaded, its torch references are taken (with --verify), it is
traced to fp32 ONNX, and freed before its fp16 variant is converted and the files are checked on ONNX Runtime.
The whole directory is assembled under a temporary name beside --out and renamed into place at the end: an
export that fails or is interrupted leaves nothing that looks like an engine directory.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import json
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from tqdm.auto import tqdm

from ..runtime import engines as eng
from ..runtime import manifest as mf
from ..runtime.errors import UserError
from ..runtime.fileio import atomic_dir, check_writable, read_json
from .controlnet_sources import load_controlnet, resolve_controlnet
from .models import COMPONENTS
from .onnx_export import IR_VERSION, OPSET, PRECISION_FILES, export_onnx, model_files
from .sources import SourceSpec, load_model, resolve

PRECISIONS = ("fp32", "fp16")  # --precision fp16 writes both: model.onnx (fp32, the reference) and model.fp16.onnx
# per role: (module of the ModelSource, components exported from it)
PLAN = {
    "base": [("clip_l", ["clip_l"]), ("clip_g", ["clip_g"]), ("unet", ["unet"]), ("vae", ["vae_decoder", "vae_encoder"])],
    "refiner": [("clip_g", ["clip_g"]), ("unet", ["unet_refiner"]), ("vae", ["vae_decoder", "vae_encoder"])],
}
SHAREABLE = ("clip_g", "vae")  # the SDXL 1.0 refiner ships the base's CLIP-G and VAE unchanged


@dataclass
class ExportReport:
    out: Path
    rows: list = field(default_factory=list)  # (component, precision, bytes, seconds)
    verify_lines: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_gb: float = 0.0

    def summary(self) -> str:
        lines = [f"{'component':<22}{'precision':<11}{'size':>12}{'time':>9}"]
        for name, precision, size, seconds in self.rows:
            lines.append(f"{name:<22}{precision:<11}{size / 1e6:>10.1f} MB{seconds:>8.1f}s")
        lines += self.notes
        lines.append(f"wrote {self.out} in {self.seconds:.0f} s, peak memory (RSS) {self.peak_rss_gb:.1f} GB")
        return "\n".join(lines)


def weights_sha256(module) -> str:
    """A hash of a module's weights (names, dtypes, shapes, bytes), to tell whether two modules are the same."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _check_out(out: Path, force: bool, need_bytes: int = 0) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {str(out)!r} exists and is not empty; pass --force to replace it")
    if out.is_dir() and os.path.ismount(out):  # replaced by a rename of the new directory, which a mount refuses
        raise UserError(f"--out {str(out)!r} is a mount point, which cannot be replaced as a whole; export into a "
                        f"folder inside it (e.g. --out {str(out / 'sdxl')!r})")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {str(out)!r}: cannot create folder {parent} ({e.strerror})") from None
    # a read-only or full filesystem: said now, not after the export (`need_bytes`: the result's size, where known)
    check_writable(out, f"--out {str(out)!r}", need_bytes)


def _resolve_vae(spec: str, allow_pickle: bool) -> SourceSpec:
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        config = read_json(path / "config.json", f"--vae {spec!r}")
        if config.get("_class_name") != "AutoencoderKL":
            raise UserError(f"--vae {spec!r} holds a {config.get('_class_name')}, not an AutoencoderKL")
        return SourceSpec(spec, "vae-folder", "vae", None, path=path)
    return resolve(spec, allow_pickle=allow_pickle, flag="--vae")


def _load_module(src: SourceSpec, module: str, allow_pickle: bool):
    if src.kind == "vae-folder":
        from diffusers import AutoencoderKL

        try:
            return AutoencoderKL.from_pretrained(src.path, local_files_only=True, torch_dtype=None).eval()
        except (OSError, ValueError) as e:
            raise UserError(f"--vae {src.spec!r}: cannot load it ({str(e).splitlines()[0]})") from None
    model = load_model(src, components=[module], allow_pickle=allow_pickle, progress=False)
    return getattr(model, module)


def export_engine_dir(model: str, out: str | Path, *, refiner: str | None = None, vae: str | None = None,
                      components: list[str] | None = None, precision: str = "fp16", verify: bool = False,
                      force: bool = False, allow_pickle: bool = False, progress: bool = True,
                      controlnets: list[str] | None = None) -> ExportReport:
    """Export SDXL from `model` (and `refiner`) into the engine directory `out`; see `sdxl-trt export --help`."""
    started = time.perf_counter()
    out = Path(out).expanduser()
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    wanted = list(COMPONENTS) if components is None else list(components)
    unknown = [c for c in wanted if c not in COMPONENTS]
    if unknown:
        raise UserError(f"--components: unknown component {unknown[0]!r}; known: {', '.join(COMPONENTS)}")
    _check_out(out, force)
    if (precision == "fp16" or verify) and importlib.util.find_spec("onnxruntime") is None:
        raise UserError("fp16 conversion and --verify use ONNX Runtime, which is not installed: install "
                        "sdxl-trt[cpu] (or [gpu] on a GPU machine), or export with --precision fp32")
    roles: dict[str, SourceSpec] = {}
    main = resolve(model, allow_pickle=allow_pickle)
    roles[main.role] = main
    if refiner is not None:
        if main.role == "refiner":
            raise UserError(f"--model {model!r} is already a refiner; --refiner goes with a base model")
        ref = resolve(refiner, allow_pickle=allow_pickle, flag="--refiner")
        if ref.role != "refiner":
            raise UserError(f"--refiner {refiner!r} is an SDXL {ref.role} model, not a refiner")
        roles["refiner"] = ref
    vae_src = _resolve_vae(vae, allow_pickle) if vae else None
    control_srcs = [resolve_controlnet(c) for c in controlnets or []]
    if control_srcs and "base" not in roles:
        raise UserError(f"--controlnet goes with a base model; {model!r} is a refiner")
    produced = [name for role in roles for _, names in PLAN[role] for name in names]
    if control_srcs:
        produced += ["controlnet", "unet_control"]
        if components is not None and "unet" in components and "unet_control" not in wanted:
            wanted.append("unet_control")  # the UNet that takes the residuals goes with the ControlNets
    absent = [c for c in (components or []) if c not in produced]
    if absent:
        hint = "it needs --refiner" if absent[0] == "unet_refiner" else \
            "they need --controlnet" if absent[0] in ("controlnet", "unet_control") else f"{model!r} is a refiner"
        raise UserError(f"--components {absent[0]}: not among what this export makes ({', '.join(produced)}); {hint}")

    report = ExportReport(out)
    manifest = {"format": mf.FORMAT, "format_version": mf.FORMAT_VERSION,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "sources": {role: {"spec": s.spec, "kind": s.kind, "architecture": s.architecture}
                            for role, s in roles.items()},
                "versions": _versions(), "onnx": {"opset": OPSET, "ir_version": IR_VERSION},
                "components": {}, "pipelines": {}}
    if vae_src:
        manifest["sources"]["vae"] = {"spec": vae_src.spec, "kind": vae_src.kind}
    shared: dict[str, tuple[str, dict[str, str]]] = {}  # module → (weights hash, component → exported name)
    # --force over an engine directory: its lock held from here until it is replaced (an optimize or build running
    # there is refused now; one started meanwhile is refused, instead of writing into a directory about to go)
    replacing = eng.locked(out, required=False) if out.is_dir() and (out / mf.MANIFEST).is_file() else \
        contextlib.nullcontext()
    try:
        with replacing, atomic_dir(out) as tmp:
            for role, src in roles.items():
                pipeline = {"components": {}}
                for module_name, names in PLAN[role]:
                    names = [n if n != "unet" or role == "base" else "unet_refiner" for n in names]
                    if role == "base" and module_name == "unet" and control_srcs:
                        names.append("unet_control")
                    names = [n for n in names if n in wanted]
                    if not names:
                        continue
                    source = vae_src if module_name == "vae" and vae_src else src
                    module = _load_module(source, module_name, allow_pickle)
                    # room for this module's files (fp32, and fp16 beside it), checked before it is traced: a disk
                    # that fills up is said before the work on it, not after
                    numel = sum(p.numel() for p in module.parameters())
                    check_writable(tmp / "onnx", f"--out {str(out)!r}",
                                   numel * len(names) * (6 if precision == "fp16" else 4))
                    digest = weights_sha256(module)
                    if module_name in SHAREABLE and module_name in shared and shared[module_name][0] == digest:
                        pipeline["components"].update(shared[module_name][1])  # identical weights: reuse the files
                        report.notes.append(f"{role}: {module_name} has the same weights as the base's: shared")
                        del module
                        continue
                    exported = {}
                    jobs = []
                    for name in names:
                        target = name if role == "base" or "refiner" in name or "base" not in roles else f"{name}_refiner"
                        exported[_contract_role(name)] = target
                        jobs.append(_ExportJob(COMPONENTS[name](module), target, tmp / "onnx" / target))
                    del module  # the jobs hold it now, and release it as soon as torch is no longer needed
                    _export_module(jobs, precision, verify, report, progress)
                    for job in jobs:
                        manifest["components"][job.target] = job.record(tmp, digest)
                    pipeline["components"].update(exported)
                    if module_name in SHAREABLE and role == "base":
                        shared[module_name] = (digest, exported)
                manifest["pipelines"][role] = {**pipeline, **_pipeline_config(src, role)}
            if control_srcs and "controlnet" in wanted:
                _export_controlnets(control_srcs, roles["base"], precision, verify, report, progress, tmp, manifest)
            _copy_support_files(roles, vae_src, tmp, manifest)
            manifest["files"] = mf.file_records(tmp, (p for p in sorted(tmp.rglob("*")) if p.is_file()))
            mf.write_manifest(tmp, manifest)
    except OSError as e:
        raise UserError(f"export to {out} failed: {e.strerror or e} ({e.filename or out}); nothing was written") from None
    report.seconds = time.perf_counter() - started
    report.peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return report


def _export_controlnets(srcs: list, base: SourceSpec, precision: str, verify: bool, report: ExportReport,
                        progress: bool, tmp: Path, manifest: dict) -> None:
    """Each `--controlnet` as `controlnet_<i>`, one at a time; the base pipeline lists them in order."""
    unet_config = _source_configs(base)["unet"]
    names = []
    for index, src in enumerate(srcs):
        module = load_controlnet(src, index, unet_config)
        target = f"controlnet_{index}"
        check_writable(tmp / "onnx", "--out", sum(p.numel() for p in module.parameters()) * 6)
        digest = weights_sha256(module)
        job = _ExportJob(COMPONENTS["controlnet"](module), target, tmp / "onnx" / target)
        global_pool = bool(module.config.global_pool_conditions)
        del module
        _export_module([job], precision, verify, report, progress)
        manifest["components"][target] = {**job.record(tmp, digest), "global_pool_conditions": global_pool}
        manifest["sources"][target] = {"spec": src.spec, "kind": src.kind}
        names.append(target)
    pipeline = manifest["pipelines"]["base"]
    pipeline["controlnets"] = names
    pipeline["components"].update({name: name for name in names})


def _contract_role(name: str) -> str:
    """What a pipeline calls the component: the refiner's UNet is its `unet`."""
    return "unet" if name == "unet_refiner" else name


@dataclass
class _ExportJob:
    component: object  # a contract.Component around the torch module
    target: str  # its name in this engine directory
    folder: Path
    files: dict = field(default_factory=dict)  # precision → ONNX path
    refs: list | None = None

    def record(self, root: Path, digest: str) -> dict:
        c = self.component
        return {"contract": c.name, **c.contract(), "weights_sha256": digest,
                "precisions": {p: path.relative_to(root).as_posix() for p, path in self.files.items()},
                "files": {p: [f.relative_to(root).as_posix() for f in model_files(path)] for p, path in self.files.items()}}


def _export_module(jobs: list[_ExportJob], precision: str, verify: bool, report: ExportReport, progress: bool) -> None:
    """Everything that needs the torch module first (references, fp32 trace, torch's fp16 error); then the module
    is released and the fp16 conversion and ONNX Runtime checks run without it in memory."""
    from .fp16 import convert_to_fp16
    from .verify import add_fp16_errors, check_onnx, torch_references

    module = jobs[0].component.torch_module
    fp16_safe = not jobs[0].component.fp16_needs_safe_weights or not getattr(module.config, "force_upcast", True)
    make_fp16 = precision == "fp16" and fp16_safe
    bars = {job.target: tqdm(total=2 + make_fp16 + 2 * verify, desc=f"export {job.target}", disable=not progress,
                             leave=False) for job in jobs}
    for job in jobs:
        bar = bars[job.target]
        if verify:
            bar.set_postfix_str("torch reference")
            job.refs = torch_references(job.component)
            bar.update()
        t = time.perf_counter()
        bar.set_postfix_str("trace fp32")
        job.files["fp32"] = export_onnx(job.component, job.folder, "fp32")
        _check_onnx_file(job.files["fp32"])
        report.rows.append((job.target, "fp32", _size(job.files["fp32"]), time.perf_counter() - t))
        bar.update()
    if make_fp16 and verify:
        module.half()  # torch's own fp16 error is the budget of the fp16 file; fp16 is lossy, so no way back
        for job in jobs:
            add_fp16_errors(job.component, job.refs)
    for job in jobs:
        job.component.torch_module = None
    del module
    gc.collect()
    for job in jobs:
        bar = bars[job.target]
        if make_fp16:
            t = time.perf_counter()
            bar.set_postfix_str("fp16")
            job.files["fp16"] = convert_to_fp16(job.files["fp32"], job.folder / PRECISION_FILES["fp16"], job.component)
            _check_onnx_file(job.files["fp16"])
            report.rows.append((job.target, "fp16", _size(job.files["fp16"]), time.perf_counter() - t))
            bar.update()
        elif precision == "fp16":
            report.notes.append(f"{job.target}: no fp16 variant: these VAE weights overflow in fp16 (force_upcast); "
                                "GPU backends run it in fp32, or export with --vae an fp16-safe VAE")
        if verify:
            bar.set_postfix_str("verify")
            for p, path in job.files.items():
                report.verify_lines += check_onnx(path, job.component, job.refs, p)
            bar.update()
        bar.update()
        bar.close()


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in model_files(path))


def _check_onnx_file(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path))  # by path: works past protobuf's 2 GiB limit


def _pipeline_config(src: SourceSpec, role: str) -> dict:
    from .models import Unet, UnetRefiner

    index = _source_configs(src)["model_index"]
    return {"time_ids": list((Unet if role == "base" else UnetRefiner).time_ids),
            "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", role == "base")),
            "requires_aesthetics_score": bool(index.get("requires_aesthetics_score", role == "refiner")),
            "unet_in_channels": src.in_channels}


def _source_configs(src: SourceSpec) -> dict:
    folder = src.path if src.kind == "diffusers" else src.config_dir
    return {"model_index": read_json(folder / "model_index.json", src.spec),
            "scheduler": read_json(folder / "scheduler" / "scheduler_config.json", src.spec),
            "vae": read_json(folder / "vae" / "config.json", src.spec),
            "unet": read_json(folder / "unet" / "config.json", src.spec),
            "tokenizers": {n: folder / n for n in ("tokenizer", "tokenizer_2") if (folder / n).is_dir()}}


def _copy_support_files(roles: dict, vae_src: SourceSpec | None, root: Path, manifest: dict) -> None:
    """Scheduler config, both tokenizers, and the model config values the runtime needs."""
    from .vocab import cached_tokenizer_dirs

    main = roles.get("base") or roles["refiner"]
    configs = _source_configs(main)
    scheduler_dir = root / "scheduler"
    scheduler_dir.mkdir(exist_ok=True)
    (scheduler_dir / "scheduler_config.json").write_text(json.dumps(configs["scheduler"], indent=2) + "\n")
    manifest["scheduler"] = configs["scheduler"]
    tokenizers = configs["tokenizers"] if main.kind == "diffusers" else cached_tokenizer_dirs(main.config_dir)
    for name, folder in tokenizers.items():
        shutil.copytree(folder, root / name)
    manifest["tokenizers"] = {name: name for name in tokenizers}
    vae = configs["vae"]
    if vae_src is not None:
        folder = vae_src.path if vae_src.kind == "vae-folder" else None
        vae = read_json(folder / "config.json", vae_src.spec) if folder else _source_configs(vae_src)["vae"]
    unet = configs["unet"]
    scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)  # pixels per latent: 8 for SDXL
    manifest["model"] = {
        "vae_scaling_factor": vae.get("scaling_factor", 0.13025),
        "vae_shift_factor": vae.get("shift_factor"),
        "vae_force_upcast": bool(vae.get("force_upcast", True)),
        "vae_scale_factor": scale,
        "latent_channels": vae.get("latent_channels", 4),
        "addition_time_embed_dim": unet.get("addition_time_embed_dim"),
        "default_size": unet.get("sample_size", 128) * scale,
        "prediction_type": configs["scheduler"].get("prediction_type", "epsilon"),
    }


def _versions() -> dict:
    versions = {}
    for dist in ("sdxl-trt", "torch", "onnx", "onnxruntime", "diffusers", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions
