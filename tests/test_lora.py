"""LoRA adapters on the runtime (runtime/lora.py) against diffusers' `load_lora_weights` + `fuse_lora` on the tiny
models, from files in the formats users have: diffusers/PEFT (`unet.….lora_A.weight`, with a convolution LoRA and
a Gemm layer), kohya with the original checkpoints' (SGM) UNet names and alphas, and text-encoder-only PEFT files.
Both sides start from the same latents; tolerance: final latents rel-L2 ≤ 1e-3 (as tests/test_pipeline.py), and each
adapter must move the result (rel-L2 > 0.05 from the model without it), so the comparison cannot pass vacuously."""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from original_layout import UNET_PREFIX, _convert_unet  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from sdxl_trt.export.reference import diffusers_pipeline  # noqa: E402
from sdxl_trt.export.verify import rel_l2  # noqa: E402
from sdxl_trt.runtime import Pipeline, UserError  # noqa: E402
from sdxl_trt.runtime.cli import main  # noqa: E402
from sdxl_trt.runtime.lora import Adapter, parse_spec  # noqa: E402

TOL = 1e-3
KW = dict(height=64, width=96, num_inference_steps=6, guidance_scale=5.0)
PROMPTS = ["a photo of a cat", "a red bicycle"]

UNET_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def lora_pair(weight: torch.Tensor, rank: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random (down, up) for a linear [out, in] or convolution [out, in, kh, kw] weight, large enough to matter."""
    out, inp = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    down = rng.standard_normal((rank, inp, *kernel)) / np.sqrt(inp * max(1, np.prod(kernel)))
    up = rng.standard_normal((out, rank, *((1, 1) if kernel else ()))) * 0.3 / np.sqrt(rank)
    return down.astype(np.float32), up.astype(np.float32)


def unet_targets(unet) -> list[str]:
    return [name for name, _ in unet.named_modules() if name.endswith(UNET_MODULES) and "transformer_blocks" in name]


@pytest.fixture(scope="module")
def lora_files(tiny_base, tmp_path_factory):
    """Three adapter files for the tiny base."""
    root = tmp_path_factory.mktemp("lora")
    unet, clip_l, clip_g = tiny_base.unet, tiny_base.clip_l, tiny_base.clip_g
    rng = np.random.default_rng(7)

    peft = {}  # diffusers / PEFT names, no alphas; a convolution (LoCon) and the time embedding's Gemm too
    for module in [*unet_targets(unet), "down_blocks.0.resnets.0.conv1", "time_embedding.linear_1"]:
        down, up = lora_pair(unet.get_submodule(module).weight, 4, rng)
        peft[f"unet.{module}.lora_A.weight"], peft[f"unet.{module}.lora_B.weight"] = down, up
    save_file(peft, root / "unet_peft.safetensors")

    # kohya: the original checkpoints' UNet names (from tests/original_layout.py, not the runtime's mapping), alphas
    keys = list(unet.state_dict())
    fake = types.SimpleNamespace(config=unet.config,
                                 state_dict=lambda: {k: torch.tensor(float(i)) for i, k in enumerate(keys)})
    sgm = {keys[int(v)]: k.removeprefix(UNET_PREFIX) for k, v in _convert_unet(fake).items()}
    kohya = {}
    for module in unet_targets(unet)[::2]:
        flat = "lora_unet_" + sgm[module + ".weight"].removesuffix(".weight").replace(".", "_")
        down, up = lora_pair(unet.get_submodule(module).weight, 8, rng)
        kohya[f"{flat}.lora_down.weight"], kohya[f"{flat}.lora_up.weight"] = down.astype(np.float16), up.astype(np.float16)
        kohya[f"{flat}.alpha"] = np.array(4.0, np.float16)
    # OpenCLIP-G's attention (diffusers recognises kohya text-encoder files by their out_proj); CLIP-L: text_peft
    for module in [n for n, _ in clip_g.named_modules() if n.endswith(TEXT_MODULES[:4])]:
        down, up = lora_pair(clip_g.get_submodule(module).weight, 4, rng)
        flat = f"lora_te2_{module.replace('.', '_')}"
        kohya[f"{flat}.lora_down.weight"], kohya[f"{flat}.lora_up.weight"] = down, up
        kohya[f"{flat}.alpha"] = np.array(2.0, np.float32)
    save_file(kohya, root / "kohya_sgm.safetensors")

    text = {}  # module paths as this transformers names them (5.x drops CLIPTextModel's `text_model.`)
    for prefix, model in (("text_encoder", clip_l), ("text_encoder_2", clip_g)):
        for module in [n for n, _ in model.named_modules() if n.endswith(TEXT_MODULES)]:
            down, up = lora_pair(model.get_submodule(module).weight, 4, rng)
            text[f"{prefix}.{module}.lora_A.weight"], text[f"{prefix}.{module}.lora_B.weight"] = down, up * 3
    save_file(text, root / "text_peft.safetensors")
    return root


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return Pipeline.load(tiny_engine)


def latents():
    return np.random.default_rng(5).standard_normal((len(PROMPTS), 4, KW["height"] // 8, KW["width"] // 8)) \
        .astype(np.float32)


def ours(pipe, loras) -> np.ndarray:
    pipe.set_loras(loras)
    return pipe(PROMPTS, seed=0, latents=latents(), output_type="latent", progress=False, **KW).array


def theirs(tiny_base, adapters: list[tuple[str, float]]) -> np.ndarray:
    """diffusers on its own copy of the tiny model: load_lora_weights each adapter, set their scales, fuse_lora."""
    pytest.importorskip("peft")  # diffusers' LoRA loading (the GPU machine has none: the GPU test runs without it)
    model = copy.copy(tiny_base)
    for part in ("unet", "clip_l", "clip_g", "vae"):
        setattr(model, part, copy.deepcopy(getattr(tiny_base, part)))
    reference = diffusers_pipeline(model)
    names = []
    for i, (path, _) in enumerate(adapters):
        reference.load_lora_weights(str(path), adapter_name=f"a{i}")
        names.append(f"a{i}")
    reference.set_adapters(names, adapter_weights=[scale for _, scale in adapters])
    reference.fuse_lora(adapter_names=names)
    reference.unload_lora_weights()  # the fused weights stay; diffusers' LoRA layers go
    with torch.inference_mode():
        out = reference(prompt=PROMPTS, latents=torch.from_numpy(latents()), output_type="latent", **KW).images
    return out.numpy()


@pytest.mark.parametrize("case", [
    [("unet_peft", 0.8)],                              # one adapter (PEFT, with a convolution and a Gemm layer)
    [("unet_peft", 0.7), ("kohya_sgm", 1.3)],          # two stacked, different scales, kohya SGM names + alphas
    [("text_peft", 1.0)],                              # text encoders only
], ids=["one", "stacked", "text-encoders"])
def test_lora_matches_diffusers_fuse_lora(pipe, tiny_base, lora_files, case):
    adapters = [(lora_files / f"{name}.safetensors", scale) for name, scale in case]
    base = ours(pipe, None)
    got = ours(pipe, adapters)
    expected = theirs(tiny_base, adapters)
    print(f"{'+'.join(n for n, _ in case)}: final latents rel-L2 {rel_l2(got, expected):.1e} against diffusers, "
          f"{rel_l2(got, base):.2f} from the base")
    assert rel_l2(got, expected) <= TOL, rel_l2(got, expected)
    assert rel_l2(got, base) > 0.05  # the adapters changed the result
    assert rel_l2(expected, base) > 0.05


def test_switching_adapters_equals_a_fresh_process(pipe, tiny_engine, lora_files):
    a = [(lora_files / "unet_peft.safetensors", 1.0)]
    b = [f"{lora_files / 'kohya_sgm.safetensors'}:0.5", str(lora_files / "text_peft.safetensors")]
    sequence = [ours(pipe, a), ours(pipe, b), ours(pipe, None), ours(pipe, a)]
    for loras, got in zip([a, b, None, a], sequence):
        fresh = Pipeline.load(tiny_engine, loras=loras)
        np.testing.assert_array_equal(got, fresh(PROMPTS, seed=0, latents=latents(), output_type="latent",
                                                 progress=False, **KW).array)
    assert [adapter.scale for adapter in pipe.loras] == [1.0]


def test_clip_l_names_with_and_without_text_model(pipe, lora_files, tmp_path):
    """CLIP-L LoRAs name modules `text_model.encoder…` (transformers < 5, kohya's lora_te1_text_model_…) or
    `encoder…` (transformers 5): all three spellings merge the same weights."""
    from safetensors.numpy import load_file

    text = {k: v for k, v in load_file(lora_files / "text_peft.safetensors").items() if k.startswith("text_encoder.")}
    module_keys = {k.removeprefix("text_encoder.").removeprefix("text_model.") for k in text}
    old = {f"text_encoder.text_model.{k}": text[f"text_encoder.{k}"] if f"text_encoder.{k}" in text else
           text[f"text_encoder.text_model.{k}"] for k in module_keys}
    kohya = {}
    for k, v in old.items():
        module, _, part = k.removeprefix("text_encoder.").rpartition(".lora_")
        kohya[f"lora_te1_{module.replace('.', '_')}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = v
    merged = []
    for name, tensors in (("new", text), ("old", old), ("kohya", kohya)):
        save_file(tensors, tmp_path / f"{name}.safetensors")
        pipe.set_loras([tmp_path / f"{name}.safetensors"])
        session = pipe.backend.session("clip_l")
        merged.append({n: np.asarray(v.numpy()) for n, v in session._overrides.items()})
    pipe.set_loras(None)
    # the last CLIP-L layer is not in the export (SDXL reads the penultimate hidden states): its adapters are skipped
    assert len(merged[0]) == len(module_keys) // 2 - len(TEXT_MODULES) > 0
    for other in merged[1:]:
        assert other.keys() == merged[0].keys()
        for n in other:
            np.testing.assert_array_equal(other[n], merged[0][n])


def test_backends_without_overrides_say_so(pipe, lora_files):
    other = copy.copy(pipe)
    other.backend = types.SimpleNamespace(name="stand-in")
    with pytest.raises(UserError, match="not supported on stand-in"):
        other.set_loras([lora_files / "unet_peft.safetensors"])
    other.set_loras(None)  # nothing to apply: fine


def test_merged_weights_ride_on_the_shared_weights(tiny_engine, lora_files):
    """ort-cuda's sessions take LoRA merges as a WeightSet: the file's shared weights with the merged ones replaced, in
    a buffer of their own on the device (ONNX Runtime ignores host-memory overrides for weights it places on the GPU,
    seen on the H100). Checked here on the host: a session on the WeightSet computes what a session with the
    adapters as host overrides computes, and only the adapted weights leave the shared buffer; the GPU test below
    checks the effect on ort-cuda."""
    from sdxl_trt.runtime.backends import OrtSession
    from sdxl_trt.runtime.lora import Adapters, as_adapters
    from sdxl_trt.runtime.manifest import load_manifest
    from sdxl_trt.runtime.weights import SharedWeights

    manifest = load_manifest(tiny_engine)
    adapters = Adapters()
    adapters.set(as_adapters([lora_files / "unet_peft.safetensors"]), manifest)
    path = manifest.path(manifest.components["unet"]["precisions"]["fp32"])
    merged = adapters.overrides("unet", path)
    base = SharedWeights(path, None)
    weights = base.with_overrides(merged)
    assert set(weights.values) >= set(merged) and len(merged) >= 20
    moved = {name for name in weights.values if weights.values[name] is not base.values.get(name)}
    assert moved == set(merged)
    rng = np.random.default_rng(0)
    feeds = dict(sample=rng.standard_normal((2, 4, 8, 12)).astype(np.float32), timestep=np.array([500.0] * 2, np.float32),
                 encoder_hidden_states=rng.standard_normal((2, 77, 96)).astype(np.float32),
                 text_embeds=rng.standard_normal((2, 64)).astype(np.float32),
                 time_ids=np.array([[64, 96, 0, 0, 64, 96]] * 2, np.float32))
    shared = OrtSession(manifest, "unet", "fp32", ["CPUExecutionProvider"], shared=weights).run(**feeds)["noise_pred"]
    host = OrtSession(manifest, "unet", "fp32", ["CPUExecutionProvider"], adapters=adapters).run(**feeds)["noise_pred"]
    plain = OrtSession(manifest, "unet", "fp32", ["CPUExecutionProvider"]).run(**feeds)["noise_pred"]
    assert rel_l2(shared, host) < 1e-5 and rel_l2(shared, plain) > 0.05


def test_deltas_are_formed_in_the_layout_the_file_stores():
    """Layer.delta writes up @ down straight into the stored layout (MatMul's [in, out], NHWC convolutions) with the
    scales on the small factor: the same numbers as forming [out, in] and rearranging it."""
    from sdxl_trt.runtime.lora import Layer

    rng = np.random.default_rng(3)
    linear = Layer(down=rng.standard_normal((4, 24)).astype(np.float32),
                   up=rng.standard_normal((40, 4)).astype(np.float32), alpha=2.0)
    reference = 0.7 * 2.0 / 4 * (linear.up.astype(np.float64) @ linear.down)
    np.testing.assert_allclose(linear.delta(0.7), reference, rtol=1e-5, atol=1e-6)
    transposed = linear.delta(0.7, ".weight.T")
    assert transposed.flags.c_contiguous and transposed.shape == (24, 40)
    np.testing.assert_allclose(transposed, reference.T, rtol=1e-5, atol=1e-6)
    conv = Layer(down=rng.standard_normal((4, 8, 3, 3)).astype(np.float32),
                 up=rng.standard_normal((16, 4, 1, 1)).astype(np.float32))
    own = conv.delta(1.5)
    assert own.shape == (16, 8, 3, 3)
    np.testing.assert_allclose(own, 1.5 * np.einsum("or,rikl->oikl", conv.up[:, :, 0, 0], conv.down), rtol=1e-5,
                               atol=1e-5)
    nhwc = conv.delta(1.5, ".weight_nhwc")
    assert nhwc.flags.c_contiguous and nhwc.shape == (16, 3, 3, 8)
    np.testing.assert_allclose(nhwc, own.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


def test_adapter_spec_parsing():
    assert parse_spec("a/b.safetensors:0.5") == Adapter(Path("a/b.safetensors"), 0.5)
    assert parse_spec("a/b.safetensors").scale == 1.0
    assert parse_spec("C:/x/y.safetensors").path.as_posix() == "C:/x/y.safetensors"  # not a scale
    assert parse_spec("odd:name.safetensors:-1").scale == -1.0


def bad_file(root, name: str, tensors: dict) -> str:
    save_file(tensors, root / name)
    return str(root / name)


def test_bad_adapters_fail_with_one_line_naming_the_key(pipe, tiny_base, lora_files, tmp_path):
    q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    w = tiny_base.unet.get_submodule(q.removeprefix("unet.")).weight
    rng = np.random.default_rng(0)
    down, up = lora_pair(w, 4, rng)
    cases = {
        str(tmp_path / "missing.safetensors"): "no such file",
        bad_file(tmp_path, "foreign.safetensors", {"model.layers.0.weight": down}): "model.layers.0.weight",
        bad_file(tmp_path, "other-arch.safetensors", {
            "unet.down_blocks.7.attentions.0.proj_in.lora_A.weight": down,
            "unet.down_blocks.7.attentions.0.proj_in.lora_B.weight": up}): "down_blocks.7.attentions.0.proj_in",
        bad_file(tmp_path, "rank.safetensors", {f"{q}.lora_A.weight": down, f"{q}.lora_B.weight": up[:, :3]}):
            "ranks do not match",
        bad_file(tmp_path, "shape.safetensors", {f"{q}.lora_A.weight": down[:, :-1], f"{q}.lora_B.weight": up}):
            "changes a weight of shape",
        bad_file(tmp_path, "half.safetensors", {f"{q}.lora_A.weight": down}): "no up/lora_B",
        bad_file(tmp_path, "int.safetensors", {f"{q}.lora_A.weight": down.astype(np.int32),
                                               f"{q}.lora_B.weight": up}): "F32, F16 or BF16",
        bad_file(tmp_path, "loha.safetensors", {"lora_unet_x.hada_w1_a": down}): "LyCORIS",
        bad_file(tmp_path, "nan.safetensors", {f"{q}.lora_A.weight": np.where(down == down.max(), np.nan, down),
                                               f"{q}.lora_B.weight": up}): "attn1.to_q \\(unet\\) hold NaN or Inf",
        str(tmp_path): "is a folder; name the adapter's .safetensors file in it",
    }
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 3)
    cases[str(tmp_path / "garbage.safetensors")] = "not a safetensors file"
    for spec, message in cases.items():
        with pytest.raises(UserError, match=message):
            pipe.set_loras([spec])
            pipe("a cat", seed=0, output_type="latent", progress=False, **{**KW, "num_inference_steps": 1})
    pipe.set_loras(None)
    with pytest.raises(UserError, match="finite"):
        pipe.set_loras([(lora_files / "unet_peft.safetensors", float("nan"))])


def test_generate_cli_applies_adapters_and_records_them(tiny_engine, lora_files, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "img.png"
    spec = f"{lora_files / 'unet_peft.safetensors'}:0.6"
    args = ["generate", str(tiny_engine), "a cat", "--size", "64x64", "--steps", "2", "--seed", "1", "--out"]
    assert main([*args, str(out), "--lora", spec, "--lora", str(lora_files / "text_peft.safetensors")]) == 0
    loras = json.loads(Image.open(out).text["sdxl-trt"])["loras"]
    assert [(Path(a["file"]).name, a["scale"]) for a in loras] == [("unet_peft.safetensors", 0.6),
                                                                   ("text_peft.safetensors", 1.0)]
    plain = tmp_path / "plain.png"
    assert main([*args, str(plain)]) == 0
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(plain)))
    capsys.readouterr()
    assert main([*args, str(tmp_path / "x.png"), "--lora", str(tmp_path / "nowhere.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "nowhere.safetensors: no such file" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_server_applies_the_adapters_a_request_names(tiny_engine, lora_files, tmp_path):
    """`serve --lora-dir`: requests name adapters; those with other adapters are not merged with them, and each
    image is the one the Python API gives for the same adapters and seed."""
    import base64
    import io
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    pytest.importorskip("fastapi")
    from PIL import Image
    from test_server import Server

    shutil.copy(lora_files / "unet_peft.safetensors", tmp_path / "style.safetensors")
    shutil.copy(lora_files / "text_peft.safetensors", tmp_path / "words.safetensors")
    server = Server(tiny_engine, "--lora-dir", str(tmp_path), "--max-wait-ms", "300")
    try:
        choices = [None, [{"name": "style", "scale": 0.8}], [{"name": "style", "scale": 0.8}, {"name": "words"}], None]
        bodies = [{"prompt": "a lighthouse", "size": "64x64", "steps": 3, "seed": 40 + i,
                   **({"lora": c} if c else {})} for i, c in enumerate(choices)]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(server.post, bodies))
        for (status, answer, _), body in zip(answers, bodies):
            assert status == 200, answer
            loras = [(tmp_path / f"{c['name']}.safetensors", c.get("scale", 1.0)) for c in body.get("lora", [])]
            expected = Pipeline.load(tiny_engine, loras=loras)(body["prompt"], height=64, width=64,
                                                                num_inference_steps=3, seed=body["seed"],
                                                                progress=False).images[0]
            got = Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"])))
            assert np.abs(np.asarray(got, int) - np.asarray(expected, int)).max() <= 2
        for bad, says in (([{"name": "nope"}], "no such adapter"), ([{"name": "../style"}], "names of"),
                          ([{"name": "style", "scale": 1e999}], "from -20 to 20"),
                          ([{"name": "style", "scale": 1e30}], "from -20 to 20")):  # refused with the request
            status, answer, _ = server.post({"prompt": "a cat", "size": "64x64", "steps": 2, "lora": bad})
            assert status == 400 and says in answer["error"]["message"], answer
    finally:
        server.stop()


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", ["step", "off"])
def test_lora_on_ort_cuda_matches_ort_cpu(tiny_optimized, tiny_engine, lora_files, cuda_graphs):
    """The overrides on the optimized fp16 files (NHWC convolution weights, fused attention's projections) and on
    the per-shape CUDA-graph sessions: the same adapters give what ort-cpu gives on the fp32 files."""
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    loras = [(lora_files / "unet_peft.safetensors", 0.7), (lora_files / "kohya_sgm.safetensors", 1.3),
             (lora_files / "text_peft.safetensors", 1.0)]
    cuda = Pipeline.load(tiny_optimized, backend="ort-cuda", cuda_graphs=cuda_graphs, buckets=["192x256"])
    cpu = Pipeline.load(tiny_engine, loras=loras)
    kw = dict(height=256, width=192, num_inference_steps=8, seed=11, output_type="latent", progress=False)
    base = cuda("a red bicycle", **kw).array
    cuda.set_loras(loras)
    got = cuda("a red bicycle", **kw).array
    error = rel_l2(got, cpu("a red bicycle", **kw).array)
    print(f"LoRA on ort-cuda ({cuda_graphs}): final latents rel-L2 {error:.2e} against ort-cpu")
    assert error < 1e-2 and rel_l2(got, base) > 0.05
    cuda.set_loras(None)
    assert rel_l2(cuda("a red bicycle", **kw).array, base) < 5e-3  # the fused files' run-to-run noise


def test_lora_merges_each_module_into_the_optimized_file_that_holds_it(tiny_optimized, tiny_optimized_whole,
                                                                        lora_files):
    """An optimized UNet's weights are in two files (its context file holds the cross-attentions' K/V projections,
    export/context_projections.py): each adapted module is merged into the file that has it, with the values a merge
    into the whole file gives, none lost and none twice; one file alone refuses the modules only the other holds."""
    from sdxl_trt.runtime.lora import Adapters
    from sdxl_trt.runtime.manifest import load_manifest

    adapter = (Adapter(lora_files / "unet_peft.safetensors", 0.7), Adapter(lora_files / "kohya_sgm.safetensors", 1.3))
    split, whole = load_manifest(tiny_optimized), load_manifest(tiny_optimized_whole)
    record = split.components["unet"]["optimized"]["cuda"]
    unet, context = split.path(record["path"]), split.path(record["context"])
    adapters, reference = Adapters(), Adapters()
    adapters.set(adapter, split)
    reference.set(adapter, whole)
    main_part = adapters.overrides("unet", unet, others=(context,))
    context_part = adapters.overrides("unet", context, others=(unet,))
    assert context_part and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in context_part)
    assert not main_part.keys() & context_part.keys()
    merged = reference.overrides("unet", whole.path(whole.components["unet"]["optimized"]["cuda"]["path"]))
    assert merged.keys() == main_part.keys() | context_part.keys()
    for name, value in {**main_part, **context_part}.items():
        np.testing.assert_array_equal(value, merged[name])
    with pytest.raises(UserError, match="matches no layer"):
        adapters.overrides("unet", unet)
