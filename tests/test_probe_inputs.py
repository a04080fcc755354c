"""bench/probe_inputs.py feeds the bad inputs of issue 8 to both command lines: every one must be
a clean error (exit 2, one ``error:`` line), none a traceback or a silent acceptance, and a build
over a 1 000 000 x 16 px image must peak below 1 GB (about a minute and a half on two cores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the inputs issue 8 names (tracebacks and silent acceptances before the fix)
ISSUE_INPUTS = ["explain --seed=-1", "explain --seed 2**32", "shift-test --pairs 0",
                "prediction-test --limit=-1", "explain --out <existing file>",
                "explain --out /proc/x", "export --out /proc/x.csv",
                "status --workspace <non-UTF-8 path>",
                # catalog v2 stores embeddings per layer (index/<layer>/emb-*.npy, ids.npy,
                # norms.npy) instead of embeddings.npy + flat.faiss
                "search over truncated emb-00000.npy", "search over truncated ids.npy",
                "search over a v1 catalog", "build resume over truncated emb_00000.npy",
                "evaluate --every 0", "evaluate --every=-2", "search -m 0",
                "build --batch-size 0", "build --rebuild while another process reads it"]


def test_probe_reports_no_traceback_no_silent_acceptance_and_bounded_memory():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "probe_inputs.py"), "--jobs", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    summary = json.loads(lines[-1])
    table = {ln.split("  ")[0].strip(): ln for ln in lines[1:-2]}
    for name in ISSUE_INPUTS:
        assert name in table and "  clean  " in table[name], name
    bad = [ln for ln in lines[1:-2] if not ("  clean  " in ln or "  ok  " in ln)]
    assert bad == [], "\n".join(bad)
    assert summary["tracebacks"] == 0 and summary["silent"] == 0, summary
    assert summary["messy"] == 0 and summary["wrong"] == 0, summary
    assert summary["clean"] >= 50 and summary["ok"] == 3, summary
    assert summary["cases"] == summary["clean"] + summary["ok"]
    assert 0 < summary["long_thin_peak_mb"] < 1024, summary
    assert 0 < summary["search_m_1e9_peak_mb"] < 1024, summary
