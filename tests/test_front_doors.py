"""The front doors checked by numbers (issue 22, item 5): for every generation parameter, what `sdxl-trt generate`
(in process, `--output-type latent` .npy files, plus PNG pixels for the image inputs) and `POST /v1/images/generations`
(base64 PNG pixels) give EQUALS what the Python API (`Pipeline.__call__`) gives for the same request and seed, and
changing that parameter alone moves the front door's output by more than a stated bound, so that the equality
cannot hold by the parameter being dropped on the way.

Equality is exact (np.array_equal): the three doors run the same numpy + ONNX Runtime CPU code in this process on the
same files, and ONNX Runtime's CPU kernels are deterministic for a given shape and thread count (a CLI run loads
its own sessions; measured bit-identical).

Bounds (measured on the tiny model at 64x64 with 3 steps; see PARAMETERS' comments): a parameter that reaches the
pipeline moves the final latents by rel-L2 ≥ LATENT_BOUND and the PNG pixels by a mean of ≥ PIXEL_BOUND levels
(of 255). Size and number of images change the output's shape instead."""

from __future__ import annotations

import base64
import io
import itertools
import json

import numpy as np
import pytest
from PIL import Image

from sdxl_trt.export.verify import rel_l2
from sdxl_trt.runtime.cli import main

pytest.importorskip("fastapi")

# what every request is unless its row says otherwise (the tiny model's own size is 256²: 64² keeps it fast)
BASE = {"prompt": "a red bicycle", "seed": 17, "steps": 3, "size": (64, 64)}
LONG = "a red bicycle leaning on a blue wall, " * 12  # about 110 tokens: two 77-token windows
IMG2IMG = {"init_image": True, "strength": 0.6}
INPAINT = {"init_image": True, "strength": 0.9}

# parameter: (the request without it, or with another value; the request with it). Only that parameter differs.
PARAMETERS = {
    "prompt": ({}, {"prompt": "a green lighthouse at night"}),
    "negative_prompt": ({}, {"negative": "blurry, low quality"}),
    "seed": ({}, {"seed": 18}),
    "steps": ({}, {"steps": 4}),
    "guidance": ({"guidance": 5.0}, {"guidance": 8.0}),
    "guidance_rescale": ({}, {"guidance_rescale": 0.7}),
    "sampler": ({"sampler": "euler"}, {"sampler": "dpmpp_2m"}),
    "spacing": ({"spacing": "leading"}, {"spacing": "trailing"}),
    "size": ({}, {"size": (96, 64)}),
    "init_image": ({}, IMG2IMG),
    "strength": (IMG2IMG, {**IMG2IMG, "strength": 0.9}),
    "mask": (INPAINT, {**INPAINT, "mask": True}),
    "refiner_start": ({}, {"refiner_start": 0.5}),
    "refine_strength": ({}, {"refine_strength": 0.7}),  # 0.5 of 3 steps is one refiner step: rel-L2 0.015 only
    "n": ({}, {"n": 2}),
    "long_prompt": ({"prompt": LONG}, {"prompt": LONG, "long_prompt": "chunk"}),
}
SHAPED = {"size", "n"}  # these change the output's shape: that is their difference
# A parameter dropped on the way moves nothing at all (the doors are deterministic: exactly 0). The bounds ask for a
# clear move, about half of the smallest one measured (run with -s to see each): latents rel-L2 0.036 (long_prompt
# chunk), 0.037 (guidance_rescale 0.7), 0.060 (prompt); the rest 0.11-7.2. Pixels 1.45 levels (long_prompt),
# 1.56 (guidance_rescale), 2.7 (prompt); the rest 3.6-50.
LATENT_BOUND = 0.02  # rel-L2 of the final latents
PIXEL_BOUND = 0.5  # mean |Δ| in uint8 levels of the decoded PNG


def request(row: dict) -> dict:
    return {**BASE, **row}


def init_image() -> Image.Image:
    """64x64 RGB with structure (a smooth gradient and a few bars), so that its latents are not one colour."""
    y, x = np.mgrid[0:64, 0:64]
    pixels = np.stack([x * 4, y * 4, (x + y) * 2], -1) % 256
    pixels[20:28] = (250, 240, 30)
    return Image.fromarray(pixels.astype(np.uint8))


def mask_image() -> Image.Image:
    return Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16))  # white square in the middle: repaint


# -- the three doors ---------------------------------------------------------------------------------------------------

def api_kwargs(req: dict, output_type: str) -> dict:
    """The request as Pipeline.__call__'s arguments (the Python API's names, as diffusers has them)."""
    width, height = req["size"]
    kwargs = dict(negative_prompt=req.get("negative"), width=width, height=height, num_inference_steps=req["steps"],
                  seed=req["seed"], num_images_per_prompt=req.get("n", 1), output_type=output_type, progress=False)
    for ours, theirs in (("guidance", "guidance_scale"), ("guidance_rescale", "guidance_rescale"),
                         ("sampler", "sampler"), ("spacing", "spacing"), ("strength", "strength"),
                         ("refiner_start", "refiner_start"), ("refine_strength", "refine_strength"),
                         ("long_prompt", "long_prompt")):
        if ours in req:
            kwargs[theirs] = req[ours]
    if req.get("init_image"):
        kwargs["image"] = init_image()
    if req.get("mask"):
        kwargs["mask_image"] = mask_image()
    return kwargs


def cli_argv(req: dict, inputs) -> list[str]:
    """The request as `sdxl-trt generate` flags."""
    argv = [req["prompt"], "--size", "{}x{}".format(*req["size"]), "--steps", str(req["steps"]),
            "--seed", str(req["seed"])]
    for key, flag in (("negative", "--negative"), ("guidance", "--guidance"), ("guidance_rescale", "--guidance-rescale"),
                      ("sampler", "--sampler"), ("spacing", "--spacing"), ("strength", "--strength"),
                      ("refiner_start", "--refiner-start"), ("refine_strength", "--refine-strength"),
                      ("n", "--batch"), ("long_prompt", "--long-prompt")):
        if key in req:
            argv += [flag, str(req[key])]
    if req.get("init_image"):
        argv += ["--init-image", str(inputs / "init.png")]
    if req.get("mask"):
        argv += ["--mask", str(inputs / "mask.png")]
    return argv


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def http_body(req: dict) -> dict:
    """The request as the JSON fields of POST /v1/images/generations."""
    body = {"prompt": req["prompt"], "size": "{}x{}".format(*req["size"]), "steps": req["steps"], "seed": req["seed"]}
    for key, field in (("negative", "negative_prompt"), ("guidance", "guidance"), ("guidance_rescale",
                       "guidance_rescale"), ("sampler", "sampler"), ("spacing", "spacing"), ("strength", "strength"),
                       ("refiner_start", "refiner_start"), ("refine_strength", "refine_strength"), ("n", "n"),
                       ("long_prompt", "long_prompt")):
        if key in req:
            body[field] = req[key]
    if req.get("init_image"):
        body["init_image"] = b64_png(init_image())
    if req.get("mask"):
        body["mask"] = b64_png(mask_image())
    return body


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


class Doors:
    """The CLI, the server and the Python API on one engine directory; each request's output memoised (the rows
    share their "without" requests)."""

    def __init__(self, engine, pipe, client, tmp):
        self.engine, self.pipe, self.client, self.tmp = engine, pipe, client, tmp
        self.memo: dict = {}
        self.count = itertools.count()
        init_image().save(tmp / "init.png")
        mask_image().save(tmp / "mask.png")

    def _memo(self, door: str, req: dict, make):
        key = (door, json.dumps(req, sort_keys=True))
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def api(self, req: dict, output_type: str) -> np.ndarray:
        """Latents [N,4,h,w] ("latent") or pixels [N,H,W,3] uint8 ("pil")."""
        return self._memo(f"api-{output_type}", req,
                          lambda: self.pipe(req["prompt"], **api_kwargs(req, output_type)).array)

    def cli(self, req: dict, output_type: str = "latent") -> np.ndarray:
        """`sdxl-trt generate … --output-type latent` (the .npy files, stacked) or its PNG files' pixels."""
        def run():
            suffix = ".npy" if output_type == "latent" else ".png"
            out = self.tmp / f"run{next(self.count)}{suffix}"
            assert main(["generate", str(self.engine), *cli_argv(req, self.tmp), "--output-type", output_type,
                         "--out", str(out)]) == 0
            n = req.get("n", 1)
            paths = [out] if n == 1 else [out.with_name(f"{out.stem}-{i + 1}{suffix}") for i in range(n)]
            if output_type == "latent":
                return np.concatenate([np.load(p) for p in paths])
            return np.stack([decoded(p.read_bytes()) for p in paths])
        return self._memo(f"cli-{output_type}", req, run)

    def http(self, req: dict) -> np.ndarray:
        """The answer's PNGs as pixels [N,H,W,3] uint8."""
        def run():
            answer = self.client.post("/v1/images/generations", json=http_body(req))
            assert answer.status_code == 200, answer.text
            data = answer.json()["data"]
            assert [d["seed"] for d in data] == [req["seed"] + i for i in range(req.get("n", 1))]
            return np.stack([decoded(base64.b64decode(d["b64_json"])) for d in data])
        return self._memo("http", req, run)


@pytest.fixture(scope="module")
def doors(tiny_engine, tmp_path_factory):
    """One Pipeline for the module (the API's and the server's); the CLI loads its own per run, as a user's does."""
    from starlette.testclient import TestClient

    from sdxl_trt.runtime import Pipeline
    from sdxl_trt.runtime.server import create_app

    pipe = Pipeline.load(tiny_engine)
    with TestClient(create_app(tiny_engine, pipeline=pipe, warmup=False)) as client:
        yield Doors(tiny_engine, pipe, client, tmp_path_factory.mktemp("front-doors"))


def moved(a: np.ndarray, b: np.ndarray, kind: str) -> float:
    """How far b is from a: rel-L2 for latents, mean |Δ| in levels for pixels."""
    if kind == "latent":
        return rel_l2(b, a)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def check_moved(name: str, without: np.ndarray, with_it: np.ndarray, kind: str) -> None:
    if name in SHAPED:
        assert without.shape != with_it.shape, f"{name} did not change the output's shape {without.shape}"
        if name == "n":  # and the second image is its own seed's, not a copy of the first
            assert moved(with_it[0], with_it[1], kind) > (LATENT_BOUND if kind == "latent" else PIXEL_BOUND)
        return
    bound = LATENT_BOUND if kind == "latent" else PIXEL_BOUND
    distance = moved(without, with_it, kind)
    print(f"{name}: {kind} moved {distance:.4g} (bound {bound:g})")
    assert distance > bound, f"{name} moved the {kind} output by {distance:.3g} only (≤ {bound:g}): dropped?"


# each door's output for a request, and what the Python API gives for it: the CLI's --output-type latent .npy against
# the API's latents, the server's PNG pixels against the API's PNG pixels
DOORS = {"cli": ("latent", "latent"), "http": ("pixels", "pil")}


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("name", PARAMETERS)
def test_each_front_door_passes_each_parameter_to_the_pipeline(doors, door, name):
    kind, output_type = DOORS[door]
    run = getattr(doors, door)
    without, with_it = (request(row) for row in PARAMETERS[name])
    got = run(with_it)
    check_moved(name, run(without), got, kind)
    expected = doors.api(with_it, output_type)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert np.array_equal(got, expected), (f"{name}: the {door} output differs from the API's by "
                                           f"{moved(expected, got, kind):.3g} ({'rel-L2' if kind == 'latent' else 'mean levels'})")


@pytest.mark.parametrize("name, row", [pytest.param(name, row, id=name) for name, row in [
    ("text", {}), ("img2img", IMG2IMG), ("inpainting", {**INPAINT, "mask": True}),
    ("negative_and_n", {"negative": "blurry", "n": 2}), ("sampler_and_guidance", {"sampler": "dpmpp_2m", "guidance": 8.0})]])
def test_cli_pngs_are_the_python_apis_pixels(doors, name, row):
    """The PNG path as well (VAE decode, uint8 conversion, file write): the CLI's PNG files decode to the API's
    pixels, for the image inputs too (their tests in test_cli.py check sizes and metadata)."""
    req = request(row)
    got, expected = doors.cli(req, "png"), doors.api(req, "pil")
    assert got.shape == expected.shape
    assert np.array_equal(got, expected), f"{name}: CLI PNG pixels differ from the API's by a mean " \
                                          f"{moved(expected, got, 'pixels'):.3g} levels"
    if name != "text":
        assert moved(doors.cli(request({}), "png")[:1], got[:1], "pixels") > PIXEL_BOUND
