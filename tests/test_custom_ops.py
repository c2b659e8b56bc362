"""Our ONNX Runtime custom-op library (kernels/ort_ops.py): its build, its CPU kernel against ONNX Runtime running the
same formula as plain ONNX operators, `optimize --custom-ops` (the graph rewrite, the manifest record, the library in
the engine directory) and the runtime's checks of it. The CUDA kernel is held to ONNX Runtime's own BiasSplitGelu and
to float64 on a GPU (tests/test_ort_cuda.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import need_custom_op_build
from sdxl_trt.kernels import ort_ops
from sdxl_trt.runtime.errors import UserError


def rel_l2(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def one_node(domain: str, elem: int) -> bytes:
    return ort_ops.bias_split_gelu_model(domain, fp16=elem == TensorProto.FLOAT16)


def plain_onnx_reference() -> bytes:
    """(x + bias) split in halves, a · gelu(g) with gelu(g) = g/2 · (1 + erf(g/√2)), as standard fp32 ONNX operators:
    ONNX Runtime's own Add, Split, Div, Erf and Mul compute the reference."""
    f = TensorProto.FLOAT
    nodes = [helper.make_node("Add", ["x", "bias"], ["v"]),
             helper.make_node("Split", ["v"], ["a", "g"], axis=-1, num_outputs=2),
             helper.make_node("Div", ["g", "sqrt2"], ["scaled"]),
             helper.make_node("Erf", ["scaled"], ["erf"]),
             helper.make_node("Add", ["erf", "one"], ["erf1"]),
             helper.make_node("Mul", ["g", "erf1"], ["ge"]),
             helper.make_node("Mul", ["ge", "half"], ["gelu"]),
             helper.make_node("Mul", ["a", "gelu"], ["y"])]
    consts = [helper.make_tensor("sqrt2", f, [], [np.sqrt(2.0)]), helper.make_tensor("one", f, [], [1.0]),
              helper.make_tensor("half", f, [], [0.5])]
    graph = helper.make_graph(nodes, "reference", [helper.make_tensor_value_info("x", f, ["B", "S", "W"]),
                                                   helper.make_tensor_value_info("bias", f, ["W"])],
                              [helper.make_tensor_value_info("y", f, None)], initializer=consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10).SerializeToString()


def session(model: bytes, library: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if library:
        so.register_custom_ops_library(library)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def cpu_library(tmp_path_factory):
    need_custom_op_build(cuda=False)
    return str(ort_ops.build(tmp_path_factory.mktemp("ops"), cuda=False, quiet=True))


# widths: SDXL's GEGLU halves are 2560 / 5120; odd halves and a single row too
@pytest.mark.parametrize("shape", [(2, 5, 2560), (1, 3, 7), (3, 1, 64), (1, 1, 1)])
def test_the_cpu_kernel_computes_what_onnx_runtime_computes_from_plain_operators(cpu_library, shape):
    rng = np.random.default_rng(0)
    b, s, half = shape
    x = (rng.standard_normal((b, s, 2 * half)) * 3).astype(np.float32)
    bias = rng.standard_normal(2 * half).astype(np.float32)
    want = session(plain_onnx_reference()).run(None, {"x": x, "bias": bias})[0].astype(np.float64)
    got = session(one_node(ort_ops.DOMAIN, TensorProto.FLOAT), cpu_library).run(None, {"x": x, "bias": bias})[0]
    assert got.shape == (b, s, half) and got.dtype == np.float32
    # the same fp32 formula; erf's implementations differ in the last bits (measured ≤ 1e-7)
    assert rel_l2(got, want) < 1e-6
    # fp16 in and out: the same computation in fp32, one rounding to fp16 (half an ulp, 2^-11, at most); plus 1e-5
    # absolute for the tiny outputs of large negative gates, where 1 + erf(g/√2) cancels and two erf implementations
    # differ by ~1e-7 (seen: 1.02e-5 here against 9.4e-6 from ONNX Runtime's Erf)
    x16, b16 = x.astype(np.float16), bias.astype(np.float16)
    want16 = session(plain_onnx_reference()).run(None, {"x": x16.astype(np.float32), "bias": b16.astype(np.float32)})[0]
    got16 = session(one_node(ort_ops.DOMAIN, TensorProto.FLOAT16), cpu_library).run(None, {"x": x16, "bias": b16})[0]
    assert got16.dtype == np.float16
    np.testing.assert_allclose(got16.astype(np.float32), want16, rtol=2 ** -11, atol=1e-5)
    # a formula off by a little is caught: gelu with tanh's approximation differs by more than the bound
    v = x16.astype(np.float64) + b16
    a, g = v[..., :half], v[..., half:]
    tanh = a * 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
    if half > 1:
        assert not np.allclose(got16.astype(np.float32), tanh, rtol=2 ** -11, atol=1e-5)


def test_the_kernel_refuses_inputs_it_cannot_take(cpu_library):
    run = session(one_node(ort_ops.DOMAIN, TensorProto.FLOAT), cpu_library)
    with pytest.raises(Exception, match="odd"):
        run.run(None, {"x": np.zeros((1, 2, 5), np.float32), "bias": np.zeros(5, np.float32)})
    with pytest.raises(Exception, match="bias must be one-dimensional"):
        run.run(None, {"x": np.zeros((1, 2, 6), np.float32), "bias": np.zeros(4, np.float32)})


def test_the_cuda_build_compiles_for_every_architecture_and_carries_the_cpu_kernel_too(tmp_path):
    need_custom_op_build(cuda=True)
    library = ort_ops.build(tmp_path, cuda=True, quiet=True)
    assert library.name == ort_ops.library_name(cuda=True) and library.stat().st_size > 100_000
    ort_ops.check(library, cuda=True)
    with pytest.raises(UserError, match="built with the CUDA kernels, expected without"):
        ort_ops.check(library, cuda=False)
    assert ort_ops.build(tmp_path, cuda=True, quiet=True) == library  # built once, then found
    x = np.linspace(-3, 3, 16, dtype=np.float32).reshape(1, 1, 16)
    got = session(one_node(ort_ops.DOMAIN, TensorProto.FLOAT), str(library)).run(None, {"x": x, "bias": np.zeros(16, np.float32)})[0]
    want = session(plain_onnx_reference()).run(None, {"x": x, "bias": np.zeros(16, np.float32)})[0]
    assert rel_l2(got, want) < 1e-6
    out = tmp_path / "not-a-library.so"
    out.write_bytes(b"\x7fELF but no")
    with pytest.raises(UserError, match="not a custom-op library"):
        ort_ops.check(out)


def test_a_missing_header_or_compiler_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(ort_ops.INCLUDE_ENV, str(tmp_path))
    with pytest.raises(UserError, match="no onnxruntime_c_api.h there"):
        ort_ops.build(tmp_path / "out", cuda=True, quiet=True)
    monkeypatch.delenv(ort_ops.INCLUDE_ENV)
    monkeypatch.setenv("SDXL_TRT_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError, match="fetch-headers"):
        ort_ops.build(tmp_path / "out", cuda=True, quiet=True)
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / ort_ops.HEADER).write_text("#error not this header\n")
    monkeypatch.setenv(ort_ops.INCLUDE_ENV, str(tmp_path / "include"))
    monkeypatch.setenv("CXX", "/no/such/compiler")
    with pytest.raises(UserError, match="cannot run /no/such/compiler"):
        ort_ops.build(tmp_path / "out", cuda=False, quiet=True)
    monkeypatch.delenv("CXX")
    if ort_ops._cxx():
        with pytest.raises(UserError, match=r"failed \(.*not this header"):
            ort_ops.build(tmp_path / "out", cuda=False, quiet=True)
    assert not list((tmp_path / "out").glob("*.so"))  # nothing half-written is left
    (tmp_path / "a-file").write_text("kept")
    for target in (tmp_path / "a-file", tmp_path / "a-file" / "below"):
        with pytest.raises(UserError, match="cannot make the folder"):
            ort_ops.build(target, cuda=False, quiet=True)
    assert (tmp_path / "a-file").read_text() == "kept"


def test_the_module_command_says_a_bad_path_in_one_line(tmp_path, capsys):
    assert ort_ops.main(["build", str(tmp_path / ("L" * 300)), "--cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "too long" in err[0]


def test_the_debian_package_reader_takes_an_ar_archive():
    def member(name: bytes, data: bytes) -> bytes:
        header = name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
        return header + str(len(data)).encode().ljust(10) + b"`\n" + data + (b"\n" if len(data) % 2 else b"")

    archive = b"!<arch>\n" + member(b"debian-binary", b"2.0\n") + member(b"data.tar.xz/", b"odd")
    assert ort_ops._ar_members(archive) == {"debian-binary": b"2.0\n", "data.tar.xz": b"odd"}
    with pytest.raises(UserError, match="not a Debian archive"):
        ort_ops._ar_members(b"<html>")


# --- optimize --custom-ops and the runtime's checks -------------------------------------------------------------


@pytest.fixture(scope="module")
def custom_ops_dir(tiny_engine, tmp_path_factory):
    from conftest import optimized_copy

    need_custom_op_build(cuda=True)
    return optimized_copy(tiny_engine, tmp_path_factory, "custom_ops", custom_ops=True)


def test_optimize_with_custom_ops_puts_our_operator_in_the_unets_and_records_the_library(custom_ops_dir):
    from sdxl_trt.runtime.backends import custom_ops_library
    from sdxl_trt.runtime.manifest import load_manifest

    manifest = load_manifest(custom_ops_dir)
    libraries = set()
    for name, entry in manifest.components.items():
        record = entry["optimized"]["cuda"]
        model = onnx.load(str(manifest.path(record["path"])), load_external_data=False)
        ours = [n for n in model.graph.node if n.op_type == "BiasSplitGelu" and n.domain == ort_ops.DOMAIN]
        theirs = [n for n in model.graph.node if n.op_type == "BiasSplitGelu" and n.domain != ort_ops.DOMAIN]
        if entry["contract"].startswith("unet"):
            # the tiny UNets' GEGLU halves (64, 128) are not among ONNX Runtime's kernel's sizes: fused for ours only
            assert len(ours) == record["fused"]["BiasSplitGelu"] > 0 and not theirs, name
            assert any(o.domain == ort_ops.DOMAIN for o in model.opset_import)
            libraries.add(record["custom_ops"])
            assert custom_ops_library(manifest, manifest.path(record["path"])) == manifest.path(record["custom_ops"])
        else:
            assert "custom_ops" not in record and not ours, name
    (library,) = libraries
    assert library == f"ops/{ort_ops.library_name(cuda=True)}" and library in manifest.data["files"]
    ort_ops.check(manifest.path(library), cuda=True)


def test_the_runtime_refuses_a_changed_or_missing_library_and_optimize_without_the_flag_removes_it(
        custom_ops_dir, tmp_path):
    from sdxl_trt.export.optimize import optimize_engine_dir
    from sdxl_trt.runtime.backends import OrtSession
    from sdxl_trt.runtime.manifest import load_manifest

    engine = tmp_path / "engine"
    shutil.copytree(custom_ops_dir, engine)
    manifest = load_manifest(engine)
    record = manifest.components["unet"]["optimized"]["cuda"]
    library = manifest.path(record["custom_ops"])
    saved = library.read_bytes()
    library.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
    with pytest.raises(UserError, match=r"changed since `sdxl-trt optimize` built it.*--custom-ops"):
        OrtSession(manifest, "unet", "fp16", ["CPUExecutionProvider"], path=record["path"])
    # what the message says to do mends it: the changed file is never adopted, it is built again
    optimize_engine_dir(engine, components=["unet"], custom_ops=True, progress=False)
    manifest = load_manifest(engine)
    assert library.read_bytes() != saved[:-1] + bytes([saved[-1] ^ 1])
    # registered: ONNX Runtime knows our operator, infers shapes through it and stops only at ONNX Runtime's CUDA-only
    # fused operators (on the CPU, when it assigns kernels); without the library it would refuse the model for
    # sdxl_trt:BiasSplitGelu first, and with an output shape left unset by our shape inference (where the input's
    # dimensions are neither known nor named) at the next MatMul ("Input tensors of wrong rank (0)": every
    # --custom-ops UNet failed to load on the GPU with the library of e021684)
    with pytest.raises(UserError) as refused:
        OrtSession(manifest, "unet", "fp16", ["CPUExecutionProvider"], path=record["path"])
    assert "Failed to find kernel for com.microsoft." in str(refused.value), refused.value
    library.unlink()
    with pytest.raises(UserError, match=r"is missing; build it again: `sdxl-trt optimize .* --custom-ops`"):
        OrtSession(manifest, "unet", "fp16", ["CPUExecutionProvider"], path=record["path"])
    # a library of another name (another version's sources, or brought from elsewhere) is never loaded
    data = json.loads((engine / "manifest.json").read_text())
    foreign = "ops/libsdxl_trt_ops-cuda-0123456789abcdef.so"
    shutil.copy(custom_ops_dir / record["custom_ops"], engine / foreign)
    data["files"][foreign] = data["files"][record["custom_ops"]]
    data["components"]["unet"]["optimized"]["cuda"]["custom_ops"] = foreign
    (engine / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="not the custom-op library this sdxl-trt builds"):
        OrtSession(load_manifest(engine), "unet", "fp16", ["CPUExecutionProvider"], path=record["path"])
    # a manifest naming a library with no size/sha256 record is refused when loaded
    data = json.loads((engine / "manifest.json").read_text())
    del data["files"][record["custom_ops"]]
    (engine / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="has no size and sha256 record"):
        load_manifest(engine)
    data["files"][record["custom_ops"]] = {"size": len(saved), "sha256": "0" * 64}
    data["components"]["unet"]["optimized"]["cuda"]["custom_ops"] = 7
    (engine / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="custom_ops"):
        load_manifest(engine)
    # back to a sound directory, then optimized again without --custom-ops: ONNX Runtime's operators, no library
    shutil.rmtree(engine)
    shutil.copytree(custom_ops_dir, engine)
    optimize_engine_dir(engine, components=["unet"], progress=False)
    manifest = load_manifest(engine)
    assert "custom_ops" not in manifest.components["unet"]["optimized"]["cuda"]
    assert "custom_ops" in manifest.components["unet_refiner"]["optimized"]["cuda"]  # not asked: kept as it was
    optimize_engine_dir(engine, progress=False)
    manifest = load_manifest(engine)
    assert not [f for f in manifest.data["files"] if f.startswith("ops/")] and not list((engine / "ops").iterdir())


def test_optimize_custom_ops_without_nvcc_says_so_in_one_line(tiny_engine, tmp_path, monkeypatch, capsys):
    from sdxl_trt.runtime import cli

    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine)
    before = (engine / "manifest.json").read_bytes()
    monkeypatch.setattr(ort_ops, "_nvcc", lambda: None)
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / ort_ops.HEADER).write_text("")
    monkeypatch.setenv(ort_ops.INCLUDE_ENV, str(tmp_path / "include"))
    assert cli.main(["optimize", str(engine), "--custom-ops"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs nvcc" in err[0]
    assert (engine / "manifest.json").read_bytes() == before and not (engine / "ops").exists()


# --- the checks around the library: GPU, compilers, headers, re-optimizing, inspect ------------------------------


def test_the_kernels_run_on_sm80_and_newer_only():
    for cc in ("8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "12.0", (9, 0)):
        assert ort_ops.gpu_problem(cc) is None, cc
    for cc in ("7.5", "7.0", (6, 1)):
        assert "sm 8.0 and newer" in ort_ops.gpu_problem(cc), cc


def test_an_old_gpu_is_refused_by_optimize_and_by_the_session(custom_ops_dir, tiny_engine, tmp_path, monkeypatch):
    from sdxl_trt.export.optimize import optimize_engine_dir
    from sdxl_trt.runtime import backends, cuda, tensorrt_api
    from sdxl_trt.runtime.manifest import load_manifest

    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine)
    before = (engine / "manifest.json").read_bytes()
    monkeypatch.setattr(tensorrt_api, "gpu", lambda: tensorrt_api.Gpu("Tesla T4", "7.5"))
    with pytest.raises(UserError, match=r"--custom-ops: .*sm 8.0 and newer; this GPU is sm 7.5 \(Tesla T4\)"):
        optimize_engine_dir(engine, custom_ops=True, progress=False)
    assert (engine / "manifest.json").read_bytes() == before and not (engine / "ops").exists()
    # a directory optimized elsewhere, opened on an old GPU: refused before ONNX Runtime loads the library (a session
    # on the CUDA provider, asked for here where ONNX Runtime has none: our check comes first)
    manifest = load_manifest(custom_ops_dir)
    record = manifest.components["unet"]["optimized"]["cuda"]
    library = manifest.path(record["custom_ops"])
    seen = []
    monkeypatch.setattr(cuda, "compute_capability", lambda device: seen.append(device) or (7, 5))
    with pytest.raises(UserError, match=r"sm 7.5 \(GPU 1\); make the UNet's files without them: `sdxl-trt optimize"):
        backends.OrtSession(manifest, "unet", "fp16", [("CUDAExecutionProvider", {"device_id": "1"})],
                            path=record["path"])
    backends.check_custom_ops_gpu(library, ["CPUExecutionProvider"], manifest)  # the CPU kernels run anywhere
    monkeypatch.setattr(cuda, "compute_capability", lambda device: (9, 0))
    backends.check_custom_ops_gpu(library, [("CUDAExecutionProvider", {"device_id": "0"})], manifest)
    assert seen == [1]


def test_custom_ops_for_components_without_a_unet_is_an_error(tiny_engine, tmp_path, capsys):
    from sdxl_trt.runtime import cli

    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine)
    before = (engine / "manifest.json").read_bytes()
    assert cli.main(["optimize", str(engine), "--components", "clip_l", "vae_decoder", "--custom-ops"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "clip_l, vae_decoder take none of sdxl-trt's custom operators" in err[0], err
    assert "unet, unet_refiner" in err[0]
    assert (engine / "manifest.json").read_bytes() == before


def test_a_named_cuda_home_without_nvcc_and_a_compiler_command_line(tmp_path, monkeypatch, cpu_library):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-toolkit"))
    with pytest.raises(UserError, match=r"\$CUDA_HOME=.*no-toolkit: no bin/nvcc there"):
        ort_ops._nvcc()
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("CUDA_PATH", str(tmp_path))
    with pytest.raises(UserError, match=r"\$CUDA_PATH="):
        ort_ops.build(tmp_path / "out", cuda=True, quiet=True)
    monkeypatch.delenv("CUDA_PATH")
    # a compiler that fails: the folders the build made for the library go again, the ones that were there stay
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(UserError, match=r"failed \(false exit 1\)"):
        ort_ops.build(tmp_path / "made" / "for" / "it", cuda=False, quiet=True)
    assert not (tmp_path / "made").exists() and tmp_path.is_dir()
    monkeypatch.setenv("CXX", 'g++ "')
    with pytest.raises(UserError, match=r"\$CXX='g\+\+ \"': No closing quotation"):
        ort_ops.build(tmp_path / "out", cuda=False, quiet=True)
    monkeypatch.delenv("CXX")
    # $CXX as a command line (a wrapper and its compiler, as `ccache g++`): split as the shell would
    compiler = ort_ops._cxx()[0]
    monkeypatch.setenv("CXX", f"env LC_ALL=C {compiler}")
    assert ort_ops._cxx() == ["env", "LC_ALL=C", compiler]
    built = ort_ops.build(tmp_path / "wrapped", cuda=False, quiet=True)
    ort_ops.check(built, cuda=False)


def fake_headers_deb(header: bytes) -> bytes:
    """A .deb (ar archive) whose data.tar.gz holds usr/include/onnxruntime/onnxruntime_c_api.h, as Debian's does."""
    import io
    import tarfile

    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:gz") as tar:
        for name, data in ((f"./usr/include/onnxruntime/{ort_ops.HEADER}", header),
                           ("./usr/include/onnxruntime/core/session/extra.h", b"// extra\n"),
                           ("./usr/share/doc/libonnxruntime-dev/copyright", b"MIT\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    def member(name: bytes, data: bytes) -> bytes:
        head = name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
        return head + str(len(data)).encode().ljust(10) + b"`\n" + data + (b"\n" if len(data) % 2 else b"")

    return b"!<arch>\n" + member(b"debian-binary", b"2.0\n") + member(b"data.tar.gz", payload.getvalue())


def test_headers_come_from_the_second_address_when_the_first_fails_and_a_damaged_cache_is_fetched_again(
        tmp_path, monkeypatch):
    import hashlib
    import io
    import urllib.error
    import urllib.request

    deb = fake_headers_deb(b"// the C API\n")
    monkeypatch.setattr(ort_ops, "HEADERS_SHA256", hashlib.sha256(deb).hexdigest())
    monkeypatch.setenv("SDXL_TRT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(ort_ops.INCLUDE_ENV, raising=False)
    asked = []

    def urlopen(url, timeout):
        asked.append(url)
        if url == ort_ops.HEADERS_URLS[0]:
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        return io.BytesIO(deb)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    folder = ort_ops.fetch_headers()
    assert asked == list(ort_ops.HEADERS_URLS)
    assert (folder / ort_ops.HEADER).read_bytes() == b"// the C API\n" and (folder / "core/session/extra.h").is_file()
    assert not (folder / "copyright").exists() and ort_ops.include_dir() == folder
    assert ort_ops.fetch_headers() == folder and len(asked) == 2  # as fetched: kept, nothing downloaded
    (folder / ort_ops.HEADER).write_bytes(b"// damaged\n")
    with pytest.raises(UserError, match=r"not as they were fetched \(onnxruntime_c_api.h changed or missing\); "
                                        r"fetch them again"):
        ort_ops.include_dir()
    assert ort_ops.fetch_headers() == folder and len(asked) == 4  # damaged: downloaded again
    assert (folder / ort_ops.HEADER).read_bytes() == b"// the C API\n"
    (folder / ort_ops.HEADERS_SUMS).unlink()  # fetched by an older sdxl-trt (no sums): fetched again too
    with pytest.raises(UserError, match="SHA256SUMS changed or missing"):
        ort_ops.include_dir()
    ort_ops.fetch_headers()
    assert ort_ops.include_dir() == folder
    # neither address serves the package: one line naming both
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"<html>moved</html>"))
    shutil.rmtree(folder)
    with pytest.raises(UserError, match=r"could not download .*not the package expected.*; .*not the package"):
        ort_ops.fetch_headers()
    assert not folder.exists() and not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp")]


def test_a_library_of_other_sources_is_rebuilt_without_optimizing_the_unets_again(custom_ops_dir, tmp_path):
    from sdxl_trt.export.optimize import optimize_engine_dir
    from sdxl_trt.runtime.inspect import inspect_dir
    from sdxl_trt.runtime.manifest import load_manifest

    engine = tmp_path / "engine"
    shutil.copytree(custom_ops_dir, engine)
    text = inspect_dir(engine)
    assert f"cuda file's custom operators: ops/{ort_ops.library_name(cuda=True)} (usable here)" in text
    # as an older sdxl-trt (other kernel sources) left it: its library under its own name
    data = json.loads((engine / "manifest.json").read_text())
    current = data["components"]["unet"]["optimized"]["cuda"]["custom_ops"]
    older = "ops/libsdxl_trt_ops-cuda-0123456789abcdef.so"
    (engine / current).rename(engine / older)
    data["files"][older] = data["files"].pop(current)
    for name in ("unet", "unet_refiner"):
        data["components"][name]["optimized"]["cuda"]["custom_ops"] = older
    (engine / "manifest.json").write_text(json.dumps(data))
    assert "not usable here: another sdxl-trt built it" in inspect_dir(engine)
    unet_file = load_manifest(engine).path(data["components"]["unet"]["optimized"]["cuda"]["path"])
    made = unet_file.stat().st_mtime_ns
    report = optimize_engine_dir(engine, custom_ops=True, progress=False)
    assert all(seconds is None for *_, seconds in report.rows)  # nothing optimized again
    manifest = load_manifest(engine)
    assert unet_file.stat().st_mtime_ns == made
    for name in ("unet", "unet_refiner"):
        assert manifest.components[name]["optimized"]["cuda"]["custom_ops"] == current
    assert (engine / current).is_file() and not (engine / older).exists() and older not in manifest.data["files"]
    assert "(usable here)" in inspect_dir(engine)
    (engine / current).unlink()
    assert f"not usable here: {engine / current} is missing: `sdxl-trt optimize {engine} --custom-ops`" in inspect_dir(engine)



@pytest.mark.parametrize("shape, fails", [(None, None), ([None, None, None], None), (["B", None, 8], None),
                                          ([2, 5, 8], None), ([2, 5, None], None), ([2, 5, 7], "is odd")])
def test_shapes_are_inferred_through_our_operator_whatever_is_known_of_its_input(cpu_library, shape, fails):
    """BiasSplitGelu → MatMul with the input's shape unknown (no rank), of unknown unnamed dimensions, partly named,
    static: ONNX Runtime loads and runs it (the library of 028b390 declared a scalar for an input of unknown rank and
    the MatMul's shape inference refused it: "wrong rank (0)"); an odd last dimension is refused by the kernel, in one
    line naming it (ONNX Runtime ignores a shape-inference function's error status)."""
    f = TensorProto.FLOAT
    nodes = [helper.make_node("BiasSplitGelu", ["x", "bias"], ["y"], domain=ort_ops.DOMAIN),
             helper.make_node("MatMul", ["y", "w"], ["z"])]
    weight = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = helper.make_graph(nodes, "shapes", [helper.make_tensor_value_info("x", f, shape)],
                              [helper.make_tensor_value_info("z", f, None)],
                              initializer=[helper.make_tensor("w", f, [4, 3], weight.ravel()),
                                           helper.make_tensor("bias", f, [8], np.linspace(-1, 1, 8))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ort_ops.DOMAIN, 1)],
                              ir_version=10).SerializeToString()
    if fails:
        with pytest.raises(Exception, match=fails):
            session(model, cpu_library).run(None, {"x": np.ones((2, 5, 7), np.float32)})
        return
    x = np.random.default_rng(2).standard_normal((2, 5, 8)).astype(np.float32)
    got = session(model, cpu_library).run(None, {"x": x})[0]
    gated = session(plain_onnx_reference()).run(None, {"x": x, "bias": np.linspace(-1, 1, 8).astype(np.float32)})[0]
    assert got.shape == (2, 5, 3) and rel_l2(got, gated @ weight) < 1e-6
