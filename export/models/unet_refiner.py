"""`unet_refiner`: the SDXL refiner UNet. Context: clip_g states only; five micro-conditioning values, the last
being the aesthetic score (6.0 for the prompt, 2.5 for the negative prompt by default)."""

from .unet import Unet

AESTHETIC_SCORE = 6.0  # diffusers' StableDiffusionXLImg2ImgPipeline default


class UnetRefiner(Unet):
    name = "unet_refiner"
    time_ids = ("original_height", "original_width", "crop_top", "crop_left", "aesthetic_score")

    def time_id_values(self, height, width):
        return [height, width, 0, 0, AESTHETIC_SCORE]
