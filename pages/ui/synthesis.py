"""Concepts synthesised by optimisation (method.md §10) on the Explain and Contrast pages: one
button computes an image per concept with a progress bar, stored in the workspace's result cache
(:func:`explainer.synthesis.cached_syntheses`); a later visit shows the stored images at once
(:func:`explainer.synthesis.fetch_syntheses` only reads). Each image is shown beside the concept's
nearest crops, with its alignment, and the stitched images take the prediction test."""

from __future__ import annotations

from typing import Any

import streamlit as st

from explorer_core.errors import ExplorerError

from .bench_send import send_buttons
from .errors import guard
from .pictures import crop_pic, upscale
from .progress import ProgressBar
from .widgets import class_name

CROPS_BESIDE = 4  # nearest crops shown next to each synthesised image


def synthesis_panel(ws: Any, lm: Any, explanation: Any, prefix: str) -> None:
    """The "Synthesised concepts" section of an explanation (explain or contrast)."""
    from explainer.synthesis import (
        DEFAULT_STEPS,
        cached_syntheses,
        fetch_syntheses,
        synthesis_prediction_test,
    )

    st.subheader("Synthesised concepts")
    st.caption("An image per concept, optimised so that the layer's activations align with the "
               "concept's direction (Fourier parameterisation with decorrelated colour, random "
               "jitter, scale and rotation; Olah et al. 2017). It shows what the concept responds "
               "to, where the crops can only show what the dataset holds. Alignment: cosine "
               "between the image's mean activation and the concept (1 = exactly the concept).")
    sizes = {f"crop ({lm.crop_size} px)": lm.crop_size,
             f"image ({lm.input_size} px)": lm.input_size}
    c1, c2 = st.columns([2, 1])
    label = c1.radio("Size", list(sizes), key=f"{prefix}_syn_size", horizontal=True)
    steps = c2.number_input("Steps", 8, 4000, DEFAULT_STEPS, step=32, key=f"{prefix}_syn_steps")
    options = {"size": sizes[str(label)], "steps": int(steps),
               "seed": int(explanation.params.get("seed", 0))}
    vectors = explanation.concept_vectors
    syns = None
    with guard("reading synthesised concepts"):
        syns = fetch_syntheses(lm, explanation.layer, vectors, ws.cache_dir, **options)
    if syns is None:
        if not st.button("Synthesise", key=f"{prefix}_syn_run",
                         help="Optimise one image per concept (seconds per concept on a CPU; "
                              "stored, so a later visit shows them at once)"):
            return
        with guard("synthesising the concepts"):
            prog = ProgressBar(f"Synthesising {len(vectors)} concepts")
            try:
                syns = cached_syntheses(lm, explanation.layer, vectors, ws.cache_dir,
                                        progress=prog, **options)
            finally:
                prog.done()
        if syns is None:
            return
    for con, syn in zip(explanation.concepts, syns):
        cols = st.columns([1, 1, *([1] * CROPS_BESIDE)])
        cols[0].markdown(f"**Concept {con.index + 1}**  \nalignment **{syn.alignment:.2f}**  \n"
                         f"margin {syn.margin:+.2f}"
                         + ("" if syn.margin > 0 else "  \n(nearer another concept)"))
        cols[1].image(upscale(syn.image, 96), width=96,
                      caption=f"synthesised {syn.image.shape[0]} px")
        for col, ref in zip(cols[2:], con.top_crops(False)[:CROPS_BESIDE]):
            try:
                col.image(upscale(crop_pic(ws, ref.crop_id), 96), width=96,
                          caption=f"#{ref.crop_id}")
            except ExplorerError:
                col.caption(f"#{ref.crop_id} unreadable")
                continue
            with col:  # one click to the Test bench, as under every crop
                send_buttons(ws.name, ref.crop_id,
                             key=f"{prefix}_syn_send_{con.index}_{ref.crop_id}")
    with guard("testing the synthesised concepts"):
        pt = synthesis_prediction_test(lm, syns, explanation.class_a)
        a = class_name(lm, pt.target)
        measure = f"P({a})" if pt.score == "softmax" else f"share of pixels predicted as {a}"
        verdict = (f"The stitched synthesised images are classified as **{class_name(lm, pt.predicted)}**"
                   f" ({measure} = {pt.prob_target:.3f}).")
        (st.success if pt.passed else st.error)(
            ("PASS — " if pt.passed else "FAIL — ") + verdict
            + f" {sum(s.margin > 0 for s in syns)} / {len(syns)} images align with their own "
            f"concept most; {sum(s.seconds for s in syns) / len(syns):.1f} s per concept when "
            "computed.")
