"""The run history in the pages: keep a result once it is there (one call per page), the export
buttons, and the side-by-side view of two runs (the Runs page). The storage is
:mod:`explainer.runs`; the files exported are :mod:`explainer.export`'s."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import streamlit as st

from explorer_core.errors import ExplorerError

from .errors import guard, log
from .pictures import crop_pic, upscale
from .resources import catalog_key
from .widgets import class_name, score_short

_SEEN = "_runs_recorded"  # session state: {run key: run id} recorded by this browser session


def history(ws: Any) -> Any:
    from explainer.runs import RunHistory

    return RunHistory(ws.root)


def base_params(ws: Any, layer: str | None) -> dict[str, Any]:
    """The parameters every run shares: model, layer and the catalog version it read."""
    return {"model": ws.model, "layer": layer or ws.layer, "catalog": catalog_key(ws)[1]}


def digest(arr: Any) -> str:
    """A short digest of an array's values (e.g. a patch: two runs with other patches differ)."""
    import hashlib

    a = np.ascontiguousarray(arr.detach().cpu().numpy() if hasattr(arr, "detach") else arr)
    return hashlib.sha256(a.tobytes() + str(a.shape).encode()).hexdigest()[:16]


def record(ws: Any, kind: str, params: Mapping[str, Any], result: Any, title: str) -> int | None:
    """Keep ``result`` in the run history; once per distinct result and browser session (the
    page script reruns on every click: a rerun with the same result touches no file). Returns
    the run id, or None when it could not be kept (a caption says why; the page goes on)."""
    from explainer.runs import run_key

    seen: dict[str, int] = st.session_state.setdefault(_SEEN, {})
    key = f"{ws.root}\n{run_key(kind, params)}"
    if key in seen:
        return seen[key]
    try:
        run, _new = history(ws).record(kind, params, result, title=title)
    except ExplorerError as err:
        st.caption(f":material/history: Not kept in the run history: {err}")
        return None
    except Exception:  # noqa: BLE001 - the result is shown anyway; details in the log
        log.exception("recording a %s run", kind)
        st.caption(":material/history: Not kept in the run history (an unexpected error; see "
                   "the server log).")
        return None
    seen[key] = run.id
    return run.id


def forget(run_id: int) -> None:
    """Drop a deleted run from this session's record, so the result is kept again when it is
    shown next (a new run)."""
    seen: dict[str, int] = st.session_state.get(_SEEN, {})
    for k in [k for k, v in seen.items() if v == run_id]:
        del seen[k]


def _deferred(make: Callable[[], bytes | str], what: str) -> Callable[[], bytes | str]:
    """Build the file only when the button is pressed; an error gives a short text file that
    says what went wrong instead of a broken download."""
    def build() -> bytes | str:
        try:
            return make()
        except ExplorerError as err:
            return f"The {what} could not be written: {err}\n"
        except Exception as exc:  # noqa: BLE001
            log.exception("exporting %s", what)
            return f"The {what} could not be written ({type(exc).__name__}: {exc}); see the " \
                   "server log.\n"
    return build


def export_buttons(lm: Any, cat: Any, result: Any, params: Mapping[str, Any], *, kind: str,
                   title: str, exclude_target: bool, key: str, container: Any = None) -> None:
    """Download buttons: the self-contained HTML report and the machine-readable files (zip)."""
    from explainer import export
    from explorer_core.results import Explanation

    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in title)[:80] or kind
    box = container or st
    c1, c2 = box.columns(2)
    if isinstance(result, Explanation):
        def html() -> str:
            return export.explanation_html(result, lm, cat, params=params, title=title,
                                           exclude_target=exclude_target)

        def zipped() -> bytes:
            return export.explanation_zip(result, lm, cat, params=params,
                                          exclude_target=exclude_target)
    else:
        def html() -> str:
            return export.result_html(kind, result, params, lm.class_names, title)

        def zipped() -> bytes:
            return export.result_zip(result, params)
    c1.download_button("HTML report", _deferred(html, "HTML report"), file_name=f"{stem}.html",
                       mime="text/html", key=f"{key}_html", on_click="ignore",
                       icon=":material/download:",
                       help="One file with the crops, heatmaps, tests and parameters; opens "
                            "offline")
    c2.download_button("Files (zip)", _deferred(zipped, "zip"), file_name=f"{stem}.zip",
                       mime="application/zip", key=f"{key}_zip", on_click="ignore",
                       icon=":material/folder_zip:",
                       help="What `python -m explainer explain --out` writes (explanation.json, "
                            "arrays.npz, summary.md, PNGs) plus parameters.json")


def keep(ws: Any, lm: Any, cat: Any, kind: str, params: Mapping[str, Any], result: Any,
         title: str, *, exclude_target: bool = False, prefix: str) -> None:
    """The pages' one-line hook: record the run and offer its export."""
    with guard("keeping the run"):
        run_id = record(ws, kind, params, result, title)
        with st.container(horizontal=True, vertical_alignment="center"):
            if run_id is not None:
                st.caption(f":material/history: run #{run_id} in the run history (Runs page)")
            export_buttons(lm, cat, result, params, kind=kind, title=title,
                           exclude_target=exclude_target, key=f"{prefix}_export")


# --------------------------------------------------------------------------------------------
# the side-by-side view


def params_table(a: Mapping[str, Any], b: Mapping[str, Any]) -> Any:
    """The two parameter sets as a table, the rows that differ highlighted."""
    import json

    import pandas as pd

    from explainer.runs import params_diff

    rows = [{"parameter": k, "left": json.dumps(va), "right": json.dumps(vb),
             "differs": "≠" if d else ""} for k, va, vb, d in params_diff(a, b)]
    df = pd.DataFrame(rows, columns=["parameter", "left", "right", "differs"])
    return df.style.apply(lambda r: ["background-color: #fff3b0" if r["differs"] else ""] * len(r),
                          axis=1)


def verdict(run: Any) -> str:
    """PASS / FAIL of a run's (first) prediction test, or '' when it has none."""
    t = run.summary.get("prediction_test") or run.summary
    return ("PASS" if t["passed"] else "FAIL") if "passed" in t else ""


def _test_line(box: Any, lm: Any, t: Mapping[str, Any] | None, tag: str) -> None:
    if not t:
        return
    a = class_name(lm, int(t["target"])) if "target" in t else "the class"
    text = (f"**{'PASS' if t['passed'] else 'FAIL'}** — prediction test, target-class crops "
            f"{tag}: {score_short(lm, a)} = {t['prob_target']:.3f}; predicted "
            f"{class_name(lm, int(t['predicted']))} ({t['prob_predicted']:.3f})")
    (box.success if t["passed"] else box.error)(text)


def show_run(ws: Any, lm: Any, run: Any, result: Any, exclude_target: bool) -> None:
    """One side: the verdicts, the concepts' crops (explain / contrast) or the test's numbers."""
    s = run.summary
    st.markdown(f"**#{run.id} · {run.title}**  \n{run.kind} · {run.created} UTC")
    if run.params.get("catalog") not in (None, catalog_key(ws)[1]):
        st.warning("The catalog was rebuilt since this run: crop ids may point at other crops "
                   "now.")
    if run.kind in ("explain", "contrast"):
        pt = s.get("prediction_test_excluded" if exclude_target else "prediction_test")
        _test_line(st, lm, pt, "excluded" if exclude_target else "allowed")
        if "classifier_accuracy" in s:
            st.caption(f"A-vs-B classifier accuracy {s['classifier_accuracy']:.1%}")
        st.caption(f"{s.get('n_concepts')} concepts from {s.get('n_images')} images; NMF "
                   f"relative error {s.get('reconstruction_error', float('nan')):.3f}")
        for k, con in enumerate(s.get("concepts", [])):
            ids = con["crops_excluded" if exclude_target else "crops"]
            st.markdown(f"Concept {k + 1} · {con['importance']:.0%}")
            pics, caps = [], []
            for cid in ids:
                try:
                    pics.append(upscale(crop_pic(ws, int(cid)), 64))
                    caps.append(f"#{cid}")
                except ExplorerError:
                    continue
            if pics:
                st.image(pics, width=56, caption=caps)
    else:
        metrics = {k: v for k, v in s.items() if isinstance(v, (int, float, bool))}
        if "passed" in s:
            (st.success if s["passed"] else st.error)("PASS" if s["passed"] else "FAIL")
        stitched = result.get("stitched") if isinstance(result, dict) else None
        if isinstance(stitched, np.ndarray) and stitched.size:
            st.image(upscale(stitched, 48), width=64, caption="stitched crops")
        st.dataframe([{"measure": k, "value": float(v)} for k, v in metrics.items()],
                     hide_index=True)
