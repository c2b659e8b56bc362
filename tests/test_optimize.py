"""`sdxl-trt optimize --target cuda`: attention fused into one node (checked against torch's SDPA on ONNX Runtime
CPU), ONNX Runtime's transformer fusions counted, files recorded in the manifest, re-runs cached. The fused files'
numbers on the GPU are checked in test_ort_cuda.py (GroupNorm, NhwcConv and BiasSplitGelu have no CPU kernels)."""

from __future__ import annotations

import collections
import functools
import json
import logging
import shutil
from unittest import mock

import numpy as np
import onnx
import pytest

from sdxl_trt.export.fuse_attention import fuse_attention
from sdxl_trt.runtime.cli import main
from sdxl_trt.runtime.manifest import load_manifest

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")


def op_counts(model) -> collections.Counter:
    """Nodes per operator type of an ONNX model or the file at a path."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return collections.Counter(n.op_type for n in model.graph.node)


# Fused attention (ONNX Runtime CPU MultiHeadAttention) against diffusers' Attention, fp32 both sides: only the
# order of the sums differs: measured max abs difference 9e-8 (default scale) and 1.2e-7 (scale 0.3) on outputs of
# magnitude ~0.5. Bounds rtol 1e-4 / atol 1e-5 (~100x) leave room for other CPUs' kernels and stay far below one
# notch: the scale 10 % off moves the output by max 1.7e-2 (test_attention_bounds_catch_a_wrong_scale).
ATTN_RTOL, ATTN_ATOL = 1e-4, 1e-5


class Attention(torch.nn.Module):
    """diffusers' own `Attention` module (self- or cross-attention, separate Q/K/V projections) run by its
    AttnProcessor2_0 (SDPA), as SDXL's transformer blocks use it; wrapped only to take the context positionally.

    AttnProcessor2_0 always leaves SDPA's default scale 1/sqrt(d) and ignores a set `attn.scale`. For a non-default
    scale, the graph to fuse is traced with SDPA given `scale=attn.scale`, and `reference` computes the expected
    output with diffusers' classic AttnProcessor (baddbmm with alpha=attn.scale, softmax, bmm), which honours it."""

    def __init__(self, dim: int, context_dim: int, heads: int, scale: float | None, bias: bool):
        super().__init__()
        from diffusers.models.attention_processor import Attention as DiffusersAttention
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.attn = DiffusersAttention(query_dim=dim, cross_attention_dim=context_dim, heads=heads,
                                       dim_head=dim // heads, bias=bias, out_bias=True, processor=AttnProcessor2_0())
        self.custom_scale = scale is not None
        if self.custom_scale:
            self.attn.scale = scale

    def forward(self, x, context):
        if not self.custom_scale:
            return self.attn(x, encoder_hidden_states=context)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention",
                               functools.partial(sdpa, scale=self.attn.scale)):
            return self.attn(x, encoder_hidden_states=context)

    def reference(self, x, context):
        from diffusers.models.attention_processor import AttnProcessor

        if not self.custom_scale:
            return self.attn(x, encoder_hidden_states=context)
        return AttnProcessor()(self.attn, x, encoder_hidden_states=context)


@pytest.mark.parametrize("bias", [False, True])  # SDXL's to_q/k/v have no bias; with one, the fusion must keep it
@pytest.mark.parametrize("scale", [None, 0.3])
def test_fused_attention_matches_diffusers_attention(tmp_path, scale, bias):
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    module = Attention(64, 48, heads=4, scale=scale, bias=bias).eval()
    x, context = torch.randn(2, 37, 64), torch.randn(2, 11, 48)
    path = tmp_path / "attention.onnx"
    with torch.no_grad():
        torch.onnx.export(module, (x, context), str(path), dynamo=False, opset_version=17, input_names=["x", "context"],
                          output_names=["out"], dynamic_axes={"x": {0: "B", 1: "S"}, "context": {0: "B", 1: "L"}})
        x2, c2 = torch.randn(3, 50, 64), torch.randn(3, 20, 48)  # other batch and lengths than traced
        expected = module.reference(x2, c2).numpy()
    model = onnx.load(str(path))
    assert fuse_attention(model) == 1
    counts = collections.Counter(n.op_type for n in model.graph.node)
    assert counts["MultiHeadAttention"] == 1 and counts["Softmax"] == 0 and counts["MatMul"] == 4  # q, k, v, out
    node = next(n for n in model.graph.node if n.op_type == "MultiHeadAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["num_heads"] == 4
    assert ("scale" in attrs) == (scale is not None)  # the computed 1/sqrt(d) is MultiHeadAttention's own default
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x2.numpy(), "context": c2.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=ATTN_RTOL, atol=ATTN_ATOL)


def test_attention_bounds_catch_a_wrong_scale():
    """One notch: the softmax scale 10 % off (what a fusion that mis-read or dropped the scale would compute)
    moves diffusers' own output by far more than ATTN_RTOL / ATTN_ATOL."""
    torch.manual_seed(0)
    module = Attention(64, 48, heads=4, scale=0.25, bias=False).eval()  # 0.25 = 1/sqrt(16), the default
    x, context = torch.randn(3, 50, 64), torch.randn(3, 20, 48)
    with torch.no_grad():
        right = module.reference(x, context).numpy()
        module.attn.scale *= 1.1
        wrong = module.reference(x, context).numpy()
    assert not np.allclose(wrong, right, rtol=ATTN_RTOL, atol=ATTN_ATOL)


def test_attention_with_a_mask_is_left_alone(tmp_path):
    """CLIP's causal attention adds a mask before the softmax: not the pattern, so nothing changes."""
    class Masked(Attention):
        def forward(self, x, context):
            a = self.attn
            b, d = x.shape[0], a.to_q.out_features // a.heads
            q, k, v = (t.view(b, -1, a.heads, d).transpose(1, 2) for t in (a.to_q(x), a.to_k(x), a.to_v(x)))
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, -1, 64)

    path = tmp_path / "masked.onnx"
    torch.onnx.export(Masked(64, 64, 4, None, False).eval(), (torch.randn(1, 5, 64), torch.randn(1, 5, 64)), str(path),
                      dynamo=False, opset_version=17)
    model = onnx.load(str(path))
    before = len(model.graph.node)
    assert fuse_attention(model) == 0 and len(model.graph.node) == before


def tiny_unet_feeds(seed: int) -> dict[str, np.ndarray]:
    """Inputs of the tiny UNet for one guided 128×96 image: noise, a mid-schedule timestep, SDXL's time ids."""
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((2, 4, 16, 12)).astype(np.float32),
            "timestep": np.full((2,), 500, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 96)).astype(np.float32),
            "text_embeds": rng.standard_normal((2, 64)).astype(np.float32),
            "time_ids": np.tile(np.array([128, 96, 0, 0, 128, 96], np.float32), (2, 1))}


def context_kv_merge():
    """benchmarks/context_kv_merge.py (issue 26's experiment; not part of `optimize`), imported from its path."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "context_kv_merge.py"
    spec = importlib.util.spec_from_file_location("context_kv_merge", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_context_kv_merge_experiment_computes_what_separate_projections_compute(tiny_engine, tiny_optimized_whole,
                                                                                     tmp_path):
    """The cross-attention K/V projections of the tiny UNet as one MatMul + Split (Q_K_V_BSNH_BNSH_BNSH attention),
    written by merge_file from a file whose weights are all in its data file: ONNX Runtime CPU gives the separate
    projections' output again to float rounding (measured rel-L2 7e-7; bound 1e-5, while K and V swapped in the merged
    weight move it by > 1e-2); self-attentions are left alone. The variant engine directory of an optimized engine
    passes the runtime's file checks, its merged weight is the originals side by side, and --out inside --engine is
    refused."""
    from onnx import numpy_helper

    from sdxl_trt.export.fuse_attention import Graph

    merge = context_kv_merge()
    manifest = load_manifest(tiny_engine)
    model = onnx.load(str(manifest.path(manifest.components["unet"]["precisions"]["fp32"])))
    assert fuse_attention(model) > 0
    graph = Graph(model.graph)
    attentions = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    cross = [n for n in attentions if graph.parent(n, 1, "MatMul").input[0] == "encoder_hidden_states"]
    assert 1 < len(cross) < len(attentions)
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    reference = model.SerializeToString()
    src = tmp_path / "fused" / "model.onnx"
    src.parent.mkdir()
    onnx.save_model(model, str(src), save_as_external_data=True, location="model.onnx.data")  # weights > 1 KiB outside
    dest = tmp_path / "merged" / "model.onnx"
    dest.parent.mkdir()
    assert merge.merge_file(src, dest) == len(cross)
    merged = onnx.load(str(dest))
    counts = op_counts(merged)
    assert counts["MultiHeadAttention"] == len(attentions) and counts["Split"] == 1
    assert sum(i == "encoder_hidden_states" for n in merged.graph.node for i in n.input) == 1
    feeds = tiny_unet_feeds(3)

    def run(m):
        data = str(m) if not isinstance(m, onnx.ModelProto) else m.SerializeToString()
        return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    want, got = run(src), run(dest)
    error = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    swapped = onnx.ModelProto.FromString(reference)
    merge.merge_context_projections(swapped, lambda n: tensors[n.replace("to_k", "to_V").replace("to_v", "to_k")
                                                                .replace("to_V", "to_v")])
    notch = float(np.linalg.norm(run(swapped) - want) / np.linalg.norm(want))
    print(f"context K/V merged: rel-L2 {error:.1e} from separate projections; K and V swapped: {notch:.1e}")
    assert error < 1e-5 and notch > 1e-2

    tiny_optimized = tiny_optimized_whole  # its UNet computes the context's K and V (context_kv_merge's input)
    assert merge.merged_copy(tiny_optimized, tmp_path / "variant") > 1
    variant = load_manifest(tmp_path / "variant")
    variant.check_files()  # what the runtime checks when it loads a directory
    path = variant.path(variant.components["unet"]["optimized"]["cuda"]["path"])
    merged_file = onnx.load(str(path))
    (name, spans), = merge.packed_columns(merged_file).items()
    original = onnx.load(str(tiny_optimized / path.relative_to(tmp_path / "variant")))
    weights = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    packed = next(numpy_helper.to_array(t) for t in merged_file.graph.initializer if t.name == name)
    for source, start, end in spans:
        np.testing.assert_array_equal(packed[:, start:end], weights[source])
    constants = [n.attribute[0].t for n in merged_file.graph.node if n.op_type == "Constant" and "context_kv" in n.name]
    assert constants and all(not t.raw_data and t.int64_data for t in constants)  # never moved to a data file
    with pytest.raises(SystemExit, match="outside --engine"):
        merge.merged_copy(tiny_optimized, tiny_optimized / "variant")


def test_optimize_fuses_the_tiny_models_and_records_the_files(tiny_optimized):
    manifest = load_manifest(tiny_optimized)
    for name, entry in manifest.components.items():
        record = entry["optimized"]["cuda"]
        path = manifest.path(record["path"])
        counts = op_counts(path)
        softmax_before = op_counts(manifest.path(entry["precisions"]["fp32"]))["Softmax"]
        ops = {op: n for op, n in record["fused"].items() if op != "ContextProjections"}  # MatMuls moved, not fused
        assert {op: counts[op] for op in ops} == ops, name
        if entry["contract"].startswith(("unet", "vae")):
            # every attention is one node; GroupNorm and NHWC convolutions fused
            assert record["fused"]["MultiHeadAttention"] == softmax_before > 0 and counts["Softmax"] == 0, name
            assert counts["GroupNorm"] + counts["SkipGroupNorm"] > 0 and counts["NhwcConv"] > 0, name
            assert counts["Conv"] == 0, name
        if entry["contract"].startswith("unet"):
            # the tiny UNet's feed-forward (hidden 512) is not a size ONNX Runtime's BiasSplitGelu kernel takes
            assert counts["BiasSplitGelu"] == 0 and counts["SkipLayerNormalization"] > 0
        weights = {t.name: t for t in onnx.load(str(path), load_external_data=False).graph.initializer}
        for node in onnx.load(str(path), load_external_data=False).graph.node:
            if node.op_type in ("GroupNorm", "SkipGroupNorm"):  # only shapes ONNX Runtime's CUDA kernel takes
                groups = next(a.i for a in node.attribute if a.name == "groups")
                assert weights[node.input[1]].dims[0] // groups % 2 == 0, (name, node.name)
        assert record["overflow_check"] == (entry["contract"].startswith("vae") and "fp16" not in entry["precisions"])
        # fp16 inside, the contract's float32 inputs (timesteps, time ids) and fp32 outputs kept
        model = onnx.load(str(path), load_external_data=False)
        io = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
        for spec in entry["inputs"] + entry["outputs"]:
            expected = {"float32": onnx.TensorProto.FLOAT, "int32": onnx.TensorProto.INT32}.get(
                spec["dtype"], onnx.TensorProto.FLOAT16)
            assert io[spec["name"]] == expected, (name, spec["name"])
        for relative in record["files"]:
            assert relative in manifest.data["files"]
        onnx.checker.check_model(str(path))
        # every weight is there, in half the bytes
        fp32_bytes = sum(manifest.data["files"][f]["size"] for f in entry["files"]["fp32"])
        fp16_bytes = sum(manifest.data["files"][f]["size"] for f in record["files"])
        assert 0.45 < fp16_bytes / fp32_bytes < 0.56, name
    manifest.check_files()  # sizes and hashes of everything, optimized files included
    from sdxl_trt.runtime.inspect import inspect_dir

    assert inspect_dir(tiny_optimized).count("cuda fp16") == len(manifest.components)


def test_the_pooled_text_embedding_picks_the_end_token_on_floats(tiny_optimized):
    """CLIP-G's end-of-text ArgMax reads fp32 (the CUDA provider has no int32 ArgMax: on the CPU it would keep the
    encoder from being a CUDA graph); ONNX Runtime's CPU provider runs the optimized file: the pooled embedding of
    rows whose end token sits at different places is the fp32 file's, within fp16 rounding."""
    import onnxruntime as ort

    manifest = load_manifest(tiny_optimized)
    entry = manifest.components["clip_g"]
    path = manifest.path(entry["optimized"]["cuda"]["path"])
    model = onnx.load(str(path), load_external_data=False)
    producers = {out: node for node in model.graph.node for out in node.output}
    argmax = [node for node in model.graph.node if node.op_type == "ArgMax"]
    assert len(argmax) == 1
    cast = producers[argmax[0].input[0]]
    assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT and cast.input[0] == "input_ids"
    ids = np.zeros((3, 77), np.int32)
    ids[:, 0] = 49406
    for row, words in enumerate(([320, 1125, 539], [530], list(range(400, 460)))):
        ids[row, 1:len(words) + 1] = words
        ids[row, len(words) + 1] = 49407
    fast = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})
    reference = ort.InferenceSession(str(manifest.path(entry["precisions"]["fp32"])),
                                     providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})
    for got, expected in zip(fast, reference):
        np.testing.assert_allclose(got.astype(np.float32), expected, atol=1e-2)
    assert not np.allclose(reference[1][0], reference[1][1], atol=0.1)  # the rows' pooled embeddings differ


def test_optimize_again_skips_what_is_up_to_date(tiny_optimized, tmp_path, capsys):
    root = tmp_path / "tiny"
    shutil.copytree(tiny_optimized, root)
    before = json.loads((root / "manifest.json").read_text())
    assert main(["optimize", str(root), "--components", "unet", "clip_l"]) == 0
    out = capsys.readouterr().out
    assert out.count("cached") == 2
    assert json.loads((root / "manifest.json").read_text()) == before
    (root / before["components"]["clip_l"]["optimized"]["cuda"]["path"]).unlink()
    assert main(["optimize", str(root), "--components", "clip_l"]) == 0  # a missing file is made again
    assert "cached" not in capsys.readouterr().out
    load_manifest(root).check_files()


def test_upsampling_runs_in_fp16(tiny_engine, tiny_optimized):
    """Resize takes the fp16 activations straight (no Cast pair around it: export/fp16.py), in the exported fp16 UNet
    and in every optimized file, and its scales stay fp32 (the UNet's upsamplers are given sizes, int64, instead).
    Their numbers: the export's --verify (fp16 UNet on ONNX Runtime CPU) and test_ort_cuda.py (optimized, on a GPU)."""
    files = [load_manifest(tiny_engine).path(load_manifest(tiny_engine).components["unet"]["precisions"]["fp16"])]
    optimized = load_manifest(tiny_optimized)
    files += [optimized.path(entry["optimized"]["cuda"]["path"]) for entry in optimized.components.values()]
    resizes = 0
    for path in files:
        model = onnx.load(str(path), load_external_data=False)
        producers = {out: node for node in model.graph.node for out in node.output}
        types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
        constants = {t.name: t.data_type for t in model.graph.initializer}
        constants.update({n.output[0]: n.attribute[0].t.data_type for n in model.graph.node if n.op_type == "Constant"})
        for node in (n for n in model.graph.node if n.op_type == "Resize"):
            resizes += 1
            assert node.input[0] not in producers or producers[node.input[0]].op_type != "Cast", (path, node.name)
            assert types.get(node.output[0]) in (onnx.TensorProto.FLOAT16, None), (path, node.name)
            if node.input[2]:
                assert constants[node.input[2]] == onnx.TensorProto.FLOAT, (path, node.name)
    assert resizes >= 6  # the UNet's two upsamplers, twice, and the VAE decoder's


def test_the_vae_encoders_pads_become_its_convolutions_padding(tiny_engine, tiny_optimized):
    """fold_pads_into_convs on the exported fp32 VAE encoder: its three downsamplers' Pads (one row and column at the
    end) become their convolutions' own padding, and ONNX Runtime CPU computes the same latents to float rounding;
    the optimized file has no Pad. Pads that are not zeros on the spatial sides are left alone."""
    from onnx import helper, numpy_helper

    from sdxl_trt.export.optimize import fold_pads_into_convs

    manifest = load_manifest(tiny_engine)
    path = manifest.path(manifest.components["vae_encoder"]["precisions"]["fp32"])
    model = onnx.load(str(path))
    folded = onnx.load(str(path))
    assert fold_pads_into_convs(folded) == 3
    assert op_counts(folded)["Pad"] == 0
    assert sorted(tuple(a.ints) for n in folded.graph.node if n.op_type == "Conv" for a in n.attribute
                  if a.name == "pads" and a.ints[:2] != a.ints[2:]) == [(0, 0, 1, 1)] * 3  # the others: (1, 1, 1, 1)
    image = np.random.default_rng(5).uniform(-1, 1, (2, 3, 136, 200)).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"image": image})

    for want, got in zip(run(model), run(folded)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    optimized = load_manifest(tiny_optimized)
    assert op_counts(optimized.path(optimized.components["vae_encoder"]["optimized"]["cuda"]["path"]))["Pad"] == 0

    def pad_then_conv(pads, value=0.0, mode="constant"):
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 6, 6])
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
        inits = [numpy_helper.from_array(np.array(pads, np.int64), "pads"),
                 numpy_helper.from_array(np.array(value, np.float32), "value"),
                 numpy_helper.from_array(np.ones((2, 2, 3, 3), np.float32), "w")]
        nodes = [helper.make_node("Pad", ["x", "pads", "value"], ["p"], mode=mode),
                 helper.make_node("Conv", ["p", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2])]
        return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits))

    assert fold_pads_into_convs(pad_then_conv([0, 0, 1, 0, 0, 0, 0, 2])) == 1
    assert fold_pads_into_convs(pad_then_conv([0, 1, 0, 0, 0, 0, 1, 1])) == 0  # a channel padded
    assert fold_pads_into_convs(pad_then_conv([0, 0, 0, 0, 0, 0, 1, 1], value=1.0)) == 0  # ones, not zeros
    assert fold_pads_into_convs(pad_then_conv([0, 0, 0, 0, 0, 0, 1, 1], mode="reflect")) == 0


def test_files_of_an_older_recipe_are_made_again(tiny_optimized, tmp_path, capsys):
    """A file an older `optimize` made (no recipe in its record: the first) is listed as stale (what ort-cuda's backend
    warns of), and `optimize` makes it again (not "cached") with today's recipe."""
    from sdxl_trt.runtime.backends import OPTIMIZE_RECIPE, stale_optimized

    root = tmp_path / "tiny"
    shutil.copytree(tiny_optimized, root)
    manifest = load_manifest(root)
    assert stale_optimized(manifest) == []
    assert manifest.components["vae_decoder"]["optimized"]["cuda"]["recipe"] == OPTIMIZE_RECIPE
    data = json.loads((root / "manifest.json").read_text())
    del data["components"]["vae_decoder"]["optimized"]["cuda"]["recipe"]
    (root / "manifest.json").write_text(json.dumps(data))
    assert stale_optimized(load_manifest(root)) == ["vae_decoder"]
    assert main(["optimize", str(root)]) == 0
    assert capsys.readouterr().out.count("cached") == len(data["components"]) - 1
    record = load_manifest(root).components["vae_decoder"]["optimized"]["cuda"]
    assert record["recipe"] == OPTIMIZE_RECIPE and stale_optimized(load_manifest(root)) == []


def test_a_new_recipe_makes_again_only_the_components_it_changed_and_a_newer_one_is_refused(tiny_optimized, tmp_path,
                                                                                          capsys):
    """Records of recipe 3 (before the context file): the UNets' files are stale (ort-cuda warns: they run, slower)
    and `optimize` makes only them again; the text encoders' and VAEs' files of recipe 3 are still today's
    (RECIPES: 4 changed the UNets alone). A record of a recipe newer than this sdxl-trt knows is refused in one line
    naming both ways out, and `optimize` makes it again with this recipe; `sdxl-trt inspect` shows each case."""
    from sdxl_trt.runtime.backends import OPTIMIZE_RECIPE, RECIPES, check_optimized_readable, stale_optimized
    from sdxl_trt.runtime.errors import UserError
    from sdxl_trt.runtime.inspect import inspect_data, inspect_dir

    root = tmp_path / "tiny"
    shutil.copytree(tiny_optimized, root)
    data = json.loads((root / "manifest.json").read_text())
    unets = sorted(n for n, e in data["components"].items() if e["contract"] in RECIPES[-1][1])
    assert unets and len(unets) < len(data["components"])
    for entry in data["components"].values():
        entry["optimized"]["cuda"]["recipe"] = 3
    (root / "manifest.json").write_text(json.dumps(data))
    assert sorted(stale_optimized(load_manifest(root))) == unets
    check_optimized_readable(load_manifest(root))
    shown = inspect_data(root)["components"]
    assert {n: c["optimized"]["cuda"]["current"] for n, c in shown.items()} == {n: n not in unets for n in shown}
    assert inspect_dir(root).count("an older recipe (3; today's is 4): it runs, slower") == len(unets)
    assert main(["optimize", str(root)]) == 0
    assert capsys.readouterr().out.count("cached") == len(data["components"]) - len(unets)
    records = {n: e["optimized"]["cuda"] for n, e in load_manifest(root).components.items()}
    assert {n: r["recipe"] for n, r in records.items()} == {n: OPTIMIZE_RECIPE if n in unets else 3 for n in records}
    assert stale_optimized(load_manifest(root)) == []

    data = json.loads((root / "manifest.json").read_text())
    data["components"]["vae_decoder"]["optimized"]["cuda"]["recipe"] = OPTIMIZE_RECIPE + 1
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=rf"vae_decoder were made by a newer sdxl-trt \(recipe {OPTIMIZE_RECIPE + 1}; "
                                        rf"this one reads up to {OPTIMIZE_RECIPE}\): upgrade sdxl-trt, or .*optimize"):
        check_optimized_readable(load_manifest(root))
    assert "vae_decoder" in inspect_dir(root) and inspect_dir(root).count("made by a newer sdxl-trt") == 1
    assert main(["optimize", str(root)]) == 0
    assert capsys.readouterr().out.count("cached") == len(data["components"]) - 1
    check_optimized_readable(load_manifest(root))
    assert load_manifest(root).components["vae_decoder"]["optimized"]["cuda"]["recipe"] == OPTIMIZE_RECIPE


def test_the_vaes_get_their_own_provider_options_within_the_attention_memory_bound():
    """ort_cuda.session_options: fused conv bias for every session (CONV_OPTIONS); for the VAEs, unfused attention only where its
    B × tokens² fp16 scores stay under UNFUSED_ATTENTION_BYTES (every SDXL bucket at one image; not 2048², where
    they would be 8 GiB, nor the session for any shape, whose size is not known); nothing more for other components.
    The encoder's tokens come from the image's size (its contract names H and W)."""
    from sdxl_trt.runtime.ort_cuda import UNFUSED_ATTENTION_BYTES, session_options
    from sdxl_trt.runtime.profiles import BUCKETS

    for width, height in BUCKETS:
        dims = {"B": 1, "h": height // 8, "w": width // 8}
        assert session_options("vae_decoder", dims) == {"fuse_conv_bias": "1", "sdpa_kernel": "16"}, (width, height)
    assert session_options("vae_decoder", {"B": 1, "h": 256, "w": 256}) == {"fuse_conv_bias": "1"}
    assert session_options("vae_decoder", {"B": 4, "h": 128, "w": 128}) == {"fuse_conv_bias": "1"}  # 2 GiB
    assert session_options("vae_decoder", None) == {"fuse_conv_bias": "1"}
    assert 2 * 128 ** 4 * 2 <= UNFUSED_ATTENTION_BYTES  # two 1024² images still fit
    assert session_options("vae_decoder", {"B": 2, "h": 128, "w": 128})["sdpa_kernel"] == "16"
    assert session_options("vae_encoder", {"B": 1, "H": 1024, "W": 1024}) == {"fuse_conv_bias": "1", "sdpa_kernel": "16"}
    assert session_options("vae_encoder", {"B": 1, "H": 2048, "W": 2048}) == {"fuse_conv_bias": "1"}
    assert session_options("vae_encoder", None) == {"fuse_conv_bias": "1"}
    for name in ("unet", "unet_refiner", "clip_l", "clip_g", "controlnet_0"):
        assert session_options(name, {"B": 1, "h": 128, "w": 128}) == {"fuse_conv_bias": "1"}


def test_optimize_in_worker_processes_writes_the_same_files(tiny_engine, tiny_optimized, tmp_path, capfd):
    """--jobs 3: components optimized at once in spawned workers, the manifest updated as each finishes; the files
    and records are those of the one-at-a-time run, byte for byte. The workers end quietly (their stderr is the
    process's: nothing printed from their shutdown)."""
    root = tmp_path / "tiny"
    shutil.copytree(tiny_engine, root)
    assert main(["optimize", str(root), "--jobs", "3"]) == 0
    out, err = capfd.readouterr()
    assert "cached" not in out
    assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
    ours, serial = load_manifest(root), load_manifest(tiny_optimized)
    for name, entry in serial.components.items():
        assert ours.components[name]["optimized"] == entry["optimized"], name
        for f in entry["optimized"]["cuda"]["files"]:
            assert ours.data["files"][f] == serial.data["files"][f], f
    ours.check_files()
    assert main(["optimize", str(root), "--jobs", "0"]) == 2
    assert "--jobs 0" in capfd.readouterr().err


def test_optimize_refuses_bad_input(tiny_engine, tmp_path, capsys):
    assert main(["optimize", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["optimize", str(tiny_engine), "--components", "transformer"]) == 2
    assert "has no 'transformer'" in capsys.readouterr().err
    root = tmp_path / "fp16only"
    shutil.copytree(tiny_engine, root)
    data = json.loads((root / "manifest.json").read_text())
    del data["components"]["clip_l"]["precisions"]["fp32"]
    (root / "manifest.json").write_text(json.dumps(data))
    assert main(["optimize", str(root), "--components", "clip_l"]) == 2
    assert "no fp32 file" in capsys.readouterr().err
    fp32 = root / data["components"]["clip_g"]["precisions"]["fp32"]
    fp32.write_bytes(fp32.read_bytes()[:100])  # truncated
    assert main(["optimize", str(root), "--components", "clip_g"]) == 2
    assert "truncated" in capsys.readouterr().err


def test_optimize_without_onnx_says_what_to_install(tiny_engine, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert main(["optimize", str(tiny_engine)]) == 2
    err = capsys.readouterr().err
    assert "needs onnx" in err and "pip install" in err and "Traceback" not in err


def test_a_vae_that_overflows_is_decoded_again_in_fp32(caplog):
    """ort-cuda's check on an fp16 VAE that may overflow (runs on the CPU with stand-in sessions)."""
    from sdxl_trt.runtime.ort_cuda import CheckedSession

    class Fake:
        name = "vae_decoder"

        def __init__(self, value):
            self.value, self.calls = value, 0

        def run(self, **feeds):
            self.calls += 1
            return {"image": np.full((1, 3, 8, 8), self.value, np.float32)}

    fast, fp32 = Fake(0.5), Fake(0.25)
    session = CheckedSession("vae_decoder", lambda: fast, lambda: fp32)
    assert session.run(latent=None)["image"][0, 0, 0, 0] == 0.5 and fp32.calls == 0
    fast.value = np.nan
    with caplog.at_level(logging.WARNING):
        assert session.run(latent=None)["image"][0, 0, 0, 0] == 0.25
    assert "overflowed" in caplog.text and "fp32" in caplog.text
    assert session.run(latent=None)["image"][0, 0, 0, 0] == 0.25 and fast.calls == 2 and fp32.calls == 2


def test_large_weights_are_streamed_not_loaded(tiny_engine, tmp_path, monkeypatch, capfd):
    """With the weights in an external file and treated as large (stubs: full-size models), the optimized file is the
    same graph with the same weights as when everything is in memory (NHWC transposes and fp16 applied on the way)."""
    import sdxl_trt.export.optimize as opt
    from onnx import numpy_helper

    src = tiny_engine / "onnx" / "unet" / "model.onnx"
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    onnx.save(onnx.load(str(src)), str(external), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    in_memory = opt.optimize_file(src, tmp_path / "a" / "model.cuda.fp16.onnx", "unet", ["timestep", "time_ids"])
    capfd.readouterr()
    monkeypatch.setattr(opt, "LOAD_BELOW", 4096)  # biases (≤ 2 KB here) are read, every weight matrix is a stub
    streamed = opt.optimize_file(external, tmp_path / "b" / "model.cuda.fp16.onnx", "unet", ["timestep", "time_ids"])
    assert "fail" not in capfd.readouterr().out.lower()  # ONNX Runtime's shape inference worked around the stubs
    assert streamed == in_memory
    a = onnx.load(str(tmp_path / "a" / "model.cuda.fp16.onnx"))
    b = onnx.load(str(tmp_path / "b" / "model.cuda.fp16.onnx"))
    assert (tmp_path / "b" / "model.cuda.fp16.onnx.data").stat().st_size > 1e6  # the stubs were written out
    assert [(n.op_type, list(n.input)) for n in a.graph.node] == [(n.op_type, list(n.input)) for n in b.graph.node]
    weights_a = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    weights_b = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert weights_a.keys() == weights_b.keys()
    for name, value in weights_a.items():
        assert value.dtype == weights_b[name].dtype and np.array_equal(value, weights_b[name]), name
    assert any(name.endswith("_nhwc") for name in weights_a)


def test_a_session_for_one_shape_computes_what_the_any_shape_session_does(tiny_engine):
    """What the CUDA graph path relies on: free dimensions fixed at session creation (checked on the CPU)."""
    from sdxl_trt.runtime.backends import OrtSession
    from sdxl_trt.runtime.contracts import symbol_values
    from sdxl_trt.runtime.manifest import load_manifest

    manifest = load_manifest(tiny_engine)
    rng = np.random.default_rng(0)
    feeds = dict(sample=rng.standard_normal((2, 4, 24, 16)).astype(np.float32), timestep=np.array([9.0, 9.0], np.float32),
                 encoder_hidden_states=rng.standard_normal((2, 77, 96)).astype(np.float32),
                 text_embeds=rng.standard_normal((2, 64)).astype(np.float32),
                 time_ids=np.array([[192, 128, 0, 0, 192, 128]] * 2, np.float32))
    dims = symbol_values(manifest.components["unet"], {k: v.shape for k, v in feeds.items()})
    assert dims == {"B": 2, "h": 24, "w": 16, "S": 77}
    fixed = OrtSession(manifest, "unet", "fp32", ["CPUExecutionProvider"], dims=dims)
    anyshape = OrtSession(manifest, "unet", "fp32", ["CPUExecutionProvider"])
    np.testing.assert_allclose(fixed.run(**feeds)["noise_pred"], anyshape.run(**feeds)["noise_pred"], rtol=1e-5,
                               atol=1e-5)


def test_each_backend_hashes_only_the_files_it_reads(tiny_engine, tiny_optimized):
    from sdxl_trt.runtime.backends import used_files

    plain, optimized = load_manifest(tiny_engine), load_manifest(tiny_optimized)
    cpu = used_files("ort-cpu", plain)
    assert "onnx/unet/model.onnx" in cpu and not any(f.endswith(".fp16.onnx") for f in cpu)
    cuda = used_files("ort-cuda", plain)  # no optimized files: fp16 where exported, the VAE's fp32
    assert "onnx/unet/model.fp16.onnx" in cuda and "onnx/unet/model.onnx" not in cuda
    assert "onnx/vae_decoder/model.onnx" in cuda
    cuda = used_files("ort-cuda", optimized)  # the optimized files, and the fp32 fallback of an overflow-checked VAE
    assert "onnx/unet/model.cuda.fp16.onnx" in cuda and "onnx/unet/model.fp16.onnx" not in cuda
    assert {"onnx/vae_decoder/model.cuda.fp16.onnx", "onnx/vae_decoder/model.onnx"} <= set(cuda)
    assert "scheduler/scheduler_config.json" in cuda and used_files("tensorrt", optimized) is None


def test_an_interrupted_optimize_of_external_weights_keeps_the_previous_version(tiny_engine, tmp_path, monkeypatch):
    """A full-size optimize streams its weights into `<file>.data`: interrupted while writing them (here: after a few
    tensors), the previous optimized model and its weights are still there, byte for byte, and nothing temporary is
    left; the next run writes a model whose data file is the one it names, with every weight in it."""
    import sdxl_trt.export.optimize as opt
    from sdxl_trt.export import fp16

    src = tiny_engine / "onnx" / "unet" / "model.onnx"
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    onnx.save(onnx.load(str(src)), str(external), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    monkeypatch.setattr(opt, "LOAD_BELOW", 4096)
    dest = tmp_path / "out" / "model.cuda.fp16.onnx"
    opt.optimize_file(external, dest, "unet", ["timestep", "time_ids"])
    before = {p.name: p.read_bytes() for p in dest.parent.iterdir()}
    assert set(before) == {dest.name, dest.name + ".data"}
    converted = []
    original = fp16.stub_to_fp16

    def interrupted(tensor, data):
        converted.append(tensor.name)
        if len(converted) == 5:
            raise KeyboardInterrupt
        return original(tensor, data)

    monkeypatch.setattr(fp16, "stub_to_fp16", interrupted)
    with pytest.raises(KeyboardInterrupt):
        opt.optimize_file(external, dest, "unet", ["timestep", "time_ids"])
    assert {p.name: p.read_bytes() for p in dest.parent.iterdir()} == before  # whole, and no .tmp-* left
    monkeypatch.setattr(fp16, "stub_to_fp16", original)
    (dest.parent / (dest.name + ".data")).unlink()
    opt.optimize_file(external, dest, "unet", ["timestep", "time_ids"])
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name, dest.name + ".data"]
    model = onnx.load(str(dest))  # reads each weight from the location the model names
    assert {e.value for t in onnx.load(str(dest), load_external_data=False).graph.initializer
            for e in t.external_data if e.key == "location"} == {dest.name + ".data"}
    assert all(t.raw_data or t.float_data or t.int64_data for t in model.graph.initializer)


def attention_projections():
    """benchmarks/attention_projections.py (issue 26's experiment; not part of `optimize`), imported from its path."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_projections.py"
    spec = importlib.util.spec_from_file_location("attention_projections", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["attention_projections"] = module
    spec.loader.exec_module(module)
    return module


def test_the_context_projections_moved_out_compute_what_the_unet_computes(tiny_engine, tmp_path):
    """export/context_projections.py on the tiny UNet (attention fused as optimize fuses it, fp32 so that the CPU runs
    it): every cross-attention's K and V projections move into the context file, the UNet takes their results as
    inputs and no longer reads the context; ONNX Runtime CPU gives the whole UNet's output again (the same operators
    on the same values: measured rel-L2 0; bound 1e-6, while K and V swapped in the context file move it by > 1e-2).
    A UNet with no such attention is left as it is."""
    from sdxl_trt.export.context_projections import split_context_projections

    manifest = load_manifest(tiny_engine)
    model = onnx.load(str(manifest.path(manifest.components["unet"]["precisions"]["fp32"])))
    assert fuse_attention(model) > 0
    whole = model.SerializeToString()
    cross = sum(1 for n in model.graph.node if n.op_type == "MultiHeadAttention") // 2
    context = split_context_projections(model)
    assert len(context.graph.output) == 2 * cross and cross > 1
    assert not any(i == "encoder_hidden_states" for n in model.graph.node for i in n.input)
    assert [i.name for i in context.graph.input] == ["encoder_hidden_states"]
    moved = {t.name for t in context.graph.initializer}
    assert len(moved) == 2 * cross and not moved & {t.name for t in model.graph.initializer}
    assert all(".attn2.to_k." in name or ".attn2.to_v." in name for name in moved)  # LoRA finds them by these names
    assert [i.name for i in model.graph.input][-2 * cross:] == [o.name for o in context.graph.output]
    feeds = tiny_unet_feeds(5)

    def run(m, extra=None):
        data = m if isinstance(m, bytes) else m.SerializeToString()
        return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {**feeds, **(extra or {})})[0]

    session = ort.InferenceSession(context.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, {"encoder_hidden_states": feeds["encoder_hidden_states"]})))
    want = run(whole)
    got = run(model, outputs)
    error = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    swapped = {name: outputs[name.replace("context_k", "context_V").replace("context_v", "context_k")
                              .replace("context_V", "context_v")] for name in outputs}
    notch = float(np.linalg.norm(run(model, swapped) - want) / np.linalg.norm(want))
    print(f"context projections moved out: rel-L2 {error:.1e} from the UNet as exported; K and V swapped: {notch:.1e}")
    assert error < 1e-6 and notch > 1e-2
    assert split_context_projections(model) is None  # nothing left to move


def test_optimize_moves_the_unets_context_projections_into_their_context_files(tiny_optimized, tiny_optimized_whole):
    """`optimize` splits each UNet (base and refiner; not the VAE or the text encoders): the record names the context
    file, which is among its checked files, holds the fp16 K/V weights the whole file has (the same values) and
    feeds the UNet file's extra inputs; --no-context-once leaves no context file and the UNet reading the context."""
    from onnx import numpy_helper

    manifest, whole = load_manifest(tiny_optimized), load_manifest(tiny_optimized_whole)
    manifest.check_files()
    for name, entry in manifest.components.items():
        record = entry["optimized"]["cuda"]
        if not entry["contract"].startswith("unet"):
            assert "context" not in record and "ContextProjections" not in record["fused"], name
            continue
        assert record["context"] in record["files"] and record["context"].endswith(".context.onnx"), name
        unet, context = onnx.load(str(manifest.path(record["path"]))), onnx.load(str(manifest.path(record["context"])))
        outputs = [o.name for o in context.graph.output]
        assert record["fused"]["ContextProjections"] == len(outputs) > 0
        assert {i.name for i in unet.graph.input} >= set(outputs)
        assert not any(i == "encoder_hidden_states" for n in unet.graph.node for i in n.input), name
        weights = {t.name: numpy_helper.to_array(t) for t in context.graph.initializer}
        assert {w.dtype for w in weights.values()} == {np.dtype(np.float16)}, name
        other = whole.components[name]["optimized"]["cuda"]
        assert "context" not in other and "ContextProjections" not in other["fused"]
        full = onnx.load(str(whole.path(other["path"])))
        assert any(i == "encoder_hidden_states" for n in full.graph.node for i in n.input), name
        originals = {t.name: numpy_helper.to_array(t) for t in full.graph.initializer if t.name in weights}
        assert originals.keys() == weights.keys()
        for key, value in weights.items():
            np.testing.assert_array_equal(value, originals[key])
    assert not list(tiny_optimized_whole.rglob("*.context.onnx"))


def test_optimize_again_makes_the_unets_again_for_the_other_context_choice(tiny_optimized, tmp_path):
    """--no-context-once on a directory optimized with the split makes the UNets again (whole; their context files are
    removed, out of the manifest and off the disk), leaves the other files as they were, and the default makes the
    split again."""
    import shutil

    from sdxl_trt.export.optimize import optimize_engine_dir

    root = tmp_path / "tiny"
    shutil.copytree(tiny_optimized, root)
    report = optimize_engine_dir(root, progress=False, context_once=False)
    remade = {name for name, _, _, seconds in report.rows if seconds is not None}
    manifest = load_manifest(root)
    assert remade == {n for n, e in manifest.components.items() if e["contract"].startswith("unet")}
    assert not list(root.rglob("*.context.onnx*")) and not any(".context." in f for f in manifest.data["files"])
    manifest.check_files()
    report = optimize_engine_dir(root, progress=False)
    assert {name for name, _, _, seconds in report.rows if seconds is not None} == remade
    assert all("context" in load_manifest(root).components[n]["optimized"]["cuda"] for n in remade)


def test_the_packed_projection_experiments_compute_what_the_unet_computes(tiny_optimized_whole, tmp_path):
    """benchmarks/attention_projections.py's variants of an engine optimized with --no-context-once: packed K/V in a
    context file and packed Q/K/V, and context-once alone (optimize's own split), pass the runtime's file checks and
    record their context files; --out inside --engine is refused."""
    projections = attention_projections()
    whole = load_manifest(tiny_optimized_whole).components["unet"]["optimized"]["cuda"]
    cross = onnx.load(str(tiny_optimized_whole / whole["path"]))
    cross = sum(1 for n in cross.graph.node if n.op_type == "MultiHeadAttention") // 2
    packed = projections.variant_copy(tiny_optimized_whole, tmp_path / "variant", projections.rewrite_flags(
        context_once=True, pack_kv=True, pack_qkv=True), record_key="context")
    assert packed == {"context_once": cross, "pack_kv": cross, "pack_qkv": cross}  # every attention of either kind
    alone = projections.variant_copy(tiny_optimized_whole, tmp_path / "alone", projections.rewrite_flags(
        context_once=True, pack_kv=False, pack_qkv=False), record_key="context")
    assert alone == {"context_once": cross, "pack_kv": 0, "pack_qkv": 0}
    for out in ("variant", "alone"):
        variant = load_manifest(tmp_path / out)
        variant.check_files()
        record = variant.components["unet"]["optimized"]["cuda"]
        assert record["context"] in record["files"] and variant.path(record["context"]).is_file()
    with pytest.raises(SystemExit, match="must lie outside"):
        projections.variant_copy(tiny_optimized_whole, tiny_optimized_whole / "inside", projections.rewrite_flags(
            context_once=True, pack_kv=False, pack_qkv=False))


def test_a_unet_file_and_a_context_file_that_do_not_fit_are_refused_in_one_line(tiny_optimized):
    """ort-cuda pairs an optimized UNet session with its context file (runtime/context_stage.check_pair) before
    either runs: the UNet's inputs beyond its contract must be exactly the context file's outputs (names, types,
    widths), or there must be none and no context file. The names and widths are read from the tiny model's real
    files (ONNX Runtime's CPU provider cannot make sessions of the fused files, so its input lists stand in)."""
    import types

    from sdxl_trt.runtime.context_stage import check_pair
    from sdxl_trt.runtime.errors import UserError

    manifest = load_manifest(tiny_optimized)
    record = manifest.components["unet"]["optimized"]["cuda"]
    contract = {t["name"]: t for t in manifest.components["unet"]["inputs"]}

    def infos(values):
        return [types.SimpleNamespace(name=v.name, type="tensor(float16)" if v.type.tensor_type.elem_type == 10
                                      else "tensor(float)",
                                      shape=[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in values]

    unet_inputs = infos(onnx.load(str(manifest.path(record["path"])), load_external_data=False).graph.input)
    context_outputs = infos(onnx.load(str(manifest.path(record["context"])), load_external_data=False).graph.output)

    def fake(inputs=(), outputs=()):
        return types.SimpleNamespace(name="unet", inputs=contract, path=manifest.path(record["context"]),
                                     _session=types.SimpleNamespace(get_inputs=lambda: list(inputs),
                                                                    get_outputs=lambda: list(outputs)))

    check_pair(fake(unet_inputs), fake(outputs=context_outputs), manifest)  # as optimize wrote them
    narrower = [types.SimpleNamespace(name=t.name, type=t.type, shape=[*t.shape[:-1], t.shape[-1] // 2])
                for t in context_outputs]
    for unet, context in ((fake(unet_inputs), None), (fake(unet_inputs), fake(outputs=context_outputs[:-1])),
                          (fake(unet_inputs), fake(outputs=narrower)),
                          (fake([t for t in unet_inputs if t.name in contract]), fake(outputs=context_outputs))):
        with pytest.raises(UserError, match=r"sdxl-trt optimize .*`$") as e:
            check_pair(unet, context, manifest)
        assert "\n" not in str(e.value)


def test_a_changed_optimized_file_is_refused_with_optimize_advice_and_optimize_makes_it_again(tiny_optimized,
                                                                                               tmp_path):
    """An optimized file (here the UNet's context file, one byte changed, same size) fails the check ort-cuda runs
    when it opens the directory, with `sdxl-trt optimize DIR` as the fix (not a re-export); `optimize` then finds it
    not up to date and makes that component again, after which the check passes. An exported file keeps the
    re-export advice."""
    import shutil

    from sdxl_trt.export.optimize import optimize_engine_dir
    from sdxl_trt.runtime.backends import used_files
    from sdxl_trt.runtime.errors import UserError

    root = tmp_path / "tiny"
    shutil.copytree(tiny_optimized, root)
    manifest = load_manifest(root)
    context = manifest.path(manifest.components["unet"]["optimized"]["cuda"]["context"])
    data = bytearray(context.read_bytes())
    data[-1] ^= 0xFF
    context.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"does not match its sha256 .*`sdxl-trt optimize {root}`$"):
        manifest.check_files(only=used_files("ort-cuda", manifest))
    report = optimize_engine_dir(root, progress=False)
    assert {name for name, _, _, seconds in report.rows if seconds is not None} == {"unet"}
    load_manifest(root).check_files(only=used_files("ort-cuda", load_manifest(root)))
    exported = manifest.path(manifest.components["clip_l"]["precisions"]["fp32"])
    exported.write_bytes(exported.read_bytes()[:-1])
    with pytest.raises(UserError, match="re-export it"):
        load_manifest(root).check_files()


def test_an_optimize_worker_stops_on_the_first_signal_and_ignores_the_next():
    """`optimize --jobs N` on Ctrl-C: the terminal's SIGINT reaches the workers, then the pool's SIGTERM. The first
    unwinds the worker (its temporary files removed); the second must not cut that cleanup short (it printed as
    "Exception ignored in ... tempfile ... SystemExit: 130" under the one-line "interrupted")."""
    import subprocess
    import sys

    code = """if True:
        import os, signal
        from sdxl_trt.export.optimize import _worker_signals
        _worker_signals()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("SIGINT did not stop the worker")
        except SystemExit as e:
            assert e.code == 130
        os.kill(os.getpid(), signal.SIGTERM)  # the pool's terminate, during the cleanup: ignored
        os.kill(os.getpid(), signal.SIGINT)
        print("cleaned up")
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "cleaned up", "")
