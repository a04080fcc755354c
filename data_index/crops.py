"""The crop grid (paper §4.2, generalised) and cell pooling aligned with it.

A :class:`CropGrid` covers a square image of side ``image_size`` with square crops of side
``crop_size`` placed every ``stride`` pixels, row-major::

    rows = cols = 1 + (image_size - crop_size) // stride
    crop (row, col) = box (col*stride, row*stride, col*stride + crop_size, row*stride + crop_size)
    k = row * cols + col,   crop_id = image_id * per_image + k,   per_image = rows * cols

Pixels beyond the last crop (``image_size - (rows - 1) * stride - crop_size`` of them) are a
margin at the right / bottom. A stride smaller than the crop gives overlapping crops.

The paper's grid is the default, :meth:`CropGrid.default`: ``crop_size = stride = S // 3`` for a
model input of side ``S`` -- 3 x 3 crops of 74 px at 224 with a 2-px margin,
``crop_id = image_id * 9 + row * 3 + col``. The module-level functions (:func:`crop_boxes`,
:func:`crop_id`, :func:`split_crop_id`, :func:`cell_weights`, :func:`cell_pool`,
:func:`cut_crops`) are that default grid.

:meth:`CropGrid.cell_pool` averages a feature map over *exactly* the crops' pixel boxes: a
feature pixel ``j`` of a map of width ``w`` covers input pixels ``[j*S/w, (j+1)*S/w)`` and is
weighted by its overlap with the crop box (separably in x and y). The authors' scripts pooled
64-px cells instead, misaligned with the 74-px crops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from explorer_core.errors import ExplorerError

__all__ = ["GRID", "CropGrid", "crop_boxes", "crop_id", "split_crop_id", "cell_weights",
           "cell_pool", "cut_crops"]

GRID = 3
"""Rows (= columns) of the default grid."""

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class CropGrid:
    """Square crops of ``crop_size`` px every ``stride`` px over an ``image_size`` square image.

    Attributes
    ----------
    image_size : int
        Side ``S`` of the image the crops are cut from (after resize and center crop).
    crop_size : int
        Side ``c`` of every crop, ``1 <= c <= S``.
    stride : int
        Step between neighbouring crops, ``>= 1`` (``< c``: crops overlap).
    """

    image_size: int
    crop_size: int
    stride: int

    def __post_init__(self) -> None:
        s, c, t = self.image_size, self.crop_size, self.stride
        for name, v in (("image_size", s), ("crop_size", c), ("stride", t)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ExplorerError(f"Crop grid {name}={v!r}: give a whole number of pixels")
        if s < 1 or c < 1 or t < 1:
            raise ExplorerError(f"Crop grid image_size={s}, crop_size={c}, stride={t}: every "
                                "size must be at least 1 pixel")
        if c > s:
            raise ExplorerError(f"Crop size {c} px is larger than the image size {s} px; use a "
                                f"crop size of at most {s}")

    @classmethod
    def default(cls, input_size: int) -> CropGrid:
        """The paper's 3 x 3 grid of ``input_size // 3`` crops."""
        c = int(input_size) // GRID
        return cls(int(input_size), c, c)

    # ---- geometry --------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Crops per column (= per row)."""
        return 1 + (self.image_size - self.crop_size) // self.stride

    @property
    def cols(self) -> int:
        return self.rows

    @property
    def per_image(self) -> int:
        """Crops per image, ``rows * cols``."""
        return self.rows * self.cols

    def _starts(self) -> list[int]:
        return [k * self.stride for k in range(self.rows)]

    def boxes(self) -> list[tuple[int, int, Box]]:
        """``[(row, col, (x0, y0, x1, y1)), ...]`` of the ``per_image`` crops, row-major."""
        c = self.crop_size
        return [(r, q, (x, y, x + c, y + c))
                for r, y in enumerate(self._starts()) for q, x in enumerate(self._starts())]

    def crop_id(self, image_id: int, k: int) -> int:
        """Id of crop ``k`` (row-major position) of image ``image_id``."""
        return int(image_id) * self.per_image + int(k)

    def split(self, cid: int) -> tuple[int, int, int]:
        """``crop_id -> (image_id, row, col)``."""
        image_id, k = divmod(int(cid), self.per_image)
        return image_id, k // self.cols, k % self.cols

    def to_meta(self) -> dict[str, str]:
        return {"image_size": str(self.image_size), "crop_size": str(self.crop_size),
                "stride": str(self.stride)}

    def label(self) -> str:
        """``3x3 crops of 74 px, stride 74, on 224 px images``."""
        return (f"{self.rows}x{self.cols} crops of {self.crop_size} px, stride {self.stride}, "
                f"on {self.image_size} px images")

    # ---- pooling and cutting ---------------------------------------------------------------
    def axis_weights(self, n_feat: int) -> torch.Tensor:
        """``(rows, n_feat)`` float64 overlap weights of each crop interval with the feature
        pixels along one axis; each row sums to 1."""
        step = self.image_size / n_feat
        w = torch.zeros(self.rows, n_feat, dtype=torch.float64)
        for k, a0 in enumerate(self._starts()):
            a1 = a0 + self.crop_size
            for j in range(n_feat):
                lo, hi = j * step, (j + 1) * step
                w[k, j] = max(0.0, min(a1, hi) - max(a0, lo))
        return w / self.crop_size

    def cell_weights(self, h: int, w: int) -> torch.Tensor:
        """``(per_image, h, w)`` area weights of each crop over the feature pixels (each sums
        to 1)."""
        wy, wx = self.axis_weights(h), self.axis_weights(w)
        return torch.einsum("ri,qj->rqij", wy, wx).reshape(self.per_image, h, w)

    def cell_pool(self, acts: torch.Tensor) -> torch.Tensor:
        """Area-weighted mean of ``acts (B, C, h, w)`` over each crop box: ``(B, per_image, C)``."""
        b, c, h, w = acts.shape
        wy = self.axis_weights(h).to(acts.device, acts.dtype)
        wx = self.axis_weights(w).to(acts.device, acts.dtype)
        out = torch.einsum("bcij,ri,qj->brqc", acts, wy, wx)
        return out.reshape(b, self.per_image, c)

    def cut_crops(self, pixels: torch.Tensor, ks: Sequence[int] | None = None) -> torch.Tensor:
        """Crops of ``pixels (B, 3, S, S)``: ``(B * len(ks), 3, c, c)``, image-major, then in
        the order of ``ks`` (default: all crops, row-major)."""
        boxes = self.boxes()
        sel = range(len(boxes)) if ks is None else ks
        crops = [pixels[:, :, y0:y1, x0:x1] for _, _, (x0, y0, x1, y1) in
                 (boxes[k] for k in sel)]
        c = self.crop_size
        return torch.stack(crops, dim=1).reshape(-1, pixels.shape[1], c, c)


# ---- the default grid (the paper's 3 x 3) ------------------------------------------------------


def crop_boxes(input_size: int) -> list[tuple[int, int, Box]]:
    """``[(row, col, (x0, y0, x1, y1)), ...]`` for the 9 crops of the default grid, row-major."""
    return CropGrid.default(input_size).boxes()


def crop_id(image_id: int, row: int, col: int) -> int:
    """Crop id in the default 3 x 3 grid: ``image_id * 9 + row * 3 + col``."""
    return image_id * GRID * GRID + row * GRID + col


def split_crop_id(cid: int) -> tuple[int, int, int]:
    """``crop_id -> (image_id, row, col)`` in the default 3 x 3 grid."""
    image_id, k = divmod(int(cid), GRID * GRID)
    return image_id, k // GRID, k % GRID


def cell_weights(h: int, w: int, input_size: int) -> torch.Tensor:
    """``(9, h, w)`` area weights of each default-grid crop over the feature pixels."""
    return CropGrid.default(input_size).cell_weights(h, w)


def cell_pool(acts: torch.Tensor, input_size: int) -> torch.Tensor:
    """Area-weighted mean of ``acts (B, C, h, w)`` over each default-grid crop: ``(B, 9, C)``."""
    return CropGrid.default(input_size).cell_pool(acts)


def cut_crops(pixels: torch.Tensor, input_size: int | None = None) -> torch.Tensor:
    """``(B, 3, S, S)`` -> ``(B*9, 3, c, c)`` default-grid crops, image-major then row-major."""
    return CropGrid.default(input_size or pixels.shape[-1]).cut_crops(pixels)
