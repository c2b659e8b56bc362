"""SDXL samplers in numpy: the schedules and updates of diffusers' schedulers, without torch.

Each sampler gives the timesteps, sigmas and step results of one diffusers scheduler built from the model's
scheduler config as `Cls.from_config(config, **overrides)` (tests/test_samplers.py checks them against it):

| sampler            | diffusers scheduler and overrides                                                    |
|--------------------|--------------------------------------------------------------------------------------|
| `euler`            | EulerDiscreteScheduler                                                               |
| `euler_a`          | EulerAncestralDiscreteScheduler                                                      |
| `heun`             | HeunDiscreteScheduler (two model evaluations per step, one for the last)             |
| `dpmpp_2m`         | DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)            |
| `dpmpp_2m_karras`  | the same with use_karras_sigmas=True                                                 |
| `dpmpp_sde_karras` | the same with algorithm_type="sde-dpmsolver++": DPM++ 2M SDE Karras                  |
| `ddim`             | DDIMScheduler (eta 0, as StableDiffusionXLPipeline passes)                           |
| `lcm`              | LCMScheduler                                                                         |
| `tcd`              | TCDScheduler with eta 0: StableDiffusionXLPipeline passes its own eta=0.0 to every   |
|                    | scheduler whose step() takes one, overriding TCD's default 0.3                       |

`dpmpp_sde_karras` is not diffusers' DPMSolverSDEScheduler (single-step DPM++ SDE): that one draws its noise
from a torchsde Brownian tree, and we do not depend on torchsde.

What diffusers does and we therefore do too:
- `spacing` ("leading", "trailing", "linspace") picks the timesteps; the Karras samplers place their sigmas
  by Karras et al.'s formula instead, and LCM / TCD always take every k-th step of their 50-step training
  schedule, so spacing changes nothing for those (diffusers ignores it as well).
- DDIM steps from t to t - T // steps whatever the spacing, so with "linspace" or "trailing" its steps do
  not land exactly on the next timestep.
- alphas_cumprod is built bit for bit as torch builds it (see `_linspace_f32`); timesteps come out identical,
  sigmas float32 within an ulp (torch's pow(x, 0.5) is not always correctly rounded). Step arithmetic runs on
  float32 arrays with float64 per-step coefficients.

A Sampler is used for one run: it keeps DPM-Solver's previous prediction and Heun's half step between calls
and checks that step() comes once per model evaluation, in order. Make a new one per run (or call
set_begin_index to restart it). Typical loop:

    s = make_sampler("euler", config, 30)
    x = noise * s.init_noise_sigma
    for i, t in enumerate(s.timesteps):
        model_output = unet(s.scale_model_input(x, i), t)
        x = s.step(model_output, i, x, noise=rng.standard_normal(x.shape, np.float32) if s.needs_noise else None)
"""

from __future__ import annotations

import math

import numpy as np

from .errors import UserError

SAMPLERS = ("euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_sde_karras", "ddim", "lcm", "tcd")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction")

# SDXL base's scheduler config: the value taken for any of these keys that a config leaves out.
SDXL_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "clip_sample": False,
    "clip_sample_range": 1.0,
}
# LCM / TCD: the distilled schedule's length and the boundary-condition time scale (diffusers' defaults).
LCM_DEFAULTS = {"original_inference_steps": 50, "timestep_scaling": 10.0}
# Settings that diffusers' schedulers honour and these samplers do not implement, with their "off" value.
NOT_IMPLEMENTED = {
    "trained_betas": None, "rescale_betas_zero_snr": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
    "use_beta_sigmas": False, "interpolation_type": "linear", "timestep_type": "discrete", "thresholding": False,
    "final_sigmas_type": "zero", "sigma_min": None, "sigma_max": None,
}


# ---------------------------------------------------------------------------------------------------------
# The schedule, written once: betas → alphas_cumprod → sigmas; the three spacings; Karras sigmas.


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32): float32 ends and step, each point rounded once from the
    exact value, the second half counted back from `end`. numpy's linspace differs in the last bit."""
    lo, hi = np.float32(start), np.float32(end)
    step = float((hi - lo) / np.float32(n - 1))
    i = np.arange(n)
    return np.where(i < n // 2, float(lo) + step * i, float(hi) - step * (n - 1 - i)).astype(np.float32)


def alphas_cumprod(config: dict) -> np.ndarray:
    """[T] float32: the training schedule's cumulative product of (1 - beta), as diffusers computes it."""
    T, b0, b1 = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    if config["beta_schedule"] == "scaled_linear":
        betas = _linspace_f32(b0**0.5, b1**0.5, T) ** 2
    elif config["beta_schedule"] == "linear":
        betas = _linspace_f32(b0, b1, T)
    else:
        raise UserError(f"scheduler config: beta_schedule {config['beta_schedule']!r} is not supported "
                        f"(accepted: scaled_linear, linear)")
    # torch's CPU cumprod accumulates in float64 and rounds each partial product to float32
    return np.cumprod((1 - betas).astype(np.float64)).astype(np.float32)


def spaced_timesteps(spacing: str, steps: int, T: int, offset: int, *, solver_points: bool = False) -> np.ndarray:
    """Descending inference timesteps, float64 (fractional for linspace), for the spacings of table 2 of
    "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al. 2023).

    solver_points: DPM-Solver's variant, which spaces steps + 1 points for leading and linspace and drops the
    last one, so that its final step goes from a timestep above that point down to sigma 0.
    """
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)) - 1
    n = steps + 1 if solver_points else steps
    if spacing == "leading":
        t = np.arange(n)[::-1] * (T // n) + offset
    else:
        t = np.linspace(0, T - 1, n)[::-1]
    return t[:steps].astype(np.float64)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5)."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + np.linspace(0, 1, n) * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each sigma, interpolating linearly in log sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return low + w


# ---------------------------------------------------------------------------------------------------------
# Model output → predicted clean latent.


def _ve_denoised(out: np.ndarray, x: np.ndarray, sigma: float, prediction_type: str) -> np.ndarray:
    """x0 from the model output, for the variance-exploding sample x = x0 + sigma * eps (k-diffusion's)."""
    if prediction_type == "epsilon":
        return x - sigma * out
    # the model saw x / sqrt(sigma² + 1) and predicted v = alpha * eps - sigma_vp * x0 on that scale
    return x / (sigma**2 + 1) - out * (sigma / math.sqrt(sigma**2 + 1))


def _vp_denoised(out: np.ndarray, x: np.ndarray, alpha: float, sigma: float, prediction_type: str):
    """(x0, eps) from the model output, for the variance-preserving sample x = alpha * x0 + sigma * eps."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha, out
    return alpha * x - sigma * out, alpha * out + sigma * x


# ---------------------------------------------------------------------------------------------------------
# Samplers.


class Sampler:
    """One run of one sampler: its schedule, and step() called once per model evaluation, in order.

    timesteps: [n_evals] float32, the UNet `timestep` input of each model evaluation (diffusers' timesteps).
    sigmas: [n_evals + 1] float32, the k-diffusion noise levels where diffusers' scheduler has them, else None.
    """

    order = 1
    needs_noise = False
    sigmas: np.ndarray | None = None

    def __init__(self, name: str, steps: int, timesteps: np.ndarray, prediction_type: str):
        self.name, self.steps, self.prediction_type = name, steps, prediction_type
        self.timesteps = np.asarray(timesteps, dtype=np.float32)
        self.init_noise_sigma = 1.0
        self._next: int | None = None  # the evaluation step() expects next; None: the first call starts the run

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return np.asarray(sample, dtype=np.float32)

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        if not 0 <= i < len(self.timesteps):
            raise IndexError(f"{self.name}: evaluation {i} is outside its {len(self.timesteps)} evaluations")
        if self._next is not None and i != self._next:
            raise ValueError(f"{self.name}: step({i}) called where step({self._next}) was due; a Sampler runs one "
                             f"schedule in order: make a new one per run, or set_begin_index to restart it")
        if self.needs_noise and noise is None:
            raise ValueError(f"{self.name}: step() consumes fresh noise; pass noise= (standard normal, sample's shape)")
        self._next = i + 1
        noise = np.asarray(noise, dtype=np.float32) if self.needs_noise else None
        out = self._update(np.asarray(model_output, np.float32), i, np.asarray(sample, np.float32), noise)
        return out.astype(np.float32, copy=False)

    def set_begin_index(self, i: int) -> None:
        """Start (or restart) the run at evaluation i: img2img and the refiner begin mid-schedule."""
        self._next = i
        self._reset()

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """`original` noised to the level of evaluation i: diffusers' add_noise(original, noise, timesteps[i:i+1]).

        Where a timestep repeats (DPM++ Karras from 45 steps on ends on timesteps 1, 1), a fresh diffusers
        scheduler takes the later one; we go by i, as the pipelines make diffusers do through set_begin_index."""
        a, s = self._noise_scales(i)
        return (a * np.asarray(original, np.float32) + s * np.asarray(noise, np.float32)).astype(np.float32, copy=False)

    def kernel_coefficients(self, i: int, begin: int = 0) -> list[float]:
        """The scalars of step i (of a run started at `begin`) as the GPU step kernel takes them (kernels/step.cu,
        `sampler_step`): the Python floats _update computes, in the order its expressions use them."""
        raise NotImplementedError(f"sampler {self.name} has no GPU step kernel yet")

    def _update(self, out, i, x, noise):
        raise NotImplementedError

    def _noise_scales(self, i: int) -> tuple[float, float]:
        raise NotImplementedError

    def _reset(self) -> None:
        pass


class _KDiffusion(Sampler):
    """euler, euler_a, heun: k-diffusion samplers on x = x0 + sigma * eps, fed to the UNet as x / sqrt(sigma² + 1)."""

    def __init__(self, name, steps, timesteps, sigmas, prediction_type, leading: bool):
        super().__init__(name, steps, timesteps, prediction_type)
        self.sigmas = sigmas
        top = float(sigmas.max())
        # diffusers' "leading" schedule starts below the top training timestep but keeps that level's variance
        self.init_noise_sigma = math.sqrt(top**2 + 1) if leading else top
        self.needs_noise = name == "euler_a"
        self.order = 2 if name == "heun" else 1
        self._reset()

    def scale_model_input(self, sample, i):
        sigma = float(self.sigmas[i])
        return (np.asarray(sample, np.float32) / math.sqrt(sigma**2 + 1)).astype(np.float32, copy=False)

    def _noise_scales(self, i):
        return 1.0, float(self.sigmas[i])

    def kernel_coefficients(self, i, begin=0):
        if self.name == "heun":
            return super().kernel_coefficients(i, begin)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        step, sigma_up = sigma_next - sigma, 0.0
        if self.name == "euler_a":
            sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
            step = math.sqrt(sigma_next**2 - sigma_up**2) - sigma
        # input scale; _ve_denoised's sigma, v-prediction divisor and mix; the step; the fresh noise's std
        return [math.sqrt(sigma**2 + 1), sigma, sigma**2 + 1, sigma / math.sqrt(sigma**2 + 1), step, sigma_up]

    def _reset(self):
        self._half = None  # heun: (x, derivative, dt) of the first half of the current step

    def _update(self, out, i, x, noise):
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if self.name == "heun":
            return self._heun(out, x, sigma, sigma_next)
        d = (x - _ve_denoised(out, x, sigma, self.prediction_type)) / sigma
        if self.name == "euler":
            return _euler(x, d, sigma, sigma_next)
        return _euler_ancestral(x, d, sigma, sigma_next, noise)

    def _heun(self, out, x, sigma, sigma_next):
        """Heun's method: an Euler step to sigma_next, then its correction with the slope found there.

        diffusers' sigmas repeat each inner level ([s0, s1, s1, s2, s2, …, 0]), so a first half runs from
        sigmas[i] to sigmas[i + 1] and the second half evaluates at sigmas[i]; the last step (to 0) is Euler's.
        """
        if self._half is None:
            d = (x - _ve_denoised(out, x, sigma, self.prediction_type)) / sigma
            self._half = (x, d, sigma_next - sigma)
            return x + d * (sigma_next - sigma)
        x0, d0, dt = self._half
        self._half = None
        d = (x - _ve_denoised(out, x, sigma, self.prediction_type)) / sigma
        return x0 + (d0 + d) / 2 * dt


def _euler(x, d, sigma, sigma_next):
    """Euler step of the probability-flow ODE dx/dsigma = d = (x - x0) / sigma."""
    return x + d * (sigma_next - sigma)


def _euler_ancestral(x, d, sigma, sigma_next, noise):
    """Euler step down to sigma_down, then fresh noise of std sigma_up, where sigma_down² + sigma_up² = sigma_next²."""
    sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    return x + d * (sigma_down - sigma) + noise * sigma_up


class _DPMSolverPP(Sampler):
    """dpmpp_2m, dpmpp_2m_karras, dpmpp_sde_karras: DPM-Solver++(2M) and its SDE variant (Lu et al. 2022), on
    the variance-preserving sample x = alpha * x0 + sigma_vp * eps, alpha = 1/sqrt(sigma² + 1),
    sigma_vp = sigma * alpha; the step size is h = log(sigma / sigma_next) in lambda = -log sigma."""

    def __init__(self, name, steps, timesteps, sigmas, prediction_type):
        super().__init__(name, steps, timesteps, prediction_type)
        self.sigmas = sigmas
        self.needs_noise = name == "dpmpp_sde_karras"
        self._reset()

    def _noise_scales(self, i):
        alpha = 1 / math.sqrt(float(self.sigmas[i]) ** 2 + 1)
        return alpha, float(self.sigmas[i]) * alpha

    def _reset(self):
        self._x0_prev = None  # the previous evaluation's x0 prediction

    def kernel_coefficients(self, i, begin=0):
        if self.needs_noise:
            return super().kernel_coefficients(i, begin)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        alpha, alpha_next = 1 / math.sqrt(sigma**2 + 1), 1 / math.sqrt(sigma_next**2 + 1)
        second = begin < i < len(self.timesteps) - 1
        two_r = 2 * (math.log(float(self.sigmas[i - 1]) / sigma) / math.log(sigma / sigma_next)) if second else 1.0
        e = sigma_next / sigma
        scale = (sigma_next * alpha_next) / (sigma * alpha)
        # input scale; _vp_denoised's alpha and sigma; 2r and whether the step is second order; the update's factors
        return [1.0, alpha, sigma * alpha, two_r, float(second), scale, alpha_next * (1 - e)]

    def _update(self, out, i, x, noise):
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        alpha, alpha_next = 1 / math.sqrt(sigma**2 + 1), 1 / math.sqrt(sigma_next**2 + 1)
        x0, _ = _vp_denoised(out, x, alpha, sigma * alpha, self.prediction_type)
        d = x0
        # second order from the second evaluation on; the last step, down to sigma 0, is first order
        if self._x0_prev is not None and i < len(self.timesteps) - 1:
            r = math.log(float(self.sigmas[i - 1]) / sigma) / math.log(sigma / sigma_next)  # h_prev / h
            d = x0 + (x0 - self._x0_prev) / (2 * r)
        self._x0_prev = x0
        e = sigma_next / sigma  # exp(-h)
        scale = (sigma_next * alpha_next) / (sigma * alpha)  # sigma_vp_next / sigma_vp
        if not self.needs_noise:
            return scale * x + alpha_next * (1 - e) * d
        return scale * e * x + alpha_next * (1 - e**2) * d + sigma_next * alpha_next * math.sqrt(1 - e**2) * noise


class _DiscreteTime(Sampler):
    """ddim, lcm, tcd: samplers on the variance-preserving sample, indexing alphas_cumprod by integer timestep."""

    def __init__(self, name, steps, timesteps, prediction_type, acp, config, eta):
        super().__init__(name, steps, timesteps, prediction_type)
        self._acp = acp
        self._final_acp = 1.0 if config["set_alpha_to_one"] else float(acp[0])
        self._clip = float(config["clip_sample_range"]) if config["clip_sample"] else None
        self._train_steps = config["num_train_timesteps"]
        self._scaling = float(config.get("timestep_scaling", LCM_DEFAULTS["timestep_scaling"]))
        self.eta = eta
        self.needs_noise = name == "lcm" or eta > 0

    def _noise_scales(self, i):
        a = float(self._acp[int(self.timesteps[i])])
        return math.sqrt(a), math.sqrt(1 - a)

    def kernel_coefficients(self, i, begin=0):
        if self.name == "tcd":
            return super().kernel_coefficients(i, begin)
        t = int(self.timesteps[i])
        t_next = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else None
        a = float(self._acp[t])
        clip = [0.0, 0.0] if self._clip is None else [1.0, self._clip]
        if self.name == "ddim":
            t_prev = t - self._train_steps // self.steps
            a_prev = float(self._acp[t_prev]) if t_prev >= 0 else self._final_acp
            std = self.eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
            tail = [math.sqrt(a_prev), math.sqrt(max(1 - a_prev - std**2, 0.0)), std]
        else:  # lcm
            ts = t * self._scaling
            a_next = float(self._acp[t_next]) if t_next is not None else 0.0
            tail = [ts / math.sqrt(ts**2 + 0.25), 0.25 / (ts**2 + 0.25), math.sqrt(a_next), math.sqrt(1 - a_next),
                    float(t_next is None)]
        # input scale; _vp_denoised's alpha and sigma; clipping of x0 (on, range); the update's factors
        return [1.0, math.sqrt(a), math.sqrt(1 - a), *clip, *tail]

    def _prediction(self, out, x, a):
        x0, eps = _vp_denoised(out, x, math.sqrt(a), math.sqrt(1 - a), self.prediction_type)
        return (x0 if self._clip is None else np.clip(x0, -self._clip, self._clip)), eps

    def _update(self, out, i, x, noise):
        t = int(self.timesteps[i])
        t_next = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else None  # None: the last step
        return getattr(self, f"_{self.name}")(out, x, t, t_next, noise)

    def _ddim(self, out, x, t, t_next, noise):
        """DDIM (Song et al. 2020, eq. 12), from t to t - T // steps as diffusers (whatever the spacing)."""
        t_prev = t - self._train_steps // self.steps
        a, a_prev = float(self._acp[t]), float(self._acp[t_prev]) if t_prev >= 0 else self._final_acp
        x0, eps = self._prediction(out, x, a)
        std = self.eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - std**2, 0.0)) * eps
        return x_prev + std * noise if self.eta > 0 else x_prev

    def _lcm(self, out, x, t, t_next, noise):
        """Latent consistency model step: the consistency-boundary-scaled x0, re-noised to the next timestep."""
        ts = t * self._scaling
        c_skip, c_out = 0.25 / (ts**2 + 0.25), ts / math.sqrt(ts**2 + 0.25)  # sigma_data = 0.5
        x0, _ = self._prediction(out, x, float(self._acp[t]))
        denoised = c_out * x0 + c_skip * x
        if t_next is None:
            return denoised
        a_next = float(self._acp[t_next])
        return math.sqrt(a_next) * denoised + math.sqrt(1 - a_next) * noise

    def _tcd(self, out, x, t, t_next, noise):
        """Trajectory consistency distillation: DDIM to s = floor((1 - eta) * t_next), then forward noise to t_next."""
        last, t_next = t_next is None, 0 if t_next is None else t_next
        s = int(np.floor(np.float32(1 - self.eta) * np.float32(t_next)))  # float32 as torch: float64 moves some s
        a, a_s = float(self._acp[t]), float(self._acp[s])
        x0, eps = _vp_denoised(out, x, math.sqrt(a), math.sqrt(1 - a), self.prediction_type)
        x_s = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
        if self.eta == 0 or last:
            return x_s
        ratio = float(self._acp[t_next]) / a_s
        return math.sqrt(ratio) * x_s + math.sqrt(1 - ratio) * noise


# ---------------------------------------------------------------------------------------------------------


KERNEL_COEFFICIENTS = 10  # scalars per step in a coefficient table
KERNEL_KINDS = {"euler": 0, "euler_a": 1, "dpmpp_2m": 2, "dpmpp_2m_karras": 2, "ddim": 3, "lcm": 4}  # sampler_step's


def coefficient_table(sampler: Sampler, begin: int = 0) -> np.ndarray:
    """[n_evals, KERNEL_COEFFICIENTS] float32: every step's scalars for the GPU step kernel, rounded to fp32 as
    numpy rounds a Python float that meets a float32 array. Rows before `begin` are zero."""
    if sampler.name not in KERNEL_KINDS:
        raise NotImplementedError(f"sampler {sampler.name} has no GPU step kernel yet")
    table = np.zeros((len(sampler.timesteps), KERNEL_COEFFICIENTS), np.float32)
    for i in range(begin, len(sampler.timesteps)):
        row = sampler.kernel_coefficients(i, begin)
        table[i, : len(row)] = row
    return table


def _check_choice(what: str, value, accepted) -> None:
    if value not in accepted:
        raise UserError(f"unknown {what} {value!r}; accepted: {', '.join(accepted)}")


def make_sampler(name: str, config: dict, steps: int, *, spacing: str | None = None,
                 prediction_type: str | None = None, eta: float | None = None) -> Sampler:
    """The sampler `name` over `steps` steps of the model's scheduler config (its scheduler_config.json).

    spacing and prediction_type override the config's timestep_spacing and prediction_type; eta (ddim and tcd
    only, default 0 as StableDiffusionXLPipeline) is the share of fresh noise per step.
    """
    _check_choice("sampler", name, SAMPLERS)
    cfg = {**SDXL_SCHEDULER, **LCM_DEFAULTS, **config}
    spacing = cfg["timestep_spacing"] if spacing is None else spacing
    _check_choice("timestep spacing", spacing, SPACINGS)
    prediction_type = cfg["prediction_type"] if prediction_type is None else prediction_type
    _check_choice("prediction type", prediction_type, PREDICTION_TYPES)
    T = cfg["num_train_timesteps"]
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise UserError(f"steps {steps!r} is out of range; accepted: an integer from 1 to {T}")
    if name in ("lcm", "tcd") and steps > cfg["original_inference_steps"]:
        raise UserError(f"steps {steps} is too many for {name}; accepted: 1 to {cfg['original_inference_steps']} "
                        f"(the distilled schedule's original_inference_steps)")
    if eta is not None and name not in ("ddim", "tcd"):
        raise UserError(f"eta applies to the ddim and tcd samplers only, not {name!r}")
    if eta is not None and not 0 <= eta <= 1:
        raise UserError(f"eta {eta!r} is out of range; accepted: 0 to 1")
    karras = name.endswith("_karras")
    for key, off in NOT_IMPLEMENTED.items():
        if cfg.get(key, off) != off and not (karras and key == "use_karras_sigmas"):
            raise UserError(f"scheduler config sets {key}={cfg[key]!r}, which sdxl-trt's samplers do not implement "
                            f"(accepted: {off!r})")
    steps = int(steps)
    acp = alphas_cumprod(cfg)
    train_sigmas = np.sqrt((1 - acp) / acp)  # [T] float32, increasing with t

    if name in ("euler", "euler_a", "heun"):
        t = spaced_timesteps(spacing, steps, T, cfg["steps_offset"]).astype(np.float32)
        sigmas = np.append(np.interp(t, np.arange(T), train_sigmas), 0.0).astype(np.float32)
        if name == "heun":  # every level after the first is visited twice: the second half, then the next first
            t = np.concatenate([t[:1], np.repeat(t[1:], 2)])
            sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        return _KDiffusion(name, steps, t, sigmas, prediction_type, leading=spacing == "leading")

    if name.startswith("dpmpp"):
        if karras:
            sigmas = karras_sigmas(float(train_sigmas[0]), float(train_sigmas[-1]), steps)
            t = np.round(sigma_to_t(sigmas, np.log(train_sigmas)))
        else:
            t = np.round(spaced_timesteps(spacing, steps, T, cfg["steps_offset"], solver_points=True))
            sigmas = np.interp(t, np.arange(T), train_sigmas)
        return _DPMSolverPP(name, steps, t, np.append(sigmas, 0.0).astype(np.float32), prediction_type)

    if name == "ddim":
        t = np.round(spaced_timesteps(spacing, steps, T, cfg["steps_offset"]))
    else:  # lcm, tcd: every k-th timestep of the distilled schedule [T/n - 1, 2T/n - 1, …, T - 1], n = 50
        n = cfg["original_inference_steps"]
        origin = (np.arange(1, n + 1) * (T // n) - 1)[::-1]
        t = origin[np.floor(np.linspace(0, n, steps, endpoint=False)).astype(np.int64)]
    return _DiscreteTime(name, steps, t, prediction_type, acp, cfg, 0.0 if eta is None else float(eta))
