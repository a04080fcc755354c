"""Widgets shared by the pages: class pickers and the method's settings, kept in the URL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import streamlit as st

from .state import init_widget, int_qp, qp, set_qp

METHODS = ("deeplift", "grad_x_act", "deeplift_smoothgrad")

def parse_class(value: str | None, names: Sequence[str]) -> int | None:
    """A class from the URL: its name (preferred) or its index."""
    if value is None or value == "":
        return None
    if value in names:
        return list(names).index(value)
    try:
        i = int(value)
    except ValueError:
        return None
    return i if 0 <= i < len(names) else None


def class_picker(label: str, names: Sequence[str], counts: dict[int, int], *, key: str,
                 url_key: str, default: int | None = None, container: Any = None,
                 exclude: int | None = None, min_images: int = 0) -> int:
    """Select a class by name (type to search); options read 'name (N images)'; the most
    populated classes come first. The choice is kept in the URL (by name). ``min_images``:
    only classes with at least that many images predicted as them are offered (an explanation
    of a class without images cannot run); a URL naming another class gets a note."""
    opts = sorted(range(len(names)), key=lambda i: (-counts.get(i, 0), names[i]))
    if min_images > 0:
        kept = [i for i in opts if counts.get(i, 0) >= min_images]
        asked = parse_class(qp(url_key), names)
        if asked is not None and asked not in kept and kept:
            (container or st).caption(f"'{names[asked]}' has no images predicted as it in this "
                                      f"workspace; {len(opts) - len(kept)} such classes are "
                                      "not offered.")
        opts = kept or opts
    if exclude is not None and len(opts) > 1:
        opts = [i for i in opts if i != exclude]
    first = parse_class(qp(url_key), names)
    if first is None or first not in opts:
        first = default if default in opts else opts[0]
    init_widget(key, first)
    if st.session_state[key] not in opts:
        st.session_state[key] = first
    box = container or st
    cls = box.selectbox(label, opts, key=key,
                        format_func=lambda i: f"{names[i]} ({counts.get(i, 0)} images)")
    set_qp(**{url_key: names[cls]})
    return int(cls)


def class_name(lm: Any, c: int) -> str:
    return lm.class_names[c] if 0 <= c < len(lm.class_names) else f"class {c}"


def is_segmentation(lm: Any) -> bool:
    """Whether the model predicts per pixel: its tests read pixel shares, not probabilities."""
    return getattr(lm, "task", "classification") == "segmentation"


def score_label(lm: Any, cls: str) -> str:
    """How the pages name the model's score of class ``cls``: ``P(cls)`` for a classifier (its
    softmax), ``share of pixels predicted as cls`` for a segmentation model."""
    return f"share of pixels predicted as {cls}" if is_segmentation(lm) else f"P({cls})"


def delta_label(lm: Any, cls: str) -> str:
    """The change of :func:`score_label`: ``ΔP(cls)`` or ``Δ share of pixels predicted as cls``."""
    return f"Δ {score_label(lm, cls)}" if is_segmentation(lm) else f"ΔP({cls})"


def score_short(lm: Any, cls: str) -> str:
    """A short :func:`score_label` for tight places (table columns, small metrics):
    ``P(cls)`` or ``pixels {cls}`` (the share of pixels predicted as it)."""
    return f"pixels {cls}" if is_segmentation(lm) else f"P({cls})"



def method_settings(prefix: str, images_label: str, images_help: str | None = None
                    ) -> tuple[int, str, int, int]:
    """The shared sidebar settings of the explain and contrast pages, kept in the URL:
    (n concepts, attribution method, image count, seed). Call inside ``st.sidebar``."""
    init_widget(f"{prefix}_n", int_qp("n", 4, 1, 10))
    n = st.slider("Concepts", 1, 10, key=f"{prefix}_n")
    method_q = qp("method", "deeplift")
    init_widget(f"{prefix}_method", method_q if method_q in METHODS else "deeplift")
    method = st.selectbox("Attribution method", METHODS, key=f"{prefix}_method")
    init_widget(f"{prefix}_images", int_qp("images", 500, 1, 100000))
    max_images = st.number_input(images_label, 1, 100000, step=50, key=f"{prefix}_images",
                                 help=images_help)
    init_widget(f"{prefix}_seed", int_qp("seed", 0, 0))
    seed = st.number_input("Seed", 0, 2**31 - 1, key=f"{prefix}_seed")
    set_qp(n=n, method=method, images=int(max_images), seed=int(seed))
    return int(n), method, int(max_images), int(seed)


def layer_picker(catalog: Any, *, key: str) -> str:
    """The layer to explain at, kept in the URL (``layer``). Shown only when the catalog has
    several layers (call inside ``st.sidebar``); a one-layer catalog gives its layer. A layer in
    the URL that the catalog lacks falls back to the default layer."""
    layers = list(catalog.layers)
    if len(layers) < 2:
        return str(catalog.default_layer)
    first = qp("layer")
    if first not in layers:
        first = catalog.default_layer
    init_widget(key, first)
    if st.session_state[key] not in layers:
        st.session_state[key] = first

    def label(name: str) -> str:
        tags = [f"{catalog.dim(name)} ch"]
        if name == catalog.default_layer:
            tags.append("default")
        if not catalog.nonnegative(name):
            tags.append("has negative outputs")
        return f"{name} ({', '.join(tags)})"

    layer = st.selectbox("Layer", layers, key=key, format_func=label,
                         help="The catalog's layers (deeper layers give more abstract "
                              "concepts); explanations and nearest crops use this layer")
    set_qp(layer=layer)
    return str(layer)

