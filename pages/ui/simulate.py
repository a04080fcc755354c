"""Simulated participants on the Study page (issue 12, item 6): run the study's trials with
machine participants (:mod:`study.simulate`) and show their expected accuracy beside the human
results, per class, with the shuffled control, chance and the ambiguous trials."""

from __future__ import annotations

from typing import Any

import streamlit as st

from .errors import guard
from .progress import ProgressBar

LITE2 = "efficientnet_lite2"


def observer_options(lm: Any, catalog: Any) -> list[str]:
    """Observer texts offered (see :func:`study.simulate.parse_observer`): the default
    observers first, then the catalog's layers and the model's top-level spatial layers."""
    from study.simulate import default_observers

    opts = [o.layer if not o.model else o.model
            for o in default_observers(lm, catalog.default_layer)]
    top = [info.name for info in lm.candidate_layers()
           if info.nonnegative and "." not in info.name]
    for name in [*catalog.layers, *top, LITE2]:
        if name not in opts:
            opts.append(name)
    return opts


def _label(text: str) -> str:
    return f"{text} (another model)" if text == LITE2 or "@" in text else f"this model · {text}"


def _pct(x: float) -> str:
    return "–" if x != x else f"{x:.1%}"


def simulate_panel(ws: Any, cat: Any, lm: Any, study: Any, human: Any) -> None:
    """The "Simulated participants" section for ``study``; ``human`` its
    :class:`~study.intruder.StudyResults` (shown beside the machines' per class)."""
    from study.simulate import DEFAULT_MARGIN, parse_observer, simulate_study, simulation_csv

    st.subheader("Simulated participants")
    st.caption("Before recruiting people: machine participants answer the study's trials, "
               "each picking the crop least similar (cosine) to the other four in another "
               "embedding — this model at another layer, or another model (EfficientNet-Lite2, "
               "crops resized to its input). The shuffled control gives the same machines "
               "trials whose crops were reassigned to concepts at random: it should sit at "
               "chance (20 %). A trial is *ambiguous* when an observer's margin is small or "
               "the observers disagree.")
    opts = observer_options(lm, cat)
    default = opts[:1]
    c = st.columns([3, 1, 1])
    picked = c[0].multiselect("Machine participants", opts, default=default, key="st_sim_obs",
                              format_func=_label,
                              help="Loading EfficientNet-Lite2 takes a few seconds the first "
                                   "time (its weights ship with the package, offline)")
    other = st.text_input("Another observer (optional)", key="st_sim_other",
                          placeholder="a layer, e.g. layer3, or a model, e.g. "
                                      "efficientnet_lite1@blocks.5")
    n_trials = c[1].number_input("Trials", 10, 20000, 500, step=100, key="st_sim_trials")
    margin = c[2].number_input("Ambiguous below", 0.0, 1.0, DEFAULT_MARGIN, step=0.01,
                               format="%.3f", key="st_sim_margin",
                               help="Margin of the chosen crop's oddness over the runner-up's "
                                    "(cosine units)")
    skey = f"st_sim_result_{study.study_id}"
    if st.button("Run the simulated participants", key="st_sim_run", icon=":material/smart_toy:"):
        with guard("running the simulated participants"):
            observers = [parse_observer(t, lm) for t in picked]
            if other.strip():
                observers.append(parse_observer(other, lm))
            bar = ProgressBar("Simulated participants")
            try:
                st.session_state[skey] = simulate_study(
                    study, cat, lm, observers, n_trials=int(n_trials), seed=int(study.seed),
                    margin=float(margin), device=str(getattr(lm, "device", "cpu")),
                    class_names=lm.class_names, progress=bar)
            finally:
                bar.done()
    sim = st.session_state.get(skey)
    if sim is None:
        st.info("Press **Run the simulated participants** to see the accuracy to expect.",
                icon=":material/smart_toy:")
        return
    _show(sim, human, simulation_csv, lm.class_names)
    with guard("showing an ambiguous trial"):
        _ambiguous_trial(ws, cat, lm, sim)


def _show(sim: Any, human: Any, to_csv: Any, names: Any) -> None:
    cols = st.columns(max(1, len(sim.results)) + 1)
    h = human.overall
    cols[0].metric("Humans", _pct(h.accuracy) if h.n else "–",
                   help=f"{h.n} answers" if h.n else "No answers yet")
    for col, r in zip(cols[1:], sim.results):
        col.metric(f"Simulated · {r.observer.label}", _pct(r.overall.accuracy),
                   delta=f"shuffled {_pct(r.shuffled.accuracy)}", delta_color="off",
                   delta_arrow="off",
                   help=f"{r.overall.n} trials, 95 % CI {_pct(r.overall.ci_low)} – "
                        f"{_pct(r.overall.ci_high)}; chance {sim.chance:.0%}; "
                        f"{r.seconds:.1f} s")
    st.caption(f"Chance: {sim.chance:.0%} (1 of 5). {sim.n_ambiguous} of {len(sim.trials)} "
               f"trials ambiguous (margin < {sim.margin:g} or the observers disagree); "
               f"{sim.seconds:.1f} s.")
    human_by = {s.label: s for s in human.per_class}
    rows = []
    for i, stat in enumerate(sim.results[0].per_class):
        row: dict[str, Any] = {"class": stat.label}
        hs = human_by.get(stat.label)
        row["humans"] = round(hs.accuracy, 4) if hs is not None and hs.n else None
        row["human answers"] = hs.n if hs is not None else 0
        for r in sim.results:
            row[r.observer.label] = round(r.per_class[i].accuracy, 4)
        rows.append(row)
    pct = st.column_config.NumberColumn(format="percent")
    st.markdown("**Accuracy per class: humans beside the machines**")
    st.dataframe(rows, hide_index=True, key="st_sim_pc",
                 column_config={k: pct for k in rows[0] if k not in ("class", "human answers")}
                 if rows else None)
    with st.expander(f"Per concept and the {sim.n_ambiguous} ambiguous trials"):
        st.dataframe([{"concept": s.label, **{r.observer.label: round(r.per_concept[j].accuracy,
                                                                      4)
                                              for r in sim.results}, "trials": s.n}
                      for j, s in enumerate(sim.results[0].per_concept)],
                     hide_index=True, key="st_sim_concepts")
        amb = [{"trial": t.trial.index + 1, "class": names[t.trial.class_idx],
                "concept": t.trial.concept + 1, "intruder concept": t.trial.intruder_concept + 1,
                "intruder at": t.trial.intruder_position + 1,
                "chosen": ", ".join(str(c + 1) for c in t.choices), "why": t.reason}
               for t in sim.trials if t.ambiguous]
        st.dataframe(amb[:200], hide_index=True, key="st_sim_amb")
        st.download_button("Download the simulated trials (CSV)", to_csv(sim),
                           file_name=f"study_{sim.study_id}_simulated.csv", mime="text/csv",
                           key="st_sim_csv")


def _ambiguous_trial(ws: Any, cat: Any, lm: Any, sim: Any) -> None:
    """One ambiguous trial's five crops, the intruder and each machine's choice marked."""
    from .atlas import show_crop

    amb = [t for t in sim.trials if t.ambiguous]
    if not amb:
        return
    by_index = {t.trial.index + 1: t for t in amb}
    pick = st.selectbox("See an ambiguous trial", list(by_index)[:500], key="st_sim_pick",
                        format_func=lambda i: f"trial {i} · {lm.class_names[by_index[i].trial.class_idx]}"
                                              f" · {by_index[i].reason}")
    t = by_index[int(pick)]
    labels = [r.observer.label for r in sim.results]
    cols = st.columns(len(t.trial.crop_ids))
    for j, (col, ref) in enumerate(zip(cols, cat.crop_refs(list(t.trial.crop_ids)))):
        with col:
            show_crop(ws, lm, ref, key=f"st_sim_trial_{j}")
            marks = (["**intruder**"] if j == t.trial.intruder_position else []) + [
                f"chosen by {lab}" for lab, ch in zip(labels, t.choices) if ch == j]
            st.markdown("  \n".join(marks) or " ")
