"""Sample grids: a base64 PNG for the report, a PNG file for `tarflow-gs sample`."""
from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import numpy as np
import torch

from tarflow.atomic import write_atomic


def grid_png(images, nrow: int | None = None) -> str:
    """Base64 PNG of a grid (square by default) of images (N, C, H, W) in model space [-1, 1]."""
    from PIL import Image

    x = np.asarray(images, dtype=np.float32)
    x = np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    pad = 2
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = \
            x[i].transpose(1, 2, 0)
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    scale = max(1, 256 // max(canvas.shape[:2]))  # small digits are unreadable at 1:1
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def save_grid(images: torch.Tensor, path, nrow: int = 10) -> Path:
    """Images (N, C, H, W) in [-1, 1] as one PNG grid with 2-pixel white padding."""
    from torchvision.utils import save_image

    return write_atomic(path, lambda tmp: save_image((images.clamp(-1, 1) + 1) / 2, tmp, nrow=nrow, padding=2,
                                                     pad_value=1.0, format="PNG"))
