"""The Evaluate page in a real headless Chromium (issue 10, item 4): the server opened on a
finished demo sweep (a link naming the sweep, never a path) draws the plotly figures and the
table; a screenshot goes to ``artifacts/screenshots/evaluate.png``.

Same setup as tests/test_browser.py (Debian's ``chromium`` driven by ``playwright``; skipped only
when chromium is absent and ``CI`` is not set)."""

from __future__ import annotations

from test_browser import (  # skips this module too when chromium is absent outside CI
    KEY,
    SHOTS,
    _shot,
    _wait_idle,
    browser_session,
)

from explainer.sweep import SweepSpec, run_sweep, sweep_folder


def test_the_evaluate_page_draws_a_finished_sweep(multilayer_workspace, tmp_path):
    from playwright.sync_api import expect

    spec = SweepSpec(layers=("layer3.relu_out", "layer4.relu_out"), n=(2, 4), samples=(8,),
                     methods=("grad_x_act",), baselines=("random",), limit=2)
    run_sweep(multilayer_workspace, spec, sweep_folder(multilayer_workspace, "browser-grid"),
              device="cpu", png=False)
    with browser_session(multilayer_workspace.root.parent, tmp_path) as (server, page):
        page.goto(f"{server.url}/evaluate?ws=multi&sweep=browser-grid&key={KEY}")
        _wait_idle(page)
        expect(page.get_by_text("Evaluate: the paper's sweeps")).to_be_visible()
        charts = page.locator("[data-testid='stPlotlyChart']")
        expect(charts.first).to_be_visible()
        plot = charts.first.locator(".js-plotly-plot .main-svg").first
        expect(plot).to_be_visible()
        # plotly drew the traces: one legend entry per layer x method and baseline
        legend = charts.first.locator(".legendtext").evaluate_all(
            "els => els.map(e => e.textContent)")
        assert "layer4.relu_out · grad_x_act" in legend
        assert "layer3.relu_out · random crops" in legend
        expect(charts.first.locator(".gtitle")).to_contain_text("Fig. 4")
        expect(page.locator("[data-testid='stDataFrame']").first).to_be_visible()
        _shot(page, "evaluate.png")
        assert (SHOTS / "evaluate.png").stat().st_size > 10_000
