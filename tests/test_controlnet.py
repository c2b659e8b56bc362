"""ControlNet on the tiny models: the runtime (ONNX Runtime CPU) against diffusers' StableDiffusionXLControlNetPipeline
and its Img2Img variant from the same initial latents — final latents within rel-L2 1e-3 (LATENT_TOL, as the other
parity tests) for one ControlNet, for two with different scales and guidance windows, in guess mode, for img2img and
with the refiner as second expert; each ControlNet must move the latents far more than that (a net whose residuals
vanish would pass every parity test). The export's own check (--verify: every file against torch at two shapes,
fp32 within 1e-4) runs in the fixture."""

from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers_schedulers import scheduler_for  # noqa: E402
from test_pipeline import LATENT_TOL, SEED, initial_latents, init_image, same_noise  # noqa: E402

from sdxl_trt.export.controlnet_sources import load_controlnet, resolve_controlnet  # noqa: E402
from sdxl_trt.export.verify import rel_l2  # noqa: E402
from sdxl_trt.export.vocab import CONFIGS  # noqa: E402
from sdxl_trt.runtime import Pipeline, UserError  # noqa: E402

WIDTH, HEIGHT, STEPS = 96, 64, 8
PROMPTS = ["a house by a lake", "a red bicycle"]


@pytest.fixture(scope="module")
def control_engine(tmp_path_factory):
    from sdxl_trt.export.engine_dir import export_engine_dir

    out = tmp_path_factory.mktemp("control") / "tiny"
    report = export_engine_dir("tiny:base", out, refiner="tiny:refiner", controlnets=["tiny:controlnet"] * 2,
                               verify=True, progress=False)
    lines = [line for line in report.verify_lines if line.startswith("controlnet fp32")]
    assert len(lines) == 2 * 10 * 2  # two nets × ten residuals × two shapes, each within 1e-4 of torch
    return out


def test_controlnet_graphs_are_clean(control_engine):
    from test_export import assert_clean_graphs

    assert_clean_graphs(control_engine)  # controlnet_<i> and unet_control too


@pytest.fixture(scope="module")
def pipe(control_engine):
    return Pipeline.load(control_engine)


@pytest.fixture(scope="module")
def nets():
    config = json.loads((CONFIGS / "tiny-base" / "unet" / "config.json").read_text())
    return [load_controlnet(resolve_controlnet("tiny:controlnet"), i, config) for i in range(2)]


def control_images(count: int) -> list:
    """Edge-map-like control images (white shapes on black, each its own), not at the output size: both sides resize
    them (Lanczos)."""
    from PIL import Image, ImageDraw

    images = []
    for k in range(count):
        image = Image.new("RGB", (120, 80))
        draw = ImageDraw.Draw(image)
        draw.rectangle((10 + 50 * k, 10, 60 + 50 * k, 70), outline=(255, 255, 255), width=4)
        draw.ellipse((70 - 50 * k, 20, 110 - 50 * k, 60), fill=(255, 255, 255))
        images.append(image)
    return images


def reference_pipe(tiny_base, nets, cls=None):
    from diffusers import StableDiffusionXLControlNetPipeline

    from sdxl_trt.export.reference import diffusers_pipeline

    base = diffusers_pipeline(tiny_base)
    controlnet = nets[0] if len(nets) == 1 else diffusers.models.controlnets.MultiControlNetModel(nets)
    return (cls or StableDiffusionXLControlNetPipeline).from_pipe(base, controlnet=controlnet)


def theirs_latents(reference, sampler, **kwargs):
    import diffusers.pipelines.controlnet.pipeline_controlnet_sd_xl_img2img as cn_img2img

    reference.scheduler = scheduler_for(sampler, reference.scheduler.config)
    with same_noise(len(PROMPTS)), torch.inference_mode(), \
            mock.patch.object(cn_img2img, "randn_tensor", diffusers.schedulers.scheduling_euler_discrete.randn_tensor):
        return reference(output_type="latent", **kwargs).images.numpy()


CASES = {
    "one net": dict(nets=1, scale=0.7),
    "two nets, windows": dict(nets=2, scale=[0.6, 1.1], start=[0.0, 0.3], end=[0.7, 1.0]),
    "guess mode": dict(nets=1, scale=0.9, guess_mode=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_controlnet_matches_diffusers(pipe, tiny_base, nets, case):
    c = CASES[case]
    count = c["nets"]
    images = control_images(2)[:count]
    extra = dict(control_guidance_start=c.get("start", 0.0), control_guidance_end=c.get("end", 1.0),
                 guess_mode=c.get("guess_mode", False))
    latents = initial_latents(len(PROMPTS), WIDTH, HEIGHT)
    if count == 1:  # a directory of two nets: the first alone is a directory of one
        pipe = one_net(pipe)
    ours = pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, seed=SEED, latents=latents,
                output_type="latent", progress=False, control_image=images if count > 1 else images[0],
                controlnet_conditioning_scale=c["scale"], **extra).array
    theirs = theirs_latents(reference_pipe(tiny_base, nets[:count]), "euler", prompt=PROMPTS, height=HEIGHT,
                            width=WIDTH, num_inference_steps=STEPS, latents=torch.from_numpy(latents),
                            image=images if count > 1 else images[0], controlnet_conditioning_scale=c["scale"],
                            **extra)
    assert rel_l2(ours, theirs) <= LATENT_TOL
    plain = pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, seed=SEED, latents=latents,
                 output_type="latent", progress=False).array
    assert rel_l2(ours, plain) > 30 * LATENT_TOL  # the ControlNet steers the image
    swapped = control_images(2)[::-1]  # for one net: the other image
    other = pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, seed=SEED, latents=latents,
                 output_type="latent", progress=False, control_image=swapped if count > 1 else swapped[0],
                 controlnet_conditioning_scale=c["scale"], **extra).array
    assert rel_l2(ours, other) > 5 * LATENT_TOL  # and its control image counts


def test_the_control_image_sets_the_size_as_in_diffusers(pipe, tiny_base, nets):
    """No height/width: diffusers' ControlNet pipeline makes the image at the control image's size, rounded down to a
    multiple of 8 (here 133x99 → 128x96), not at the model's default size; so do we."""
    control = control_images(1)[0].resize((133, 99))
    latents = initial_latents(len(PROMPTS), 128, 96)
    ours = one_net(pipe)(PROMPTS, num_inference_steps=STEPS, seed=SEED, latents=latents, output_type="latent",
                         progress=False, control_image=control, controlnet_conditioning_scale=0.7).array
    theirs = theirs_latents(reference_pipe(tiny_base, nets[:1]), "euler", prompt=PROMPTS, num_inference_steps=STEPS,
                            latents=torch.from_numpy(latents), image=control, controlnet_conditioning_scale=0.7)
    assert ours.shape == theirs.shape == latents.shape
    assert rel_l2(ours, theirs) <= LATENT_TOL


def one_net(pipe):
    """The same pipeline with a directory that lists only controlnet_0 (no re-export)."""
    import copy

    single = copy.copy(pipe)
    single.roles = copy.deepcopy(pipe.roles)
    single.roles["base"]["controlnets"] = ["controlnet_0"]
    return single


def test_controlnet_img2img_matches_diffusers(pipe, tiny_base, nets):
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

    image, control = init_image(WIDTH, HEIGHT), control_images(2)
    kwargs = dict(controlnet_conditioning_scale=[0.8, 0.5], control_guidance_end=[1.0, 0.6])
    ours = pipe(PROMPTS, image=image, strength=0.6, num_inference_steps=10, sampler="euler", seed=SEED,
                output_type="latent", progress=False, control_image=control, **kwargs).array
    reference = reference_pipe(tiny_base, nets, StableDiffusionXLControlNetImg2ImgPipeline)
    theirs = theirs_latents(reference, "euler", prompt=PROMPTS, image=[image] * len(PROMPTS), control_image=control,
                            strength=0.6, num_inference_steps=10, height=HEIGHT, width=WIDTH, **kwargs)
    assert rel_l2(ours, theirs) <= LATENT_TOL


def test_refiner_expert_runs_without_controlnet_as_diffusers(pipe, tiny_base, tiny_refiner, nets):
    from sdxl_trt.export.reference import diffusers_pipeline

    latents, control = initial_latents(len(PROMPTS), WIDTH, HEIGHT), control_images(2)
    ours = pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=10, seed=SEED, latents=latents,
                refiner_start=0.7, output_type="latent", progress=False, control_image=control).array
    mid = theirs_latents(reference_pipe(tiny_base, nets), "euler", prompt=PROMPTS, height=HEIGHT, width=WIDTH,
                         num_inference_steps=10, latents=torch.from_numpy(latents), image=control, denoising_end=0.7)
    refiner = diffusers_pipeline(tiny_refiner)
    theirs = theirs_latents(refiner, "euler", prompt=PROMPTS, image=torch.from_numpy(mid), num_inference_steps=10,
                            denoising_start=0.7)
    assert rel_l2(ours, theirs) <= LATENT_TOL


@pytest.mark.parametrize("kwargs, says", [
    (dict(control_image="IMAGES2", controlnet_conditioning_scale=float("nan")), "controlnet_conditioning_scale nan"),
    (dict(control_image="IMAGES1"), "1 image for 2 ControlNets"),
    (dict(control_image="IMAGES2", controlnet_conditioning_scale=[1.0, 1.0, 1.0]), "3 given for 2 ControlNets"),
    (dict(control_image="IMAGES2", control_guidance_start=0.8, control_guidance_end=0.5), "must be below"),
    (dict(control_image="IMAGES2", control_guidance_end=1.5), "control_guidance_end"),
    (dict(control_image=["/nowhere/edges.png", "/nowhere/depth.png"]), "/nowhere/edges.png"),
    (dict(controlnet_conditioning_scale=0.5), "goes with control_image"),
    (dict(control_image="IMAGES2", mask_image="MASK"), "ControlNet inpainting is not supported"),
])
def test_bad_control_input_is_one_clear_error(pipe, kwargs, says):
    from PIL import Image

    kwargs = {k: (control_images(int(v[-1])) if isinstance(v, str) and v.startswith("IMAGES") else
                  Image.new("L", (WIDTH, HEIGHT)) if v == "MASK" else v) for k, v in kwargs.items()}
    if "mask_image" in kwargs:
        kwargs["image"] = init_image(WIDTH, HEIGHT)
    with pytest.raises(UserError, match=None) as err:
        pipe("a cat", height=HEIGHT, width=WIDTH, num_inference_steps=2, progress=False, **kwargs)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_control_image_on_a_directory_without_controlnet(tiny_engine):
    with pytest.raises(UserError, match="this engine directory has no ControlNet; export one"):
        Pipeline.load(tiny_engine)("a cat", height=64, width=64, num_inference_steps=2, progress=False,
                                   control_image=control_images(1)[0])


def test_single_file_and_folder_controlnets_load_as_the_same_net(nets, tmp_path):
    """A ControlNet saved as a diffusers folder and as its one .safetensors file loads with the same weights."""
    from safetensors.torch import save_file

    config = json.loads((CONFIGS / "tiny-base" / "unet" / "config.json").read_text())
    nets[1].save_pretrained(tmp_path / "folder")
    save_file({k: v.contiguous() for k, v in nets[1].state_dict().items()}, tmp_path / "net.safetensors")
    for spec in (tmp_path / "folder", tmp_path / "net.safetensors"):
        loaded = load_controlnet(resolve_controlnet(str(spec)), 0, config)
        want = nets[1].state_dict()
        assert loaded.state_dict().keys() == want.keys()
        assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())


def original_layout(net) -> dict:
    """A ControlNet's weights in the original (`control_model.`) layout, as published ControlNet checkpoints store
    them: the UNet part through tests/original_layout.py's UNet mapping, the hint block, zero convs and mid-block
    output by their names there — the inverse of what diffusers' converter reads."""
    import types

    from original_layout import UNET_PREFIX, _convert_unet

    own = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
    state = net.state_dict()
    unet_part = types.SimpleNamespace(config=net.config,
                                      state_dict=lambda: {k: v for k, v in state.items() if not k.startswith(own)})
    out = {"control_model." + k.removeprefix(UNET_PREFIX): v for k, v in _convert_unet(unet_part).items()}
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("controlnet_cond_embedding.blocks.")})
    names = {"conv_in": 0, "conv_out": 2 * (len(blocks) + 1), **{f"blocks.{b}": 2 * (b + 1) for b in blocks}}
    for k, v in state.items():
        head, _, param = k.rpartition(".")
        if head.startswith("controlnet_cond_embedding."):
            out[f"control_model.input_hint_block.{names[head.split('.', 1)[1]]}.{param}"] = v
        elif head.startswith("controlnet_down_blocks."):
            out[f"control_model.zero_convs.{head.split('.')[1]}.0.{param}"] = v
        elif head == "controlnet_mid_block":
            out[f"control_model.middle_block_out.0.{param}"] = v
    return {k: v.contiguous() for k, v in out.items()}


def test_original_layout_controlnet_loads_as_the_same_net(nets, tmp_path):
    """A single-file ControlNet in the original layout goes through diffusers' converter (and the SDXL added
    embedding it leaves out) to the same weights."""
    from safetensors.torch import save_file

    config = json.loads((CONFIGS / "tiny-base" / "unet" / "config.json").read_text())
    save_file(original_layout(nets[1]), tmp_path / "original.safetensors")
    loaded = load_controlnet(resolve_controlnet(str(tmp_path / "original.safetensors")), 0, config).state_dict()
    want = nets[1].state_dict()
    assert loaded.keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in loaded.items())


@pytest.mark.parametrize("spec, says", [
    ("tiny:nothing", "no such file or folder"),
    ("", "--controlnet is empty"),
])
def test_bad_controlnet_sources(spec, says):
    with pytest.raises(UserError, match=says):
        resolve_controlnet(spec)


def test_controlnet_for_another_unet_is_refused(tmp_path):
    from sdxl_trt.export.engine_dir import export_engine_dir

    with pytest.raises(UserError, match="was made for another UNet: its block_out_channels"):
        export_engine_dir("tiny:base", tmp_path / "x", controlnets=["random:controlnet"], precision="fp32",
                          progress=False)


def test_http_control_images_equal_the_python_api(control_engine, pipe):
    """control_images (base64, one per net) and controlnet_conditioning_scale reach the pipeline: the served latents
    equal the Python API's for the same request; a bad request is a 400 naming the field."""
    pytest.importorskip("fastapi")
    import base64
    import io

    from starlette.testclient import TestClient

    from sdxl_trt.runtime.server import create_app

    images = control_images(2)

    def b64(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    body = {"prompt": "a red bicycle", "size": f"{WIDTH}x{HEIGHT}", "steps": 3, "seed": 17, "output_format": "latent",
            "control_images": [b64(i) for i in images], "controlnet_conditioning_scale": [0.5, 1.2]}
    with TestClient(create_app(control_engine, pipeline=pipe, warmup=False)) as client:
        answer = client.post("/v1/images/generations", json=body)
        assert answer.status_code == 200, answer.text
        served = np.load(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
        bad = client.post("/v1/images/generations", json={**body, "control_images": body["control_images"][:1]})
        assert bad.status_code == 400 and "control_images: 1 image for 2 ControlNets" in bad.json()["error"]["message"]
        bad = client.post("/v1/images/generations", json={**body, "control_images": ["bm90IGFuIGltYWdl"]})
        assert bad.status_code == 400 and "control_images[0]: not a base64 PNG" in bad.json()["error"]["message"]
    direct = pipe("a red bicycle", height=HEIGHT, width=WIDTH, num_inference_steps=3, seed=17, output_type="latent",
                  progress=False, control_image=images, controlnet_conditioning_scale=[0.5, 1.2]).array
    np.testing.assert_array_equal(served, direct)


def test_cli_control_flags(control_engine, tmp_path):
    """`generate --control IMAGE[:SCALE] …` equals the Python API; its errors are one line, exit 2."""
    import subprocess
    import sys

    paths = []
    for k, image in enumerate(control_images(2)):
        paths.append(tmp_path / f"control{k}.png")
        image.save(paths[-1])
    out = tmp_path / "latent.npy"
    args = [sys.executable, "-m", "sdxl_trt.runtime.cli", "generate", str(control_engine), "a red bicycle", "--size",
            f"{WIDTH}x{HEIGHT}", "--steps", "3", "--seed", "5", "--output-type", "latent", "--out", str(out)]
    run = subprocess.run([*args, "--control", f"{paths[0]}:0.4", "--control", str(paths[1]), "--control-end", "1,0.5"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    from PIL import Image

    direct = Pipeline.load(control_engine)(
        "a red bicycle", height=HEIGHT, width=WIDTH, num_inference_steps=3, seed=5, output_type="latent",
        progress=False, control_image=[Image.open(p) for p in paths], controlnet_conditioning_scale=[0.4, 1.0],
        control_guidance_end=[1.0, 0.5]).array
    np.testing.assert_allclose(np.load(out), direct, rtol=0, atol=0)
    # a PNG records its control images (path, sha256, scale, window): --from-png makes the same image again
    png, again = tmp_path / "made.png", tmp_path / "again.png"
    png_args = [a if a != str(out) else str(png) for a in args if a not in ("--output-type", "latent")]
    flags = ["--control", f"{paths[0]}:0.4", "--control", str(paths[1]), "--control-end", "1,0.5", "--guess-mode"]
    assert subprocess.run([*png_args, *flags], capture_output=True, text=True).returncode == 0
    replay = [sys.executable, "-m", "sdxl_trt.runtime.cli", "generate", str(control_engine), "--from-png", str(png),
              "--out", str(again)]
    run = subprocess.run(replay, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(again)))
    without = subprocess.run([*png_args[:-1], str(tmp_path / "plain.png")], capture_output=True, text=True)
    assert without.returncode == 0 and not np.array_equal(np.asarray(Image.open(png)),
                                                          np.asarray(Image.open(tmp_path / "plain.png")))
    control_images(2)[1].rotate(90).save(paths[1])  # a control image changed since: said, not silently used
    run = subprocess.run(replay, capture_output=True, text=True)
    assert run.returncode == 2 and "has changed since the image was made" in run.stderr, run.stderr[-2000:]
    # no --size: the first control image's (133x99 → 128x96 latents 12x16), as diffusers
    sized = [tmp_path / f"sized{k}.png" for k in range(2)]
    for k, image in enumerate(control_images(2)):
        image.resize((133, 99)).save(sized[k])
    unsized = [a for a in args if a not in ("--size", f"{WIDTH}x{HEIGHT}")]
    run = subprocess.run([*unsized, "--control", str(sized[0]), "--control", str(sized[1])], capture_output=True,
                         text=True)
    assert run.returncode == 0 and np.load(out).shape == (1, 4, 12, 16), run.stderr[-2000:]
    for extra, says in ((["--control", str(paths[0])], "--control: 1 image for 2 ControlNets"),
                        (["--control", f"{paths[0]}:inf", "--control", str(paths[1])], "finite"),
                        (["--control-start", "0.3"], "--control-start goes with --control")):
        run = subprocess.run([*args, *extra], capture_output=True, text=True)
        assert run.returncode == 2 and says in run.stderr and run.stderr.count("\n") == 1, run.stderr[-2000:]


def test_tensorrt_rtx_builds_the_controlnet_with_bucket_profiles(control_engine, tmp_path):
    """TensorRT-RTX (on the CPU) builds controlnet_0 and unet_control with the SDXL bucket profiles: the control
    image at pixel size, the residuals at each level's latent size (rounded up), batch 1 to 2 under guidance."""
    import os
    import shutil

    if not os.environ.get("CI"):
        pytest.importorskip("tensorrt_rtx")
    from sdxl_trt.runtime.engine_build import BuildOptions, build_engines
    from sdxl_trt.runtime.manifest import load_manifest
    from sdxl_trt.runtime.profiles import parse_profiles

    root = tmp_path / "tiny"
    shutil.copytree(control_engine, root)
    options = BuildOptions("tensorrt-rtx", parse_profiles("1152x896,dynamic", None, 1, 1))
    build_engines(root, options, ["controlnet_0", "unet_control"], progress=False)
    records = {r["component"]: r for r in load_manifest(root).engines.values()}
    assert set(records) == {"controlnet_0", "unet_control"}
    h, w = 896 // 8, 1152 // 8
    bucket = records["controlnet_0"]["profiles"][0]["shapes"]
    assert bucket["controlnet_cond"] == [[1, 3, 896, 1152], [2, 3, 896, 1152], [2, 3, 896, 1152]]
    assert bucket["conditioning_scale"] == [[10]] * 3
    control = records["unet_control"]["profiles"][0]["shapes"]
    assert control["down_block_3"][2] == [2, 32, h // 2, w // 2] and control["mid_block"][2] == [2, 64, h // 4, w // 4]
    dynamic = records["unet_control"]["profiles"][1]["shapes"]["down_block_8"]
    assert [shape[2:] for shape in dynamic] == [[16, 16], [32, 32], [48, 48]]  # 512-1536 px at 1/4 of the latents


@pytest.fixture
def host_gpu(control_engine, monkeypatch):
    """The device loop with ControlNets on stand-in GPUs (tests/host_devices.py: FakeCudart host memory, numpy twins of
    the kernels, ONNX Runtime CPU sessions behind the binding interface), and the ort-cpu reference."""
    import types

    from host_devices import HostDeviceBackend, install_host_devices

    from sdxl_trt.runtime.backends import OrtCpuBackend
    from sdxl_trt.runtime.device_loop import DeviceLoop
    from sdxl_trt.runtime.parallel_loop import ParallelLoop

    fake = install_host_devices(monkeypatch, 2)
    reference = Pipeline.load(control_engine, backend="ort-cpu")
    cpu = OrtCpuBackend(reference.manifest)
    backends = [HostDeviceBackend(reference.manifest, fake, d, cpu) for d in (0, 1)]
    loops = [DeviceLoop(b) for b in backends]

    def pipeline(devices: int):
        backends[0].loop = loops[0] if devices == 1 else ParallelLoop(loops[0], loops[1:])
        backends[0].devices = tuple(range(devices))
        pipe = Pipeline(reference.manifest, backends[0])
        pipe.graph_text_encoders = False
        return pipe

    return types.SimpleNamespace(pipeline=pipeline, reference=reference, backends=backends)


DEVICE_CASES = {
    "two nets, windows, euler": dict(sampler="euler", controlnet_conditioning_scale=[0.6, 1.1],
                                     control_guidance_start=[0.0, 0.3], control_guidance_end=[0.7, 1.0]),
    "guess mode, euler_a": dict(sampler="euler_a", controlnet_conditioning_scale=0.8, guess_mode=True),
    "no guidance": dict(sampler="euler", guidance_scale=1.0, controlnet_conditioning_scale=[1.0, 0.5]),
    # steps 0-1 the second net alone (the first's residuals zeroed), step 2 none, steps 3-5 the first alone
    "windows with a step without nets": dict(sampler="euler", controlnet_conditioning_scale=[0.9, 0.7],
                                             control_guidance_start=[0.5, 0.0], control_guidance_end=[1.0, 0.34]),
}


def steps_in_window(start: float, end: float, steps: int) -> int:
    """How many of `steps` a net's window holds, by diffusers' `controlnet_keep` rule."""
    return sum(1 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps))


@pytest.mark.parametrize("case", list(DEVICE_CASES))
def test_device_loop_with_controlnets_equals_the_host_loop(host_gpu, case):
    """The device loop's ControlNet steps (nets bound to the UNet's buffers, scale rows picked per step, residuals
    summed by the accumulate kernel, guess mode's zero negatives) give the host loop's latents (rel-L2 within 1e-5:
    the same ONNX Runtime CPU sessions, summed in another order). A net runs only at the steps of its window."""
    kw = dict(width=WIDTH, height=HEIGHT, num_inference_steps=6, seed=9, progress=False, output_type="latent",
              control_image=control_images(2), **DEVICE_CASES[case])
    expected = host_gpu.reference(PROMPTS, **kw).array
    pipe = host_gpu.pipeline(1)
    got = pipe(PROMPTS, **kw).array
    sessions = host_gpu.backends[0].sessions
    case = DEVICE_CASES[case]
    windows = np.broadcast_to(case.get("control_guidance_start", 0.0), 2), np.broadcast_to(
        case.get("control_guidance_end", 1.0), 2)
    for k in (0, 1):
        assert sessions[f"controlnet_{k}"].runs == steps_in_window(windows[0][k], windows[1][k], 6), k
    assert sessions["unet_control"].runs == 6
    assert "unet" not in sessions  # the UNet that takes residuals ran, not the plain one
    assert rel_l2(got, expected) < 1e-5
    assert rel_l2(got, pipe(PROMPTS, **{**kw, "control_image": control_images(2)[::-1]}).array) > 1e-3


@pytest.mark.parametrize("guess_mode", [False, True])
def test_prepare_makes_the_sessions_a_control_call_runs(host_gpu, guess_mode):
    """Pipeline.prepare(control=True) plans the sessions (component and shape) the device loop then asks for: the
    ControlNets (at the prompts' half in guess mode) and the UNet that takes residuals, not the plain UNet."""
    from sdxl_trt.runtime.contracts import symbol_values

    pipe = host_gpu.pipeline(1)
    backend = host_gpu.backends[0]
    asked, loop_session = set(), backend.loop_session

    def recording(component, input_shapes):
        entry = pipe.manifest.data["components"][component]
        asked.add((component, tuple(sorted(symbol_values(entry, input_shapes).items()))))
        return loop_session(component, input_shapes)

    backend.loop_session = recording
    pipe(PROMPTS, width=WIDTH, height=HEIGHT, num_inference_steps=2, seed=1, progress=False, output_type="latent",
         control_image=control_images(2), guess_mode=guess_mode)
    plan = {(c, tuple(sorted(d.items()))) for c, d in pipe._plan(WIDTH, HEIGHT, len(PROMPTS), True, False,
                                                                  control=True, guess_mode=guess_mode)}
    made = {item for item in asked if item[0] in ("unet_control", "controlnet_0", "controlnet_1")}
    assert len(made) == 3 and made <= plan, (made, plan)
    assert "unet" not in {c for c, _ in plan}


def test_warm_up_runs_the_controlnets_too(control_engine):
    """A directory with ControlNets warms them up (and the UNet that takes residuals) beside the plain path."""
    pipe = Pipeline.load(control_engine)
    pipe.warm_up([f"{WIDTH}x{HEIGHT}"])
    assert {"unet", "unet_control", "controlnet_0", "controlnet_1"} <= set(pipe.backend._sessions)
    plain = Pipeline.load(control_engine)
    plain.warm_up([f"{WIDTH}x{HEIGHT}"], control=False)
    assert "unet" in plain.backend._sessions and "controlnet_0" not in plain.backend._sessions


def test_controlnet_across_devices_runs_on_the_first(host_gpu, caplog):
    import logging

    kw = dict(width=WIDTH, height=HEIGHT, num_inference_steps=3, seed=2, progress=False, output_type="latent",
              control_image=control_images(2))
    with caplog.at_level(logging.WARNING):
        got = host_gpu.pipeline(2)("a kite", **kw).array
    assert "ControlNet runs on GPU 0 alone" in caplog.text
    assert "unet_control" not in host_gpu.backends[1].sessions
    assert rel_l2(got, host_gpu.reference("a kite", **kw).array) < 1e-5


# --- on the GPU (ort-cuda): the device loop, with ONNX Runtime's per-step graphs and as one whole-loop graph ---------

GPU_NOISE = 5e-3  # as test_ort_cuda.NOISE: fused fp16 files differ from run to run by ≈ 1.5e-3 on their own


@pytest.fixture(scope="module")
def control_optimized(control_engine, tmp_path_factory):
    from conftest import optimized_copy

    return optimized_copy(control_engine, tmp_path_factory, "control-optimized")


GPU_KW = dict(width=192, height=256, num_inference_steps=8, seed=3, progress=False, output_type="latent",
              controlnet_conditioning_scale=[0.7, 1.2], control_guidance_start=[0.0, 0.25],
              control_guidance_end=[0.75, 1.0])


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_karras"])
def test_gpu_device_loop_with_controlnets_computes_what_its_host_loop_computes(control_engine, sampler):
    """ort-cuda, the same sessions: the device loop (nets on the UNet's buffers, residuals summed by the accumulate
    kernel) against the pipeline's numpy loop (residuals summed on the host), within 1e-5."""
    pipe = Pipeline.load(control_engine, backend="ort-cuda")
    kw = dict(GPU_KW, sampler=sampler, control_image=control_images(2))
    on_device = pipe(PROMPTS, **kw).array
    pipe.device_loop = False
    host = pipe(PROMPTS, **kw).array
    error = rel_l2(on_device, host)
    print(f"{sampler}: ControlNet device loop vs host loop on ort-cuda: rel-L2 {error:.2e}")
    assert error < 1e-5  # the same sessions on the same inputs: 0.0 on an H100 (h100-gpu-tests-controlnet-020510d.log)


@pytest.mark.gpu
def test_gpu_controlnet_cuda_graphs_compute_what_plain_runs_compute(control_optimized):
    """The fused files with ONNX Runtime's per-step CUDA graphs (one per net and one for the UNet) and with the whole
    loop as one graph of ours, captured then replayed, against plain runs; and against ort-cpu's fp32 latents. Other
    guidance windows get a whole-loop graph of their own."""
    kw = dict(GPU_KW, sampler="euler_a", control_image=control_images(2), guess_mode=True)
    buckets = ["192x256"]
    plain = Pipeline.load(control_optimized, backend="ort-cuda", cuda_graphs="off", buckets=buckets)(PROMPTS, **kw).array
    step = Pipeline.load(control_optimized, backend="ort-cuda", cuda_graphs="step", buckets=buckets)
    loop = Pipeline.load(control_optimized, backend="ort-cuda", cuda_graphs="loop", buckets=buckets)
    got = {"step": step(PROMPTS, **kw).array, "captured": loop(PROMPTS, **kw).array}
    assert loop.backend.device_loop.last_run == "loop-capture"
    got["replayed"] = loop(PROMPTS, **kw).array
    assert loop.backend.device_loop.last_run == "loop-replay"
    # other windows run other nets at other steps: a graph of their own, not the replay of the first
    windows = dict(kw, control_guidance_start=[0.5, 0.0], control_guidance_end=[1.0, 0.5])
    got["other windows"] = loop(PROMPTS, **windows).array
    assert loop.backend.device_loop.last_run == "loop-capture"
    other = step(PROMPTS, **windows).array
    assert rel_l2(got["other windows"], other) < GPU_NOISE
    del got["other windows"]
    cpu = Pipeline.load(control_optimized)(PROMPTS, **kw).array
    for name, latents in got.items():
        print(f"{name}: rel-L2 {rel_l2(latents, plain):.2e} against plain runs, {rel_l2(latents, cpu):.2e} against "
              "ort-cpu fp32")
        assert rel_l2(latents, plain) < GPU_NOISE, name
    assert rel_l2(plain, cpu) < 1e-2  # fp16 fused files against fp32 (an image swap moves them 2e-2 on the CPU)


def test_lora_reaches_the_unet_that_takes_residuals(control_engine, tiny_base, tmp_path):
    """unet_control holds the base UNet's weights: a LoRA adapter for the UNet is merged into it too. With the
    ControlNets at scale 0 (zero residuals) a LoRA call with control images gives the LoRA call without them."""
    from safetensors.numpy import save_file
    from test_lora import lora_pair

    rng = np.random.default_rng(5)
    peft = {}
    for module in [n for n, _ in tiny_base.unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_v"))]:
        down, up = lora_pair(tiny_base.unet.get_submodule(module).weight, 4, rng)
        peft[f"unet.{module}.lora_A.weight"], peft[f"unet.{module}.lora_B.weight"] = down, up
    save_file(peft, tmp_path / "unet.safetensors")
    kw = dict(height=HEIGHT, width=WIDTH, num_inference_steps=4, seed=3, output_type="latent", progress=False)
    pipe = Pipeline.load(control_engine)
    plain = pipe(PROMPTS, **kw).array
    pipe.set_loras([(tmp_path / "unet.safetensors", 1.0)])
    with_lora = pipe(PROMPTS, **kw).array
    zero_control = pipe(PROMPTS, control_image=control_images(2), controlnet_conditioning_scale=0.0, **kw).array
    assert rel_l2(with_lora, plain) > 0.05  # the adapter matters
    assert rel_l2(zero_control, with_lora) < 1e-5  # unet_control carries it as unet does
