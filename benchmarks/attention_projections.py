"""Issue 26's experiment: the UNet's attention projections done differently, measured before any of it is shipped.

Three rewrites of an optimized UNet file (`sdxl-trt optimize`: attention as com.microsoft MultiHeadAttention with its
Q, K and V projections as separate MatMuls, so that LoRA can change each weight):

  context-once  the cross-attention K and V projections of the 77-token text context (140 small GEMMs a step at
                [B·77, 2048] × [2048, 640 or 1280], about 680 MB of weights read each step) move out of the UNet into a
                second ONNX file, `context.onnx`, run once per image; the UNet takes their results as inputs
                (`context_k.<i>`, `context_v.<i>`, or `context_kv.<i>` with --pack-kv). The step no longer computes
                them at all: what it saves is their whole cost, not the 0.16 ms that merging them into one GEMM saved
                (benchmarks/context_kv_merge.py).
  pack-qkv      each self-attention's Q, K and V projections of the same hidden states as one GEMM with the weights
                interleaved per head ([C, heads·3·head_size]), read by MultiHeadAttention in its packed-QKV format
                ([B, S, heads, 3, head_size]: ONNX Runtime's own fusion's layout, fusion_attention_unet.py): 3 GEMMs →
                1 and 2 fewer kernels per attention.
  pack-kv       each cross-attention's K and V as one GEMM in the packed-KV layout ([B, L, heads, 2, head_size]);
                with context-once, in the context file (one input per attention instead of two).
Same arithmetic in every variant (each output column is still one weight column's dot product with its input).
Context-once is now part of `sdxl-trt optimize` (export/context_projections.py, which this script calls for it; the
runtime feeds the UNet from the context file): rewrite an engine optimized with --no-context-once to compare. The
packings are not: they change the weights LoRA merges into (it would merge into the interleaved columns). This script
writes the variant engine directory; benchmarks/session_variants.py times its UNet (it runs the context file once
and feeds its outputs, reporting its time apart):

    python benchmarks/attention_projections.py --engine /root/full --out /root/ctx --context-once --pack-kv
    python benchmarks/attention_projections.py --engine /root/full --out /root/qkv --pack-qkv
    python benchmarks/session_variants.py --component unet --engine stock=/root/full --engine ctx=/root/ctx \
        --engine qkv=/root/qkv --options neither --out unet.json

--out (outside --engine) becomes an engine directory of links to --engine's files but the UNet's optimized file,
written again with the rewrites (its weights streamed from the original), the context file beside it, and a manifest
recording them (the record's `context` names the context file: only session_variants reads it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sdxl_trt.export.context_projections import split_context_projections
from sdxl_trt.export.fuse_attention import MS_DOMAIN, Graph, drop_dead_nodes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unet_variant import variant_copy  # noqa: E402

CONTEXT_FILE = "context.onnx"


def _ints(values) -> onnx.TensorProto:
    return helper.make_tensor("value", onnx.TensorProto.INT64, [len(values)], [int(v) for v in values])


def _heads(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "num_heads"), 0)


def _interleave(weights: list[np.ndarray], heads: int) -> np.ndarray:
    """[C, heads·k·head_size]: the k weights' columns interleaved per head, as ONNX Runtime's packed formats read them
    ([B, S, heads, k, head_size] after a Reshape)."""
    c, d = weights[0].shape
    return np.stack([w.reshape(c, heads, d // heads) for w in weights], axis=2).reshape(c, heads * len(weights) * (d // heads))


def attentions(model: onnx.ModelProto, g: Graph):
    """(node, q, k, v, self?) for each MultiHeadAttention whose three inputs are MatMuls by constant 2-D weights of one
    shape, each read by that attention alone; self: Q, K and V project the same tensor."""
    for node in model.graph.node:
        if node.op_type != "MultiHeadAttention" or node.domain != MS_DOMAIN or len(node.input) != 3:
            continue
        mm = [g.parent(node, i, "MatMul") for i in range(3)]
        if any(m is None or len(g.consumers[m.output[0]]) != 1 or m.input[1] not in g.initializers for m in mm):
            continue
        shapes = {tuple(g.initializers[m.input[1]].dims) for m in mm[1:]}
        heads = _heads(node)
        if len(shapes) != 1 or len(next(iter(shapes))) != 2 or heads <= 0 or next(iter(shapes))[1] % heads:
            continue
        if mm[1].input[0] != mm[2].input[0]:
            continue
        yield node, *mm, mm[0].input[0] == mm[1].input[0]


def rewrite(model: onnx.ModelProto, read: Callable[[str], np.ndarray], pack_qkv: bool, pack_kv: bool,
            context_once: bool) -> tuple[dict, onnx.ModelProto | None]:
    """Rewrite `model` in place; returns (counts, the context model or None)."""
    g = Graph(model.graph)
    graph_inputs = {i.name: i for i in model.graph.input}
    before: dict[str, list] = {}  # an attention's output → the nodes to put right before that attention
    new_weights = []
    counts = {"pack_qkv": 0, "pack_kv": 0, "context_once": 0}
    context_nodes, context_outputs, context_weights, context_sources = [], [], [], {}
    shapes: dict[str, list[int]] = {}  # context output → its dimensions after (B, L)
    for node, q, k, v, is_self in list(attentions(model, g)):
        heads = _heads(node)
        prefix = f"/{node.name or node.output[0]}".replace("//", "/")
        if is_self and pack_qkv:
            weight = _interleave([read(m.input[1]) for m in (q, k, v)], heads)
            name = f"{prefix}/qkv.weight.T"
            new_weights.append(numpy_helper.from_array(weight, name))
            before[node.output[0]] = [
                helper.make_node("Constant", [], [f"{prefix}/qkv_shape"], name=f"{prefix}/qkv_shape",
                                 value=_ints([0, 0, heads, 3, weight.shape[1] // heads // 3])),
                helper.make_node("MatMul", [q.input[0], name], [f"{prefix}/qkv"], name=f"{prefix}/qkv_MatMul"),
                helper.make_node("Reshape", [f"{prefix}/qkv", f"{prefix}/qkv_shape"], [f"{prefix}/qkv_packed"],
                                 name=f"{prefix}/qkv_Reshape")]
            del node.input[:]
            node.input.extend([f"{prefix}/qkv_packed"])
            counts["pack_qkv"] += 1
        elif not is_self and pack_kv:
            context = k.input[0]
            i = counts["pack_kv"]
            weight = _interleave([read(m.input[1]) for m in (k, v)], heads)
            name = f"{prefix}/kv.weight.T"
            packed = f"context_kv.{i}" if context_once else f"{prefix}/kv_packed"
            nodes = [helper.make_node("Constant", [], [f"{prefix}/kv_shape"], name=f"{prefix}/kv_shape",
                                      value=_ints([0, 0, heads, 2, weight.shape[1] // heads // 2])),
                     helper.make_node("MatMul", [context, name], [f"{prefix}/kv"], name=f"{prefix}/kv_MatMul"),
                     helper.make_node("Reshape", [f"{prefix}/kv", f"{prefix}/kv_shape"], [packed],
                                      name=f"{prefix}/kv_Reshape")]
            weights = [numpy_helper.from_array(weight, name)]
            results = [packed]
            shapes[packed] = [heads, 2, weight.shape[1] // heads // 2]
            counts["pack_kv"] += 1
            if context_once:
                context_nodes.extend(nodes)
                context_weights.extend(weights)
                context_outputs.extend(results)
                context_sources[context] = True
                counts["context_once"] += 1
            else:
                before[node.output[0]] = nodes
                new_weights.extend(weights)
            del node.input[1:]
            node.input.append(results[0])
    context_model = None
    if context_once and context_outputs:  # packed K/V: their context file
        elem = {}
        for source in context_sources:
            if source in graph_inputs:
                elem[source] = graph_inputs[source]
            else:  # a Cast of a graph input (an fp16 file with fp32 inputs): the Cast moves along (and stays)
                cast = g.producer[source]
                assert cast.op_type == "Cast" and cast.input[0] in graph_inputs, f"context {source} from {cast.op_type}"
                context_nodes.insert(0, helper.make_node("Cast", list(cast.input), list(cast.output), name=cast.name,
                                                         to=helper.get_attribute_value(cast.attribute[0])))
                elem[cast.input[0]] = graph_inputs[cast.input[0]]
        lead = [d.dim_param or d.dim_value for d in next(iter(elem.values())).type.tensor_type.shape.dim][:2]
        kind = context_weights[0].data_type  # the projections' results are of their weights' type
        outputs = [helper.make_tensor_value_info(name, kind, lead + shapes[name]) for name in context_outputs]
        context_graph = helper.make_graph(context_nodes, "unet_context", list(elem.values()), outputs,
                                          initializer=context_weights)
        context_model = helper.make_model(context_graph, opset_imports=list(model.opset_import),
                                          ir_version=model.ir_version)
        model.graph.input.extend(outputs)  # the UNet reads them as inputs: (B, L, D), or packed (B, L, N, 2, H)
    order = []
    for node in model.graph.node:
        order.extend(before.get(node.output[0], []) if node.output else [])
        order.append(node)
    del model.graph.node[:]
    model.graph.node.extend(order)
    model.graph.initializer.extend(new_weights)
    drop_dead_nodes(model.graph)  # the separate projections (and their weights) no node reads any more
    if context_once and not pack_kv:  # context-once alone: `sdxl-trt optimize`'s own (export/context_projections.py)
        context_model = split_context_projections(model)
        counts["context_once"] = len(context_model.graph.output) // 2 if context_model is not None else 0
        for tensor in context_model.graph.initializer if context_model is not None else ():
            tensor.CopyFrom(numpy_helper.from_array(read(tensor.name), tensor.name))  # saved inline by rewrite_file
    return counts, context_model


def rewrite_flags(**flags):
    """The rewrite unet_variant.rewrite_file / variant_copy take, for these flags: (counts, {CONTEXT_FILE: the
    context model} when there is one)."""
    def run(model: onnx.ModelProto, read):
        counts, context = rewrite(model, read, **flags)
        return counts, {CONTEXT_FILE: context} if context is not None else {}

    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", required=True, type=Path,
                   help="an engine directory optimized by `sdxl-trt optimize --no-context-once`")
    p.add_argument("--out", required=True, type=Path, help="the variant engine directory to write")
    p.add_argument("--context-once", action="store_true")
    p.add_argument("--pack-qkv", action="store_true")
    p.add_argument("--pack-kv", action="store_true")
    args = p.parse_args()
    counts = variant_copy(args.engine, args.out, rewrite_flags(context_once=args.context_once, pack_qkv=args.pack_qkv,
                                                               pack_kv=args.pack_kv), record_key="context")
    print(json.dumps({"out": str(args.out), **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
