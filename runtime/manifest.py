"""The engine directory's `manifest.json`: what was exported from what, and how to check every file.

Written by the exporter, read by the runtime (without torch). Layout of an engine directory:

    manifest.json
    tokenizer/, tokenizer_2/          CLIP BPE files (CLIP-L's, CLIP-G's)
    scheduler/scheduler_config.json   the model's default scheduler
    onnx/<component>/model.onnx       fp32 (+ model.onnx.data for large models)
    onnx/<component>/model.fp16.onnx  fp16 variant for GPU backends (+ .data)

Manifest keys: `format`, `format_version`, `created`, `sources` (what each role was exported from),
`versions` (torch, onnx, diffusers, transformers, sdxl-trt), `onnx` (opset, IR version), `model` (config values
the runtime needs), `scheduler`, `tokenizers`, `components` (contract, precisions and files of each exported
model), `pipelines` (which component each role uses for what: the refiner may share the base's clip_g and VAE),
`files` (sha256 and size of every exported file, paths relative to the directory), and, once `sdxl-trt build` has
run, `engines` (one record per TensorRT / TensorRT-RTX engine: see engines.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import UserError
from .fileio import atomic_file, cache_dir

MANIFEST = "manifest.json"
SETTLED_NS = 3_000_000_000  # see checked_sha256
FORMAT = "sdxl-trt-engine-dir"
FORMAT_VERSION = 1
EXPORT_HINT = "re-run `sdxl-trt export` into a fresh directory"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checked_sha256(path: Path) -> str:
    """sha256 of a file, remembered in the cache (`sha256/`) under the file's identity and last change (device,
    inode, size, modification and status-change times): a file not written since it was last hashed is not read
    again, so a second start does not re-read gigabytes of weights. Any write changes the status-change time, which
    no user can set back."""
    stat = path.stat()
    key = f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
    try:
        record = cache_dir("sha256") / (hashlib.sha256(str(path.resolve()).encode()).hexdigest() + ".json")
    except OSError:  # no cache folder to be had: hash every time
        record = None
    if record is not None and record.is_file():
        try:
            cached = json.loads(record.read_text(encoding="utf-8"))
            if isinstance(cached, dict) and cached.get("key") == key and isinstance(cached.get("sha256"), str):
                return cached["sha256"]
        except (OSError, ValueError):
            pass
    digest = sha256_file(path)
    # a file changed within the last seconds could change again within the same clock tick, unseen by its times
    # ("racily clean", as git calls it): remember only files that have been still for a while
    settled = time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > SETTLED_NS
    if record is not None and settled:
        try:
            with atomic_file(record) as tmp:
                tmp.write_text(json.dumps({"path": str(path.resolve()), "key": key, "sha256": digest}), encoding="utf-8")
        except OSError:
            pass  # a read-only cache only costs the next start a re-read
    return digest


def file_record(root: Path, path: Path) -> tuple[str, dict]:
    return path.relative_to(root).as_posix(), {"sha256": sha256_file(path), "size": path.stat().st_size}


def file_records(root: Path, paths) -> dict[str, dict]:
    """file_record of each path, in order, hashed on several threads (hashlib lets go of the GIL while it hashes: an
    engine directory's weight files, gigabytes each, are read and hashed at once instead of one after the other)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(paths)))) as pool:
        return dict(pool.map(lambda path: file_record(root, path), paths))


def file_problem(path: Path, record: dict, check_hash: bool, changed: str) -> str | None:
    """Why `path` is not the file its manifest record ({"size", "sha256"}) describes, or None. `changed` says since
    when, in the message for a wrong hash."""
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != record["size"]:
        return f"{path} has {size} bytes, the manifest says {record['size']}: truncated or replaced"
    if check_hash and checked_sha256(path) != record["sha256"]:
        return f"{path} does not match its sha256 in the manifest: {changed}"
    return None


def write_manifest(root: Path, data: dict) -> None:
    with atomic_file(root / MANIFEST) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


@dataclass
class Manifest:
    root: Path
    data: dict

    @property
    def components(self) -> dict:
        return self.data["components"]

    @property
    def sha256(self) -> str:
        """A hash of the manifest without its `engines` section: it names every exported file's hash, so it
        identifies what was exported (building engines does not change it)."""
        exported = {k: v for k, v in self.data.items() if k != "engines"}
        return hashlib.sha256(json.dumps(exported, sort_keys=True).encode()).hexdigest()

    def path(self, relative: str) -> Path:
        """An absolute path for a manifest entry; entries may not leave the engine directory."""
        pure = PurePosixPath(relative)
        if pure.is_absolute() or ".." in pure.parts:
            raise UserError(f"{self.root / MANIFEST}: file entry {relative!r} points outside the engine directory")
        return self.root.joinpath(*pure.parts)

    @property
    def engines(self) -> dict:
        """TensorRT / TensorRT-RTX engines built into this directory (see engines.py), by path."""
        return self.data.get("engines", {})

    @property
    def pipelines(self) -> dict:
        return self.data["pipelines"]

    @property
    def main_role(self) -> str:
        """The role that encodes prompts and images and decodes latents: the base, or a refiner exported alone."""
        return "base" if "base" in self.pipelines else "refiner"

    def export_command(self) -> str:
        """The `sdxl-trt export` that writes this directory again, whole, from the sources it was exported from."""
        sources = self.data.get("sources") or {}
        main = sources.get("base") or sources.get("refiner")
        args = ["sdxl-trt", "export", "--model", main["spec"] if main else "SRC"]
        if "base" in sources and "refiner" in sources:
            args += ["--refiner", sources["refiner"]["spec"]]
        if "vae" in sources:
            args += ["--vae", sources["vae"]["spec"]]
        return shlex.join([*args, "--out", str(self.root), "--force"])

    def missing(self, work: str) -> str | None:
        """Why this directory cannot do `work` (a key of WORK): the first component it needs that was not exported,
        in one line with the export that makes it; None if it can."""
        role, kinds, what = self._work(work)
        pipeline = self.pipelines.get(role)
        if pipeline is None:
            base = (self.data.get("sources") or {}).get("base", {}).get("spec", "BASE")
            return (f"{self.root} has no {role}, needed {what}; export one beside the base: "
                    f"`{shlex.join(['sdxl-trt', 'export', '--model', base, '--refiner', 'SRC', '--out', 'DIR'])}`")
        names = pipeline["components"]
        for kind in kinds:
            if kind not in names:
                return (f"{self.root}: the {role} pipeline has no {kind}, needed {what}; it has "
                        f"{', '.join(names) or 'nothing'} (an export with a subset of --components): re-export it "
                        f"whole: `{self.export_command()}`")
        return None

    def work_components(self, work: str) -> list[str]:
        """The components `work` (a key of WORK) runs, as this directory names them (those it has)."""
        role, kinds, _ = self._work(work)
        names = self.pipelines.get(role, {}).get("components", {})
        return [names[kind] for kind in kinds if kind in names]

    def _work(self, work: str) -> tuple[str, tuple[str, ...], str]:
        """(pipeline role, component kinds, what for) of `work`: WORK's entry with "main" and "the text encoders and
        the UNet" (None) resolved for this directory."""
        role, kinds, what = WORK[work]
        role = self.main_role if role == "main" else role
        return role, kinds or (*ENCODERS[role], "unet"), what

    def require(self, *work: str) -> None:
        """Every component `work` needs (keys of WORK) is here, or one line names the first one missing."""
        for stage in work:
            problem = self.missing(stage)
            if problem:
                raise UserError(problem)

    def check_files(self, hashes: bool = True, only: list[str] | None = None) -> None:
        """Every listed file (or those in `only`) exists with its recorded size (and sha256 with `hashes`). The advice
        names what makes the file: `sdxl-trt optimize` for its optimized files (and custom-op library), else export."""
        records = [r for e in self.components.values() for r in (e.get("optimized") or {}).values()]
        optimized = {f for r in records for f in r.get("files", [])}
        libraries = {r["custom_ops"] for r in records if r.get("custom_ops")}
        for relative, record in self.data["files"].items():
            if only is not None and relative not in only:
                continue
            made = relative in optimized or relative in libraries
            problem = file_problem(self.path(relative), record, hashes,
                                   "changed since `sdxl-trt optimize` made it" if made else "changed since export")
            if problem and made:
                flag = " --custom-ops" if relative in libraries else ""
                raise UserError(f"{problem}; make it again: `sdxl-trt optimize {self.root}{flag}`")
            if problem:
                raise UserError(f"{problem}; re-export it: `{self.export_command()}`")


def load_manifest(root: str | Path) -> Manifest:
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise UserError(f"engine directory {root} does not exist; create one with `sdxl-trt export`")
    if not path.is_file():
        raise UserError(f"{root} has no {MANIFEST}: not an engine directory (or an export that did not finish); "
                        f"{EXPORT_HINT}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested thousands deep
        raise UserError(f"{path} is not valid JSON ({e or 'nested too deep'}); {EXPORT_HINT}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not an sdxl-trt manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has format version {data.get('format_version')}; this sdxl-trt reads version "
                        f"{FORMAT_VERSION}: {EXPORT_HINT} with this version")
    manifest = Manifest(root, data)
    try:
        _Schema(manifest).check()
    except (TypeError, KeyError, AttributeError, ValueError, IndexError) as e:
        # a shape of value no field check foresaw (a list where a name goes, …): still one line, never a traceback
        raise UserError(f"{path}: a field has a value of the wrong kind ({type(e).__name__}: {e}); "
                        f"{EXPORT_HINT}") from None
    _check_file_lists(manifest)
    return manifest


def _check_file_lists(manifest: Manifest) -> None:
    """Every file a component names stays inside the engine directory and has a size/sha256 record in `files`
    (which is what every later check reads): a hand-edited or foreign manifest is refused here, in one line."""
    records = manifest.data.get("files")
    components = manifest.data.get("components")
    if not isinstance(records, dict) or not isinstance(components, dict):
        raise UserError(f"{manifest.root / MANIFEST} lacks its `files` or `components` table; {EXPORT_HINT}")
    for name, entry in components.items():
        lists = list((entry.get("files") or {}).values())
        lists += [record.get("files", []) for record in (entry.get("optimized") or {}).values()]
        lists += [[record["custom_ops"]] for record in (entry.get("optimized") or {}).values() if record.get("custom_ops")]
        for relative in (r for files in lists for r in files):
            manifest.path(relative)  # refuses a path that leaves the directory
            if relative not in records:
                raise UserError(f"{manifest.root / MANIFEST}: {name} names {relative!r}, which has no size and "
                                f"sha256 record; {EXPORT_HINT}")


# --- what work needs: the components of a pipeline role (`pipelines.<role>.components`) --------------------------

# The text encoders a role's UNet is conditioned on: the base's context is CLIP-L ∥ CLIP-G, the refiner's CLIP-G alone.
ENCODERS = {"base": ("clip_l", "clip_g"), "refiner": ("clip_g",)}
# work → (role, the component kinds it needs (None: the role's text encoders and UNet), what it is in a message);
# role "main" is the base, or a refiner exported alone
WORK = {
    "generate": ("main", None, "to generate anything"),
    "decode": ("main", ("vae_decoder",), "to decode latents into images (any output type but latent)"),
    "img2img": ("main", ("vae_encoder",), "for img2img and inpainting (an init image)"),
    "refiner": ("refiner", None, "to run the refiner (a refiner start or a refine strength)"),
}


def work_for(decode: bool = True, img2img: bool = False, refiner: bool = False) -> tuple[str, ...]:
    """The WORK a request needs: images out (decode), an init image (img2img), the refiner."""
    return ("generate", *("decode",) * decode, *("img2img",) * img2img, *("refiner",) * refiner)


# --- the manifest's fields: every one the runtime reads, with its type and allowed values --------------------------

# Each contract's tensors that the runtime feeds and reads by name (export/models/ writes them; ARCHITECTURE.md).
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
CONTRACT_IO = {
    "clip_l": (("input_ids",), ("hidden_states",)),
    "clip_g": (("input_ids",), ("hidden_states", "text_embeds")),
    "unet": (UNET_INPUTS, ("noise_pred",)),
    "unet_refiner": (UNET_INPUTS, ("noise_pred",)),
    "vae_decoder": (("latent",), ("image",)),
    "vae_encoder": (("image",), ("latent_mean", "latent_logvar")),
    # the residuals are down_block_0 … and mid_block (their number follows the UNet's levels)
    "controlnet": ((*UNET_INPUTS, "controlnet_cond", "conditioning_scale"), ("mid_block",)),
    "unet_control": ((*UNET_INPUTS, "mid_block"), ("noise_pred",)),
}
PRECISIONS = ("fp32", "fp16", "bf16")  # exported fp32 (the reference) and fp16; bf16 derived by `build`
TENSOR_DTYPES = ("float", "float32", "int32")  # backends.DTYPES: "float" is the file's precision
BOUNDS = ("batch", "pixels", "prompt_windows")
# the size conditioning each role's UNet takes, in order (export/models/unet.py and unet_refiner.py: `time_ids`)
TIME_IDS = {"base": ["original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width"],
            "refiner": ["original_height", "original_width", "crop_top", "crop_left", "aesthetic_score"]}
UNET_IN_CHANNELS = (4, 9)  # latents; latents + mask + masked-image latents (inpainting UNets)
TOKENIZERS = {"clip_l": "tokenizer", "clip_g": "tokenizer_2"}  # each text encoder's tokenizer folder
ENGINE_BACKENDS = ("tensorrt", "tensorrt-rtx")
BETA_SCHEDULES = ("scaled_linear", "linear")  # samplers.alphas_cumprod
MISSING = object()


def _whole(value, low: int | None = None, high: int | None = None) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)
            and (high is None or value <= high))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


class _Schema:
    """Every manifest field the runtime reads, checked once when the directory is opened (load_manifest), so that a
    hand-edited or foreign manifest is one line naming the field, the value found and what is accepted — never a
    KeyError or TypeError later, perhaps after the whole denoising loop."""

    def __init__(self, manifest: Manifest):
        self.manifest, self.data = manifest, manifest.data
        self.hint = EXPORT_HINT

    def fail(self, field: str, value, accepted: str):
        found = "missing" if value is MISSING else f"{_show(value)}"
        raise UserError(f"{self.manifest.root / MANIFEST}: {field} is {found}; accepted: {accepted}; {self.hint}")

    def need(self, ok: bool, field: str, value, accepted: str) -> None:
        if not ok:
            self.fail(field, value, accepted)

    def table(self, parent: dict, key: str, field: str, optional: bool = False) -> dict:
        value = parent.get(key, MISSING)
        if value is MISSING and optional:
            return {}
        self.need(isinstance(value, dict), field, value, "a JSON object")
        return value

    def text(self, parent: dict, key: str, field: str, optional: bool = False) -> None:
        value = parent.get(key, MISSING)
        self.need(isinstance(value, str) or (optional and value in (MISSING, None)), field, value, "a string")

    def check(self) -> None:
        self.sources()
        self.hint = f"re-export it: `{self.manifest.export_command()}`"
        self.text(self.data, "created", "created", optional=True)
        self.files()
        self.components()
        self.pipelines()
        self.tokenizers()
        self.model()
        self.scheduler()
        self.engines()

    def sources(self) -> None:
        for role, source in self.table(self.data, "sources", "sources", optional=True).items():
            self.need(isinstance(source, dict), f"sources.{role}", source, 'a JSON object {"spec", "kind"}')
            for key in ("spec", "kind"):
                self.text(source, key, f"sources.{role}.{key}")

    def files(self) -> None:
        for relative, record in self.table(self.data, "files", "files").items():
            field = f"files.{relative}"
            self.need(isinstance(record, dict), field, record, 'a JSON object {"sha256", "size"}')
            digest = record.get("sha256", MISSING)
            self.need(isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
                      f"{field}.sha256", digest, "64 lower-case hex digits")
            self.need(_whole(record.get("size", MISSING), 0), f"{field}.size", record.get("size", MISSING),
                      "a whole number of bytes")

    def components(self) -> None:
        for name, entry in self.table(self.data, "components", "components").items():
            field = f"components.{name}"
            self.need(isinstance(entry, dict), field, entry, "a JSON object")
            contract = entry.get("contract", MISSING)
            self.need(isinstance(contract, str) and contract in CONTRACT_IO, f"{field}.contract", contract,
                      ", ".join(CONTRACT_IO))
            for side, names in zip(("inputs", "outputs"), CONTRACT_IO[contract]):
                self.tensors(entry, f"{field}.{side}", side, names)
            bounds = self.table(entry, "bounds", f"{field}.bounds")
            for key in BOUNDS:
                pair = bounds.get(key, MISSING)
                self.need(isinstance(pair, list) and len(pair) == 2 and _whole(pair[0], 1) and _whole(pair[1], pair[0]),
                          f"{field}.bounds.{key}", pair, "[low, high], whole numbers with 1 ≤ low ≤ high")
            self.precisions(entry, field)
            self.text(entry, "weights_sha256", f"{field}.weights_sha256", optional=True)
            for target, record in self.table(entry, "optimized", f"{field}.optimized", optional=True).items():
                where = f"{field}.optimized.{target}"
                self.need(isinstance(record, dict), where, record, "a JSON object")
                self.need(record.get("precision", MISSING) in PRECISIONS, f"{where}.precision",
                          record.get("precision", MISSING), ", ".join(PRECISIONS))
                self.text(record, "path", f"{where}.path")
                self.file_list(record.get("files", MISSING), f"{where}.files")
                self.need(isinstance(record.get("overflow_check", False), bool), f"{where}.overflow_check",
                          record.get("overflow_check"), "true or false")
                self.need(_whole(record.get("recipe", 1), 1), f"{where}.recipe", record.get("recipe"),
                          "a whole number ≥ 1 (the `sdxl-trt optimize` recipe that made the files)")
                self.text(record, "custom_ops", f"{where}.custom_ops", optional=True)
                self.text(record, "context", f"{where}.context", optional=True)
                if isinstance(record.get("context"), str) and isinstance(record.get("files"), list):
                    self.need(record["context"] in record["files"], f"{where}.context", record["context"],
                              f"one of {where}.files (the context file is checked like the others)")

    def tensors(self, entry: dict, field: str, side: str, names: tuple[str, ...]) -> None:
        specs = entry.get(side, MISSING)
        self.need(isinstance(specs, list) and all(isinstance(s, dict) for s in specs), field, specs,
                  'a list of {"name", "dtype", "shape"}')
        found = [s.get("name") for s in specs]
        for name in names:
            self.need(name in found, field, found, f"tensors named {', '.join(names)}")
        for i, spec in enumerate(specs):
            self.text(spec, "name", f"{field}[{i}].name")
            self.need(spec.get("dtype", MISSING) in TENSOR_DTYPES, f"{field}[{i}].dtype", spec.get("dtype", MISSING),
                      ", ".join(TENSOR_DTYPES))
            shape = spec.get("shape", MISSING)
            self.need(isinstance(shape, list) and all(_whole(d, 1) or (isinstance(d, str) and d) for d in shape),
                      f"{field}[{i}].shape", shape, "a list of dimensions: whole numbers ≥ 1 or symbols (B, h, w, …)")

    def precisions(self, entry: dict, field: str) -> None:
        paths = self.table(entry, "precisions", f"{field}.precisions")
        lists = self.table(entry, "files", f"{field}.files")
        self.need(bool(paths), f"{field}.precisions", paths, f"one file per precision among {', '.join(PRECISIONS)}")
        for precision, path in paths.items():
            self.need(precision in PRECISIONS, f"{field}.precisions", paths, f"keys among {', '.join(PRECISIONS)}")
            self.need(isinstance(path, str), f"{field}.precisions.{precision}", path, "a path in the directory")
            self.file_list(lists.get(precision, MISSING), f"{field}.files.{precision}")
            self.need(path in lists[precision], f"{field}.files.{precision}", lists[precision],
                      f"a list of paths that holds {path}")

    def file_list(self, value, field: str) -> None:
        self.need(isinstance(value, list) and bool(value) and all(isinstance(f, str) for f in value), field, value,
                  "a list of paths in the directory")

    def pipelines(self) -> None:
        pipelines = self.table(self.data, "pipelines", "pipelines")
        self.need(bool(pipelines) and all(role in TIME_IDS for role in pipelines), "pipelines", list(pipelines),
                  "base, refiner or both")
        components = self.data["components"]
        for role, pipeline in pipelines.items():
            field = f"pipelines.{role}"
            self.need(isinstance(pipeline, dict), field, pipeline, "a JSON object")
            for kind, name in self.table(pipeline, "components", f"{field}.components").items():
                where = f"{field}.components.{kind}"
                controlnet = role == "base" and re.fullmatch(r"controlnet_\d+", kind) is not None
                self.need(kind in (*TOKENIZERS, "unet", "vae_decoder", "vae_encoder") or controlnet
                          or (role == "base" and kind == "unet_control"), f"{field}.components", kind,
                          "clip_l, clip_g, unet, vae_decoder, vae_encoder (the base also unet_control, controlnet_<i>)")
                contract = ("unet" if role == "base" else "unet_refiner") if kind == "unet" else kind
                contract = "controlnet" if controlnet else contract
                self.need(isinstance(name, str) and name in components and components[name]["contract"] == contract,
                          where, name,
                          f"the name of an exported {contract} (this directory has "
                          f"{', '.join(n for n, e in components.items() if e['contract'] == contract) or 'none'})")
            time_ids = pipeline.get("time_ids", MISSING)
            self.need(time_ids == TIME_IDS[role], f"{field}.time_ids", time_ids, _show(TIME_IDS[role]))
            for key in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):
                value = pipeline.get(key, MISSING)
                self.need(isinstance(value, bool), f"{field}.{key}", value, "true or false")
            nets = pipeline.get("controlnets", [])
            self.need(isinstance(nets, list) and all(isinstance(n, str) and n in pipeline["components"] for n in nets)
                      and (not nets or "unet_control" in pipeline["components"]), f"{field}.controlnets", nets,
                      "a list of the pipeline's controlnet_<i> components, with its unet_control")
            channels = pipeline.get("unet_in_channels", MISSING)
            self.need(channels in UNET_IN_CHANNELS and _whole(channels), f"{field}.unet_in_channels", channels,
                      " or ".join(map(str, UNET_IN_CHANNELS)))

    def tokenizers(self) -> None:
        tokenizers = self.table(self.data, "tokenizers", "tokenizers")
        for name, folder in tokenizers.items():
            self.need(name in TOKENIZERS.values(), "tokenizers", list(tokenizers), ", ".join(TOKENIZERS.values()))
            inside = isinstance(folder, str) and not PurePosixPath(folder).is_absolute() and ".." not in folder.split("/")
            self.need(inside, f"tokenizers.{name}", folder, "a folder inside the engine directory")
        for pipeline in self.data["pipelines"].values():
            for encoder, name in TOKENIZERS.items():
                if encoder in pipeline["components"]:
                    self.need(name in tokenizers, f"tokenizers.{name}", MISSING,
                              f"the folder of {encoder}'s tokenizer, which the pipelines' {encoder} needs")

    def model(self) -> None:
        from .validate import MAX_PIXELS, VAE_FACTOR

        model = self.table(self.data, "model", "model")
        # latents are scaled to unit variance: VAEs in use have factors 0.13–1.6 and shifts within ±0.2 (SDXL 0.13025
        # and none, SD3 1.5305 / 0.0609, Flux 0.3611 / 0.1159); far outside, every image decodes to one colour
        value = model.get("vae_scaling_factor", MISSING)
        self.need(_number(value) and 1e-3 <= value <= 1e3, "model.vae_scaling_factor", value,
                  "a number from 0.001 to 1000 (SDXL's VAE: 0.13025)")
        value = model.get("vae_shift_factor")
        self.need(value is None or (_number(value) and abs(value) <= 1e3), "model.vae_shift_factor", value,
                  "a number from -1000 to 1000, or null")
        value = model.get("vae_scale_factor", MISSING)
        self.need(_whole(value) and value == VAE_FACTOR, "model.vae_scale_factor", value,
                  f"{VAE_FACTOR} (pixels per latent of SDXL's VAE)")
        value = model.get("latent_channels", MISSING)

        def channels(name):
            return {spec["shape"][1] for entry in self.data["components"].values() for spec in entry["inputs"]
                    if spec["name"] == name and len(spec["shape"]) > 1 and _whole(spec["shape"][1])}

        # the VAE decoder's latent channels; a UNet takes as many, or 2c + 1 when it inpaints (latents, the masked
        # image's latents and the mask)
        vae, unets = channels("latent"), channels("sample")
        expected = next(iter(vae)) if len(vae) == 1 else min(((c - 1) // 2 if c % 2 else c for c in unets), default=4)
        self.need(_whole(value) and value == expected and all(c in (value, 2 * value + 1) for c in unets),
                  "model.latent_channels", value,
                  f"{expected} (the latent channels of the UNet's and VAE's contracts)")
        value = model.get("default_size", MISSING)
        largest = math.isqrt(MAX_PIXELS)
        self.need(_whole(value, VAE_FACTOR, largest) and value % VAE_FACTOR == 0, "model.default_size", value,
                  f"a multiple of {VAE_FACTOR} from {VAE_FACTOR} to {largest} (the model's image side in pixels; "
                  "SDXL: 1024)")

    def scheduler(self) -> None:
        from .samplers import LCM_DEFAULTS, NOT_IMPLEMENTED, PREDICTION_TYPES, SDXL_SCHEDULER, SPACINGS

        config = {**SDXL_SCHEDULER, **LCM_DEFAULTS, **self.table(self.data, "scheduler", "scheduler")}

        def need(key: str, ok: bool, accepted: str) -> None:
            self.need(ok, f"scheduler.{key}", config[key], accepted)

        steps = config["num_train_timesteps"]
        need("num_train_timesteps", _whole(steps, 2), "a whole number ≥ 2 (SDXL: 1000)")
        for key in ("beta_start", "beta_end"):
            need(key, _number(config[key]) and 0 < config[key] < 1, "a number between 0 and 1 (exclusive)")
        need("beta_end", config["beta_end"] >= config["beta_start"], f"at least beta_start ({config['beta_start']})")
        need("beta_schedule", config["beta_schedule"] in BETA_SCHEDULES, ", ".join(BETA_SCHEDULES))
        need("steps_offset", _whole(config["steps_offset"], 0, steps - 1), f"a whole number from 0 to {steps - 1}")
        need("timestep_spacing", config["timestep_spacing"] in SPACINGS, ", ".join(SPACINGS))
        need("prediction_type", config["prediction_type"] in PREDICTION_TYPES, ", ".join(PREDICTION_TYPES))
        for key in ("set_alpha_to_one", "clip_sample"):
            need(key, isinstance(config[key], bool), "true or false")
        for key in ("clip_sample_range", "timestep_scaling"):
            need(key, _number(config[key]) and config[key] > 0, "a positive number")
        need("original_inference_steps", _whole(config["original_inference_steps"], 1, steps),
             f"a whole number from 1 to {steps}")
        for key, off in NOT_IMPLEMENTED.items():
            value = config.get(key, off)
            if key == "use_karras_sigmas":  # the *_karras samplers honour it
                self.need(isinstance(value, bool), f"scheduler.{key}", value, "true or false")
            else:
                self.need(value == off and type(value) is type(off), f"scheduler.{key}", value,
                          f"{_show(off)} (sdxl-trt's samplers implement no other)")

    def engines(self) -> None:
        for path, record in self.table(self.data, "engines", "engines", optional=True).items():
            field = f"engines.{path}"
            self.need(isinstance(record, dict), field, record, "a JSON object (written by `sdxl-trt build`)")
            self.need(record.get("backend", MISSING) in ENGINE_BACKENDS, f"{field}.backend",
                      record.get("backend", MISSING), ", ".join(ENGINE_BACKENDS))
            self.need(record.get("precision", MISSING) in PRECISIONS, f"{field}.precision",
                      record.get("precision", MISSING), ", ".join(PRECISIONS))
            for key in ("component", "backend_version", "sha256", "onnx_sha256"):
                self.text(record, key, f"{field}.{key}")
            self.need(_whole(record.get("size", MISSING), 0), f"{field}.size", record.get("size", MISSING),
                      "a whole number of bytes")
            self.table(record, "target", f"{field}.target")
            self.table(record, "options", f"{field}.options", optional=True)
            profiles = record.get("profiles", MISSING)
            self.need(isinstance(profiles, list) and all(isinstance(p, dict) and isinstance(p.get("label"), str)
                                                         for p in profiles),
                      f"{field}.profiles", profiles, 'a list of {"label", …} (written by `sdxl-trt build`)')
