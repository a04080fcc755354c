"""Evaluate: the paper's sweeps (Fig. 4, 11, 13, Tables 6/7) on this workspace - run one with a
progress bar, or open a finished one by name; figures, the tidy table with filters, and a link
from each row to that class's explanation."""

from __future__ import annotations

from urllib.parse import urlencode

import streamlit as st

from pages.ui import access, errors, resources, state
from pages.ui.progress import ProgressBar

access.lead_page()

st.title("Evaluate: the paper's sweeps")
ws, cat, lm = resources.context()
counts = resources.class_counts(ws)
names = lm.class_names

from explainer import sweep as sw  # noqa: E402 - after the page checks (imports torch)

st.caption("The stitched prediction test (method.md §3) over layers x concepts n x samples x "
           "attribution methods, with the CRAFT and random-crops baselines through the same "
           "search and exclusion. Sweeps are stored in the workspace (`sweeps/<name>`); "
           "`python -m explainer sweep` runs the same from the command line.")

# ---- run a new sweep --------------------------------------------------------------------------
with st.expander("Run a new sweep", expanded=not sw.list_sweeps(ws)):
    layers = list(cat.layers)
    c1, c2 = st.columns(2)
    sel_layers = c1.multiselect("Layers", layers, default=[cat.default_layer], key="ev_layers")
    sel_n = c2.multiselect("Concepts n", list(range(1, 11)), default=[1, 2, 4, 6, 8, 10],
                           key="ev_n")
    c1, c2, c3 = st.columns(3)
    sel_samples = c1.multiselect("Samples (images per class)", [25, 50, 100, 200, 500, 900],
                                 default=[500], key="ev_samples")
    sel_methods = c2.multiselect("Attribution methods (ours)", list(sw.METHODS),
                                 default=["deeplift", "grad_x_act"], key="ev_methods")
    sel_base = c3.multiselect("Baselines", list(sw.BASELINES), default=list(sw.BASELINES),
                              key="ev_baselines")
    opts = sorted((c for c, k in counts.items() if k >= 1), key=lambda c: (-counts[c], names[c]))
    c1, c2 = st.columns([3, 1])
    sel_classes = c1.multiselect("Classes (empty: a seeded choice)", opts, key="ev_classes",
                                 format_func=lambda c: f"{names[c]} ({counts.get(c, 0)} images)")
    limit = c2.number_input("How many (seeded choice)", 1, max(1, len(opts)),
                            min(8, max(1, len(opts))), key="ev_limit",
                            disabled=bool(sel_classes))
    name = st.text_input("Sweep name", "sweep-1", key="ev_name", max_chars=64,
                         help="Letters, digits, '_', '.', '-'. An existing name resumes that "
                              "sweep: its finished rows are kept")
    go = st.button("Run sweep", type="primary", key="ev_run")
    if go:
        with errors.guard("running the sweep"):
            spec = sw.SweepSpec(
                layers=tuple(sel_layers), n=tuple(sorted(int(k) for k in sel_n)),
                samples=tuple(sorted(int(s) for s in sel_samples)),
                methods=tuple(sel_methods), baselines=tuple(sel_base),
                classes=tuple(str(int(c)) for c in sel_classes) or None,
                limit=None if sel_classes else int(limit))
            spec.check()
            folder = sw.sweep_folder(ws, name)
            st.button("Cancel", key="ev_cancel",
                      help="Stops the run; the finished rows stay, and running the same name "
                           "again resumes")
            bar = ProgressBar("Sweep")
            try:
                sw.run_sweep(ws, spec, folder, device=ws.device, progress=bar)
            finally:
                bar.done()
            state.set_qp(sweep=name)
            st.session_state["ev_open"] = name

# ---- open a finished sweep --------------------------------------------------------------------
found = sw.list_sweeps(ws)
if not found:
    st.info("No sweep in this workspace yet: run one above (or with `python -m explainer "
            "sweep --workspace ... --out <workspace>/sweeps/<name>`).")
    st.stop()
wanted = state.qp("sweep")
if wanted is not None and wanted not in found:
    bad = wanted
    errors.run_guarded(lambda: sw.check_sweep_name(bad), "reading the sweep name")
    st.warning(f"No sweep named '{bad}' in workspace '{ws.name}'; showing the newest.")
    wanted = None
state.init_widget("ev_open", wanted or found[0])
if st.session_state["ev_open"] not in found:
    st.session_state["ev_open"] = found[0]
chosen = st.selectbox("Sweep", found, key="ev_open")
state.set_qp(sweep=chosen)

result = None
with errors.guard("reading the sweep"):
    result = sw.load_sweep(sw.sweep_folder(ws, chosen))
if result is None:
    st.stop()
rec = result.record
spec = rec.get("spec", {})
st.markdown(f"**{chosen}** · {rec.get('status', '?')} · {len(rec.get('classes', []))} classes · "
            f"layers {', '.join(f'`{x}`' for x in rec.get('layers', []))} · n "
            f"{spec.get('n')} · samples {spec.get('samples')} · "
            f"{', '.join(spec.get('methods', []) + spec.get('baselines', []))} · "
            f"{len(result.rows)} rows")
if not result.complete:
    st.warning("This sweep did not finish (cancelled or cut): run it again under the same name "
               "to resume.")
for w in result.warnings:
    st.caption(f":material/warning: {w}")
if not result.rows:
    st.stop()

figs = {}
with errors.guard("drawing the figures"):
    figs = sw.sweep_figures(result)
if figs:
    tabs = st.tabs([sw.FIGURES[k].split(":")[0] for k in figs])
    for tab, (key, fig) in zip(tabs, figs.items()):
        with tab:
            st.caption(sw.FIGURES[key])
            st.plotly_chart(fig, key=f"ev_fig_{key}")

# ---- the table --------------------------------------------------------------------------------
st.subheader("Results per class")
rows = result.rows
c = st.columns(4)
f_layer = c[0].multiselect("Layer", sorted({r["layer"] for r in rows}), key="ev_f_layer")
f_method = c[1].multiselect("Method", sorted({r["method"] for r in rows}), key="ev_f_method")
f_cond = c[2].multiselect("Condition", list(sw.CONDITIONS), key="ev_f_cond")
f_n = c[3].multiselect("n", sorted({r["n"] for r in rows}), key="ev_f_n")
shown = [r for r in rows
         if (not f_layer or r["layer"] in f_layer) and (not f_method or r["method"] in f_method)
         and (not f_cond or r["condition"] in f_cond) and (not f_n or r["n"] in f_n)]


def _params(r: dict) -> dict[str, str]:
    """The explain page's URL state for a row (a baseline row: ours with DeepLift)."""
    return {"ws": ws.name, "a": r["name"], "n": str(r["n"]), "layer": r["layer"],
            "method": r["method"] if r["kind"] == "ours" else "deeplift",
            "images": str(r["samples"]), "excl": str(int(r["condition"] == "excluded"))}


def _link(r: dict) -> str:
    return "/explain?" + urlencode(_params(r))


table = [{"class": r["name"], "layer": r["layer"], "n": r["n"], "samples": r["samples"],
          "method": r["method"], "condition": r["condition"], "P(target)": r["prob"],
          "hit": None if r["hit"] is None else bool(r["hit"]), "predicted": r["predicted"],
          "explanation": _link(r), "error": r["error"]} for r in shown]
st.caption(f"{len(shown)} of {len(rows)} rows. Click a row (or its 'open' link) for the "
           "class's explanation at that layer, n and samples (a baseline row: ours with "
           "DeepLift).")
picked = st.dataframe(table, key="ev_table", hide_index=True, on_select="rerun",
                      selection_mode="single-row", column_config={
                          "P(target)": st.column_config.NumberColumn(format="%.3f"),
                          "explanation": st.column_config.LinkColumn(display_text="open"),
                      })
sel = list(getattr(getattr(picked, "selection", None), "rows", []) or [])
if sel and 0 <= sel[0] < len(shown):
    r = shown[sel[0]]
    st.page_link("pages/explain.py", query_params=_params(r), icon=":material/extension:",
                 label=f"Explain {r['name']} at `{r['layer']}`, n = {r['n']}, "
                       f"{r['samples']} images ({r['condition']})")
