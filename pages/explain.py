"""Explain one class (paper §4): its concepts as the nearest crops, heatmaps over the source
images, and the prediction test (PASS/FAIL)."""

from __future__ import annotations

import streamlit as st

from pages.ui import access, atlas, errors, heatmaps, resources, state, synthesis, views, widgets
from pages.ui import runs as runs_ui

access.lead_page()

st.title("Explain a class")
ws, cat, lm = resources.context()
counts = resources.class_counts(ws)
names = lm.class_names

with st.sidebar:
    st.header("Settings")
    cls = widgets.class_picker("Class A (type to search)", names, counts, key="ex_class",
                           url_key="a", min_images=1)
    n, method, max_images, seed = widgets.method_settings(
        "ex", "Images (at most)", "Images predicted as the class, chosen with the seed (paper: 500)")
    layer = widgets.layer_picker(cat, key="ex_layer")

key = resources.result_key("explain", ws, int(cls), int(n), method, int(max_images), int(seed),
                           8, layer=layer)
st.markdown(f"**{names[cls]}** · {counts.get(cls, 0)} images predicted as it · "
            f"{n} concepts · `{method}` · layer `{layer}`")


def _explain(prog):
    from explainer.concepts import explain_class

    return explain_class(ws, int(cls), n_concepts=int(n), method=method,
                         max_images=int(max_images), seed=int(seed), m=8, progress=prog,
                         cache=True, layer=layer)


def _stored():
    from explainer.precompute import cached_explanation

    return cached_explanation(ws, int(cls), n_concepts=int(n), method=method,
                              max_images=int(max_images), seed=int(seed), m=8, layer=layer)


explanation = views.run_or_load(
    key, "ex", "Explain", f"explaining {names[cls]}", _explain,
    "Press **Explain** to compute the concepts (results are cached on disk, so a repeated run "
    "loads instantly; `python -m explainer precompute` stores many classes at once).",
    cached=_stored, units=min(int(max_images), counts.get(cls, 0)), model=ws.model)
with errors.guard("reading the precompute record"):
    from explainer.precompute import precomputed_note

    views.precomputed_caption(precomputed_note(ws, explanation))
state.init_widget("ex_excl", state.bool_qp("excl"))
excl = st.toggle("Exclude target-class crops (crop or source image predicted as the class)",
                 key="ex_excl")
state.set_qp(excl=int(excl))
runs_ui.keep(ws, lm, cat, "explain", {
    **runs_ui.base_params(ws, layer), "class": names[cls], "n_concepts": int(n), "method": method,
    "max_images": int(max_images), "seed": int(seed), "m": 8}, explanation,
    f"explain {names[cls]} · n={n} · {method} · {layer or ws.layer}", exclude_target=excl,
    prefix="ex")

pt = explanation.prediction_test_excluded if excl else explanation.prediction_test
st.subheader("Prediction test")
if pt is not None:
    views.prediction_mark(pt, lm)
else:
    st.info("No prediction test in this result.")

st.subheader("Concepts")
st.caption(f"{explanation.n_concepts} concepts from {len(explanation.image_ids)} images; "
           f"the 8 nearest crops (cosine) per concept; NMF relative error "
           f"{explanation.reconstruction_error:.3f}"
           + (f"; {sum(explanation.timings.values()):.1f}s" if explanation.timings else ""))
views.concept_grid(ws, lm, explanation, excl, "ex")
atlas.atlas_panel(ws, cat, lm, explanation, excl, "ex")
synthesis.synthesis_panel(ws, lm, explanation, "ex")

st.subheader("Concept heatmaps over source images")
if st.toggle("Show heatmaps (NMF concept strength per pixel; ours, not the paper's)", key="ex_hm"):
    with errors.guard("drawing heatmaps"):
        heatmaps.heatmap_view(ws, explanation, "ex")
