"""Concept heatmaps as pictures: a colour scale, overlays with an opacity, a colour bar, and the
source images where a concept is strongest.

The numbers are the explanation's NMF ``W`` per pixel of the layer (``Explanation.heatmaps``,
``(N, n, h, w)``, ours, not the paper's); one scale per concept (its 99.5th percentile over the
source images), so a concept reads the same in every image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["COLORMAP", "colorize", "concept_scales", "overlay", "colorbar", "strongest_images"]

# "inferno"-like anchors, dark (0) to bright yellow (1): readable on photos and in grey print
_ANCHORS = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                     [245, 125, 21], [250, 193, 39], [252, 255, 164]], np.float32)
COLORMAP = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)),
                               _ANCHORS[:, c]) for c in range(3)], 1).astype(np.uint8)


def concept_scales(heatmaps: np.ndarray) -> np.ndarray:
    """``(n,)`` the value shown as full colour per concept: the 99.5th percentile of its
    strengths over all source images (the maximum when that is 0; 1 when all are 0)."""
    hm = np.asarray(heatmaps, np.float32)
    if hm.ndim != 4 or hm.shape[1] == 0:
        return np.zeros((0,), np.float32)
    flat = hm.transpose(1, 0, 2, 3).reshape(hm.shape[1], -1)
    out = np.percentile(flat, 99.5, axis=1).astype(np.float32)
    mx = flat.max(axis=1) if flat.shape[1] else np.zeros(len(out), np.float32)
    out = np.where(out > 0, out, mx)
    return np.where(out > 0, out, 1.0).astype(np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB of :data:`COLORMAP` (shape + (3,))."""
    idx = (np.clip(np.nan_to_num(np.asarray(values, np.float32)), 0, 1) * 255 + 0.5)
    return COLORMAP[idx.astype(np.int64)]


def overlay(img: np.ndarray, heat: np.ndarray, vmax: float, opacity: float = 0.6,
            *, dim: bool = False, size: int = 0) -> np.ndarray:
    """The heatmap ``(h, w)`` in colour over the image ``(H, W, 3)`` uint8, blended with
    ``opacity`` (0: the image only, 1: the heatmap only) and upscaled (bilinear) to the image.
    ``dim`` greys and darkens the result (a concept not chosen). ``size`` > 0 resizes the
    result to that side (nearest neighbour), so a small image reads on screen."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    H, W = img.shape[:2]
    h = np.clip(np.asarray(heat, np.float32) / (vmax if vmax > 0 else 1.0), 0, 1)
    up = np.asarray(Image.fromarray((h * 255 + 0.5).astype(np.uint8)).resize(
        (W, H), Image.Resampling.BILINEAR), np.float32) / 255.0
    color = colorize(up).astype(np.float32)
    out = img.astype(np.float32) * (1 - opacity) + color * opacity
    if dim:
        grey = out.mean(axis=2, keepdims=True)
        out = (out * 0.25 + grey * 0.75) * 0.45
    res = out.clip(0, 255).astype(np.uint8)
    if size > 0 and (H, W) != (size, size):
        res = np.asarray(Image.fromarray(res).resize((size, size), Image.Resampling.NEAREST))
    return res


def colorbar(width: int = 256, height: int = 14) -> np.ndarray:
    """A horizontal colour bar ``(height, width, 3)`` uint8 from 0 (left) to full (right)."""
    row = colorize(np.linspace(0, 1, max(2, width)))
    return np.repeat(row[None], max(1, height), axis=0)


def strongest_images(heatmaps: np.ndarray, image_ids: list[int], concept: int,
                     top: int = 8) -> list[tuple[int, float]]:
    """``(image id, max strength)`` of the ``top`` source images where concept ``concept``'s
    heatmap is strongest (its maximum over the image), strongest first."""
    hm = np.asarray(heatmaps)
    if hm.ndim != 4 or not 0 <= concept < hm.shape[1]:
        raise ValueError(f"no concept {concept} in heatmaps of shape {hm.shape}")
    if len(image_ids) != hm.shape[0]:
        raise ValueError(f"{len(image_ids)} image ids for {hm.shape[0]} heatmaps")
    peak = hm[:, concept].reshape(hm.shape[0], -1).max(axis=1) if hm.shape[0] else np.zeros(0)
    order = np.argsort(-peak, kind="stable")[:max(0, int(top))]
    return [(int(image_ids[i]), float(peak[i])) for i in order]
