"""HTTP = CLI = Python API: every field the server takes beside OpenAI's reaches the pipeline (the image changes
when the field changes, and equals the Python API's for the same request and seed), and a bad value is a 400 whose
message names the request's JSON field, never a CLI flag."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")

BASE = {"prompt": "a red bicycle", "size": "64x64", "steps": 3, "seed": 17}
LONG = "a red bicycle leaning on a blue wall, " * 12  # about 110 tokens: two 77-token windows


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


IMAGE = Image.new("RGB", (64, 64), (40, 90, 200))
MASK = Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16))  # white square in the middle: repaint


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    from sdxl_trt.runtime import Pipeline

    return Pipeline.load(tiny_engine)


@pytest.fixture(scope="module")
def client(tiny_engine, pipe):
    from starlette.testclient import TestClient

    from sdxl_trt.runtime.server import create_app

    with TestClient(create_app(tiny_engine, pipeline=pipe, warmup=False)) as c:
        yield c


def served(client, body: dict) -> np.ndarray:
    """The request's one image as pixels (PNG) or latents (.npy)."""
    answer = client.post("/v1/images/generations", json=body)
    assert answer.status_code == 200, answer.text
    data = base64.b64decode(answer.json()["data"][0]["b64_json"])
    if body.get("output_format") == "latent":
        return np.load(io.BytesIO(data))
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


# field: (request without it or with another value, request with it, the Python API's arguments for the latter)
FIELDS = {
    "guidance_rescale": ({}, {"guidance_rescale": 0.7}, {"guidance_rescale": 0.7}),
    "spacing": ({"spacing": "leading"}, {"spacing": "trailing"}, {"spacing": "trailing"}),
    "long_prompt": ({"prompt": LONG}, {"prompt": LONG, "long_prompt": "chunk"},
                    {"prompt": LONG, "long_prompt": "chunk"}),
    "refine_strength": ({}, {"refine_strength": 0.5}, {"refine_strength": 0.5}),
    "refiner_start": ({}, {"refiner_start": 0.5}, {"refiner_start": 0.5}),
    "mask": ({"init_image": b64_png(IMAGE), "strength": 0.9},
             {"init_image": b64_png(IMAGE), "strength": 0.9, "mask": b64_png(MASK)},
             {"image": IMAGE, "strength": 0.9, "mask_image": MASK.convert("L")}),
}


@pytest.mark.parametrize("field", FIELDS)
def test_each_field_reaches_the_pipeline_as_the_python_api_takes_it(client, pipe, field):
    without, with_it, api = FIELDS[field]
    a, b = served(client, {**BASE, **without}), served(client, {**BASE, **with_it})
    assert not np.array_equal(a, b), f"{field} changed nothing"
    api = {"prompt": BASE["prompt"], **api}
    if "image" not in api:
        api.update(height=64, width=64)
    expected = pipe(api.pop("prompt"), num_inference_steps=BASE["steps"], seed=BASE["seed"], progress=False, **api)
    assert np.array_equal(b, expected.array[0])


def test_output_format_latent_is_the_python_apis_latents_and_png_its_pixels(client, pipe):
    latents = served(client, {**BASE, "output_format": "latent"})
    pixels = served(client, {**BASE, "output_format": "png"})
    kwargs = dict(height=64, width=64, num_inference_steps=BASE["steps"], seed=BASE["seed"], progress=False)
    assert np.array_equal(latents, pipe(BASE["prompt"], output_type="latent", **kwargs).array[:1])
    assert np.array_equal(pixels, pipe(BASE["prompt"], **kwargs).array[0])
    assert latents.shape == (1, 4, 8, 8) and latents.dtype == np.float32  # the .npy generate --output-type latent writes


@pytest.mark.parametrize("extra, says", [
    ({"mask": b64_png(MASK)}, "mask goes with init_image"),
    ({"init_image": b64_png(IMAGE), "mask": "not base64!"}, "mask: not a base64 PNG"),
    ({"init_image": b64_png(IMAGE), "mask": b64_png(MASK.resize((32, 32)))}, "init_image is 64x64"),
    ({"refiner_start": 0.5, "refine_strength": 0.3}, "refiner_start and refine_strength"),
    ({"refine_strength": 1.5}, "refine_strength"),
    ({"refiner_start": 0}, "refiner_start"),
    ({"guidance_rescale": 2}, "guidance_rescale"),
    ({"long_prompt": "wrap"}, "long_prompt"),
    ({"output_format": "gif"}, "output_format"),
    ({"spacing": "even"}, "spacing"),
    ({"init_image": b64_png(IMAGE), "strength": 0}, "strength"),
    ({"init_image": b64_png(IMAGE), "strength": 0.05, "steps": 3}, "strength"),  # no step left: the pipeline says
    ({"guidance": 1e9}, "guidance"),  # the pipeline's range check, in the request's words
])
def test_bad_fields_are_400s_naming_the_json_field(client, extra, says):
    answer = client.post("/v1/images/generations", json={**BASE, **extra})
    message = answer.json()["error"]["message"]
    assert answer.status_code == 400 and says in message, message
    assert "--" not in message, message  # never a CLI flag
