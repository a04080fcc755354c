"""Run history and export in a real headless Chromium: explain a class in (a private copy of) the
demo workspace, download the HTML report and open it offline (every crop image loads), download
the zip (the CLI's files), then stop the server, start it again and find the run on the Runs page.

Needs Debian's ``chromium`` (driven by the PyPI ``playwright`` package); skipped only when it is
absent and ``CI`` is not set (the same rule as tests/test_browser.py).
"""

from __future__ import annotations

import io
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from tests.test_browser import (
    CHROME_ARGS,
    CHROMIUM,
    KEY,
    SHOTS,
    T_LONG,
    Server,
    _free_port,
    _shot,
    _shot_on_failure,
    _wait_idle,
)


def _press_unless_stored(page, name: str) -> None:
    """Press the page's run button once the page shows either it or a stored result's crops."""
    from playwright.sync_api import expect

    button = page.get_by_role("button", name=name, exact=True)
    crops = page.locator("[data-testid='stImageCaption']").filter(has_text=re.compile(r"^#\d+$"))
    expect(button.or_(crops.first)).to_be_visible(timeout=T_LONG)
    if button.count():
        button.click()


@pytest.mark.timeout(1800)
def test_report_download_and_history_after_restart(demo_workspace, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM is not None
    SHOTS.mkdir(parents=True, exist_ok=True)
    home = tmp_path / "home"  # a private copy: the runs of this test land only there
    shutil.copytree(demo_workspace.root, home / "demo", symlinks=True,
                    ignore=shutil.ignore_patterns("runs", "runs.duckdb"))
    server = Server(home, _free_port(), tmp_path / "streamlit.log")
    server.start()
    report = tmp_path / "report.html"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS,
                                        headless=True)
            page = browser.new_page(viewport={"width": 1500, "height": 1100},
                                    accept_downloads=True)
            page.set_default_timeout(120_000)
            with _shot_on_failure(page, "failure_runs.png"):
                page.goto(f"{server.url}/explain?ws=demo&a=lupo&n=4&key={KEY}")
                expect(page.get_by_role("heading", name="Explain a class")).to_be_visible(
                    timeout=T_LONG)
                _wait_idle(page, T_LONG)
                _press_unless_stored(page, "Explain")
                expect(page.locator("[data-testid='stImageCaption']").filter(
                    has_text=re.compile(r"^#\d+$"))).to_have_count(32, timeout=T_LONG)
                expect(page.get_by_text("run #1 in the run history")).to_be_visible()
                _wait_idle(page)
                # ---- heatmaps: a concept chosen, hovering the larger view reads the strengths ---
                page.get_by_text("Show heatmaps (NMF").click()
                expect(page.get_by_text(re.compile("^colour scale: 0"))).to_be_visible()
                page.get_by_role("combobox", name="Highlight a concept").click()
                page.get_by_role("option", name="concept 2", exact=True).click()
                _wait_idle(page)
                expect(page.locator("[data-testid='stImageCaption']").filter(
                    has_text=re.compile(r"^1\. image \d+ · max "))).to_have_count(1)
                chart = page.locator("[data-testid='stPlotlyChart']").first
                chart.scroll_into_view_if_needed()
                expect(chart.locator(".heatmaplayer")).to_have_count(1, timeout=60_000)
                box = chart.locator(".nsewdrag").first.bounding_box()
                assert box is not None
                page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
                expect(chart.locator(".hoverlayer")).to_contain_text("concept 4:",
                                                                     timeout=30_000)
                _shot(page, "explain_heatmaps.png")
                with page.expect_download(timeout=120_000) as dl:
                    page.get_by_role("button", name="HTML report").click()
                dl.value.save_as(report)
                with page.expect_download(timeout=120_000) as dl2:
                    page.get_by_role("button", name="Files (zip)").click()
                zf = zipfile.ZipFile(io.BytesIO(Path(dl2.value.path()).read_bytes()))
                names = set(zf.namelist())
                assert {"explanation.json", "arrays.npz", "summary.md",
                        "parameters.json"} <= names
                assert sum(n.startswith("concept_") for n in names) == 32

                # ---- the report, opened with every network request refused ----------------------
                offline = browser.new_page(viewport={"width": 1200, "height": 900})
                fetched: list[str] = []
                offline.route(re.compile(r"^https?://"),
                              lambda route: (fetched.append(route.request.url), route.abort()))
                offline.goto(report.as_uri())
                offline.wait_for_function("() => [...document.images].every(i => i.complete)")
                loaded = offline.evaluate(
                    "() => [...document.images].filter(i => i.naturalWidth > 0).length")
                total = offline.evaluate("() => document.images.length")
                crops = offline.evaluate(
                    "() => [...document.querySelectorAll('.crops img')]"
                    ".filter(i => i.naturalWidth > 0).length")
                assert crops == 32 and loaded == total and total > 32
                expect(offline.get_by_text(re.compile(r"^(PASS|FAIL)$")).first).to_be_visible()
                assert fetched == []
                offline.screenshot(path=str(SHOTS / "report_html.png"), full_page=True)
                offline.close()
            browser.close()
        server.kill()

        # ---- a new server process: the run is still in the history ------------------------------
        server.start()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS,
                                        headless=True)
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.set_default_timeout(120_000)
            with _shot_on_failure(page, "failure_runs_restart.png"):
                page.goto(f"{server.url}/runs?ws=demo&key={KEY}")
                expect(page.get_by_role("heading", name="Runs")).to_be_visible(timeout=T_LONG)
                _wait_idle(page, T_LONG)
                expect(page.get_by_text(re.compile(r"#1 · explain lupo · n=4")).first
                       ).to_be_visible()
                expect(page.locator("[data-testid='stImageCaption']").filter(
                    has_text=re.compile(r"^#\d+$"))).to_have_count(2 * 32, timeout=T_LONG)
                expect(page.locator("[data-testid='stException']")).to_have_count(0)
                _wait_idle(page)
                _shot(page, "runs_after_restart.png")
            browser.close()
    finally:
        server.kill()
