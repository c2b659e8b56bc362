"""TensorRT-RTX engines built on the CPU from the tiny model: profiles, IO, cache, and every way an engine can be
unusable. Engines cannot be deserialized without a GPU driver, so what was built is checked through TensorRT-RTX's
own API: an independent parse of each ONNX file, the profiles the builder config held, and the engine header check.
Running engines needs a GPU TensorRT-RTX supports (see the `gpu` tests at the end)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdxl_trt.runtime import engines as eng
from sdxl_trt.runtime import tensorrt_api
from sdxl_trt.runtime.cli import main
from sdxl_trt.runtime.engine_build import BuildOptions, build_engines
from sdxl_trt.runtime.errors import UserError
from sdxl_trt.runtime.manifest import load_manifest, sha256_file
from sdxl_trt.runtime.profiles import BUCKETS, parse_profiles, select_profile

if os.environ.get("CI"):
    import tensorrt_rtx as trt  # CI installs sdxl-trt[rtx]: these tests must run there, never skip
else:
    trt = pytest.importorskip("tensorrt_rtx")

PROFILES = "1024x1024,1152x896,896x1152,dynamic"
MAX_BATCH = 2
COMPONENTS = ["clip_l", "clip_g", "unet", "unet_refiner", "vae_decoder", "vae_encoder"]
H100 = tensorrt_api.Gpu("NVIDIA H100 80GB HBM3", "9.0")
L40S = tensorrt_api.Gpu("NVIDIA L40S", "8.9")


def _options(**kw):
    return BuildOptions("tensorrt-rtx", parse_profiles(PROFILES, None, MAX_BATCH, 4), **kw)


@pytest.fixture(scope="module")
def built(tiny_engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("rtx") / "tiny"
    shutil.copytree(tiny_engine, root)
    report = build_engines(root, _options(), progress=False)
    return root, report


def _copy(built, tmp_path):
    root = tmp_path / "tiny"
    shutil.copytree(built[0], root)
    return root


def _record(root, component):
    manifest = load_manifest(root)
    return next((p, r) for p, r in manifest.engines.items() if r["component"] == component)


def test_every_component_gets_an_engine_with_its_profiles(built):
    root, report = built
    assert sorted(r[0] for r in report.rows) == sorted(COMPONENTS)
    assert all(status == "built" and size > 0 for *_, size, _, status in report.rows)
    manifest = load_manifest(root)
    assert sorted(r["component"] for r in manifest.engines.values()) == sorted(COMPONENTS)
    for path, record in manifest.engines.items():
        assert manifest.path(path).is_file() and sha256_file(manifest.path(path)) == record["sha256"]
        labels = [p["name"] for p in record["profiles"]]
        if record["component"].startswith("clip"):
            assert labels == ["any size"]  # no image-size input: one profile
        else:
            assert labels == ["1024x1024", "1152x896", "896x1152", "dynamic"]


@pytest.mark.parametrize("component", ["unet", "unet_refiner", "vae_decoder", "vae_encoder"])
def test_profiles_hold_the_bucket_shapes(built, component):
    """The shapes TensorRT-RTX's profile objects held, against the buckets worked out here by hand (max batch 2)."""
    _, record = _record(built[0], component)
    first = record["io"][0]["name"]
    for profile, (w, h) in zip(record["profiles"], [(1024, 1024), (1152, 896), (896, 1152)]):
        lo, opt, hi = profile["shapes"][first]
        if component.startswith("unet"):  # 1 image without guidance .. 2 images × 2 under guidance
            assert (lo, opt, hi) == ([1, 4, h // 8, w // 8], [2, 4, h // 8, w // 8], [4, 4, h // 8, w // 8])
            assert profile["shapes"]["encoder_hidden_states"][0][1] == 77
            assert profile["shapes"]["encoder_hidden_states"][2][1] == 4 * 77  # 4 prompt windows
        elif component == "vae_decoder":
            assert (lo, opt, hi) == ([1, 4, h // 8, w // 8], [1, 4, h // 8, w // 8], [2, 4, h // 8, w // 8])
        else:
            assert (lo, opt, hi) == ([1, 3, h, w], [1, 3, h, w], [2, 3, h, w])
    dynamic = record["profiles"][3]
    lo, opt, hi = dynamic["shapes"][first]
    scale = 1 if component == "vae_encoder" else 8
    assert lo[2:] == [512 // scale] * 2 and opt[2:] == [1024 // scale] * 2 and hi[2:] == [1536 // scale] * 2


def test_text_encoder_profile_covers_batches_and_prompt_windows(built):
    _, record = _record(built[0], "clip_g")
    (profile,) = record["profiles"]
    assert profile["shapes"]["input_ids"] == [[1, 77], [1, 77], [MAX_BATCH * 4, 77]]


@pytest.mark.parametrize("component", COMPONENTS)
def test_recorded_io_is_what_tensorrt_rtx_parses(built, component):
    """An independent parse of the ONNX file the engine was built from: same tensors, dtypes and shapes."""
    root = built[0]
    _, record = _record(root, component)
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(root / record["onnx"]))
    parsed = [(network.get_input(i).name, str(network.get_input(i).dtype), list(network.get_input(i).shape))
              for i in range(network.num_inputs)]
    parsed += [(network.get_output(i).name, str(network.get_output(i).dtype), list(network.get_output(i).shape))
               for i in range(network.num_outputs)]
    names = {"fp16": "DataType.HALF", "fp32": "DataType.FLOAT", "int32": "DataType.INT32"}
    assert parsed == [(t["name"], names[t["dtype"]], t["shape"]) for t in record["io"]]
    contract = load_manifest(root).components[component]
    assert [t["name"] for t in record["io"]] == [t["name"] for t in contract["inputs"] + contract["outputs"]]
    half = record["precision"] == "fp16"
    assert record["precision"] == ("fp32" if component.startswith("vae") else "fp16")  # the SDXL VAE overflows fp16
    for t, spec in zip(record["io"], contract["inputs"] + contract["outputs"]):
        want = {"float": "fp16" if half else "fp32", "float32": "fp32", "int32": "int32"}[spec["dtype"]]
        assert t["dtype"] == want, t


def test_engine_headers_pass_tensorrt_rtx_check_and_a_damaged_one_does_not(built, tmp_path):
    root = _copy(built, tmp_path)
    runtime = trt.Runtime(trt.Logger(trt.Logger.INTERNAL_ERROR))
    malformed = int(trt.EngineInvalidityDiagnostics.MALFORMED_ENGINE)
    manifest = load_manifest(root)
    for path in manifest.engines:
        header = manifest.path(path).read_bytes()[: runtime.engine_header_size]
        _, diagnostics = runtime.get_engine_validity(header)
        assert not int(diagnostics) & malformed  # without a driver it cannot judge the GPU, but the file is sound
    path, record = _record(root, "unet")
    data = bytearray(manifest.path(path).read_bytes())
    data[:8] = b"\0" * 8
    manifest.path(path).write_bytes(bytes(data))
    problem = eng.engine_problem(manifest, path, record, L40S, check_hash=False)
    assert "rejects the engine header (malformed engine)" in problem


def test_unchanged_inputs_are_a_cache_hit(built, tmp_path):
    root = _copy(built, tmp_path)
    before = {p: os.stat(root / p).st_mtime_ns for p in load_manifest(root).engines}
    report = build_engines(root, _options(), progress=False)
    assert [r[5] for r in report.rows] == ["cached"] * len(COMPONENTS)
    assert {p: os.stat(root / p).st_mtime_ns for p in load_manifest(root).engines} == before


def test_a_changed_onnx_file_is_rebuilt_and_replaces_its_engine(built, tmp_path):
    import onnx

    root = _copy(built, tmp_path)
    old_path, old = _record(root, "vae_decoder")
    onnx_file = root / old["onnx"]
    model = onnx.load(str(onnx_file))
    weight = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4)
    array = onnx.numpy_helper.to_array(weight) * np.float32(1.01)
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(model, str(onnx_file))
    manifest = json.loads((root / "manifest.json").read_text())  # as a re-export of this component would record it
    manifest["files"][old["onnx"]] = {"sha256": sha256_file(onnx_file), "size": onnx_file.stat().st_size}
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert "stale: built from an earlier export" in eng.engine_problem(load_manifest(root), old_path, old, L40S)

    report = build_engines(root, _options(), progress=False)
    status = {r[0]: r[5] for r in report.rows}
    assert status.pop("vae_decoder") == "built" and set(status.values()) == {"cached"}
    new_path, new = _record(root, "vae_decoder")
    assert new_path != old_path and new["key"] != old["key"] and not (root / old_path).exists()
    assert new["onnx_sha256"] != old["onnx_sha256"]


def test_unusable_engines_say_why_in_one_line(built, tmp_path):
    root = _copy(built, tmp_path)
    manifest = load_manifest(root)
    path, record = _record(root, "clip_l")
    assert eng.engine_problem(manifest, path, record, L40S) is None  # sound, and L40S is an RTX-supported GPU
    assert "no CUDA GPU" in eng.engine_problem(manifest, path, record, None)
    hopper = eng.engine_problem(manifest, path, record, H100)
    assert "does not run on NVIDIA H100 80GB HBM3 (sm 9.0)" in hopper and "8.9" in hopper

    other_version = {**record, "backend_version": "1.0.0.21"}
    assert f"built with tensorrt-rtx 1.0.0.21, this machine has {trt.__version__}" in \
        eng.engine_problem(manifest, path, other_version, L40S)
    for_a10 = {**record, "backend": "tensorrt", "target": {"label": "sm86", "gpu": "NVIDIA A10", "compute_capability": "8.6"}}
    assert tensorrt_api.target_problem(for_a10["target"], "tensorrt", L40S).startswith("built for NVIDIA A10 (sm 8.6)")

    file = manifest.path(path)
    file.write_bytes(file.read_bytes()[:1000])
    assert "truncated or replaced" in eng.engine_problem(manifest, path, record, L40S)
    file.unlink()
    assert "is missing" in eng.engine_problem(manifest, path, record, L40S)


def test_a_shape_outside_every_profile_names_the_built_ones(built):
    _, record = _record(built[0], "vae_decoder")
    assert select_profile(record["profiles"], {"latent": (1, 4, 112, 144)}) == 1  # 1152x896 bucket
    assert select_profile(record["profiles"], {"latent": (2, 4, 96, 80)}) == 3  # 640x768: the dynamic range
    with pytest.raises(UserError) as e:
        select_profile(record["profiles"], {"latent": (1, 4, 32, 32)})  # 256x256
    assert "1216x832" not in str(e.value) and "1152x896, 1-2 images" in str(e.value)
    assert "dynamic 512x512-1536x1536 px (step 64)" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError):
        select_profile(record["profiles"], {"latent": (1, 4, 100, 100)})  # 800 px: in range, not a multiple of 64
    with pytest.raises(UserError):
        select_profile(record["profiles"], {"latent": (3, 4, 128, 128)})  # more images than built for


def test_inspect_reports_engines_profiles_and_why_they_cannot_run_here(built, capsys):
    root = built[0]
    assert main(["inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert "tensorrt-rtx" in out and "profile 1152x896, 1-2 images" in out and "unet_refiner fp16" in out
    if tensorrt_api.gpu() is None:
        assert out.count("usable here: no: no CUDA GPU") == len(COMPONENTS)
    assert main(["inspect", str(root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["engines"]) == len(COMPONENTS) and info["machine"]["backends"]["tensorrt-rtx"] == trt.__version__


@pytest.mark.parametrize("argv, message", [
    (["--static", "1024x1024", "--profiles", "dynamic"], "exclude each other"),
    (["--profiles", "1000x1001"], "multiples of 8"),
    (["--profiles", "dynamic:500-1000"], "multiples of 64"),
    (["--profiles", "4096x4096"], "outside what the models were exported for"),
    (["--max-batch", "0"], "at least 1"),
    (["--opt-level", "9"], "expected 0-5"),
    (["--components", "unet_xl"], "has no 'unet_xl'"),
])
def test_build_rejects_bad_options_in_one_line(built, argv, message, capsys):
    assert main(["build", str(built[0]), "--backend", "tensorrt-rtx", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_build_needs_an_engine_directory_and_the_library(tmp_path, capsys):
    assert main(["build", str(tmp_path / "nowhere"), "--backend", "tensorrt-rtx"]) == 2
    assert "does not exist" in capsys.readouterr().err
    if not tensorrt_api.installed("tensorrt"):
        (tmp_path / "d").mkdir()
        assert main(["build", str(tmp_path / "d"), "--backend", "tensorrt"]) == 2  # no manifest: said first
        assert "no manifest.json" in capsys.readouterr().err


def test_generate_on_an_engine_backend_without_a_gpu_is_a_one_line_error(built, capsys):
    if tensorrt_api.gpu() is not None:
        pytest.skip("this machine has a GPU")
    assert main(["generate", str(built[0]), "a cat", "--backend", "tensorrt-rtx", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a CUDA GPU" in err


def test_refit_options_need_a_gpu_with_tensorrt_rtx(built, capsys):
    if tensorrt_api.gpu() is not None:
        pytest.skip("this machine has a GPU")
    assert main(["build", str(built[0]), "--backend", "tensorrt-rtx", "--strip-weights"]) == 2
    assert "need a CUDA GPU at build time" in capsys.readouterr().err


def test_default_profiles_are_the_sdxl_buckets_and_a_dynamic_range():
    profiles = parse_profiles(None, None, 4, 4)
    assert [p.name for p in profiles] == [f"{w}x{h}" for w, h in BUCKETS] + ["dynamic"]
    assert all(p.images == (1, 1, 4) for p in profiles)
    (static,) = parse_profiles(None, "1216x832", 3, 4)
    assert static.exact and static.batch("unet") == (6, 6, 6) and static.batch("clip_l") == (3, 3, 3)
    assert [p.name for p in parse_profiles("dynamic,768x1344", None, 1, 4)] == ["768x1344", "dynamic"]


# --- on a GPU that the backend supports -----------------------------------------------------------------------------


def _runnable(backend):
    device = tensorrt_api.gpu()
    if device is None or not tensorrt_api.installed(backend):
        pytest.skip(f"needs {backend} and a GPU")
    trt_module = tensorrt_api.import_trt(backend)
    target = tensorrt_api.target(backend, trt_module, device)
    problem = tensorrt_api.target_problem(target, backend, device)
    if problem:
        pytest.skip(problem)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["tensorrt", "tensorrt-rtx"])
def test_engines_match_onnx_runtime_on_the_gpu(backend, tiny_engine, tmp_path):
    """Build for this GPU, run every component through the pipeline's numpy API, compare with ONNX Runtime CPU."""
    _runnable(backend)
    from sdxl_trt.runtime import Pipeline

    root = tmp_path / "tiny"
    shutil.copytree(tiny_engine, root)
    build_engines(root, BuildOptions(backend, parse_profiles("512x512,dynamic:512-768", None, 2, 4)), progress=False)
    reference = Pipeline.load(root, backend="ort-cpu")
    engine = Pipeline.load(root, backend=backend)
    kw = dict(height=512, width=512, num_inference_steps=3, seed=7, output_type="np", progress=False)
    expected = reference("a red bicycle", **kw).array
    got = engine("a red bicycle", **kw).array
    assert np.abs(got - expected).max() < 0.05  # fp16 UNet and text encoders against fp32
    engine.backend.close()


@pytest.mark.gpu
def test_tensorrt_rtx_refuses_an_unsupported_gpu_in_one_line(built, capsys):
    device = tensorrt_api.gpu()
    if device is None or device.compute_capability in tensorrt_api.rtx_compute_capabilities(trt):
        pytest.skip("needs a GPU that TensorRT-RTX does not support (e.g. Hopper)")
    assert main(["generate", str(built[0]), "a cat", "--backend", "tensorrt-rtx", "--steps", "2", "--size", "512x512"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"does not run on {device.name}" in err


@pytest.mark.gpu
def test_device_buffers_round_trip():
    pytest.importorskip("cuda.bindings")
    from sdxl_trt.runtime.cuda import DeviceBuffer, Stream

    stream = Stream()
    data = np.arange(1000, dtype=np.float32)
    buffer = DeviceBuffer(data.nbytes)
    assert not buffer.reserve(data.nbytes // 2)  # grows only
    buffer.upload(data, stream)
    out = buffer.download(np.empty_like(data), stream)
    stream.synchronize()
    np.testing.assert_array_equal(out, data)
    buffer.free()
    stream.close()


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    from sdxl_trt.runtime.onnx_bf16 import to_bf16_bits

    values = np.concatenate([np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 100,
                             np.array([0.0, -0.0, 1.0, 65504.0, 1e30, -3.4e38, 1.00390625, 1.01171875], np.float32)])
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(to_bf16_bits(values), expected)


def test_bf16_vae_is_derived_and_built_with_bf16_layers_and_fp32_io(built, tmp_path):
    root = _copy(built, tmp_path)
    report = build_engines(root, BuildOptions("tensorrt-rtx", parse_profiles("1024x1024", None, 1, 4),
                                              vae_precision="bf16"), components=["vae_decoder"], progress=False)
    assert [r[:2] for r in report.rows] == [("vae_decoder", "bf16")]
    manifest = load_manifest(root)
    manifest.check_files()  # the derived file is recorded with its hash like an exported one
    path, record = _record(root, "vae_decoder")
    assert path.startswith("engines/tensorrt-rtx/vae_decoder.bf16.") and record["onnx"].endswith("model.bf16.onnx")
    assert [(t["name"], t["dtype"]) for t in record["io"]] == [("latent", "fp32"), ("image", "fp32")]
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert trt.OnnxParser(network, logger).parse_from_file(str(root / record["onnx"]))
    heavy = [network.get_layer(i) for i in range(network.num_layers)
             if network.get_layer(i).type in (trt.LayerType.CONVOLUTION, trt.LayerType.NORMALIZATION)]
    assert len(heavy) > 10 and all(layer.get_output(0).dtype == trt.DataType.BF16 for layer in heavy)


@pytest.mark.filterwarnings("ignore:Use Deprecated in TensorRT-RTX:DeprecationWarning")  # its timing cache is a no-op
def test_the_tensorrt_branch_builds_for_this_gpu_with_a_timing_cache(built, tmp_path, monkeypatch):
    """Full TensorRT cannot be installed here: its branch of the builder (GPU-specific target, timing cache) runs on
    TensorRT-RTX's identical API with a stand-in GPU, to exercise everything but the library itself."""
    root = _copy(built, tmp_path)
    monkeypatch.setitem(tensorrt_api.MODULES, "tensorrt", "tensorrt_rtx")
    monkeypatch.setattr(tensorrt_api, "gpu", lambda: L40S)
    options = BuildOptions("tensorrt", parse_profiles("1024x1024", None, 1, 4))
    build_engines(root, options, components=["vae_decoder"], progress=False)
    manifest = load_manifest(root)
    path, record = next((p, r) for p, r in manifest.engines.items() if r["backend"] == "tensorrt")
    assert path.startswith("engines/tensorrt/vae_decoder.fp32.sm89.") and record["target"]["gpu"] == "NVIDIA L40S"
    assert (root / "engines/tensorrt/sm89-nvidia-l40s.timing-cache").is_file()
    assert eng.engine_problem(manifest, path, record, L40S) is None
    assert "TensorRT engines run only on the GPU model they were built on" in \
        eng.engine_problem(manifest, path, record, H100)
    assert len(eng.records(manifest, "tensorrt-rtx")) == len(COMPONENTS)  # engines of other backends are kept


def test_a_failed_build_keeps_the_engines_it_finished(built, tmp_path):
    root = _copy(built, tmp_path)
    shutil.rmtree(root / "engines")
    data = json.loads((root / "manifest.json").read_text())
    del data["engines"]
    bad = root / "onnx/vae_encoder/model.onnx"
    bad.write_bytes(b"not an onnx file")  # a broken file the manifest agrees with: the parser is what fails
    data["files"]["onnx/vae_encoder/model.onnx"] = {"sha256": sha256_file(bad), "size": bad.stat().st_size}
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="cannot parse .*vae_encoder"):
        build_engines(root, _options(), components=["clip_l", "vae_encoder"], progress=False)
    manifest = load_manifest(root)
    assert [r["component"] for r in manifest.engines.values()] == ["clip_l"]
    assert sorted(p.name for p in (root / "engines/tensorrt-rtx").iterdir()) == [Path(next(iter(manifest.engines))).name]


def test_an_onnx_file_changed_behind_the_manifest_is_refused(built, tmp_path, capsys):
    root = _copy(built, tmp_path)
    with open(root / "onnx/clip_l/model.fp16.onnx", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    assert main(["build", str(root), "--backend", "tensorrt-rtx", "--components", "clip_l"]) == 2
    assert "does not match its sha256" in capsys.readouterr().err


def test_one_build_at_a_time_per_directory(built, tmp_path):
    root = _copy(built, tmp_path)
    with eng.locked(root):
        with pytest.raises(UserError, match="another sdxl-trt command .* is changing this engine directory"):
            build_engines(root, _options(), components=["clip_l"], progress=False)


def test_static_build_has_one_exact_profile(built, tmp_path):
    root = _copy(built, tmp_path)
    options = BuildOptions("tensorrt-rtx", parse_profiles(None, "1216x832", 2, 4))
    build_engines(root, options, components=["vae_decoder"], progress=False)
    _, record = _record(root, "vae_decoder")
    (profile,) = record["profiles"]
    assert profile["shapes"]["latent"] == [[2, 4, 104, 152]] * 3 and profile["exact"]


@pytest.mark.filterwarnings("ignore:Use Deprecated in TensorRT-RTX:DeprecationWarning")
def test_tensorrt_engines_for_two_gpu_models_of_one_sm_live_side_by_side(built, tmp_path, monkeypatch):
    root = _copy(built, tmp_path)
    monkeypatch.setitem(tensorrt_api.MODULES, "tensorrt", "tensorrt_rtx")
    a10, rtx3090 = tensorrt_api.Gpu("NVIDIA A10", "8.6"), tensorrt_api.Gpu("NVIDIA GeForce RTX 3090", "8.6")
    for device in (a10, rtx3090):
        monkeypatch.setattr(tensorrt_api, "gpu", lambda device=device: device)
        options = BuildOptions("tensorrt", parse_profiles("1024x1024", None, 1, 4))
        build_engines(root, options, components=["clip_l"], progress=False)
    manifest = load_manifest(root)
    paths = {r["target"]["gpu"]: p for p, r in eng.records(manifest, "tensorrt").items()}
    assert sorted(paths) == ["NVIDIA A10", "NVIDIA GeForce RTX 3090"] and all((root / p).is_file() for p in paths.values())
    assert eng.find_engine(manifest, "tensorrt", "clip_l", rtx3090)[0] == paths["NVIDIA GeForce RTX 3090"]


def test_text_encoder_engines_do_not_depend_on_the_size_profiles(built, tmp_path):
    root = _copy(built, tmp_path)
    report = build_engines(root, BuildOptions("tensorrt-rtx", parse_profiles("dynamic", None, MAX_BATCH, 4)),
                           components=["clip_l", "clip_g"], progress=False)
    assert [r[5] for r in report.rows] == ["cached", "cached"]


# --- the backend's own code on a stand-in GPU (tests/fake_gpu.py) ---------------------------------------------------


@pytest.fixture
def fake_gpu(built, tmp_path, monkeypatch):
    from sdxl_trt.runtime import cuda

    from fake_gpu import FakeCudart, fake_trt

    root = _copy(built, tmp_path)
    cudart = FakeCudart()
    monkeypatch.setattr(cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(tensorrt_api, "gpu", lambda: L40S)
    module = fake_trt(trt, root)
    monkeypatch.setattr(tensorrt_api, "import_trt", lambda backend: module)
    # host memory stands in for the device here: no NVRTC kernels can run on it, so the pipeline takes its host loop
    # over the engines (the device loop on the engines runs in the GPU tests, tests/test_trt_standin.py)
    from sdxl_trt.runtime.trt_backend import TensorRTBackend

    monkeypatch.setattr(TensorRTBackend, "device_loop_usable", False)
    return root, cudart


def test_backend_runs_the_pipeline_like_onnx_runtime_on_a_stand_in_gpu(fake_gpu):
    from sdxl_trt.runtime import Pipeline

    root, cudart = fake_gpu
    engine = Pipeline.load(root, backend="tensorrt-rtx")
    reference = Pipeline.load(root, backend="ort-cpu")
    kw = dict(num_inference_steps=2, seed=3, output_type="np", progress=False)
    for width, height in ((512, 512), (1152, 896)):  # the dynamic range, then a bucket of its own
        got = engine("a red bicycle", width=width, height=height, **kw).array
        expected = reference("a red bicycle", width=width, height=height, **kw).array
        assert got.shape == (1, height, width, 3) and np.abs(got - expected).max() < 0.02  # fp16 vs fp32 files
    unet = engine.backend.session("unet")
    assert sorted(unet.contexts) == [1, 3]  # one context per profile used: 1152x896, dynamic
    warm = cudart.mallocs
    engine("a red bicycle", width=640, height=768, **kw)  # another size in the dynamic range: nothing allocated
    assert cudart.mallocs == warm
    with pytest.raises(UserError, match="no optimization profile of this engine takes"):
        engine("a red bicycle", width=256, height=256, **kw)
    engine.backend.close()
    assert (root / "engines/tensorrt-rtx/runtime-cache.sm89.bin").read_bytes() == b"kernels"
    assert not cudart.memory  # every buffer freed


def test_the_device_loops_engine_interface_binds_by_name_and_picks_the_profile(fake_gpu):
    """What the device loop asks of an engine (bind device addresses by tensor name → the profile is chosen from the
    input shapes; run_bound enqueues on the stream): the same outputs as `run`, on the stand-in GPU; a dtype or
    tensor the engine does not have is a one-line error."""
    from sdxl_trt.runtime.loading import load_backend
    from sdxl_trt.runtime.cuda import BufferPool

    root, _ = fake_gpu
    backend = load_backend("tensorrt-rtx", load_manifest(root))
    unet = backend.session("unet")
    rng = np.random.default_rng(0)
    for h, w in ((64, 64), (112, 144)):  # the dynamic profile, then 1152x896's own
        feeds = {"sample": rng.standard_normal((2, 4, h, w)), "timestep": np.full(2, 500.0),
                 "encoder_hidden_states": rng.standard_normal((2, 77, 96)), "text_embeds": rng.standard_normal((2, 64)),
                 "time_ids": np.array([[h * 8, w * 8, 0, 0, h * 8, w * 8]] * 2)}
        feeds = {n: np.ascontiguousarray(a, unet.dtype(n)) for n, a in feeds.items()}
        expected = unet.run(**feeds)["noise_pred"]
        pool = BufferPool()
        inputs = {n: (pool.put(n, a, backend.stream), a.shape, a.dtype) for n, a in feeds.items()}
        out = np.empty(expected.shape, unet.output_dtypes["noise_pred"])
        binding = unet.new_binding()
        unet.bind(binding, inputs, {"noise_pred": (pool.reserve("out", out.nbytes).ptr, out.shape, out.dtype)})
        assert binding.profile == (1 if (h, w) == (112, 144) else 3)  # 1152x896's profile, else the dynamic one
        unet.run_bound(binding)
        pool["out"].download(out, backend.stream)
        np.testing.assert_array_equal(out, expected)
        wrong = dict(inputs, timestep=(inputs["timestep"][0], (2,), np.float64))
        with pytest.raises(UserError, match="timestep is .* in this engine, was bound as float64"):
            unet.bind(unet.new_binding(), wrong, {"noise_pred": (0, out.shape, out.dtype)})
        with pytest.raises(UserError, match="takes inputs"):
            unet.bind(unet.new_binding(), inputs, {})
    backend.close()


def test_lora_adapters_refit_refittable_engines(fake_gpu, tmp_path):
    """LoRA on a TensorRT backend: the merged weights go to the engine through the Refitter by their ONNX names (the
    stand-in engine then runs with them); switching back puts the exported weights back. Not run on TensorRT."""
    import json

    from sdxl_trt.runtime import Pipeline

    from fake_gpu import write_lora

    root, _ = fake_gpu
    lora = [(write_lora(root, tmp_path / "style.safetensors"), 0.9)]
    kw = dict(width=512, height=512, num_inference_steps=2, seed=3, output_type="np", progress=False)
    data = json.loads((root / "manifest.json").read_text())
    unet_engine = next(p for p, r in data["engines"].items() if r["component"] == "unet")
    engine = Pipeline.load(root, backend="tensorrt-rtx")
    with pytest.raises(UserError, match="--refittable"):  # built without it
        engine.set_loras(lora)
        engine("a red bicycle", **kw)
    engine.backend.close()
    data["engines"][unet_engine]["options"]["refittable"] = True
    (root / "manifest.json").write_text(json.dumps(data))
    engine = Pipeline.load(root, backend="tensorrt-rtx")
    base = engine("a red bicycle", **kw).array
    engine.set_loras(lora)
    got = engine("a red bicycle", **kw).array
    expected = Pipeline.load(root, backend="ort-cpu", loras=lora)("a red bicycle", **kw).array
    assert np.abs(got - expected).max() < 0.02 and np.abs(got - base).max() > 0.05  # fp16 vs fp32 files
    assert engine.backend.session("unet").engine.refits == 1
    engine.set_loras(None)  # the exported weights back
    np.testing.assert_allclose(engine("a red bicycle", **kw).array, base, atol=1e-2)  # fp16, unoptimized stand-in session
    assert engine.backend.session("unet").overridden == set()
    engine.backend.close()


def test_backend_refuses_a_changed_engine_before_loading_it(fake_gpu, capsys):
    root, _ = fake_gpu
    path, _ = _record(root, "clip_l")
    data = bytearray((root / path).read_bytes())
    data[-1] ^= 1
    (root / path).write_bytes(bytes(data))
    assert main(["generate", str(root), "a cat", "--backend", "tensorrt-rtx", "--steps", "2", "--size", "512x512",
                 "--out", str(root / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not match its sha256" in err and "sdxl-trt build" in err
    assert not (root / "x.png").exists()
