"""Round trip: tiny diffusers/transformers SDXL modules -> original (sgm) layout -> diffusers' own
single-file converters -> must give back every tensor bit for bit, with no key missing or extra."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from original_layout import to_original_layout  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "export" / "configs"


def _build(name: str, seed: int):
    d = CONFIGS / name
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(d / "unet")).eval()
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(d / "vae")).eval()
    clip_l = None
    if (d / "text_encoder").is_dir():
        clip_l = CLIPTextModel(CLIPTextConfig.from_pretrained(d / "text_encoder")).eval()
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(d / "text_encoder_2")).eval()
    return unet, vae, clip_l, clip_g


def _non_persistent_buffers(module: torch.nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in module.named_modules():
        for buf in getattr(mod, "_non_persistent_buffers_set", ()):
            names.add(f"{mod_name}.{buf}" if mod_name else buf)
    return names


def _assert_same(module: torch.nn.Module, got: dict, what: str) -> None:
    want = module.state_dict()
    allowed_missing = _non_persistent_buffers(module)  # e.g. position_ids; never in state_dict() anyway
    missing = sorted(set(want) - set(got) - allowed_missing)
    extra = sorted(set(got) - set(want) - allowed_missing)
    assert not missing, f"{what}: {len(missing)} keys lost in the round trip, e.g. {missing[:5]}"
    assert not extra, f"{what}: {len(extra)} unexpected keys after the round trip, e.g. {extra[:5]}"
    for key, value in want.items():
        back = got[key]
        assert back.dtype == value.dtype, f"{what}.{key}: dtype {back.dtype} != {value.dtype}"
        assert back.shape == value.shape, f"{what}.{key}: shape {tuple(back.shape)} != {tuple(value.shape)}"
        assert torch.equal(back, value), f"{what}.{key}: values differ"


def _partition(ckpt: dict, prefixes: list[str]) -> None:
    """Every original key belongs to exactly one known component."""
    stray = [k for k in ckpt if not any(k.startswith(p) for p in prefixes)]
    assert not stray, f"keys outside the known components: {stray[:5]}"


@pytest.mark.parametrize("name", ["tiny-base", "tiny-refiner"])
def test_roundtrip_through_diffusers_single_file_converters(name: str) -> None:
    unet, vae, clip_l, clip_g = _build(name, seed=1234)
    is_base = clip_l is not None
    assert is_base == (name == "tiny-base")

    ckpt = to_original_layout(unet=unet, vae=vae, clip_g=clip_g, clip_l=clip_l)
    assert all(isinstance(v, torch.Tensor) for v in ckpt.values())
    assert all(v.is_contiguous() for v in ckpt.values())  # safetensors.save_file refuses anything else

    g_prefix = "conditioner.embedders.1.model." if is_base else "conditioner.embedders.0.model."
    prefixes = ["model.diffusion_model.", "first_stage_model.", g_prefix]
    if is_base:
        prefixes.append("conditioner.embedders.0.transformer.text_model.")
    _partition(ckpt, prefixes)

    # known original names / shapes
    assert "model.diffusion_model.input_blocks.0.0.weight" in ckpt
    assert "model.diffusion_model.label_emb.0.0.weight" in ckpt
    assert "model.diffusion_model.label_emb.0.2.bias" in ckpt
    assert "model.diffusion_model.time_embed.0.weight" in ckpt
    assert "model.diffusion_model.out.2.weight" in ckpt
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in ckpt
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in ckpt
    assert "model.diffusion_model.output_blocks.0.0.in_layers.0.weight" in ckpt
    q = ckpt["first_stage_model.decoder.mid.attn_1.q.weight"]
    assert q.ndim == 4 and q.shape[2:] == (1, 1)
    assert ckpt["first_stage_model.encoder.mid.attn_1.proj_out.weight"].ndim == 4
    assert "first_stage_model.encoder.norm_out.weight" in ckpt
    assert "first_stage_model.quant_conv.weight" in ckpt
    assert "first_stage_model.post_quant_conv.weight" in ckpt
    assert any(".nin_shortcut." in k for k in ckpt if k.startswith("first_stage_model."))
    hidden_g = clip_g.config.hidden_size
    in_proj = ckpt[g_prefix + "transformer.resblocks.0.attn.in_proj_weight"]
    assert in_proj.shape == (3 * hidden_g, hidden_g)
    assert ckpt[g_prefix + "transformer.resblocks.0.attn.in_proj_bias"].shape == (3 * hidden_g,)
    assert g_prefix + "token_embedding.weight" in ckpt
    assert g_prefix + "positional_embedding" in ckpt
    assert g_prefix + "ln_final.weight" in ckpt
    # OpenCLIP stores text_projection as [hidden, proj] (x @ P): transposed vs HF Linear.weight [proj, hidden].
    assert torch.equal(ckpt[g_prefix + "text_projection"], clip_g.text_projection.weight.T)
    if is_base:
        assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in ckpt
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in ckpt
        assert not any(k.startswith("conditioner.embedders.1.transformer.") for k in ckpt)
    else:
        assert not any(k.startswith("conditioner.embedders.0.transformer.") for k in ckpt)
        assert not any(k.startswith("conditioner.embedders.1.") for k in ckpt)

    # back through diffusers' own converters
    _assert_same(unet, convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), "unet")
    _assert_same(vae, convert_ldm_vae_checkpoint(ckpt, dict(vae.config)), "vae")
    _assert_same(clip_g, convert_open_clip_checkpoint(clip_g, ckpt, prefix=g_prefix), "clip_g")
    if is_base:
        back = convert_ldm_clip_checkpoint(ckpt)
        assert back and all(k.startswith("text_model.") for k in back)
        if not hasattr(clip_l, "text_model"):
            # transformers >= 5.6 flattened CLIPTextModel; diffusers strips the prefix the same way.
            back = {k.removeprefix("text_model."): v for k, v in back.items()}
        _assert_same(clip_l, back, "clip_l")

    # the output is independent of the modules
    key = "model.diffusion_model.input_blocks.0.0.weight"
    before = unet.conv_in.weight.detach().clone()
    ckpt[key].zero_()
    assert torch.equal(unet.conv_in.weight.detach(), before)


def test_unknown_unet_key_is_rejected() -> None:
    unet, vae, clip_l, clip_g = _build("tiny-refiner", seed=0)
    unet.register_parameter("not_in_sgm", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(KeyError, match="not_in_sgm"):
        to_original_layout(unet=unet, vae=vae, clip_g=clip_g, clip_l=clip_l)
