"""The 3x3 crop grid of the paper (§4.2) and cell pooling aligned with it.

For a model input of side ``S`` the crop side is ``c = S // 3`` (74 px for 224) and crop
``(row, col)`` is the pixel box ``(col*c, row*c, col*c + c, row*c + c)``; the ``S - 3c`` pixels
left over (2 for 224) are a margin at the right / bottom, as in the paper.
``crop_id = image_id * 9 + row * 3 + col``.

:func:`cell_pool` averages a feature map over *exactly* those pixel boxes: a feature pixel ``j``
of a map of width ``w`` covers input pixels ``[j*S/w, (j+1)*S/w)`` and is weighted by its
overlap with the crop box (separably in x and y). The authors' scripts pooled 64-px cells
instead, misaligned with the 74-px crops.
"""

from __future__ import annotations

import torch

__all__ = ["GRID", "crop_boxes", "crop_id", "split_crop_id", "cell_weights", "cell_pool",
           "cut_crops"]

GRID = 3


def crop_boxes(input_size: int) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """``[(row, col, (x0, y0, x1, y1)), ...]`` for the 9 crops, row-major."""
    c = input_size // GRID
    return [(r, q, (q * c, r * c, q * c + c, r * c + c)) for r in range(GRID) for q in range(GRID)]


def crop_id(image_id: int, row: int, col: int) -> int:
    return image_id * GRID * GRID + row * GRID + col


def split_crop_id(cid: int) -> tuple[int, int, int]:
    """``crop_id -> (image_id, row, col)``."""
    image_id, k = divmod(int(cid), GRID * GRID)
    return image_id, k // GRID, k % GRID


def _axis_weights(n_feat: int, input_size: int) -> torch.Tensor:
    """``(3, n_feat)`` overlap weights along one axis; each row sums to 1."""
    c = input_size // GRID
    step = input_size / n_feat
    w = torch.zeros(GRID, n_feat, dtype=torch.float64)
    for k in range(GRID):
        a0, a1 = k * c, k * c + c
        for j in range(n_feat):
            lo, hi = j * step, (j + 1) * step
            w[k, j] = max(0.0, min(a1, hi) - max(a0, lo))
    return w / c


def cell_weights(h: int, w: int, input_size: int) -> torch.Tensor:
    """``(9, h, w)`` area weights of each crop over the feature pixels (each sums to 1)."""
    wy, wx = _axis_weights(h, input_size), _axis_weights(w, input_size)
    return torch.einsum("ri,qj->rqij", wy, wx).reshape(GRID * GRID, h, w)


def cell_pool(acts: torch.Tensor, input_size: int) -> torch.Tensor:
    """Area-weighted mean of ``acts (B, C, h, w)`` over each crop box: ``(B, 9, C)``."""
    _, _, h, w = acts.shape
    wy = _axis_weights(h, input_size).to(acts.device, acts.dtype)
    wx = _axis_weights(w, input_size).to(acts.device, acts.dtype)
    out = torch.einsum("bcij,ri,qj->brqc", acts, wy, wx)
    return out.reshape(acts.shape[0], GRID * GRID, acts.shape[1])


def cut_crops(pixels: torch.Tensor, input_size: int | None = None) -> torch.Tensor:
    """``(B, 3, S, S)`` -> ``(B*9, 3, c, c)`` crops, image-major then row-major."""
    s = input_size or pixels.shape[-1]
    crops = [pixels[:, :, y0:y1, x0:x1] for _, _, (x0, y0, x1, y1) in crop_boxes(s)]
    return torch.stack(crops, dim=1).reshape(-1, pixels.shape[1], s // GRID, s // GRID)
