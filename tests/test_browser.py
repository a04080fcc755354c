"""End to end in a real headless Chromium, the server started with a lead key: the lead-key form,
then the app on the demo workspace, an explanation with 8 crops per concept, the exclusion toggle,
a look at every other lead page, then a participant (no key, a signed link) answering 3 intruder
trials, the same link with another participant's name refused, a server kill + restart, and the
participant continuing at trial 4 with exactly 3 answers in DuckDB.

Needs Debian's ``chromium`` (driven by the PyPI ``playwright`` package, no browser download).
Skipped only when chromium is absent and ``CI`` is not set; in CI it must run.
Screenshots go to ``artifacts/screenshots/``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--no-first-run", "--disable-component-update", "--disable-sync"]
T_LONG = 600_000  # ms: an explanation on 2 busy CPU cores

if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("chromium is not installed (apt-get install -y chromium); the real-browser "
                "test runs in CI", allow_module_level=True)

KEY = "browser-lead-key"


@pytest.fixture
def demo_home(demo_workspace) -> Path:
    """``CONCEPT_EXPLORER_HOME`` of the shared demo workspace (tests/conftest.py)."""
    return demo_workspace.root.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``streamlit run app.py`` as a subprocess on a free port."""

    def __init__(self, home: Path, port: int, log: Path) -> None:
        self.home, self.port, self.log = home, port, log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> None:
        env = dict(os.environ, CONCEPT_EXPLORER_HOME=str(self.home), PYTHONUNBUFFERED="1",
                   CONCEPT_EXPLORER_LEAD_KEY=KEY)
        fh = open(self.log, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
             "--server.port", str(self.port), "--server.address", "127.0.0.1",
             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
            cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited early: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)  # polling the health endpoint: nothing to wait on instead
        raise RuntimeError("streamlit did not become healthy in time")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a hard kill: answers must be durable
            self.proc.wait(timeout=30)
        self.proc = None


@contextlib.contextmanager
def browser_session(home: Path, tmp_path: Path, height: int = 1100):
    """A Streamlit server over ``home`` (lead key set) and a headless Chromium page on a
    1500 x ``height`` viewport, 2 min default timeout; yields ``(server, page)``, and closes
    the browser and kills the server whatever happens."""
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    server = Server(home, _free_port(), tmp_path / "streamlit.log")
    server.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1500, "height": height})
                page.set_default_timeout(120_000)
                yield server, page
            finally:
                browser.close()
    finally:
        server.kill()


def _answers(path: Path, token: str) -> list[tuple]:
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("""SELECT a.participant_id, a.trial_index, a.chosen_position,
                len(a.crop_ids) FROM answers a JOIN studies s USING (study_id)
                WHERE s.token = ? ORDER BY a.trial_index""", [token]).fetchall()
    finally:
        con.close()


def _wait_idle(page, timeout: int = 120_000) -> None:
    """Wait until the script run finished and no stale element is left, so a click lands on
    the current run's widgets (a click on a stale button of the previous run is lost)."""
    page.wait_for_function(
        "() => { const a = document.querySelector(\"[data-testid='stApp']\");"
        " return a && a.getAttribute('data-test-script-state') === 'notRunning' &&"
        " !document.querySelector(\"[data-stale='true']\"); }", timeout=timeout)


def _crop_captions(page) -> list[str]:
    return page.locator("[data-testid='stImageCaption']").filter(
        has_text=re.compile(r"^#\d+$")).all_inner_texts()


def _shot(page, name: str) -> None:
    """A screenshot of the whole page: Streamlit scrolls inside its main section, so the
    viewport is stretched to the content's height for the shot."""
    size = page.viewport_size
    h = page.evaluate("() => Math.max(...[...document.querySelectorAll("
                      "\"[data-testid='stMain'], [data-testid='stMainBlockContainer']\")]"
                      ".map(e => e.scrollHeight), 0)")
    if h > size["height"]:
        page.set_viewport_size({"width": size["width"], "height": min(int(h) + 40, 8000)})
        page.wait_for_load_state()
    try:
        page.screenshot(path=str(SHOTS / name), full_page=True)
    finally:
        page.set_viewport_size(size)


@contextlib.contextmanager
def _shot_on_failure(page, name: str):
    """A screenshot of the page as it was when a step failed (CI artifact)."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            _shot(page, name)
        raise


def _press_unless_stored(page, name: str) -> None:
    """Press a page's run button (the page is idle); a result already in the workspace's cache
    (a kept DEMO_WORKSPACE_HOME, a precompute) is shown without one."""
    button = page.get_by_role("button", name=name, exact=True)
    if button.count():
        button.click()


@pytest.mark.timeout(1800)
def test_browser_end_to_end(demo_workspace, demo_home, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from study import intruder as S
    from tests.test_app_pages import pick_classes

    SHOTS.mkdir(parents=True, exist_ok=True)
    demo_ws = demo_workspace
    cls_a, cls_b, names = pick_classes(demo_ws)
    server = Server(demo_home, _free_port(), tmp_path / "streamlit.log")
    server.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS,
                                        headless=True)
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.set_default_timeout(120_000)
            with _shot_on_failure(page, "failure_lead.png"):
                # ---- the lead key: a fresh browser sees only the form --------------------------
                page.goto(f"{server.url}/explain?ws=demo&a={names[cls_a]}&n=4")
                expect(page.get_by_text("lead key needed")).to_be_visible(timeout=T_LONG)
                _wait_idle(page, T_LONG)
                expect(page.get_by_text("Explain a class")).to_have_count(0)
                _shot(page, "lead_key_form.png")
                page.get_by_label("Lead key", exact=True).and_(page.locator("input")).fill(KEY)
                page.get_by_role("button", name="Unlock").click()
                # ---- explain a class (the page asked for, once unlocked) -------------------------
                expect(page.get_by_role("heading", name="Explain a class")).to_be_visible(
                    timeout=T_LONG)
                _wait_idle(page, T_LONG)
                _press_unless_stored(page, "Explain")
                expect(page.locator("[data-testid='stImageCaption']").filter(
                    has_text=re.compile(r"^#\d+$"))).to_have_count(32, timeout=T_LONG)
                # a fresh server's first request is a page URL: app.py's navigation must still rule
                nav = page.locator("[data-testid='stSidebarNav']")
                expect(nav).to_contain_text("Explain a class")
                expect(nav).not_to_contain_text("participant")
                before = _crop_captions(page)
                assert len(before) == 32 and len(set(before[:8])) == 8
                expect(page.get_by_text(re.compile("PASS|FAIL")).first).to_be_visible()
                _shot(page, "explain.png")
                _wait_idle(page)
                page.get_by_text("Exclude target-class crops").click()
                page.wait_for_function("() => new URL(location.href).searchParams.get('excl') "
                                       "=== '1'", timeout=60_000)
                expect(page.locator("[data-testid='stImageCaption']").filter(
                    has_text=re.compile(r"^#\d+$"))).to_have_count(32, timeout=60_000)
                page.wait_for_function(
                    "(b) => { const c = [...document.querySelectorAll("
                    "\"[data-testid='stImageCaption']\")].map(e => e.innerText)"
                    ".filter(t => /^#\\d+$/.test(t)); return c.length === 32 && "
                    "c.join() !== b.join(); }", arg=before, timeout=60_000)
                after = _crop_captions(page)
                assert after != before
                _wait_idle(page)
                _shot(page, "explain_excluded.png")

                # ---- a study created by the lead (before the server opens the study file) ------
                study = S.create_study(demo_ws, [cls_a, cls_b], n_concepts=4,
                                       trials_per_participant=6, seed=3)
                token, path = study.token, study.path
                S.close_all()  # the server process is the one writer from now on

                # ---- the other lead pages, through the sidebar (same session: no key again) -------
                nav.get_by_text("Contrast two classes").click()
                _wait_idle(page, T_LONG)
                _press_unless_stored(page, "Contrast")
                expect(page.locator("[data-testid='stPlotlyChart']")).to_have_count(1, timeout=T_LONG)
                expect(page.get_by_text("Offset t", exact=True)).to_be_visible(timeout=T_LONG)
                _wait_idle(page, T_LONG)
                _shot(page, "contrast.png")
                for label, shot in (("Test bench", "test_bench"), ("Intruder study", "study"),
                                    ("Workspace", "home")):
                    nav.get_by_text(label, exact=True).click()
                    _wait_idle(page, T_LONG)
                    expect(page.locator("[data-testid='stException']")).to_have_count(0)
                    _shot(page, f"{shot}.png")
                # ?key= in a link unlocks a fresh session and leaves the address bar at once
                page.goto(f"{server.url}/?ws=demo&key={KEY}")
                expect(page.get_by_text("Crops", exact=True).first).to_be_visible(timeout=T_LONG)
                page.wait_for_function("() => !new URL(location.href).searchParams.has('key')",
                                       timeout=60_000)

                # ---- a participant answers the lead's study ----------------------------------
                link = S.participant_link(study, "alice", f"{server.url}/")
                assert "&sig=" in link
                page.goto(link)
                for k in range(1, 4):
                    expect(page.get_by_text(f"Trial {k} of 6")).to_be_visible(timeout=120_000)
                    expect(page.locator("[data-testid='stSidebarNav']")).to_have_count(0)
                    expect(page.locator("[data-testid='stImage']")).to_have_count(5)
                    _wait_idle(page)
                    if k == 1:
                        expect(page.get_by_role("button", name="Odd one: 5")).to_be_visible()
                        _shot(page, "participant_trial1.png")
                    page.get_by_role("button", name=f"Odd one: {k}").click()
                expect(page.get_by_text("Trial 4 of 6")).to_be_visible(timeout=120_000)
                # alice's link edited to answer as bob: one refusal, no trial
                page.goto(link.replace("participant=alice", "participant=bob"))
                expect(page.get_by_text("This link is not valid for participant")).to_be_visible(
                    timeout=120_000)
                _wait_idle(page)
                expect(page.locator("[data-testid='stImage']")).to_have_count(0)
                expect(page.get_by_role("button", name="Odd one: 1")).to_have_count(0)
            browser.close()
        server.kill()
        rows = _answers(path, token)
        assert [(r[0], r[1], r[2], r[3]) for r in rows] == [("alice", 0, 0, 5), ("alice", 1, 1, 5),
                                                            ("alice", 2, 2, 5)]
        # ---- restart: the participant continues at trial 4 ----------------------------------
        server.start()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS,
                                        headless=True)
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.goto(link)
            expect(page.get_by_text("Trial 4 of 6")).to_be_visible(timeout=120_000)
            expect(page.locator("[data-testid='stImage']")).to_have_count(5)
            _wait_idle(page)
            _shot(page, "participant_after_restart.png")
            # the lead's results page (key in the link) counts alice's 3 answers
            page.goto(f"{server.url}/study?ws=demo&key={KEY}")
            expect(page.get_by_text("Per participant", exact=True)).to_be_visible(timeout=120_000)
            _wait_idle(page)
            metric = page.locator("[data-testid='stMetric']").filter(has_text="Answers")
            expect(metric.locator("[data-testid='stMetricValue']")).to_have_text("3")
            # the tables are drawn on canvases loaded after the script run: wait for them
            expect(page.locator("[data-testid='stDataFrame'] canvas")).not_to_have_count(0)
            expect(page.get_by_role("button", name="Download answers (CSV)")).to_be_visible()
            _shot(page, "study_results.png")
            browser.close()
        server.kill()
        assert len(_answers(path, token)) == 3
    finally:
        server.kill()
