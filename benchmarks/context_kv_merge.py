"""Issue 26's experiment: the UNet's cross-attention K and V projections of the text context as one GEMM.

The SDXL UNet projects the same 77-token context (`encoder_hidden_states`) to keys and values in each of its 70
transformer blocks: 140 small MatMuls a step ([B·77, 2048] × [2048, 640 or 1280]) whose cost is reading their
weights, about 680 MB a step, in kernels too small to fill the GPU. `merge_context_projections` gives all of them one
MatMul with the weights side by side ([2048, Σ 2·D]: one weight read at full bandwidth), then one Reshape + Transpose
to heads and one Split into each attention's K and V in the (B, N, L, H) layout that ONNX Runtime's MultiHeadAttention
takes for cross attention (its Q_K_V_BSNH_BNSH_BNSH format, which flash / cuDNN attention read in place, and its CPU
kernel takes too; the Transpose and the Split copy the small [B, 77, Σ 2·D] result twice). Same arithmetic: each output
column is still one weight column's dot product with the context.

Measured (benchmarks/results/h200-unet-context-kv-merge.json, one H200, 1024², batch 2, CUDA graph, same process):
32.58 ms a UNet evaluation merged against 32.74 ms separate (−0.16 ms, 0.5 %; 32.51 vs 32.62 with fuse_conv_bias),
with the same distance from the fp32 file (rel-L2 1.34e-3). Too little to pay for what shipping it costs (LoRA would
have to merge into column slices of the merged weight), so `sdxl-trt optimize` does not do it; this script makes the
variant for measuring it again:

    python benchmarks/context_kv_merge.py --engine /root/full --out /root/merged
    python benchmarks/session_variants.py --component unet --engine merged=/root/merged --engine separate=/root/full \
        --options neither --out unet.json

--out (outside --engine) becomes an engine directory: links to --engine's files, the UNet's optimized file written again
with the merge (its weights streamed from the original, the merged one added) and a manifest recording that file, so
`sdxl-trt bench /root/merged …` runs it end to end too.
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

from sdxl_trt.export.fuse_attention import MS_DOMAIN, Graph, drop_dead_nodes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unet_variant import rewrite_file, variant_copy  # noqa: E402

CONTEXT_KV_WEIGHT = "context_kv.weight.T"
METADATA_KEY = "sdxl_trt.packed_columns"  # JSON: {merged initializer: [[original name, first column, end column], …]}


def packed_columns(model: onnx.ModelProto) -> dict[str, list[tuple[str, int, int]]]:
    """The merged weights of `model` and where each original weight's columns are in them ({} when none)."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return {k: [tuple(c) for c in v] for k, v in json.loads(prop.value).items()}
    return {}


def merge_context_projections(model: onnx.ModelProto, read: Callable[[str], np.ndarray]) -> int:
    """Rewrite `model` in place (see the module's doc); `read(name)` gives an initializer's array (its data may live
    outside the model). Attentions whose K and V are MatMuls of one shared tensor by constant 2-D weights, each read
    by that attention alone, are merged, grouped by context tensor and head size (two or more per group). Returns how
    many attentions now read the merged projection."""
    g = Graph(model.graph)
    groups: dict[tuple[str, int], list] = {}
    for node in model.graph.node:
        if node.op_type != "MultiHeadAttention" or node.domain != MS_DOMAIN or len(node.input) != 3:
            continue
        q, k, v = (g.parent(node, i, "MatMul") for i in (0, 1, 2))
        if k is None or v is None or k.input[0] != v.input[0] or (q is not None and q.input[0] == k.input[0]):
            continue  # not two projections of one tensor, or self-attention (the query projects that tensor too)
        if any(len(g.consumers[m.output[0]]) != 1 or m.input[1] not in g.initializers for m in (k, v)):
            continue
        shapes = [tuple(g.initializers[m.input[1]].dims) for m in (k, v)]
        heads = next((a.i for a in node.attribute if a.name == "num_heads"), 0)
        if len(shapes[0]) != 2 or shapes[0] != shapes[1] or heads <= 0 or shapes[0][1] % heads:
            continue
        groups.setdefault((k.input[0], shapes[0][1] // heads), []).append((node, k, v, heads))
    merged = 0
    after_producer = {}  # context tensor → the new nodes, placed right after the context's producer
    columns = packed_columns(model)
    for (context, head_size), members in groups.items():
        if len(members) < 2:
            continue
        n = len(columns)
        weight_name = f"{CONTEXT_KV_WEIGHT}.{n}"
        prefix = f"/context_kv.{n}"
        parts, splits, spans, start = [], [], [], 0
        for _, k, v, heads in members:
            for m in (k, v):
                w = read(m.input[1])
                parts.append(w)
                splits.append(heads)
                spans.append((m.input[1], start, start + w.shape[1]))
                start += w.shape[1]
        weight = np.concatenate(parts, axis=1)
        total_heads = weight.shape[1] // head_size
        model.graph.initializer.append(numpy_helper.from_array(weight, weight_name))
        outputs = [f"{prefix}/kv_{i}" for i in range(len(splits))]
        # the shapes as Constant nodes of typed (not raw) data: a large model's raw tensors all go to its data file
        # (onnx_export.write_model), where ONNX Runtime's shape inference cannot read Split's sizes
        nodes = [helper.make_node("Constant", [], [f"{prefix}/heads_shape"], name=f"{prefix}/heads_shape",
                                  value=_ints([0, 0, total_heads, head_size])),
                 helper.make_node("Constant", [], [f"{prefix}/split"], name=f"{prefix}/split",
                                  value=_ints(splits)),
                 helper.make_node("MatMul", [context, weight_name], [f"{prefix}/MatMul_output_0"], name=f"{prefix}/MatMul"),
                 helper.make_node("Reshape", [f"{prefix}/MatMul_output_0", f"{prefix}/heads_shape"],
                                  [f"{prefix}/Reshape_output_0"], name=f"{prefix}/Reshape"),
                 helper.make_node("Transpose", [f"{prefix}/Reshape_output_0"], [f"{prefix}/Transpose_output_0"],
                                  name=f"{prefix}/Transpose", perm=[0, 2, 1, 3]),
                 helper.make_node("Split", [f"{prefix}/Transpose_output_0", f"{prefix}/split"], outputs,
                                  name=f"{prefix}/Split", axis=1)]
        after_producer.setdefault(context, []).extend(nodes)
        for i, (node, _, _, _) in enumerate(members):
            node.input[1], node.input[2] = outputs[2 * i], outputs[2 * i + 1]
        columns[weight_name] = spans
        merged += len(members)
    if not merged:
        return 0
    order = []
    for name, nodes in after_producer.items():  # graph inputs and initializers first; else right after their producer
        if name not in g.producer:
            order.extend(nodes)
    for node in model.graph.node:
        order.append(node)
        for out in node.output:
            order.extend(after_producer.get(out, []))
    del model.graph.node[:]
    model.graph.node.extend(order)
    drop_dead_nodes(model.graph)  # the separate K/V MatMuls and their weights
    for prop in list(model.metadata_props):
        if prop.key == METADATA_KEY:
            model.metadata_props.remove(prop)
    model.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_KEY, value=json.dumps(
        {k: [list(c) for c in v] for k, v in columns.items()})))
    return merged


def _ints(values) -> onnx.TensorProto:
    return helper.make_tensor("value", onnx.TensorProto.INT64, [len(values)], [int(v) for v in values])


def merge_file(src: Path, dest: Path) -> int:
    """`dest`: the ONNX file `src` with the projections merged (unet_variant.rewrite_file: weights streamed, files
    renamed into place). Returns what merge_context_projections returns."""
    return rewrite_file(src, dest, lambda model, read: (merge_context_projections(model, read), {}))


def merged_copy(engine: Path, out: Path) -> int:
    """`out`: an engine directory of links to `engine`'s files but the UNet's optimized file, which is written again
    with the projections merged, and a manifest that records that file as it now is (the runtime loads `out` like any
    engine directory). Returns what merge_context_projections returns."""
    return variant_copy(engine, out, lambda model, read: (merge_context_projections(model, read), {}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", required=True, type=Path, help="an engine directory with the UNet optimized with --no-context-once")
    p.add_argument("--out", required=True, type=Path, help="where the variant directory goes")
    args = p.parse_args()
    print(f"{merged_copy(args.engine, args.out)} attentions read the merged projection: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
