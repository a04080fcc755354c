"""Headless page tests (``streamlit.testing.v1.AppTest``) on the real demo workspace: every page
driven through its widgets, asserting what it renders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
T = 900  # seconds: an explanation on 2 busy CPU cores


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory) -> Path:
    """``CONCEPT_EXPLORER_HOME`` for the session (a tmp dir; the demo workspace is built once)."""
    home = tmp_path_factory.getbasetemp() / "concept_explorer_home"
    home.mkdir(exist_ok=True)
    old = os.environ.get("CONCEPT_EXPLORER_HOME")
    os.environ["CONCEPT_EXPLORER_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("CONCEPT_EXPLORER_HOME", None)
    else:
        os.environ["CONCEPT_EXPLORER_HOME"] = old


@pytest.fixture(scope="session")
def demo_ws(demo_home):
    """The demo workspace (world + catalog), built once per session via ensure_demo_workspace."""
    try:
        from explainer.demo.model import DemoWeightsMissing
    except ImportError:  # pragma: no cover
        DemoWeightsMissing = FileNotFoundError  # type: ignore
    from data_index.demo import ensure_demo_workspace

    try:
        return ensure_demo_workspace(home=demo_home)
    except DemoWeightsMissing as exc:  # the demo CNN is trained by `python -m explainer.demo.train`
        if os.environ.get("CI"):
            raise
        pytest.skip(f"demo model weights missing: {exc}")


def pick_classes(ws) -> tuple[int, int, list[str]]:
    """Two well-populated predicted classes of the workspace, preferring the demo's planted
    shortcut pair (lupo vs husko)."""
    from data_index.catalog import Catalog
    from explainer.models import load_model

    names = load_model(ws.model, "cpu").class_names
    counts = Catalog.open(ws).predicted_counts()
    pref = [names.index(n) for n in ("lupo", "husko") if n in names and counts.get(
        names.index(n), 0) >= 10]
    rest = [c for c, _ in sorted(counts.items(), key=lambda kv: -kv[1]) if c not in pref]
    a, b = (pref + rest)[:2]
    return a, b, names


def _app(**params):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=T)
    for k, v in params.items():
        at.query_params[k] = str(v)
    return at


def _crop_captions(at) -> list[str]:
    return [c for im in at.image for c in im.captions if c.startswith("#")]


def _texts(at) -> str:
    parts = [m.value for m in at.markdown] + [e.value for e in at.error] + \
            [s.value for s in at.success] + [w.value for w in at.warning] + \
            [i.value for i in at.info]
    return "\n".join(str(p) for p in parts)


def test_home_shows_catalog_status(demo_ws):
    at = _app(ws="demo").run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert int(metrics["Images"]) > 100
    assert int(metrics["Crops"]) == 9 * int(metrics["Images"])
    assert int(metrics["Skipped files"]) == 0
    assert int(metrics["Classes predicted"]) >= 2
    assert at.query_params["ws"] == ["demo"] or at.query_params["ws"] == "demo"


def test_bad_workspace_shows_error(demo_ws):
    at = _app(ws="no-such-workspace").run()
    assert not at.exception
    assert any("No workspace" in e.value for e in at.error)


def test_create_workspace_with_bad_folder_shows_error(demo_ws, tmp_path):
    at = _app(ws="demo").run()
    at.text_input(key="new_name").input("new-ws")
    at.text_input(key="new_spec").input("demo")
    at.run()
    layer = at.selectbox(key="new_layer")
    assert sum("(recommended)" in o for o in layer.options) == 1  # labels carry the shapes
    assert any("x" in o and "(recommended)" in o for o in layer.options)
    at.text_input(key="new_images").input(str(tmp_path / "missing"))
    at.button(key="new_create").click().run()
    assert any("not found" in e.value for e in at.error), [e.value for e in at.error]


def test_explain_page_crops_toggle_and_prediction_test(demo_ws):
    a, _b, names = pick_classes(demo_ws)
    at = _app(ws="demo", a=names[a], n=4)
    at.switch_page("pages/explain.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="ex_class").value == a
    at.button(key="ex_run").click().run()
    assert not at.exception, at.exception
    caps = _crop_captions(at)
    assert len(caps) == 4 * 8
    assert len(at.popover) >= 32 if hasattr(at, "popover") else True
    mark = [s.value for s in at.success] + [e.value for e in at.error]
    assert any(v.startswith("PASS") for v in mark) or any(
        v.startswith("FAIL") and "not to be trusted" in v for v in mark)
    assert at.query_params["a"] in (names[a], [names[a]])
    # exclusion re-renders from the same Explanation: other crops, still 8 per concept
    at.toggle(key="ex_excl").set_value(True).run()
    caps_excl = _crop_captions(at)
    assert len(caps_excl) == 32 and caps_excl != caps
    assert at.query_params["excl"] in ("1", ["1"])


def test_contrast_page_classifier_and_shift_curve(demo_ws):
    a, b, names = pick_classes(demo_ws)
    at = _app(ws="demo", a=names[a], b=names[b], n=4)
    at.switch_page("pages/contrast.py").run()
    assert not at.exception, at.exception
    at.button(key="co_run").click().run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    acc = float(metrics["Classifier accuracy"].rstrip("%")) / 100
    assert 0.5 <= acc <= 1.0
    assert len(_crop_captions(at)) == 32
    charts = at.get("plotly_chart")
    spec = json.loads(charts[0].proto.spec)
    traces = spec["data"]
    assert len(traces) == 2
    assert len(traces[0]["x"]) == 10 and len(traces[0]["y"]) == 10
    assert all(0.0 <= y <= 1.0 for y in traces[0]["y"] + traces[1]["y"])
    # P(A) at the largest offset is above its default (the direction moves the model to A)
    assert traces[0]["y"][-1] >= traces[0]["y"][0]
    # the offset slider shows 8 sample images of B with their predictions
    at.select_slider(key="co_offset").set_value(200.0).run()
    assert sum(1 for m in at.markdown if "P(A)" in m.value) == 8


def test_test_bench_stitch_and_bad_input(demo_ws):
    a, b, names = pick_classes(demo_ws)
    at = _app(ws="demo", t=names[a], a=names[a], b=names[b])
    at.switch_page("pages/test_bench.py").run()
    assert not at.exception, at.exception
    at.text_input(key="tb_typed").input("0, 1, 2").run()
    mark = [s.value for s in at.success] + [e.value for e in at.error]
    assert any(v.startswith(("PASS", "FAIL")) for v in mark)
    at.text_input(key="tb_typed").input("0, x1").run()
    assert any("whole numbers" in e.value for e in at.error)
    # patch insertion: a catalog crop into images predicted as B
    at.text_input(key="tb_patch_crop_typed").input("4").run()
    at.button(key="tb_run").click().run()
    assert not at.exception, at.exception
    labels = [m.label for m in at.metric]
    assert any(l.startswith("mean ΔP(") for l in labels)
    table = at.dataframe[-1].value
    assert len(table) >= 1 and {"P(A) before", "P(A) after", "P(A) control"} <= set(table.columns)


def test_study_lead_and_participant(demo_ws):
    import duckdb

    from explainer import study as S

    a, b, names = pick_classes(demo_ws)
    at = _app(ws="demo")
    at.switch_page("pages/study.py").run()
    assert not at.exception, at.exception
    at.multiselect(key="st_classes").set_value([a, b])
    at.number_input(key="st_trials").set_value(5)
    at.button(key="st_create").click().run()
    assert not at.exception, at.exception
    assert any("created" in s.value for s in at.success)
    at.text_input(key="st_pid").input("alice").run()
    link = [c.value for c in at.code if "participant=alice" in c.value]
    assert link, [c.value for c in at.code]
    token = link[0].split("study=")[1].split("&")[0]

    # the participant's view: only the trials, no navigation, no results
    pt = _app(study=token, participant="alice").run()
    assert not pt.exception, pt.exception
    assert len(pt.image) == 5 and len(pt.button) == 5
    assert not pt.sidebar.children or all(
        getattr(c, "type", "") == "" for c in pt.sidebar.children.values())
    assert not pt.metric and not pt.dataframe  # never other participants' answers
    assert "Trial 1 of 5" in str(pt.get("progress")[0].proto.text)
    pt.button(key="pick_0_2").click().run()
    assert "Trial 2 of 5" in str(pt.get("progress")[0].proto.text)
    study = S.study_by_token(S.study_path(demo_ws), token)
    rows = S.answers(study, "alice")
    assert [(r["trial_index"], r["chosen_position"]) for r in rows] == [(0, 2)]
    assert rows[0]["correct"] == (S.trials_for(study, "alice")[0].intruder_position == 2)
    # a bad link is an error message, not a traceback
    bad = _app(study="nope-token", participant="x").run()
    assert any("unknown" in e.value for e in bad.error)
