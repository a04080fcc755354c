"""Concept heatmaps that read: a colour scale with its colour bar, an opacity slider, one concept
chosen and highlighted in every source image (the others dimmed, the images ordered by its
strength), a larger view of one image, and per concept its crops beside the source images where
its heatmap is strongest. The pictures come from :mod:`explainer.heatmap`."""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st

from explorer_core.errors import ExplorerError

from .pictures import crop_pic, image_pic, upscale

_ALL = -1


def heatmap_view(ws: Any, explanation: Any, prefix: str) -> None:
    """The heatmap panel of an explanation (keys start with ``prefix``)."""
    from explainer import heatmap as hmap

    hm = np.asarray(explanation.heatmaps)
    ids = list(explanation.image_ids)
    if hm.ndim != 4 or hm.size == 0 or not ids:
        st.info("This explanation has no heatmaps.")
        return
    n = hm.shape[1]
    scales = hmap.concept_scales(hm)
    c1, c2, c3 = st.columns(3)
    concept = c1.selectbox("Highlight a concept", [_ALL, *range(n)], key=f"{prefix}_hm_concept",
                           format_func=lambda c: "all concepts" if c == _ALL else f"concept {c + 1}",
                           help="The chosen concept is drawn in every source image, the others "
                                "dimmed; the images are ordered by its strength")
    opacity = c2.slider("Heatmap opacity", 0.0, 1.0, 0.6, 0.05, key=f"{prefix}_hm_opacity")
    k = c3.slider("Source images", 1, max(1, min(24, len(ids))), min(4, len(ids)),
                  key=f"{prefix}_hm_n")
    st.image(hmap.colorbar(256, 12), width=256,
             caption="colour scale: 0 (dark) → full strength (bright yellow) = the concept's "
                     "99.5th percentile over the source images")
    if concept == _ALL:
        order = list(range(len(ids)))[:k]
    else:
        ranked = {i: r for r, (i, _) in enumerate(hmap.strongest_images(hm, ids, concept,
                                                                          len(ids)))}
        order = sorted(range(len(ids)), key=lambda j: ranked[ids[j]])[:k]
    head = st.columns(n + 1)
    head[0].markdown("**image**")
    for c in range(n):
        mark = "**" if concept in (_ALL, c) else ""
        head[c + 1].markdown(f"{mark}concept {c + 1}{mark}  \nscale {scales[c]:.3g}")
    for j in order:
        img = image_pic(ws, ids[j])
        cols = st.columns(n + 1)
        cols[0].image(upscale(img, 128), width=128, caption=f"image {ids[j]}")
        for c in range(n):
            peak = float(hm[j, c].max())
            cols[c + 1].image(hmap.overlay(img, hm[j, c], float(scales[c]), opacity,
                                           dim=concept not in (_ALL, c), size=128),
                              width=128, caption=f"max {peak:.2f}")
    st.markdown("##### Larger view")
    l1, l2 = st.columns([1, 3])
    big = l1.selectbox("Image", [ids[j] for j in order], key=f"{prefix}_hm_big",
                       format_func=lambda i: f"image {i}")
    j = ids.index(int(big))
    shown = [concept] if concept != _ALL else list(range(n))
    l1.markdown("\n".join(f"- concept {c + 1}: max {float(hm[j, c].max()):.3f}"
                          for c in range(n)))
    img = image_pic(ws, int(big))
    l2.image([hmap.overlay(img, hm[j, c], float(scales[c]), opacity, size=384) for c in shown],
             width=384 if len(shown) == 1 else 256,
             caption=[f"image {big} · concept {c + 1}" for c in shown])
    focus = concept if concept != _ALL else int(np.argmax(hm[j].reshape(n, -1).max(axis=1)))
    l2.plotly_chart(hover_figure(img, hm[j], scales, focus, opacity), key=f"{prefix}_hm_hover")
    l2.caption(f"Hover: every concept's strength at that place (layer cell); colour: concept "
               f"{focus + 1}" + (" (the strongest here)" if concept == _ALL else ""))
    strongest_panel(ws, explanation, prefix, concept)


def hover_figure(img: np.ndarray, heat: np.ndarray, scales: np.ndarray, concept: int,
                 opacity: float) -> Any:
    """A plotly figure: the image with concept ``concept``'s heatmap ``heat[concept]`` over it
    (``heat``: ``(n, h, w)`` of one image, one colour scale per concept); hovering a layer cell
    shows the strength of every concept there."""
    import plotly.graph_objects as go

    from explainer.heatmap import COLORMAP

    n, h, w = heat.shape
    H, W = img.shape[:2]
    anchors = np.linspace(0, 255, 9).astype(int)
    scale = [[float(a) / 255, "rgb({},{},{})".format(*COLORMAP[a])] for a in anchors]
    hover = "<br>".join(f"concept {k + 1}: %{{customdata[{k}]:.3f}}" for k in range(n))
    fig = go.Figure(go.Image(z=img, hoverinfo="skip"))
    fig.add_trace(go.Heatmap(
        z=np.clip(heat[concept] / float(scales[concept]), 0, 1), zmin=0, zmax=1,
        x=(np.arange(w) + 0.5) * W / w, y=(np.arange(h) + 0.5) * H / h,
        customdata=np.moveaxis(heat, 0, -1), hovertemplate=hover + "<extra></extra>",
        colorscale=scale, opacity=max(opacity, 0.05),
        colorbar=dict(title=dict(text=f"concept {concept + 1}<br>/ its scale"))))
    fig.update_layout(height=420, width=460, margin=dict(l=0, r=0, t=10, b=0))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def strongest_panel(ws: Any, explanation: Any, prefix: str, concept: int = _ALL) -> None:
    """Per concept: its top crops, then the source images where its heatmap is strongest
    (ranked, with the maximum strength)."""
    from explainer import heatmap as hmap

    hm = np.asarray(explanation.heatmaps)
    ids = list(explanation.image_ids)
    st.markdown("##### Where each concept is strongest")
    for con in explanation.concepts:
        if concept not in (_ALL, con.index) or con.index >= hm.shape[1]:
            continue
        top = hmap.strongest_images(hm, ids, con.index, 6)
        st.markdown(f"**Concept {con.index + 1}**: its crops, then the source images ranked by "
                    "the concept's maximum strength")
        pics, caps = [], []
        for ref in con.crops[:4]:
            try:
                pics.append(upscale(crop_pic(ws, ref.crop_id), 64))
                caps.append(f"crop #{ref.crop_id}")
            except ExplorerError:
                continue
        for rank, (image_id, peak) in enumerate(top):
            pics.append(upscale(image_pic(ws, image_id), 96))
            caps.append(f"{rank + 1}. image {image_id} · max {peak:.2f}")
        st.image(pics, width=96, caption=caps)
