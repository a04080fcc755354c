"""Point, don't type: send a crop to the Test bench with one click, choose a region by drawing a
box on an image, place a patch by clicking where it goes.

The bench's state (the stitch list and the patch crop) lives in ``st.session_state`` per
workspace, so crops sent from Explain or Contrast are waiting on the Test bench. The pure
functions (a click or a drag -> a box or a position) carry the logic and are unit-tested; the
image component (streamlit-image-coordinates) only delivers the clicks, and the numeric fields
stay for precision.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import streamlit as st

from explorer_core.errors import ExplorerError

# --------------------------------------------------------------------------------------------
# the bench's state, per workspace


def bench_state(ws_name: str) -> dict[str, Any]:
    """``{"stitch": [crop ids], "patch": crop id | None}`` of workspace ``ws_name`` (this browser
    session)."""
    all_ws = st.session_state.setdefault("_bench", {})
    return all_ws.setdefault(str(ws_name), {"stitch": [], "patch": None})


MAX_STITCH = 64  # crops in one stitched image (a column of crops: taller is not readable)


def add_to_stitch(ws_name: str, crop_id: int) -> None:
    """Append ``crop_id`` to the stitch list (once; the oldest leaves beyond MAX_STITCH)."""
    s = bench_state(ws_name)
    if int(crop_id) not in s["stitch"]:
        s["stitch"].append(int(crop_id))
        del s["stitch"][:-MAX_STITCH]


def set_patch(ws_name: str, crop_id: int) -> None:
    """Make ``crop_id`` the patch of the patch insertion test (source: concept crop)."""
    bench_state(ws_name)["patch"] = int(crop_id)
    st.session_state["tb_source"] = "concept crop"
    st.session_state.pop("tb_patch_crop_typed", None)


STITCH, STITCHED = ":material/playlist_add:", ":material/playlist_add_check:"
PATCH, PATCHED = ":material/picture_in_picture:", ":material/task_alt:"


def send_buttons(ws_name: str, crop_id: int, *, key: str) -> None:
    """Two small buttons under a crop: add it to the Test bench's stitch list, or make it the
    patch. One click each; the Test bench shows them when opened."""
    s = bench_state(ws_name)
    c1, c2 = st.columns(2, gap="small")
    inside = int(crop_id) in s["stitch"]
    c1.button("", icon=STITCHED if inside else STITCH, key=f"{key}_stitch",
              on_click=add_to_stitch, args=(ws_name, int(crop_id)), disabled=inside,
              help=(f"Crop {crop_id} is in the Test bench's stitch list" if inside else
                    f"Add crop {crop_id} to the Test bench's stitched image"))
    is_patch = s["patch"] == int(crop_id)
    c2.button("", icon=PATCHED if is_patch else PATCH, key=f"{key}_patch", on_click=set_patch,
              args=(ws_name, int(crop_id)), disabled=is_patch,
              help=(f"Crop {crop_id} is the Test bench's patch" if is_patch else
                    f"Use crop {crop_id} as the Test bench's patch"))


# --------------------------------------------------------------------------------------------
# clicks -> boxes and positions (pure functions)


def _scale(value: Mapping[str, Any], image_size: int) -> float:
    """Image pixels per displayed pixel (the component reports displayed coordinates)."""
    w = float(value.get("width") or image_size)
    return float(image_size) / w if w > 0 else 1.0


def normalized_box(x0: int, y0: int, x1: int, y1: int, size: int) -> tuple[int, int, int, int]:
    """The box with its corners in order (x0 < x1, y0 < y1), clipped to a ``size`` image;
    ExplorerError when it is empty (a zero width or height)."""
    xa, xb = sorted((int(x0), int(x1)))
    ya, yb = sorted((int(y0), int(y1)))
    xa, xb = max(0, xa), min(int(size), xb)
    ya, yb = max(0, ya), min(int(size), yb)
    if xb <= xa or yb <= ya:
        raise ExplorerError(f"The region ({x0}, {y0}, {x1}, {y1}) is empty: give corners that "
                            f"differ in x and in y, within 0..{size} (or draw a box on the image)")
    return xa, ya, xb, yb


def box_from_drag(value: Mapping[str, Any] | None, image_size: int,
                  min_side: int = 2) -> tuple[int, int, int, int] | None:
    """The box drawn on the image (streamlit-image-coordinates with ``click_and_drag``: mouse
    down at ``x1, y1``, up at ``x2, y2`` in displayed pixels), in image pixels, ordered and
    clipped. A plain click (no drag) gives a box of side ``image_size // 3`` centred on it.
    ``None`` without a value."""
    if not value:
        return None
    f = _scale(value, image_size)
    s = int(image_size)
    if "x1" in value and "x2" in value:
        xa, ya = float(value["x1"]) * f, float(value["y1"]) * f
        xb, yb = float(value["x2"]) * f, float(value["y2"]) * f
        if abs(xb - xa) >= min_side and abs(yb - ya) >= min_side:
            box = (round(min(xa, xb)), round(min(ya, yb)), round(max(xa, xb)),
                   round(max(ya, yb)))
            return normalized_box(*box, size=s)
        cx, cy = xa, ya
    else:
        cx, cy = float(value["x"]) * f, float(value["y"]) * f
    side = max(1, s // 3)
    x0 = min(max(0, round(cx - side / 2)), s - side)
    y0 = min(max(0, round(cy - side / 2)), s - side)
    return x0, y0, x0 + side, y0 + side


def position_from_click(value: Mapping[str, Any] | None, image_size: int, patch_w: int,
                        patch_h: int) -> tuple[int, int] | None:
    """Top-left ``(x, y)`` of a ``patch_w x patch_h`` patch centred where the image was clicked
    (displayed pixels -> image pixels), moved inside the image. ``None`` without a click."""
    if not value:
        return None
    f = _scale(value, image_size)
    cx = float(value.get("x", value.get("x2", 0))) * f
    cy = float(value.get("y", value.get("y2", 0))) * f
    s = int(image_size)
    x = min(max(0, round(cx - patch_w / 2)), max(0, s - int(patch_w)))
    y = min(max(0, round(cy - patch_h / 2)), max(0, s - int(patch_h)))
    return int(x), int(y)


def new_event(value: Mapping[str, Any] | None, seen_key: str) -> bool:
    """Whether ``value`` (a component's value) is a click not handled yet; marks it handled."""
    if not value:
        return False
    stamp = (value.get("unix_time"), value.get("x"), value.get("y"), value.get("x2"),
             value.get("y2"))
    if st.session_state.get(seen_key) == stamp:
        return False
    st.session_state[seen_key] = stamp
    return True


# --------------------------------------------------------------------------------------------
# an uploaded patch


def patch_from_upload(lm: Any, name: str, data: bytes) -> Any:
    """The uploaded file ``name`` (its bytes) as a patch; errors name the user's file, never
    the temporary copy."""
    from explainer.faithfulness import patch_from_file

    suffix = Path(name).suffix if Path(name).suffix.isascii() else ""
    with tempfile.TemporaryDirectory(prefix="patch-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            return patch_from_file(lm, path)
        except ExplorerError as err:
            msg = str(err).replace(f"'{path}'", f"'{name}'").replace(str(path), name)
            raise ExplorerError(msg) from None
