"""Runs: the workspace's run history (every explanation, contrast and test run from the pages),
filtered, two runs side by side with their parameters compared, exported or deleted."""

from __future__ import annotations

import streamlit as st

from pages.ui import access, errors, resources
from pages.ui import runs as runs_ui

access.lead_page()

st.title("Runs")
ws, cat, lm = resources.context()
st.caption("Every explanation, contrast and test computed on the other pages is kept here, in "
           f"the workspace (`{ws.root.name}/runs.duckdb` and `runs/`), once per set of "
           "parameters.")

from explainer.runs import KINDS  # noqa: E402

hist = runs_ui.history(ws)
f1, f2 = st.columns([2, 3])
kinds = f1.multiselect("Kinds", list(KINDS), key="ru_kinds", placeholder="all kinds")
text = f2.text_input("Title contains", key="ru_text", placeholder="e.g. lupo, n=6, husko")
runs: list = []
with errors.guard("reading the run history"):
    runs = hist.list_runs(kinds=kinds or None, text=text)
if not runs:
    st.info("No runs yet" + (" match these filters" if kinds or text.strip() else "")
            + ". Explain or contrast a class, or run a test on the Test bench: each result is "
            "kept here.")
    st.stop()

st.dataframe([{"run": r.id, "kind": r.kind, "title": r.title, "created (UTC)": r.created,
               "test": runs_ui.verdict(r)} for r in runs], hide_index=True, key="ru_table")

by_id = {r.id: r for r in runs}
ids = list(by_id)


def _label(i: int) -> str:
    return f"#{i} · {by_id[i].title}"


st.subheader("Side by side")
c1, c2 = st.columns(2)
left = c1.selectbox("Left run", ids, index=0, format_func=_label, key="ru_left")
right = c2.selectbox("Right run", ids, index=min(1, len(ids) - 1), format_func=_label,
                     key="ru_right")
ra, rb = by_id[int(left)], by_id[int(right)]
st.caption("Parameters (rows that differ highlighted)")
st.dataframe(runs_ui.params_table(ra.params, rb.params), hide_index=True, key="ru_params")
d1, d2 = st.columns(2)
for col, run, side in ((d1, ra, "l"), (d2, rb, "r")):
    with col, errors.guard(f"showing run {run.id}"):
        excl = False
        if run.kind in ("explain", "contrast"):
            excl = st.toggle("Exclude target-class crops", key=f"ru_excl_{side}")
        result = hist.result(run)
        runs_ui.show_run(ws, lm, run, result, excl)
        runs_ui.export_buttons(lm, cat, result, run.params, kind=run.kind, title=run.title,
                               exclude_target=excl, key=f"ru_export_{side}")
        if st.button(f"Delete run #{run.id}", key=f"ru_del_{side}", icon=":material/delete:"):
            st.session_state["ru_confirm"] = run.id
        if st.session_state.get("ru_confirm") == run.id:
            st.warning(f"Delete run #{run.id} and its stored result? This cannot be undone.")
            if st.button("Yes, delete", key=f"ru_del_yes_{side}", type="primary"):
                hist.delete(run.id)
                runs_ui.forget(run.id)
                st.session_state.pop("ru_confirm", None)
                st.session_state.pop("ru_left", None)
                st.session_state.pop("ru_right", None)
                st.rerun()
