"""LoRA adapters without re-export: merged weights for the affected ONNX initializers, handed to ONNX Runtime as
initializer overrides when a session is made.

Formats read (safetensors; F32, F16 or BF16 tensors):
  diffusers / PEFT  `unet.<module>.lora_A.weight` / `lora_B.weight` (also the older `lora.down` / `lora.up`,
                    `lora_linear_layer.down` / `.up` and attention-processor `processor.to_q_lora.down` names), with
                    `text_encoder.` (CLIP-L) and `text_encoder_2.` (OpenCLIP bigG) for the text encoders; an optional
                    `<module>.alpha`
  kohya (sd-scripts) `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`, `lora_te1_…`,
                    `lora_te2_…`, module paths with `_` for `.`, the UNet named as diffusers does or as the original
                    (SGM) checkpoints do (`input_blocks_4_1_…`)
Each adapter layer adds scale · alpha / rank · (up @ down) to its module's weight (alpha = rank when the file has
none, as diffusers does); linear and convolution layers (LoCon) both. diffusers' `load_lora_weights` + `fuse_lora`
is the reference (tests/test_lora.py).

An ONNX file holds a module's weight as `<module>.weight.T` ([in, out], a MatMul's), `<module>.weight` ([out, in] of a
Gemm, or a convolution's [out, in, kh, kw]) or `<module>.weight_nhwc` (an optimized NHWC convolution's [out, kh, kw,
in]); the ONNX names are the torch parameter names behind a prefix per component (PREFIXES). Merging is done in
fp32 and stored in the file's dtype.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import struct
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

log = logging.getLogger(__name__)

# component → (prefix of LoRA module paths in diffusers naming to drop, prefix of the ONNX names to add)
PREFIXES = {"unet": ("", "unet."), "clip_l": ("text_model.", "model."), "clip_g": ("", "model.")}
# components that hold another's weights under the same ONNX names: the base UNet exported again to take ControlNet
# residuals (export/models/controlnet.py) gets the base UNet's adapters
SAME_WEIGHTS = {"unet_control": "unet"}
TARGETS = {"unet": "unet", "text_encoder": "clip_l", "text_encoder_2": "clip_g",
           "lora_unet": "unet", "lora_te1": "clip_l", "lora_te2": "clip_g"}
SUFFIXES = (".weight.T", ".weight_nhwc", ".weight")
UNSUPPORTED = ("hada_", "lokr_", "dora_scale", "lora_magnitude_vector", ".diff", "oft_")


@dataclass(frozen=True)
class Adapter:
    path: Path
    scale: float = 1.0

    @property
    def label(self) -> str:
        return f"{self.path.name}:{self.scale:g}"


def parse_spec(spec: str) -> Adapter:
    """`PATH[:SCALE]` (the CLI's `--lora`)."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            return Adapter(Path(path), float(tail))
        except ValueError:
            pass
    return Adapter(Path(spec), 1.0)


def as_adapters(loras, names: dict | None = None) -> tuple[Adapter, ...]:
    """`loras` as given to the API: None, "path[:scale]" strings, paths, (path, scale) pairs or Adapters, with scales
    (Python or numpy numbers) within validate.LORA_SCALE_RANGE. `names`: how the caller spells `loras` (validate.py)."""
    from .validate import LORA_SCALE_RANGE, as_number, shown, spelled

    flag = spelled("loras", names)
    if isinstance(loras, (str, Path, Adapter)):
        loras = [loras]
    if loras is not None and not isinstance(loras, (list, tuple)):
        raise UserError(f"{flag}: expected a list of adapters, got {type(loras).__name__}")
    out = []
    for item in loras or ():
        if isinstance(item, Adapter):
            adapter = item
        elif isinstance(item, (str, Path)):
            adapter = parse_spec(item) if isinstance(item, str) else Adapter(item)
        elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (str, Path)):
            scale = as_number(item[1])
            if scale is None:
                raise UserError(f"{flag} {str(item[0])!r}: scale {shown(item[1])} is not a number")
            adapter = Adapter(Path(item[0]), float(scale))
        else:
            raise UserError(f"{flag} {item!r}: expected \"path[:scale]\", a path, a (path, scale) pair or an Adapter")
        low, high = LORA_SCALE_RANGE
        if not np.isfinite(adapter.scale):
            raise UserError(f"{flag} {str(adapter.path)!r}: scale {adapter.scale} is not a finite number")
        if not low <= adapter.scale <= high:
            raise UserError(f"{flag} {str(adapter.path)!r}: scale {adapter.scale:g} is outside {low:g} to {high:g} "
                            "(adapters are used at about 0 to 1.5, sliders at up to ±8)")
        out.append(adapter)
    return tuple(out)


# --- reading ----------------------------------------------------------------------------------------------------

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bf16"}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as fp32 numpy (BF16 widened by hand: numpy has no bfloat16)."""
    if path.is_dir():
        raise UserError(f"LoRA {path}: is a folder; name the adapter's .safetensors file in it")
    if not path.is_file():
        raise UserError(f"LoRA {path}: no such file")
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 2**20:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
            data = f.read()
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"LoRA {path}: not a safetensors file ({e})") from None
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        kind = DTYPES.get(info.get("dtype"))
        begin, end = info["data_offsets"]
        if kind is None:
            raise UserError(f"LoRA {path}: {key} is {info.get('dtype')}; LoRA tensors must be F32, F16 or BF16")
        if end > len(data):
            raise UserError(f"LoRA {path}: truncated (tensor {key} ends past the file)")
        raw = data[begin:end]
        try:
            if kind == "bf16":
                array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                array = np.frombuffer(raw, kind).astype(np.float32)
            out[key] = array.reshape(info["shape"])
        except (ValueError, TypeError) as e:  # offsets that do not fit the dtype or the shape: a damaged file
            raise UserError(f"LoRA {path}: tensor {key} does not fit its recorded offsets and shape ({e})") from None
    return out


@dataclass
class Layer:
    """One adapted module: down [r, in(, kh, kw)], up [out, r(, 1, 1)], alpha."""
    down: np.ndarray | None = None
    up: np.ndarray | None = None
    alpha: float | None = None

    def delta(self, scale: float = 1.0, layout: str = ".weight") -> np.ndarray:
        """scale · alpha / rank · up @ down in fp32, formed directly in the layout the file stores the weight in
        (`layout`, a suffix of SUFFIXES): ".weight" the module's own ([out, in] or [out, in, kh, kw]), ".weight.T"
        [in, out] (MatMul's transposed weight), ".weight_nhwc" [out, kh, kw, in] (optimized convolutions). The scales
        multiply the small factor and the large product is written once, contiguous (no strided copy of it)."""
        rank = self.down.shape[0]
        factor = scale * (self.alpha if self.alpha is not None else rank) / rank
        up = self.up.reshape(self.up.shape[0], rank) * np.float32(factor)
        down = self.down
        if layout == ".weight.T":
            return down.reshape(rank, -1).T @ up.T
        if layout == ".weight_nhwc" and down.ndim == 4:
            down = np.ascontiguousarray(down.transpose(0, 2, 3, 1))
        return (up @ down.reshape(rank, -1)).reshape(up.shape[0], *down.shape[1:])


# the forms of one key: (component prefix, module, part) with part down / up / alpha
PEFT = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+?)\.(?:lora_A|lora\.down|lora_linear_layer\.down)"
                  r"(?:\.default)?\.weight$")
PEFT_UP = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+?)\.(?:lora_B|lora\.up|lora_linear_layer\.up)"
                     r"(?:\.default)?\.weight$")
PROCESSOR = re.compile(r"^(unet)\.(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
KOHYA = re.compile(r"^(lora_unet|lora_te1|lora_te2)_(.+)\.(lora_down|lora_up)\.weight$")
ALPHA = re.compile(r"^(unet|text_encoder|text_encoder_2|lora_unet|lora_te1|lora_te2)[._](.+)\.alpha$")


def parse_keys(tensors: dict[str, np.ndarray], path: Path) -> dict[tuple[str, str, bool], Layer]:
    """{(component, module, kohya-flattened?): Layer} from a LoRA file's tensors."""
    layers: dict[tuple[str, str, bool], Layer] = {}

    def layer(prefix: str, module: str) -> Layer:
        return layers.setdefault((TARGETS[prefix], module, prefix.startswith("lora_")), Layer())

    for key, value in tensors.items():
        if any(mark in key for mark in UNSUPPORTED):
            raise UserError(f"LoRA {path}: {key}: LyCORIS / DoRA adapters are not supported (plain LoRA only)")
        if m := PEFT.match(key):
            layer(m[1], m[2]).down = value
        elif m := PEFT_UP.match(key):
            layer(m[1], m[2]).up = value
        elif m := PROCESSOR.match(key):
            target = layer(m[1], f"{m[2]}.{m[3]}{'.0' if m[3] == 'to_out' else ''}")
            setattr(target, m[4], value)
        elif m := KOHYA.match(key):
            setattr(layer(m[1], m[2]), "down" if m[3] == "lora_down" else "up", value)
        elif m := ALPHA.match(key):
            if value.size != 1:
                raise UserError(f"LoRA {path}: {key} should hold one number, it has shape {list(value.shape)}")
            layer(m[1], m[2]).alpha = float(value.reshape(()))
        else:
            raise UserError(f"LoRA {path}: {key} is not a LoRA key this tool knows (diffusers/PEFT "
                            "`unet.….lora_A.weight`, kohya `lora_unet_….lora_down.weight`)")
    for (component, module, _), found in layers.items():
        if found.down is None or found.up is None:
            raise UserError(f"LoRA {path}: {module} ({component}) has "
                            f"{'no down/lora_A' if found.down is None else 'no up/lora_B'} weight")
        if found.down.shape[0] != found.up.shape[1] or found.down.ndim != found.up.ndim or \
                (found.up.ndim == 4 and found.up.shape[2:] != (1, 1)):
            raise UserError(f"LoRA {path}: {module} ({component}): ranks do not match (down "
                            f"{list(found.down.shape)}, up {list(found.up.shape)})")
        if found.down.ndim < 2 or found.down.shape[0] == 0 or 0 in found.down.shape or 0 in found.up.shape:
            raise UserError(f"LoRA {path}: {module} ({component}) has rank 0 or an empty weight (down "
                            f"{list(found.down.shape)}, up {list(found.up.shape)})")
    if not layers:
        raise UserError(f"LoRA {path}: no LoRA weights in it")
    return layers


# --- the model's side -------------------------------------------------------------------------------------------

class Weights:
    """The module weights of one ONNX file, or of the files that together hold a component's weights (an optimized
    UNet's file and its context file, which live in one folder): ONNX name per module (torch parameter path, without
    the component's prefix), the file each is in, layout and shape, read lazily."""

    def __init__(self, path: Path | tuple[Path, ...], component: str):
        import onnx

        paths = path if isinstance(path, tuple) else (path,)
        self.path, self.component = paths[0], component
        self.tensors, self.file = {}, {}  # initializer name → its TensorProto, the file that holds it
        for part in paths:
            for t in onnx.load(str(part), load_external_data=False).graph.initializer:
                self.tensors[t.name], self.file[t.name] = t, part
        prefix = PREFIXES[component][1]
        self.modules: dict[str, str] = {}  # module path → initializer name
        for name in self.tensors:
            for suffix in SUFFIXES:
                if name.startswith(prefix) and name.endswith(suffix):
                    self.modules.setdefault(name[len(prefix):-len(suffix)], name)
                    break

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].dims)

    def read(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.tensors[name], base_dir=str(self.file[name].parent))

    def layout(self, name: str) -> str:
        """How the file stores `name`: its suffix (".weight.T", ".weight_nhwc" or ".weight"; see Layer.delta)."""
        return next(suffix for suffix in SUFFIXES if name.endswith(suffix))

    def resolve(self, module: str, flattened: bool) -> str | None:
        """The module path in this file for a LoRA module path (diffusers naming, or kohya's with `_` for `.`)."""
        if flattened:
            return self.flat.get(module)
        module = module.removeprefix(PREFIXES[self.component][0])
        return module if module in self.modules else None

    def unused(self, module: str) -> bool:
        """A text encoder layer past the last one the file has: SDXL reads CLIP-L's penultimate hidden states, so the
        export drops its last layer (and LoRA files adapt it anyway); changing it changes nothing."""
        found = re.search(r"encoder[._]layers[._](\d+)[._]", module)
        return found is not None and self.last_layer is not None and int(found[1]) > self.last_layer

    @functools.cached_property
    def last_layer(self) -> int | None:
        """A text encoder's last layer in this file (None for other components)."""
        if not self.component.startswith("clip"):
            return None
        layers = [int(m[1]) for m in map(re.compile(r"encoder\.layers\.(\d+)\.").search, self.modules) if m]
        return max(layers, default=None)

    @functools.cached_property
    def flat(self) -> dict[str, str]:
        """kohya's names: every module path with `_` for `.` (with and without the dropped prefix), and for a UNet
        also its original (SGM) checkpoint name."""
        strip = PREFIXES[self.component][0]
        out = {}
        for module in self.modules:
            out[module.replace(".", "_")] = module
            if strip:
                out[(strip + module).replace(".", "_")] = module
        if self.component == "unet":
            for module, sgm in sgm_names(self.modules).items():
                out.setdefault(sgm.replace(".", "_"), module)
        return out


RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
DIRECT = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
          "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
          "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def sgm_names(modules) -> dict[str, str]:
    """{diffusers UNet module path: the original checkpoints' (SGM) path}, the block numbering derived from the
    modules present (resnets per down block, which up blocks have attentions)."""
    lpb = 1 + max((int(m[2]) for m in map(re.compile(r"^down_blocks\.(\d+)\.resnets\.(\d+)\.").match, modules)
                   if m), default=0)  # layers (resnets) per down block; up blocks have one more
    up_attn = {int(m[1]) for m in map(re.compile(r"^up_blocks\.(\d+)\.attentions\.").match, modules) if m}
    out = {}
    for module in modules:
        head, rest = None, ""
        if m := re.match(r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(?:\.(.+))?$", module):
            head = f"input_blocks.{1 + int(m[1]) * (lpb + 1) + int(m[3])}.{0 if m[2] == 'resnets' else 1}"
            rest, resnet = m[4] or "", m[2] == "resnets"
        elif m := re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv$", module):
            head, resnet = f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op", False
        elif m := re.match(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.+))?$", module):
            head = f"middle_block.{2 * int(m[2]) if m[1] == 'resnets' else 1}"
            rest, resnet = m[3] or "", m[1] == "resnets"
        elif m := re.match(r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(?:\.(.+))?$", module):
            head = f"output_blocks.{int(m[1]) * (lpb + 1) + int(m[3])}.{0 if m[2] == 'resnets' else 1}"
            rest, resnet = m[4] or "", m[2] == "resnets"
        elif m := re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv$", module):
            b = int(m[1])
            head, resnet = f"output_blocks.{b * (lpb + 1) + lpb}.{2 if b in up_attn else 1}.conv", False
        elif module in DIRECT:
            head, resnet = DIRECT[module], False
        if head is None:
            continue
        if resnet and rest:
            first, _, tail = rest.partition(".")
            rest = ".".join(filter(None, (RESNET.get(first, first), tail)))
        out[module] = f"{head}.{rest}" if rest else head
    return out


# --- merging ----------------------------------------------------------------------------------------------------

class Adapters:
    """The adapters a backend applies: the override initializers of each session file, computed once per
    (file, adapter set) and kept for the last `keep` sets, so that switching back and forth re-merges nothing."""

    def __init__(self, keep: int = 2):
        self.active: tuple[Adapter, ...] = ()
        self.keep = keep
        self._layers: dict[Path, tuple[float, dict]] = {}  # adapter file → (mtime, its layers)
        self._merged: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()
        self._weights: dict[tuple[Path, str], Weights] = {}
        self.merge_s = 0.0  # time spent reading and merging weights so far (benchmarks/lora_switch.py reports it)

    def set(self, adapters: tuple[Adapter, ...], manifest) -> set[str]:
        """Make `adapters` the active set, read and checked against `manifest`'s models now (every adapted module must
        exist); returns the components whose weights change."""
        for adapter in adapters:
            for (component, module, flat) in self.layers(adapter.path):
                entry = manifest.components.get(component)
                if entry is None:
                    raise UserError(f"LoRA {adapter.path}: adapts {component}, which this engine directory does "
                                    "not have")
                weights = self.weights(manifest.path(next(iter(entry["precisions"].values()))), component)
                if weights.resolve(module, flat) is None and not weights.unused(module):
                    raise UserError(f"LoRA {adapter.path}: {module} ({component}) matches no layer of this model "
                                    "(an adapter for another architecture?)")
        before = self.components(self.active)
        self.active = tuple(adapters)
        changed = before | self.components(self.active)
        return changed | {copy for copy, of in SAME_WEIGHTS.items() if of in changed and copy in manifest.components}

    def weights(self, path: Path | tuple[Path, ...], component: str) -> Weights:
        if (path, component) not in self._weights:
            self._weights[(path, component)] = Weights(path, component)
        return self._weights[(path, component)]

    def components(self, adapters) -> set[str]:
        return {component for a in adapters for component, _, _ in self.layers(a.path)}

    def layers(self, path: Path) -> dict:
        mtime = path.stat().st_mtime if path.is_file() else None
        cached = self._layers.get(path)
        if cached is None or cached[0] != mtime:
            self._layers[path] = (mtime, parse_keys(read_safetensors(path), path))
        return self._layers[path][1]

    def overrides(self, component: str, path: Path, others: tuple[Path, ...] = ()) -> dict[str, np.ndarray]:
        """The merged initializers of `component`'s ONNX file `path` under the active set ({} for none). `others`: the
        other files that hold the rest of the component's weights (an optimized UNet's file and its context file,
        export/context_projections.py): a module one of them has is merged there, not here."""
        shown = component
        component = SAME_WEIGHTS.get(component, component)  # unet_control: the base UNet's adapters
        if component not in PREFIXES or component not in self.components(self.active):
            return {}
        key = (str(path), tuple(map(str, others)), shown, tuple((str(a.path), a.scale) for a in self.active))
        if key in self._merged:
            self._merged.move_to_end(key)
            return self._merged[key]
        started = time.perf_counter()
        weights = self.weights((path, *others) if others else path, component)
        parts: dict[str, list[tuple[Adapter, str, Layer]]] = {}  # initializer → the adapter layers that change it
        for adapter in self.active:
            for (target, module, flat), layer in self.layers(adapter.path).items():
                if target != component or adapter.scale == 0.0:
                    continue
                found = weights.resolve(module, flat)
                if found is None and weights.unused(module):
                    continue
                if found is None:
                    raise UserError(f"LoRA {adapter.path}: {module} ({component}) matches no layer of this model "
                                    "(an adapter for another architecture?)")
                if weights.file[weights.modules[found]] != path:
                    continue  # held by another of `others`: merged there
                parts.setdefault(weights.modules[found], []).append((adapter, module, layer))

        def merge(name: str) -> np.ndarray:
            """The file's weight plus every delta for it, added in fp32, stored in the file's dtype; a weight that
            leaves that dtype's range is an error naming the adapters (numpy's overflow warnings stay quiet: this
            check says it in the user's terms)."""
            total = None
            with np.errstate(over="ignore", invalid="ignore"):
                for adapter, module, layer in parts[name]:
                    delta = layer.delta(adapter.scale, weights.layout(name))
                    if delta.shape != weights.shape(name):
                        raise UserError(f"LoRA {adapter.path}: {module} ({component}) changes a weight of shape "
                                        f"{list(weights.shape(name))} by one of {list(delta.shape)}")
                    total = delta if total is None else np.add(total, delta, out=total)
                base = weights.read(name)
                np.add(total, base, out=total)  # the base widened to fp32 as it is added
                merged = total.astype(base.dtype, copy=False)
            if not np.isfinite(merged).all():
                dtype = np.dtype(base.dtype)
                for adapter, module, layer in parts[name]:
                    if (any(t is not None and not np.isfinite(t).all() for t in (layer.down, layer.up))
                            or (layer.alpha is not None and not np.isfinite(layer.alpha))):
                        raise UserError(f"LoRA {adapter.path}: its weights for {module} ({component}) hold NaN or "
                                        "Inf: the file is damaged")
                raise UserError(f"LoRA {', '.join(a.label for a, _, _ in parts[name])}: merged into {name} "
                                f"({component}, {dtype.name}) its values leave {dtype.name}'s range "
                                f"(±{np.finfo(dtype).max:.4g}); the adapter's weights or scale are far too large")
            return merged

        # numpy releases the GIL in matmul, additions and casts: the layers merge in parallel
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            merged = dict(zip(parts, pool.map(merge, parts)))
        self._merged[key] = merged
        self.merge_s += time.perf_counter() - started
        while len(self._merged) > self.keep * len(PREFIXES) * 2:  # a UNet's weights may be in two files
            self._merged.popitem(last=False)
        log.info("%s: %d weights merged from %s", shown, len(merged), ", ".join(a.label for a in self.active))
        return merged
