"""An engine directory is checked when it is opened for what the work asked of it (issue 21, items 3-5): every
manifest field the runtime reads, with its type and allowed values, and the components each stage needs. Whatever is
wrong is one line on stderr and exit status 2, before any model runs and before anything is written.

Directories: a real subset export (`--components clip_l clip_g unet` with a refiner: no VAE, and a refiner role
left with only the CLIP-G it shares), and a whole base export of which the catalogues make variants: a copy of its
manifest, edited, beside links to its files.
"""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_trt.runtime import backends
from sdxl_trt.runtime.cli import main
from sdxl_trt.runtime.manifest import MANIFEST, load_manifest

DROP = object()  # an edit that removes the field


@pytest.fixture(scope="module")
def subset_dir(tmp_path_factory):
    """`sdxl-trt export --model tiny:base --refiner tiny:refiner --components clip_l clip_g unet`."""
    from sdxl_trt.export.engine_dir import export_engine_dir

    out = tmp_path_factory.mktemp("subset") / "tiny"
    export_engine_dir("tiny:base", out, refiner="tiny:refiner", components=["clip_l", "clip_g", "unet"],
                      precision="fp32", progress=False)
    return out


@pytest.fixture(scope="module")
def whole_dir(tmp_path_factory):
    """Every component of tiny:base, fp32 (what ort-cpu reads)."""
    from sdxl_trt.export.engine_dir import export_engine_dir

    out = tmp_path_factory.mktemp("whole") / "tiny"
    export_engine_dir("tiny:base", out, precision="fp32", progress=False)
    return out


def variant(source: Path, where: Path, edit) -> Path:
    """A directory of `source`'s files (linked) with its manifest changed by `edit(data)`."""
    where.mkdir()
    for item in source.iterdir():
        if item.name != MANIFEST:
            (where / item.name).symlink_to(item)
    data = json.loads((source / MANIFEST).read_text())
    edit(data)
    (where / MANIFEST).write_text(json.dumps(data))
    return where


def set_field(data: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        data = data[key]
    if value is DROP:
        del data[last]
    else:
        data[last] = value


def without(*kinds: str):
    """An edit that leaves the base pipeline without these components (as an export with a subset of them)."""
    def edit(data):
        for kind in kinds:
            name = data["pipelines"]["base"]["components"].pop(kind)
            entry = data["components"].pop(name)
            for files in entry["files"].values():
                for f in files:
                    data["files"].pop(f, None)
    return edit


@pytest.fixture
def no_model_runs(monkeypatch):
    """Counts the models run: work that started."""
    runs = []
    real = backends.OrtSession.run
    monkeypatch.setattr(backends.OrtSession, "run", lambda self, **feeds: runs.append(self.name) or real(self, **feeds))
    return runs


def refused(capsys, argv, says: str | None = None) -> str:
    """`sdxl-trt ARGV` in this process: exit status 2 and one line on stderr (no traceback); returns the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    if says is not None:
        assert says in lines[0], lines[0]
    return lines[0]


def run_cli(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdxl_trt.runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def one_line_exit_2(proc: subprocess.CompletedProcess, says: str | None = None) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (proc.returncode,
                                                                                         proc.stderr[-3000:])
    if says is not None:
        assert says in lines[0], lines[0]
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- item 3: a directory exported with a subset of components ------------------------------------------------------

def test_generate_on_a_directory_without_vae_says_so_before_denoising(subset_dir, tmp_path, capsys, no_model_runs):
    """Item 3: the VAE decoder was missed only after the whole denoising loop (KeyError 'vae_decoder')."""
    out = tmp_path / "cat.png"
    line = refused(capsys, ["generate", str(subset_dir), "a cat", "--size", "64x64", "--steps", "2", "--out",
                            str(out)], "the base pipeline has no vae_decoder")
    assert "sdxl-trt export --model tiny:base --refiner tiny:refiner" in line  # the command that fixes it
    assert no_model_runs == [] and not out.exists()


def test_a_subset_directory_still_makes_latents(subset_dir, tmp_path):
    """What the directory has is enough for latents: no VAE is needed and none is asked for."""
    out = tmp_path / "cat.npy"
    assert main(["generate", str(subset_dir), "a cat", "--size", "64x64", "--steps", "2", "--seed", "1",
                 "--output-type", "latent", "--out", str(out)]) == 0
    assert np.load(out).shape == (1, 4, 8, 8)


def write_png(path: Path) -> Path:
    Image.new("RGB", (64, 64), (120, 80, 40)).save(path)
    return path


@pytest.mark.parametrize("flags, says", [
    (["--init-image", "IMAGE", "--output-type", "latent"], "the base pipeline has no vae_encoder"),
    (["--init-image", "IMAGE", "--mask", "IMAGE", "--output-type", "latent"], "the base pipeline has no vae_encoder"),
    (["--refiner-start", "0.5", "--output-type", "latent"], "the refiner pipeline has no unet"),
    (["--refine-strength", "0.3", "--output-type", "latent"], "the refiner pipeline has no unet"),
    (["--output-type", "png"], "the base pipeline has no vae_decoder"),
])
def test_generate_requests_needing_absent_components(subset_dir, tmp_path, capsys, no_model_runs, flags, says):
    image = write_png(tmp_path / "in.png")
    flags = [str(image) if f == "IMAGE" else f for f in flags]
    out = tmp_path / ("out.npy" if "latent" in flags else "out.png")
    refused(capsys, ["generate", str(subset_dir), "a cat", "--size", "64x64", "--steps", "2", "--out", str(out),
                     *flags], says)
    assert no_model_runs == [] and not out.exists()


@pytest.mark.parametrize("kinds, flags, says", [
    (("unet",), [], "the base pipeline has no unet"),
    (("clip_l",), ["--output-type", "latent"], "the base pipeline has no clip_l"),
    (("clip_g",), [], "the base pipeline has no clip_g"),
    (("vae_encoder",), ["--init-image", "IMAGE"], "the base pipeline has no vae_encoder"),
    (("vae_decoder",), ["--init-image", "IMAGE"], "the base pipeline has no vae_decoder"),
])
def test_subset_catalogue_generate(whole_dir, tmp_path, capsys, no_model_runs, kinds, flags, says):
    engine = variant(whole_dir, tmp_path / "engine", without(*kinds))
    flags = [str(write_png(tmp_path / "in.png")) if f == "IMAGE" else f for f in flags]
    refused(capsys, ["generate", str(engine), "a cat", "--size", "64x64", "--steps", "2", "--out",
                     str(tmp_path / ("o.npy" if "latent" in flags else "o.png")), *flags], says)
    assert no_model_runs == [] and not list(tmp_path.glob("o.*"))


def test_subset_catalogue_bench(subset_dir, tmp_path, capsys, no_model_runs):
    out = tmp_path / "bench.json"
    refused(capsys, ["bench", str(subset_dir), "--sweeps", "steps", "--runs", "1", "--warmup", "0", "--out", str(out)],
            "the base pipeline has no vae_decoder")
    assert no_model_runs == [] and not out.exists()


def test_subset_catalogue_serve(subset_dir):
    """serve answers with images: a directory that cannot decode them is refused before the server starts."""
    one_line_exit_2(run_cli("serve", subset_dir, "--port", free_port()), "the base pipeline has no vae_decoder")


def test_subset_catalogue_inspect_says_what_the_directory_can_do(subset_dir, capsys):
    assert main(["inspect", str(subset_dir)]) == 0
    text = capsys.readouterr().out
    assert "work: generate yes, decode no, img2img no, refiner no" in text
    assert "the refiner pipeline has no unet" in text
    assert main(["inspect", str(subset_dir), "--json"]) == 0
    work = json.loads(capsys.readouterr().out)["work"]
    assert work["generate"] is None and "vae_decoder" in work["decode"]


def test_api_calls_needing_absent_components_fail_before_any_model_runs(subset_dir, no_model_runs):
    from sdxl_trt.runtime import Pipeline
    from sdxl_trt.runtime.errors import UserError

    with pytest.raises(UserError, match="the base pipeline has no vae_decoder"):
        Pipeline.load(subset_dir)  # the default work: text to images
    pipe = Pipeline.load(subset_dir, work=("generate",))
    assert not pipe.has_refiner  # a refiner role without its UNet is no refiner to run
    for kwargs, says in (({}, "no vae_decoder"), ({"output_type": "latent", "image": Image.new("RGB", (64, 64)), "strength": 0.5},
                                                 "no vae_encoder")):
        with pytest.raises(UserError, match=says):
            pipe("a cat", height=64, width=64, num_inference_steps=2, **kwargs)
    assert no_model_runs == []


# --- item 4: hand-edited manifest fields ---------------------------------------------------------------------------

UNET_INPUTS_WITHOUT_TIME_IDS = "UNET_INPUTS_WITHOUT_TIME_IDS"
FIELDS = [  # (field, bad value): missing, wrong type, out of range, unknown enum value
    ("model", DROP), ("model", []),
    ("model.vae_scaling_factor", DROP), ("model.vae_scaling_factor", "0.13"), ("model.vae_scaling_factor", 0),
    ("model.vae_scaling_factor", -1.0), ("model.vae_scaling_factor", float("inf")),
    ("model.vae_scaling_factor", 1e-30), ("model.vae_shift_factor", 1e30),  # a one-colour image, not an error, before
    ("model.vae_shift_factor", "none"),
    ("model.vae_scale_factor", DROP), ("model.vae_scale_factor", 16), ("model.vae_scale_factor", "8"),
    ("model.latent_channels", 5), ("model.latent_channels", "4"),
    ("model.default_size", DROP), ("model.default_size", "big"), ("model.default_size", 1020),
    ("model.default_size", 0), ("model.default_size", 8192), ("model.default_size", 256.0),
    ("model.default_size", True),
    ("pipelines", DROP), ("pipelines", {}), ("pipelines", []), ("pipelines", {"upscaler": {}}),
    ("pipelines.base.components", DROP), ("pipelines.base.components.unet", "nope"),
    ("pipelines.base.components.unet", "clip_l"), ("pipelines.base.components.vae", "vae_decoder"),
    ("pipelines.base.time_ids", DROP), ("pipelines.base.time_ids", ["original_height"]),
    ("pipelines.base.force_zeros_for_empty_prompt", "yes"), ("pipelines.base.force_zeros_for_empty_prompt", DROP),
    ("pipelines.base.unet_in_channels", 5), ("pipelines.base.unet_in_channels", "4"),
    ("scheduler", DROP), ("scheduler", "euler"),
    ("scheduler.beta_schedule", "cosine"), ("scheduler.num_train_timesteps", "1000"),
    ("scheduler.num_train_timesteps", 0), ("scheduler.num_train_timesteps", 1000.5),
    ("scheduler.timestep_spacing", "middle"), ("scheduler.prediction_type", "sample"),
    ("scheduler.steps_offset", -1), ("scheduler.beta_start", 2), ("scheduler.beta_end", None),
    ("scheduler.trained_betas", [0.1]), ("scheduler.interpolation_type", "log_linear"),
    ("scheduler.clip_sample", "no"), ("scheduler.use_karras_sigmas", "yes"),
    ("tokenizers", DROP), ("tokenizers.tokenizer", DROP), ("tokenizers.tokenizer", 5),
    ("tokenizers.tokenizer", "../../elsewhere"),
    ("components.unet.contract", "unet3"), ("components.unet.bounds.prompt_windows", [4, 1]),
    ("components.unet.bounds", DROP), ("components.unet.inputs", UNET_INPUTS_WITHOUT_TIME_IDS),
    ("components.unet.precisions", {}), ("components.unet.precisions.fp32", 7),
    ("components.unet.inputs", "sample"),
    ("sources.base.spec", 5), ("sources", []),
    ("created", 20261127),
    ("engines", []), ("engines", {"engines/tensorrt/unet.engine": {"backend": "onnx"}}),
    # a list or an object where a name or a number goes (these reached dict lookups: TypeError tracebacks)
    ("pipelines.base.components.unet", ["unet"]), ("pipelines.base.components.vae_decoder", {"name": "vae"}),
    ("components.unet.contract", ["unet"]), ("components.unet.contract", {"unet": 1}),
    ("tokenizers.tokenizer", ["tokenizer"]), ("scheduler.beta_schedule", ["scaled_linear"]),
    ("scheduler.timestep_spacing", {"leading": 1}), ("components.unet.precisions.fp32", ["onnx/unet/model.onnx"]),
    ("model.default_size", [1024]), ("model.vae_scaling_factor", {"v": 0.13}),
    ("pipelines.base.time_ids", {"original_height": 0}), ("sources.base", ["tiny:base"]),
    # an optimized record whose recipe is not a whole number (compared with OPTIMIZE_RECIPE when a backend opens it)
    ("components.unet.optimized", {"cuda": {"precision": "fp16", "path": "onnx/unet/model.onnx",
                                            "files": ["onnx/unet/model.onnx"], "recipe": "2"}}),
    # a context file (export/context_projections.py) that is not a name, or not one of the record's checked files
    ("components.unet.optimized", {"cuda": {"precision": "fp16", "path": "onnx/unet/model.onnx",
                                            "files": ["onnx/unet/model.onnx"], "context": 3}}),
    ("components.unet.optimized", {"cuda": {"precision": "fp16", "path": "onnx/unet/model.onnx",
                                            "files": ["onnx/unet/model.onnx"],
                                            "context": "onnx/unet/model.context.onnx"}}),
]


def edit_field(field, value):
    def edit(data):
        if value == UNET_INPUTS_WITHOUT_TIME_IDS:
            data["components"]["unet"]["inputs"] = [t for t in data["components"]["unet"]["inputs"]
                                                    if t["name"] != "time_ids"]
        else:
            set_field(data, field, value if value is DROP else copy.deepcopy(value))
    return edit


def test_the_catalogue_covers_every_top_level_field_the_runtime_reads(whole_dir):
    data = json.loads((whole_dir / MANIFEST).read_text())
    covered = {field.split(".")[0] for field, _ in FIELDS}
    read_elsewhere = {"format", "format_version", "files", "versions", "onnx"}  # checked by their own tests / unread
    assert set(data) - covered <= read_elsewhere


@pytest.mark.parametrize("field, value", FIELDS, ids=[f"{f}={v if v is not DROP else 'missing'}"[:60]
                                                     for f, v in FIELDS])
def test_manifest_field_catalogue_generate(whole_dir, tmp_path, capsys, no_model_runs, field, value):
    """Item 4: each bad value is refused when the directory is opened, naming the field and what is accepted."""
    engine = variant(whole_dir, tmp_path / "engine", edit_field(field, value))
    out = tmp_path / "cat.png"
    line = refused(capsys, ["generate", str(engine), "a cat", "--size", "64x64", "--steps", "2", "--out", str(out)])
    leaf = field.split(".")[-1]
    assert str(engine) in line and (leaf in line or field.split(".")[0] in line), line
    assert no_model_runs == [] and not out.exists()


@pytest.mark.parametrize("field, value", [("model.default_size", "big"), ("scheduler.beta_schedule", "cosine"),
                                          ("pipelines.base.components.unet", "clip_l")])
@pytest.mark.parametrize("command", ["inspect", "bench", "build"])
def test_manifest_field_catalogue_other_commands(whole_dir, tmp_path, capsys, field, value, command):
    engine = variant(whole_dir, tmp_path / "engine", edit_field(field, value))
    argv = {"inspect": [], "bench": ["--runs", "1", "--warmup", "0", "--out", str(tmp_path / "b.json")],
            "build": ["--backend", "tensorrt-rtx"]}[command]
    line = refused(capsys, [command, str(engine), *argv])
    assert field.split(".")[-1] in line and "accepted" in line
    assert not (tmp_path / "b.json").exists() and not (engine / "engines").exists()


def test_default_size_of_the_wrong_type_was_a_traceback_after_the_denoising_loop(whole_dir, tmp_path, capsys):
    """Item 4 as reported: a default_size that is text; and a scaling factor that is text, found only at the VAE."""
    for name, field, value in (("a", "model.default_size", "1024"), ("b", "model.vae_scaling_factor", "0.13025")):
        engine = variant(whole_dir, tmp_path / name, edit_field(field, value))
        line = refused(capsys, ["generate", str(engine), "a cat", "--size", "64x64", "--steps", "2", "--out",
                                str(tmp_path / f"{name}.png")])
        assert f"{field} is \"{value}\"" in line and "accepted" in line
        assert "sdxl-trt export --model tiny:base" in line


def test_a_backend_needs_its_precision(whole_dir, tmp_path, capsys, no_model_runs):
    """ort-cpu runs the fp32 files: a component exported without one is named (it was a KeyError 'fp32')."""
    def fp16_only(data):
        unet = data["components"]["unet"]
        unet["precisions"] = {"fp16": unet["precisions"].pop("fp32")}
        unet["files"] = {"fp16": unet["files"].pop("fp32")}
    engine = variant(whole_dir, tmp_path / "engine", fp16_only)
    refused(capsys, ["generate", str(engine), "a cat", "--size", "64x64", "--steps", "2", "--out",
                     str(tmp_path / "o.png")], "unet has no fp32 file, which ort-cpu runs (it has fp16)")
    assert no_model_runs == []


def test_a_valid_manifest_passes_every_check(whole_dir):
    manifest = load_manifest(whole_dir)
    assert all(manifest.missing(work) is None for work in ("generate", "decode", "img2img"))


# --- item 5: serve on a corrupt engine directory -------------------------------------------------------------------

def corrupt(whole_dir, where: Path) -> Path:
    """A copy whose UNet file was cut short (what an interrupted copy leaves)."""
    import shutil

    shutil.copytree(whole_dir, where)
    unet = where / "onnx" / "unet" / "model.onnx"
    unet.write_bytes(unet.read_bytes()[:100])
    return where


def test_serve_ray_on_a_corrupt_directory_is_one_line_and_exit_2(whole_dir, tmp_path):
    """Item 5: the replicas loaded the directory, and Ray gave back "Deploying application failed" after a traceback
    (exit 1); the driver now checks it before Ray starts."""
    pytest.importorskip("ray.serve")
    engine = corrupt(whole_dir, tmp_path / "engine")
    one_line_exit_2(run_cli("serve", engine, "--ray", "--port", free_port()), "model.onnx has 100 bytes")


@pytest.mark.parametrize("case", ["truncated", "bad field", "no manifest", "subset"])
@pytest.mark.parametrize("ray", [False, True], ids=["uvicorn", "ray"])
def test_serve_corrupt_directory_catalogue(whole_dir, subset_dir, tmp_path, case, ray):
    if ray:
        pytest.importorskip("ray.serve")
    if case == "truncated":
        engine = corrupt(whole_dir, tmp_path / "engine")
    elif case == "bad field":
        engine = variant(whole_dir, tmp_path / "engine", edit_field("model.default_size", "big"))
    elif case == "no manifest":
        engine = tmp_path / "engine"
        engine.mkdir()
    else:
        engine = subset_dir
    one_line_exit_2(run_cli("serve", engine, "--port", free_port(), *(["--ray"] if ray else [])))


def test_serve_on_a_port_in_use_is_one_line_and_exit_2(whole_dir):
    """uvicorn said it after loading the engines and exited with its own status 3."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        one_line_exit_2(run_cli("serve", whole_dir, "--port", port), f"--port {port}")


def test_inspect_names_the_files_that_are_missing_or_cut_short(tiny_engine, tmp_path, capsys):
    """inspect reads sizes (not hashes, which would read gigabytes): a copy cut short is named, not reported usable."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_engine, copy)
    assert main(["inspect", str(copy)]) == 0
    assert "files: all present, of their recorded sizes" in capsys.readouterr().out
    manifest = json.loads((copy / "manifest.json").read_text())
    victim = next(f for f in manifest["files"] if f.endswith(".onnx"))
    (copy / victim).write_bytes((copy / victim).read_bytes()[:100])
    assert main(["inspect", str(copy)]) == 0
    text = capsys.readouterr().out
    assert "files: 1 damaged" in text and victim.split("/")[-1] in text
    assert main(["inspect", str(copy), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["file_problems"]) == 1
    # the work that runs the damaged file's component says no (it said yes before), the rest still yes
    owner = next(n for n, e in manifest["components"].items() if any(victim in f for f in e["files"].values()))
    runs = {"clip_l": "generate", "clip_g": "generate", "unet": "generate", "vae_decoder": "decode",
            "vae_encoder": "img2img", "unet_refiner": "refiner"}[owner]
    assert victim in info["work"][runs] and "re-export it" in info["work"][runs]
    from sdxl_trt.runtime.manifest import load_manifest

    uses = {work: owner in load_manifest(copy).work_components(work) for work in info["work"]}
    assert all((why is not None) == uses[work] for work, why in info["work"].items()), info["work"]
    assert f"{runs}: " in text
