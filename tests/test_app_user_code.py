"""The app and the user's own model code, and synthesised concepts on the Explain page
(headless ``AppTest``).

* A workspace whose model is a ``python:`` spec, opened by a link: every page refuses to load it
  (the file is never imported) until this browser session confirms "I trust model.py: load it"
  on the Workspace page; another session's confirmation does not count.
* The create form shows the warning and loads the typed spec only after the confirmation.
* Explain page: "Synthesise" shows an image per concept beside its crops; a second visit (a new
  session) shows the stored images without the button.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_catalog_robust import noise_images
from test_seg_models import user_model

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")


def _app(**params):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=600)
    for k, v in params.items():
        at.query_params[k] = str(v)
    return at


@pytest.fixture(scope="module")
def user_ws(tmp_path_factory):
    """A workspace 'mine' over 9 noise images whose model is a python: classifier; a marker
    file records every import of its model.py after the build."""
    from cli.data_index_cmd import main
    from explorer_core.models import forget_shared_models

    home = tmp_path_factory.mktemp("home")
    spec = user_model(home.parent / f"{home.name}-model", "TinyClassifier",
                      {"kwargs": {"classes": 3}, "input_size": 48, "layer": "relu2"})
    model_py = Path(spec.split(":")[1])
    noise_images(home.parent / f"{home.name}-imgs", 9, size=(64, 64))
    assert main(["build", "--workspace", str(home / "mine"), "--model", spec, "--images",
                 str(home.parent / f"{home.name}-imgs"), "--device", "cpu", "--quiet"]) == 0
    marker = home.parent / f"{home.name}-IMPORTED"
    with open(model_py, "a") as fh:
        fh.write(f"\nopen({str(marker)!r}, 'a').write('x')\n")
    forget_shared_models()
    return home, model_py, marker


def test_a_link_never_runs_the_model_file(user_ws, monkeypatch):
    home, model_py, marker = user_ws
    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(home))
    monkeypatch.delenv("CONCEPT_EXPLORER_LEAD_KEY", raising=False)
    for page in ("pages/explain.py", "pages/contrast.py", "pages/test_bench.py"):
        at = _app(ws="mine", a="class_0", run=1)
        at.switch_page(page).run()
        assert not at.exception, at.exception
        errs = [e.value for e in at.error]
        assert any("runs the Python code in" in e and str(model_py) in e and "I trust" in e
                   for e in errs), (page, errs)
    assert not marker.exists()
    # the Workspace page: a warning and the confirmation button, nothing loaded before it
    at = _app(ws="mine").run()
    assert not at.exception, at.exception
    assert any(str(model_py) in w.value and "runs its Python code" in w.value
               for w in at.warning)
    assert not marker.exists() and not at.metric
    at.button(key="home_trust").click().run()
    assert not at.exception, at.exception
    assert marker.read_text() == "x"  # imported once, now that the session confirmed
    assert int({m.label: m.value for m in at.metric}["Images"]) == 9
    # the same session may now open the other pages
    at.switch_page("pages/explain.py").run()
    assert not at.exception, at.exception
    assert not any("runs the Python code" in e.value for e in at.error)
    assert any(b.key == "ex_run" for b in at.button)
    # a new session (another browser) is refused, although the server holds the model now
    other = _app(ws="mine")
    other.switch_page("pages/explain.py").run()
    assert any("runs the Python code in" in e.value for e in other.error)


def test_create_form_warns_and_loads_after_the_ok(user_ws, monkeypatch, tmp_path):
    home, model_py, marker = user_ws
    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(home))
    monkeypatch.delenv("CONCEPT_EXPLORER_LEAD_KEY", raising=False)
    spec = user_model(tmp_path / "other", "TinyUNet", {"input_size": 64})
    at = _app(ws="mine").run()
    at.text_input(key="new_spec").input(spec).run()
    assert not at.exception, at.exception
    assert any("runs its Python code" in w.value and "other" in w.value for w in at.warning)
    assert not any(s.key == "new_layer" for s in at.selectbox)  # not loaded yet
    at.button(key="new_trust").click().run()
    assert not at.exception, at.exception
    layer = at.selectbox(key="new_layer")
    assert layer.value.startswith("bottleneck")  # the segmenter's recommended layer


def test_explain_page_synthesises_concepts(demo_workspace, monkeypatch):
    import shutil

    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(demo_workspace.root.parent))
    monkeypatch.delenv("CONCEPT_EXPLORER_LEAD_KEY", raising=False)
    # a kept workspace (DEMO_WORKSPACE_HOME) may hold syntheses of an earlier run
    shutil.rmtree(demo_workspace.cache_dir / "synthesis", ignore_errors=True)

    def explain_page():
        at = _app(ws="demo", a="zebrox", n=2, images=30, run=1)
        at.switch_page("pages/explain.py").run()
        assert not at.exception, at.exception
        at.number_input(key="ex_syn_steps").set_value(16).run()
        return at

    def synthesised(at):
        return [c for im in at.image for c in im.captions if c.startswith("synthesised")]

    at = explain_page()
    assert synthesised(at) == []
    at.button(key="ex_syn_run").click().run()
    assert not at.exception, at.exception
    assert synthesised(at) == ["synthesised 32 px"] * 2
    assert sum("alignment **" in m.value for m in at.markdown) == 2
    assert any("synthesised images are classified as" in v.value
               for v in [*at.success, *at.error])
    again = explain_page()  # a new session: read from the cache, no button needed
    assert synthesised(again) == ["synthesised 32 px"] * 2
    assert not any(b.key == "ex_syn_run" for b in again.button)
