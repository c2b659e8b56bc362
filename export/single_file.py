"""Single-file SDXL checkpoints in Stability's original layout (`sd_xl_base_1.0.safetensors` and its fine-tunes).

Layout: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), and the text encoders under
`conditioner.embedders.N`: the base has CLIP-L at 0 (HF layout under `.transformer.`) and OpenCLIP ViT-bigG
at 1 (`.model.`); the refiner has only ViT-bigG, at 0. Which embedded architecture a file holds is read from
the shapes of its first UNet convolution and its size-conditioning embedding, without reading any weights.
The key conversion itself is diffusers' (`diffusers.loaders.single_file_utils`); loading is strict, so a file
whose tensors do not fit the architecture is refused with the first key that does not fit.
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from ..runtime.errors import UserError
from .modules import build
from ..runtime.fileio import read_json
from .sources import ACCEPTED, ModelSource, SourceSpec
from .vocab import CONFIGS, cached_tokenizer_dirs

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "conditioner.embedders.0.transformer."
CLIP_G = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}
FIRST_CONV = UNET + "input_blocks.0.0.weight"  # [channels, in_channels (4, or 9 for inpainting), 3, 3]
LABEL_EMB = UNET + "label_emb.0.0.weight"  # [time_embed_dim, pooled + time ids × embed dim]: SDXL only
ARCHITECTURES = ("sdxl-base", "sdxl-refiner", "tiny-base", "tiny-refiner")


class _Reader:
    """Keys, shapes and tensors of a checkpoint; a safetensors file is read lazily, tensor by tensor."""

    def __init__(self, spec: str, path: Path, pickle: bool):
        self.spec = spec
        if pickle:
            import torch

            try:
                data = torch.load(path, map_location="cpu", weights_only=False)  # the user passed --allow-pickle
            except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is not a checkpoint
                raise UserError(f"--model {spec!r}: cannot read this pickle checkpoint ({type(e).__name__}: {e})") from None
            data = data.get("state_dict", data) if isinstance(data, dict) else None
            if not isinstance(data, dict):
                raise UserError(f"--model {spec!r}: the pickle holds no state dict")
            self._dict, self._file = data, None
            return
        from safetensors import SafetensorError, safe_open

        try:
            self._file = safe_open(str(path), framework="pt")
            self._keys = list(self._file.keys())
        except (SafetensorError, OSError) as e:
            raise UserError(f"--model {spec!r} is not a readable .safetensors file ({e})") from None
        self._dict = None

    def keys(self) -> list[str]:
        return list(self._dict) if self._dict is not None else self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        if self._dict is not None:
            return tuple(self._dict[key].shape)
        return tuple(self._file.get_slice(key).get_shape())

    def prefixed(self, prefix: str) -> dict:
        """The tensors whose names start with `prefix` (names kept whole)."""
        keys = [k for k in self.keys() if k.startswith(prefix)]
        try:
            if self._dict is not None:
                return {k: self._dict[k] for k in keys}
            return {k: self._file.get_tensor(k) for k in keys}
        except Exception as e:  # noqa: BLE001 - a truncated or damaged file fails here, tensor by tensor
            raise UserError(f"--model {self.spec!r}: cannot read its {prefix}* tensors ({e})") from None


def inspect_checkpoint(spec: str, path: Path, pickle: bool = False) -> SourceSpec:
    reader = _Reader(spec, path, pickle)
    keys = set(reader.keys())
    if FIRST_CONV not in keys:
        if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
            raise UserError(f"--model {spec!r} holds a single diffusers-format component, not a whole SDXL checkpoint; "
                            f"accepted: {ACCEPTED}")
        raise UserError(f"--model {spec!r} is not an SDXL checkpoint (no {UNET}* UNet weights); accepted: {ACCEPTED}")
    if LABEL_EMB not in keys:
        raise UserError(f"--model {spec!r} is a Stable Diffusion 1.x/2.x checkpoint (its UNet has no SDXL size "
                        f"conditioning), not SDXL; accepted: {ACCEPTED}")
    if CLIP_G["base"] + "positional_embedding" in keys and any(k.startswith(CLIP_L) for k in keys):
        role = "base"
    elif CLIP_G["refiner"] + "positional_embedding" in keys:
        role = "refiner"
    else:
        raise UserError(f"--model {spec!r} has an SDXL UNet but not SDXL's text encoders (conditioner.embedders.*); "
                        "export the text encoders from a full checkpoint")
    if not any(k.startswith(VAE) for k in keys):
        raise UserError(f"--model {spec!r} has no VAE ({VAE}* weights); use a full SDXL checkpoint")
    channels, in_channels = reader.shape(FIRST_CONV)[:2]
    adm = reader.shape(LABEL_EMB)[1]
    if in_channels not in (4, 9):
        raise UserError(f"--model {spec!r}: its UNet takes {in_channels} input channels (SDXL: 4, inpainting: 9)")
    for arch in ARCHITECTURES:
        if not arch.endswith(role):
            continue
        config = read_json(CONFIGS / arch / "unet" / "config.json", arch)
        if config["block_out_channels"][0] == channels and config["projection_class_embeddings_input_dim"] == adm:
            return SourceSpec(spec, "single-file", role, arch, path=path, pickle=pickle, in_channels=in_channels)
    raise UserError(f"--model {spec!r}: an SDXL {role} checkpoint of an unknown size (UNet width {channels}, "
                    f"conditioning {adm}); known: the official SDXL 1.0 base and refiner")


def _load_strict(model, state: dict, what: str, spec: str) -> None:
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # a non-persistent buffer in HF CLIP
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        first = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                 else f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}")
        raise UserError(f"--model {spec!r}: its {what} weights do not fit the {what} architecture "
                        f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape; "
                        f"first: {first})")
    model.load_state_dict(state, strict=True, assign=True)


def _strip_text_model(model, state: dict) -> dict:
    # transformers ≥ 5.6 flattened CLIPTextModel (no `text_model.` level); diffusers' converters emit the old names.
    if hasattr(model, "text_model"):
        return state
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def load_checkpoint(src: SourceSpec, *, dtype, device, names: list[str], progress: bool = True) -> ModelSource:
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    reader = _Reader(src.spec, src.path, src.pickle)
    config_dir = src.config_dir
    modules = {}
    for name in tqdm(names, desc=f"loading {src.path.name}", disable=not progress, leave=False):
        with init_empty_weights():  # parameters on the meta device: the checkpoint's tensors are assigned, not copied
            model = build(name, config_dir, in_channels=src.in_channels if name == "unet" else None)
        if name == "unet":
            state = convert_ldm_unet_checkpoint(reader.prefixed(UNET), dict(model.config))
        elif name == "vae":
            state = convert_ldm_vae_checkpoint(reader.prefixed(VAE), dict(model.config))
        elif name == "clip_l":
            state = _strip_text_model(model, convert_ldm_clip_checkpoint(reader.prefixed(CLIP_L)))
        else:
            prefix = CLIP_G[src.role]
            state = _strip_text_model(model, convert_open_clip_checkpoint(model, reader.prefixed(prefix), prefix=prefix))
        _load_strict(model, state, name, src.spec)
        del state
        modules[name] = model.to(device=device, dtype=dtype)
    return ModelSource.assemble(src, modules, config_dir, cached_tokenizer_dirs(config_dir))
