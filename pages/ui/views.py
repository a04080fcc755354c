"""Renderers shared by the pages: the prediction test's verdict, a concept's crops with their
provenance, heatmaps, and the run-or-load pattern of a long computation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import streamlit as st

from explorer_core.errors import ExplorerError

from . import bench_send, jobs
from .errors import guard
from .pictures import crop_pic, image_pic, upscale, with_box
from .resources import computed, results_store
from .state import set_qp
from .widgets import class_name

# --------------------------------------------------------------------------------------------
# shared renderers


def prediction_mark(pt: Any, lm: Any, *, container: Any = None, explanation: bool = True) -> None:
    """PASS/FAIL of a prediction test, with the stitched image and P(A). ``explanation=False``
    for crops the user picked (test bench): no verdict on an explanation then."""
    box = container or st
    a = class_name(lm, pt.target)
    pred = class_name(lm, pt.predicted)
    what = "the stitched top crops" if explanation else "the stitched crops"
    # a segmentation model's score is the share of the stitched pixels predicted as the class
    seg = getattr(pt, "score", "softmax") != "softmax"

    def score(c: str) -> str:
        return f"share of pixels predicted as {c}" if seg else f"P({c})"

    c1, c2 = box.columns([1, 4])
    c1.image(upscale(pt.stitched, 64),
             caption="stitched top-1 crops" if explanation else "stitched crops", width=72)
    if pt.passed:
        c2.success(f"PASS — {what} are classified as **{a}** "
                   f"({score(a)} = {pt.prob_target:.3f}).", icon=":material/check_circle:")
    else:
        c2.error(f"FAIL — {what} are classified as **{pred}** "
                 f"({score(pred)} = {pt.prob_predicted:.3f}), {score(a)} = "
                 f"{pt.prob_target:.3f}."
                 + (" This explanation is not to be trusted." if explanation else ""),
                 icon=":material/cancel:")
    c2.caption(f"Prediction test (paper §4.3): crops {', '.join(map(str, pt.crop_ids))}"
               + (f", target-class crops {'excluded' if pt.exclude_target else 'allowed'}."
                  if explanation else "."))


def provenance(ws: Any, lm: Any, ref: Any) -> None:
    """Where a crop comes from: the source image with the crop box, both predictions."""
    st.image(with_box(image_pic(ws, ref.image_id), ref.box),
             caption=f"image {ref.image_id}, cell ({ref.row}, {ref.col}), box {tuple(ref.box)}",
             width=220)
    crop_pred = (f"{class_name(lm, ref.crop_pred)} ({ref.crop_conf:.2f})"
                 if ref.crop_pred >= 0 else "n/a (cell mode)")
    st.markdown(f"**crop {ref.crop_id}** · similarity {ref.score:.3f}  \n"
                f"crop predicted: {crop_pred}  \n"
                f"image predicted: {class_name(lm, ref.image_pred)} ({ref.image_conf:.2f})"
                + (f"  \nlabel: {class_name(lm, ref.label)}" if ref.label is not None else ""))
    st.caption(Path(ref.path).name)


def concept_grid(ws: Any, lm: Any, explanation: Any, exclude_target: bool,
                 key_prefix: str) -> None:
    """Per concept: the m nearest crops in a grid, each with provenance in a popover and the
    buttons that send it to the Test bench (stitch list or patch)."""
    unreadable: list[str] = []
    for con in explanation.concepts:
        refs = con.top_crops(exclude_target)
        st.markdown(f"#### Concept {con.index + 1} · importance {con.importance:.0%}")
        cols = st.columns(max(1, len(refs)))
        for col, ref in zip(cols, refs):
            with col:
                try:
                    pic = upscale(crop_pic(ws, ref.crop_id), 96)
                except ExplorerError as err:  # e.g. the image folder moved since the build
                    unreadable.append(str(err))
                    st.caption(f"#{ref.crop_id} unreadable")
                    continue
                st.image(pic, width=96, caption=f"#{ref.crop_id}")
                bench_send.send_buttons(ws.name, ref.crop_id,
                                        key=f"{key_prefix}_send_{con.index}_{ref.crop_id}")
                with st.popover("where from"):
                    with guard("showing where the crop comes from"):
                        provenance(ws, lm, ref)
        if not refs:
            st.warning("No crops found for this concept (the crop bank may be empty after "
                       "excluding the target class).")
    if unreadable:
        st.error(f"{len(unreadable)} crops could not be drawn: {unreadable[0]}. The workspace's "
                 "images may have moved or been deleted since its catalog was built; put them "
                 "back, or create the workspace again on the Workspace page.",
                 icon=":material/broken_image:")


def run_or_load(key: tuple, prefix: str, button: str, what: str, compute: Callable[[Any], Any],
                hint: str, cached: Callable[[], Any] | None = None,
                compute_now: Callable[[], bool] | None = None, *, units: float = 0.0,
                model: str = "") -> Any:
    """The result stored under ``key``, or a run button that computes it with a progress bar.

    ``cached()`` looks the result up in the workspace's result cache (a precompute, an earlier
    run) and computes nothing: a hit is shown at once, without the button. When
    ``compute_now()`` is true it computes without waiting for the button (the slow part is
    stored already, e.g. a precomputed classifier). A shared link with ``run=1`` computes on
    its first visit. ``compute(progress)`` is the explainer call; the progress (with a Cancel
    button) shows under the button, with an estimate before starting when a job over ``units``
    images of ``model`` finished on this server before.

    While there is no result for ``key``: the previous result of this page (same workspace,
    other settings) is returned greyed with a note, until the new one exists; without one the
    page stops with ``hint``."""
    result = results_store().get(key)
    if result is None and cached is not None:
        with guard("reading the stored result"):
            hit = cached()
            if hit is not None:
                result = results_store().put(key, hit)
    now = False
    if result is None and compute_now is not None:
        with guard("reading the stored classifier"):
            now = bool(compute_now())
    run_slot = st.empty()
    job_key = f"{prefix}_job"
    if result is None and jobs.was_cancelled(job_key):
        st.warning(f"Cancelled {what}; press **{button}** to start again (parts already "
                   "computed are cached and reused).", icon=":material/cancel:")
        now = False  # a cancelled job is not restarted by itself
    run = result is None and (now or run_slot.button(button, type="primary",
                                                     key=f"{prefix}_run"))
    first_visit = f"{prefix}_seen" not in st.session_state
    st.session_state[f"{prefix}_seen"] = True
    auto = first_visit and st.query_params.get("run") == "1"  # a shared link of a computed view
    if result is None and not (run or auto):
        guess = jobs.estimate(prefix, model, units) if units else None
        if guess:
            st.caption(f":material/schedule: {button}: {guess}")
    if result is None and (run or auto):
        with guard(what):
            job = jobs.Job(what[:1].upper() + what[1:], job_key, kind=prefix, model=model,
                           units=units)
            try:
                result = computed(key, lambda: compute(job))
                job.finished()
            finally:
                job.done()  # also after an error or a cancel: no empty bar stays behind
            run_slot.empty()
    last_key = f"{prefix}_last_key"
    if result is None:
        set_qp(run=None)
        prev_key = st.session_state.get(last_key)
        prev = (results_store().get(prev_key) if prev_key is not None and prev_key != key
                and tuple(prev_key[:3]) == tuple(key[:3]) else None)
        if prev is None or prev_key is None:
            st.info(hint)
            st.stop()
        _stale_note(stale_description(tuple(prev_key), key), button)
        return prev
    st.session_state[last_key] = key
    set_qp(run=1)
    for w in getattr(result, "warnings", []):
        st.warning(w)
    return result


_PARAM_NAMES = {"explain": ("class", "n", "method", "images", "seed", "m"),
                "contrast": ("class A", "class B", "n", "method", "images", "seed", "m")}


def stale_description(prev_key: tuple, key: tuple) -> str:
    """What the previous result was computed with, where it differs from the current settings
    (keys of :func:`~pages.ui.resources.result_key`): ``n=4``, ``layer=l3, seed=1``; a class
    that differs reads ``another class``."""
    names = ("model", "layer", *_PARAM_NAMES.get(str(key[0]), ()))
    out = []
    for i, (old, new) in enumerate(zip(prev_key[3:], key[3:])):
        if old == new:
            continue
        name = names[i] if i < len(names) else f"setting {i}"
        out.append(f"another {name}" if name.startswith("class") else f"{name}={old}")
    return ", ".join(out) or "other settings"


def _stale_note(what: str, button: str) -> None:
    """Say that the shown result is the previous one, and grey its pictures and charts."""
    st.caption(f":material/history: Showing the previous result for {what} (greyed); press "
               f"**{button}** for the current settings.")
    st.markdown("<style>[data-testid='stMain'] [data-testid='stImage'] img,"
                "[data-testid='stMain'] .stPlotlyChart,[data-testid='stMain'] "
                "[data-testid='stAlert']{opacity:.4;filter:grayscale(1)}</style>",
                unsafe_allow_html=True)


def precomputed_caption(note: str | None) -> None:
    """Say where a result comes from when a precompute stored it (``note`` from
    :func:`explainer.precompute.precomputed_note`)."""
    if note:
        st.caption(f":material/inventory_2: {note}")
