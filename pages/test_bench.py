"""Test bench: build a stitched image from any crops and see the prediction live (paper §4.3);
insert a patch into images predicted as B against a control fill (paper §6)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import streamlit as st

from explorer_core.errors import ExplorerError
from pages.ui import access, errors, pictures, resources, views, widgets
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
tab_stitch, tab_patch = st.tabs(["Stitched image", "Patch insertion"])

# ---- stitched image -------------------------------------------------------------------------
with tab_stitch:
    st.caption("Crops concatenated along the height and fed without resizing; the prediction "
               "updates as you change the crops.")
    target = widgets.class_picker("Target class", names, counts, key="tb_target", url_key="t")
    picked = st.multiselect("Crops from computed concepts", list(choices),
                            format_func=lambda c: choices.get(c, str(c)), key="tb_pick",
                            placeholder=(f"pick among {len(choices)} crops of computed concepts"
                                         if choices else "none yet: run Explain or Contrast"),
                            help="Run Explain or Contrast first to fill this list")
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
            patch_from_file,
            patch_from_region,
        )

        if source == "concept crop":
            opts = list(choices)
            cc1, cc2 = st.columns(2)
            cid = cc1.selectbox("Concept crop", opts, format_func=lambda c: choices.get(c, str(c)),
                                key="tb_patch_crop", index=None,
                                placeholder=(f"pick one of {len(opts)} concept crops" if opts
                                             else "run Explain/Contrast first, or type an id →"))
            typed_id = cc2.text_input("…or a crop id", key="tb_patch_crop_typed")
            if typed_id.strip():
                cid = _parse_ids(typed_id)[0]
            if cid is not None:
                patch = patch_from_crop(lm, cat, int(cid))
        elif source == "region of a catalog image":
            s = lm.input_size
            cc = st.columns(5)
            image_id = cc[0].number_input("Image id", 0, 10**9, 0, key="tb_region_img")
            x0 = cc[1].number_input("x0", 0, s - 1, 0, key="tb_x0")
            y0 = cc[2].number_input("y0", 0, s - 1, 0, key="tb_y0")
            x1 = cc[3].number_input("x1", 1, s, s // 3, key="tb_x1")
            y1 = cc[4].number_input("y1", 1, s, s // 3, key="tb_y1")
            st.image(pictures.with_box(pictures.image_pic(ws, int(image_id)), (x0, y0, x1, y1)),
                     width=220, caption=f"image {image_id}")
            patch = patch_from_region(lm, cat, int(image_id), (int(x0), int(y0), int(x1),
                                                               int(y1)))
        else:
            up = st.file_uploader("Patch image", type=["png", "jpg", "jpeg", "webp", "bmp"],
                                  key="tb_upload")
            if up is not None:
                with tempfile.NamedTemporaryFile(suffix=Path(up.name).suffix) as fh:
                    fh.write(up.getvalue())
                    fh.flush()
                    patch = patch_from_file(lm, fh.name)
    if patch is not None:
        st.image(pictures.upscale(pictures.to_uint8(patch), 96), width=96,
                 caption=f"patch {patch.shape[2]}x{patch.shape[1]}")
    p1, p2, p3 = st.columns(3)
    position = p1.selectbox("Position", POSITIONS, key="tb_pos")
    control = p2.selectbox("Control fill", ["mean", "black"], key="tb_control",
                           help="mean: the dataset mean colour (zeros after normalisation); "
                                "black: pixel value 0")
    n_targets = p3.slider("Target images (predicted as B)", 1, 256, 32, key="tb_n")
    if patch is None:
        st.info("Choose a patch to run the test.")
    elif st.button("Insert the patch", type="primary", key="tb_run") or \
            st.session_state.get("tb_last") == (a, b, position, control, n_targets, source):
        st.session_state["tb_last"] = (a, b, position, control, n_targets, source)
        with errors.guard("inserting the patch"):
            from explainer.faithfulness import patch_insertion

            ids_b = cat.images_predicted_as(int(b))[:n_targets]
            if not ids_b:
                raise ExplorerError(f"No images are predicted as {names[b]}; pick another "
                                    "class B")
            with st.spinner(f"Inserting into {len(ids_b)} images…"):
                res = patch_insertion(lm, cat.image_pixels(ids_b, lm), patch, int(a), int(b),
                                      position=position, control=control, image_ids=ids_b)
            runs_ui.record(ws, "patch", {
                **runs_ui.base_params(ws, None), "class_a": names[a], "class_b": names[b],
                "position": position, "control": control, "images": len(ids_b),
                "source": source, "patch": runs_ui.digest(patch)}, res,
                f"patch {names[a]} into {names[b]} · {position} · {control}")
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
