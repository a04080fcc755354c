"""Test bench: build a stitched image from any crops and see the prediction live (paper §4.3);
insert a patch into images predicted as B against a control fill (paper §6)."""

from __future__ import annotations

import re

import numpy as np
import streamlit as st

from explorer_core.errors import ExplorerError
from pages.ui import access, bench_send, errors, pictures, resources, state, views, widgets
from pages.ui import runs as runs_ui

access.lead_page()

st.title("Test bench")
ws, cat, lm = resources.context()
counts = resources.class_counts(ws)
names = lm.class_names
# what the tests read: a classifier's softmax P(A), a segmenter's share of pixels predicted as A
score = widgets.score_label


def _concept_crop_choices() -> dict[int, str]:
    """Crop ids of the concepts computed in this server (explain/contrast pages), labelled."""
    out: dict[int, str] = {}
    for key in resources.results_store().keys():
        if key[0] not in ("explain", "contrast") or key[1:3] != resources.catalog_key(ws):
            continue
        exp = resources.results_store().get(key)
        if exp is None or not hasattr(exp, "concepts"):
            continue
        tag = names[exp.class_a] + (f" vs {names[exp.class_b]}" if exp.class_b is not None
                                    else "")
        for con in exp.concepts:
            for excl in (False, True):
                for r, ref in enumerate(con.top_crops(excl)):
                    out.setdefault(ref.crop_id, f"{ref.crop_id} · {tag} · concept "
                                                f"{con.index + 1} #{r + 1}"
                                                f"{' (excl.)' if excl else ''}")
    return out


def _parse_ids(text: str) -> list[int]:
    toks = [t for t in re.split(r"[\s,;]+", text.strip()) if t]
    bad = [t for t in toks if not t.isdigit()]
    if bad:
        raise ExplorerError(f"Crop ids must be whole numbers separated by commas; "
                            f"not understood: {', '.join(bad[:5])}")
    return [int(t) for t in toks]


choices = _concept_crop_choices()
sent = bench_send.bench_state(ws.name)  # crops sent here with one click from other pages
for _cid in [*sent["stitch"], *([sent["patch"]] if sent["patch"] is not None else [])]:
    choices.setdefault(int(_cid), f"{_cid} · sent to the bench")


def _sync_stitch() -> None:
    sent["stitch"] = [int(c) for c in st.session_state.get("tb_pick", [])]


def _sync_patch() -> None:
    v = st.session_state.get("tb_patch_crop")
    sent["patch"] = int(v) if v is not None else None


def _clickable(picture: np.ndarray, key: str, drag: bool) -> None:
    """An image that reports clicks (drags with ``drag``) into ``st.session_state[key]``."""
    from streamlit_image_coordinates import streamlit_image_coordinates

    streamlit_image_coordinates(picture, key=key, click_and_drag=drag)


def _region_patch():
    """A region of a catalog image: drawn as a box on the image, refined in the fields."""
    from explainer.faithfulness import patch_from_region

    s = lm.input_size
    drawn = st.session_state.get("tb_region_draw")
    if bench_send.new_event(drawn, "tb_region_seen"):  # a box drawn on the image (below)
        box = bench_send.box_from_drag(drawn, s)
        if box is not None:
            st.session_state.update(tb_x0=box[0], tb_y0=box[1], tb_x1=box[2], tb_y1=box[3])
    for k, v in (("tb_region_img", 0), ("tb_x0", 0), ("tb_y0", 0), ("tb_x1", s // 3),
                 ("tb_y1", s // 3)):
        state.init_widget(k, v)
    cc = st.columns(5)
    image_id = cc[0].number_input("Image id", 0, 10**9, key="tb_region_img")
    x0 = cc[1].number_input("x0", 0, s, key="tb_x0")
    y0 = cc[2].number_input("y0", 0, s, key="tb_y0")
    x1 = cc[3].number_input("x1", 0, s, key="tb_x1")
    y1 = cc[4].number_input("y1", 0, s, key="tb_y1")
    box = bench_send.normalized_box(int(x0), int(y0), int(x1), int(y1), s)  # any corner order
    st.caption(f"Drag a box on image {int(image_id)} (a click: a crop-sized box there); the "
               f"fields refine it. Region {box}.")
    _clickable(pictures.upscale(pictures.with_box(pictures.image_pic(ws, int(image_id)), box),
                                288), "tb_region_draw", drag=True)
    return patch_from_region(lm, cat, int(image_id), box)


tab_stitch, tab_patch = st.tabs(["Stitched image", "Patch insertion"])

# ---- stitched image -------------------------------------------------------------------------
with tab_stitch:
    st.caption("Crops concatenated along the height and fed without resizing; the prediction "
               "updates as you change the crops.")
    # the target defaults to class A of the other tests (not to the most populated class)
    target = widgets.class_picker("Target class", names, counts, key="tb_target", url_key="t",
                                  default=widgets.parse_class(state.qp("a"), names))
    st.session_state["tb_pick"] = [c for c in sent["stitch"] if c in choices]
    picked = st.multiselect("Crops from computed concepts", list(choices),
                            format_func=lambda c: choices.get(c, str(c)), key="tb_pick",
                            on_change=_sync_stitch,
                            placeholder=(f"pick among {len(choices)} crops of computed concepts"
                                         if choices else "none yet: run Explain or Contrast"),
                            help="Run Explain or Contrast first to fill this list")
    if picked:
        st.caption(f"The stitch list (crops sent with {bench_send.STITCH} under any crop land "
                   f"here); {bench_send.PATCH} makes one the patch.")
        cols = st.columns(8)
        for j, pid in enumerate(picked):
            with cols[j % len(cols)]:
                with errors.guard("drawing a crop"):
                    st.image(pictures.upscale(pictures.crop_pic(ws, int(pid)), 64), width=64,
                             caption=f"#{pid}")
                bench_send.send_buttons(ws.name, int(pid), key=f"tb_list_{pid}")
    typed = st.text_input("…or crop ids typed (comma separated)", key="tb_typed",
                          placeholder="e.g. 12, 345, 678")
    with errors.guard("testing the stitched image"):
        ids = list(picked) + _parse_ids(typed)
        if not ids:
            st.info("Pick or type at least one crop id.")
        else:
            from explainer.faithfulness import prediction_test

            pt = prediction_test(lm, cat, ids, int(target), exclude_target=False)
            runs_ui.record(ws, "stitch", {**runs_ui.base_params(ws, None), "target": names[target],
                                          "crop_ids": ids}, pt,
                           f"stitch {names[target]} · crops {', '.join(map(str, ids[:6]))}")
            views.prediction_mark(pt, lm, explanation=False)
            probs_row = {"predicted": names[pt.predicted],
                         score(lm, "predicted" if not widgets.is_segmentation(lm)
                               else f"{names[pt.predicted]} (predicted)"): pt.prob_predicted,
                         score(lm, names[target]): pt.prob_target}
            st.dataframe([probs_row], hide_index=True)

# ---- patch insertion ------------------------------------------------------------------------
with tab_patch:
    st.caption("Paste a patch into images predicted as B and compare the predictions of A and B "
               "before, after, and with a neutral control fill of the same area.")
    c1, c2 = st.columns(2)
    a = widgets.class_picker("Class A (the patch should push towards)", names, counts,
                         key="tb_a", url_key="a", container=c1)
    b = widgets.class_picker("Class B (images predicted as)", names, counts, key="tb_b",
                         url_key="b", exclude=a, container=c2)
    source = st.radio("Patch from", ["concept crop", "region of a catalog image",
                                     "uploaded image"], horizontal=True, key="tb_source")
    patch = None
    with errors.guard("making the patch"):
        from explainer.faithfulness import (
            POSITIONS,
            patch_from_crop,
        )

        if source == "concept crop":
            opts = list(choices)
            cc1, cc2 = st.columns(2)
            if sent["patch"] in choices:
                st.session_state["tb_patch_crop"] = sent["patch"]
            cid = cc1.selectbox("Concept crop", opts, format_func=lambda c: choices.get(c, str(c)),
                                key="tb_patch_crop", index=None, on_change=_sync_patch,
                                placeholder=(f"pick one of {len(opts)} concept crops" if opts
                                             else "run Explain/Contrast first, or type an id →"))
            typed_id = cc2.text_input("…or a crop id", key="tb_patch_crop_typed")
            if typed_id.strip():
                cid = _parse_ids(typed_id)[0]
            if cid is not None:
                patch = patch_from_crop(lm, cat, int(cid))
        elif source == "region of a catalog image":
            patch = _region_patch()
        else:
            up = st.file_uploader("Patch image", type=["png", "jpg", "jpeg", "webp", "bmp"],
                                  key="tb_upload")
            if up is not None:  # errors name the user's file, not a temporary copy
                patch = bench_send.patch_from_upload(lm, up.name, up.getvalue())
    tiled = st.radio("Patch size", ["1x", "2x (tiled 2x2)"], horizontal=True, key="tb_tile",
                     # 2x on the classifier demo: its 32 px crop alone moves P(lupo) little
                     index=1 if resources.is_embedded(ws.name)
                     and not widgets.is_segmentation(lm) else 0,
                     help="2x repeats the patch 2x2 (twice the side, the same texture). On the "
                          "demo a 32 px grass crop moves P(lupo) by about +0.02, tiled 2x2 by "
                          "about +0.15 (README)")
    if patch is not None and tiled.startswith("2x"):
        from explainer.faithfulness import tile_patch

        if 2 * max(patch.shape[1], patch.shape[2]) <= lm.input_size:
            patch = tile_patch(patch, 2)
        else:
            st.caption("The patch is too large to tile 2x2; it is used as is.")
    if patch is not None:
        st.image(pictures.upscale(pictures.to_uint8(patch), 96), width=96,
                 caption=f"patch {patch.shape[2]}x{patch.shape[1]}")
    at_xy = "at x, y (click the preview)"
    if patch is not None:  # a click on the preview (below) places the patch there
        clicked = st.session_state.get("tb_place")
        if bench_send.new_event(clicked, "tb_place_seen"):
            xy = bench_send.position_from_click(clicked, lm.input_size, int(patch.shape[2]),
                                                int(patch.shape[1]))
            if xy is not None:
                st.session_state.update(tb_pos=at_xy, tb_px=xy[0], tb_py=xy[1])
    p1, p2, p3 = st.columns(3)
    position = p1.selectbox("Position", [*POSITIONS, at_xy], key="tb_pos")
    control = p2.selectbox("Control fill", ["mean", "black"], key="tb_control",
                           help="mean: the dataset mean colour (zeros after normalisation); "
                                "black: pixel value 0")
    n_targets = p3.slider("Target images (predicted as B)", 1, 256, 32, key="tb_n")
    where: str | tuple[int, int] = position
    if position == at_xy:
        state.init_widget("tb_px", 0)
        state.init_widget("tb_py", 0)
        q1, q2 = st.columns(2)
        where = (int(q1.number_input("x (left)", 0, lm.input_size, key="tb_px")),
                 int(q2.number_input("y (top)", 0, lm.input_size, key="tb_py")))
        if patch is not None:  # a larger patch than when clicked: kept inside the image
            fit = (min(where[0], lm.input_size - int(patch.shape[2])),
                   min(where[1], lm.input_size - int(patch.shape[1])))
            if fit != where:
                st.caption(f"Moved to {fit} so that the {patch.shape[2]}x{patch.shape[1]} "
                           "patch stays inside the image.")
                where = (max(0, fit[0]), max(0, fit[1]))
    preview_ids = cat.images_predicted_as(int(b))[:1]
    if patch is not None and preview_ids:
        with errors.guard("drawing the preview"):
            from explainer.faithfulness import patch_box

            pb = patch_box(lm.input_size, int(patch.shape[1]), int(patch.shape[2]), where)
            pic = pictures.image_pic(ws, int(preview_ids[0])).copy()
            pic[pb[1]:pb[3], pb[0]:pb[2]] = pictures.to_uint8(patch)
            st.caption(f"Preview on image {preview_ids[0]} (predicted as {names[b]}): click "
                       f"where the patch goes. Box {pb}.")
            _clickable(pictures.upscale(pictures.with_box(pic, pb), 288), "tb_place",
                       drag=False)
    if patch is None:
        st.info("Choose a patch to run the test.")
    elif st.button("Insert the patch", type="primary", key="tb_run") or \
            st.session_state.get("tb_last") == (a, b, where, control, n_targets, source, tiled):
        st.session_state["tb_last"] = (a, b, where, control, n_targets, source, tiled)
        with errors.guard("inserting the patch"):
            from explainer.faithfulness import patch_insertion

            ids_b = cat.images_predicted_as(int(b))[:n_targets]
            if not ids_b:
                raise ExplorerError(f"No images are predicted as {names[b]}; pick another "
                                    "class B")
            with st.spinner(f"Inserting into {len(ids_b)} images…"):
                res = patch_insertion(lm, cat.image_pixels(ids_b, lm), patch, int(a), int(b),
                                      position=where, control=control, image_ids=ids_b)
            runs_ui.record(ws, "patch", {
                **runs_ui.base_params(ws, None), "class_a": names[a], "class_b": names[b],
                "position": where, "control": control, "images": len(ids_b),
                "source": source, "patch": runs_ui.digest(patch)}, res,
                f"patch {names[a]} into {names[b]} · {where} · {control}")
            m = st.columns(3)
            delta = widgets.delta_label
            m[0].metric(f"mean {delta(lm, names[a])} patch", f"{res.mean_delta_a:+.3f}")
            m[1].metric(f"mean {delta(lm, names[a])} control", f"{res.mean_control_delta_a:+.3f}")
            m[2].metric(f"mean {delta(lm, names[b])} patch", f"{res.mean_delta_b:+.3f}")
            import plotly.graph_objects as go

            fig = go.Figure()
            for label, va, vb in (("before", res.prob_a_before, res.prob_b_before),
                                  ("after patch", res.prob_a_after, res.prob_b_after),
                                  (f"control ({control})", res.prob_a_control,
                                   res.prob_b_control)):
                fig.add_trace(go.Bar(name=label, x=[f"{score(lm, 'A')} {names[a]}",
                                                    f"{score(lm, 'B')} {names[b]}"],
                                     y=[float(np.mean(va)), float(np.mean(vb))]))
            fig.update_layout(barmode="group", yaxis_range=[0, 1], height=300,
                              title="Mean predictions", margin=dict(l=10, r=10, t=40, b=10))
            st.plotly_chart(fig, key="tb_bars")
            fig2 = go.Figure(go.Bar(x=[str(i) for i in res.image_ids],
                                    y=res.prob_a_after - res.prob_a_before,
                                    name=f"{delta(lm, 'A')} patch"))
            fig2.add_trace(go.Bar(x=[str(i) for i in res.image_ids],
                                  y=res.prob_a_control - res.prob_a_before,
                                  name=f"{delta(lm, 'A')} control"))
            fig2.update_xaxes(type="category")  # image ids are names: no numeric gaps
            fig2.update_layout(barmode="group", height=280,
                               title=f"Per image {delta(lm, 'A')}",
                               xaxis_title="image id", margin=dict(l=10, r=10, t=40, b=10))
            st.plotly_chart(fig2, key="tb_bars_img")
            sa, sb = score(lm, "A"), score(lm, "B")
            st.dataframe([{"image": i, f"{sa} before": float(res.prob_a_before[j]),
                           f"{sa} after": float(res.prob_a_after[j]),
                           f"{sa} control": float(res.prob_a_control[j]),
                           f"{sb} before": float(res.prob_b_before[j]),
                           f"{sb} after": float(res.prob_b_after[j]),
                           f"{sb} control": float(res.prob_b_control[j])}
                          for j, i in enumerate(res.image_ids)], hide_index=True,
                         key="tb_table")
