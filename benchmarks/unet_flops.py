"""FLOPs of one UNet evaluation per image size and batch, counted by torch's FlopCounterMode on the official SDXL
UNet configs built on the meta device (no weights, no GPU, seconds on a CPU). `sdxl-trt bench` reads the JSON to
report achieved TFLOP/s.

    python benchmarks/unet_flops.py --out benchmarks/results/unet-flops.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

SIZES = ["1024x1024", "1152x896", "896x1152", "1216x832", "832x1216", "1344x768", "768x1344", "1536x640", "640x1536",
         "512x512", "768x768"]
CONFIGS = Path(__file__).resolve().parents[1] / "export" / "configs"


def count(role: str, width: int, height: int, batch: int) -> int:
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads((CONFIGS / f"sdxl-{role}" / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        context = 2048 if role == "base" else 1280
        ids = 6 if role == "base" else 5
        args = (torch.randn(batch, 4, height // 8, width // 8), torch.full((batch,), 500.0),
                torch.randn(batch, 77, context))
        added = {"text_embeds": torch.randn(batch, 1280), "time_ids": torch.randn(batch, ids)}
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(*args, added_cond_kwargs=added)
    return counter.get_total_flops()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--sizes", nargs="+", default=SIZES)
    args = p.parse_args()
    table = {}
    for role in ("base", "refiner"):
        table[role] = {size: count(role, *map(int, size.split("x")), batch=1) for size in args.sizes}
        print(role, {k: f"{v / 1e12:.2f} TFLOP" for k, v in table[role].items()}, flush=True)
    result = {"command": shlex.join(["python", *sys.argv]), "unit": "FLOP per UNet evaluation of ONE latent (batch 1; "
              "classifier-free guidance evaluates two)", "counter": "torch.utils.flop_counter.FlopCounterMode",
              "flops": table}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
