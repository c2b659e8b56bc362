"""export/ort_internals.py: the only hooks into ONNX Runtime's private transformer-optimizer code. Every private
symbol they rely on is checked against the installed ONNX Runtime (this file fails when ONNX Runtime changes one),
a change gives one clear line instead of a silently different graph, the hooks take effect and are undone, and no
other production module patches ONNX Runtime. That `sdxl-trt optimize`'s files are unchanged is tests/test_optimize.py
(fusion counts, GroupNorm shapes, streamed = in-memory) and the fp16 export's is tests/test_export.py."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

ort = pytest.importorskip("onnxruntime")
oi = pytest.importorskip("sdxl_trt.export.ort_internals")

EXPORT = Path(__file__).resolve().parents[1] / "export"


def test_every_hooked_symbol_is_as_expected_in_the_installed_onnxruntime():
    """Fails loudly (naming the symbol and what changed) when an ONNX Runtime upgrade moves, renames, re-signs or
    stops calling anything the hooks rely on: update export/ort_internals.py (and CHECKED_VERSIONS) then."""
    oi.check_all()
    assert oi.SYMBOLS == oi.NHWC + oi.FUSE + oi.FLOAT16 and len(set(oi.SYMBOLS)) == len(oi.SYMBOLS)


def test_the_float16_hook_is_checked_in_both_copies_of_the_converter():
    from onnxruntime.transformers import float16

    top = oi.module("float16")  # what the optimizer imports
    for copy in (float16, top):
        for symbol in oi.FLOAT16:
            oi.check(symbol, owner=copy)


def _one_line(error: pytest.ExceptionInfo, *words: str) -> None:
    message = str(error.value)
    assert "\n" not in message and f"onnxruntime {ort.__version__}" in message, message
    assert "export/ort_internals.py" in message and all(w in message for w in words), message


@pytest.mark.parametrize("hook", ["nhwc", "fuse", "float16"])
def test_a_missing_symbol_is_one_clear_line(monkeypatch, hook):
    if hook == "nhwc":
        monkeypatch.delattr(oi.module("onnx_model_unet").UnetOnnxModel, "convert_conv_to_nhwc")
        enter, name = (lambda: oi.nhwc_weights_as_transposes(lambda t: None)), "convert_conv_to_nhwc"
    elif hook == "fuse":
        monkeypatch.delattr(oi.module("fusion_biassplitgelu").FusionBiasSplitGelu, "fuse")  # Fusion.fuse is left
        enter, name = (lambda: oi.fused_only_where({"BiasSplitGelu": lambda m, n: True})), "FusionBiasSplitGelu.fuse"
    else:
        from onnxruntime.transformers import float16

        monkeypatch.delattr(float16, "make_value_info_from_tensor")
        enter, name = (lambda: oi.initializer_value_info(lambda t: None)), "make_value_info_from_tensor"
    with pytest.raises(oi.OrtInternalsChanged) as error:
        with enter():
            pass
    _one_line(error, name)


def test_a_changed_signature_is_one_clear_line(monkeypatch):
    group_norm = oi.module("fusion_group_norm").FusionGroupNorm
    before = group_norm.fuse

    def fuse(self, add_node, input_name_to_nodes, output_name_to_node, channels_last):  # a new parameter
        raise AssertionError("not called")

    monkeypatch.setattr(group_norm, "fuse", fuse)
    with pytest.raises(oi.OrtInternalsChanged) as error:
        with oi.fused_only_where({"GroupNorm": lambda m, n: True}):
            pass
    _one_line(error, "FusionGroupNorm.fuse", "channels_last")
    monkeypatch.undo()
    assert group_norm.fuse is before


def test_a_call_site_that_is_gone_is_one_clear_line(monkeypatch):
    """The converter no longer calling the hooked function would leave the hook without effect: caught too."""
    from onnxruntime.transformers import float16

    def convert_float_to_float16(model, **kwargs):  # same name, no longer calls make_value_info_from_tensor
        return model

    monkeypatch.setattr(float16, "convert_float_to_float16", convert_float_to_float16)
    with pytest.raises(oi.OrtInternalsChanged) as error:
        with oi.initializer_value_info(lambda t: None):
            pass
    _one_line(error, "convert_float_to_float16", "make_value_info_from_tensor(value.initializer)")


def test_a_module_that_is_gone_is_one_clear_line():
    with pytest.raises(oi.OrtInternalsChanged) as error:
        oi.check(oi.Symbol("fusion_that_does_not_exist", "Fusion.fuse", ("self",)))
    _one_line(error, "fusion_that_does_not_exist")


def test_optimize_stops_with_the_line_before_writing_anything(tmp_path, monkeypatch, capsys):
    """Through `sdxl-trt optimize`'s file step: the one-line error (a UserError: the CLI prints it without a
    traceback), no output file."""
    import sdxl_trt.export.optimize as opt
    from sdxl_trt.runtime.errors import UserError

    src = tmp_path / "model.onnx"
    onnx.save(_conv_model(with_weight_data=True), str(src))
    monkeypatch.setattr(oi.module("fusion_nhwc_conv").FusionNhwcConv, "__init__", lambda self, model: None)
    dest = tmp_path / "out" / "model.cuda.fp16.onnx"
    dest.parent.mkdir()
    with pytest.raises(UserError) as error:
        opt.optimize_file(src, dest, "unet", keep_io_types=[])
    _one_line(error, "FusionNhwcConv.__init__", "takes (self, model)")
    assert not any(dest.parent.iterdir())


def _conv_model(with_weight_data: bool) -> onnx.ModelProto:
    """x [1,4,8,8] → Conv(W [8,4,3,3], B) → y; W without data (a stub, as optimize.py streams large weights)."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [8, 4, 3, 3], np.ones(8 * 4 * 9, np.float32).tobytes(), raw=True)
    if not with_weight_data:
        w.ClearField("raw_data")
    b = helper.make_tensor("B", TensorProto.FLOAT, [8], np.zeros(8, np.float32).tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_nhwc_hook_inserts_a_weight_transpose_and_reads_stubs_by_shape():
    """What optimize.py relies on: with the hook, ONNX Runtime's NhwcConv fusion leaves the weight (here a stub with
    no data) untouched behind a Transpose node, which optimize.py folds into a transposed stub."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    seen = []

    def to_array(tensor):
        seen.append(tensor.name)
        return np.broadcast_to(np.float32(0), tuple(tensor.dims))

    options = FusionOptions("unet")
    options.enable_attention = False
    with oi.nhwc_weights_as_transposes(to_array):
        model = optimize_model(_conv_model(with_weight_data=False), model_type="unet", opt_level=0,
                               optimization_options=options, use_gpu=True).model
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("NhwcConv") == 1 and "Conv" not in ops and seen == ["W"]
    transposes = [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] == "W"]
    assert len(transposes) == 1 and list(transposes[0].attribute[0].ints) == [0, 2, 3, 1]
    weight = next(t for t in model.graph.initializer if t.name == "W")
    assert not weight.raw_data and list(weight.dims) == [8, 4, 3, 3]


def test_the_float16_hook_converts_a_stub():
    from onnxruntime.transformers import float16

    from sdxl_trt.export.fp16 import stub_value_info

    model = _conv_model(with_weight_data=False)
    with stub_value_info():
        model = float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    weight = next(t for t in model.graph.initializer if t.name == "W")
    assert weight.data_type == TensorProto.FLOAT16 and not weight.raw_data


def test_the_hooks_are_undone_on_exit_and_on_error():
    from onnxruntime.transformers import float16

    oi.module("float16")
    owners = {
        (oi.module("fusion_nhwc_conv"), "numpy_helper"), (oi.module("onnx_model_unet").UnetOnnxModel,
                                                          "convert_conv_to_nhwc"),
        (oi.module("fusion_group_norm").FusionGroupNorm, "fuse"),
        (oi.module("fusion_biassplitgelu").FusionBiasSplitGelu, "fuse"),
        (float16, "make_value_info_from_tensor"), (oi.module("float16"), "make_value_info_from_tensor")}
    before = {(id(o), n): vars(o).get(n) for o, n in owners}
    hooks = [lambda: oi.nhwc_weights_as_transposes(lambda t: None),
             lambda: oi.fused_only_where({"GroupNorm": lambda m, n: True, "BiasSplitGelu": lambda m, n: True}),
             lambda: oi.initializer_value_info(lambda t: None)]
    for hook in hooks:
        with hook():
            assert {(id(o), n): vars(o).get(n) for o, n in owners} != before
        assert {(id(o), n): vars(o).get(n) for o, n in owners} == before
        with pytest.raises(KeyError):
            with hook():
                raise KeyError("inside")
        assert {(id(o), n): vars(o).get(n) for o, n in owners} == before


def test_set_attributes_removes_what_was_inherited():
    class Base:
        def f(self):
            return "base"

    class Child(Base):
        pass

    with oi.set_attributes([(Child, "f", lambda self: "hook")]):
        assert Child().f() == "hook"
    assert "f" not in vars(Child) and Child().f() == "base"


def test_no_other_production_module_patches_onnxruntime():
    """What would have caught issue 22 item 8: unittest.mock in production code, or ONNX Runtime's top-level script
    modules imported (to patch them) anywhere but the adapter."""
    offenders = []
    for path in sorted(EXPORT.rglob("*.py")) + sorted((EXPORT.parent / "runtime").rglob("*.py")):
        source = path.read_text()
        if re.search(r"^\s*(import unittest|from unittest)|\bmock\.patch", source, re.M):
            offenders.append(f"{path.name}: unittest.mock")
        if path.name != "ort_internals.py" and re.search(r"import_module\(\s*[\"'](fusion_|onnx_model|float16)", source):
            offenders.append(f"{path.name}: imports ONNX Runtime's private scripts")
    assert offenders == []
