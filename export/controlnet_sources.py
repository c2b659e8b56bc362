"""Where SDXL ControlNets come from: the `--controlnet SRC` of `sdxl-trt export` (given once per ControlNet).

SRC is one of
  - a diffusers ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors),
  - a single-file ControlNet `.safetensors`, in diffusers' key layout (the file of such a folder, as most SDXL
    ControlNets are published) or in the original `control_model.` layout that diffusers' converter reads; its
    architecture is the base UNet's, with the conditioning embedding and the transformer depth per block read
    from the file's tensor shapes,
  - `tiny:controlnet` / `random:controlnet`: the ControlNet architecture of the tiny / full-size base UNet
    (diffusers' `ControlNetModel.from_unet`) with random weights; the i-th `--controlnet` is seeded 6 + i, so
    the same built-in given twice makes two different nets. Their zero convolutions are initialised like any
    other convolution (a real ControlNet's are trained away from zero), and the control image's embedding
    variance-preserving (He): with default inits its 8 convolutions shrink the image to ~1e-3 of the latents'
    features, and a test could not tell one control image from another.

Every ControlNet must fit the base UNet it steers: the same levels, channels and context width (checked).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..runtime.errors import UserError
from .vocab import CONFIGS

ACCEPTED = ("a diffusers ControlNetModel folder, a single-file ControlNet .safetensors, tiny:controlnet or "
            "random:controlnet")
BUILTIN = {"tiny:controlnet": "tiny-base", "random:controlnet": "sdxl-base"}
SEED = 6  # the built-ins: seed 6 + the ControlNet's position
ORIGINAL_PREFIX = "control_model."


@dataclass(frozen=True)
class ControlNetSpec:
    spec: str
    kind: str  # "builtin" | "folder" | "single-file"
    path: Path | None = None


def resolve_controlnet(spec: str) -> ControlNetSpec:
    """Check a `--controlnet` value without loading weights."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"--controlnet is empty; accepted: {ACCEPTED}")
    if spec in BUILTIN:
        return ControlNetSpec(spec, "builtin")
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"--controlnet {spec!r}: no such file or folder; accepted: {ACCEPTED}")
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise UserError(f"--controlnet {spec!r}: no config.json in the folder; accepted: {ACCEPTED}")
        try:
            name = json.loads(config.read_text()).get("_class_name")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise UserError(f"--controlnet {spec!r}: config.json is not a JSON object ({e})") from None
        if name != "ControlNetModel":
            raise UserError(f"--controlnet {spec!r} holds a {name}, not a ControlNetModel; accepted: {ACCEPTED}")
        if not any(path.glob("*.safetensors")):
            raise UserError(f"--controlnet {spec!r}: no .safetensors weights in the folder")
        return ControlNetSpec(spec, "folder", path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"--controlnet {spec!r}: not a .safetensors file or a folder; accepted: {ACCEPTED}")
    _read_keys(spec, path)  # a broken file fails here, before any model is built
    return ControlNetSpec(spec, "single-file", path)


def load_controlnet(src: ControlNetSpec, index: int, base_unet_config: dict):
    """The ControlNetModel (fp32, CPU, eval) of `src`, checked against the base UNet's config."""
    import torch
    from diffusers import ControlNetModel

    if src.kind == "builtin":
        net = _builtin(src, index, base_unet_config)
    elif src.kind == "folder":
        try:
            net = ControlNetModel.from_pretrained(src.path, local_files_only=True, torch_dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"--controlnet {src.spec!r}: cannot load it ({str(e).splitlines()[0]})") from None
    else:
        net = _single_file(src, base_unet_config)
    _check_fits(src.spec, dict(net.config), base_unet_config)
    return net.float().eval()


def _config_from_unet(unet_config: dict, **overrides) -> dict:
    """ControlNetModel's config for a UNet's architecture (what diffusers' from_unet copies)."""
    keys = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
            "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
            "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim", "num_attention_heads",
            "use_linear_projection", "class_embed_type", "num_class_embeds", "upcast_attention",
            "resnet_time_scale_shift", "projection_class_embeddings_input_dim", "mid_block_type",
            "encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type", "addition_time_embed_dim",
            "transformer_layers_per_block")
    config = {k: unet_config[k] for k in keys if k in unet_config}
    config["in_channels"] = 4  # a ControlNet steers the 4-channel base UNet
    return {**config, "conditioning_embedding_out_channels": [16, 32, 96, 256], **overrides}


def _builtin(src: ControlNetSpec, index: int, base_unet_config: dict):
    import torch
    from diffusers import ControlNetModel

    family = json.loads((CONFIGS / BUILTIN[src.spec] / "unet" / "config.json").read_text())
    _check_fits(src.spec, _config_from_unet(family), base_unet_config)  # before building a full-size net for nothing
    old = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + index)
        torch.set_default_dtype(torch.float32)
        try:
            net = ControlNetModel.from_config(_config_from_unet(family))
        finally:
            torch.set_default_dtype(old)
        for conv in (*net.controlnet_down_blocks, net.controlnet_mid_block):
            conv.reset_parameters()  # diffusers starts these at zero
        for conv in net.controlnet_cond_embedding.modules():  # variance-preserving, so that the image counts
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                torch.nn.init.zeros_(conv.bias)
    return net


def _read_keys(spec: str, path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise UserError(f"--controlnet {spec!r}: not a readable .safetensors file ({str(e).splitlines()[0]})") from None


def _single_file(src: ControlNetSpec, base_unet_config: dict):
    import torch
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    state = load_file(str(src.path))
    if any(k.startswith(ORIGINAL_PREFIX) for k in state):
        state = _from_original(src, state, base_unet_config)
    if "controlnet_cond_embedding.conv_in.weight" not in state:
        raise UserError(f"--controlnet {src.spec!r}: not a ControlNet checkpoint (no controlnet_cond_embedding "
                        "weights)")
    config = _config_from_unet(base_unet_config, **_inferred(state, base_unet_config))
    net = ControlNetModel.from_config(config).to(torch.float32)
    missing, unexpected = net.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise UserError(f"--controlnet {src.spec!r}: its weights do not fit an SDXL ControlNet of the base model's "
                        f"architecture ({len(missing)} missing, {len(unexpected)} unexpected, e.g. {first})")
    return net


def _inferred(state: dict, unet_config: dict) -> dict:
    """What a ControlNet may change from its UNet's architecture, read from tensor shapes: the conditioning
    embedding's widths and the number of transformer layers per block (the 'small' / 'mid' SDXL ControlNets)."""
    blocks = sorted(int(k.split(".")[2]) for k in state
                    if k.startswith("controlnet_cond_embedding.blocks.") and k.endswith(".weight"))
    widths = [int(state["controlnet_cond_embedding.conv_in.weight"].shape[0])]
    widths += [int(state[f"controlnet_cond_embedding.blocks.{b}.weight"].shape[0]) for b in blocks[1::2]]
    layers = []
    for i in range(len(unet_config["down_block_types"])):
        depth = {int(k.split(".")[5]) for k in state if k.startswith(f"down_blocks.{i}.attentions.0.transformer_blocks.")}
        layers.append(max(depth) + 1 if depth else 1)  # 1: a block without attention, where it is not used
    return {"conditioning_embedding_out_channels": widths, "transformer_layers_per_block": layers}


def _from_original(src: ControlNetSpec, state: dict, unet_config: dict) -> dict:
    """Original (`control_model.`) keys → diffusers' names, through diffusers' own converter, plus SDXL's added
    embedding (`label_emb.0.*` → `add_embedding.*`), whose mapping diffusers lists but its ControlNet converter
    (0.42) does not apply."""
    from diffusers.loaders.single_file_utils import (DIFFUSERS_TO_LDM_MAPPING, LDM_CONTROLNET_KEY,
                                                     convert_controlnet_checkpoint)

    try:
        converted = convert_controlnet_checkpoint(state, _config_from_unet(unet_config))
    except (KeyError, ValueError, IndexError, TypeError) as e:
        raise UserError(f"--controlnet {src.spec!r}: diffusers' converter cannot read it ({e})") from None
    for diffusers_key, ldm_key in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
        if LDM_CONTROLNET_KEY + ldm_key in state and diffusers_key not in converted:
            converted[diffusers_key] = state[LDM_CONTROLNET_KEY + ldm_key]
    return {k: v for k, v in converted.items() if v is not None}


def _check_fits(spec: str, net: dict, unet: dict) -> None:
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types",
                "projection_class_embeddings_input_dim", "addition_time_embed_dim"):
        a, b = net.get(key), unet.get(key)
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            raise UserError(f"--controlnet {spec!r} was made for another UNet: its {key} is {a}, the base model's {b}")
