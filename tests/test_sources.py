"""Every `--model` source kind: built-in tiny and random models, diffusers folders, single-file checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from original_layout import to_original_layout  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from sdxl_trt.export.sources import COMPONENTS, load_model, resolve  # noqa: E402
from sdxl_trt.runtime import UserError  # noqa: E402


def assert_same_weights(a, b):
    for name in COMPONENTS:
        ma, mb = getattr(a, name), getattr(b, name)
        assert (ma is None) == (mb is None), name
        if ma is None:
            continue
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# --- built-in models -------------------------------------------------------------------------------------------

def test_tiny_base(tiny_base):
    assert tiny_base.role == "base" and tiny_base.spec.architecture == "tiny-base"
    assert set(tiny_base.modules()) == {"clip_l", "clip_g", "unet", "vae"}
    assert tiny_base.pipeline_config["force_zeros_for_empty_prompt"] is True
    assert tiny_base.vae.config.scaling_factor == 0.13025
    assert tiny_base.scheduler_config["timestep_spacing"] == "leading"
    assert tiny_base.scheduler_config["steps_offset"] == 1
    assert all(not p.requires_grad for p in tiny_base.unet.parameters())


def test_tiny_models_are_deterministic_and_share_clip_g_and_vae(tiny_base, tiny_refiner):
    again = load_model("tiny:base", progress=False)
    assert_same_weights(tiny_base, again)
    assert tiny_refiner.role == "refiner" and tiny_refiner.clip_l is None
    assert tiny_refiner.pipeline_config["requires_aesthetics_score"] is True
    for name in ("clip_g", "vae"):  # as in the released SDXL 1.0 base and refiner
        for x, y in zip(getattr(tiny_base, name).state_dict().values(), getattr(tiny_refiner, name).state_dict().values()):
            assert torch.equal(x, y)


def test_tiny_unets_take_the_sdxl_conditioning(tiny_base, tiny_refiner):
    """Base: context clip_l+clip_g, 6 time ids; refiner: context clip_g only, 5 time ids (size, crop, aesthetic)."""
    for model, context, n_ids in ((tiny_base, 32 + 64, 6), (tiny_refiner, 64, 5)):
        sample = torch.randn(2, 4, 16, 24)
        out = model.unet(sample, torch.tensor([999.0, 1.0]), encoder_hidden_states=torch.randn(2, 77, context),
                         added_cond_kwargs={"text_embeds": torch.randn(2, 64), "time_ids": torch.randn(2, n_ids)}).sample
        assert out.shape == sample.shape and torch.isfinite(out).all()


def test_components_subset():
    model = load_model("tiny:base", components=["vae"], progress=False)
    assert set(model.modules()) == {"vae"} and model.unet is None
    with pytest.raises(UserError, match="unknown component 'text'"):
        load_model("tiny:base", components=["text"], progress=False)


# Published parameter counts of SDXL 1.0 (diffusers' UNet2DConditionModel, AutoencoderKL; transformers' CLIP).
OFFICIAL = {"clip_l": 123_060_480, "clip_g": 694_659_840, "unet": 2_567_463_684, "vae": 83_653_863}


def test_random_base_is_the_full_size_architecture():
    model = load_model("random:base", device="meta", progress=False)  # the architecture, without 10 GB of weights
    assert {name: n_params(m) for name, m in model.modules().items()} == OFFICIAL
    assert model.unet.config.cross_attention_dim == 2048


def test_random_refiner_is_the_full_size_architecture():
    """sgm's sd_xl_refiner.yaml: model_channels 384, channel_mult [1,2,4,4], attention at levels 1-2, depth 4,
    64-channel heads, context 1280, adm_in_channels 2560."""
    unet = load_model("random:refiner", device="meta", progress=False, components=["unet"]).unet
    assert list(unet.config.block_out_channels) == [384, 768, 1536, 1536]
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", "CrossAttnDownBlock2D",
                                                           "CrossAttnDownBlock2D", "DownBlock2D"]
    transformer = unet.down_blocks[1].attentions[0]
    assert len(transformer.transformer_blocks) == 4
    assert transformer.transformer_blocks[0].attn1.heads * 64 == 768
    assert unet.add_embedding.linear_1.in_features == 2560
    assert unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.in_features == 1280


def test_random_weights_are_built_in_the_requested_dtype():
    model = load_model("random:base", components=["clip_l"], dtype=torch.float16, progress=False)
    assert {p.dtype for p in model.clip_l.parameters()} == {torch.float16}
    assert n_params(model.clip_l) == OFFICIAL["clip_l"]
    ids = torch.randint(0, 49407, (1, 77))
    hidden = model.clip_l(ids, output_hidden_states=True).hidden_states[-2]
    assert hidden.shape == (1, 77, 768) and torch.isfinite(hidden).all()
    assert torch.get_default_dtype() == torch.float32  # restored after building


# --- diffusers folders -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_folder(tiny_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers") / "tiny-base"
    tiny_base.save_pretrained(folder)
    return folder


def test_diffusers_folder_round_trip(tiny_base, tiny_refiner, base_folder, tmp_path):
    assert resolve(str(base_folder)).role == "base"
    assert_same_weights(tiny_base, load_model(str(base_folder), progress=False))
    tiny_refiner.save_pretrained(tmp_path / "refiner")
    loaded = load_model(str(tmp_path / "refiner"), progress=False)
    assert loaded.role == "refiner" and loaded.clip_l is None
    assert_same_weights(tiny_refiner, loaded)


def test_saved_folder_is_what_diffusers_reads(tiny_base, base_folder):
    """The folder we write is a real diffusers pipeline folder: diffusers' own loader gives the same weights."""
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(base_folder, local_files_only=True)
    for ours, theirs in ((tiny_base.unet, pipe.unet), (tiny_base.clip_g, pipe.text_encoder_2)):
        for x, y in zip(ours.state_dict().values(), theirs.state_dict().values()):
            assert torch.equal(x, y)


def test_fp16_variant_only_folder(tiny_base, base_folder, tmp_path):
    folder = tmp_path / "fp16"
    shutil.copytree(base_folder, folder)
    unet_dir = folder / "unet"
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    state = {k: v.half() for k, v in tiny_base.unet.state_dict().items()}
    save_file(state, unet_dir / "diffusion_pytorch_model.fp16.safetensors")
    weights.unlink()
    model = load_model(str(folder), components=["unet"], progress=False)
    assert model.unet.dtype == torch.float32
    assert torch.equal(model.unet.conv_in.weight, tiny_base.unet.conv_in.weight.half().float())


def test_pickle_weights_in_a_folder_need_allow_pickle(tiny_base, base_folder, tmp_path):
    folder = tmp_path / "bin"
    shutil.copytree(base_folder, folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(tiny_base.vae.state_dict(), folder / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="pickle"):
        load_model(str(folder), progress=False)
    model = load_model(str(folder), components=["vae"], allow_pickle=True, progress=False)
    assert torch.equal(model.vae.decoder.conv_out.weight, tiny_base.vae.decoder.conv_out.weight)


def test_inpainting_folder_has_nine_channels(tmp_path, base_folder):
    folder = tmp_path / "inpaint"
    shutil.copytree(base_folder, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["in_channels"] = 9
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config(config)
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet")
    src = resolve(str(folder))
    assert (src.role, src.in_channels) == ("base", 9)
    assert load_model(src, components=["unet"], progress=False).unet.conv_in.in_channels == 9


# --- single-file checkpoints ---------------------------------------------------------------------------------

def write_checkpoint(model, path, **edit):
    state = to_original_layout(unet=model.unet, vae=model.vae, clip_g=model.clip_g, clip_l=model.clip_l)
    state = {k: v.contiguous() for k, v in state.items()}
    for key, value in edit.items():
        if value is None:
            state = {k: v for k, v in state.items() if not k.startswith(key)}
        else:
            state[key] = value
    save_file(state, path)
    return path


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_single_file_checkpoint(which, tiny_base, tiny_refiner, tmp_path):
    model = tiny_base if which == "base" else tiny_refiner
    path = write_checkpoint(model, tmp_path / f"sd_xl_{which}.safetensors")
    src = resolve(str(path))
    assert (src.kind, src.role, src.architecture) == ("single-file", which, f"tiny-{which}")
    loaded = load_model(src, progress=False)
    assert_same_weights(model, loaded)
    assert loaded.tokenizer_dirs.keys() == model.tokenizer_dirs.keys()


def test_single_file_in_fp16_loads_in_the_requested_dtype(tiny_base, tmp_path):
    state = to_original_layout(unet=tiny_base.unet, vae=tiny_base.vae, clip_g=tiny_base.clip_g, clip_l=tiny_base.clip_l)
    save_file({k: v.half().contiguous() for k, v in state.items()}, tmp_path / "half.safetensors")
    loaded = load_model(str(tmp_path / "half.safetensors"), progress=False)
    assert loaded.unet.dtype == torch.float32
    assert torch.equal(loaded.unet.conv_out.weight, tiny_base.unet.conv_out.weight.half().float())


def test_pickle_checkpoint_needs_allow_pickle(tiny_refiner, tmp_path):
    state = to_original_layout(unet=tiny_refiner.unet, vae=tiny_refiner.vae, clip_g=tiny_refiner.clip_g)
    torch.save({"state_dict": state}, tmp_path / "refiner.ckpt")
    with pytest.raises(UserError, match="--allow-pickle"):
        resolve(str(tmp_path / "refiner.ckpt"))
    assert_same_weights(tiny_refiner, load_model(str(tmp_path / "refiner.ckpt"), allow_pickle=True, progress=False))


def test_bad_checkpoints_say_what_is_wrong(tiny_base, tmp_path):
    good = write_checkpoint(tiny_base, tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = {
        "truncated": (truncated, "cannot read|not a readable"),
        "sd15": (write_checkpoint(tiny_base, tmp_path / "sd15.safetensors", **{"model.diffusion_model.label_emb": None}),
                 "1.x/2.x"),
        "no-vae": (write_checkpoint(tiny_base, tmp_path / "novae.safetensors", first_stage_model=None), "no VAE"),
        "no-text": (write_checkpoint(tiny_base, tmp_path / "notext.safetensors", conditioner=None), "text encoders"),
        "wrong-shape": (write_checkpoint(tiny_base, tmp_path / "shape.safetensors", **{
            "model.diffusion_model.out.2.bias": torch.zeros(5)}), "unet weights do not fit.*out.2.bias|conv_out.bias"),
        "not-sdxl": (save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors") or tmp_path / "other.safetensors",
                     "not an SDXL checkpoint"),
    }
    for path, pattern in cases.values():
        with pytest.raises(UserError, match=pattern):
            load_model(str(path), progress=False)


def test_unknown_checkpoint_size(tiny_base, tmp_path):
    path = write_checkpoint(tiny_base, tmp_path / "odd.safetensors", **{
        "model.diffusion_model.label_emb.0.0.weight": torch.zeros(128, 999)})
    with pytest.raises(UserError, match="unknown size"):
        resolve(str(path))


# --- bad --model values ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, pattern", [
    ("", "empty"),
    ("tiny:giant", "unknown built-in"),
    ("random:", "no such file"),
    ("hub:stabilityai/sdxl", "no such file.*built-in models are"),
    ("/nonexistent/model", "no such file"),
])
def test_bad_specs(spec, pattern):
    with pytest.raises(UserError, match=pattern):
        resolve(spec)


def test_bad_folders_and_files(tmp_path, base_folder):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    sd15 = tmp_path / "sd15"
    shutil.copytree(base_folder, sd15)
    index = json.loads((sd15 / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (sd15 / "model_index.json").write_text(json.dumps(index))
    incomplete = tmp_path / "incomplete"
    shutil.copytree(base_folder, incomplete)
    shutil.rmtree(incomplete / "vae")
    broken = tmp_path / "broken"
    shutil.copytree(base_folder, broken)
    (broken / "unet" / "config.json").write_text("{")
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    (engine_dir / "manifest.json").write_text("{}")
    for path, pattern in [
        (tmp_path / "empty", "without model_index.json"),
        (tmp_path / "notes.txt", "not a model file"),
        (sd15, "StableDiffusionPipeline pipeline, not SDXL"),
        (incomplete, "missing: vae"),
        (broken, "not valid JSON"),
        (engine_dir, "engine directory"),
    ]:
        with pytest.raises(UserError, match=pattern):
            resolve(str(path))
