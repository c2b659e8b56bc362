"""The runtime (ONNX Runtime CPU, no torch) against diffusers' SDXL pipelines on the tiny models.

Both sides start from the same initial latents; for samplers that draw noise inside their steps, diffusers'
`randn_tensor` is replaced by the stream our pipeline draws from (Philox keyed by seed + image index), so both
consume identical noise. Tolerances: final latents rel-L2 ≤ 1e-3 (ONNX Runtime vs torch fp32 differ by ~1e-6
per UNet call; what remains is that error carried through the steps); decoded images within max abs 1e-5 and
mean abs 1e-6 (about 4x the measured error; see IMAGE_MAX_TOL), and each one-notch change exceeds those bounds.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers_schedulers import REFERENCE, scheduler_for  # noqa: E402

from sdxl_trt.export.reference import diffusers_pipeline  # noqa: E402
from sdxl_trt.export.verify import rel_l2  # noqa: E402
from sdxl_trt.runtime import UserError  # noqa: E402
from sdxl_trt.runtime import Pipeline  # noqa: E402

LATENT_TOL = 1e-3
# Decoded images (values in [0, 1]), ours against diffusers: measured max abs 2.5e-6, mean abs 2.4e-7 (ONNX Runtime
# CPU vs torch fp32, 6 euler steps, 2 prompts at 96x64); bounds about 4x that. The smallest one-notch change
# (test_one_notch_change_exceeds_the_image_bounds: one word of a prompt) moves the images by max 0.020, mean 1.3e-3;
# guidance ±10 % by max 0.025, mean 2.1e-3 — hundreds of times the bounds. (The old bound, mean 2/255 = 7.8e-3,
# let one changed word, guidance ±10 % and one more step all pass.)
IMAGE_MAX_TOL = 1e-5
IMAGE_MEAN_TOL = 1e-6
SEED = 1234

@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return Pipeline.load(tiny_engine)


@pytest.fixture(scope="module")
def reference(tiny_base):
    return diffusers_pipeline(tiny_base)


@pytest.fixture(scope="module")
def reference_refiner(tiny_refiner):
    return diffusers_pipeline(tiny_refiner)


@contextlib.contextmanager
def same_noise(n_images):
    """diffusers' schedulers draw step noise from our streams (latents are passed explicitly, so a stream's first
    draw is the first step's noise, as in our pipeline)."""
    rngs = [np.random.Generator(np.random.Philox(key=SEED + i)) for i in range(n_images)]

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        noise = np.stack([rng.standard_normal(tuple(shape[1:]), dtype=np.float32) for rng in rngs])
        return torch.from_numpy(noise).to(dtype or torch.float32)

    import diffusers.models.autoencoders.vae as vae_module
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as img2img_module
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as inpaint_module

    modules = [m for name, m in vars(diffusers.schedulers).items() if name.startswith("scheduling_")]
    modules += [vae_module, img2img_module, inpaint_module]
    with contextlib.ExitStack() as stack:
        for module in modules:
            if hasattr(module, "randn_tensor"):
                stack.enter_context(mock.patch.object(module, "randn_tensor", randn_tensor))
        yield


def initial_latents(n, width, height):
    return np.random.default_rng(n * 1000 + width + height).standard_normal((n, 4, height // 8, width // 8)).astype(np.float32)


def run_both(pipe, reference, *, sampler="euler", prompts=("a photo of a cat", "Café ✨, (masterpiece:1.2)"),
             negative=None, steps=8, width=96, height=64, guidance=5.0, images_per_prompt=1, output_type="latent",
             **kwargs):
    n = len(prompts) * images_per_prompt
    latents = initial_latents(n, width, height)
    ours = pipe(list(prompts), negative, height=height, width=width, num_inference_steps=steps,
                guidance_scale=guidance, sampler=sampler, num_images_per_prompt=images_per_prompt, seed=SEED,
                latents=latents, output_type=output_type, progress=False, **kwargs)
    reference.scheduler = scheduler_for(sampler, pipe.scheduler_config)
    with same_noise(n), torch.inference_mode():
        theirs = reference(prompt=list(prompts), negative_prompt=negative, height=height, width=width,
                           num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(latents),
                           num_images_per_prompt=images_per_prompt, output_type=output_type, **kwargs).images
    return ours.array, np.asarray(theirs)


@pytest.mark.parametrize("sampler", list(REFERENCE))
@pytest.mark.parametrize("steps", [4, 13])
def test_every_sampler_matches_diffusers(pipe, reference, sampler, steps):
    ours, theirs = run_both(pipe, reference, sampler=sampler, steps=steps)
    assert np.isfinite(ours).all()
    assert rel_l2(ours, theirs) <= LATENT_TOL


@pytest.mark.parametrize("case", [
    dict(guidance=1.0),  # no CFG: the UNet runs at batch 1 per image
    dict(negative=["blurry, low quality", "text, watermark"]),
    dict(images_per_prompt=2, prompts=("a red fox in the snow",)),
    dict(width=64, height=136, steps=20),
    dict(guidance_rescale=0.7),
    dict(sampler="euler_a", guidance=7.5, steps=30, width=128, height=128),
    dict(sampler="dpmpp_2m_karras", original_size=(512, 768), crops_coords_top_left=(16, 32), target_size=(64, 96)),
])
def test_conditioning_variants_match_diffusers(pipe, reference, case):
    ours, theirs = run_both(pipe, reference, **case)
    assert rel_l2(ours, theirs) <= LATENT_TOL


def test_long_prompt_is_truncated_like_diffusers(pipe, reference, caplog):
    long = ", ".join(["a very detailed painting of a castle on a hill"] * 12)
    ours, theirs = run_both(pipe, reference, prompts=(long,))
    assert rel_l2(ours, theirs) <= LATENT_TOL
    assert caplog.text.count("tokens was truncated (as diffusers does") == 1  # ours once, though both tokenizers cut it
    caplog.clear()
    pipe([long, "short", long], num_images_per_prompt=2, height=64, width=64, num_inference_steps=1, seed=0,
         progress=False, output_type="latent")
    assert caplog.text.count("tokens was truncated (as diffusers does") == 1  # one distinct long prompt: said once for its six images


DECODED = dict(prompts=("a photo of a cat", "Café ✨, (masterpiece:1.2)"), steps=6, guidance=5.0, width=96, height=64)


def test_decoded_images_match(pipe, reference):
    ours, theirs = run_both(pipe, reference, output_type="np", **DECODED)
    assert ours.shape == theirs.shape == (2, 64, 96, 3)
    err = np.abs(ours - theirs)
    assert err.max() <= IMAGE_MAX_TOL and err.mean() <= IMAGE_MEAN_TOL


def decoded(pipe, *, prompts, steps, guidance, width, height, latents_seed=0):
    n = len(prompts)
    latents = initial_latents(n + latents_seed, width, height)[-n:] if latents_seed else initial_latents(n, width, height)
    return pipe(list(prompts), height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                sampler="euler", seed=SEED, latents=latents, output_type="np", progress=False).array


@pytest.mark.parametrize("notch", [
    dict(prompts=("Café ✨, (masterpiece:1.2)", "a photo of a cat")),  # the two prompts swapped
    dict(prompts=("a photo of a dog", "Café ✨, (masterpiece:1.2)")),  # one word of one prompt
    dict(guidance=4.5), dict(guidance=5.5),  # guidance ± 10 %
    dict(steps=7),  # one step more
    dict(latents_seed=1),  # another seed: other initial latents
])
def test_one_notch_change_exceeds_the_image_bounds(pipe, notch):
    """Each one-notch change of a generation parameter moves the decoded images by more than the bounds above, so
    test_decoded_images_match would catch a pipeline that got that parameter wrong."""
    base = decoded(pipe, **DECODED)
    moved = np.abs(decoded(pipe, **{**DECODED, **notch}) - base)
    assert moved.max() > IMAGE_MAX_TOL and moved.mean() > IMAGE_MEAN_TOL


@pytest.mark.parametrize("sampler, steps, start", [("euler", 10, 0.8), ("dpmpp_2m", 12, 0.7), ("heun", 9, 0.8)])
def test_refiner_expert_matches_diffusers(pipe, reference, reference_refiner, sampler, steps, start):
    prompts, width, height = ["a lighthouse at dusk"], 128, 64
    latents = initial_latents(1, width, height)
    ours = pipe(prompts, height=height, width=width, num_inference_steps=steps, sampler=sampler, seed=SEED,
                latents=latents, refiner_start=start, output_type="latent", progress=False)
    reference.scheduler = scheduler_for(sampler, pipe.scheduler_config)
    reference_refiner.scheduler = scheduler_for(sampler, pipe.scheduler_config)
    with torch.inference_mode():
        mid = reference(prompt=prompts, height=height, width=width, num_inference_steps=steps,
                        latents=torch.from_numpy(latents), denoising_end=start, output_type="latent").images
        theirs = reference_refiner(prompt=prompts, image=mid, num_inference_steps=steps, denoising_start=start,
                                   output_type="latent").images
    assert rel_l2(ours.array, theirs.numpy()) <= LATENT_TOL


@pytest.fixture(scope="module")
def reference_img2img(reference):
    return diffusers.StableDiffusionXLImg2ImgPipeline.from_pipe(reference)


def init_image(width=96, height=64):
    from PIL import Image

    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("sampler, strength, steps", [("euler", 0.5, 10), ("dpmpp_2m", 0.8, 12), ("heun", 0.6, 7),
                                                      ("euler_a", 0.3, 20), ("ddim", 1.0, 5)])
def test_img2img_matches_diffusers(pipe, reference_img2img, sampler, strength, steps):
    image, prompt = init_image(), ["a watercolour of a harbour"]
    ours = pipe(prompt, image=image, strength=strength, num_inference_steps=steps, sampler=sampler, seed=SEED,
                output_type="latent", progress=False)
    reference_img2img.scheduler = scheduler_for(sampler, pipe.scheduler_config)
    with same_noise(1), torch.inference_mode():
        theirs = reference_img2img(prompt=prompt, image=image, strength=strength, num_inference_steps=steps,
                                   output_type="latent").images
    assert ours.array.shape == (1, 4, 8, 12)
    assert rel_l2(ours.array, theirs.numpy()) <= LATENT_TOL


@pytest.mark.parametrize("sampler, strength", [("euler", 0.3), ("dpmpp_2m_karras", 0.5)])
def test_post_hoc_refine_matches_diffusers(pipe, reference, reference_refiner, sampler, strength):
    prompts, width, height, steps = ["a lighthouse at dusk"], 96, 64, 10
    latents = initial_latents(1, width, height)
    ours = pipe(prompts, height=height, width=width, num_inference_steps=steps, sampler=sampler, seed=SEED,
                latents=latents, refine_strength=strength, output_type="latent", progress=False)
    reference.scheduler = scheduler_for(sampler, pipe.scheduler_config)
    reference_refiner.scheduler = scheduler_for(sampler, pipe.scheduler_config)
    with same_noise(1), torch.inference_mode():
        base = reference(prompt=prompts, height=height, width=width, num_inference_steps=steps,
                         latents=torch.from_numpy(latents), output_type="latent").images
        theirs = reference_refiner(prompt=prompts, image=base, strength=strength, num_inference_steps=steps,
                                   output_type="latent").images
    assert rel_l2(ours.array, theirs.numpy()) <= LATENT_TOL


def test_seeds_are_reproducible_and_per_image(pipe):
    kwargs = dict(height=64, width=64, num_inference_steps=3, output_type="latent", progress=False)
    a = pipe(["x", "y"], seed=7, **kwargs)
    b = pipe(["x", "y"], seed=7, **kwargs)
    c = pipe(["y"], seed=8, **kwargs)
    assert a.seeds == [7, 8] and np.array_equal(a.array, b.array)
    assert np.allclose(a.array[1], c.array[0], atol=1e-5)  # image i depends on seed + i only


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(height=100), "multiples of 8"),
    (dict(num_inference_steps=0), "steps 0"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt 0"),
    (dict(sampler="plms"), "plms"),
    (dict(refiner_start=1.0), "strictly between 0 and 1"),
    (dict(latents=np.zeros((1, 4, 16, 16), np.float32)), "latents of shape"),
    (dict(latents=np.zeros((1, 4, 8, 8), np.int64)), "expected float"),
    (dict(latents=np.full((1, 4, 8, 8), np.nan, np.float32)), "NaN"),
    (dict(image=init_image(), strength=0.0), "strength 0.0"),
    (dict(image=init_image(), strength=0.01, num_inference_steps=10), "leaves no step"),
    (dict(refine_strength=1.5), "refine_strength 1.5"),
    (dict(refine_strength=0.3, refiner_start=0.8), "not both"),
])
def test_bad_input(pipe, kwargs, pattern):
    with pytest.raises(UserError, match=pattern):
        pipe("a cat", **{"height": 64, "width": 64, "progress": False, **kwargs})


def reference_windows(tokenizer_dir, prompt, k):
    """77-token windows built with transformers' tokenizer: runs of 75 ids, each <bos> … <eos> + pad."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    ids = tok(prompt, add_special_tokens=False).input_ids
    rows = []
    for w in range(k):
        chunk = ids[w * 75 : (w + 1) * 75]
        rows.append([tok.bos_token_id, *chunk, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(chunk)))
    return torch.tensor(rows)


def test_long_prompt_chunks_match_transformers_and_diffusers(pipe, reference, tiny_base, tiny_engine):
    prompt = ", ".join(f"detail number {i} of a sprawling fantasy city" for i in range(20))
    n_tokens = len(pipe.tokenizers["tokenizer"].tokenize([prompt])[0])
    k = pipe.prompt_windows([prompt], [None])
    assert k == -(-n_tokens // 75) >= 2
    states = []
    with torch.inference_mode():
        for module, name in ((tiny_base.clip_l, "tokenizer"), (tiny_base.clip_g, "tokenizer_2")):
            ids = reference_windows(tiny_engine / name, prompt, k)
            assert np.array_equal(ids.numpy(), pipe.tokenizers[name].windows([prompt])[0])
            out = module(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2].reshape(1, k * 77, -1))
        embeds, pooled = torch.cat(states, -1), out.text_embeds[:1]
    latents = initial_latents(1, 96, 64)
    ours = pipe(prompt, height=64, width=96, num_inference_steps=6, latents=latents, long_prompt="chunk",
                output_type="latent", progress=False)
    reference.scheduler = scheduler_for("euler", pipe.scheduler_config)
    with torch.inference_mode():
        theirs = reference(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=torch.zeros_like(embeds),
                           negative_pooled_prompt_embeds=torch.zeros_like(pooled), height=64, width=96,
                           num_inference_steps=6, latents=torch.from_numpy(latents), output_type="latent").images
    assert rel_l2(ours.array, theirs.numpy()) <= LATENT_TOL


def window_embeds(encoders, prompt, k, emptied=()):
    """diffusers-side chunked conditioning for one prompt: each (text encoder, tokenizer folder) encodes the k windows
    that transformers' tokenizer gives (reference_windows); penultimate hidden states concatenated along the
    context axis [1, 77·k, C], pooled embedding from the first window (the last encoder's text_embeds). Windows
    listed in `emptied` are replaced by the empty prompt's window (for one-notch changes)."""
    states = []
    with torch.inference_mode():
        for module, tokenizer_dir in encoders:
            ids = reference_windows(tokenizer_dir, prompt, k)
            ids[list(emptied)] = reference_windows(tokenizer_dir, "", 1)[0]
            out = module(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2].reshape(1, k * 77, -1))
    return torch.cat(states, -1), out.text_embeds[:1]


def test_long_prompt_chunk_with_negative_and_refiner(pipe, reference, reference_refiner, tiny_base, tiny_refiner):
    """Chunked long prompt and long negative prompt, base then refiner as second expert, against diffusers given
    the same chunked embeddings: the base's from CLIP-L + CLIP-G, the refiner's from its own CLIP-G alone, each
    windowed by transformers' tokenizer; diffusers' denoising_end on the base, denoising_start on the refiner."""
    prompt, negative = " ".join(["ornate"] * 200), "blurry " * 100
    width, height, steps, guidance, start = 64, 64, 6, 5.0, 0.5
    lengths = [len(ids) for ids in pipe.tokenizers["tokenizer_2"].tokenize([prompt, negative])]
    k = pipe.prompt_windows([prompt], [negative])
    assert lengths == [200, 100] and k == 3  # the negative fills 2 windows of 75 tokens and gets an empty third
    latents = initial_latents(1, width, height)
    ours = pipe([prompt], negative, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                refiner_start=start, long_prompt="chunk", latents=latents, output_type="latent", progress=False).array

    base_encoders = [(tiny_base.clip_l, tiny_base.tokenizer_dirs["tokenizer"]),
                     (tiny_base.clip_g, tiny_base.tokenizer_dirs["tokenizer_2"])]
    refiner_encoders = [(tiny_refiner.clip_g, tiny_refiner.tokenizer_dirs["tokenizer_2"])]
    # notch: the negative prompt's second window (its tokens 76-100) replaced by the empty prompt's
    cond = {role: {"pos": window_embeds(enc, prompt, k), "neg": window_embeds(enc, negative, k),
                   "neg_cut": window_embeds(enc, negative, k, emptied=[1])}
            for role, enc in (("base", base_encoders), ("refiner", refiner_encoders))}
    assert not torch.equal(cond["base"]["neg"][0], cond["base"]["neg_cut"][0])

    def diffusers_run(neg="neg", refiner_neg=None, guidance_scale=guidance):
        reference.scheduler = scheduler_for("euler", pipe.scheduler_config)
        reference_refiner.scheduler = scheduler_for("euler", pipe.scheduler_config)

        def embeds(role):
            (pe, pp), (ne, npool) = cond[role]["pos"], cond[role][(refiner_neg or neg) if role == "refiner" else neg]
            return dict(prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=ne,
                        negative_pooled_prompt_embeds=npool, num_inference_steps=steps,
                        guidance_scale=guidance_scale, output_type="latent")

        with torch.inference_mode():
            mid = reference(height=height, width=width, latents=torch.from_numpy(latents), denoising_end=start,
                            **embeds("base")).images
            return reference_refiner(image=mid, denoising_start=start, **embeds("refiner")).images.numpy()

    assert ours.shape == (1, 4, 8, 8)
    assert rel_l2(ours, diffusers_run()) <= LATENT_TOL  # measured 1.5e-6
    # one notch off is caught: the negative prompt's second window dropped in both stages (measured rel-L2 0.063) or
    # in the refiner's alone (2.9e-3), guidance 10 % lower / higher (0.022 / 0.022)
    for notch in (dict(neg="neg_cut"), dict(refiner_neg="neg_cut"), dict(guidance_scale=guidance * 0.9),
                  dict(guidance_scale=guidance * 1.1)):
        assert rel_l2(ours, diffusers_run(**notch)) > LATENT_TOL, notch


def mask_image(width=96, height=64):
    from PIL import Image

    mask = np.zeros((height, width), np.uint8)
    mask[:, : width // 2] = 255  # white = repaint the left half
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def inpaint_engine(tiny_base, tmp_path_factory):
    """A tiny 9-channel inpainting model (diffusers folder) and its engine directory."""
    import json
    import shutil

    from sdxl_trt.export.engine_dir import export_engine_dir
    from sdxl_trt.export.sources import load_model

    folder = tmp_path_factory.mktemp("inpaint") / "model"
    tiny_base.save_pretrained(folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["in_channels"] = 9
    torch.manual_seed(9)
    shutil.rmtree(folder / "unet")
    diffusers.UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    out = folder.parent / "engine"
    export_engine_dir(str(folder), out, precision="fp32", progress=False)
    return load_model(str(folder), progress=False), Pipeline.load(out)


@pytest.mark.parametrize("channels", [4, 9])
@pytest.mark.parametrize("sampler, strength, steps", [("euler", 0.9999, 8), ("dpmpp_2m", 0.6, 10), ("euler_a", 1.0, 6)])
def test_inpainting_matches_diffusers(pipe, reference, inpaint_engine, channels, sampler, strength, steps):
    if channels == 4:
        ours_pipe, ref = pipe, diffusers.StableDiffusionXLInpaintPipeline.from_pipe(reference)
    else:
        model, ours_pipe = inpaint_engine
        ref = diffusers.StableDiffusionXLInpaintPipeline.from_pipe(diffusers_pipeline(model))
    image, mask, prompt = init_image(), mask_image(), ["a red door"]
    ours = ours_pipe(prompt, image=image, mask_image=mask, strength=strength, num_inference_steps=steps,
                     sampler=sampler, seed=SEED, output_type="latent", progress=False)
    ref.scheduler = scheduler_for(sampler, ours_pipe.scheduler_config)
    with same_noise(1), torch.inference_mode():
        theirs = ref(prompt=prompt, image=image, mask_image=mask, strength=strength, num_inference_steps=steps,
                     height=64, width=96, output_type="latent").images
    assert rel_l2(ours.array, theirs.numpy()) <= LATENT_TOL


def test_inpainting_bad_input(pipe):
    from PIL import Image

    with pytest.raises(UserError, match="must be the same size"):
        pipe("x", image=init_image(), mask_image=Image.new("L", (64, 64)), num_inference_steps=2, progress=False)
    with pytest.raises(UserError, match="needs the image"):
        pipe("x", mask_image=mask_image(), num_inference_steps=2, progress=False)


def test_refiner_options_need_a_refiner(inpaint_engine):
    _, base_only = inpaint_engine
    for kwargs in (dict(refiner_start=0.8), dict(refine_strength=0.3)):
        with pytest.raises(UserError, match="has no refiner"):
            base_only("x", height=64, width=64, num_inference_steps=2, progress=False, **kwargs)


def test_tiled_decode_matches_diffusers_tiling(pipe, reference):
    """--low-memory's tiled VAE decode against diffusers' AutoencoderKL with enable_tiling(), small tiles."""
    from sdxl_trt.runtime.tiling import decode_tiled

    vae = reference.vae
    vae.enable_tiling()
    vae.tile_latent_min_size, vae.tile_sample_min_size = 8, 64
    try:
        latent = np.random.default_rng(2).standard_normal((1, 4, 20, 28)).astype(np.float32)
        with torch.no_grad():
            expected = vae.decode(torch.from_numpy(latent)).sample.numpy()
    finally:
        vae.disable_tiling()
    session = pipe.backend.session("vae_decoder")
    got = decode_tiled(lambda part: session.run(latent=part)["image"], latent, tile=8)
    assert got.shape == expected.shape == (1, 3, 160, 224)
    whole = session.run(latent=latent)["image"]
    assert rel_l2(got, whole) > 1e-3  # tiles decode differently from the whole (GroupNorm statistics per tile)
    assert rel_l2(got, expected) < 1e-5


def test_low_memory_frees_each_model_after_its_stage(tiny_engine):
    normal = Pipeline.load(tiny_engine)
    low = Pipeline.load(tiny_engine, low_memory=True)
    low.vae_tile = 16  # tiles of 128 px, so that a 192x256 image is decoded in tiles
    kw = dict(height=256, width=192, num_inference_steps=4, seed=8, output_type="np", progress=False, refiner_start=0.5)
    expected, got = normal("a kite", **kw), low("a kite", **kw)
    assert got.array.shape == expected.array.shape == (1, 256, 192, 3)
    assert low.backend._sessions == {}  # every model freed after its stage
    assert set(normal.backend._sessions) >= {"clip_l", "clip_g", "unet", "unet_refiner", "vae_decoder"}
    assert np.abs(got.array - expected.array).mean() < 0.05  # tiled decode: close to the whole-image decode
    latents = low("a kite", **{**kw, "output_type": "latent"}).array
    np.testing.assert_array_equal(latents, normal("a kite", **{**kw, "output_type": "latent"}).array)


def test_a_plan_makes_each_session_once_whatever_the_order_of_its_dimensions():
    """pipeline.unique_plan keys a (component, dims) pair as the backends key the session made for it
    (contracts.shape_key): the same dimensions in another order are one session, other sizes or components are not."""
    from sdxl_trt.runtime.contracts import shape_key
    from sdxl_trt.runtime.pipeline import unique_plan

    plan = [("unet", {"B": 2, "h": 128, "w": 96}), ("unet", {"w": 96, "B": 2, "h": 128}), ("unet", {"B": 2, "h": 96, "w": 96}),
            ("vae_decoder", {"B": 2, "h": 128, "w": 96})]
    assert unique_plan(plan) == [plan[0], plan[2], plan[3]]
    assert shape_key(*plan[0]) == shape_key(*plan[1]) != shape_key(*plan[2])
