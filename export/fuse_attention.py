"""Attention as one node: rewrite the subgraph that the TorchScript exporter writes for
`torch.nn.functional.scaled_dot_product_attention` into ONNX Runtime's `com.microsoft.MultiHeadAttention`.

ONNX Runtime's own UNet attention fusion (`fusion_attention_unet.py`) looks for the pattern of diffusers' classic
`AttnProcessor`; with torch ≥ 2 diffusers calls SDPA, which the exporter decomposes as

    Q = Reshape(q_proj, [B, -1, heads, d]) → Transpose(0,2,1,3) → Mul(√scale)
    K = Reshape(k_proj, [B, -1, heads, d]) → Transpose(0,2,3,1) → Mul(√scale)
    V = Reshape(v_proj, [B, -1, heads, d]) → Transpose(0,2,1,3)
    out = Softmax(Q @ K) @ V → Transpose(0,2,1,3) → Reshape([B, -1, heads·d])

(√scale computed from the head size at run time, or a constant when a scale was given). That whole subgraph is
`MultiHeadAttention(q_proj, k_proj, v_proj, num_heads=heads, scale=...)`; the projections stay separate MatMuls
with their own weights (not packed), so LoRA and refit can still change each of them. ONNX Runtime's CUDA
provider runs the node with its fused kernels (flash / memory-efficient attention) and its CPU provider runs it
too, so the fused file can be checked against the unfused one anywhere.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


class Graph:
    """Who produces and who reads each tensor of an ONNX graph, and its constants: what the rewriting passes look at
    (this module's, optimize.fold_pads_into_convs, benchmarks/context_kv_merge.py). A snapshot: rebuild it after
    changing the graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.producer = {out: n for n in graph.node for out in n.output}
        self.consumers = defaultdict(list)
        for n in graph.node:
            for name in n.input:
                self.consumers[name].append(n)
        self.initializers = {t.name: t for t in graph.initializer}

    def parent(self, node: onnx.NodeProto, index: int, op_type: str) -> onnx.NodeProto | None:
        if index >= len(node.input):
            return None
        p = self.producer.get(node.input[index])
        return p if p is not None and p.op_type == op_type else None

    def only_child(self, node: onnx.NodeProto, op_type: str) -> onnx.NodeProto | None:
        children = self.consumers.get(node.output[0], [])
        if len(children) != 1 or children[0].op_type != op_type:
            return None
        return children[0]

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            tensor = self.initializers[name]
            if tensor.data_location == onnx.TensorProto.EXTERNAL or not (tensor.raw_data or _has_typed_data(tensor)):
                return None
            return numpy_helper.to_array(tensor)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None


def _has_typed_data(tensor: onnx.TensorProto) -> bool:
    return bool(tensor.float_data or tensor.int64_data or tensor.int32_data or tensor.double_data)


def _perm(node: onnx.NodeProto) -> list[int]:
    for attr in node.attribute:
        if attr.name == "perm":
            return list(attr.ints)
    return []


def _heads(g: Graph, reshape: onnx.NodeProto) -> int | None:
    """The heads of a Reshape to [B, -1, heads, d]: its shape is a constant or a Concat of (B, -1, heads, d)."""
    shape = g.constant(reshape.input[1])
    if shape is not None:
        return int(shape[2]) if shape.size == 4 and shape[2] > 0 else None
    concat = g.parent(reshape, 1, "Concat")
    if concat is None or len(concat.input) != 4:
        return None
    heads = g.constant(concat.input[2])
    return int(heads.reshape(-1)[0]) if heads is not None and heads.size == 1 and heads.reshape(-1)[0] > 0 else None


def _head_input(g: Graph, node: onnx.NodeProto | None, perm: list[int]) -> tuple[str, int, list] | None:
    """(projection output, heads, nodes) for Reshape → Transpose(perm) ending at `node` (the Transpose)."""
    if node is None or node.op_type != "Transpose" or _perm(node) != perm:
        return None
    reshape = g.parent(node, 0, "Reshape")
    if reshape is None or len(g.consumers[reshape.output[0]]) != 1:
        return None
    heads = _heads(g, reshape)
    if heads is None:
        return None
    return reshape.input[0], heads, [reshape, node]


def _scaled(g: Graph, node: onnx.NodeProto | None, perm: list[int]):
    """A Transpose, optionally followed by Mul(√scale): (projection, heads, nodes, √scale or None if computed)."""
    factor = None
    nodes = []
    if node is not None and node.op_type == "Mul":
        transposed = [i for i in (0, 1) if g.parent(node, i, "Transpose") is not None]
        if len(transposed) != 1:
            return None
        other = node.input[1 - transposed[0]]
        value = g.constant(other)
        if value is not None:
            if value.size != 1:
                return None
            factor = float(value.reshape(-1)[0])
        elif not _computed_from_head_size(g, other):
            return None
        nodes.append(node)
        node = g.parent(node, transposed[0], "Transpose")
    found = _head_input(g, node, perm)
    if found is None:
        return None
    return found[0], found[1], found[2] + nodes, factor


def _computed_from_head_size(g: Graph, name: str) -> bool:
    """Whether `name` is the exporter's √(1/√d): Sqrt(Cast?(Div(1, Sqrt(Cast(d)))))."""
    node = g.producer.get(name)
    if node is None or node.op_type != "Sqrt":
        return False
    node = g.producer.get(node.input[0])
    if node is not None and node.op_type == "Cast":
        node = g.producer.get(node.input[0])
    if node is None or node.op_type != "Div":
        return False
    one = g.constant(node.input[0])
    inner = g.producer.get(node.input[1])
    return one is not None and one.size == 1 and float(one.reshape(-1)[0]) == 1.0 and \
        inner is not None and inner.op_type == "Sqrt"


def fuse_attention(model: onnx.ModelProto) -> int:
    """Replace each SDPA subgraph of `model` by one MultiHeadAttention node (in place); returns how many.
    Nodes left without consumers (the subgraph and the shape arithmetic of its Reshapes) are dropped."""
    g = Graph(model.graph)
    replaced: dict[int, onnx.NodeProto] = {}  # id of an output Reshape → the MultiHeadAttention that replaces it
    count = 0
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        axes = [a.i for a in softmax.attribute if a.name == "axis"]
        if axes and axes[0] not in (-1, 3):
            continue
        scores = g.parent(softmax, 0, "MatMul")
        weighted = g.only_child(softmax, "MatMul")
        if scores is None or weighted is None or weighted.input[0] != softmax.output[0]:
            continue
        q = _scaled(g, g.producer.get(scores.input[0]), [0, 2, 1, 3])
        k = _scaled(g, g.producer.get(scores.input[1]), [0, 2, 3, 1])
        v = _head_input(g, g.producer.get(weighted.input[1]), [0, 2, 1, 3])
        merge = g.only_child(weighted, "Transpose")
        if None in (q, k, v, merge) or _perm(merge) != [0, 2, 1, 3]:
            continue
        out = g.only_child(merge, "Reshape")
        if out is None or len({q[1], k[1], v[1]}) != 1:
            continue
        inner = [*q[2][1:], *k[2][1:], *v[2][1:], scores, softmax, weighted, merge]
        if any(sum(c.op_type != "Shape" for c in g.consumers[x.output[0]]) != 1 for x in inner):
            continue  # an intermediate result is used elsewhere (Shape nodes only read the size, which MHA keeps)
        heads = q[1]
        attributes = {"num_heads": heads}
        if q[3] is not None or k[3] is not None:
            if q[3] is None or k[3] is None:
                continue
            attributes["scale"] = q[3] * k[3]
        name = softmax.name.rsplit("/", 1)[0] + "/MultiHeadAttention" if "/" in softmax.name else \
            f"MultiHeadAttention_{count}"
        fused = helper.make_node("MultiHeadAttention", [q[0], k[0], v[0]], [out.output[0]], name=name,
                                 domain=MS_DOMAIN, **attributes)
        replaced[id(out)] = fused  # in the place of the output Reshape: every input of the new node exists by then
        count += 1
    if not count:
        return 0
    nodes = [replaced.get(id(node), node) for node in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    drop_dead_nodes(model.graph)  # the rest of each subgraph, unless something else still reads it
    import_ms_domain(model)
    return count


def import_ms_domain(model: onnx.ModelProto) -> None:
    """Declare the com.microsoft operator set if a node uses it and the model does not import it yet."""
    if any(n.domain == MS_DOMAIN for n in model.graph.node) and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes and initializers that no graph output depends on (in place; any node order)."""
    producer = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    live_nodes: set[int] = set()
    live = set()
    stack = [o.name for o in graph.output]
    while stack:
        name = stack.pop()
        if name in live:
            continue
        live.add(name)
        i = producer.get(name)
        if i is not None and i not in live_nodes:
            live_nodes.add(i)
            stack.extend(x for x in graph.node[i].input if x)
    if len(live_nodes) != len(graph.node):
        keep = [n for i, n in enumerate(graph.node) if i in live_nodes]
        del graph.node[:]
        graph.node.extend(keep)
    for i in reversed(range(len(graph.initializer))):  # in place: copying a repeated field copies the weights
        if graph.initializer[i].name not in live:
            del graph.initializer[i]
