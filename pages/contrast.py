"""Contrast class A against class B (paper §5): the A-vs-B linear classifier, the contrasted
concepts with their prediction test, and the hyperplane shifting test (§5.2.1)."""

from __future__ import annotations

import streamlit as st

from pages.ui import access, errors, heatmaps, pictures, resources, state, synthesis, views, widgets
from pages.ui import runs as runs_ui

access.lead_page()

st.title("Contrast two classes")
ws, cat, lm = resources.context()
counts = resources.class_counts(ws)
names = lm.class_names

with st.sidebar:
    st.header("Settings")
    a = widgets.class_picker("Class A (explained)", names, counts, key="co_a", url_key="a",
                             min_images=1)
    b = widgets.class_picker("Class B (contrasted against)", names, counts, key="co_b",
                         url_key="b", exclude=a, min_images=1)
    n, method, max_images, seed = widgets.method_settings("co", "Images per class (at most)")
    layer = widgets.layer_picker(cat, key="co_layer")

key = resources.result_key("contrast", ws, int(a), int(b), int(n), method, int(max_images),
                           int(seed), 8, layer=layer)
st.markdown(f"**{names[a]}** ({counts.get(a, 0)} images) against **{names[b]}** "
            f"({counts.get(b, 0)} images) · {n} concepts · `{method}` · layer `{layer}`")


def _contrast(prog):
    from explainer.contrast import contrast_classes

    return contrast_classes(ws, int(a), int(b), n_concepts=int(n), method=method,
                            max_images=int(max_images), seed=int(seed), m=8, progress=prog,
                            cache=True, layer=layer)


def _stored():
    from explainer.precompute import cached_explanation

    return cached_explanation(ws, int(a), int(b), n_concepts=int(n), method=method,
                              max_images=int(max_images), seed=int(seed), m=8, layer=layer)


def _classifier_stored() -> bool:
    from explainer.precompute import has_precomputed_classifier

    return has_precomputed_classifier(ws, int(a), int(b), method=method,
                                      max_images=int(max_images), seed=int(seed), layer=layer)


explanation = views.run_or_load(
    key, "co", "Contrast", f"contrasting {names[a]} against {names[b]}", _contrast,
    "Press **Contrast** to train the A-vs-B classifier and compute the contrasted concepts "
    "(cached on disk; `python -m explainer precompute --pairs ...` stores classifiers of many "
    "pairs at once).", cached=_stored, compute_now=_classifier_stored,
    units=min(int(max_images), counts.get(a, 0)) + min(int(max_images), counts.get(b, 0)),
    model=ws.model)
with errors.guard("reading the precompute record"):
    from explainer.precompute import precomputed_note

    views.precomputed_caption(precomputed_note(ws, explanation))

clf = explanation.classifier
if clf is not None:
    c = st.columns(4)
    c[0].metric("Classifier accuracy", f"{clf.accuracy:.1%}",
                help="A-vs-B linear classifier on the training pixels (label 1 = A)")
    c[1].metric("Pixels A / B", f"{clf.n_pixels_a} / {clf.n_pixels_b}")
    c[2].metric("Solver", f"{clf.solver}")
    c[3].metric("Training time", f"{clf.seconds:.2f}s")

state.init_widget("co_excl", state.bool_qp("excl"))
excl = st.toggle("Exclude target-class crops", key="co_excl")
state.set_qp(excl=int(excl))
co_params = {**runs_ui.base_params(ws, layer), "class_a": names[a], "class_b": names[b],
             "n_concepts": int(n), "method": method, "max_images": int(max_images),
             "seed": int(seed), "m": 8}
runs_ui.keep(ws, lm, cat, "contrast", co_params, explanation,
             f"contrast {names[a]} vs {names[b]} · n={n} · {method} · {layer or ws.layer}",
             exclude_target=excl, prefix="co")
pt = explanation.prediction_test_excluded if excl else explanation.prediction_test
st.subheader("Prediction test of the contrasted explanation")
if pt is not None:
    views.prediction_mark(pt, lm)
st.subheader("Contrasted concepts")
views.concept_grid(ws, lm, explanation, excl, "co")
synthesis.synthesis_panel(ws, lm, explanation, "co")
if st.toggle("Show heatmaps of the contrasted concepts over the images of A", key="co_hm"):
    with errors.guard("drawing heatmaps"):
        heatmaps.heatmap_view(ws, explanation, "co")

# ---- shifting test ---------------------------------------------------------------------------
st.subheader("Shifting test")
st.caption("Images predicted as B; the layer's output becomes relu(a + t·w), w the A-vs-B normal "
           "pointing to A (paper §5.2.1). The curve shows the mean softmax of A and B per offset.")
if clf is None:
    st.info("This result has no classifier; the shifting test needs one.")
    st.stop()


@st.cache_data(show_spinner=False, max_entries=32)
def _images_b(root: str, version: str, b: int, limit: int) -> list[int]:
    return resources.catalog_for_key(root, version).images_predicted_as(int(b))[:limit]


with errors.guard("running the shifting test"):
    from explainer.faithfulness import SHIFT_OFFSETS, shift_test

    n_shift = st.slider("Images of B used", 1, 256, 64, key="co_shift_n")
    ids_b = _images_b(*resources.catalog_key(ws), int(b), int(n_shift))
    skey = ("shift", key, tuple(ids_b))
    shift = resources.results_store().get(skey)
    if shift is None:
        with st.spinner(f"Shifting {len(ids_b)} images of {names[b]} over {len(SHIFT_OFFSETS)} "
                        "offsets…"):
            pix = cat.image_pixels(ids_b, lm)
            shift = resources.results_store().put(skey, shift_test(
                lm, layer, pix, clf.weight, int(a), int(b), SHIFT_OFFSETS, image_ids=ids_b))
    runs_ui.record(ws, "shift", {**co_params, "shift_images": len(ids_b)}, shift,
                   f"shift {names[b]} → {names[a]} · {len(ids_b)} images · n={n}")
    import plotly.graph_objects as go

    xs = [f"{t:g}" for t in shift.offsets]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=xs, y=shift.mean_prob_a, mode="lines+markers",
                             name=f"{widgets.score_label(lm, names[a])} (A)"))
    fig.add_trace(go.Scatter(x=xs, y=shift.mean_prob_b, mode="lines+markers",
                             name=f"{widgets.score_label(lm, names[b])} (B)"))
    fig.update_xaxes(type="category")  # numeric-looking strings would get a linear axis
    fig.update_layout(xaxis_title="offset t (categorical)", yaxis_title=f"mean {shift.score}",
                      yaxis_range=[0, 1], height=340, margin=dict(l=10, r=10, t=30, b=10))
    st.plotly_chart(fig, key="co_shift_chart")
    m = st.columns(3)
    sa = widgets.score_short(lm, "A")
    m[0].metric(f"{sa} at t=0", f"{shift.default_prob_a:.3f}",
                help=f"mean {widgets.score_label(lm, names[a])} over the images of B")
    m[1].metric(f"max {sa}", f"{shift.max_prob_a:.3f}")
    m[2].metric("best offset", f"{shift.best_offset:g}")

    t = st.select_slider("Offset t", options=list(shift.offsets), key="co_offset",
                         value=shift.best_offset)
    sample = ids_b[:8]
    sp_key = ("shift_one", key, tuple(sample), float(t))
    per_image = resources.results_store().get(sp_key)
    if per_image is None:
        from explainer.faithfulness import shifted_probabilities

        per_image = resources.results_store().put(sp_key, shifted_probabilities(
            lm, layer, cat.image_pixels(sample, lm), clf.weight, float(t)))
    st.caption(f"The first {len(sample)} images of {names[b]} at offset t = {t:g}: "
               f"{widgets.score_label(lm, 'A')}, {widgets.score_label(lm, 'B')} and the class "
               "the model now predicts.")
    cols = st.columns(max(1, len(sample)))
    for col, image_id, p in zip(cols, sample, per_image):
        pa, pb = float(p[a]), float(p[b])
        pred = int(lm.predicted_classes(p[None])[1][0])  # a segmenter: never "background"
        col.image(pictures.upscale(pictures.image_pic(ws, image_id), 128), width="stretch",
                  caption=f"image {image_id}")
        col.markdown(f"{widgets.score_short(lm, 'A')} **{pa:.2f}**  \n"
                     f"{widgets.score_short(lm, 'B')} {pb:.2f}  \n"
                     f"predicted **{widgets.class_name(lm, pred)}**")
