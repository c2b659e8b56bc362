"""SDXL text-to-image on an engine directory, with the refiner as a second expert, matching diffusers'
`StableDiffusionXLPipeline` (and `StableDiffusionXLImg2ImgPipeline` for the refiner's part) step for step.

prompts → tokenizers → clip_l ∥ clip_g → context [B,77,2048] + pooled → time ids
latents → per step: scale → unet (CFG: [negative; positive] in one batch) → guidance → sampler step
        → (refiner from `refiner_start`) → latents / scaling factor → vae_decoder → uint8 images

Noise is ours, not torch's: image i of a call with seed S draws from numpy's Philox generator keyed with S + i,
first its initial latent, then whatever a stochastic sampler needs at each step, in step order. The same seed
gives the same image on every backend that implements the same stream.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import device_loop
from .backends import BACKENDS, VAE_FP16_ADVICE, non_finite, used_files
from .contracts import input_dims, shape_key
from .controlnet import Control, control_residuals, prepare_control
from .tiling import decode_tiled
from .errors import OutOfMemory, UserError
from .images import default_size, load_image, mask_to_array, to_model_input, to_pil, to_uint8
from .loading import load_backend
from .manifest import Manifest, load_manifest, work_for
from .samplers import make_sampler
from .tokenizer import ClipTokenizer
from .validate import (GUIDANCE_RANGE, GUIDANCE_RESCALE_RANGE, MAX_IMAGES, as_number, check_size, finite,
                       parse_devices, shown, spelled, whole)

log = logging.getLogger("sdxl_trt")

# diffusers' StableDiffusionXLImg2ImgPipeline defaults for the refiner's aesthetic-score conditioning
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5
DEFAULT_GUIDANCE = 5.0  # diffusers' StableDiffusionXLPipeline (and Img2Img) default
INPAINT_GUIDANCE = 7.5  # diffusers' StableDiffusionXLInpaintPipeline default
DEFAULT_STRENGTH = 0.3  # diffusers' StableDiffusionXLImg2ImgPipeline default
INPAINT_STRENGTH = 0.9999  # diffusers' StableDiffusionXLInpaintPipeline default


@dataclass
class Inpainting:
    """What the loop needs to inpaint: the latent-size mask (1 = repaint) and either the 9-channel UNet's extra
    input channels or, for a 4-channel UNet, the image latents and noise that re-noise the kept part each step."""

    mask: np.ndarray  # [N,1,h,w]
    channels: np.ndarray | None = None  # [N,1+4,h,w]: mask ∥ masked-image latents
    image_latents: np.ndarray | None = None
    noise: np.ndarray | None = None


@dataclass
class Result:
    images: list | None  # PIL images (output_type "pil"), or None
    array: np.ndarray  # the images' pixels [N,H,W,3] uint8 ("pil"), [N,H,W,3] float in [0,1] ("np") or latents ("latent")
    seeds: list[int | None]  # per image; None for an image drawn from a numpy Generator the caller gave
    timings: dict = field(default_factory=dict)


def draw(rngs, shape) -> np.ndarray:
    """One standard-normal array of `shape` from each image's stream, stacked: [len(rngs), *shape] float32."""
    return np.stack([rng.standard_normal(shape, dtype=np.float32) for rng in rngs])


MAX_SEED = 2**64 - 1  # as torch generators take


def image_seeds(seed: int | Sequence[int] | None, n: int, names: dict | None = None) -> list[int]:
    """One seed per image: `seed`, `seed` + 1, … (a random start if None), or the list given, one per image (the
    server batches requests this way: each image keeps the stream it would have alone). Python or numpy integers."""
    flag = spelled("seed", names)
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise UserError(f"{len(seed)} seeds for {n} images: give one {flag}, or one per image")
        return [checked_seed(s, MAX_SEED, flag) for s in seed]
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**63 - n))
    first = checked_seed(seed, MAX_SEED - (n - 1), flag)  # the last image's seed, first + n - 1, is at most MAX_SEED
    return [first + i for i in range(n)]


def checked_seed(seed, highest: int, flag: str) -> int:
    number = as_number(seed)
    if not isinstance(number, int) or not 0 <= number <= highest:
        raise UserError(f"{flag} {shown(seed)}: expected a whole number from 0 to {highest}")
    return number


def noise_streams(seed, generator, n: int, names: dict | None = None) -> tuple[list[int | None], list]:
    """(seeds, one numpy Generator per image) for `seed` (image_seeds, each image's own Philox stream) or, as diffusers
    takes torch generators, `generator`: one numpy Generator for the whole call (the images draw from it in turn: their
    initial latents together are one draw of [n, 4, h, w], as diffusers with one generator), or a list of one seed or
    Generator per image. A Generator given is consumed, as diffusers consumes a torch one; its images have no seed."""
    if generator is None:
        seeds = image_seeds(seed, n, names)
        return seeds, [np.random.Generator(np.random.Philox(key=s)) for s in seeds]
    flag = spelled("generator", names)
    if seed is not None:
        raise UserError(f"give {spelled('seed', names)} or {flag}, not both")
    if isinstance(generator, np.random.Generator):
        return [None] * n, [generator] * n
    if not isinstance(generator, (list, tuple)):
        raise UserError(f"{flag} {type(generator).__name__}: expected a numpy.random.Generator or a list of one seed "
                        f"or Generator per image (for one seed, give {spelled('seed', names)})")
    if len(generator) != n:
        raise UserError(f"{flag}: {len(generator)} given for {n} images; give one Generator, or one per image")
    seeds = [None if isinstance(g, np.random.Generator) else checked_seed(g, MAX_SEED, flag) for g in generator]
    return seeds, [g if s is None else np.random.Generator(np.random.Philox(key=s)) for g, s in zip(generator, seeds)]


def img2img_start(sampler, strength: float) -> int:
    """The first evaluation of an img2img (or refine) call, as diffusers: the first (1 - strength) of the steps skipped."""
    steps = sampler.steps
    return (steps - min(int(steps * strength), steps)) * sampler.order


OUT_OF_MEMORY = ("Failed to allocate memory", "out of memory", "cudaErrorMemoryAllocation", "CUDA_ERROR_OUT_OF_MEMORY",
                 "std::bad_alloc")


def _user_errors(generate):
    """Running out of host or device memory (numpy, ONNX Runtime, CUDA, TensorRT) becomes a one-line UserError
    (OutOfMemory) that says what to reduce, in the caller's names, instead of a library's traceback; the sessions a
    backend keeps per shape are freed, so that the next call (a server's next request) starts with the room they
    held. numpy's overflow and invalid-value warnings are silenced: non-finite numbers are the pipeline's to report
    (checked after the text encoders, the denoising loop and the VAE, saying which model ran in which precision), and
    numpy's words would only repeat that as a warning about a line of our code."""
    @functools.wraps(generate)
    def wrapper(self, *args, **kwargs):
        names = kwargs.get("names")
        sizes = {spelled("height", names), spelled("width", names)}
        low = spelled("low_memory", names)  # None where the caller has no such switch (the server's requests)
        remedy = f"lower {' and '.join(sorted(sizes))} or {spelled('num_images_per_prompt', names)}" + (
            f", or use {low}" if low and not self.low_memory else "")
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                return generate(self, *args, **kwargs)
        except MemoryError:
            raise OutOfMemory(f"out of memory: {remedy}") from None
        except UserError:
            raise
        except Exception as e:
            if any(marker in str(e) for marker in OUT_OF_MEMORY):
                self._free_after_out_of_memory()
                raise OutOfMemory(f"out of memory: {remedy} ({str(e).splitlines()[0][-160:]})") from None
            raise

    return wrapper


def unique_plan(plan: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """(component, dims) pairs of sessions to make, each once, in their first order."""
    return list({shape_key(c, d): (c, d) for c, d in plan}.values())


def text_list(value, what: str) -> list[str]:
    """A prompt or a sequence of prompts as a list of strings, or a UserError saying what was given instead."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserError(f"{what}: expected a string or a list of strings, got {type(value).__name__}")


def whole_pair(pair, flag: str, least: int, names: dict | None = None) -> tuple[int, int]:
    """(a, b) of whole numbers ≥ `least` (Python or numpy), as Python ints: original_size, target_size, crops."""
    values = [as_number(v) for v in pair] if isinstance(pair, (tuple, list, np.ndarray)) else []
    if len(values) != 2 or not all(isinstance(v, int) and v >= least for v in values):
        raise UserError(f"{spelled(flag, names)} {pair!r}: expected two whole numbers ≥ {least}")
    return tuple(values)


def first_control_image(control_image, names: dict | None = None):
    """The first ControlNet's image of a call (None without ControlNet), as a PIL image."""
    first = control_image[0] if isinstance(control_image, (list, tuple)) and control_image else control_image
    if first is None or isinstance(first, (list, tuple)):
        return None
    flag = spelled("control_image", names)
    return as_image(first, f"{flag} 1" if isinstance(control_image, (list, tuple)) and len(control_image) > 1 else flag,
                    "RGB")


def as_image(value, flag: str, mode: str):
    """An image argument as diffusers' image processor takes it — a PIL image, a numpy array [H, W], [H, W, 1|3|4]
    (uint8, or float in [0, 1]) — or a path to an image file, as a PIL image in `mode` ("RGB", or "L" for masks).
    Float arrays are rounded to 8 bits, as a PNG of them would hold them. None stays None."""
    from PIL import Image

    if value is None or (hasattr(value, "convert") and hasattr(value, "size")):
        return value
    if isinstance(value, (str, Path)):
        return load_image(value, flag, mode=mode)
    if not isinstance(value, np.ndarray):
        raise UserError(f"{flag}: expected a PIL image, a numpy array or a path, got {type(value).__name__}")
    array = value[..., 0] if value.ndim == 3 and value.shape[2] == 1 else value
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or 0 in array.shape:
        raise UserError(f"{flag}: an array of shape {list(value.shape)}; expected [height, width] or "
                        "[height, width, channels] with 1, 3 or 4 channels")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise UserError(f"{flag}: a float array must hold values in [0, 1] (as diffusers takes them); this one "
                            f"holds {np.nanmin(array):g} to {np.nanmax(array):g}")
        array = np.round(array * 255)
    elif array.dtype != np.uint8:
        raise UserError(f"{flag}: an array of {array.dtype}; expected uint8 (0–255) or float in [0, 1]")
    image = Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)))
    return image.convert(mode)


def stage_done(timings: dict, stage: str, started: float) -> None:
    """A call's stage has ended: its seconds into the call's timings, and a log line (--verbose shows them)."""
    timings[stage] = time.perf_counter() - started
    log.info("%s done in %.2f s", stage, timings[stage])


class Pipeline:
    device_loop = True  # on backends that have one (ort-cuda), run the denoising loop on the device (device_loop.py)
    graph_text_encoders = True  # with the device loop, the text encoders as CUDA graphs (benchmarks turn it off)
    low_memory = False  # free each model once its stage is done and decode in tiles (see `load`)
    loras: tuple = ()  # the LoRA adapters applied (lora.Adapter; see `set_loras`)
    vae_tile: int | None = None  # latent pixels per decode tile with low_memory (default: the model's size / 8)
    load_timings: dict = {}  # seconds `load` took: checking the files, starting the backend (and `prepare`: sessions)
    _preparing = None  # (when, futures) of sessions being made in the background (prepare with wait=False)

    def __init__(self, manifest, backend):
        self.manifest = manifest
        self.backend = backend
        data = manifest.data
        self.model, self.scheduler_config, self.roles = data["model"], data["scheduler"], data["pipelines"]
        from concurrent.futures import ThreadPoolExecutor

        folders = {name: manifest.path(folder) for name, folder in data["tokenizers"].items()}
        build = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizers")
        self._tokenizers = build.submit(lambda: {name: ClipTokenizer.from_dir(f) for name, f in folders.items()})
        build.shutdown(wait=False)

    @property
    def tokenizers(self) -> dict:
        """The text encoders' tokenizers by folder name. They are built on a thread from `load` on (half a second of
        vocabulary parsing, which a one-shot overlaps with uploading weights); a broken tokenizer folder is an error
        at the first use."""
        return self._tokenizers.result()

    @classmethod
    def check_dir(cls, engine_dir: str | Path, backend: str = "ort-cpu", check_hashes: bool = True,
                  work: Sequence[str] = work_for()) -> Manifest:
        """The engine directory opened and checked for `work` on `backend`, without starting the backend: every
        manifest field the runtime reads (load_manifest), the components the work needs (manifest.WORK: the default is
        text to images), the files the backend reads. Each problem is one line naming the directory and what fixes
        it, before any work starts. Pipeline.load starts with it; `serve --ray` runs it in the driver, before Ray."""
        if backend not in BACKENDS:
            raise UserError(f"backend {backend!r}: unknown; accepted: {', '.join(BACKENDS)}")
        manifest = load_manifest(engine_dir)
        manifest.require(*work)
        manifest.check_files(hashes=check_hashes, only=used_files(backend, manifest))
        return manifest

    @classmethod
    def load(cls, engine_dir: str | Path, backend: str = "ort-cpu", check_hashes: bool = True,
             cuda_graphs: str = "step", low_memory: bool = False, loras=None, buckets=None,
             max_device_memory: float | None = None, work: Sequence[str] = work_for(), devices=None) -> Pipeline:
        """Open an engine directory; every file the backend reads is checked against the manifest (sizes, and sha256
        by default; a file's sha256 is remembered until the file changes: manifest.checked_sha256). `cuda_graphs`:
        the device loop's mode on ort-cuda and the TensorRT backends (step, loop, off: see device_loop.py).
        `low_memory`: models are loaded when their stage starts and freed when it ends (text encoders, then the
        UNets, then the VAE), and images larger than the model's default size are decoded in tiles (tiling.py).
        `loras`: LoRA adapters to apply (see `set_loras`).
        ort-cuda only: `buckets`, the sizes ("WxH" or (W, H)) whose sessions and CUDA graphs are kept resident
        (default: the nine SDXL buckets and the model's default size; other sizes run on a session for any shape);
        `max_device_memory`, GiB the kept sessions and weights may hold (least recently used freed first);
        `devices`, the GPU ids (default (0,)): with several, the denoising loop runs across them (parallel_loop.py).
        `work`: what the calls will do (manifest.work_for; default: text to images), checked now (`check_dir`); a
        call that needs more is checked again before it starts."""
        started = time.perf_counter()
        manifest = cls.check_dir(engine_dir, backend, check_hashes, work)
        checked = time.perf_counter()
        if low_memory and len(parse_devices(devices) or ()) > 1:
            raise UserError("--low-memory and several --devices do not go together: each GPU holds the UNets")
        pipe = cls(manifest, load_backend(backend, manifest, check_hashes=check_hashes, cuda_graphs=cuda_graphs,
                                          buckets=buckets, max_device_memory=max_device_memory, devices=devices))
        pipe.load_timings = {"files checked": checked - started, "backend": time.perf_counter() - checked}
        pipe.low_memory = low_memory
        if loras:
            pipe.set_loras(loras)
        return pipe

    def set_loras(self, loras, names: dict | None = None) -> None:
        """Apply LoRA adapters to the base UNet and the text encoders from the next call on, replacing the ones
        applied before: "path[:scale]" strings, (path, scale) pairs or lora.Adapter, scales within
        validate.LORA_SCALE_RANGE; None or [] for the model as exported. Files are read and checked now; the weights
        are merged when a session is next made (lora.py). `names`: how errors spell the arguments (validate.py)."""
        from .lora import as_adapters

        adapters = as_adapters(loras, names)
        self._wait_prepared()
        if not hasattr(self.backend, "set_loras"):
            if adapters:
                raise UserError(f"LoRA adapters are not supported on {self.backend.name}; use "
                                f"{spelled('backend', names)} ort-cpu, ort-cuda or a TensorRT backend")
            return
        self.backend.set_loras(adapters)
        self.loras = adapters

    def _components(self, role: str, *kinds: str) -> list[str]:
        """The engine directory's names for a role's components of these kinds (those it has)."""
        names = self.roles[role]["components"]
        return [names[k] for k in kinds if k in names]

    def _release(self, *components: str) -> None:
        """With low_memory, free these models' sessions (the backend loads them again when next asked)."""
        self._wait_prepared()
        if self.low_memory and hasattr(self.backend, "release"):
            for name in components:
                self.backend.release(name)

    @property
    def _on_device(self) -> bool:
        """Whether work goes through the backend's device loop (ort-cuda, tensorrt, tensorrt-rtx; unless `device_loop` is
        turned off, or the backend says it cannot: `device_loop_usable`, e.g. on the tests' stand-in GPU). Asked of
        the backend's class: the loop itself is made on first use (hasattr on the instance would make it, loading
        cuda.core and the kernels, 0.3-0.8 s, before `prepare` could start the uploads)."""
        return (self.device_loop and hasattr(type(self.backend), "device_loop")
                and getattr(self.backend, "device_loop_usable", True))

    @property
    def main_role(self) -> str:
        """The role that encodes prompts and images and decodes latents: the base, or the refiner alone."""
        return "base" if "base" in self.roles else "refiner"

    @property
    def has_refiner(self) -> bool:
        """A refiner to run: the role, with its UNet (a subset export may leave only the CLIP-G it shares)."""
        return "refiner" in self.roles and "unet" in self.roles["refiner"]["components"]

    # --- conditioning -----------------------------------------------------------------------------------------

    def _encode(self, role: str, prompts: list[str], windows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(context [B, 77·k, C], pooled [B, P]). With `windows` k, long prompts are encoded window by window and
        the windows' hidden states concatenated (the pooled embedding is the first window's); without, they are
        truncated to 77 tokens as diffusers does."""
        components = self.roles[role]["components"]
        states = []
        # said once per prompt and call: not again for the second tokenizer, an image's copies or the refiner's encoding
        warned = set() if role == self.main_role else set(prompts)
        for encoder, name in (("clip_l", "tokenizer"), ("clip_g", "tokenizer_2")):
            if encoder not in components:
                continue
            tokenizer = self.tokenizers[name]
            if windows is None:
                tokens = tokenizer(prompts)
                for prompt, cut in zip(prompts, tokens.truncated(tokenizer.max_length)):
                    if cut and prompt not in warned:
                        warned.add(prompt)
                        log.warning("prompt longer than %d tokens was truncated (as diffusers does; "
                                    "--long-prompt chunk keeps it): %.60r…", tokenizer.max_length - 2, prompt)
                ids = tokens.ids
            else:
                ids = tokenizer.windows(prompts, windows).reshape(-1, tokenizer.max_length)
            out = self._run_encoder(components[encoder], ids, fixed_shape=windows is None)
            hidden = out["hidden_states"]
            states.append(hidden.reshape(len(prompts), -1, hidden.shape[-1]))
            pooled = out.get("text_embeds")
            if windows is not None and pooled is not None:
                pooled = pooled.reshape(len(prompts), windows, -1)[:, 0]
        return np.concatenate(states, axis=-1).astype(np.float32), pooled.astype(np.float32)

    def _run_encoder(self, component: str, ids: np.ndarray, fixed_shape: bool) -> dict[str, np.ndarray]:
        """A text encoder's outputs for token ids; on a backend with a device loop, prompts of one window (a shape
        that repeats) run through a CUDA graph (device_loop.encode), unless `graph_text_encoders` is off."""
        if fixed_shape and self.graph_text_encoders and self._on_device and not self.low_memory:
            return self.backend.device_loop.encode(component, ids)
        return self.backend.session(component).run(input_ids=ids)

    def prompt_windows(self, prompts: list[str], negatives: list[str | None]) -> int:
        """Windows a call needs: enough for its longest prompt or negative prompt, at most the contract's bound."""
        tokenizer = self.tokenizers["tokenizer_2"]
        needed = tokenizer.windows([*prompts, *(n or "" for n in negatives)]).shape[1]
        limit = max(entry["bounds"]["prompt_windows"][1] for entry in self.manifest.components.values()
                    if entry["contract"] in ("unet", "unet_refiner"))
        if needed > limit:
            log.warning("prompt needs %d windows of 77 tokens; keeping the first %d", needed, limit)
        return min(needed, limit)

    def encode_prompt(self, role: str, prompts: list[str], negatives: list[str | None], guidance: bool,
                      windows: int | None = None):
        """(context, pooled), negatives stacked before positives under classifier-free guidance."""
        embeds, pooled = self._encode(role, prompts, windows)
        if not guidance:
            return embeds, pooled
        if self.roles[role]["force_zeros_for_empty_prompt"] and not any(negatives):
            neg_embeds, neg_pooled = np.zeros_like(embeds), np.zeros_like(pooled)
        else:
            neg_embeds, neg_pooled = self._encode(role, [n or "" for n in negatives], windows)
        return np.concatenate([neg_embeds, embeds]), np.concatenate([neg_pooled, pooled])

    def time_ids(self, role: str, n: int, guidance: bool, *, original_size, crop, target_size,
                 aesthetic_score: float, negative_aesthetic_score: float) -> np.ndarray:
        names = self.roles[role]["time_ids"]
        if names[-1] == "aesthetic_score":
            pos = [*original_size, *crop, aesthetic_score]
            neg = [*original_size, *crop, negative_aesthetic_score]
        else:
            pos = neg = [*original_size, *crop, *target_size]
        rows = [neg] * n + [pos] * n if guidance else [pos] * n
        return np.asarray(rows, dtype=np.float32)

    # --- the loop -------------------------------------------------------------------------------------------

    def _denoise(self, role: str, latents: np.ndarray, sampler, evals: range, cond, guidance_scale: float,
                 guidance_rescale: float, rngs, progress: bool, inpaint: Inpainting | None = None,
                 control: Control | None = None) -> np.ndarray:
        from tqdm.auto import tqdm

        embeds, pooled, time_ids = cond
        guidance = guidance_scale > 1.0
        self._wait_prepared()  # nothing else may allocate on the GPU while the loop captures a CUDA graph
        on_device = self._on_device and device_loop.supported(sampler, guidance_rescale, inpaint is not None)
        names = self.roles[role]["components"]
        if not on_device and len(getattr(self.backend, "devices", ())) > 1:
            log.warning("this request runs on GPU %d alone (%s): the loop across GPUs takes the samplers with a GPU "
                        "kernel, without inpainting or guidance rescale", self.backend.devices[0],
                        device_loop.unsupported_reason(sampler, guidance_rescale, inpaint is not None,
                                                       self._on_device))
        if on_device:
            noise = None
            if sampler.needs_noise:  # drawn now, in the order the numpy loop below draws it
                noise = np.zeros((len(sampler.timesteps), *latents.shape), np.float32)
                for i in evals:
                    noise[i] = draw(rngs, latents.shape[1:])
            if control is None:
                return self.backend.device_loop.denoise(names["unet"], latents, sampler, evals, cond, guidance_scale,
                                                        noise)
            return self.backend.device_loop.denoise(names["unet_control"], latents, sampler, evals, cond,
                                                    guidance_scale, noise, control=control)
        unet = self.backend.session(names["unet_control"] if control is not None else names["unet"])
        for i in tqdm(evals, desc=role, disable=not progress, leave=False):
            x = np.concatenate([latents, latents]) if guidance else latents
            x = sampler.scale_model_input(x, i)
            if inpaint is not None and inpaint.channels is not None:  # 9-channel UNet: + mask + masked image
                extra = np.concatenate([inpaint.channels] * 2) if guidance else inpaint.channels
                x = np.concatenate([x, extra], axis=1)
            t = np.full(x.shape[0], sampler.timesteps[i], dtype=np.float32)
            extra_inputs = {}
            if control is not None:
                entry = self.manifest.data["components"][control.nets[0]]
                extra_inputs = control_residuals(self.backend, control, i, x, t, cond, guidance, entry)
            noise_pred = unet.run(sample=x, timestep=t, encoder_hidden_states=embeds, text_embeds=pooled,
                                  time_ids=time_ids, **extra_inputs)["noise_pred"].astype(np.float32)
            if guidance:
                uncond, text = np.split(noise_pred, 2)
                noise_pred = uncond + guidance_scale * (text - uncond)
                if guidance_rescale > 0:
                    noise_pred = rescale_noise_cfg(noise_pred, text, guidance_rescale)
            noise = draw(rngs, latents.shape[1:]) if sampler.needs_noise else None
            latents = sampler.step(noise_pred, i, latents, noise=noise).astype(np.float32)
            if inpaint is not None and inpaint.channels is None:  # 4-channel UNet: keep the unmasked part
                known = inpaint.image_latents
                if i < evals.stop - 1:
                    known = sampler.add_noise(known, inpaint.noise, i + 1)
                latents = ((1 - inpaint.mask) * known + inpaint.mask * latents).astype(np.float32)
        return latents

    @_user_errors
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 30,
                 guidance_scale: float | None = None, guidance_rescale: float = 0.0, sampler: str = "euler",
                 spacing: str | None = None, num_images_per_prompt: int = 1, seed: int | Sequence[int] | None = None,
                 generator=None, latents: np.ndarray | None = None, image=None, mask_image=None,
                 strength: float | None = None,
                 denoising_end: float | None = None, refiner_start: float | None = None,
                 refine_strength: float | None = None, original_size: tuple[int, int] | None = None,
                 crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
                 aesthetic_score: float = AESTHETIC_SCORE, negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE,
                 long_prompt: str = "truncate", output_type: str = "pil", progress: bool = True,
                 control_image=None, controlnet_conditioning_scale: float | Sequence[float] | None = None,
                 control_guidance_start: float | Sequence[float] | None = None,
                 control_guidance_end: float | Sequence[float] | None = None, guess_mode: bool = False,
                 names: dict | None = None) -> Result:
        """Text to image; image to image with `image` and `strength` (default 0.3); inpainting with
        `image` and `mask_image` (white = repaint; `strength` default 0.9999), for 4-channel UNets by blending the
        kept part back each step, for 9-channel inpainting UNets through their extra input channels, as diffusers'
        StableDiffusionXLInpaintPipeline. Arguments are diffusers' where they exist. The refiner, if the engine
        directory has one, runs either as a second expert from `refiner_start` F (diffusers' `denoising_end` /
        `denoising_start` = F) or after the base as an img2img pass on its latents with `refine_strength`.
        `denoising_end` alone stops the base early (with output_type "latent").
        `long_prompt` "truncate" cuts prompts at 77 tokens as diffusers does; "chunk" encodes 77-token windows
        and concatenates them along the UNet's context axis.
        ControlNet (an engine directory exported with --controlnet): `control_image`, one image per ControlNet in
        the directory's order (a single image for one), with `controlnet_conditioning_scale` (default 1.0),
        `control_guidance_start` / `control_guidance_end` (default 0.0 / 1.0; a value or one per net) and
        `guess_mode`, as diffusers' StableDiffusionXLControlNetPipeline (with `image` and `strength`: its Img2Img
        variant); the refiner runs without ControlNet, as in diffusers (controlnet.py).

        As diffusers takes them: numbers may be numpy scalars; `image` and `mask_image` a PIL image, a numpy array
        (uint8, or float in [0, 1]) or a path; `generator` a numpy Generator, or a list of one seed or Generator per
        image, instead of `seed`; `height` or `width` alone leaves the other at the model's default size (with an
        `image`, at the image's, as diffusers' image processor). Errors name the arguments as `names` spells them
        (validate.CLI_NAMES for the CLI's flags; default: these argument names)."""
        timings = {}
        say = functools.partial(spelled, names=names)
        prompts = text_list(prompt, say("prompt"))
        negatives = ([negative_prompt] * len(prompts) if negative_prompt is None or isinstance(negative_prompt, str)
                     else text_list(negative_prompt, say("negative_prompt")))
        if not prompts:
            raise UserError("no prompt given")
        if len(negatives) != len(prompts):
            raise UserError(f"give one {say('negative_prompt')}, or one per prompt")
        image = as_image(image, say("image"), "RGB")
        mask_image = as_image(mask_image, say("mask_image"), "L")
        height, width = (None if v is None else whole(v, k, 1, names) for k, v in (("height", height), ("width", width)))
        original_size, target_size, crops_coords_top_left = (
            None if pair is None else whole_pair(pair, name, least, names)
            for name, pair, least in (("original_size", original_size, 1), ("target_size", target_size, 1),
                                      ("crops_coords_top_left", crops_coords_top_left, 0)))
        aesthetic_score = finite(aesthetic_score, "aesthetic_score", names=names)
        negative_aesthetic_score = finite(negative_aesthetic_score, "negative_aesthetic_score", names=names)
        num_inference_steps = whole(num_inference_steps, "num_inference_steps", 1, names)
        num_images_per_prompt = whole(num_images_per_prompt, "num_images_per_prompt", 1, names)
        if strength is not None:
            strength = finite(strength, "strength", names=names)
        denoising_end, refiner_start, refine_strength = (
            None if value is None else finite(value, name, 0.0, 1.0, names)
            for name, value in (("denoising_end", denoising_end), ("refiner_start", refiner_start),
                                ("refine_strength", refine_strength)))
        if mask_image is not None and image is None:
            raise UserError(f"{say('mask_image')} needs the image it masks ({say('image')})")
        width, height = self.call_size(width, height, image, control_image, names)
        if mask_image is not None and mask_image.size != image.size:
            raise UserError(f"{say('mask_image')} is {mask_image.size[0]}x{mask_image.size[1]} but the "
                            f"{say('image')} is {image.size[0]}x{image.size[1]}: they must be the same size")
        if strength is None:
            strength = INPAINT_STRENGTH if mask_image is not None else DEFAULT_STRENGTH
        if guidance_scale is None:
            guidance_scale = INPAINT_GUIDANCE if mask_image is not None else DEFAULT_GUIDANCE
        self._check(height, width, num_inference_steps, output_type, image, latents, strength, refiner_start,
                    refine_strength, names)
        guidance_scale = finite(guidance_scale, "guidance_scale", *GUIDANCE_RANGE, names)
        guidance_rescale = finite(guidance_rescale, "guidance_rescale", *GUIDANCE_RESCALE_RANGE, names)
        if len(prompts) * num_images_per_prompt > MAX_IMAGES:
            raise UserError(f"{len(prompts) * num_images_per_prompt} images in one call (prompts × "
                            f"{say('num_images_per_prompt')}) is more than the {MAX_IMAGES} one call makes; split the "
                            "work into several calls")
        if refiner_start is not None:
            denoising_end = refiner_start
        role = self.main_role
        control = prepare_control(self.roles.get("base", {}), self.manifest.data["components"], control_image,
                                  controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                                  guess_mode, width, height, len(prompts) * num_images_per_prompt, names)
        if control is not None and mask_image is not None:
            raise UserError(f"{say('control_image')} and {say('mask_image')}: ControlNet inpainting is not supported")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        n = len(prompts)
        scale = self.model["vae_scale_factor"]
        shape = (n, self.model["latent_channels"], height // scale, width // scale)
        seeds, rngs = noise_streams(seed, generator, n, names)
        conditioning = dict(original_size=tuple(original_size or (height, width)), crop=crops_coords_top_left,
                            target_size=tuple(target_size or (height, width)), aesthetic_score=aesthetic_score,
                            negative_aesthetic_score=negative_aesthetic_score)
        guidance = guidance_scale > 1.0
        if long_prompt not in ("truncate", "chunk"):
            raise UserError(f"{say('long_prompt')} {long_prompt!r}: expected truncate or chunk")
        windows = self.prompt_windows(prompts, negatives) if long_prompt == "chunk" else None
        # the schedule before any model runs: a sampler, spacing or step count it refuses fails the call at once
        first = make_sampler(sampler, self.scheduler_config, num_inference_steps, spacing=spacing)
        if denoising_end is not None:
            self._check_split(first, denoising_end, refiner_start is not None, strength if image is not None else None,
                              "refiner_start" if refiner_start is not None else "denoising_end", names)

        t = time.perf_counter()
        cond = self.encode_prompt(role, prompts, negatives, guidance, windows)
        self._require_finite(cond, "the text encoders produced",
                             (self._components(role, "clip_g", "clip_l") or ["the text encoders"])[0])
        cond = (*cond, self.time_ids(role, n, guidance, **conditioning))
        stage_done(timings, "text", t)
        self._release(*self._components(role, "clip_l", "clip_g"))

        t = time.perf_counter()
        inpaint = None
        if image is None:
            evals = range(len(first.timesteps))
            latents = draw(rngs, shape[1:]) if latents is None else np.asarray(latents)
            if latents.shape != shape or not np.issubdtype(latents.dtype, np.floating):
                raise UserError(f"{say('latents')} of shape {latents.shape} ({latents.dtype}): expected float {shape} "
                                f"for {n} images of {width}x{height}")
            if not np.isfinite(latents).all():
                raise UserError(f"{say('latents')} hold NaN or Inf")
            latents = latents.astype(np.float32) * np.float32(first.init_noise_sigma)
            if not np.isfinite(latents).all():
                raise UserError(f"{say('latents')} times the sampler's initial sigma ({first.init_noise_sigma:.4g}) "
                                "leave fp32's range; initial latents are standard normal noise")
        else:
            pixels = to_model_input(image, width, height)
            from_noise_only = mask_image is not None and strength == 1.0 and self.roles[role]["unet_in_channels"] == 9
            # a 9-channel UNet at strength 1 starts from pure noise and never needs the image's own latents
            # (diffusers then does not sample them either, which keeps the noise streams aligned)
            init = np.zeros(shape, np.float32) if from_noise_only else self.encode_image(pixels, rngs)
            latents, evals, noise = self._start_from(first, init, strength, rngs, from_noise=mask_image is not None)
            if mask_image is not None:
                inpaint = self._inpainting(role, pixels, mask_to_array(mask_image, width, height), init, noise, rngs)
            stage_done(timings, "vae encode", t)
            t = time.perf_counter()
        if control is not None:  # diffusers' guidance windows count the steps before denoising_end cuts them
            control.first, control.steps = evals.start, len(evals)
        if denoising_end is not None:
            cutoff = self._cutoff(denoising_end)
            evals = range(evals.start, evals.start + int(np.sum(first.timesteps[evals.start:] >= cutoff)))
        latents = self._denoise(role, latents, first, evals, cond, guidance_scale, guidance_rescale, rngs, progress,
                                inpaint, control)
        self._require_finite([latents], "the denoising loop produced", self._components(role, "unet")[0])
        stage_done(timings, role, t)
        self._release(*self._components(role, "unet", "vae_encoder", "unet_control"), *(control.nets if control else ()))

        if refiner_start is not None or refine_strength is not None:
            t = time.perf_counter()
            refiner = make_sampler(sampler, self.scheduler_config, num_inference_steps, spacing=spacing)
            if refiner_start is not None:  # second expert: continue the same schedule from where the base stopped
                remaining = int(np.sum(refiner.timesteps < self._cutoff(refiner_start)))
                if refiner.order == 2 and remaining % 2 == 0:
                    remaining += 1  # as diffusers: a second-order sampler must not start between its two halves
                start = len(refiner.timesteps) - remaining
                refiner.set_begin_index(start)
                evals = range(start, len(refiner.timesteps))
            else:  # post-hoc: img2img on the base's latents
                latents, evals, _ = self._start_from(refiner, latents, refine_strength, rngs)
            ref_cond = self.encode_prompt("refiner", prompts, negatives, guidance, windows)
            ref_cond = (*ref_cond, self.time_ids("refiner", n, guidance, **conditioning))
            latents = self._denoise("refiner", latents, refiner, evals, ref_cond, guidance_scale, guidance_rescale,
                                    rngs, progress)
            self._require_finite([latents], "the refiner's denoising loop produced",
                                 self._components("refiner", "unet")[0])
            stage_done(timings, "refiner", t)
            self._release(*self._components("refiner", "clip_l", "clip_g", "unet"))

        if output_type == "latent":
            self._settle()
            return Result(None, latents, seeds, timings)
        t = time.perf_counter()
        array = self.decode_uint8(latents) if output_type == "pil" else self.decode(latents)
        stage_done(timings, "vae", t)
        self._release(*self._components(self.main_role, "vae_decoder"))
        images = to_pil(array) if output_type == "pil" else None
        self._settle()
        return Result(images, array, seeds, timings)

    def call_size(self, width: int | None = None, height: int | None = None, image=None, control_image=None,
                  names: dict | None = None) -> tuple[int, int]:
        """(width, height) of a call: a side not given is the input image's (img2img), else the first control
        image's, rounded down to 8 (diffusers' image processor and its ControlNet pipeline), else the model's default
        size (diffusers' default)."""
        if not (width and height):
            sized = image if image is not None else first_control_image(control_image, names)
            if sized is not None:
                default_w, default_h = default_size(sized, self.model["vae_scale_factor"])
                width, height = width or default_w, height or default_h
        size = self.model["default_size"]
        return width or size, height or size

    def prepare(self, width: int | None = None, height: int | None = None, images: int = 1, guidance: bool = True,
                refiner: bool = False, wait: bool = True, control: bool = False, guess_mode: bool = False) -> None:
        """Make now, on several threads at once, the sessions a call of this shape will run on the device (text
        encoders, the UNet — the refiner's too with `refiner`; with `control` the ControlNets and the UNet that takes
        their residuals instead of the base UNet (`guess_mode`: the nets at the prompts' half) —, the VAE decoder),
        instead of one after the other
        during the call: a one-shot `generate` starts sooner. The UNets' and the VAE's sessions also run once on
        zeros, so that the call's first steps run at full speed. With `wait` False this returns at once and the next
        call overlaps with it: the text encoders run as soon as their sessions are made, while the UNet's weights
        are still being uploaded, and the denoising loop starts once every session is ready and warm (load_timings'
        "sessions" is then the time all of them took). Does nothing on backends without a device loop."""
        if not self._can_prepare:
            return
        plan = self._plan(width, height, images, guidance, refiner, control, guess_mode)
        self._preparing = (time.perf_counter(), self.backend.prepare(plan, wait=False, warm=True))
        if wait:
            self._wait_prepared()

    def _wait_prepared(self) -> None:
        """Wait for the sessions `prepare` is making (raising the first error met); their time → load_timings."""
        if not self._preparing:
            return
        (started, futures), self._preparing = self._preparing, None
        ready = [future.result() for future in futures]
        self.load_timings = {**self.load_timings, "sessions": max(ready, default=started) - started}
        log.info("sessions prepared in %.2f s", self.load_timings["sessions"])

    @property
    def _can_prepare(self) -> bool:
        return self._on_device and not self.low_memory and hasattr(self.backend, "prepare")

    def _plan(self, width, height, images: int, guidance: bool, refiner: bool, control: bool = False,
              guess_mode: bool = False) -> list[tuple[str, dict]]:
        """(component, symbolic dimensions) of the sessions a call of this shape runs on the device."""
        size, scale = self.model["default_size"], self.model["vae_scale_factor"]
        h, w = (height or size) // scale, (width or size) // scale
        copies = 2 if guidance else 1
        components = self.manifest.data["components"]
        plan = []
        for role in ("base", "refiner") if refiner and self.main_role == "base" else (self.main_role,):
            names = self.roles[role]["components"]
            plan += [(names[c], {"B": images}) for c in ("clip_l", "clip_g") if c in names]
            nets = self.roles[role].get("controlnets", []) if control and role == "base" else []
            if nets and len(getattr(self.backend, "devices", ())) > 1:
                pass  # on several GPUs a ControlNet call runs on the first alone: its sessions are made then
            elif nets:
                guess = guess_mode or components[nets[0]].get("global_pool_conditions", False)
                dims = {"B": copies * images, "S": 77, "h": h, "w": w}
                plan.append((names["unet_control"], input_dims(components[names["unet_control"]], dims)))
                rows = {**dims, "B": images if guess and guidance else copies * images}
                plan += [(net, input_dims(components[net], rows)) for net in nets]
            elif "unet" in names:
                plan.append((names["unet"], {"B": copies * images, "S": 77, "h": h, "w": w}))
        vae = self.roles[self.main_role]["components"].get("vae_decoder")
        if vae is not None:
            plan.append((vae, {"B": min(images, device_loop.DECODE_BATCH), "h": h, "w": w}))
        return unique_plan(plan)

    def _free_after_out_of_memory(self) -> None:
        """A call ran out of memory: the backend's sessions kept per shape (and their CUDA graphs and buffers) go, the
        shared weights stay; what a later call needs is made again."""
        drop = getattr(self.backend, "drop_loop_sessions", None)
        if drop is None:
            return
        try:
            drop()
            log.warning("out of memory: freed the sessions kept per shape")
        except Exception:  # noqa: BLE001 - the out-of-memory error is the one to report
            log.exception("freeing the sessions after running out of memory failed")

    def _settle(self) -> None:
        """A call is done: a backend that keeps sessions resident measures them and keeps to its memory budget."""
        self._wait_prepared()
        if hasattr(self.backend, "settle"):
            self.backend.settle()

    def warm_up(self, sizes=None, progress: bool = False, control: bool | None = None) -> dict[str, float]:
        """Make and capture, before the first request, what calls at these sizes ("WxH" or (W, H); default: the
        backend's resident buckets, else the model's default size) will run on: each size's sessions and CUDA graphs
        for the text encoders, the UNets (the refiner's too) and the VAE; with `control` (default: whether the
        directory has ControlNets) also the ControlNets' and the UNet's that takes their residuals. Two short calls
        per size (and two with control images): ONNX Runtime captures a CUDA graph on a session's second run.
        Returns the seconds each size took."""
        from PIL import Image
        from tqdm.auto import tqdm

        from .validate import parse_size

        if sizes is None:
            size = self.model["default_size"]
            sizes = sorted(getattr(self.backend, "buckets", None) or [(size, size)], key=lambda s: -s[0] * s[1])
        sizes = [parse_size(s, "--buckets") if isinstance(s, str) else tuple(s) for s in sizes]
        refiner = self.has_refiner and self.main_role == "base"
        steps = 4 if refiner else 2  # every UNet runs at least twice
        nets = self.roles.get("base", {}).get("controlnets", []) if self.main_role == "base" else []
        control = bool(nets) if control is None else control and bool(nets)
        taken = {}
        # the sessions of the sizes from `at_once` on are made together, on several threads; under a device-memory
        # budget the first size (of the default ones, the largest) warms up alone first, so that what its sessions
        # hold is measured, and the rest are made together only where they are expected to fit (backend.fits), else
        # one size after the other
        resident = getattr(self.backend, "resident", None)
        at_once = None if not self._can_prepare or resident is None else 0 if resident.budget is None else 1
        for index, (width, height) in enumerate(tqdm(sizes, desc="warm-up", disable=not progress, leave=False)):
            if index == at_once:
                plan = unique_plan([item for w, h in sizes[index:] for c in ([False, True] if control else [False])
                                    for item in self._plan(w, h, 1, True, refiner, c)])
                if resident.budget is None or self.backend.fits(plan):
                    self.backend.prepare(plan)
                else:
                    log.info("warm-up: the other sizes' sessions are not expected to fit the device-memory budget "
                             "together; one size after the other")
            started = time.perf_counter()
            images = [Image.new("RGB", (width, height))] * len(nets) if control else None
            for extra in [{}] * 2 + ([{"control_image": images}] * 2 if control else []):
                self("warm-up", width=width, height=height, num_inference_steps=steps, seed=0, progress=False,
                     refiner_start=0.5 if refiner else None, **extra)
            taken[f"{width}x{height}"] = time.perf_counter() - started
        return taken

    def _check(self, height, width, steps, output_type, image, latents, strength, refiner_start, refine_strength,
               names=None) -> None:
        say = functools.partial(spelled, names=names)
        size = f"{say('width')} {width}x{height}" if say("width") == say("height") else \
            f"{say('width')} {width}, {say('height')} {height}"
        check_size(width, height, size)
        if output_type not in ("pil", "np", "latent"):
            raise UserError(f"{say('output_type')} {output_type!r}: expected pil, np or latent")
        if image is not None and latents is not None:
            raise UserError(f"give {say('image')} or {say('latents')}, not both")
        if image is not None and not 0 < strength <= 1:
            raise UserError(f"{say('strength')} {strength}: expected a fraction in (0, 1]")
        if image is not None and int(steps * strength) < 1:
            raise UserError(f"{say('strength')} {strength} of {steps} steps leaves no step to run; raise "
                            f"{say('strength')} or {say('num_inference_steps')}")
        if refiner_start is not None and refine_strength is not None:
            raise UserError(f"use the refiner either from {say('refiner_start')} or with {say('refine_strength')}, "
                            "not both")
        for name, value in (("refiner_start", refiner_start), ("refine_strength", refine_strength)):
            if value is None:
                continue
            if not self.has_refiner:
                raise UserError(f"{self.manifest.root} has no refiner (export one with `sdxl-trt export --refiner`) "
                                f"to use {say(name)}")
            low_ok = value > 0
            high_ok = value < 1 if name == "refiner_start" else value <= 1
            if not (low_ok and high_ok):
                raise UserError(f"{say(name)} {value}: expected a fraction strictly between 0 and 1"
                                + ("" if name == "refiner_start" else " (or 1)"))
        if refine_strength is not None and int(steps * refine_strength) < 1:  # as strength for img2img
            raise UserError(f"{say('refine_strength')} {refine_strength} of {steps} steps leaves the refiner no step "
                            f"to run; raise {say('refine_strength')} or {say('num_inference_steps')}")
        # the components this call needs (a subset export may lack them): said now, not after the denoising loop
        self.manifest.require(*work_for(decode=output_type != "latent", img2img=image is not None,
                                        refiner=refiner_start is not None or refine_strength is not None))


    def _require_finite(self, arrays, what: str, component: str, advice: str | None = None,
                        fp16_advice: str | None = None) -> None:
        """A UserError, in terms true for the precision `component` ran in on this backend (backends.non_finite), when
        its outputs hold NaN or Inf: nothing is written and no image made of them is returned."""
        if all(np.isfinite(a).all() for a in arrays):
            return
        advice = advice or ("with guidance and LoRA scales in range, look at what went in: the initial latents "
                            "(standard normal noise), the LoRA adapters or the model's weights")
        fp16_advice = fp16_advice or "lower the guidance or LoRA scales, or compare with fp32 on ort-cpu"
        raise UserError(non_finite(what, component, self.backend, advice, fp16_advice) + "; nothing was written")

    def _start_from(self, sampler, init: np.ndarray, strength: float, rngs, from_noise: bool = False):
        """img2img's start, as diffusers: skip the first (1 - strength) of the steps and noise `init` to that point
        (inpainting at strength 1 starts from pure noise instead). Returns (latents, evaluations to run, noise)."""
        start = img2img_start(sampler, strength)
        sampler.set_begin_index(start)
        noise = draw(rngs, init.shape[1:])
        if from_noise and strength == 1.0:
            latents = noise * np.float32(sampler.init_noise_sigma)
        else:
            latents = sampler.add_noise(init, noise, start)
        return latents.astype(np.float32), range(start, len(sampler.timesteps)), noise

    def _inpainting(self, role: str, pixels: np.ndarray, mask: np.ndarray, image_latents: np.ndarray,
                    noise: np.ndarray, rngs) -> Inpainting:
        scale = self.model["vae_scale_factor"]
        n = image_latents.shape[0]
        latent_mask = np.repeat(mask[:, :, ::scale, ::scale], n, axis=0)  # nearest, as diffusers' interpolate
        channels = self.roles[role]["unet_in_channels"]
        if channels == 4:
            # diffusers also samples the masked image's latents here, unused by a 4-channel UNet: take the same
            # draw so that a stochastic sampler's later noise lines up with the reference pipeline's
            draw(rngs, image_latents.shape[1:])
            return Inpainting(latent_mask, image_latents=image_latents, noise=noise)
        if channels != 9:
            raise UserError(f"inpainting needs a UNet with 4 or 9 input channels; this one has {channels}")
        masked = self.encode_image(pixels * (mask < 0.5), rngs)
        return Inpainting(latent_mask, channels=np.concatenate([latent_mask, masked], axis=1))

    def encode_image(self, pixels: np.ndarray, rngs) -> np.ndarray:
        """[1,3,H,W] in [-1,1] → scaled latents per image, each sampled from the VAE's distribution with the
        image's own noise stream (as diffusers with one generator per image)."""
        vae = self.roles[self.main_role]["components"]["vae_encoder"]
        out = self.backend.session(vae).run(image=pixels)
        mean, std = out["latent_mean"].astype(np.float32), np.exp(0.5 * out["latent_logvar"].astype(np.float32))
        latents = np.concatenate([mean + std * draw([rng], mean.shape[1:]) for rng in rngs])
        shift = self.model.get("vae_shift_factor") or 0.0
        return ((latents - np.float32(shift)) * np.float32(self.model["vae_scaling_factor"])).astype(np.float32)

    def _check_split(self, sampler, fraction: float, refiner: bool, strength: float | None, name: str,
                     names=None) -> None:
        """A one-line error when the base's steps before `fraction` of the schedule (after img2img's `strength`
        skipped the first ones), or with `refiner` the refiner's after it, are none: the call would return the
        noise (or the base's latents) unchanged by that model."""
        say = functools.partial(spelled, names=names)
        steps = sampler.steps
        start = 0 if strength is None else img2img_start(sampler, strength)
        cutoff = self._cutoff(fraction)
        base, rest = int(np.sum(sampler.timesteps[start:] >= cutoff)), int(np.sum(sampler.timesteps < cutoff))
        if base == 0 or (refiner and rest == 0):
            who, move = ("the base", "raise") if base == 0 else ("the refiner", "lower")
            raise UserError(f"{say(name)} {fraction:g} of {steps} steps leaves {who} no step to run; {move} "
                            f"{say(name)} or raise {say('num_inference_steps')}")

    def _cutoff(self, fraction: float) -> int:
        train = self.scheduler_config.get("num_train_timesteps", 1000)
        return int(round(train - fraction * train))

    def decode_uint8(self, latents: np.ndarray) -> np.ndarray:
        """Latents → the pixels of the images, uint8 [N,H,W,3], rounded as diffusers' numpy_to_pil. On a backend with
        a device loop (ort-cuda) the whole decode runs there and only the pixels are copied back (not with
        `low_memory`, which decodes large images in tiles)."""
        if self._on_device and not self.low_memory:
            vae = self.roles[self.main_role]["components"]["vae_decoder"]
            return self.backend.device_loop.decode(vae, latents, self.model["vae_scaling_factor"],
                                                   self.model.get("vae_shift_factor") or 0.0)
        return to_uint8(self.decode(latents))

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents → images [N,H,W,3] in [0,1], as diffusers' VAE decode + image processor (no clipping loss); with
        `low_memory`, in tiles of the model's default size, as diffusers' decode with `enable_tiling()`."""
        shift = self.model.get("vae_shift_factor") or 0.0
        latent = latents / np.float32(self.model["vae_scaling_factor"]) + np.float32(shift)
        vae = self.backend.session(self.roles[self.main_role]["components"]["vae_decoder"])

        def run(part: np.ndarray) -> np.ndarray:
            return vae.run(latent=np.ascontiguousarray(part))["image"].astype(np.float32)

        if self.low_memory:
            scale = self.model["vae_scale_factor"]
            image = decode_tiled(run, latent, self.vae_tile or self.model["default_size"] // scale, scale)
        else:
            image = run(latent)
        self._require_finite([image], "the VAE produced", self.roles[self.main_role]["components"]["vae_decoder"],
                             "the latents it decoded were far outside a sampler's range", VAE_FP16_ADVICE)
        return np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


def rescale_noise_cfg(noise_cfg: np.ndarray, noise_text: np.ndarray, guidance_rescale: float) -> np.ndarray:
    """Guidance rescale (Lin et al. 2023, §3.4), as diffusers: match the guided prediction's std to the text one's."""
    axes = tuple(range(1, noise_text.ndim))
    std_text = noise_text.std(axis=axes, keepdims=True, ddof=1)
    std_cfg = noise_cfg.std(axis=axes, keepdims=True, ddof=1)
    return guidance_rescale * (noise_cfg * (std_text / std_cfg)) + (1 - guidance_rescale) * noise_cfg
