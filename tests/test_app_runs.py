"""The run history and export in the app (AppTest): an explanation is kept once however often the
page reruns, the Explain page offers the HTML report and the zip, the Runs page lists the runs,
filters them, compares two side by side (the changed parameter highlighted), and deletes one;
the heatmap view's controls (concept, opacity, larger view) redraw what they say."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from explainer.runs import RunHistory

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
T = 900  # seconds: an explanation on 2 busy CPU cores


@pytest.fixture(scope="module")
def demo_copy(demo_workspace, tmp_path_factory) -> Path:
    """A private copy of the demo workspace (with its result cache), so the runs these tests
    keep never land in the shared one; returns the workspace folder."""
    home = tmp_path_factory.mktemp("runs_home")
    shutil.copytree(demo_workspace.root, home / "demo", symlinks=True,
                    ignore=shutil.ignore_patterns("runs", "runs.duckdb"))
    return home / "demo"


@pytest.fixture
def app(demo_copy, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(demo_copy.parent))
    monkeypatch.delenv("CONCEPT_EXPLORER_LEAD_KEY", raising=False)

    def make(page: str, **params):
        at = AppTest.from_file(APP, default_timeout=T)
        for k, v in params.items():
            at.query_params[k] = str(v)
        at.switch_page(page).run()
        assert not at.exception, at.exception
        return at
    return make


def _explain(app, n: int):
    at = app("pages/explain.py", ws="demo", a="lupo", n=n)
    if "ex_run" in [b.key for b in at.button]:
        at.button(key="ex_run").click().run()
    assert not at.exception, at.exception
    return at


def _captions(at) -> list[str]:
    return [c.value for c in at.caption]


def test_explain_is_kept_once_with_export_buttons(app, demo_copy):
    at = _explain(app, 4)
    kept = [c for c in _captions(at) if "in the run history" in c]
    assert len(kept) == 1 and kept[0].split("run #")[1].split()[0].isdigit()
    downloads = at.get("download_button")
    labels = [d.proto.label for d in downloads]
    assert labels == ["HTML report", "Files (zip)"]
    # reruns (the exclusion toggle, a plain rerun) record nothing new
    at.toggle(key="ex_excl").set_value(True).run()
    at.run()
    assert not at.exception, at.exception
    runs = RunHistory(demo_copy).list_runs(kinds=["explain"], text="lupo · n=4 ·")
    assert [r.title.split(" · ")[:2] for r in runs] == [["explain lupo", "n=4"]]
    # a new session (another browser tab) with the same result: still one run
    _explain(app, 4)
    assert len(RunHistory(demo_copy).list_runs(kinds=["explain"], text="lupo · n=4 ·")) == 1


def test_runs_page_lists_compares_and_deletes(app, demo_copy):
    _explain(app, 4)
    _explain(app, 3)
    hist = RunHistory(demo_copy)
    runs = hist.list_runs(kinds=["explain"])
    assert len(runs) == 2
    at = app("pages/runs.py", ws="demo")
    table = at.dataframe[0].value
    assert set(table["title"]) >= {r.title for r in runs}
    assert set(table["test"]) <= {"PASS", "FAIL", ""}
    # filter by title text
    at.text_input(key="ru_text").set_value("n=3").run()
    assert list(at.dataframe[0].value["title"]) == [runs[0].title]
    at.text_input(key="ru_text").set_value("").run()
    # side by side: n = 3 (newest) left, n = 4 right; only n_concepts differs
    at.selectbox(key="ru_left").set_value(runs[0].id)
    at.selectbox(key="ru_right").set_value(runs[1].id).run()
    assert not at.exception, at.exception
    params = at.dataframe[1].value
    differs = dict(zip(params["parameter"], params["differs"]))
    assert differs["n_concepts"] == "≠"
    assert [k for k, v in differs.items() if v] == ["n_concepts"]
    concept_heads = [m.value for m in at.markdown if m.value.startswith("Concept ")]
    assert len(concept_heads) == 3 + 4
    crop_caps = [c for im in at.image for c in im.captions if c.startswith("#")]
    assert len(crop_caps) == (3 + 4) * 8
    assert len(at.get("download_button")) == 4  # HTML + zip per side
    verdicts = [s.value for s in at.success] + [e.value for e in at.error]
    assert sum("prediction test" in v for v in verdicts) == 2
    # delete the left run (asks first)
    at.button(key="ru_del_l").click().run()
    assert any("cannot be undone" in w.value for w in at.warning)
    at.button(key="ru_del_yes_l").click().run()
    assert not at.exception, at.exception
    assert [r.id for r in hist.list_runs(kinds=["explain"])] == [runs[1].id]
    assert not (demo_copy / "runs" / runs[0].folder).exists()
    assert list(at.dataframe[0].value["run"]) == [
        r.id for r in hist.list_runs()]
    # back on the Explain page in the same session: the deleted result is kept again
    at.switch_page("pages/explain.py")
    at.query_params["n"] = "3"
    at.query_params["a"] = "lupo"
    at.run()
    assert not at.exception, at.exception
    assert len(hist.list_runs(kinds=["explain"], text="n=3")) == 1


def test_runs_page_without_runs_says_how_to_make_one(app, demo_copy):
    at = app("pages/runs.py", ws="demo")
    at.multiselect(key="ru_kinds").set_value(["patch"]).run()
    assert any("No runs yet match these filters" in i.value for i in at.info)


def _plotly_array(v) -> np.ndarray:
    """A plotly JSON array: a list, or a typed array ``{dtype, bdata (base64), shape}``."""
    if isinstance(v, dict):
        import base64

        shape = [int(x) for x in str(v.get("shape", "-1")).split(",")]
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).reshape(shape)
    return np.asarray(v)


def test_heatmap_controls(app, demo_copy):
    from explainer.heatmap import strongest_images
    from explainer.runs import RunHistory

    at = _explain(app, 4)
    assert not [c for im in at.image for c in im.captions if c.startswith("colour scale")]
    at.toggle(key="ex_hm").set_value(True).run()  # drawn only when asked for
    caps = [c for im in at.image for c in im.captions]
    assert any(c.startswith("colour scale: 0 (dark)") for c in caps)
    overlays = [c for c in caps if c.startswith("max ")]
    assert len(overlays) == 4 * 4  # 4 source images x 4 concepts
    at.slider(key="ex_hm_n").set_value(6).run()
    assert len([c for im in at.image for c in im.captions if c.startswith("max ")]) == 6 * 4
    # choosing concept 2 orders the images by its strength and keeps only its ranking panel
    at.selectbox(key="ex_hm_concept").set_value(1).run()
    assert not at.exception, at.exception
    run = RunHistory(demo_copy).list_runs(kinds=["explain"], text="n=4")[0]
    expl = RunHistory(demo_copy).result(run)
    ranked = strongest_images(expl.heatmaps, expl.image_ids, 1, 6)
    rows = [c for im in at.image for c in im.captions if re.fullmatch(r"image \d+", c)]
    assert rows[:6] == [f"image {i}" for i, _ in ranked]
    panel = [c for im in at.image for c in im.captions if ". image " in c]
    assert panel == [f"{r + 1}. image {i} · max {v:.2f}" for r, (i, v) in enumerate(ranked)]
    assert at.selectbox(key="ex_hm_big").options == [f"image {i}" for i, _ in ranked]
    at.selectbox(key="ex_hm_big").set_value(ranked[2][0]).run()
    big = [c for im in at.image for c in im.captions if c.endswith(" · concept 2")]
    assert big == [f"image {ranked[2][0]} · concept 2"]
    # hovering the larger view reads every concept's strength per layer cell
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    heat = [t for t in fig["data"] if t["type"] == "heatmap"][0]
    j = expl.image_ids.index(ranked[2][0])
    assert np.allclose(_plotly_array(heat["customdata"]), np.moveaxis(expl.heatmaps[j], 0, -1),
                       atol=1e-5)
    assert "concept 4: %{customdata[3]" in heat["hovertemplate"]
    assert heat["opacity"] == pytest.approx(0.6)
    at.slider(key="ex_hm_opacity").set_value(0.2).run()
    assert not at.exception, at.exception
    heat = [t for t in json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
            if t["type"] == "heatmap"][0]
    assert heat["opacity"] == pytest.approx(0.2)


def test_runs_page_shows_test_runs_side_by_side(app, demo_copy):
    from tests.test_runs import make_patch

    hist = RunHistory(demo_copy)
    a, _ = hist.record("patch", {"class_a": "lupo", "position": "center"}, make_patch(),
                       title="patch center")
    b, _ = hist.record("patch", {"class_a": "lupo", "position": "top-left"}, make_patch(),
                       title="patch top-left")
    at = app("pages/runs.py", ws="demo")
    at.multiselect(key="ru_kinds").set_value(["patch"]).run()
    at.selectbox(key="ru_left").set_value(a.id)
    at.selectbox(key="ru_right").set_value(b.id).run()
    assert not at.exception, at.exception
    assert [e.value for e in at.error] == []
    differs = dict(zip(at.dataframe[1].value["parameter"], at.dataframe[1].value["differs"]))
    assert [k for k, v in differs.items() if v] == ["position"]
    measures = [dict(zip(df.value["measure"], df.value["value"])) for df in at.dataframe[2:]]
    assert len(measures) == 2
    assert all(m["mean_delta_a"] == pytest.approx(0.3, abs=1e-6) for m in measures)
    assert len(at.get("download_button")) == 4
