"""What an exported model promises: input and output names, dtypes and shapes with their dynamic axes.

One `Component` subclass per exported model (clip_l.py, clip_g.py, unet.py, unet_refiner.py, vae_decoder.py,
vae_encoder.py) states its contract, the torch wrapper that is traced, sample inputs and shape bounds.
The same contract is written into the manifest, where the runtime reads it without torch.

Symbolic dimensions, one name each everywhere:
  B  batch (images × 2 under classifier-free guidance for the UNets)
  S  text tokens, 77·k (k prompt windows of 77 tokens)
  h, w  latent height and width (pixels / 8);  H, W  pixel height and width
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# The two float dtypes a contract can name: "float" follows the precision of the file (fp32 in model.onnx,
# fp16 in model.fp16.onnx); "float32" stays fp32 in every variant (timesteps, where fp16 would lose steps).
FLOAT, FLOAT32, INT32 = "float", "float32", "int32"
TOKENS = 77  # CLIP's context length: one prompt window


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # FLOAT, FLOAT32 or INT32
    shape: tuple  # ints and symbolic dimension names

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Bounds:
    """Shapes an exported model is meant for (TensorRT profiles and input validation use these)."""

    batch: tuple[int, int] = (1, 8)  # images per call (the UNet sees twice as many under CFG)
    pixels: tuple[int, int] = (256, 2048)  # image side in pixels, multiples of 8
    prompt_windows: tuple[int, int] = (1, 4)  # 77-token windows of a long prompt


class Component:
    """A model to export. Subclasses set the class attributes and implement `wrapper` and `sample_inputs`."""

    name: str  # the contract name: file folder, manifest key, runtime name
    module: str  # which ModelSource module it comes from: clip_l, clip_g, unet, vae
    bounds = Bounds()
    # Models whose fp16 variant is only safe if the weights are known not to overflow (the SDXL VAE).
    fp16_needs_safe_weights = False

    def __init__(self, module):
        self.torch_module = module  # released (None) once everything that needs torch is done
        self.config = module.config  # the contract is read from the config, which stays

    def inputs(self) -> list[TensorSpec]:
        raise NotImplementedError

    def outputs(self) -> list[TensorSpec]:
        raise NotImplementedError

    def wrapper(self):
        """The torch.nn.Module that is traced: positional inputs in contract order, outputs in contract order."""
        raise NotImplementedError

    def sample_inputs(self, batch: int, height: int, width: int, windows: int = 1, dtype=None, seed: int = 0) -> tuple:
        """Inputs for tracing and verification: `height`/`width` in pixels."""
        raise NotImplementedError

    def contract(self) -> dict:
        return {"inputs": [t.to_json() for t in self.inputs()], "outputs": [t.to_json() for t in self.outputs()],
                "bounds": asdict(self.bounds)}

    def fp32_inputs(self) -> list[str]:
        return [t.name for t in self.inputs() if t.dtype == FLOAT32]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        specs = self.inputs() + self.outputs()
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in specs
                if any(isinstance(d, str) for d in t.shape)}


def generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)
