"""Command line: outputs written, user errors -> 'error: ...' on stderr and exit 2."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from cli.explainer_cmd import main

ROOT = Path(__file__).resolve().parents[1]


def test_user_error_exits_2_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "explainer", "explain", "--workspace",
                        str(tmp_path / "nope"), "--class", "1", "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.startswith("error: No workspace at")
    assert "Traceback" not in r.stderr


def _big_class(cat):
    counts = cat.predicted_counts()
    return max(counts, key=lambda c: (counts[c], -c))


def test_explain_writes_outputs(lite0_workspace, lite0_catalog, tmp_path, capsys):
    out = tmp_path / "ex"
    cls = _big_class(lite0_catalog)
    rc = main(["explain", "--workspace", str(lite0_workspace.root), "--class", str(cls),
               "--method", "grad_x_act", "--max-images", "6", "--device", "cpu",
               "--exclude-target", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "explanation.json").read_text())
    assert data["class_a"] == cls and len(data["concepts"]) == 4
    assert len(data["image_ids"]) == 6
    assert Image.open(out / "stitched_allowed.png").size == (74, 296)
    assert len(list((out / "concept_0").glob("crop_*.png"))) == 8
    md = (out / "summary.md").read_text()
    assert "Prediction test" in md and "## Concept 3" in md
    # bad class name: message with suggestions, exit 2
    rc = main(["explain", "--workspace", str(lite0_workspace.root), "--class", "tabbby",
               "--device", "cpu", "--out", str(out)])
    assert rc == 2
    assert "did you mean: 'tabby'" in capsys.readouterr().err


def test_contrast_cli(lite0_workspace, lite0_catalog, tmp_path):
    counts = lite0_catalog.predicted_counts()
    a, b = sorted(counts, key=lambda c: (-counts[c], c))[:2]
    out = tmp_path / "co"
    rc = main(["contrast", "--workspace", str(lite0_workspace.root), "--a", str(a), "--b",
               str(b), "--method", "grad_x_act", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "explanation.json").read_text())
    assert (data["class_a"], data["class_b"]) == (a, b)
    assert data["classifier"]["accuracy"] > 0.9
    assert "| sgd |" in (out / "summary.md").read_text()
    assert main(["contrast", "--workspace", str(lite0_workspace.root), "--a", str(a), "--b",
                 str(a), "--device", "cpu", "--out", str(out)]) == 2


def test_evaluate_cli(lite0_workspace, lite0_catalog, tmp_path):
    counts = lite0_catalog.predicted_counts()
    classes = sorted(counts, key=lambda c: (-counts[c], c))[:3]
    out = tmp_path / "ev"
    rc = main(["evaluate", "prediction-test", "--workspace", str(lite0_workspace.root),
               "--classes", ",".join(map(str, classes)), "--device", "cpu", "--out", str(out)])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "per_class.csv")))
    assert [int(r["class"]) for r in rows] == classes
    assert {"prob_allowed", "hit_allowed", "prob_excluded", "hit_excluded", "prob_random",
            "hit_random", "n_images"} <= set(rows[0])
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert summary["n_classes"] == 3
    assert np.isclose(summary["mean_prob_allowed"],
                      np.mean([float(r["prob_allowed"]) for r in rows]))
    out2 = tmp_path / "sh"
    rc = main(["evaluate", "shift-test", "--workspace", str(lite0_workspace.root), "--pairs",
               "2", "--device", "cpu", "--out", str(out2)])
    assert rc == 0
    rows = list(csv.DictReader(open(out2 / "per_pair.csv")))
    assert len(rows) == 2 and all(r["class_a"] != r["class_b"] for r in rows)
    s = json.loads((out2 / "summary.json").read_text())["summary"]
    assert len(s["mean_prob_a_per_offset"]) == 10
