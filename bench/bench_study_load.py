"""Load bench of the intruder study: 10 concurrent participants answering trials.

Two paths, both reported as a table (answers given vs stored, which must be equal, and p50/p95
response time):

1. ``module``: N threads call :mod:`study` directly against one DuckDB file (the app's
   write path: one process-wide connection + lock, a cursor per call). Each participant also
   double-submits every answer, which must be ignored.
2. ``server`` (``--server``, needs Chromium): a real ``streamlit run app.py`` on the demo
   workspace and N headless browser pages, one per participant (each on its signed participant
   link), clicking through their trials concurrently; response time = click until the next
   trial is shown. After the run the server is stopped and the DuckDB file is counted.

    python bench/bench_study_load.py                 # module path, 10 x 50 trials
    python bench/bench_study_load.py --server        # + the server path (demo workspace)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import study as S  # noqa: E402


def _run_concurrently(fn, args: list) -> float:
    """Run ``fn(arg)`` for every arg in its own thread, all at once; wall seconds."""
    t0 = time.perf_counter()
    threads = [threading.Thread(target=fn, args=(a,)) for a in args]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def bench_module(n_participants: int, n_trials: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="study_bench_"))
    crops = {c: [[c * 1000 + k * 100 + r for r in range(8)] for k in range(4)] for c in range(10)}
    study = S.create_study_from_crops(tmp / "study.duckdb", "bench", crops,
                                      trials_per_participant=n_trials, seed=0)
    lat: list[float] = []
    lock = threading.Lock()
    given = [0]
    errors: list[BaseException] = []
    start = threading.Barrier(n_participants)

    def participant(pid: str) -> None:
        try:
            trials = S.trials_for(study, pid)
            start.wait()
            for t in trials:
                t0 = time.perf_counter()
                S.record_answer(study, pid, t, (t.index * 7) % 5, 1000)
                dt = time.perf_counter() - t0
                S.record_answer(study, pid, t, 0, 1)  # a double click: ignored
                nxt = S.next_trial_index(study, pid)  # what the page does next
                assert nxt is None or nxt > t.index
                with lock:
                    lat.append(dt)
                    given[0] += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    wall = _run_concurrently(participant, [f"p{i:02d}" for i in range(n_participants)])
    stored = len(S.answers(study))
    S.close_all()
    shutil.rmtree(tmp, ignore_errors=True)
    return {"path": "module (threads, one DuckDB)", "participants": n_participants,
            "given": given[0], "stored": stored, "errors": len(errors),
            "p50_ms": _pct(lat, 0.5) * 1000, "p95_ms": _pct(lat, 0.95) * 1000,
            "answers_per_s": given[0] / wall, "wall_s": wall}


def bench_server(n_participants: int, n_trials: int, home: Path | None) -> dict:
    import socket
    import subprocess
    import urllib.request

    from playwright.sync_api import sync_playwright

    from demo_world.workspace import ensure_demo_workspace

    home = home or Path(tempfile.mkdtemp(prefix="study_bench_home_"))
    os.environ["CONCEPT_EXPLORER_HOME"] = str(home)
    ws = ensure_demo_workspace(home=home)
    from data_index.catalog import Catalog

    counts = Catalog.open(ws).predicted_counts()
    classes = [c for c, n in sorted(counts.items(), key=lambda kv: -kv[1])][:2]
    study = S.create_study(ws, classes, n_concepts=4, trials_per_participant=n_trials, seed=1)
    token, path = study.token, study.path
    links = [S.participant_link(study, f"load{i:02d}", "") for i in range(n_participants)]
    S.close_all()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # as deployed for a study: the lead's pages locked (participants never need the key)
    import secrets

    env = dict(os.environ, CONCEPT_EXPLORER_HOME=str(home),
               CONCEPT_EXPLORER_LEAD_KEY=os.environ.get("CONCEPT_EXPLORER_LEAD_KEY")
               or secrets.token_urlsafe(12))
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py",
                             "--server.headless", "true", "--server.port", str(port),
                             "--server.address", "127.0.0.1"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        lat: list[float] = []
        given = [0]
        lock = threading.Lock()
        errors: list[str] = []

        def participant(i: int) -> None:
            chrome = shutil.which("chromium")
            try:
                with sync_playwright() as p:
                    b = p.chromium.launch(executable_path=chrome, headless=True,
                                          args=["--no-sandbox", "--disable-gpu",
                                                "--disable-background-networking",
                                                "--no-first-run", "--disable-component-update",
                                                "--disable-sync"])
                    page = b.new_page()
                    page.set_default_timeout(180_000)
                    page.goto(f"{url}/{links[i]}")
                    for k in range(1, n_trials + 1):
                        page.get_by_text(f"Trial {k} of {n_trials}").wait_for()
                        page.locator("[data-testid='stImage']").nth(4).wait_for()
                        page.wait_for_function(
                            "() => { const a = document.querySelector(\"[data-testid='stApp']\");"
                            " return a && a.getAttribute('data-test-script-state') === "
                            "'notRunning' && !document.querySelector(\"[data-stale='true']\"); }")
                        t0 = time.perf_counter()
                        page.get_by_role("button", name=f"Odd one: {(k % 5) + 1}").click()
                        with lock:
                            given[0] += 1
                        nxt = (f"Trial {k + 1} of {n_trials}" if k < n_trials
                               else "All trials done")
                        page.get_by_text(nxt).wait_for()
                        with lock:
                            lat.append(time.perf_counter() - t0)
                    b.close()
            except Exception as exc:  # noqa: BLE001
                errors.append(f"participant {i}: {exc}")

        wall = _run_concurrently(participant, list(range(n_participants)))
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    stored = con.execute("SELECT count(*) FROM answers a JOIN studies s USING (study_id) "
                         "WHERE s.token = ?", [token]).fetchone()[0]
    con.close()
    for e in errors[:5]:
        print("  error:", e[:300])
    return {"path": "server (streamlit + Chromium)", "participants": n_participants,
            "given": given[0], "stored": int(stored), "errors": len(errors),
            "p50_ms": _pct(lat, 0.5) * 1000, "p95_ms": _pct(lat, 0.95) * 1000,
            "answers_per_s": given[0] / wall, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--participants", type=int, default=10)
    ap.add_argument("--trials", type=int, default=50, help="trials per participant (module)")
    ap.add_argument("--server", action="store_true", help="also bench the running app")
    ap.add_argument("--server-trials", type=int, default=5)
    ap.add_argument("--home", type=Path, default=None,
                    help="CONCEPT_EXPLORER_HOME with a built demo workspace (server path)")
    args = ap.parse_args(argv)
    rows = [bench_module(args.participants, args.trials)]
    if args.server:
        rows.append(bench_server(args.participants, args.server_trials, args.home))
    cols = ("path", "participants", "given", "stored", "errors", "p50_ms", "p95_ms",
            "answers_per_s", "wall_s")
    print(" | ".join(f"{c:>14}" if c != "path" else f"{c:<30}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:<30}" if c == "path" else
                         (f"{r[c]:>14.1f}" if isinstance(r[c], float) else f"{r[c]:>14}")
                         for c in cols))
    ok = all(r["given"] == r["stored"] and not r["errors"] for r in rows)
    print("answers stored == answers given:", "YES" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
