"""The run history (explainer/runs.py): a run is recorded once per kind and parameters, listed,
filtered, read back (explanations and tests), compared, deleted, and still there for a new
process; nothing stored is a pickle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from explainer.runs import RunHistory, params_diff, run_key
from explorer_core.errors import ExplorerError
from explorer_core.results import (
    Concept,
    CropRef,
    Explanation,
    PatchTestResult,
    PredictionTestResult,
)

ROOT = Path(__file__).resolve().parents[1]


def _ref(i: int) -> CropRef:
    return CropRef(crop_id=i, image_id=i // 9, path=f"img/{i // 9}.png", row=0, col=i % 3,
                   box=(0, 0, 32, 32), crop_pred=1, crop_conf=0.5, image_pred=1,
                   image_conf=0.9, score=0.8)


def make_explanation(n: int = 3, seed: int = 0) -> Explanation:
    rng = np.random.default_rng(seed)
    pt = PredictionTestResult(target=1, exclude_target=False, crop_ids=[1, 2, 3],
                              prob_target=0.75, predicted=1, prob_predicted=0.75, passed=True,
                              stitched=rng.integers(0, 255, (96, 32, 3), dtype=np.uint8))
    concepts = [Concept(index=k, vector=rng.random(8).astype(np.float32),
                        importance=1.0 / n, crops=[_ref(10 * k + j) for j in range(4)],
                        crops_excluded=[_ref(100 + 10 * k + j) for j in range(4)])
                for k in range(n)]
    return Explanation(model="demo", layer="layer4.relu_out", class_a=1, class_b=None,
                       params={"n_concepts": n, "method": "deeplift", "seed": seed},
                       image_ids=[3, 4, 5], concepts=concepts,
                       heatmaps=rng.random((3, n, 6, 6)).astype(np.float32),
                       reconstruction_error=0.2, prediction_test=pt,
                       prediction_test_excluded=None)


def make_patch() -> PatchTestResult:
    z = np.array([0.1, 0.2], np.float32)
    return PatchTestResult(class_a=1, class_b=2, position="center", box=(8, 8, 40, 40),
                           control="mean", image_ids=[7, 9], prob_a_before=z,
                           prob_a_after=z + 0.3, prob_a_control=z + 0.05, prob_b_before=1 - z,
                           prob_b_after=1 - z - 0.3, prob_b_control=1 - z)


def test_record_once_list_filter_and_read_back(tmp_path):
    h = RunHistory(tmp_path)
    assert h.list_runs() == []
    p4 = {"class_a": 1, "n_concepts": 4, "exclude": False}
    run, new = h.record("explain", p4, make_explanation(4), title="lupo n=4")
    assert new and run.id == 1 and run.kind == "explain"
    again, new2 = h.record("explain", dict(p4), make_explanation(4), title="lupo n=4")
    assert not new2 and again.id == run.id  # a rerun of the page records nothing new
    run6, _ = h.record("explain", {**p4, "n_concepts": 6}, make_explanation(6), title="lupo n=6")
    patch, _ = h.record("patch", {"a": 1, "b": 2}, make_patch(), title="patch lupo husko")
    runs = h.list_runs()
    assert [r.id for r in runs] == [patch.id, run6.id, run.id]  # newest first
    assert [r.id for r in h.list_runs(kinds=["explain"])] == [run6.id, run.id]
    assert [r.id for r in h.list_runs(text="N=6")] == [run6.id]
    assert run.summary["n_concepts"] == 4 and run.summary["prediction_test"]["passed"] is True
    assert run.summary["concepts"][0]["crops"] == [0, 1, 2, 3]

    expl = h.result(h.get(run6.id))
    assert isinstance(expl, Explanation) and expl.n_concepts == 6
    assert expl.prediction_test is not None and expl.prediction_test.stitched.shape == (96, 32, 3)
    rec = h.result(h.get(patch.id))
    assert rec["type"] == "PatchTestResult" and rec["image_ids"] == [7, 9]
    assert rec["mean_delta_a"] == pytest.approx(0.3, abs=1e-6)
    assert patch.summary["mean_control_delta_a"] == pytest.approx(0.05, abs=1e-6)


def test_side_by_side_diff_marks_only_changed_parameters():
    a = {"class_a": 1, "n_concepts": 4, "exclude": False, "layer": "l4"}
    b = {"class_a": 1, "n_concepts": 6, "exclude": True, "layer": "l4", "extra": 1}
    diff = {name: differs for name, _, _, differs in params_diff(a, b)}
    assert diff == {"class_a": False, "n_concepts": True, "exclude": True, "layer": False,
                    "extra": True}
    assert run_key("explain", a) == run_key("explain", dict(reversed(list(a.items()))))
    assert run_key("explain", a) != run_key("contrast", a)


def test_delete_removes_row_and_folder(tmp_path):
    h = RunHistory(tmp_path)
    run, _ = h.record("explain", {"n": 4}, make_explanation(4))
    folder = tmp_path / "runs" / run.folder
    assert (folder / "explanation.json").is_file()
    assert h.delete(run.id) is True
    assert not folder.exists() and h.list_runs() == []
    assert h.delete(run.id) is False
    with pytest.raises(ExplorerError, match="no run"):
        h.get(run.id)
    # recorded again after a delete: a new row with a new id
    again, new = h.record("explain", {"n": 4}, make_explanation(4))
    assert new and again.id > run.id


def test_history_survives_a_new_process_and_holds_no_pickle(tmp_path):
    h = RunHistory(tmp_path)
    h.record("explain", {"n": 4}, make_explanation(4), title="first")
    h.record("patch", {"a": 1}, make_patch(), title="second")
    code = ("import json, sys; from explainer.runs import RunHistory; h = RunHistory(sys.argv[1]);"
            "rs = h.list_runs(); r = h.result(rs[-1]);"
            "print(json.dumps([[x.title for x in rs], r.n_concepts]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [["second", "first"], 4]
    for f in (tmp_path / "runs").rglob("*"):
        if f.is_file():
            assert f.suffix in (".json", ".npz"), f
            data = f.read_bytes()
            assert b"\x80\x04\x95" not in data and b"\x80\x05\x95" not in data  # pickle headers
            if f.suffix == ".npz":
                np.load(f, allow_pickle=False)  # loads without pickle


def test_a_locked_history_gives_a_clear_message(tmp_path):
    """Another process holding the database longer than the wait gets one clear error."""
    import explainer.runs as runs

    h = RunHistory(tmp_path)
    h.record("explain", {"n": 4}, make_explanation(4))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]);"
         "print('held', flush=True); time.sleep(30)", str(tmp_path / "runs.duckdb")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        old = runs.LOCK_WAIT_S
        runs.LOCK_WAIT_S = 0.5
        try:
            with pytest.raises(ExplorerError, match="in use by another process"):
                h.list_runs()
        finally:
            runs.LOCK_WAIT_S = old
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert len(h.list_runs()) == 1  # free again once the other process is gone


def test_a_missing_workspace_is_refused(tmp_path):
    with pytest.raises(ExplorerError, match="does not exist"):
        RunHistory(tmp_path / "nope").record("explain", {"n": 1}, make_explanation(1))


def test_two_processes_recording_at_once_keep_every_run(tmp_path):
    """Concurrent writers (two app servers on one workspace): short transactions, each waits for
    the other; every run is kept exactly once and the database stays readable."""
    code = ("import sys; from explainer.runs import RunHistory; from tests.test_runs import "
            "make_patch; h = RunHistory(sys.argv[1]); w = sys.argv[2];"
            "[h.record('patch', {'writer': w, 'i': i}, make_patch(), title=f'{w}{i}') "
            "for i in range(20)]; h.record('patch', {'shared': 1}, make_patch(), title='shared')")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), w], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for w in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    runs = RunHistory(tmp_path).list_runs()
    titles = sorted(r.title for r in runs)
    assert titles == sorted([f"{w}{i}" for w in "ab" for i in range(20)] + ["shared"])
    assert len({r.id for r in runs}) == 41
    for r in runs:
        assert RunHistory(tmp_path).result(r)["image_ids"] == [7, 9]
