"""The fp16 variant of an exported fp32 model, converted with ONNX Runtime's float16 tool (what ORT's own Stable
Diffusion scripts use), keeping in fp32 what diffusers keeps in fp32 under fp16:
  - inputs the contract names float32 (timesteps, micro-conditioning values),
  - the sinusoidal embeddings of timesteps and time ids (`time_proj`, `add_time_proj`): sin/cos of arguments
    up to ~1000 lose whole radians in fp16,
  - random-number ops.
Resize runs in fp16 (nearest-neighbour upsampling only copies values); the converter keeps its `scales` input fp32
itself (ONNX Runtime's float16.ALWAYS_FLOAT_INPUTS), which ONNX Runtime requires. Blocking the whole node, as this
module did at first, wrapped each upsampler in two Casts and ran it in fp32: 1.4 ms of a 1024² VAE decode on the H100
(benchmarks/results/h100-vae-variants-ce83b03.json).

The converter rewrites the graph; the weights are converted outside it, one tensor at a time, straight from the
fp32 file's external data into the fp16 file's: a full-size UNet (10 GB of fp32 weights) never sits in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .contract import Component
from .onnx_export import external_info, initializers, read_external, toposort_nodes, write_model

OP_BLOCK = ["RandomNormalLike", "RandomNormal", "RandomUniformLike"]
FP32_SCOPES = ("/time_proj/", "/add_time_proj/")  # node-name scopes of diffusers' Timesteps modules


def convert_to_fp16(fp32_path: Path, dest: Path, component: Component) -> Path:
    from onnxruntime.transformers import float16

    model, stubs = load_stubbed(fp32_path)
    model = onnx.shape_inference.infer_shapes(model)
    with stub_value_info():
        model = float16.convert_float_to_float16(model, **fp16_options(model, component.fp32_inputs()),
                                                 disable_shape_infer=True)
    tidy_converted(model)
    write_model(model, dest, fp32_path.parent, stubs=stubs, transform=stub_to_fp16)
    return dest


def load_stubbed(path: Path, load_below: int = 0) -> tuple[onnx.ModelProto, dict]:
    """The model at `path` with its external weights as data-less stubs (dims and type only), and {name: where the
    data is}; weights of fewer than `load_below` bytes are read in (fusions look at norms' and biases' values)."""
    model = onnx.load(str(path), load_external_data=False)
    stubs = {}
    for tensor in initializers(model):
        info = external_info(tensor)
        if info is None:
            continue
        if int(info.get("length", load_below)) < load_below:
            tensor.raw_data = read_external(info, path.parent)
        else:
            stubs[tensor.name] = info
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    return model, stubs


def stub_value_info():
    """ONNX Runtime's converter reads an initializer's shape from its data; a stub has only its dims (a private hook:
    ort_internals.initializer_value_info)."""
    from .ort_internals import initializer_value_info

    def value_info(tensor):
        return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))

    return initializer_value_info(value_info)


def stub_to_fp16(tensor: onnx.TensorProto, data: bytes) -> bytes:
    """A stub's fp32 bytes as the converter typed the tensor: fp16, or fp32 where it feeds a blocked node."""
    from onnxruntime.transformers import float16

    if tensor.data_type != onnx.TensorProto.FLOAT16:
        return data
    return float16.convert_np_to_float16(np.frombuffer(data, dtype=np.float32)).tobytes()


def fp16_options(model: onnx.ModelProto, keep_io_types: list[str]) -> dict:
    """What ONNX Runtime's float16 converter keeps in fp32 (see the module doc)."""
    blocked = [n.name for n in model.graph.node if any(scope in n.name for scope in FP32_SCOPES)]
    return {"keep_io_types": keep_io_types, "op_block_list": OP_BLOCK, "node_block_list": blocked}


def tidy_converted(model: onnx.ModelProto) -> None:
    """What the converter leaves to fix: duplicate Casts (ORT ≤ 1.31), input casts appended after their consumers."""
    share_duplicate_casts(model)
    toposort_nodes(model)


def share_duplicate_casts(model: onnx.ModelProto) -> None:
    """ONNX Runtime ≤ 1.31's converter casts a tensor once per blocked consumer, every Cast writing the same output
    name, which breaks single assignment (1.32 shares one Cast). Keep the first of identical Casts."""
    first: dict[str, onnx.NodeProto] = {}
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Cast" and len(node.output) == 1 and node.output[0] in first:
            other = first[node.output[0]]
            if other.op_type == "Cast" and list(other.input) == list(node.input) and other.attribute == node.attribute:
                continue
            raise ValueError(f"fp16 conversion wrote {node.output[0]!r} twice with different nodes")
        for name in node.output:
            if name:  # "": an omitted optional output
                first.setdefault(name, node)
        nodes.append(node)
    if len(nodes) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        seen, infos = set(), []
        for info in model.graph.value_info:
            if info.name not in seen:
                seen.add(info.name)
                infos.append(info)
        del model.graph.value_info[:]
        model.graph.value_info.extend(infos)
