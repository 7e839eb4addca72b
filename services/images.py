"""Sample grids as PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dkdm_core.data import to_uint8_nhwc


def grid_image(images: torch.Tensor, nrow: int | None = None, scale: int = 4, pad: int = 1) -> Image.Image:
    """[-1, 1] images (N, C, H, W) tiled into one picture, each upscaled ``scale``x (nearest)."""
    arr = to_uint8_nhwc(images)  # (N, H, W, C)
    n, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y : y + h, x : x + w] = arr[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, nrow).save(out)
    return out
