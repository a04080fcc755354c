"""The Evaluate page (issue 10, item 4) headless (``AppTest``) on the three-layer demo catalog:
it opens a finished sweep by name (figures, the filtered table, a link per row to the class's
explanation), refuses a path as a sweep name, and runs a new sweep from its form."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from explainer.sweep import SweepSpec, list_sweeps, load_sweep, run_sweep, sweep_folder

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
NAME = "page-grid"


@pytest.fixture(scope="module")
def finished(multilayer_workspace):
    spec = SweepSpec(layers=("layer3.relu_out", "layer4.relu_out"), n=(2, 4), samples=(8,),
                     methods=("grad_x_act",), baselines=("random",), limit=2)
    return run_sweep(multilayer_workspace, spec, sweep_folder(multilayer_workspace, NAME),
                     device="cpu", png=False)


@pytest.fixture
def multi_ws(multilayer_workspace, monkeypatch):
    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(multilayer_workspace.root.parent))
    monkeypatch.delenv("CONCEPT_EXPLORER_LEAD_KEY", raising=False)
    return multilayer_workspace


def _page(**params):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=600)
    for k, v in params.items():
        at.query_params[k] = str(v)
    return at.switch_page("pages/evaluate.py")


def test_the_page_shows_a_finished_sweep(multi_ws, finished):
    at = _page(ws="multi", sweep=NAME).run()
    assert not at.exception, at.exception
    assert at.selectbox(key="ev_open").value == NAME
    charts = at.get("plotly_chart")
    assert len(charts) == 4  # Fig. 4, Fig. 13, Fig. 11, Tables 6/7
    assert '"Fig. 4: target-class crops excluded, over n' in charts[0].proto.spec
    table = at.dataframe[0].value
    assert len(table) == len(finished.rows) == 2 * 2 * 2 * 2 * 2
    link = urlparse(table["explanation"].iloc[0])
    q = {k: v[0] for k, v in parse_qs(link.query).items()}
    first = finished.rows[0]
    assert link.path == "/explain"
    assert q == {"ws": "multi", "a": first["name"], "n": str(first["n"]),
                 "layer": first["layer"], "method": "grad_x_act", "images": "8",
                 "excl": str(int(first["condition"] == "excluded"))}
    # the filters narrow the table
    at.multiselect(key="ev_f_method").select("random").run()
    at.multiselect(key="ev_f_cond").select("excluded").run()
    table = at.dataframe[0].value
    assert len(table) == 2 * 2 * 2 and set(table["method"]) == {"random"}
    assert set(table["condition"]) == {"excluded"}


def test_a_path_is_never_a_sweep_name(multi_ws, finished):
    at = _page(ws="multi", sweep="../../etc").run()
    assert not at.exception, at.exception
    assert any("Sweep name '../../etc'" in e.value for e in at.error)
    assert at.selectbox(key="ev_open").value in list_sweeps(multi_ws)


def test_the_page_runs_a_new_sweep(multi_ws, finished):
    at = _page(ws="multi").run()
    assert not at.exception, at.exception
    at.multiselect(key="ev_layers").set_value(["layer4.relu_out"])
    at.multiselect(key="ev_n").set_value([2])
    at.multiselect(key="ev_samples").set_value([25])
    at.multiselect(key="ev_methods").set_value(["grad_x_act"])
    at.multiselect(key="ev_baselines").set_value(["craft"])
    at.number_input(key="ev_limit").set_value(2)
    at.text_input(key="ev_name").input("from-page")
    at.button(key="ev_run").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    res = load_sweep(sweep_folder(multi_ws, "from-page"))
    assert res.complete and len(res.rows) == 2 * 2 * 2  # classes x settings x conditions
    assert {r["method"] for r in res.rows} == {"grad_x_act", "craft"}
    assert at.selectbox(key="ev_open").value == "from-page"
    assert len(at.dataframe[0].value) == len(res.rows)
    # a bad name gets one message, not a traceback
    at.text_input(key="ev_name").input("../x")
    at.button(key="ev_run").click().run()
    assert not at.exception, at.exception
    assert any("Sweep name '../x'" in e.value for e in at.error)


def test_the_page_is_a_lead_page(multi_ws, finished, monkeypatch):
    """With a lead key set, the page (through app.py or run on its own) shows only the key
    form: no sweep, no figure, no table."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CONCEPT_EXPLORER_LEAD_KEY", "lead-secret-10")
    for at in (_page(ws="multi", sweep=NAME),
               AppTest.from_file(str(ROOT / "pages" / "evaluate.py"), default_timeout=600)):
        at.query_params["ws"] = "multi"
        at.run()
        assert not at.exception, at.exception
        assert [t.label for t in at.text_input] == ["Lead key"]
        assert not at.get("plotly_chart") and not at.dataframe and not at.multiselect
