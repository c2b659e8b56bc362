"""One module per exported model; `COMPONENTS` maps each contract name to its class."""

from .clip_g import ClipG
from .clip_l import ClipL
from .controlnet import ControlNet, UnetControl
from .unet import Unet
from .unet_refiner import UnetRefiner
from .vae_decoder import VaeDecoder
from .vae_encoder import VaeEncoder

COMPONENTS = {c.name: c for c in (ClipL, ClipG, Unet, UnetRefiner, VaeDecoder, VaeEncoder, ControlNet,
                                  UnetControl)}

__all__ = ["COMPONENTS", "ClipG", "ClipL", "ControlNet", "Unet", "UnetControl", "UnetRefiner", "VaeDecoder",
           "VaeEncoder"]
