"""How far one rendered image is from another: what the bench reports against plain bf16 and what `fluxfarm
rerender` reports against the stored image. Numbers only: no image is judged."""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(BytesIO(png)).convert("RGB"))


def agreement(image: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """PSNR (dB, 8-bit scale) and relative L2 error of `image` against `reference`."""
    diff = image.astype(np.float64) - reference.astype(np.float64)
    mse = float(np.mean(diff**2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    rel = float(np.linalg.norm(diff) / max(np.linalg.norm(reference.astype(np.float64)), 1e-12))
    return psnr, rel
