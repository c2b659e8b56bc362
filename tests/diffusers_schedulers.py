"""Which diffusers scheduler each of our samplers must match (shared by the sampler and pipeline tests)."""

from __future__ import annotations

DPM = "DPMSolverMultistepScheduler"
REFERENCE = {  # sampler → (diffusers class, from_config overrides)
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": (DPM, dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp_2m_karras": (DPM, dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)),
    "dpmpp_sde_karras": (DPM, dict(algorithm_type="sde-dpmsolver++", solver_order=2, use_karras_sigmas=True)),
    "ddim": ("DDIMScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}


def scheduler_for(name: str, config: dict, **extra):
    """A fresh diffusers scheduler for sampler `name` from a model's scheduler config (never a used scheduler's)."""
    import diffusers

    cls, overrides = REFERENCE[name]
    return getattr(diffusers, cls).from_config(dict(config), **overrides, **extra)
