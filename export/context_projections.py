"""The UNet's cross-attention K and V projections, moved out of the step into a file run once per image.

Every cross-attention of an SDXL UNet projects the same text context (`encoder_hidden_states`, [B, 77, 2048]) by
its own K and V weights: 140 GEMMs a step (70 attentions in the base UNet, 2 each) whose results do not change over
the 30 steps of an image, reading about 680 MB of fp16 weights each time. `split_context_projections` moves those
MatMuls (and their weights) into a second model, the *context file*, whose outputs `context_k.<i>` and
`context_v.<i>` ([B, 77, D]) the UNet then takes as inputs where it computed them before. The runtime runs the
context file once per call and binds its outputs to the UNet's inputs for every step (runtime/context_stage.py). The
arithmetic is the same (the same MatMuls on the same inputs), so the results are bit for bit those of the file
before: tests/test_optimize.py checks it on the CPU.

Measured (issue 26) on the H200, UNet step at batch 2 1024² as one CUDA graph: 31.68 ms as optimized, 30.93 ms
with the projections moved out (benchmarks/results/h200-unet-attention-projections.json).
"""

from __future__ import annotations

import onnx
from onnx import helper

from .fuse_attention import MS_DOMAIN, Graph, drop_dead_nodes

CONTEXT_INPUT = "encoder_hidden_states"
OUTPUT_PREFIXES = ("context_k.", "context_v.")
# the model types whose optimized files take the split: the UNets the denoising loop runs (a ControlNet reads the
# context too, but is run beside a UNet of its own; left whole)
CONTEXT_CONTRACTS = ("unet", "unet_refiner", "unet_control")


def cross_attention_projections(model: onnx.ModelProto, g: Graph | None = None):
    """(attention, K MatMul, V MatMul) for each com.microsoft MultiHeadAttention (fuse_attention.py's) whose K and V
    are MatMuls of the same tensor by constant 2-D weights, each MatMul read by that attention alone and each weight
    by that MatMul alone (it moves whole into the context file: one file holds it, where LoRA merges it), where that
    tensor is the graph's context input (or a Cast of it: an fp16 file with fp32 inputs) and not what Q projects."""
    if CONTEXT_INPUT not in {i.name for i in model.graph.input}:
        return
    g = g or Graph(model.graph)
    for node in model.graph.node:
        if node.op_type != "MultiHeadAttention" or node.domain != MS_DOMAIN or len(node.input) < 3:
            continue
        q, k, v = (g.parent(node, i, "MatMul") for i in range(3))
        if k is None or v is None or k.input[0] != v.input[0] or (q is not None and q.input[0] == k.input[0]):
            continue
        if any(len(g.consumers[m.output[0]]) != 1 or m.input[1] not in g.initializers
               or len(g.initializers[m.input[1]].dims) != 2 or len(g.consumers[m.input[1]]) != 1 for m in (k, v)):
            continue
        source = k.input[0]
        cast = g.producer.get(source)
        if source != CONTEXT_INPUT and not (cast is not None and cast.op_type == "Cast"
                                            and cast.input[0] == CONTEXT_INPUT):
            continue
        yield node, k, v


def split_context_projections(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """Move the cross-attention K/V projections of `model` (in place) into a new model and return it (None when
    there are none). The moved initializers are copied whole (a stub without data stays one: its writer streams it)
    and leave `model`; the UNet gains the inputs `context_k.<i>`, `context_v.<i>` ([B, S, D], the weights' type) in the
    order of its attentions, which are also the context model's outputs."""
    g = Graph(model.graph)
    found = list(cross_attention_projections(model, g))
    if not found:
        return None
    context_input = next(i for i in model.graph.input if i.name == CONTEXT_INPUT)
    lead = [d.dim_param or d.dim_value for d in context_input.type.tensor_type.shape.dim][:2]
    nodes, outputs, moved, casts = [], [], set(), {}
    for i, (attention, k, v) in enumerate(found):
        for prefix, matmul, slot in zip(OUTPUT_PREFIXES, (k, v), (1, 2)):
            weight = g.initializers[matmul.input[1]]
            name = f"{prefix}{i}"
            source = matmul.input[0]
            if source != CONTEXT_INPUT and source not in casts:
                casts[source] = onnx.NodeProto()
                casts[source].CopyFrom(g.producer[source])
            nodes.append(helper.make_node("MatMul", [source, weight.name], [name], name=matmul.name))
            outputs.append(helper.make_tensor_value_info(name, weight.data_type, lead + [int(weight.dims[1])]))
            moved.add(weight.name)
            attention.input[slot] = name
    context_weights = []
    for tensor in model.graph.initializer:
        if tensor.name in moved:
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            context_weights.append(copy)
    graph = helper.make_graph(list(casts.values()) + nodes, "unet_context", [context_input], outputs,
                              initializer=context_weights)
    context = helper.make_model(graph, opset_imports=[o for o in model.opset_import if o.domain in ("", "ai.onnx")],
                                ir_version=model.ir_version)
    model.graph.input.extend(outputs)
    drop_dead_nodes(model.graph)  # the moved MatMuls and their weights, and a Cast nothing else reads
    return context


def context_path(unet_file):
    """Where the context file of an optimized UNet file goes: beside it, `<stem>.context.onnx`."""
    return unet_file.with_name(unet_file.name.removesuffix(".onnx") + ".context.onnx")
