"""ONNX export into an engine directory, checked against diffusers/transformers modules and ONNX Runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from sdxl_trt.export.engine_dir import export_engine_dir  # noqa: E402
from sdxl_trt.export.models import COMPONENTS  # noqa: E402
from sdxl_trt.export.verify import rel_l2  # noqa: E402
from sdxl_trt.runtime import ClipTokenizer, UserError  # noqa: E402
from sdxl_trt.runtime.manifest import load_manifest  # noqa: E402

FP32_TOL = 1e-4  # rel-L2 of ONNX Runtime CPU fp32 against torch fp32


@pytest.fixture(scope="module")
def engine_dir(tiny_engine):
    return tiny_engine


def session(engine_dir, component, precision="fp32"):
    manifest = load_manifest(engine_dir)
    path = manifest.path(manifest.components[component]["precisions"][precision])
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_all_six_components_and_the_shared_ones(engine_dir):
    manifest = load_manifest(engine_dir)
    assert set(manifest.components) == {"clip_l", "clip_g", "unet", "unet_refiner", "vae_decoder", "vae_encoder"}
    assert set(COMPONENTS) == set(manifest.components) | {"controlnet", "unet_control"}  # those: with --controlnet
    refiner = manifest.data["pipelines"]["refiner"]["components"]
    assert refiner == {"clip_g": "clip_g", "unet": "unet_refiner", "vae_decoder": "vae_decoder",
                       "vae_encoder": "vae_encoder"}
    assert manifest.data["pipelines"]["base"]["force_zeros_for_empty_prompt"] is True
    assert manifest.data["pipelines"]["refiner"]["requires_aesthetics_score"] is True
    assert manifest.data["pipelines"]["refiner"]["time_ids"][-1] == "aesthetic_score"
    assert manifest.data["model"]["vae_scaling_factor"] == 0.13025
    assert manifest.data["scheduler"]["timestep_spacing"] == "leading"
    assert (engine_dir / "tokenizer" / "vocab.json").is_file() and (engine_dir / "tokenizer_2" / "merges.txt").is_file()


def test_files_are_valid_onnx_with_an_ir_version_ort_reads(engine_dir):
    manifest = load_manifest(engine_dir)
    for entry in manifest.components.values():
        for relative in entry["precisions"].values():
            path = manifest.path(relative)
            onnx.checker.check_model(str(path))
            model = onnx.load(str(path), load_external_data=False)
            assert model.ir_version <= 10
            assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert set(manifest.components["unet"]["precisions"]) == {"fp32", "fp16"}
    assert set(manifest.components["vae_decoder"]["precisions"]) == {"fp32"}  # force_upcast: no fp16 VAE


def test_graphs_are_clean(engine_dir):
    assert_clean_graphs(engine_dir)


def assert_clean_graphs(engine_dir) -> None:
    """No dead nodes, and nothing left that depends on constants only (shape arithmetic is folded)."""
    manifest = load_manifest(engine_dir)
    for name in manifest.components:
        model = onnx.load(str(manifest.path(manifest.components[name]["precisions"]["fp32"])), load_external_data=False)
        graph = model.graph
        consumed = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        constants = {i.name for i in graph.initializer}
        for node in graph.node:
            assert any(o in consumed for o in node.output), f"{name}: dead node {node.name}"
            if node.op_type != "Constant" and node.input:
                assert not all(i in constants for i in node.input if i), f"{name}: unfolded {node.op_type} {node.name}"


def test_fp16_files_keep_timesteps_in_fp32(engine_dir):
    inputs = {i.name: i.type for i in session(engine_dir, "unet", "fp16").get_inputs()}
    assert inputs == {"sample": "tensor(float16)", "timestep": "tensor(float)",
                      "encoder_hidden_states": "tensor(float16)", "text_embeds": "tensor(float16)",
                      "time_ids": "tensor(float)"}


def test_text_encoders_match_transformers(engine_dir, tiny_base):
    """clip_l: hidden_states[-2]; clip_g: hidden_states[-2] and text_embeds, on real tokenizer output."""
    prompts = ["a photo of an astronaut riding a horse", "", "Café ✨ (masterpiece:1.2)"]
    for name, module, tokenizer in (("clip_l", tiny_base.clip_l, "tokenizer"), ("clip_g", tiny_base.clip_g, "tokenizer_2")):
        ids = ClipTokenizer.from_dir(engine_dir / tokenizer)(prompts).ids
        got = session(engine_dir, name).run(None, {"input_ids": ids})
        with torch.no_grad():
            out = module(torch.from_numpy(ids).long(), output_hidden_states=True)
        assert rel_l2(got[0], out.hidden_states[-2].numpy()) < FP32_TOL
        if name == "clip_g":
            assert rel_l2(got[1], out.text_embeds.numpy()) < FP32_TOL


@pytest.mark.parametrize("batch, width, height, windows", [(3, 320, 192, 1), (2, 264, 136, 3), (1, 512, 384, 2)])
def test_unets_match_diffusers_at_shapes_not_traced(engine_dir, tiny_base, tiny_refiner, batch, width, height, windows):
    g = torch.Generator().manual_seed(batch * 100 + width)
    for name, unet, n_ids in (("unet", tiny_base.unet, 6), ("unet_refiner", tiny_refiner.unet, 5)):
        c = unet.config
        pooled = c.projection_class_embeddings_input_dim - n_ids * c.addition_time_embed_dim
        feeds = {"sample": torch.randn(batch, 4, height // 8, width // 8, generator=g),
                 "timestep": torch.rand(batch, generator=g) * 999,
                 "encoder_hidden_states": torch.randn(batch, 77 * windows, c.cross_attention_dim, generator=g),
                 "text_embeds": torch.randn(batch, pooled, generator=g),
                 "time_ids": torch.tensor([[height, width, 0, 0, height, width][:n_ids]] * batch, dtype=torch.float32)}
        with torch.no_grad():
            want = unet(feeds["sample"], feeds["timestep"], encoder_hidden_states=feeds["encoder_hidden_states"],
                        added_cond_kwargs={"text_embeds": feeds["text_embeds"], "time_ids": feeds["time_ids"]}).sample
        got = session(engine_dir, name).run(None, {k: v.numpy() for k, v in feeds.items()})[0]
        assert got.shape == tuple(want.shape)
        assert rel_l2(got, want.numpy()) < FP32_TOL


@pytest.mark.parametrize("batch, width, height", [(3, 192, 320), (2, 136, 264)])
def test_vae_matches_diffusers(engine_dir, tiny_base, batch, width, height):
    g = torch.Generator().manual_seed(7)
    latent = torch.randn(batch, 4, height // 8, width // 8, generator=g)
    image = torch.rand(batch, 3, height, width, generator=g) * 2 - 1
    with torch.no_grad():
        decoded = tiny_base.vae.decode(latent).sample
        dist = tiny_base.vae.encode(image).latent_dist
    got = session(engine_dir, "vae_decoder").run(None, {"latent": latent.numpy()})[0]
    assert got.shape == (batch, 3, height, width) and rel_l2(got, decoded.numpy()) < FP32_TOL
    mean, logvar = session(engine_dir, "vae_encoder").run(None, {"image": image.numpy()})
    assert rel_l2(mean, dist.mean.numpy()) < FP32_TOL and rel_l2(logvar, dist.logvar.numpy()) < FP32_TOL


def test_manifest_hashes_match_and_exports_are_reproducible(engine_dir, tmp_path):
    manifest = load_manifest(engine_dir)
    manifest.check_files(hashes=True)
    listed = set(manifest.data["files"])
    on_disk = {p.relative_to(engine_dir).as_posix() for p in engine_dir.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk
    again = tmp_path / "again"
    export_engine_dir("tiny:base", again, refiner="tiny:refiner", progress=False)
    assert load_manifest(again).data["files"] == manifest.data["files"]


def test_tampered_file_is_named(engine_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(engine_dir, copy)
    target = copy / "onnx" / "unet" / "model.onnx"
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(UserError, match="unet/model.onnx does not match its sha256"):
        load_manifest(copy).check_files()
    target.write_bytes(bytes(data[:100]))
    with pytest.raises(UserError, match="truncated"):
        load_manifest(copy).check_files(hashes=False)


def test_components_subset_and_a_replacement_vae(tiny_base, tmp_path):
    vae_dir = tmp_path / "vae-fp16-safe"
    tiny_base.vae.save_pretrained(vae_dir)
    config = json.loads((vae_dir / "config.json").read_text())
    config["force_upcast"] = False  # as fp16-safe SDXL VAEs declare
    (vae_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "engine"
    export_engine_dir("tiny:base", out, vae=str(vae_dir), components=["vae_decoder", "clip_l"], progress=False)
    manifest = load_manifest(out)
    assert set(manifest.components) == {"vae_decoder", "clip_l"}
    assert set(manifest.components["vae_decoder"]["precisions"]) == {"fp32", "fp16"}
    assert manifest.data["sources"]["vae"]["spec"] == str(vae_dir)


def test_inpainting_unet_exports_nine_channels(tiny_base, tmp_path):
    folder = tmp_path / "inpaint"
    tiny_base.save_pretrained(folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["in_channels"] = 9
    import diffusers

    shutil.rmtree(folder / "unet")
    diffusers.UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    out = tmp_path / "engine"
    export_engine_dir(str(folder), out, components=["unet"], precision="fp32", verify=True, progress=False)
    manifest = load_manifest(out)
    assert manifest.components["unet"]["inputs"][0]["shape"] == ["B", 9, "h", "w"]
    assert manifest.data["pipelines"]["base"]["unet_in_channels"] == 9


# --- bad input ------------------------------------------------------------------------------------------------

def test_existing_non_empty_out_needs_force(tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--force"):
        export_engine_dir("tiny:base", out, components=["clip_l"], progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    export_engine_dir("tiny:base", out, components=["clip_l"], force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_force_over_an_engine_directory_another_command_is_changing_is_refused_before_the_work(tmp_path):
    """`export --force` takes the directory's lock (an `optimize` or `build` running there holds it): refused at once,
    the directory as it was; and while an export replaces a directory, an `optimize` of it is refused (before, the
    export went ahead and the optimize crashed writing into the replaced directory)."""
    from sdxl_trt.runtime import engines as eng

    out = tmp_path / "engine"
    export_engine_dir("tiny:base", out, components=["clip_l"], progress=False)
    manifest = (out / "manifest.json").read_bytes()
    with eng.locked(out):  # as `sdxl-trt optimize` holds it
        with pytest.raises(UserError, match="another sdxl-trt command .* is changing this engine directory"):
            export_engine_dir("tiny:base", out, components=["clip_l"], force=True, progress=False)
    assert (out / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]  # no temporary folder left

    seen = []

    def optimize_meanwhile(*args, **kwargs):
        with pytest.raises(UserError, match="is changing this engine directory"):
            with eng.locked(out):
                pass
        seen.append(True)
        return real(*args, **kwargs)

    import sdxl_trt.export.engine_dir as engine_dir

    real = engine_dir.export_onnx
    engine_dir.export_onnx = optimize_meanwhile
    try:
        export_engine_dir("tiny:base", out, components=["clip_l"], force=True, progress=False)
    finally:
        engine_dir.export_onnx = real
    assert seen and (out / "manifest.json").is_file()


def test_a_mount_point_as_out_is_refused_before_the_work(tmp_path, monkeypatch):
    """A Docker volume as --out: the finished directory could not be renamed over it (EBUSY, after the whole export);
    refused at once, with or without --force, naming a folder inside it instead."""
    import os

    out = tmp_path / "volume"
    out.mkdir()  # empty: no --force needed
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: str(p) == str(out) or real(p))
    for force in (False, True):
        with pytest.raises(UserError, match=r"is a mount point, which cannot be replaced as a whole; export into a "
                                            r"folder inside it \(e.g. --out .*volume/sdxl"):
            export_engine_dir("tiny:base", out, components=["clip_l"], force=force, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"] and not any(out.iterdir())


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(components=["unet", "text_encoder"]), "unknown component 'text_encoder'"),
    (dict(refiner="tiny:base"), "is an SDXL base model, not a refiner"),
    (dict(precision="int8"), "--precision"),
])
def test_bad_arguments(tmp_path, kwargs, pattern):
    with pytest.raises(UserError, match=pattern):
        export_engine_dir("tiny:base", tmp_path / "engine", progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_refiner_as_model_with_refiner_flag(tmp_path):
    with pytest.raises(UserError, match="already a refiner"):
        export_engine_dir("tiny:refiner", tmp_path / "e", refiner="tiny:refiner", progress=False)


def test_unwritable_out(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot create folder"):
        export_engine_dir("tiny:base", tmp_path / "file" / "engine", components=["clip_l"], progress=False)
    if Path("/sys/kernel").is_dir():  # sysfs refuses new entries even to root: refused before any work
        with pytest.raises(UserError, match="cannot write in /sys"):
            export_engine_dir("tiny:base", "/sys/sdxl-trt-engine", components=["clip_l"], progress=False)


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    import sdxl_trt.export.engine_dir as engine_dir_module

    real = engine_dir_module.export_onnx
    calls = []

    def failing(component, folder, precision):
        calls.append(component.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C would, in the middle of the second component
        return real(component, folder, precision)

    monkeypatch.setattr(engine_dir_module, "export_onnx", failing)
    with pytest.raises(KeyboardInterrupt):
        export_engine_dir("tiny:base", tmp_path / "engine", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_refiner_only_export(tmp_path):
    out = tmp_path / "refiner"
    export_engine_dir("tiny:refiner", out, precision="fp32", progress=False)
    manifest = load_manifest(out)
    assert set(manifest.components) == {"clip_g", "unet_refiner", "vae_decoder", "vae_encoder"}
    assert list(manifest.data["pipelines"]) == ["refiner"]
    assert not (out / "tokenizer").exists() and (out / "tokenizer_2").is_dir()


def test_large_model_path_external_data(tmp_path, monkeypatch):
    """Weights in `model.onnx.data` (as full-size models have them), and an fp16 variant converted tensor by tensor
    from that file, verified like any other."""
    import sdxl_trt.export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_ABOVE", 0)
    out = tmp_path / "engine"
    report = export_engine_dir("tiny:base", out, components=["unet", "clip_g"], verify=True, progress=False)
    assert any("unet fp16" in line for line in report.verify_lines)
    manifest = load_manifest(out)
    for name in ("unet", "clip_g"):
        files = manifest.components[name]["files"]
        assert files["fp32"][1].endswith("model.onnx.data") and files["fp16"][1].endswith("model.fp16.onnx.data")
        graph, weights = ((out / f).stat().st_size for f in files["fp32"])
        assert graph < weights / 4  # the graph and small constants; the weights are in .data
    manifest.check_files()


def test_duplicate_casts_of_older_onnxruntime_converters_are_shared():
    """onnxruntime ≤ 1.31's float16 converter writes one Cast per blocked consumer under one output name."""
    import onnx
    from onnx import TensorProto, helper

    from sdxl_trt.export.fp16 import share_duplicate_casts

    cast = dict(to=TensorProto.FLOAT)
    nodes = [helper.make_node("Cast", ["x"], ["x_cast_to_fp32"], name="c1", **cast),
             helper.make_node("Sin", ["x_cast_to_fp32"], ["s"]),
             helper.make_node("Cast", ["x"], ["x_cast_to_fp32"], name="c2", **cast),
             helper.make_node("Cos", ["x_cast_to_fp32"], ["c"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
                              [helper.make_tensor_value_info("s", TensorProto.FLOAT, [2]),
                               helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(onnx.checker.ValidationError, match="single static assignment"):
        onnx.checker.check_model(model)
    share_duplicate_casts(model)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Cast", "Sin", "Cos"]


def test_every_linear_weight_is_named_after_its_parameter(engine_dir, tiny_base):
    """Constant folding leaves MatMul weights anonymous (`onnx::MatMul_…`); the export names each after the Linear
    it holds, + ".T" (transposed), so that refit and LoRA find them: every attention / feed-forward / CLIP projection
    of the tiny models, in the fp32 and fp16 files, with the parameter's values."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    manifest = load_manifest(engine_dir)
    for component, module, prefix in (("unet", tiny_base.unet, "unet."), ("clip_l", tiny_base.clip_l, "model."),
                                      ("clip_g", tiny_base.clip_g, "model.")):
        linears = {name: m for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
        assert len(linears) > 10
        for precision in ("fp32", "fp16"):
            path = manifest.path(manifest.components[component]["precisions"][precision])
            graph = onnx.load(str(path)).graph
            weights = {t.name: t for t in graph.initializer}
            for name, linear in linears.items():
                if linear.bias is not None and f"{prefix}{name}.bias" not in weights:
                    continue  # not in the graph at all (CLIP's last layer: the penultimate state is the output)
                key = f"{prefix}{name}.weight.T"
                if key not in weights:  # a Linear ONNX keeps as Gemm takes its weight untransposed
                    key = f"{prefix}{name}.weight"
                assert key in weights, (component, precision, name)
                value = numpy_helper.to_array(weights[key]).astype(np.float32)
                expected = linear.weight.detach().numpy()
                expected = expected.T if key.endswith(".T") else expected
                np.testing.assert_allclose(value, expected, rtol=1e-3, atol=1e-3)  # fp16 files: rounded


def test_weights_are_named_by_their_whole_value_not_by_a_sample(tmp_path):
    """name_weights files parameters by a sample of their values (no hash of every weight): a weight whose sample
    matches a parameter's but whose values differ elsewhere is not given its name; a value two parameters share
    stays anonymous; a transposed weight gets ".T"."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from sdxl_trt.export.onnx_export import fingerprint, name_weights

    torch.manual_seed(0)
    module = torch.nn.ModuleDict({"a": torch.nn.Linear(96, 80, bias=False), "b": torch.nn.Linear(96, 80, bias=False),
                                  "c": torch.nn.Linear(96, 80, bias=False), "d": torch.nn.Linear(96, 80, bias=False)})
    with torch.no_grad():
        module["d"].weight.copy_(module["c"].weight)  # c and d share a value
    a, b, c = (module[k].weight.detach().numpy() for k in "abc")
    near_b = b.copy()
    near_b.flat[2] += 1.0  # not a sampled position of 80 × 96 values (4096 samples over 7680): same fingerprint
    assert fingerprint(near_b) == fingerprint(b) and fingerprint(a.T) == fingerprint(np.ascontiguousarray(a.T))
    values = {"onnx::MatMul_1": np.ascontiguousarray(a.T), "onnx::MatMul_2": b, "onnx::MatMul_3": near_b,
              "onnx::MatMul_4": c}
    graph = helper.make_graph([helper.make_node("Identity", [name], [f"out{i}"]) for i, name in enumerate(values)],
                              "g", [], [helper.make_tensor_value_info(f"out{i}", onnx.TensorProto.FLOAT, None)
                                        for i in range(len(values))],
                              [numpy_helper.from_array(v, name) for name, v in values.items()])
    model = helper.make_model(graph)
    assert name_weights(model, module, tmp_path) == 2
    assert [t.name for t in model.graph.initializer] == ["a.weight.T", "b.weight", "onnx::MatMul_3", "onnx::MatMul_4"]
    assert [n.input[0] for n in model.graph.node] == ["a.weight.T", "b.weight", "onnx::MatMul_3", "onnx::MatMul_4"]
