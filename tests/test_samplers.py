"""Our samplers (runtime/, numpy only) against diffusers' schedulers built from SDXL base's scheduler config."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdxl_trt.runtime import UserError
from sdxl_trt.runtime.samplers import SAMPLERS, SPACINGS, make_sampler

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()  # from_config notes the Euler-only keys each class ignores
# diffusers calls np.array on torch tensors, which numpy 2 warns about; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

from diffusers_schedulers import REFERENCE, scheduler_for  # noqa: E402

CONFIG = json.loads((Path(__file__).resolve().parents[1] / "export/configs/sdxl-base/scheduler/scheduler_config.json")
                    .read_text())
SHAPE = (2, 4, 8, 12)


def reference(name, spacing=None, prediction_type=None):
    extra = {k: v for k, v in (("timestep_spacing", spacing), ("prediction_type", prediction_type)) if v is not None}
    return scheduler_for(name, CONFIG, **extra)


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_sampler_names_and_order():
    assert SAMPLERS == ("euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_sde_karras", "ddim", "lcm",
                        "tcd")
    assert SPACINGS == ("leading", "trailing", "linspace")


# ---------------------------------------------------------------------------------------------------------
# 1. Schedules: every sampler, spacing and step count from 1 to 50.


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", SAMPLERS)
def test_schedule_matches_diffusers(name, spacing):
    compared = 0
    for steps in range(1, 51):
        ref = reference(name, spacing)
        try:
            ref.set_timesteps(steps)
        except ValueError:
            # diffusers refuses this combination: so must we, with a message for the user
            with pytest.raises(UserError):
                make_sampler(name, CONFIG, steps, spacing=spacing)
            continue
        ours = make_sampler(name, CONFIG, steps, spacing=spacing)
        where = f"{name} {spacing} steps={steps}"
        assert ours.name == name and ours.timesteps.dtype == np.float32, where
        np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-4, err_msg=where)
        np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-5, err_msg=where)
        assert ours.order == ref.order, where
        if hasattr(ref, "sigmas"):
            assert ours.sigmas.dtype == np.float32, where
            np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7, err_msg=where)
        else:
            assert ours.sigmas is None, where
        compared += 1
    assert compared == 50  # nothing in 1..50 is refused for the SDXL config


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_distilled_samplers_refuse_more_steps_than_their_schedule(name):
    ref = reference(name)
    with pytest.raises(ValueError):
        ref.set_timesteps(51)  # original_inference_steps is 50
    with pytest.raises(UserError, match="51"):
        make_sampler(name, CONFIG, 51)


def test_schedule_follows_config_values():
    """Keys of the config that change the schedule are read, not assumed (a linear-beta, v-prediction model)."""
    config = {**CONFIG, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "steps_offset": 0,
              "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
    for name in SAMPLERS:
        cls, overrides = REFERENCE[name]
        ref = getattr(diffusers, cls).from_config(config, **overrides)
        ref.set_timesteps(25)
        ours = make_sampler(name, config, 25)
        assert ours.prediction_type == "v_prediction"
        np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-4, err_msg=name)
        if hasattr(ref, "sigmas"):
            np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7, err_msg=name)


# ---------------------------------------------------------------------------------------------------------
# 2. Whole denoising loops on a fake model, noise shared with diffusers.


def fake_model(scaled: np.ndarray, i: int) -> np.ndarray:
    """Deterministic stand-in for the UNet: depends on its input and on the evaluation index."""
    pattern = np.sin(np.arange(scaled.size, dtype=np.float64) * 0.37 * (i + 1)).reshape(scaled.shape)
    return (0.5 * scaled + 0.1 * pattern).astype(np.float32)


class SharedNoise:
    """Stands in for diffusers' randn_tensor: hands out the noise our step() gets for the same evaluation."""

    def __init__(self):
        self.current, self.draws = None, 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert self.current is not None, "diffusers drew noise where our sampler says it needs none"
        assert tuple(shape) == self.current.shape
        self.draws += 1
        return torch.from_numpy(self.current.copy()).to(dtype or torch.float32)


def run_both(monkeypatch, name, steps, prediction_type, *, eta=None, strength=None, seed=0):
    """One loop through ours and one through diffusers; returns the model inputs of every evaluation (ours,
    diffusers'), the final samples (ours, diffusers') and how often diffusers drew noise."""
    ref = reference(name, prediction_type=prediction_type)
    ref.set_timesteps(steps)
    ours = make_sampler(name, CONFIG, steps, prediction_type=prediction_type, eta=eta)
    step_kwargs = {"eta": ours.eta} if name in ("ddim", "tcd") else {}  # as StableDiffusionXLPipeline passes it
    shared = SharedNoise()
    monkeypatch.setattr(sys.modules[type(ref).__module__], "randn_tensor", shared, raising=False)  # heun has none
    rng = np.random.default_rng(seed)
    start = rng.standard_normal(SHAPE, dtype=np.float32)

    begin = 0
    if strength is None:
        x = start * np.float32(ours.init_noise_sigma)
        x_ref = torch.from_numpy(start) * ref.init_noise_sigma
    else:  # img2img: StableDiffusionXLImg2ImgPipeline.get_timesteps, then add_noise at the first timestep kept
        t_start = steps - min(int(steps * strength), steps)
        begin = t_start * ref.order
        if hasattr(ref, "set_begin_index"):  # DDIM has none: it finds its place from the timestep alone
            ref.set_begin_index(begin)
        ours.set_begin_index(begin)
        noise = rng.standard_normal(SHAPE, dtype=np.float32)
        x = ours.add_noise(start, noise, begin)
        x_ref = ref.add_noise(torch.from_numpy(start), torch.from_numpy(noise), ref.timesteps[begin:begin + 1])
        assert rel_l2(x, x_ref.numpy()) <= 1e-6
    inputs, inputs_ref = [], []
    for i in range(begin, len(ours.timesteps)):
        t = ref.timesteps[i]
        assert float(t) == pytest.approx(float(ours.timesteps[i]), abs=1e-4)
        inputs.append(ours.scale_model_input(x, i))
        inputs_ref.append(ref.scale_model_input(x_ref, t).numpy())
        noise = rng.standard_normal(SHAPE, dtype=np.float32) if ours.needs_noise else None
        shared.current = noise
        x = ours.step(fake_model(inputs[-1], i), i, x, noise=noise)
        x_ref = ref.step(torch.from_numpy(fake_model(inputs_ref[-1], i)), t, x_ref, **step_kwargs).prev_sample
        assert x.dtype == np.float32 and x.shape == SHAPE
    return inputs, inputs_ref, x, x_ref.numpy(), shared.draws


def assert_loops_match(inputs, inputs_ref, x, x_ref, where):
    assert len(inputs) == len(inputs_ref)
    for i, (a, b) in enumerate(zip(inputs, inputs_ref)):
        assert a.dtype == np.float32
        assert rel_l2(a, b) <= 1e-5, f"{where}: model input {i} differs by rel-L2 {rel_l2(a, b):.2e}"
    assert rel_l2(x, x_ref) <= 1e-5, f"{where}: final sample differs by rel-L2 {rel_l2(x, x_ref):.2e}"


@pytest.mark.parametrize("steps", [1, 4, 20, 30])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_loop_matches_diffusers(monkeypatch, name, prediction_type, steps):
    inputs, inputs_ref, x, x_ref, draws = run_both(monkeypatch, name, steps, prediction_type)
    assert_loops_match(inputs, inputs_ref, x, x_ref, f"{name} {prediction_type} steps={steps}")
    assert np.isfinite(x).all()
    if make_sampler(name, CONFIG, steps).needs_noise and steps > 1:
        assert draws > 0  # the noise we pass is the noise diffusers used


@pytest.mark.parametrize("steps", [4, 20])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("name", "eta"), [("ddim", 0.5), ("ddim", 1.0), ("tcd", 0.3), ("tcd", 0.9)])
def test_loop_with_eta_matches_diffusers(monkeypatch, name, eta, prediction_type, steps):
    inputs, inputs_ref, x, x_ref, draws = run_both(monkeypatch, name, steps, prediction_type, eta=eta)
    assert_loops_match(inputs, inputs_ref, x, x_ref, f"{name} eta={eta} {prediction_type} steps={steps}")
    assert draws > 0


def test_tcd_default_eta_is_the_sdxl_pipelines():
    """StableDiffusionXLPipeline passes its own eta (default 0.0) to every scheduler whose step() takes one, so
    TCD runs with 0.0 there, not with the 0.3 of TCDScheduler.step's signature. Read without importing it
    (that would import transformers: seconds)."""
    spec = importlib.util.find_spec("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl")
    tree = ast.parse(Path(spec.origin).read_text())
    pipe = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "StableDiffusionXLPipeline")
    call = next(n for n in pipe.body if isinstance(n, ast.FunctionDef) and n.name == "__call__")
    defaults = dict(zip([a.arg for a in call.args.args][-len(call.args.defaults):], call.args.defaults))
    assert ast.literal_eval(defaults["eta"]) == 0.0
    assert "eta" in inspect.signature(diffusers.TCDScheduler.step).parameters
    assert make_sampler("tcd", CONFIG, 4).eta == 0.0 and not make_sampler("tcd", CONFIG, 4).needs_noise


# ---------------------------------------------------------------------------------------------------------
# 3. add_noise and a start mid-schedule (img2img, the refiner).


@pytest.mark.parametrize("name", SAMPLERS)
def test_add_noise_matches_diffusers(name):
    rng = np.random.default_rng(1)
    original, noise = rng.standard_normal((2, *SHAPE), dtype=np.float32)
    ours = make_sampler(name, CONFIG, 20)
    for i in range(len(ours.timesteps)):
        got = ours.add_noise(original, noise, i)
        assert got.dtype == np.float32
        # a fresh scheduler finds i from the timestep; the img2img and inpainting pipelines set the index first
        for begin in (None, i):
            ref = reference(name)
            ref.set_timesteps(20)
            if begin is not None and hasattr(ref, "set_begin_index"):
                ref.set_begin_index(begin)
            want = ref.add_noise(torch.from_numpy(original), torch.from_numpy(noise), ref.timesteps[i:i + 1]).numpy()
            assert rel_l2(got, want) <= 1e-6, f"{name} i={i} begin={begin}"


@pytest.mark.parametrize("steps", [5, 20, 30])
@pytest.mark.parametrize("strength", [0.3, 0.55, 0.8])
@pytest.mark.parametrize("name", SAMPLERS)
def test_img2img_start_matches_diffusers(monkeypatch, name, strength, steps):
    inputs, inputs_ref, x, x_ref, _ = run_both(monkeypatch, name, steps, "epsilon", strength=strength)
    assert len(inputs) < len(make_sampler(name, CONFIG, steps).timesteps)
    assert_loops_match(inputs, inputs_ref, x, x_ref, f"{name} strength={strength} steps={steps}")


def test_a_sampler_runs_in_order_and_can_restart():
    s = make_sampler("dpmpp_2m", CONFIG, 10)
    x = np.ones(SHAPE, np.float32)
    first = s.step(x, 0, x)
    s.step(x, 1, x)
    with pytest.raises(ValueError, match="step"):
        s.step(x, 5, x)
    s.set_begin_index(0)  # restarts: the multistep history is dropped
    assert np.array_equal(s.step(x, 0, x), first)
    with pytest.raises(ValueError, match="noise"):
        make_sampler("euler_a", CONFIG, 10).step(x, 0, x)


# ---------------------------------------------------------------------------------------------------------
# 4. Bad input: one-line UserError naming the value.


@pytest.mark.parametrize(("kwargs", "named"), [
    (dict(name="dpm++"), "dpm++"),
    (dict(name="Euler"), "Euler"),
    (dict(spacing="karras"), "karras"),
    (dict(prediction_type="sample"), "sample"),
    (dict(prediction_type="flow"), "flow"),
    (dict(steps=0), "0"),
    (dict(steps=-1), "-1"),
    (dict(steps=2.5), "2.5"),
    (dict(steps=1001), "1001"),
    (dict(name="euler", eta=0.3), "euler"),
    (dict(name="tcd", eta=1.5), "1.5"),
])
def test_bad_input_is_a_user_error(kwargs, named):
    args = {"name": "euler", "config": CONFIG, "steps": 20, **kwargs}
    with pytest.raises(UserError) as err:
        make_sampler(**args)
    message = str(err.value)
    assert named in message and "\n" not in message
    if "name" in kwargs and "eta" not in kwargs:
        assert all(n in message for n in SAMPLERS)
    if "spacing" in kwargs:
        assert all(s in message for s in SPACINGS)
    if "prediction_type" in kwargs:
        assert "epsilon" in message and "v_prediction" in message


@pytest.mark.parametrize(("key", "value"), [("beta_schedule", "squaredcos_cap_v2"), ("rescale_betas_zero_snr", True),
                                            ("use_karras_sigmas", True), ("timestep_spacing", "uniform")])
def test_unsupported_config_is_a_user_error(key, value):
    with pytest.raises(UserError, match=key if key != "timestep_spacing" else value):
        make_sampler("euler", {**CONFIG, key: value}, 20)


def test_samplers_import_without_torch():
    code = ("import sys, sdxl_trt.runtime.samplers; "
            "print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
