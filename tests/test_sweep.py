"""The paper's sweeps as one command (issue 10, item 2): ``explainer.sweep.run_sweep`` and
``python -m explainer sweep`` on the three-layer demo catalog (``multilayer_workspace``).

One sweep (2 layers x 2 n x 2 methods + CRAFT + random, 3 classes, 12 images per class) is run
once per module; the tests check its table, figures, resumption and the command line."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from explainer import sweep as sweep_mod
from explainer.concepts import explain_class, get_context
from explainer.precompute import cached_explanation
from explainer.sweep import (
    COLUMNS,
    FIGURES,
    SweepSpec,
    check_sweep_name,
    list_sweeps,
    load_sweep,
    read_rows,
    run_sweep,
    sweep_folder,
)
from explorer_core.errors import ExplorerError

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("layer3.relu_out", "layer4.relu_out")
SPEC = SweepSpec(layers=LAYERS, n=(2, 4), samples=(12,), methods=("deeplift", "grad_x_act"),
                 baselines=("craft", "random"), limit=3)
N_ROWS = 3 * 2 * 2 * 1 * 4 * 2  # classes x layers x n x samples x (2 methods + 2 baselines) x 2


@pytest.fixture(scope="module")
def swept(multilayer_workspace):
    out = sweep_folder(multilayer_workspace, "demo-grid")
    reports = []
    res = run_sweep(multilayer_workspace, SPEC, out, device="cpu", progress=reports.append)
    return res, out, reports


def test_the_table_has_one_row_per_class_setting_and_condition(swept):
    res, out, reports = swept
    assert len(res.rows) == N_ROWS
    keys = {(r["class"], r["layer"], r["n"], r["samples"], r["method"], r["condition"])
            for r in res.rows}
    assert len(keys) == N_ROWS  # no duplicates
    assert {r["layer"] for r in res.rows} == set(LAYERS)
    assert {r["method"] for r in res.rows} == {"deeplift", "grad_x_act", "craft", "random"}
    assert all(r["error"] == "" and 0.0 <= r["prob"] <= 1.0 and r["hit"] in (0, 1)
               for r in res.rows)
    assert res.complete and len(res.record["classes"]) == 3
    # the CSV on disk and the Parquet file hold the same table
    assert read_rows(out / "results.csv") == res.rows
    with open(out / "results.csv", newline="") as fh:
        assert tuple(next(csv.reader(fh))) == COLUMNS
    con = duckdb.connect()
    n, mean = con.execute("SELECT count(*), avg(prob) FROM read_parquet(?)",
                          [str(out / "results.parquet")]).fetchone()
    assert n == N_ROWS
    assert mean == pytest.approx(sum(r["prob"] for r in res.rows) / N_ROWS, abs=1e-5)
    # the summary: one row per setting x condition, means of the rows
    assert len(res.summary) == 2 * 2 * 4 * 2
    s = next(r for r in res.summary if r["layer"] == LAYERS[1] and r["n"] == 4
             and r["method"] == "craft" and r["condition"] == "excluded")
    probs = [r["prob"] for r in res.rows if r["layer"] == LAYERS[1] and r["n"] == 4
             and r["method"] == "craft" and r["condition"] == "excluded"]
    assert s["n_classes"] == 3 and s["mean_prob"] == pytest.approx(sum(probs) / 3)
    # progress: the sweep stage counts every unit and ends at its total
    sweep_reports = [p for p in reports if p.stage == "sweep"]
    assert sweep_reports[-1].done == sweep_reports[-1].total == 3 * 2 * 4
    assert any(p.eta_s is not None for p in sweep_reports)


def test_the_figures_are_written(swept):
    res, out, _ = swept
    for name in FIGURES:
        html = (out / f"{name}.html").read_text()
        assert "plotly.min.js" in html and "Plotly.newPlot" in html
        png = out / f"{name}.png"
        if not png.is_file():  # no Chromium for kaleido: one warning says so
            assert any("PNG export failed" in w for w in res.warnings), res.warnings
        else:
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert (out / "plotly.min.js").stat().st_size > 1_000_000
    figs = sweep_mod.sweep_figures(res)
    fig4 = figs["fig4_excluded_by_n"]
    names = {t.name for t in fig4.data if t.showlegend}
    assert names == {f"{la} · {m}" for la in LAYERS
                     for m in ("deeplift", "grad_x_act", "CRAFT", "random crops")}
    assert all(list(t.x) == [2, 4] for t in fig4.data)


def test_ours_beats_the_random_baseline_in_every_setting(swept):
    res, _, _ = swept
    mean = {(r["layer"], r["n"], r["method"], r["condition"]): r["mean_prob"]
            for r in res.summary}
    for (layer, n, method, cond), p in mean.items():
        if method in ("deeplift", "grad_x_act"):
            rnd = mean[(layer, n, "random", cond)]
            assert p > rnd + 0.1, (layer, n, method, cond, p, rnd)
    # and target crops allowed is never worse than excluded for ours
    for (layer, n, method, cond), p in mean.items():
        if method in ("deeplift", "grad_x_act") and cond == "excluded":
            assert mean[(layer, n, method, "allowed")] >= p - 1e-6


def test_resume_skips_the_finished_units(swept, multilayer_workspace, monkeypatch, tmp_path):
    res, out, _ = swept
    # a copy of the finished sweep with one class's rows gone (as if it was cut short)
    part = tmp_path / "partial"
    part.mkdir()
    dropped = res.record["classes"][1]
    kept = [r for r in res.rows if r["class"] != dropped]
    (part / "results.csv").write_bytes(sweep_mod._csv_bytes(kept, COLUMNS))
    calls = []
    real = sweep_mod.explain_class

    def counting(ctx, cls, **kw):
        calls.append(cls)
        return real(ctx, cls, **kw)

    monkeypatch.setattr(sweep_mod, "explain_class", counting)
    reports = []
    again = run_sweep(multilayer_workspace, SPEC, part, device="cpu", figures=False,
                      progress=reports.append)
    assert set(calls) == {dropped} and len(calls) == 2 * 2 * 2  # layers x methods x n
    first = next(p for p in reports if p.stage == "sweep")
    assert (first.done, first.total) == (3 * 2 * 4 - 2 * 4, 3 * 2 * 4)
    key = lambda r: (r["class"], r["layer"], r["n"], r["method"], r["condition"])  # noqa: E731
    assert sorted(again.rows, key=key) == sorted(res.rows, key=key)
    # a complete table: nothing left to run
    calls.clear()
    run_sweep(multilayer_workspace, SPEC, part, device="cpu", figures=False)
    assert calls == []


def test_a_sweep_is_found_by_name_and_names_are_never_paths(swept, multilayer_workspace):
    res, out, _ = swept
    assert "demo-grid" in list_sweeps(multilayer_workspace)
    loaded = load_sweep(sweep_folder(multilayer_workspace, "demo-grid"))
    assert loaded.rows == res.rows and loaded.complete
    assert loaded.record["spec"]["n"] == [2, 4]
    for bad in ("../x", "/etc", "a/b", ".hidden", "", "x" * 65):
        with pytest.raises(ExplorerError, match="Sweep name"):
            check_sweep_name(bad)
    with pytest.raises(ExplorerError, match="No sweep"):
        load_sweep(out.parent / "missing")


def test_a_foreign_table_is_refused(tmp_path):
    p = tmp_path / "results.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(ExplorerError, match="not a sweep table"):
        read_rows(p)


def test_bad_settings_raise_one_clear_error(multilayer_workspace, tmp_path):
    with pytest.raises(ExplorerError, match="outside|1..10"):
        run_sweep(multilayer_workspace, SweepSpec(n=(0,)), tmp_path / "a", device="cpu")
    with pytest.raises(ExplorerError, match="Unknown baseline"):
        run_sweep(multilayer_workspace, SweepSpec(baselines=("lime",)), tmp_path / "b",
                  device="cpu")
    with pytest.raises(ExplorerError, match="Nothing to sweep"):
        run_sweep(multilayer_workspace, SweepSpec(methods=(), baselines=()), tmp_path / "c",
                  device="cpu")
    with pytest.raises(ExplorerError, match="Layer 'nope' is not in the catalog"):
        run_sweep(multilayer_workspace, SweepSpec(layers=("nope",)), tmp_path / "d",
                  device="cpu")


def test_a_cached_explanation_is_served_only_at_its_own_layer(multilayer_workspace):
    """The app's stored-result lookups once ignored the layer and served another layer's
    explanation."""
    ctx = get_context(multilayer_workspace, "cpu")
    cls = max(ctx.catalog.predicted_counts().items(), key=lambda kv: kv[1])[0]
    kw = dict(n_concepts=3, method="grad_x_act", max_images=6, m=4)
    mid = explain_class(ctx, cls, layer="layer3.relu_out", cache=True, **kw)
    assert cached_explanation(ctx, cls, layer="layer4.relu_out", **kw) is None
    assert cached_explanation(multilayer_workspace, cls, **kw) is None  # the default layer
    hit = cached_explanation(multilayer_workspace, cls, layer="layer3.relu_out", **kw)
    assert hit is not None and hit.layer == "layer3.relu_out"
    assert hit.concept_vectors.shape == mid.concept_vectors.shape == (3, 96)


# ---- command line -----------------------------------------------------------------------------

def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "explainer", "sweep", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args,message", [
    (["--n", "0,2"], "argument --n: 0 is out of range"),
    (["--n", "2,x"], "expected an integer, got 'x'"),
    (["--n", "2,2"], "names a value twice"),
    (["--samples", "0"], "argument --samples: 0 is out of range"),
    (["--methods", "deeplift,lime"], "unknown 'lime'; use deeplift, grad_x_act"),
    (["--baselines", "sobol"], "unknown 'sobol'; use craft, random"),
    (["--layers", ","], "give at least one name"),
    (["--classes", "a", "--limit", "3"], "not allowed with argument"),
])
def test_bad_arguments_give_one_error_line(args, message, tmp_path, capsys):
    from cli.explainer_cmd import main

    rc = main(["sweep", "--workspace", str(tmp_path), *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr()
    assert rc == 2 and err.out == ""
    assert err.err.count("\n") == 1 and err.err.startswith("error: ")
    assert message in err.err


def test_the_command_runs_a_small_sweep(multilayer_workspace, tmp_path):
    out = tmp_path / "cli"
    r = _run("--workspace", str(multilayer_workspace.root), "--layers", "layer4.relu_out",
             "--n", "2", "--samples", "6", "--methods", "grad_x_act", "--baselines", "random",
             "--limit", "2", "--no-png", "--device", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out}: 8 rows over 2 classes")
    assert "layer4.relu_out | 2 | 6 | grad_x_act | excluded |" in r.stdout
    assert len(read_rows(out / "results.csv")) == 8
    assert (out / "fig4_excluded_by_n.html").is_file() and not (out / "fig4_excluded_by_n.png").exists()
    bad = _run("--workspace", str(multilayer_workspace.root), "--layers", "nope",
               "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "Layer 'nope' is not in the catalog" in bad.stderr


def test_attribution_runs_in_bounded_blocks_of_classes(multilayer_workspace, monkeypatch):
    from explainer.concepts import class_images

    ctx = get_context(multilayer_workspace, "cpu")
    classes = sorted(ctx.catalog.predicted_counts())
    monkeypatch.setattr(sweep_mod, "IMAGES_PER_BLOCK", 20)
    blocks = sweep_mod._blocks(ctx, classes, 8, 0)
    assert [c for b in blocks for c in b] == classes and len(blocks) > 1
    for b in blocks:
        held = sum(len(class_images(ctx, c, 8, 0)) for c in b)
        assert held <= 20 or len(b) == 1
