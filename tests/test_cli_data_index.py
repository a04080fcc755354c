"""``python -m data_index build|layers|export`` from the command line (subprocess), on the demo
model and a handful of noise images: the summary line, the layer list, the exported rows."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from test_catalog_robust import noise_images

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_index", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    noise_images(d / "imgs", 6)
    (d / "imgs" / "broken.png").write_bytes(b"\x89PNG but not really")
    ws = d / "ws"
    r = _run("build", "--workspace", str(ws), "--model", "demo", "--images", str(d / "imgs"),
             "--device", "cpu", "--batch-size", "4", "--quiet")
    return ws, r


def test_build_prints_the_summary_and_resumes_as_complete(built):
    ws, r = built
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"built catalog of 'ws': 6 images, 54 crops, 1 skipped, 0/1 chunks "
                        r"resumed, \d+\.\d s\n", r.stdout), r.stdout
    assert "workspace.toml" in {p.name for p in ws.iterdir()}
    assert 'layer = "layer4.relu_out"' in (ws / "workspace.toml").read_text()  # recommended
    again = _run("build", "--workspace", str(ws), "--quiet")
    assert again.returncode == 0, again.stderr
    assert again.stdout == ("catalog of 'ws' already complete: 6 images, 54 crops, 1 skipped "
                            "(use --rebuild to redo)\n")


def test_export_writes_every_row_as_csv_and_parquet(built, tmp_path):
    ws, _ = built
    r = _run("export", "--workspace", str(ws), "--table", "images", "--out",
             str(tmp_path / "out" / "images.csv"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "out" / "images.csv")
    rows = list(csv.DictReader(open(tmp_path / "out" / "images.csv")))
    assert [row["path"] for row in rows] == [f"img_{i:02d}.png" for i in range(6)]
    assert [int(row["image_id"]) for row in rows] == [1, 2, 3, 4, 5, 6]  # broken.png is 0
    assert all(len(row["top5"].split()) == 5 for row in rows)
    r = _run("export", "--workspace", str(ws), "--table", "crops", "--out",
             str(tmp_path / "crops.parquet"))
    assert r.returncode == 0, r.stderr
    n, lo, hi = duckdb.sql(f"SELECT count(*), min(crop_id), max(crop_id) FROM "
                           f"'{tmp_path / 'crops.parquet'}'").fetchall()[0]
    assert (n, lo, hi) == (54, 9, 62)
    r = _run("export", "--workspace", str(ws), "--table", "skipped", "--out",
             str(tmp_path / "skipped.csv"))
    rows = list(csv.DictReader(open(tmp_path / "skipped.csv")))
    assert r.returncode == 0 and [row["path"] for row in rows] == ["broken.png"]
    assert "not a decodable image" in rows[0]["reason"]


def test_layers_lists_the_demo_layers_with_their_shapes():
    r = _run("layers", "--model", "demo")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "layer4.relu_out  192x6x6 (recommended)" in lines
    assert "stem.0  24x48x48 [has negative outputs]" in lines
    assert len(lines) > 30
    bad = _run("layers", "--model", "no_such_model")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
