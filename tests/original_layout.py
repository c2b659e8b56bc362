"""Test helper: diffusers / transformers SDXL modules -> original Stability AI single-file layout.

``to_original_layout`` writes the state dict that ``sd_xl_base_1.0.safetensors`` /
``sd_xl_refiner_1.0.safetensors`` use (the sgm / generative-models layout), so that tests can build
tiny "original" checkpoints without downloading anything. It is the inverse of diffusers'
``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` / ``convert_ldm_clip_checkpoint`` /
``convert_open_clip_checkpoint`` (diffusers/loaders/single_file_utils.py).

Unlike diffusers' ``scripts/convert_diffusers_to_original_sdxl.py`` the block indices are derived from
the model's config (any number of levels, any ``layers_per_block``, any transformer depth), every
source key must be mapped (an unknown key raises instead of being copied through silently), and the
OpenCLIP ``text_projection`` is written transposed, as the original checkpoints store it.

Not written, because the HF modules do not hold them: ``...embedders.0.transformer.text_model.
embeddings.position_ids`` (a non-persistent buffer in transformers) and ``...model.logit_scale`` of
OpenCLIP bigG. Real SDXL checkpoints carry both; diffusers ignores both when loading.
"""

from __future__ import annotations

import re

import torch

__all__ = ["to_original_layout"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."


def _tensor(t: torch.Tensor) -> torch.Tensor:
    # Independent, contiguous copies: safe to mutate and to hand to safetensors.save_file.
    return t.detach().clone(memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------- UNet

_UNET_DIRECT = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
}

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}

_PARAM = re.compile(r"^(weight|bias)$")


def _unet_resnet_rest(rest: str, key: str) -> str:
    layer, _, param = rest.partition(".")
    if layer not in _UNET_RESNET or not _PARAM.match(param):
        raise KeyError(f"unexpected UNet resnet key {key!r}")
    return f"{_UNET_RESNET[layer]}.{param}"


def _convert_unet(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    config = unet.config
    lpb = config.layers_per_block
    if not isinstance(lpb, int):
        raise ValueError(f"layers_per_block must be an int for the sgm layout, got {lpb!r}")
    per_level = lpb + 1  # input_blocks / output_blocks entries per level
    num_levels = len(config.down_block_types)
    sd = unet.state_dict()
    up_has_attn = {b: any(k.startswith(f"up_blocks.{b}.attentions.") for k in sd) for b in range(num_levels)}

    out: dict[str, torch.Tensor] = {}

    def put(new_key: str, src_key: str) -> None:
        if UNET_PREFIX + new_key in out:
            raise KeyError(f"two UNet keys map onto {new_key!r} (second: {src_key!r})")
        out[UNET_PREFIX + new_key] = _tensor(sd[src_key])

    for key in sd:
        head, _, param = key.rpartition(".")
        if head in _UNET_DIRECT and _PARAM.match(param):
            put(f"{_UNET_DIRECT[head]}.{param}", key)
            continue

        m = re.match(r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", key)
        if m:
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            if j >= lpb:
                raise KeyError(f"{key!r}: index beyond layers_per_block={lpb}")
            idx = 1 + b * per_level + j
            if kind == "resnets":
                put(f"input_blocks.{idx}.0.{_unet_resnet_rest(rest, key)}", key)
            else:
                put(f"input_blocks.{idx}.1.{rest}", key)
            continue

        m = re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)$", key)
        if m:
            put(f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}", key)
            continue

        m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", key)
        if m:
            kind, j, rest = m[1], int(m[2]), m[3]
            if kind == "resnets":
                if j > 1:
                    raise KeyError(f"unexpected mid-block resnet {key!r}")
                put(f"middle_block.{2 * j}.{_unet_resnet_rest(rest, key)}", key)
            else:
                if j != 0:
                    raise KeyError(f"unexpected mid-block attention {key!r}")
                put(f"middle_block.1.{rest}", key)
            continue

        m = re.match(r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", key)
        if m:
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            if j >= per_level:
                raise KeyError(f"{key!r}: index beyond layers_per_block + 1 = {per_level}")
            idx = b * per_level + j
            if kind == "resnets":
                put(f"output_blocks.{idx}.0.{_unet_resnet_rest(rest, key)}", key)
            else:
                put(f"output_blocks.{idx}.1.{rest}", key)
            continue

        m = re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)$", key)
        if m:
            b = int(m[1])
            slot = 2 if up_has_attn[b] else 1
            put(f"output_blocks.{b * per_level + lpb}.{slot}.conv.{m[2]}", key)
            continue

        raise KeyError(f"UNet key {key!r} has no place in the sgm layout")
    return out


# ---------------------------------------------------------------------------------------------- VAE

_VAE_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _vae_resnet_rest(rest: str, key: str) -> str:
    layer, _, param = rest.partition(".")
    if layer not in ("norm1", "conv1", "norm2", "conv2", "conv_shortcut") or not _PARAM.match(param):
        raise KeyError(f"unexpected VAE resnet key {key!r}")
    return f"{'nin_shortcut' if layer == 'conv_shortcut' else layer}.{param}"


def _convert_vae(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    num_up = len(vae.config.up_block_types)
    sd = vae.state_dict()
    out: dict[str, torch.Tensor] = {}

    def put(new_key: str, value: torch.Tensor) -> None:
        if VAE_PREFIX + new_key in out:
            raise KeyError(f"two VAE keys map onto {new_key!r}")
        out[VAE_PREFIX + new_key] = _tensor(value)

    for key, value in sd.items():
        m = re.match(r"^(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(weight|bias)$", key) or re.match(
            r"^()(quant_conv|post_quant_conv)\.(weight|bias)$", key
        )
        if m:
            side = f"{m[1]}." if m[1] else ""
            layer = "norm_out" if m[2] == "conv_norm_out" else m[2]
            put(f"{side}{layer}.{m[3]}", value)
            continue

        m = re.match(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key)
        if m:
            put(f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet_rest(m[3], key)}", value)
            continue

        m = re.match(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)$", key)
        if m:
            put(f"encoder.down.{m[1]}.downsample.conv.{m[2]}", value)
            continue

        m = re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key)
        if m:
            # diffusers numbers decoder levels from the bottleneck up; ldm from full resolution down.
            put(f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet_rest(m[3], key)}", value)
            continue

        m = re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)$", key)
        if m:
            put(f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}", value)
            continue

        m = re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)$", key)
        if m:
            j = int(m[2])
            if j > 1:
                raise KeyError(f"unexpected VAE mid-block resnet {key!r}")
            put(f"{m[1]}.mid.block_{j + 1}.{_vae_resnet_rest(m[3], key)}", value)
            continue

        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", key)
        if m:
            layer = _VAE_ATTN[m[2]]
            if m[3] == "weight" and layer != "norm" and value.ndim == 2:
                value = value[:, :, None, None]  # Linear [C, C] -> 1x1 Conv2d [C, C, 1, 1]
            put(f"{m[1]}.mid.attn_1.{layer}.{m[3]}", value)
            continue

        raise KeyError(f"VAE key {key!r} has no place in the ldm layout")
    return out


# --------------------------------------------------------------------------------------- CLIP-L (HF)


def _convert_clip_l(clip_l: torch.nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in clip_l.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); older ones keep it.
        hf_key = key if key.startswith("text_model.") else f"text_model.{key}"
        out[CLIP_L_PREFIX + hf_key] = _tensor(value)
    return out


# ------------------------------------------------------------------------------------ OpenCLIP bigG

_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _convert_open_clip(clip_g: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    sd = clip_g.state_dict()
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    def put(new_key: str, value: torch.Tensor) -> None:
        if prefix + new_key in out:
            raise KeyError(f"two OpenCLIP keys map onto {new_key!r}")
        out[prefix + new_key] = _tensor(value)

    for key, value in sd.items():
        k = key[len("text_model.") :] if key.startswith("text_model.") else key
        if k == "embeddings.position_ids":
            continue  # buffer (non-persistent in current transformers); not part of the OpenCLIP model
        if k == "embeddings.token_embedding.weight":
            put("token_embedding.weight", value)
        elif k == "embeddings.position_embedding.weight":
            put("positional_embedding", value)
        elif k in ("final_layer_norm.weight", "final_layer_norm.bias"):
            put(f"ln_final.{k.rsplit('.', 1)[1]}", value)
        elif k == "text_projection.weight":
            # HF nn.Linear weight is [proj, hidden]; OpenCLIP uses `x @ text_projection`, [hidden, proj].
            put("text_projection", value.T)
        else:
            m = re.match(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
            if not m:
                raise KeyError(f"CLIP-G key {key!r} has no place in the OpenCLIP layout")
            n, layer, param = int(m[1]), m[2], m[3]
            qm = re.match(r"^self_attn\.([qkv])_proj$", layer)
            if qm:
                qkv.setdefault((n, param), {})[qm[1]] = value
            elif layer in _OPENCLIP_LAYER:
                put(f"transformer.resblocks.{n}.{_OPENCLIP_LAYER[layer]}.{param}", value)
            else:
                raise KeyError(f"CLIP-G key {key!r} has no place in the OpenCLIP layout")

    for (n, param), parts in sorted(qkv.items()):
        if sorted(parts) != ["k", "q", "v"]:
            raise KeyError(f"CLIP-G layer {n}: incomplete q/k/v {param}s ({sorted(parts)})")
        # nn.MultiheadAttention packs q, k, v along dim 0 in that order.
        put(f"transformer.resblocks.{n}.attn.in_proj_{param}", torch.cat([parts["q"], parts["k"], parts["v"]], 0))
    return out


# ------------------------------------------------------------------------------------------- public


def to_original_layout(*, unet, vae, clip_g, clip_l=None) -> dict[str, torch.Tensor]:
    """State dict of an SDXL model in the original (sgm) single-file checkpoint layout.

    ``clip_l`` given: base layout (CLIP-L at ``conditioner.embedders.0.transformer.text_model.*``,
    OpenCLIP bigG at ``conditioner.embedders.1.model.*``). ``clip_l`` None: refiner layout (OpenCLIP
    bigG at ``conditioner.embedders.0.model.*``). Tensors are detached contiguous copies in the
    modules' own dtypes.
    """
    out: dict[str, torch.Tensor] = {}
    parts = [_convert_unet(unet), _convert_vae(vae)]
    if clip_l is not None:
        parts.append(_convert_clip_l(clip_l))
        parts.append(_convert_open_clip(clip_g, "conditioner.embedders.1.model."))
    else:
        parts.append(_convert_open_clip(clip_g, "conditioner.embedders.0.model."))
    for part in parts:
        clash = out.keys() & part.keys()
        if clash:
            raise KeyError(f"duplicate keys across components: {sorted(clash)[:5]}")
        out.update(part)
    return out
