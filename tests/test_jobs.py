"""Long jobs (issue 12, 'long jobs'): the catalog build reports progress per forward batch with a
rate and an ETA (also for a folder under one 256-image chunk); a cancelled build leaves a
catalog that resumes to the same result as an uninterrupted build; the app's Job view raises
Cancelled once cancelled, shows estimates from measured rates, and the Workspace page offers
the resume after a cancel instead of restarting by itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from explorer_core.errors import Cancelled, ExplorerError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory, demo_workspace):
    from conftest import copy_demo_images

    return copy_demo_images(demo_workspace, tmp_path_factory.mktemp("jobs") / "images", 2)


def _ws(root: Path, images: Path):
    from data_index.workspace import Workspace
    from explorer_core.demo_cnn import DEMO_INPUT_SIZE, DEMO_LAYER

    return Workspace.create(root, model="demo", layer=DEMO_LAYER, images=str(images),
                            input_size=DEMO_INPUT_SIZE, device="cpu")


def test_build_progress_moves_within_one_chunk_with_rate_and_eta(tmp_path, images):
    from data_index.catalog import build_catalog

    seen = []
    stats = build_catalog(_ws(tmp_path / "w", images), device="cpu", batch_size=2,
                          progress=seen.append)
    assert stats.n_images == 20  # under one 256-image chunk
    index = [p for p in seen if p.stage == "index"]
    moving = [p for p in index if 0 < p.done < p.total]
    assert moving, [(p.stage, p.done, p.total) for p in seen]
    assert all(p.unit == "images" and p.total == 20 for p in index)
    assert all(p.rate > 0 and p.eta_s is not None and p.eta_s >= 0 for p in moving)
    assert "images/s" in moving[0].text() and "ETA" in moving[0].text()
    assert [p.done for p in index] == sorted(p.done for p in index)  # never backwards
    assert seen[-1].stage == "done"


def test_cancelled_build_resumes_to_the_same_catalog(tmp_path, images):
    from data_index.catalog import Catalog, build_catalog

    def cancel_after_first_chunk(p):
        if p.stage == "index" and "chunks saved" in p.message:
            raise Cancelled("Building cancelled")

    ws = _ws(tmp_path / "cut", images)
    with pytest.raises(Cancelled):
        build_catalog(ws, device="cpu", batch_size=4, chunk_size=4,
                      progress=cancel_after_first_chunk)
    with pytest.raises(ExplorerError, match="not complete|no catalog|build"):
        Catalog.open(ws)  # consistent: an unfinished catalog is refused, not half-read
    stats = build_catalog(ws, device="cpu", batch_size=4, chunk_size=4)
    assert stats.chunks_resumed == 1 and stats.n_images == 20 and stats.n_crops == 180
    full = _ws(tmp_path / "full", images)
    build_catalog(full, device="cpu", batch_size=4, chunk_size=4)
    ids_a, emb_a = Catalog.open(ws).embeddings()
    ids_b, emb_b = Catalog.open(full).embeddings()
    assert np.array_equal(ids_a, ids_b)
    assert np.allclose(emb_a, emb_b, atol=1e-3)


def test_job_view_cancels_estimates_and_leaves_nothing():
    from streamlit.testing.v1 import AppTest

    def page():
        import streamlit as st

        from explorer_core.errors import Cancelled
        from explorer_core.progress import Progress
        from pages.ui import errors, jobs

        jobs.record_rate("ex", "demo", 25.0)  # 25 images/s measured before
        st.caption(jobs.estimate("ex", "demo", 500) or "none")
        st.caption(jobs.estimate("ex", "other-model", 500) or "none")
        # a finished job leaves the rate of its image stage (not of its cached 'done' report)
        first = jobs.Job("Explaining husko", "t_first", kind="ex2", model="demo")
        first(Progress("attribution", 20, 40, "images", 8.0, 2.5))
        first(Progress("done", 40, 40, "images", 100.0, 0.0))
        first.finished()
        first.done()
        st.caption(jobs.estimate("ex2", "demo", 80) or "none")
        job = jobs.Job("Explaining lupo", "t_job")
        job(Progress("attribution", 10, 40, "images", 5.0, 6.0))
        st.caption(job.text(Progress("attribution", 10, 40, "images", 5.0, 6.0)))
        st.session_state["t_job_cancelled"] = True  # what the Cancel button's click sets
        with errors.guard("explaining"):
            try:
                job(Progress("attribution", 20, 40, "images", 5.0, 4.0))
            except Cancelled as err:
                job.done()
                raise err
        st.write("ran to the end")

    at = AppTest.from_function(page, default_timeout=60).run()
    assert not at.exception, at.exception
    caps = [c.value for c in at.caption]
    assert caps[0] == "up to about 20 s for 500 images (25 images/s measured on this server)"
    assert caps[1] == "none"
    assert caps[2] == "up to about 10 s for 80 images (8 images/s measured on this server)"
    assert caps[3].startswith("Explaining lupo — attribution: 10/40 images, 5 images/s, "
                              "ETA 6 s · ")
    assert [e.value for e in at.error] == [
        "Explaining lupo cancelled; what was saved is kept, start it again to resume"]
    assert not at.get("progress") and "t_job_cancel" not in [b.key for b in at.button]


def _cancel_at_first_index(p):
    if p.stage == "index":
        raise Cancelled("stop")


def test_home_after_a_cancel_offers_the_resume(tmp_path, images, monkeypatch):
    """A build cancelled from the page (its Cancel click marks ``home_job_cancelled``) is not
    restarted by itself; Build / resume then completes it."""
    from streamlit.testing.v1 import AppTest

    from data_index.catalog import build_catalog

    home = tmp_path / "home"
    ws = _ws(home / "cut", images)
    with pytest.raises(Cancelled):  # cancelled at its first report (the page's chunk size)
        build_catalog(ws, device="cpu", batch_size=2, progress=_cancel_at_first_index)
    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(home))
    monkeypatch.delenv("CONCEPT_EXPLORER_LEAD_KEY", raising=False)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.query_params["ws"] = "cut"
    at.session_state["home_job_cancelled"] = True
    at.run()
    assert not at.exception, at.exception
    assert any(w.value.startswith("Build cancelled") for w in at.warning)
    assert not at.metric  # nothing was built by itself
    at.button(key="home_build").click().run()
    assert not at.exception, at.exception
    done = [s.value for s in at.success]
    assert any(s.startswith("Catalog complete: 20 images, 180 crops") for s in done), done
    assert int({m.label: m.value for m in at.metric}["Images"]) == 20


def test_study_creation_progress_moves_within_each_class(tmp_path, images):
    from data_index.catalog import Catalog, build_catalog
    from study import intruder as S

    ws = _ws(tmp_path / "st", images)
    build_catalog(ws, device="cpu", batch_size=4)
    counts = Catalog.open(ws).predicted_counts()
    classes = [c for c, _ in sorted(counts.items(), key=lambda kv: -kv[1])][:2]
    seen = []
    S.create_study(ws, classes, n_concepts=2, trials_per_participant=2, max_images=8,
                   progress=seen.append)
    inner = [p for p in seen if p.stage.startswith("class ")]
    assert {p.stage.split(" · ")[0] for p in inner} == {"class 1/2", "class 2/2"}
    assert any(p.unit == "images" and 0 < p.done <= p.total for p in inner), \
        [(p.stage, p.done, p.total, p.unit) for p in inner]
    S.close_all()


def test_run_or_load_after_a_cancel_says_so_and_waits_for_the_button():
    """A cancelled explanation (its Cancel click marks ``<prefix>_job_cancelled``) is not
    started again by itself, not even where the page would compute at once (a stored
    classifier); the button stays."""
    from streamlit.testing.v1 import AppTest

    def page():
        import streamlit as st

        from pages.ui import views

        calls = st.session_state.setdefault("calls", [])

        def compute(progress):
            calls.append(1)
            return None

        views.run_or_load(("contrast", "r", "v", 1), "co", "Contrast", "contrasting a and b",
                          compute, "press Contrast", compute_now=lambda: True)

    at = AppTest.from_function(page, default_timeout=60)
    at.session_state["co_job_cancelled"] = True
    at.run()
    assert not at.exception, at.exception
    assert [w.value for w in at.warning] == [
        "Cancelled contrasting a and b; press **Contrast** to start again (parts already "
        "computed are cached and reused)."]
    assert at.session_state["calls"] == []
    assert "co_run" in [b.key for b in at.button]
    at.run()  # the mark is consumed: the next run computes as before (stored classifier)
    assert at.session_state["calls"] == [1]


def test_home_resumes_a_build_left_mid_way_and_leaves_no_note(tmp_path, images, monkeypatch):
    """The user left the page while their build ran (``building`` in the session): coming back
    resumes it, and once complete no 'Resuming' or 'no catalog' note is left above the result."""
    from streamlit.testing.v1 import AppTest

    from data_index.catalog import build_catalog

    home = tmp_path / "home"
    ws = _ws(home / "left", images)
    with pytest.raises(Cancelled):
        build_catalog(ws, device="cpu", batch_size=2, progress=_cancel_at_first_index)
    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(home))
    monkeypatch.delenv("CONCEPT_EXPLORER_LEAD_KEY", raising=False)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.query_params["ws"] = "left"
    at.session_state["building"] = str(ws.root)
    at.run()
    assert not at.exception, at.exception
    assert any(s.value.startswith("Catalog complete: 20 images") for s in at.success)
    assert not at.info and not at.warning, ([i.value for i in at.info],
                                            [w.value for w in at.warning])
    assert not at.get("progress") and "building" not in at.session_state


@pytest.mark.timeout(900)
def test_first_start_builds_the_demo_and_leaves_no_preparing_note(tmp_path, monkeypatch):
    """First start (an empty workspace home): the Workspace page builds the demo with its note
    and bar, and once built neither stays (about 15 s on two CPU cores)."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CONCEPT_EXPLORER_LEAD_KEY", raising=False)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=900).run()
    assert not at.exception, at.exception
    assert not any("Preparing" in i.value for i in at.info), [i.value for i in at.info]
    assert not at.warning and not at.get("progress")
    assert int({m.label: m.value for m in at.metric}["Images"]) == 1200


def test_a_failed_resume_is_not_retried_on_every_visit(tmp_path, images, monkeypatch):
    import shutil as sh

    from streamlit.testing.v1 import AppTest

    home = tmp_path / "home"
    gone = sh.copytree(images, tmp_path / "gone")
    ws = _ws(home / "broken", gone)
    sh.rmtree(gone)  # the image folder disappeared after the workspace was created
    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(home))
    monkeypatch.delenv("CONCEPT_EXPLORER_LEAD_KEY", raising=False)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.query_params["ws"] = "broken"
    at.session_state["building"] = str(ws.root)
    at.run()
    assert not at.exception, at.exception
    assert len(at.error) == 1 and "bug" not in at.error[0].value, [e.value for e in at.error]
    assert "building" not in at.session_state and not at.get("progress")
    at.run()  # the next visit: the button, not another failing build
    assert not at.error and "home_build" in [b.key for b in at.button]
