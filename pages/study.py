"""Intruder study, the lead's side (paper App. C): create a study (concepts precomputed), hand
out participant links, watch the results (accuracy with 95 % CI, binomial test vs 20 %), export."""

from __future__ import annotations

import streamlit as st

import study as S
from pages.ui import access, errors, jobs, resources, simulate

access.lead_page()

st.title("Intruder detection study")
st.caption("A trial shows 5 crops: 4 from one concept of a class and 1 intruder from another "
           "concept of the same class; participants click the intruder. Chance is 20 %; the "
           "paper reports 77 % (4 concepts).")
if access.lead_key():
    st.caption(f":material/lock: The lead's pages are protected: `${access.LEAD_KEY_ENV}` is set on "
               "this server. Participants open only their trials through their link; a browser "
               "without the key sees a password form on every other page.")
else:
    st.warning(f"**No lead key is set.** Anyone with a participant link who edits the URL can "
               f"reach these pages, including every participant's answers. Before handing out "
               f"links, restart the server with `{access.LEAD_KEY_ENV}=<a secret>`; you then enter "
               "the key once per browser session (or open a link with `?key=<secret>`).",
               icon=":material/lock_open:")
ws, cat, lm = resources.context()
counts = resources.class_counts(ws)
names = lm.class_names
path = S.study_path(ws)

with st.expander("New study", expanded=not path.is_file()):
    opts = sorted(counts, key=lambda c: -counts[c])
    classes = st.multiselect("Classes", opts, default=opts[:min(4, len(opts))],
                             format_func=lambda c: f"{names[c]} ({counts.get(c, 0)} images)",
                             key="st_classes")
    c = st.columns(4)
    n_concepts = c[0].number_input("Concepts per class", 2, 10, 4, key="st_n")
    trials = c[1].number_input("Trials per participant", 1, 1000, 50, key="st_trials")
    seed = c[2].number_input("Seed", 0, 2**31 - 1, 0, key="st_seed")
    max_images = c[3].number_input("Images per class", 1, 100000, 500, step=50, key="st_img")
    units = sum(min(int(max_images), counts.get(c, 0)) for c in classes)
    guess = jobs.estimate("st", ws.model, units)
    if guess:
        st.caption(f":material/schedule: Creating: {guess}")
    if jobs.was_cancelled("st_job"):
        st.warning("Creating the study was cancelled; no study was stored. The classes' "
                   "explanations computed so far are cached: creating it again reuses them.",
                   icon=":material/cancel:")
    if st.button("Create the study", type="primary", key="st_create"):
        with errors.guard("creating the study"):
            job = jobs.Job("Explaining the study's classes", "st_job", kind="st",
                           model=ws.model, units=units)
            try:
                new = S.create_study(ws, classes, n_concepts=int(n_concepts),
                                     trials_per_participant=int(trials), seed=int(seed),
                                     max_images=int(max_images), progress=job)
                job.finished()
            finally:
                job.done()
            st.session_state["st_selected"] = new.study_id
            st.success(f"Study {new.study_id} created with {len(new.classes)} classes.")

with errors.guard("reading the studies"):
    studies = S.list_studies(path)
    if not studies:
        st.info("No study in this workspace yet: create one above.")
        st.stop()
    by_id = {s.study_id: s for s in studies}
    if st.session_state.get("st_selected") not in by_id:
        st.session_state["st_selected"] = studies[0].study_id
    sid = st.selectbox("Study", list(by_id), key="st_selected",
                       format_func=lambda i: f"{i} · {by_id[i].created:%Y-%m-%d %H:%M} · "
                                             f"{len(by_id[i].classes)} classes · "
                                             f"{by_id[i].trials_per_participant} trials")
    study = S.get_study(path, sid)
    st.caption("Classes: " + ", ".join(names[c] for c in study.classes)
               + f" · {study.n_concepts} concepts · seed {study.seed}")

    st.subheader("Participant links")
    st.caption("Each link is signed for its participant (`sig=`): a link opens only that "
               "participant's trials, and editing `participant=` in it is refused. Every name "
               "given a link here is registered, so nobody can take it in the name form.")
    base = (st.context.url or "").split("?")[0].rsplit("/", 1)[0] + "/"
    pid = st.text_input("Participant name or id", key="st_pid", placeholder="e.g. alice")
    if pid.strip():
        clean = S.register_participant(study, pid)
        st.code(S.participant_link(study, clean, base), language=None)
    with st.expander("Links for many participants"):
        many = st.text_area("Participant ids, one per line", key="st_pids", height=140,
                            placeholder="alice\nbob\ncarol")
        ids, bad = S.parse_participant_ids(many)
        if bad:
            st.warning(f"Skipped {len(bad)} invalid ids ({', '.join(bad[:5])}"
                       f"{', …' if len(bad) > 5 else ''}): use 1-64 letters, digits, space, "
                       "'_', '.', '@', '+', '-', starting with a letter or digit.")
        if ids:
            links = S.participant_links(study, ids, base)
            st.dataframe([{"participant": p, "link": link} for p, link in links],
                         hide_index=True, key="st_links",
                         column_config={"link": st.column_config.TextColumn(width="large")})
            st.download_button(f"Download {len(links)} links (CSV)",
                               S.participant_links_csv(links),
                               file_name=f"study_{study.study_id}_links.csv", mime="text/csv",
                               key="st_links_csv")
    st.caption("Or hand out the link without a participant; they enter a new name first (a "
               "name that is already registered is refused):")
    st.code(f"{base}?study={study.token}", language=None)

    head, refresh = st.columns([5, 1], vertical_alignment="bottom")
    head.subheader("Results")
    refresh.button("Refresh", icon=":material/refresh:", key="st_refresh",
                   help="Answers are stored as participants give them; refresh to see new ones")
    res = S.study_results(study, names)
    o = res.overall
    m = st.columns(4)
    m[0].metric("Answers", o.n)
    m[1].metric("Accuracy", "–" if not o.n else f"{o.accuracy:.1%}")
    m[2].metric("95 % CI (Wilson)", "–" if not o.n else f"{o.ci_low:.1%} – {o.ci_high:.1%}")
    m[3].metric("p (one-sided vs 20 %)", "–" if not o.n else f"{o.p_value:.2g}")

    simulate.simulate_panel(ws, cat, lm, study, res)

    def _table(stats, label):
        return [{label: s.label, "answers": s.n, "correct": s.correct,
                 "accuracy": round(s.accuracy, 4), "CI low": round(s.ci_low, 4),
                 "CI high": round(s.ci_high, 4), "p vs 20 %": s.p_value} for s in stats]

    if not o.n:
        st.info("No answers yet. Hand out the participant links above; answers appear here as "
                "they are given.", icon=":material/hourglass_empty:")
        st.stop()
    pct = st.column_config.NumberColumn(format="percent")
    cfg = {"accuracy": pct, "CI low": pct, "CI high": pct,
           "p vs 20 %": st.column_config.NumberColumn(format="%.2g")}
    c1, c2 = st.columns(2)
    c1.markdown("**Per participant**")
    c1.dataframe(_table(res.per_participant, "participant"), hide_index=True, key="st_pp",
                 column_config=cfg)
    c2.markdown("**Per class**")
    c2.dataframe(_table(res.per_class, "class"), hide_index=True, key="st_pc",
                 column_config=cfg)
    st.download_button("Download answers (CSV)", S.answers_csv(study),
                       file_name=f"study_{study.study_id}_answers.csv", mime="text/csv",
                       key="st_csv")
