"""The concept atlas on the Explain page (issue 12, item 2): per concept, more crops (paged
8 / 32 / 100), where its crops come from (bar chart), where else in the catalog it occurs (bar
chart and the best images outside the class) and a 2-D map of the class's crops coloured by
concept (click or box-select points to see their crops). The numbers come from
:mod:`explainer.atlas`; nothing is computed until the user switches the atlas on."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import streamlit as st

from explorer_core.errors import ExplorerError

from .bench_send import send_buttons
from .errors import guard
from .pictures import crop_pic, image_pic, upscale
from .resources import catalog_key, computed
from .views import provenance

COLS = 8
MAX_SELECTED = 16


def show_crop(ws: Any, lm: Any, ref: Any, *, key: str) -> None:
    """One crop: the picture with its id (and similarity when known), and where it comes from
    (a popover). Every crop the atlas and the simulated study show is drawn here: one place for
    per-crop actions; ``key`` is unique per crop on the page, for their widgets."""
    try:
        pic = upscale(crop_pic(ws, ref.crop_id), 96)
    except ExplorerError:  # e.g. the image folder moved since the build
        st.caption(f"#{ref.crop_id} unreadable")
        return
    score = "" if ref.score != ref.score else f" · {ref.score:.2f}"  # NaN: no score
    st.image(pic, width=96, caption=f"#{ref.crop_id}{score}")
    send_buttons(ws.name, int(ref.crop_id), key=key)
    with st.popover("where from"):
        with guard("showing where the crop comes from"):
            provenance(ws, lm, ref)


def _grid(ws: Any, lm: Any, refs: list, key: str) -> None:
    for start in range(0, len(refs), COLS):
        cols = st.columns(COLS)
        for j, (col, ref) in enumerate(zip(cols, refs[start:start + COLS])):
            with col:
                show_crop(ws, lm, ref, key=f"{key}_{start + j}")


def _vec_key(v: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(v, np.float32).tobytes()).hexdigest()[:16]


def _search(ws: Any, explanation: Any) -> Any:
    from explainer.concepts import get_context

    return get_context(ws, getattr(ws, "device", "auto"), layer=explanation.layer).search


def atlas_panel(ws: Any, cat: Any, lm: Any, explanation: Any, exclude: bool, key: str) -> None:
    """The atlas expander under a concept grid (``exclude``: the page's exclusion toggle)."""
    with st.expander("Concept atlas: more crops, where they come from, where else the concept "
                     "occurs, a map of the class's crops", icon=":material/travel_explore:"):
        on = st.toggle("Show the atlas", key=f"{key}_atlas_on",
                       help="Computed on demand: a scan of the whole catalog per concept")
        if not on:
            st.caption("Switch on to page through a concept's nearest crops beyond the first 8, "
                       "see which classes they and the images scoring highest on the concept "
                       "belong to, and map the class's crops in 2-D.")
            return
        n = explanation.n_concepts
        k = st.selectbox("Concept", list(range(n)), key=f"{key}_atlas_k",
                         format_func=lambda i: f"Concept {i + 1} · importance "
                                               f"{explanation.concepts[i].importance:.0%}")
        con = explanation.concepts[int(k)]
        more, where, map_ = st.tabs(["More crops and where they come from",
                                     "Where else it occurs", "Map of the class's crops"])
        with more:
            with guard("paging the concept's crops"):
                _more(ws, cat, lm, explanation, con, exclude, key)
        with where:
            with guard("scoring the catalog on the concept"):
                _where_else(ws, cat, lm, explanation, con, key)
        with map_:
            with guard("mapping the class's crops"):
                _map(ws, cat, lm, explanation, key)


def _more(ws: Any, cat: Any, lm: Any, explanation: Any, con: Any, exclude: bool,
          key: str) -> None:
    from explainer.atlas import MAX_RANK, PAGE_SIZES, breakdown, crops_page

    c1, c2 = st.columns([2, 1])
    size = c1.radio("Crops per page", PAGE_SIZES, horizontal=True, key=f"{key}_atlas_size")
    pages = MAX_RANK // int(size)
    pkey = f"{key}_atlas_page"
    if int(st.session_state.get(pkey, 1)) > pages:  # a larger page size has fewer pages
        st.session_state[pkey] = pages
    page = c2.number_input("Page", 1, pages, 1, key=pkey)
    excl_cls = explanation.class_a if exclude else None
    refs = crops_page(_search(ws, explanation), con.vector, int(page) - 1, int(size), excl_cls)
    first = (int(page) - 1) * int(size) + 1
    st.caption(f"Ranks {first}–{first + len(refs) - 1} by cosine similarity to concept "
               f"{con.index + 1}" + (" (target-class crops excluded)" if exclude else ""))
    if not refs:
        st.info("No more crops: the catalog has fewer crops than this page starts at.")
        return
    _grid(ws, lm, refs, f"{key}_atlas_more")
    b = breakdown(refs, lm.class_names)
    st.markdown(f"**Where these {b.n} crops come from**")
    import plotly.express as px

    fig = px.bar(b.rows(), x="class", y="crops", color="of", barmode="group",
                 labels={"of": "", "crops": "crops"})
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=10, b=10),
                      legend=dict(orientation="h", y=1.12))
    st.plotly_chart(fig, key=f"{key}_atlas_breakdown")


def _where_else(ws: Any, cat: Any, lm: Any, explanation: Any, con: Any, key: str) -> None:
    from explainer.atlas import where_else

    rkey = ("atlas_where", *catalog_key(ws), explanation.layer, explanation.class_a,
            _vec_key(con.vector))
    w = computed(rkey, lambda: where_else(cat, con.vector, layer=explanation.layer,
                                          own_class=explanation.class_a,
                                          class_names=lm.class_names))
    occ = w.occurs_in
    own = lm.class_names[explanation.class_a]
    others = [o.name for o in occ if o.class_idx != explanation.class_a]
    listed = ", ".join(others[:12]) + (f" and {len(others) - 12} more" if len(others) > 12
                                       else "")
    st.markdown(f"**Concept {con.index + 1} occurs in {len(occ)} classes**"
                + (f" — besides {own}: {listed}" if others else f" — only in {own}"))
    st.caption(f"Every crop of the catalog ({w.n_crops:,}) scored by cosine to the concept; an "
               f"image's score is its best crop's; a *hit* is an image scoring at least "
               f"{w.threshold:.3f}. Classes listed where at least {w.min_share:.0%} of the "
               f"images predicted as them are hits. {w.seconds:.2f} s.")
    import plotly.express as px

    top = w.classes[:15]
    fig = px.bar(x=[o.name for o in top], y=[o.share for o in top],
                 labels={"x": "predicted class of the image", "y": "share of images with a hit"},
                 hover_data={"images": [o.images for o in top], "hits": [o.hits for o in top],
                             "mean score": [round(o.mean_score, 3) for o in top]})
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=10, b=10), yaxis_tickformat=".0%")
    st.plotly_chart(fig, key=f"{key}_atlas_where")
    st.dataframe([{"class": o.name, "images": o.images, "hits": o.hits,
                   "share": round(o.share, 4), "mean score": round(o.mean_score, 4),
                   "best score": round(o.max_score, 4)} for o in w.classes],
                 hide_index=True, key=f"{key}_atlas_where_table",
                 column_config={"share": st.column_config.NumberColumn(format="percent")})
    if w.top_images:
        st.markdown(f"**Images outside {own} scoring highest on the concept**")
        cols = st.columns(COLS)
        for col, (image_id, score) in zip(cols, w.top_images[:COLS]):
            with col:
                try:
                    st.image(upscale(image_pic(ws, image_id), 96), width=96,
                             caption=f"image {image_id} · {score:.2f}")
                except ExplorerError:
                    st.caption(f"image {image_id} unreadable")


def _map(ws: Any, cat: Any, lm: Any, explanation: Any, key: str) -> None:
    from explainer.atlas import class_map

    rkey = ("atlas_map", *catalog_key(ws), explanation.layer, explanation.class_a,
            _vec_key(explanation.concept_vectors))
    cm = computed(rkey, lambda: class_map(cat, explanation.image_ids,
                                          explanation.concept_vectors,
                                          layer=explanation.layer))
    import plotly.graph_objects as go

    fig = go.Figure()
    traces: list[np.ndarray] = []  # per trace: the positions of its points in the map
    for k in range(explanation.n_concepts):
        sel = np.flatnonzero(cm.concept == k)
        if not len(sel):
            continue
        traces.append(sel)
        fig.add_trace(go.Scattergl(
            x=cm.xy[sel, 0].tolist(), y=cm.xy[sel, 1].tolist(), mode="markers",
            name=f"concept {k + 1}", marker=dict(size=6, opacity=0.75),
            customdata=np.stack([cm.crop_ids[sel], cm.image_ids[sel]], axis=1).tolist(),
            text=[f"{s:.2f}" for s in cm.score[sel]],
            hovertemplate="crop %{customdata[0]} · image %{customdata[1]}<br>cosine to the "
                          "concept %{text}<extra>%{fullData.name}</extra>"))
    fig.update_layout(height=460, margin=dict(l=10, r=10, t=10, b=10),
                      xaxis_title=f"PC 1 ({cm.variance[0]:.0%} of the variance)",
                      yaxis_title=f"PC 2 ({cm.variance[1]:.0%})", dragmode="select")
    name = lm.class_names[explanation.class_a]
    st.caption(f"{len(cm.crop_ids):,} crops of the {len(set(explanation.image_ids))} images of "
               f"{name} explained" + (f" (a sample of {cm.total:,})" if cm.sampled else "")
               + ", projected on their first two principal components, each coloured by the "
               "concept it is most similar to. Click a point or draw a box to see the crops.")
    event = st.plotly_chart(fig, key=f"{key}_atlas_map", on_select="rerun",
                            selection_mode=("points", "box", "lasso"))
    ids = selected_crops(event, traces, cm.crop_ids)
    if ids:
        st.markdown(f"**{len(ids)} selected crops**"
                    + (f" (the first {MAX_SELECTED})" if len(ids) > MAX_SELECTED else ""))
        pos = {int(c): i for i, c in enumerate(cm.crop_ids)}
        refs = cat.crop_refs(ids[:MAX_SELECTED], [float(cm.score[pos[c]])
                                                  for c in ids[:MAX_SELECTED]])
        _grid(ws, lm, refs, f"{key}_atlas_sel")


def selected_crops(event: Any, traces: list[np.ndarray], crop_ids: np.ndarray) -> list[int]:
    """Crop ids of the points selected in the map (``event``: what ``st.plotly_chart`` returned
    with ``on_select``), in selection order, each once. A point is found by its trace
    (``curve_number``) and its index in that trace (``point_index``), not by what the browser
    sends back as custom data."""
    try:
        points = list(event.selection.points)
    except AttributeError:  # no selection state (e.g. the chart was not interacted with)
        return []
    out: list[int] = []
    for p in points:
        if not isinstance(p, dict):
            continue
        curve, idx = p.get("curve_number"), p.get("point_index", p.get("point_number"))
        if not isinstance(curve, int) or not isinstance(idx, int):
            continue
        if 0 <= curve < len(traces) and 0 <= idx < len(traces[curve]):
            out.append(int(crop_ids[traces[curve][idx]]))
    return list(dict.fromkeys(out))
