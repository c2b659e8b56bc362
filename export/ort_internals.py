"""The one place where sdxl-trt reaches into ONNX Runtime's private transformer-optimizer scripts.

`sdxl-trt optimize` and the export's fp16 conversion drive ONNX Runtime's public entry points
(`onnxruntime.transformers.optimizer.optimize_model` with `FusionOptions`, `float16.convert_float_to_float16`), but
three things they need have no public switch:

  1. NhwcConv on weight stubs (`nhwc_weights_as_transposes`): ONNX Runtime's UNet/VAE models fuse Conv → NhwcConv
     with `FusionNhwcConv(update_weight=True)`, which transposes every weight in memory: a full-size UNet's weights
     are data-less stubs there (streamed to disk afterwards). `UnetOnnxModel.convert_conv_to_nhwc` is replaced so
     that the fusion inserts a Transpose node instead (`update_weight=False`, folded by optimize.py), and the
     fusion's `numpy_helper` is replaced so that its 4-D check can read a stub's shape.
  2. GroupNorm / BiasSplitGelu only at shapes the CUDA kernels take (`fused_only_where`): the fusions' `fuse` is
     wrapped; a fusion whose new node fails the given test is undone (its `nodes_to_add` / `nodes_to_remove`).
  3. fp16 conversion of stubs (`initializer_value_info`): the float16 converter reads an initializer's shape from its
     data (`float16.make_value_info_from_tensor`); it is replaced by one that reads the dims.

No public API (FusionOptions has no per-node filter, no "insert Transpose" switch, and the converter has no hook for
initializers without data) and no graph pass of our own could do these without re-implementing ONNX Runtime's
fusions or its converter, and the files must stay as they are. So every private symbol is listed below with the
ONNX Runtime versions it was checked against, checked when a hook is used (it exists, its signature is the expected
one, and the code that calls it still does), and a change raises `OrtInternalsChanged`: one line naming the
ONNX Runtime version and what changed. The hooks set attributes and restore them on exit (no `unittest.mock`); they
are not thread-safe (the optimize workers are processes). tests/test_ort_internals.py checks every symbol against
the installed ONNX Runtime.

ONNX Runtime's transformer scripts import one another as top-level modules (`fusion_nhwc_conv`, `float16`, …;
`onnxruntime.transformers` puts its folder on sys.path), so the hooks patch those module objects, and for `float16`,
also the copy imported as `onnxruntime.transformers.float16`.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Iterator

from ..runtime.errors import UserError

# Where every symbol below was checked (check_all): 1.31.1 (the GPU host's onnxruntime-gpu) and 1.32.0 (CI), where
# `sdxl-trt optimize` runs with these hooks; 1.20.1 (pyproject's lowest) and 1.24.1 pass check_all as well.
CHECKED_VERSIONS = ("1.20.1", "1.24.1", "1.31.1", "1.32.0")


class OrtInternalsChanged(UserError):
    """An ONNX Runtime private symbol that a hook relies on is missing or differs (one-line message)."""


@dataclass(frozen=True)
class Symbol:
    module: str  # top-level module name, as ONNX Runtime's scripts import it
    name: str  # attribute path inside the module: "Class.method" or "function"
    params: tuple[str, ...] | None = None  # inspect.signature parameter names; None: not a callable
    calls: tuple[str, ...] = ()  # source fragments of `name` that must be there (what makes the hook take effect)
    why: str = ""

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


# NhwcConv on weight stubs (hook 1)
NHWC = (
    Symbol("onnx_model_unet", "UnetOnnxModel.convert_conv_to_nhwc", ("self",), why="replaced: update_weight=False"),
    Symbol("onnx_model_unet", "UnetOnnxModel._optimize", ("self", "options", "progress_bar"),
           ("self.convert_conv_to_nhwc()",), why="calls the replaced convert_conv_to_nhwc"),
    Symbol("fusion_nhwc_conv", "FusionNhwcConv.__init__", ("self", "model", "update_weight"),
           why="constructed with update_weight=False"),
    Symbol("fusion_nhwc_conv", "FusionNhwcConv.fuse", ("self", "conv", "input_name_to_nodes", "output_name_to_node"),
           ("numpy_helper.to_array(weight_tensor)", "if self.update_weight:", "create_transpose_node(conv.input[1]"),
           why="reads the weight through the module's numpy_helper; inserts a weight Transpose without update_weight"),
    Symbol("fusion_nhwc_conv", "numpy_helper", why="replaced by one whose to_array reads a stub's shape"),
)
# GroupNorm / BiasSplitGelu only where the CUDA kernels take the shape (hook 2)
FUSE = (
    Symbol("fusion_base", "Fusion.__init__", ("self", "model", "fused_op_type", "search_op_types", "description"),
           ("self.nodes_to_remove", "self.nodes_to_add"),
           why="a fusion's pending nodes, undone by the wrapper"),
    Symbol("fusion_base", "Fusion.apply", ("self",), ("self.fuse(node, input_name_to_nodes, output_name_to_node)",),
           why="calls the wrapped fuse"),
    Symbol("fusion_group_norm", "FusionGroupNorm.fuse", ("self", "add_node", "input_name_to_nodes",
                                                         "output_name_to_node"), why="wrapped"),
    Symbol("fusion_biassplitgelu", "FusionBiasSplitGelu.fuse", ("self", "gelu_node", "input_name_to_nodes",
                                                                "output_name_to_node"), why="wrapped"),
)
# fp16 conversion of stubs (hook 3), and the converter's rounding used for the streamed weights (not hooked)
FLOAT16 = (
    Symbol("float16", "make_value_info_from_tensor", ("tensor",), why="replaced: reads dims, not data"),
    Symbol("float16", "convert_float_to_float16", calls=("make_value_info_from_tensor(value.initializer)",),
           why="calls the replaced make_value_info_from_tensor for converted initializers"),
    Symbol("float16", "convert_np_to_float16", ("np_array", "min_positive_val", "max_finite_val"),
           why="export/fp16.stub_to_fp16 converts streamed weights as the converter converts loaded ones"),
)
SYMBOLS = NHWC + FUSE + FLOAT16


def ort_version() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "(not installed)"
    return getattr(onnxruntime, "__version__", "(unknown version)")


def changed(what: str) -> OrtInternalsChanged:
    return OrtInternalsChanged(
        f"onnxruntime {ort_version()}: {what} (private optimizer code that sdxl-trt hooks, checked against "
        f"onnxruntime {', '.join(CHECKED_VERSIONS)}: install one of those, or update export/ort_internals.py)")


def module(name: str):
    """One of ONNX Runtime's transformer scripts, as its other scripts import it (top-level)."""
    import onnxruntime.transformers  # noqa: F401  (puts its folder on sys.path)

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise changed(f"module {name} cannot be imported ({e})") from None


def check(symbol: Symbol, owner=None):
    """`symbol`'s object (in `owner`, default its module) if it is there as expected, else OrtInternalsChanged."""
    obj = module(symbol.module) if owner is None else owner
    for part in symbol.name.split("."):
        if not hasattr(obj, part):
            raise changed(f"{symbol} is missing")
        obj = getattr(obj, part)
    if symbol.params is not None:
        try:
            params = tuple(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            raise changed(f"{symbol} is not a function") from None
        if params != symbol.params:
            raise changed(f"{symbol} takes ({', '.join(params)}), expected ({', '.join(symbol.params)})")
    if symbol.calls:
        try:
            source = inspect.getsource(obj)
        except (OSError, TypeError):
            raise changed(f"{symbol}'s source cannot be read") from None
        for fragment in symbol.calls:
            if fragment not in source:
                raise changed(f"{symbol} no longer contains {fragment!r}")
    return obj


def check_all() -> None:
    """Every symbol the hooks rely on, against the installed ONNX Runtime (tests; a hook checks its own on use)."""
    for symbol in SYMBOLS:
        check(symbol)


@contextlib.contextmanager
def set_attributes(changes: list[tuple[object, str, object]]) -> Iterator[None]:
    """setattr each (owner, name, value); on exit, put back what was there (an inherited attribute: delattr)."""
    saved = []
    try:
        for owner, name, value in changes:
            own = vars(owner)
            saved.append((owner, name, name in own, own.get(name)))
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, had, old in reversed(saved):
            if had:
                setattr(owner, name, old)
            else:
                delattr(owner, name)


@contextlib.contextmanager
def nhwc_weights_as_transposes(to_array: Callable) -> Iterator[None]:
    """Hook 1: ONNX Runtime's NhwcConv fusion inserts a Transpose node for each weight instead of transposing it in
    memory, and reads weights through `to_array` (give it a stub's shape)."""
    for symbol in NHWC:
        check(symbol)
    nhwc = module("fusion_nhwc_conv")
    fusion = nhwc.FusionNhwcConv

    def convert_conv_to_nhwc(self):
        fusion(self, update_weight=False).apply()

    with set_attributes([(nhwc, "numpy_helper", SimpleNamespace(to_array=to_array)),
                         (module("onnx_model_unet").UnetOnnxModel, "convert_conv_to_nhwc", convert_conv_to_nhwc)]):
        yield


FUSIONS = {"GroupNorm": ("fusion_group_norm", "FusionGroupNorm"),
           "BiasSplitGelu": ("fusion_biassplitgelu", "FusionBiasSplitGelu")}


@contextlib.contextmanager
def fused_only_where(rules: dict[str, Callable]) -> Iterator[None]:
    """Hook 2: for each fused op type in `rules` ({"GroupNorm" | "BiasSplitGelu": supported(onnx_model, node)}),
    a fusion that adds a node of that type for which `supported` is false is undone (the graph keeps the plain
    form there)."""
    for symbol in FUSE:
        check(symbol)
    changes = []
    for op_type, supported in rules.items():
        name, cls = FUSIONS[op_type]
        fusion_class = getattr(module(name), cls)
        original = fusion_class.fuse

        def fuse(self, node, input_name_to_nodes, output_name_to_node, original=original, op_type=op_type,
                 supported=supported):
            added, removed = len(self.nodes_to_add), len(self.nodes_to_remove)
            original(self, node, input_name_to_nodes, output_name_to_node)
            if any(n.op_type == op_type and not supported(self.model, n) for n in self.nodes_to_add[added:]):
                del self.nodes_to_add[added:]
                del self.nodes_to_remove[removed:]

        changes.append((fusion_class, "fuse", fuse))
    with set_attributes(changes):
        yield


@contextlib.contextmanager
def initializer_value_info(make: Callable) -> Iterator[None]:
    """Hook 3: ONNX Runtime's float16 converter makes an initializer's value info with `make(tensor)` (give it a
    stub's dims). Applied to each loaded copy of the converter: `onnxruntime.transformers.float16`, and `float16`,
    which the optimizer imports."""
    from onnxruntime.transformers import float16

    copies = list({id(m): m for m in (float16, sys.modules.get("float16")) if m is not None}.values())
    for copy in copies:
        for symbol in FLOAT16:
            check(symbol, owner=copy)
    with set_attributes([(copy, "make_value_info_from_tensor", make) for copy in copies]):
        yield
