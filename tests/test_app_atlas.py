"""AppTest of the concept atlas (Explain page) and the simulated participants (Study page),
issue 12 items 2 and 6, on the demo workspace."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tests.test_app_pages import _app, _press_unless_stored


@pytest.fixture
def demo_ws(demo_workspace, monkeypatch):
    """The shared demo workspace, opened by name by the app (as in tests/test_app_pages.py)."""
    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(demo_workspace.root.parent))
    monkeypatch.delenv("CONCEPT_EXPLORER_LEAD_KEY", raising=False)
    return demo_workspace


def _values(v) -> list[float]:
    """A plotly array from a chart's JSON: a list, or plotly's typed array (dtype + base64)."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), np.dtype(v["dtype"])).tolist()
    return [float(x) for x in v]


def _grass_concept(ws) -> int:
    from demo_world import groundtruth as gt
    from demo_world import world
    from explainer.concepts import explain_class, get_context

    e = explain_class(get_context(ws, "cpu"), world.CLASSES.index("lupo"), device="cpu",
                      cache=True)
    k = gt.find_concept(gt.explanation_truth(e, exclude_target=True), "bg_grass")
    assert k is not None
    return int(k)


def _atlas_captions(at) -> list[str]:
    """Captions of the atlas's crops (``#id · score``; the concept grid's are ``#id``)."""
    return [c for im in at.image for c in im.captions if c.startswith("#") and " · " in c]


def test_atlas_pages_breakdown_where_else_and_map(demo_ws):
    at = _app(ws="demo", a="lupo", n=4)
    at.switch_page("pages/explain.py").run()
    assert not at.exception, at.exception
    _press_unless_stored(at, "ex_run")
    assert not at.exception, at.exception
    assert any(e.label.startswith("Concept atlas") for e in at.expander)
    assert _atlas_captions(at) == []  # nothing computed until switched on
    at.toggle(key="ex_atlas_on").set_value(True).run()
    assert not at.exception, at.exception
    first = _atlas_captions(at)
    assert len(first) == 8
    # show more: 32 per page, then page 2 of 32 -- distinct crops, lower scores
    at.radio(key="ex_atlas_size").set_value(32).run()
    p1 = _atlas_captions(at)
    assert len(p1) == 32 and p1[:8] == first
    at.number_input(key="ex_atlas_page").set_value(2).run()
    assert not at.exception, at.exception
    p2 = _atlas_captions(at)
    assert len(p2) == 32 and not set(p2) & set(p1)
    assert float(p2[0].split(" · ")[1]) <= float(p1[-1].split(" · ")[1])
    # the breakdown chart counts the 32 crops shown, three times (crop, image, label)
    charts = {c.proto.id: json.loads(c.proto.spec) for c in at.get("plotly_chart")}
    bars = [s for s in charts.values() if s["data"] and s["data"][0]["type"] == "bar"]
    counted = sum(sum(_values(tr["y"])) for tr in bars[0]["data"])
    assert counted == 3 * 32
    # where else: the concept picked is listed with its classes
    assert any("occurs in" in m.value for m in at.markdown)
    # the map: one scatter trace per dominant concept
    scat = [s for s in charts.values() if s["data"] and s["data"][0]["type"] == "scattergl"]
    assert scat and 1 <= len(scat[0]["data"]) <= 4
    # page 20 of 100 is the last; back to 100 per page from page 2 of 32 keeps a valid page
    at.radio(key="ex_atlas_size").set_value(100).run()
    assert not at.exception, at.exception
    assert len(_atlas_captions(at)) == 100
    # the grass concept of lupo (ground truth: its excluded crops are grass) occurs in many
    # classes
    at.selectbox(key="ex_atlas_k").set_value(_grass_concept(demo_ws)).run()
    occurs = [m.value for m in at.markdown if "occurs in" in m.value]
    n = int(occurs[0].split("occurs in ")[1].split()[0])
    assert n >= 6, occurs


def test_study_simulated_participants_beside_human_results(demo_ws):
    from explainer.concepts import explain_class, get_context
    from study import intruder as S

    ctx = get_context(demo_ws, "cpu")
    crops = {c: [[r.crop_id for r in con.crops] for con in
                 explain_class(ctx, c, device="cpu", cache=True).concepts] for c in (0, 1, 2)}
    study = S.create_study_from_crops(S.study_path(demo_ws), "demo", crops,
                                      trials_per_participant=4, seed=3)
    for t in S.trials_for(study, "hana"):  # a human answered every trial right
        S.record_answer(study, "hana", t, t.intruder_position)
    try:
        at = _app(ws="demo")
        at.switch_page("pages/study.py").run()
        assert not at.exception, at.exception
        at.selectbox(key="st_selected").set_value(study.study_id).run()
        assert "this model · layer3" in at.multiselect(key="st_sim_obs").options
        assert any("Press **Run the simulated participants**" in i.value for i in at.info)
        at.multiselect(key="st_sim_obs").set_value(["layer3", "layer2"])
        at.number_input(key="st_sim_trials").set_value(300)
        at.button(key="st_sim_run").click().run()
        assert not at.exception, at.exception
        assert not at.error, [e.value for e in at.error]
        metrics = {m.label: m for m in at.metric}
        assert metrics["Humans"].value == "100.0%"
        for layer in ("layer3", "layer2"):
            m = metrics[f"Simulated · this model · {layer}"]
            assert float(m.value.rstrip("%")) / 100 > 0.6  # well above chance (20 %)
            shuffled = float(m.delta.split()[1].rstrip("%")) / 100
            assert abs(shuffled - 0.2) < 0.1
        tables = [d.value for d in at.dataframe if "humans" in d.value.columns]
        assert len(tables) == 1
        table = tables[0]
        assert list(table["class"]) == [ctx.lm.class_names[c] for c in (0, 1, 2)]
        assert {"humans", "this model · layer3", "this model · layer2"} <= set(table.columns)
        assert sum(table["human answers"]) == 4
        assert any("trials ambiguous" in c.value for c in at.caption)
        # an ambiguous trial's five crops, the intruder marked once
        pick = at.selectbox(key="st_sim_pick")
        assert pick.options and "trial" in pick.options[0]
        caps = [c for im in at.image for c in im.captions if c.startswith("#")]
        from dataclasses import replace

        shown = S.trials_for(replace(study, trials_per_participant=300), "simulated")[
            int(pick.value) - 1]
        assert caps == [f"#{c}" for c in shown.crop_ids]
        assert sum("**intruder**" in m.value for m in at.markdown) == 1
        # a bad observer is one clear message, not a trace
        at.text_input(key="st_sim_other").input("layer9")
        at.button(key="st_sim_run").click().run()
        assert not at.exception, at.exception
        assert any("'layer9' is neither a layer of demo" in e.value for e in at.error), \
            [e.value for e in at.error]
    finally:
        S.close_all()  # let go of the workspace's study file (other processes may test it)


def test_map_selection_maps_points_to_crops_by_trace_and_index():
    """The browser sends ``curve_number`` / ``point_index`` per selected point (its custom data
    arrives in another shape: checked in Chromium); each maps to the crop at that position."""
    from types import SimpleNamespace

    from pages.ui.atlas import selected_crops

    crop_ids = np.array([10, 11, 12, 13, 14, 15])
    traces = [np.array([0, 2, 4]), np.array([1, 3, 5])]  # concept 1: crops 10, 12, 14; ...
    pts = [{"curve_number": 1, "point_index": 2}, {"curve_number": 0, "point_index": 0},
           {"curve_number": 1, "point_index": 2}, {"curve_number": 7, "point_index": 0},
           {"curve_number": 0, "point_index": 9}, {"curve_number": 0, "customdata": {"0": 1}},
           "junk"]
    event = SimpleNamespace(selection=SimpleNamespace(points=pts))
    assert selected_crops(event, traces, crop_ids) == [15, 10]
    assert selected_crops(None, traces, crop_ids) == []
    assert selected_crops(SimpleNamespace(selection=SimpleNamespace(points=[])), traces,
                          crop_ids) == []
