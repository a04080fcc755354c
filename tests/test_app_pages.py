"""Headless page tests (``streamlit.testing.v1.AppTest``) on the real demo workspace: every page
driven through its widgets, asserting what it renders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
T = 900  # seconds: an explanation on 2 busy CPU cores


@pytest.fixture
def demo_ws(demo_workspace, monkeypatch):
    """The shared ``demo`` workspace (``demo_workspace`` in tests/conftest.py: built once per
    pytest session for every test file), with ``CONCEPT_EXPLORER_HOME`` pointing at its parent so
    the app opens it by name. No lead key unless a test sets one."""
    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(demo_workspace.root.parent))
    monkeypatch.delenv("CONCEPT_EXPLORER_LEAD_KEY", raising=False)
    return demo_workspace


def pick_classes(ws) -> tuple[int, int, list[str]]:
    """Two well-populated predicted classes of the workspace, preferring the demo's planted
    shortcut pair (lupo vs husko)."""
    from data_index.catalog import Catalog
    from explorer_core.models import load_model

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


def _press_unless_stored(at, key: str) -> None:
    """Press the page's run button; a result already in the workspace's cache (another test
    computed it, or a kept DEMO_WORKSPACE_HOME) is shown without one."""
    if key in [b.key for b in at.button]:
        at.button(key=key).click().run()


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


def test_url_with_a_folder_path_computes_nothing(demo_ws, tmp_path):
    """``/explain?ws=/some/folder&a=lupo&run=1``: a URL names only workspaces under the home.
    The folder is a complete workspace (sharing the demo's catalog) with a pickle planted in
    its cache: the page shows the error, computes nothing and reads nothing there."""
    import pickle

    from explorer_core import cache

    folder = tmp_path / "some" / "folder"
    folder.mkdir(parents=True)
    (folder / "workspace.toml").write_text((demo_ws.root / "workspace.toml").read_text())
    for name in ("catalog.duckdb", "index", "world"):
        (folder / name).symlink_to(demo_ws.root / name)
    marker = tmp_path / "EXECUTED"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "cache" / "explain").mkdir(parents=True)
    (folder / "cache" / "explain" / "planted.pkl").write_bytes(pickle.dumps(Evil()))
    cache.reset_stats()
    for page in ("pages/explain.py", "pages/contrast.py", "pages/home.py"):
        at = _app(ws=str(folder), a="lupo", b="husko", run=1)
        at.switch_page(page).run()
        assert not at.exception, at.exception
        assert any("Refused workspace" in e.value and "workspace home" in e.value
                   for e in at.error), (page, [e.value for e in at.error])
    assert cache.STATS == {}  # no cache lookup: nothing was computed
    assert sorted(p.name for p in (folder / "cache").rglob("*")) == ["explain", "planted.pkl"]
    assert not marker.exists()


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
    _press_unless_stored(at, "ex_run")
    assert not at.exception, at.exception
    caps = _crop_captions(at)
    assert len(caps) == 4 * 8
    # every crop has its provenance (in its "where from" popover): crop id, both predictions
    prov = [m.value for m in at.markdown if m.value.startswith("**crop ")]
    assert sorted(int(v.split("**")[1].split()[1]) for v in prov) == sorted(
        int(c[1:]) for c in caps)
    assert all("crop predicted:" in v and "image predicted:" in v for v in prov)
    # the demo's lupo (and every demo class, README) passes the prediction test
    assert [e.value for e in at.error] == []
    assert any(s.value.startswith(f"PASS — the stitched top crops are classified as "
                                  f"**{names[a]}**") for s in at.success)
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
    _press_unless_stored(at, "co_run")
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
    assert not at.exception, at.exception
    shown = [m.value for m in at.markdown if "P(A)" in m.value]
    assert len(shown) == 8
    # each sample image with the class it is now predicted as, by name
    assert all(any(f"predicted **{n}**" in v for n in names) for v in shown), shown


def test_test_bench_stitch_and_bad_input(demo_ws):
    a, b, names = pick_classes(demo_ws)
    at = _app(ws="demo", t=names[a], a=names[a], b=names[b])
    at.switch_page("pages/test_bench.py").run()
    assert not at.exception, at.exception
    # the top-1 crops of the class's explanation (the explain page's defaults) pass on the
    # bench as they do on the explain page, with the same P(A)
    from explainer.concepts import explain_class

    expl = explain_class(demo_ws, a, n_concepts=4, method="deeplift", max_images=500, seed=0,
                         m=8, device="cpu")
    top = [c.crops[0].crop_id for c in expl.concepts]
    at.text_input(key="tb_typed").input(", ".join(map(str, top))).run()
    assert [e.value for e in at.error] == []
    pt = expl.prediction_test
    assert pt is not None and pt.passed and pt.crop_ids == top
    assert any(s.value.startswith(f"PASS — the stitched crops are classified as **{names[a]}** "
                                  f"(P({names[a]}) = {pt.prob_target:.3f})")
               for s in at.success), [s.value for s in at.success]
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

    from study import intruder as S

    a, b, names = pick_classes(demo_ws)
    at = _app(ws="demo")
    at.switch_page("pages/study.py").run()
    assert not at.exception, at.exception
    # without CONCEPT_EXPLORER_LEAD_KEY the lead is told that participants could get in
    assert any("No lead key" in w.value for w in at.warning)
    at.multiselect(key="st_classes").set_value([a, b])
    at.number_input(key="st_trials").set_value(5)
    at.button(key="st_create").click().run()
    assert not at.exception, at.exception
    assert any("created" in s.value for s in at.success)
    at.text_input(key="st_pid").input("alice").run()
    link = [c.value for c in at.code if "participant=alice" in c.value]
    assert link, [c.value for c in at.code]
    q = _link_params(link[0])
    token = q["study"]
    assert set(q) == {"study", "participant", "sig"}
    # links for many participants: a table of signed links and a CSV download
    at.text_area(key="st_pids").input("bob\ncarol\nbad/name\n").run()
    assert not at.exception, at.exception
    assert len(at.dataframe) == 1  # no answers yet: the links table is the only table
    table = at.dataframe[0].value
    assert list(table["participant"]) == ["bob", "carol"]
    assert all(_link_params(u)["participant"] == p for p, u in zip(table["participant"],
                                                                    table["link"]))
    assert any("Skipped 1 invalid" in w.value for w in at.warning)

    # the participant's view: only the trials, no navigation, no results
    pt = _app(**q).run()
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

    # alice's link with another participant's name (or no signature): one refusal, no trials
    bob_sig = _link_params(table["link"][0])["sig"]
    for params in (dict(q, participant="bob"), dict(study=token, participant="alice"),
                   dict(q, sig=bob_sig), dict(q, sig="0" * 16)):
        tampered = _app(**params).run()
        assert not tampered.exception, tampered.exception
        assert [e.value for e in tampered.error] == [
            f"This link is not valid for participant `{params['participant']}`; ask the study "
            "lead for your personal link."], params
        assert not tampered.image and not tampered.button and not tampered.title
        assert not tampered.get("progress") and not _lead_content(tampered)
    # bob's own link works
    assert len(_app(**_link_params(table["link"][0])).run().image) == 5
    assert len(S.answers(study)) == 1  # nothing was answered through a refused link


def _link_params(link: str) -> dict[str, str]:
    from urllib.parse import parse_qs, urlsplit

    return {k: v[0] for k, v in parse_qs(urlsplit(link).query).items()}


def test_self_registration_cannot_take_an_existing_name(demo_ws):
    from study import intruder as S

    crops = {0: [list(range(0, 8)), list(range(8, 16))]}
    study = S.create_study_from_crops(S.study_path(demo_ws), "demo", crops,
                                      trials_per_participant=3, seed=0)
    S.register_participant(study, "alice")  # the lead gave alice a link
    at = _app(study=study.token).run()
    assert not at.exception, at.exception
    assert [t.label for t in at.text_input] == ["Your name or participant id"]
    at.text_input[0].input("alice")
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert any("This name is taken; use your personal link" in e.value for e in at.error)
    assert not at.image and "participant" not in at.query_params
    # a new name registers and moves to its signed link
    at.text_input[0].input("zoe")
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert at.query_params["participant"] == "zoe"
    assert S.verify_participant(study, "zoe", at.query_params["sig"])
    assert len(at.image) == 5 and not at.error
    assert "zoe" in S.list_participants(study)
    # now zoe is taken too: someone else typing it is refused
    other = _app(study=study.token).run()
    other.text_input[0].input("zoe")
    other.button[0].click().run()
    assert any("is taken" in e.value for e in other.error) and not other.image
    # ... unless the link carries zoe's valid signature
    own = _app(study=study.token, sig=S.participant_sig(study, "zoe")).run()
    own.text_input[0].input("zoe")
    own.button[0].click().run()
    assert not own.error and len(own.image) == 5
    S.close_all()


# ---- access control: the lead key and participant-only sessions --------------------------------

KEY = "lead-secret-42"
LEAD_PAGES = ("pages/home.py", "pages/explain.py", "pages/contrast.py", "pages/test_bench.py",
              "pages/study.py")
LEAD_TITLES = {"Concept explorer", "Explain a class", "Contrast two classes", "Test bench",
               "Intruder detection study"}


def _lead_content(at) -> list[str]:
    """What of a lead page was rendered (empty: nothing)."""
    found = [t.value for t in at.title if t.value in LEAD_TITLES]
    found += [f"metric {m.label}" for m in at.metric]
    found += [f"dataframe {i}" for i, _ in enumerate(at.dataframe)]
    found += [f"selectbox {s.label}" for s in at.selectbox]
    found += [f"multiselect {s.label}" for s in at.multiselect]
    found += [f"code {c.value}" for c in at.code]
    return found


def _locked(at) -> bool:
    return [t.label for t in at.text_input] == ["Lead key"] and not _lead_content(at)


def test_lead_key_locks_every_lead_page(demo_ws, monkeypatch):
    monkeypatch.setenv("CONCEPT_EXPLORER_LEAD_KEY", KEY)
    for page in LEAD_PAGES:
        at = _app(ws="demo")
        if page != "pages/home.py":
            at.switch_page(page)
        at.run()
        assert not at.exception, (page, at.exception)
        assert _locked(at), (page, _lead_content(at))
    # second line of defence: each lead page run on its own (app.py bypassed) is locked too
    from streamlit.testing.v1 import AppTest

    for page in LEAD_PAGES:
        direct = AppTest.from_file(str(ROOT / page), default_timeout=T)
        direct.query_params["ws"] = "demo"
        direct.run()
        assert not direct.exception, (page, direct.exception)
        assert _locked(direct), (page, _lead_content(direct))
    # a wrong key is a message, still locked; the right one opens the page that was asked for
    # (AppTest runs app.py only on a test's first run and the page file directly afterwards, and
    # widget ids depend on the running script, so the form is driven from a page run)
    at = _app(ws="demo").run()
    at.switch_page("pages/explain.py").run()
    at.text_input(key="lead_key_input").input("wrong")
    at.button[0].click().run()
    assert _locked(at) and any("Wrong key" in e.value for e in at.error)
    at.text_input(key="lead_key_input").input(KEY)
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert [t.value for t in at.title] == ["Explain a class"]
    # once per browser session: other pages open without the key again
    at.switch_page("pages/home.py").run()
    assert int({m.label: m.value for m in at.metric}["Images"]) > 100
    at.switch_page("pages/study.py").run()
    assert not any("No lead key" in w.value for w in at.warning)


def test_lead_key_in_the_url_unlocks_and_leaves_the_url(demo_ws, monkeypatch):
    monkeypatch.setenv("CONCEPT_EXPLORER_LEAD_KEY", KEY)
    at = _app(ws="demo", key=KEY).run()
    assert not at.exception, at.exception
    assert "key" not in at.query_params
    assert int({m.label: m.value for m in at.metric}["Images"]) > 100
    bad = _app(ws="demo", key="nope").run()
    assert "key" not in bad.query_params
    assert _locked(bad) and any("wrong" in e.value for e in bad.error)


@pytest.mark.parametrize("lead_key", ["", KEY])
def test_participant_session_never_reaches_lead_pages(demo_ws, monkeypatch, lead_key):
    from study import intruder as S

    monkeypatch.setenv("CONCEPT_EXPLORER_LEAD_KEY", lead_key)
    crops = {0: [list(range(0, 8)), list(range(8, 16))]}
    study = S.create_study_from_crops(S.study_path(demo_ws), "demo", crops,
                                      trials_per_participant=3, seed=0)
    bob = {"study": study.token, "participant": "bob", "sig": S.participant_sig(study, "bob")}
    pt = _app(**bob).run()
    assert not pt.exception, pt.exception
    assert len(pt.image) == 5 and not _lead_content(pt)
    # app.py registered only the participant page: the lead pages cannot be navigated to
    for page in LEAD_PAGES:
        with pytest.raises(ValueError, match="Could not find a navigation page"):
            pt.switch_page(page)
    # the participant drops the query parameters (and adds the key): still only the trials
    for k in list(pt.query_params):
        del pt.query_params[k]
    if lead_key:
        pt.query_params["key"] = lead_key
    pt.run()
    assert not pt.exception, pt.exception
    assert [t.value for t in pt.title] == ["Find the odd one out"]
    assert len(pt.image) == 5 and not _lead_content(pt)
    # each lead page run on its own (app.py bypassed) in a participant session shows nothing
    from streamlit.testing.v1 import AppTest

    for page in LEAD_PAGES:
        direct = AppTest.from_file(str(ROOT / page), default_timeout=T)
        direct.session_state["_participant_link"] = dict(bob)
        direct.query_params["ws"] = "demo"
        direct.run()
        assert not direct.exception, (page, direct.exception)
        assert not _lead_content(direct) and not direct.text_input, (page, _lead_content(direct))
        assert any("study participant" in i.value for i in direct.info)
    # a fresh run of app.py in a session marked participant-only routes to the trials only
    fresh = _app(ws="demo")
    fresh.session_state["_participant_link"] = dict(bob)
    fresh.run()
    assert not fresh.exception, fresh.exception
    assert [t.value for t in fresh.title] == ["Find the odd one out"]
    assert len(fresh.image) == 5 and not _lead_content(fresh)
    S.close_all()


# ---- several layers (issue 10 item 1) ---------------------------------------------------------

@pytest.fixture
def multi_ws(multilayer_workspace, monkeypatch):
    """The three-layer demo catalog (tests/conftest.py), opened by name (``multi``)."""
    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(multilayer_workspace.root.parent))
    monkeypatch.delenv("CONCEPT_EXPLORER_LEAD_KEY", raising=False)
    return multilayer_workspace


def test_home_shows_the_layers_and_the_grid(multi_ws):
    at = _app(ws="multi").run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert list(table["layer"]) == ["layer3.relu_out", "layer4.bn2", "layer4.relu_out"]
    assert list(table["channels"]) == [96, 192, 192]
    assert list(table["default"]) == [False, False, True]
    assert list(table["non-negative"]) == [True, False, True]
    assert list(table["search index"]) == ["exact"] * 3  # issue 9: the index and its recall
    assert list(table["recall@8"]) == [1.0] * 3
    assert any("3x3 crops of 32 px, stride 32, on 96 px images" in m.value and "float16" in
               m.value for m in at.markdown)


def test_explain_page_layer_picker_kept_in_the_url(multi_ws):
    a, _b, names = pick_classes(multi_ws)
    at = _app(ws="multi", a=names[a], n=2, images=8, method="grad_x_act",
              layer="layer3.relu_out")
    at.switch_page("pages/explain.py").run()
    assert not at.exception, at.exception
    picker = at.selectbox(key="ex_layer")
    assert picker.options == ["layer3.relu_out (96 ch)", "layer4.bn2 (192 ch, has negative "
                              "outputs)", "layer4.relu_out (192 ch, default)"]
    assert picker.value == "layer3.relu_out"
    at.button(key="ex_run").click().run()
    assert not at.exception, at.exception
    assert any("layer `layer3.relu_out`" in m.value for m in at.markdown)
    assert len(_crop_captions(at)) == 2 * 8
    from explainer.concepts import explain_class

    def shown_for(layer: str) -> list[str]:  # the crops the page shows for that layer
        expl = explain_class(multi_ws, a, n_concepts=2, method="grad_x_act", max_images=8,
                             seed=0, m=8, device="cpu", layer=layer)
        return [f"#{r.crop_id}" for c in expl.concepts for r in c.crops]

    assert _crop_captions(at) == shown_for("layer3.relu_out")
    picker.set_value("layer4.relu_out").run()  # another layer: its own result
    assert not at.exception, at.exception
    assert at.query_params["layer"] in ("layer4.relu_out", ["layer4.relu_out"])
    assert any("layer `layer4.relu_out`" in m.value for m in at.markdown)
    caps = _crop_captions(at)
    assert caps in ([], shown_for("layer4.relu_out")) and caps != shown_for("layer3.relu_out")
    at.switch_page("pages/contrast.py").run()  # the choice follows to the contrast page
    assert not at.exception, at.exception
    assert at.selectbox(key="co_layer").value == "layer4.relu_out"


def test_a_one_layer_catalog_has_no_layer_picker(demo_ws):
    at = _app(ws="demo", layer="layer3.relu_out")  # a layer the catalog lacks: ignored
    at.switch_page("pages/explain.py").run()
    assert not at.exception, at.exception
    assert "ex_layer" not in [w.key for w in at.selectbox]
    assert any("layer `layer4.relu_out`" in m.value for m in at.markdown)
