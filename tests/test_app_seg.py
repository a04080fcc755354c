"""Headless page tests (``streamlit.testing.v1.AppTest``) on the embedded ``demo-seg`` workspace
(issue 11 items 1 and 4): the Workspace page lists both embedded workspaces and ``?ws=demo-seg``
opens it; the Explain page explains a class and shows the prediction test on pixel shares; the
Test bench and the Contrast page name a segmentation model's score "share of pixels predicted as
A", never "P(A)" (a segmenter has no class probability of an image)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
T = 900  # seconds: an explanation on 2 busy CPU cores
SHARE = "share of pixels predicted as"


@pytest.fixture
def seg_ws(demo_seg_workspace, monkeypatch):
    """The shared ``demo-seg`` workspace (tests/conftest.py) with ``CONCEPT_EXPLORER_HOME`` at
    its parent, so the app opens it by name."""
    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(demo_seg_workspace.root.parent))
    monkeypatch.delenv("CONCEPT_EXPLORER_LEAD_KEY", raising=False)
    return demo_seg_workspace


def _app(**params):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=T)
    for k, v in params.items():
        at.query_params[k] = str(v)
    return at


def _press_unless_stored(at, key: str) -> None:
    if key in [b.key for b in at.button]:
        at.button(key=key).click().run()


def _top_crops(ws, cls: int) -> tuple[list[int], object]:
    """The top-1 crop of each concept of the Explain page's default explanation, and its
    prediction test."""
    from explainer.concepts import explain_class

    expl = explain_class(ws, cls, n_concepts=4, method="deeplift", max_images=500, seed=0, m=8,
                         device="cpu")
    return [c.crops[0].crop_id for c in expl.concepts], expl.prediction_test


def test_workspace_page_lists_both_embedded_workspaces_and_opens_demo_seg(seg_ws):
    at = _app(ws="demo-seg").run()
    assert not at.exception, at.exception
    box = at.selectbox(key="home_ws")
    assert box.value == "demo-seg"
    assert box.options[:2] == ["demo", "demo-seg"]
    metrics = {m.label: m.value for m in at.metric}
    assert int(metrics["Images"]) == 1200 and int(metrics["Crops"]) == 10800
    assert int(metrics["Classes predicted"]) == 10
    assert any("model `demo-seg`" in c.value for c in at.caption)


def test_a_link_to_demo_seg_builds_it_in_a_fresh_home(demo_seg_workspace, tmp_path,
                                                      monkeypatch):
    """``?ws=demo-seg`` on a home without it: the app builds it (here over a world of 2 images
    per class put in place beforehand, so 20 images are built, not 1200) and opens it; the
    Workspace page lists both embedded workspaces before either is built."""
    from conftest import copy_demo_images

    from demo_world.workspace import DEMO_SPLIT

    home = tmp_path / "home"
    copy_demo_images(demo_seg_workspace, home / "demo-seg" / "world" / "images" / DEMO_SPLIT, 2)
    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(home))
    monkeypatch.delenv("CONCEPT_EXPLORER_LEAD_KEY", raising=False)
    at = _app(ws="demo-seg").run()
    assert not at.exception, at.exception
    assert [e.value for e in at.error] == []
    assert (home / "demo-seg" / "workspace.toml").is_file()
    assert not (home / "demo").exists()  # listing an embedded workspace does not build it
    assert at.selectbox(key="home_ws").options[:2] == ["demo", "demo-seg"]
    metrics = {m.label: m.value for m in at.metric}
    assert int(metrics["Images"]) == 20 and int(metrics["Crops"]) == 180
    # and from another page's link
    at = _app(ws="demo-seg", a="zebrox")
    at.switch_page("pages/test_bench.py").run()
    assert not at.exception and [e.value for e in at.error] == []


def test_explain_page_on_demo_seg_shows_the_prediction_test_on_pixel_shares(seg_ws):
    at = _app(ws="demo-seg", a="lupo", n=4)
    at.switch_page("pages/explain.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="ex_class").value == 0
    _press_unless_stored(at, "ex_run")
    assert not at.exception, at.exception
    assert len([c for im in at.image for c in im.captions if c.startswith("#")]) == 4 * 8
    _ids, pt = _top_crops(seg_ws, 0)
    assert pt.score == "pixel share" and pt.passed
    want = (f"PASS — the stitched top crops are classified as **lupo** ({SHARE} lupo = "
            f"{pt.prob_target:.3f})")
    assert [e.value for e in at.error] == []
    assert any(s.value.startswith(want) for s in at.success), [s.value for s in at.success]


def test_test_bench_names_pixel_shares_for_a_segmentation_model(seg_ws):
    at = _app(ws="demo-seg", t="lupo", a="lupo", b="husko")
    at.switch_page("pages/test_bench.py").run()
    assert not at.exception, at.exception
    top, pt = _top_crops(seg_ws, 0)
    at.text_input(key="tb_typed").input(", ".join(map(str, top))).run()
    assert [e.value for e in at.error] == []
    assert any(s.value.startswith(f"PASS — the stitched crops are classified as **lupo** "
                                  f"({SHARE} lupo = {pt.prob_target:.3f})")
               for s in at.success), [s.value for s in at.success]
    row = at.dataframe[0].value
    assert f"{SHARE} lupo" in row.columns
    assert float(row[f"{SHARE} lupo"].iloc[0]) == pytest.approx(pt.prob_target, abs=1e-6)
    # patch insertion into images predicted as husko
    at.text_input(key="tb_patch_crop_typed").input("4").run()
    at.button(key="tb_run").click().run()
    assert not at.exception, at.exception
    labels = [m.label for m in at.metric]
    assert f"mean Δ {SHARE} lupo patch" in labels and f"mean Δ {SHARE} husko patch" in labels
    table = at.dataframe[-1].value
    assert {f"{SHARE} A before", f"{SHARE} A after", f"{SHARE} B control"} <= set(table.columns)
    bars = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    assert bars[0]["x"] == [f"{SHARE} A lupo", f"{SHARE} B husko"]
    shown = labels + list(row.columns) + list(table.columns) + bars[0]["x"]
    assert not any("P(" in s for s in shown), shown


def test_contrast_page_shift_curve_names_pixel_shares(seg_ws):
    at = _app(ws="demo-seg", a="lupo", b="husko", n=4)
    at.switch_page("pages/contrast.py").run()
    assert not at.exception, at.exception
    _press_unless_stored(at, "co_run")
    assert not at.exception, at.exception
    traces = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    assert [t["name"] for t in traces] == [f"{SHARE} lupo (A)", f"{SHARE} husko (B)"]
    metrics = {m.label: m.value for m in at.metric}
    assert "pixels A at t=0" in metrics and "max pixels A" in metrics
    shown = [m.value for m in at.markdown if m.value.startswith("pixels A **")]
    assert len(shown) == 8
