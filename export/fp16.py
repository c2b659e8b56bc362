"""The fp16 variant of an exported fp32 model, converted with ONNX Runtime's float16 tool (what ORT's own Stable
Diffusion scripts use), keeping in fp32 what diffusers keeps in fp32 under fp16:
  - inputs the contract names float32 (timesteps, micro-conditioning values),
  - the sinusoidal embeddings of timesteps and time ids (`time_proj`, `add_time_proj`): sin/cos of arguments
    up to ~1000 lose whole radians in fp16,
  - Resize (its `scales` input must stay fp32 for ONNX Runtime) and random-number ops.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .contract import Component
from .onnx_export import toposort_nodes, write_model

OP_BLOCK = ["Resize", "RandomNormalLike", "RandomNormal", "RandomUniformLike"]
FP32_SCOPES = ("/time_proj/", "/add_time_proj/")  # node-name scopes of diffusers' Timesteps modules


def convert_to_fp16(fp32_path: Path, dest: Path, component: Component) -> Path:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    graph_only = onnx.load(str(fp32_path), load_external_data=False)
    # Shapes are inferred on the graph without its weights (a full-size UNet is over protobuf's 2 GiB limit).
    model = onnx.shape_inference.infer_shapes(graph_only)
    onnx.load_external_data_for_model(model, str(fp32_path.parent))
    blocked = [n.name for n in model.graph.node if any(scope in n.name for scope in FP32_SCOPES)]
    fp32_io = component.fp32_inputs()
    model = convert_float_to_float16(model, keep_io_types=fp32_io, op_block_list=OP_BLOCK, node_block_list=blocked,
                                     disable_shape_infer=True)
    toposort_nodes(model)
    write_model(model, dest, fp32_path.parent)
    return dest
