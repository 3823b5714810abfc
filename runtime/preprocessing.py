"""Images as a client stores them -> the students' input tensor (the bundle's preprocessing)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["preprocess_images"]


def preprocess_images(images: np.ndarray, mean: Sequence[float], std: Sequence[float], input_shape: Sequence[int], pixel_scale: float = 1 / 255) -> np.ndarray:
    """Images -> the students' input: float32 NCHW, (x - mean) / std per channel.

    Accepts (N, C, H, W), (N, H, W, C), or (N, H, W) for one channel; uint8 pixels are scaled by
    `pixel_scale` first, float images are taken to be in [0, 1] already.
    """
    c, h, w = (int(d) for d in input_shape)
    x = np.asarray(images)
    if x.ndim == 3 and c == 1 and x.shape[1:] == (h, w):
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1:] != (c, h, w) and x.shape[1:] == (h, w, c):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1:] != (c, h, w):
        raise ValueError(f"images have shape {list(x.shape)}; expected (N, {c}, {h}, {w}), (N, {h}, {w}, {c})" + (f" or (N, {h}, {w})" if c == 1 else ""))
    if x.dtype == np.uint8:
        x = x.astype(np.float32) * np.float32(pixel_scale)
    elif x.dtype.kind != "f":
        raise ValueError(f"images have dtype {x.dtype}; expected uint8 pixels or floats in [0, 1]")
    mean_a = np.asarray(mean, dtype=np.float32).reshape(1, c, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(1, c, 1, 1)
    return np.ascontiguousarray((x.astype(np.float32) - mean_a) / std_a)
