"""A bf16 variant of an fp32 ONNX model, for TensorRT's strongly typed networks (whose precision is the file's).

Used for the SDXL VAE, which overflows fp16 but keeps fp32's range in bf16: every float weight and constant becomes
bf16 (rounded to nearest even), casts to fp32 become casts to bf16, and the model's float inputs and outputs stay
fp32 through a cast at each end, so the contract (and the runtime's buffers) are those of the fp32 file. Resize's
`roi` and `scales` stay fp32 (ONNX requires it). Needs the `onnx` package (not the runtime's own dependencies).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError
from .fileio import atomic_file

FP32_OPERANDS = {"Resize": (1, 2)}  # op → input positions that must stay float32


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """fp32 → bf16 bit patterns (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def convert_to_bf16(src: Path, dest: Path) -> Path:
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise UserError("--vae-precision bf16 converts the fp32 ONNX file and needs the onnx package: "
                        "pip install onnx") from None
    model = onnx.load(str(src))  # with external data: VAE weights are a few hundred MB
    graph = model.graph
    keep = set()
    for node in graph.node:
        for position in FP32_OPERANDS.get(node.op_type, ()):
            if position < len(node.input):
                keep.add(node.input[position])

    def convert(tensor):
        if tensor.data_type != TensorProto.FLOAT or tensor.name in keep:
            return tensor
        bits = to_bf16_bits(numpy_helper.to_array(tensor))
        return helper.make_tensor(tensor.name, TensorProto.BFLOAT16, list(tensor.dims), bits.tobytes(), raw=True)

    for i, tensor in enumerate(graph.initializer):
        graph.initializer[i].CopyFrom(convert(tensor))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value" and node.output[0] not in keep:
                attr.t.CopyFrom(convert(attr.t))
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.BFLOAT16
            elif node.op_type == "ConstantOfShape" and attr.name == "value":
                attr.t.CopyFrom(convert(attr.t))
    casts_in, renamed = [], {}
    for value in graph.input:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            renamed[value.name] = f"{value.name}_bf16"
            casts_in.append(helper.make_node("Cast", [value.name], [renamed[value.name]], to=TensorProto.BFLOAT16,
                                             name=f"cast_{value.name}_to_bf16"))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    casts_out = []
    for value in graph.output:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            inner = f"{value.name}_bf16"
            for node in graph.node:
                for i, name in enumerate(node.output):
                    if name == value.name:
                        node.output[i] = inner
            casts_out.append(helper.make_node("Cast", [inner], [value.name], to=TensorProto.FLOAT,
                                              name=f"cast_{value.name}_to_fp32"))
    nodes = casts_in + list(graph.node) + casts_out
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # float types inside changed; TensorRT infers them
    with atomic_file(dest) as tmp:  # one file: the SDXL VAE's weights are ~170 MB in bf16, far below protobuf's 2 GiB
        onnx.save(model, str(tmp))
    return dest
