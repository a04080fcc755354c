"""Pictures: crops and images of a catalog as arrays (cached per catalog version), boxes and
heatmap overlays. Nothing here computes the method."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import streamlit as st
from PIL import Image, ImageDraw

from .resources import catalog_for_key, catalog_key, model


def to_uint8(t: Any) -> np.ndarray:
    """(3, H, W) [0, 1] tensor/array -> (H, W, 3) uint8."""
    a = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
    if a.ndim == 3 and a.shape[0] == 3:
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    return a


def upscale(a: np.ndarray, min_side: int = 128) -> np.ndarray:
    """Nearest-neighbour upscale of a small picture so it reads on screen."""
    h, w = a.shape[:2]
    f = max(1, int(np.ceil(min_side / max(1, min(h, w)))))
    return a.repeat(f, 0).repeat(f, 1) if f > 1 else a


@st.cache_data(show_spinner=False, max_entries=2048)
def _crop_image(root: str, version: str, spec: str, device: str, crop_id: int) -> np.ndarray:
    return to_uint8(catalog_for_key(root, version).crop_pixels([int(crop_id)],
                                                               model(spec, device))[0])


@st.cache_data(show_spinner=False, max_entries=512)
def _image_array(root: str, version: str, spec: str, device: str, image_id: int) -> np.ndarray:
    return to_uint8(catalog_for_key(root, version).image_pixels([int(image_id)],
                                                                model(spec, device))[0])


def crop_pic(ws: Any, crop_id: int) -> np.ndarray:
    """``(c, c, 3)`` uint8 pixels of a crop of the workspace's catalog."""
    return _crop_image(*catalog_key(ws), ws.model, ws.device, int(crop_id))


def image_pic(ws: Any, image_id: int) -> np.ndarray:
    """``(S, S, 3)`` uint8 pixels of a catalog image after resize and center crop."""
    return _image_array(*catalog_key(ws), ws.model, ws.device, int(image_id))


def with_box(img: np.ndarray, box: Sequence[int], color: tuple[int, int, int] = (255, 40, 40)
             ) -> np.ndarray:
    """The image (upscaled) with the crop box drawn."""
    big = upscale(img, 256)
    f = big.shape[0] // img.shape[0]
    pil = Image.fromarray(big)
    x0, y0, x1, y1 = (int(v) * f for v in box)
    ImageDraw.Draw(pil).rectangle([x0, y0, x1 - 1, y1 - 1], outline=color, width=max(2, f))
    return np.asarray(pil)
