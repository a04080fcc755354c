"""Precompute everything once (issue 9 item 4): batched pair classifiers equal separate ones,
a precompute of the demo world stores every explanation and pair, resumes after a kill, is
found by explain/contrast/the app's pages without recomputing, and exports loadable files."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from explainer.contrast import (
    class_contrast_pixels,
    fetch_pair_classifiers,
    flip_classifier,
    precomputed_classifier,
    train_classifier,
    train_pair_classifiers,
)
from explorer_core import cache
from explorer_core.errors import ExplorerError

APP = str(Path(__file__).resolve().parents[1] / "app.py")
DEMO_CLASSES = 10
ALL_PAIRS = DEMO_CLASSES * (DEMO_CLASSES - 1) // 2


# --------------------------------------------------------------------------------------------
# batched training, no workspace


def _toy(seed: int, sizes: list[int], c: int = 24):
    rng = np.random.default_rng(seed)
    xa = np.abs(rng.normal(1.3, 0.5, (150, c))).astype(np.float32)
    xbs = [np.abs(rng.normal(1.0 + 0.05 * j, 0.5, (n, c))).astype(np.float32)
           for j, n in enumerate(sizes)]
    return xa, xbs


@pytest.mark.parametrize("sizes", [[40, 40, 40], [5, 300, 17, 120, 1, 64]])
def test_batched_pair_classifiers_equal_separate_ones(sizes):
    """Same weights (1e-5), bias, accuracy and loss as train_classifier pair by pair, with B
    classes of equal and of very different pixel counts (padding buckets)."""
    xa, xbs = _toy(0, sizes)
    bs = [10 + j for j in range(len(sizes))]
    pc = train_pair_classifiers(xa, xbs, class_a=3, classes_b=bs)
    assert pc.weight.shape == (len(sizes), xa.shape[1]) and list(pc.classes_b) == bs
    for j, xb in enumerate(xbs):
        one = train_classifier(xa, xb, class_a=3, class_b=bs[j])
        assert np.abs(one.weight - pc.weight[j]).max() < 1e-5
        assert abs(one.bias - float(pc.bias[j])) < 1e-5
        assert abs(one.accuracy - float(pc.accuracy[j])) < 1e-6
        assert abs(one.loss - float(pc.loss[j])) < 1e-5
        got = pc.classifier(bs[j])
        assert (got.class_a, got.class_b, got.n_pixels_a, got.n_pixels_b) == (
            3, bs[j], len(xa), len(xb))


def test_flip_is_the_other_direction():
    """(B, A) = -(A, B): exactly the negation, and what training B vs A gives (float rounding)."""
    xa, (xb,) = _toy(1, [80])
    ab = train_pair_classifiers(xa, [xb], class_a=0, classes_b=[1]).classifier(1)
    ba = flip_classifier(ab)
    assert (ba.class_a, ba.class_b, ba.n_pixels_a, ba.n_pixels_b) == (1, 0, len(xb), len(xa))
    assert np.array_equal(ba.weight, -ab.weight) and ba.bias == -ab.bias
    trained = train_classifier(xb, xa, class_a=1, class_b=0)
    assert np.abs(trained.weight - ba.weight).max() < 1e-5
    assert abs(trained.bias - ba.bias) < 1e-5


def test_batched_training_refuses_bad_inputs():
    xa, xbs = _toy(2, [10, 10])
    with pytest.raises(ExplorerError, match="no pixels"):
        train_pair_classifiers(xa, [xbs[0], xbs[1][:0]], class_a=0, classes_b=[1, 2])
    with pytest.raises(ExplorerError, match="repeat"):
        train_pair_classifiers(xa, xbs, class_a=0, classes_b=[1, 1])
    with pytest.raises(ExplorerError, match="repeat"):
        train_pair_classifiers(xa, xbs, class_a=0, classes_b=[0, 1])


# --------------------------------------------------------------------------------------------
# the demo world, precomputed once for this module (with two kills on the way)


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def clone(demo_workspace, tmp_path_factory):
    """The demo workspace's catalog under another name, with an empty result cache of its own
    (so every count below starts from nothing, whatever other tests cached)."""
    from data_index.workspace import Workspace

    root = tmp_path_factory.mktemp("precompute_home") / "precomp"
    root.mkdir()
    (root / "workspace.toml").write_text((demo_workspace.root / "workspace.toml").read_text())
    for name in ("catalog.duckdb", "index", "world"):
        (root / name).symlink_to(demo_workspace.root / name)
    return Workspace.open(root)


def _stats() -> dict[str, cache.CacheStats]:
    return {k: dataclasses.replace(v) for k, v in cache.STATS.items()}


def _writes(stats: dict[str, cache.CacheStats], kind: str) -> int:
    return stats[kind].writes if kind in stats else 0


@pytest.fixture(scope="module")
def runs(clone):
    """All 10 classes with pairs=all: killed from the progress callback in the ``concepts``
    stage, rerun and killed in the ``pairs`` stage, rerun to the end. Cache counters and
    summaries of each run."""
    from explainer.concepts import get_context
    from explainer.precompute import precompute

    ctx = get_context(clone, "cpu")
    out: dict[str, object] = {}

    def killer(stage: str):
        seen: dict[str, float] = {}

        def cb(p):
            if p.stage == stage and p.done >= 1:
                seen["done"] = p.done
                raise _Stop

        return cb, seen

    for name, stage in (("run1", "concepts"), ("run2", "pairs")):
        cache.reset_stats()
        cb, seen = killer(stage)
        with pytest.raises(_Stop):
            precompute(ctx, all_classes=True, pairs="all", progress=cb)
        out[name] = (_stats(), seen["done"])
    cache.reset_stats()
    stages: list[str] = []
    summary = precompute(ctx, all_classes=True, pairs="all",
                         progress=lambda p: stages.append(p.stage))
    out["run3"] = (_stats(), summary, stages)
    return out


def test_precompute_resumes_after_a_kill_and_redoes_only_the_missing_part(runs):
    st1, explained1 = runs["run1"]
    st2, pairs_classes2 = runs["run2"]
    st3, summary, stages = runs["run3"]
    # run 1: all 10 attributions in shared batches, then killed after `explained1` classes
    assert _writes(st1, "attr") == DEMO_CLASSES
    assert 1 <= explained1 < DEMO_CLASSES
    assert _writes(st1, "explain") == explained1
    assert _writes(st1, "pairs") == 0
    # run 2: no attribution again, only the missing explanations; killed in the pairs stage
    # after the entries of the first k classes A (each A's pairs with every B > A) were stored
    assert _writes(st2, "attr") == 0
    assert _writes(st2, "explain") == DEMO_CLASSES - explained1
    k = _writes(st2, "pairs")
    assert 1 <= k < DEMO_CLASSES - 1
    assert pairs_classes2 == sum(DEMO_CLASSES - 1 - a for a in range(k))
    # run 3: only the pair classifiers of the classes A that were missing (9 has no B > 9)
    assert _writes(st3, "attr") == 0 and _writes(st3, "explain") == 0
    assert _writes(st3, "pairs") == DEMO_CLASSES - 1 - k
    assert summary.explained == 0 and summary.explained_cached == DEMO_CLASSES
    assert summary.pairs == ALL_PAIRS
    assert summary.pairs_cached == pairs_classes2
    assert summary.pairs_trained == ALL_PAIRS - pairs_classes2
    assert summary.failed == {}
    assert set(summary.seconds) == {"attribution", "concepts", "pairs"}
    assert {"attribution", "concepts", "pairs", "done"} <= set(stages)


def test_precompute_stores_every_explanation_and_pair(runs, clone):
    from explainer.concepts import get_context
    from explainer.precompute import cached_explanation, precompute_status

    ctx = get_context(clone, "cpu")
    for cls in range(DEMO_CLASSES):
        expl = cached_explanation(ctx, cls)
        assert expl is not None and expl.class_a == cls and expl.n_concepts == 4
    stored = [fetch_pair_classifiers(ctx, a) for a in range(DEMO_CLASSES - 1)]
    assert all(pc is not None for pc in stored)
    covered = {(pc.class_a, int(b)) for pc in stored if pc is not None for b in pc.classes_b}
    assert covered == {(a, b) for a in range(DEMO_CLASSES) for b in range(a + 1, DEMO_CLASSES)}
    assert fetch_pair_classifiers(ctx, DEMO_CLASSES - 1) is None  # only i < j is trained
    # the other direction is the sign flip, exactly
    for a, b in ((0, 1), (3, 7), (2, 9)):
        ab, _ = precomputed_classifier(ctx, a, b)
        ba, when = precomputed_classifier(ctx, b, a)
        assert (ba.class_a, ba.class_b) == (b, a) and when
        assert np.array_equal(ba.weight, -ab.weight) and ba.bias == -ab.bias
        assert (ba.n_pixels_a, ba.n_pixels_b) == (ab.n_pixels_b, ab.n_pixels_a)
    status = precompute_status(ctx)
    assert len(status) == 1
    assert (status[0]["classes"], status[0]["pairs"], status[0]["n"]) == (10, ALL_PAIRS, 4)


def test_stored_pair_classifiers_equal_training_each_pair_alone(runs, clone):
    from explainer.concepts import get_context

    ctx = get_context(clone, "cpu")
    pc = fetch_pair_classifiers(ctx, 0)
    xa = class_contrast_pixels(ctx, 0)
    for b in pc.classes_b:
        one = train_classifier(xa, class_contrast_pixels(ctx, int(b)), class_a=0,
                               class_b=int(b))
        got = pc.classifier(int(b))
        assert np.abs(one.weight - got.weight).max() < 1e-5
        assert abs(one.bias - got.bias) < 1e-5
        assert (one.n_pixels_a, one.n_pixels_b) == (got.n_pixels_a, got.n_pixels_b)
        assert abs(one.accuracy - got.accuracy) < 1e-6


def test_explain_after_precompute_is_a_cache_hit(runs, clone):
    from explainer.concepts import explain_class

    cache.reset_stats()
    expl = explain_class(clone, "husko", device="cpu")
    assert expl.class_a == 1
    assert set(cache.STATS) == {"explain"}  # no attribution lookup, nothing computed
    assert cache.STATS["explain"].hits == 1 and cache.STATS["explain"].writes == 0


def test_contrast_uses_the_precomputed_classifier(runs, clone, monkeypatch):
    import explainer.contrast as contrast
    from explainer.precompute import precomputed_note

    calls: list[str] = []
    real = contrast.train_classifier

    def counting(*args, **kw):
        calls.append(kw.get("solver", "sgd"))
        return real(*args, **kw)

    monkeypatch.setattr(contrast, "train_classifier", counting)
    cache.reset_stats()
    expl = contrast.contrast_classes(clone, "tigrin", "ladyblob", device="cpu")  # 7 vs 2
    assert calls == ["lbfgs"]  # only the side-by-side comparison; the paper's SGD is stored
    stored = fetch_pair_classifiers(_ctx(clone), 2)
    j = list(stored.classes_b).index(7)
    assert np.array_equal(expl.classifier.weight, -stored.weight[j])  # 7 vs 2 = -(2 vs 7)
    assert expl.classifier.bias == -float(stored.bias[j])
    assert expl.params["classifier_precomputed"] == stored.created
    assert "classifier precomputed on" in precomputed_note(clone, expl, device="cpu")


def _ctx(ws):
    from explainer.concepts import get_context

    return get_context(ws, "cpu")


def test_confusable_pairs_follow_the_documented_rule(runs, clone):
    from explainer.precompute import confusable_pairs

    ctx = _ctx(clone)
    cat = ctx.catalog
    count: dict[tuple[int, int], int] = {}
    for i in cat.image_ids():  # by hand: runner-up of each image, both directions summed
        row = cat.image_row(i)
        a, b = row["pred"], row["top5"][1]
        key = (min(a, b), max(a, b))
        count[key] = count.get(key, 0) + 1
    want = {p for p, n in count.items() if n >= 3}  # 10 classes: the partner cap never bites
    got = confusable_pairs(ctx, range(DEMO_CLASSES), top=2, min_count=3, partners=10)
    assert set(got) == want and got == sorted(got)
    assert (0, 1) in got  # lupo / husko, the planted look-alikes
    assert 0 < len(got) < ALL_PAIRS
    one = confusable_pairs(ctx, range(DEMO_CLASSES), top=2, min_count=3, partners=1)
    best = {a: max((n, p) for p, n in count.items() if a in p and n >= 3)[1]
            for a in range(DEMO_CLASSES) if any(a in p and n >= 3 for p, n in count.items())}
    assert set(one) == set(best.values())


def test_precompute_contrasts_both_directions_with_the_stored_classifier(runs, clone):
    from explainer.precompute import cached_explanation, precompute, precomputed_note

    ctx = _ctx(clone)
    cache.reset_stats()
    summary = precompute(ctx, ["zebrox", "sunflop"], pairs="all", contrasts=True)
    assert (summary.pairs, summary.pairs_cached, summary.pairs_trained) == (1, 1, 0)
    assert (summary.contrasts, summary.contrasts_computed) == (2, 2)
    assert _writes(cache.STATS, "pairs") == 0 and _writes(cache.STATS, "contrast") == 2
    there = cached_explanation(ctx, "zebrox", "sunflop")
    back = cached_explanation(ctx, "sunflop", "zebrox")
    assert there is not None and back is not None
    assert np.array_equal(back.classifier.weight, -there.classifier.weight)
    assert "precomputed on" in precomputed_note(ctx, back)


def test_precompute_refuses_bad_requests(clone):
    from explainer.precompute import precompute

    with pytest.raises(ExplorerError, match="Say which classes"):
        precompute(clone, device="cpu")
    with pytest.raises(ExplorerError, match="pairs mode"):
        precompute(clone, ["lupo"], pairs="some", device="cpu")
    with pytest.raises(ExplorerError, match="Unknown class"):
        precompute(clone, ["no such class"], device="cpu")


# --------------------------------------------------------------------------------------------
# the app opens precomputed results without a button press


@pytest.fixture
def app_home(runs, clone, monkeypatch):
    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(clone.root.parent))
    monkeypatch.delenv("CONCEPT_EXPLORER_LEAD_KEY", raising=False)
    return clone


def _app(**params):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=900)
    for k, v in params.items():
        at.query_params[k] = str(v)
    return at


def _captions(at) -> list[str]:
    return [str(c.value) for c in at.caption]


def test_explain_page_opens_a_precomputed_explanation(app_home):
    at = _app(ws=app_home.name, a="lupo", n=4)
    at.switch_page("pages/explain.py").run()
    assert not at.exception, at.exception
    assert "ex_run" not in [b.key for b in at.button]  # nothing to press
    crops = [c for im in at.image for c in im.captions if c.startswith("#")]
    assert len(crops) == 4 * 8
    assert any("precomputed on" in c and "python -m explainer precompute" in c
               for c in _captions(at)), _captions(at)


def test_contrast_page_uses_the_precomputed_classifier(app_home):
    from explainer.precompute import cached_explanation

    assert cached_explanation(app_home, "lupo", "husko", device="cpu") is None
    at = _app(ws=app_home.name, a="lupo", b="husko", n=4)
    at.switch_page("pages/contrast.py").run()
    assert not at.exception, at.exception
    assert "co_run" not in [b.key for b in at.button]
    metrics = {m.label: m.value for m in at.metric}
    assert 0.5 <= float(metrics["Classifier accuracy"].rstrip("%")) / 100 <= 1.0
    assert any("classifier precomputed on" in c for c in _captions(at)), _captions(at)
    # the contrast it computed is now stored as well
    expl = cached_explanation(app_home, "lupo", "husko", device="cpu")
    assert expl is not None and expl.params["classifier_precomputed"]


def test_home_page_counts_what_is_precomputed(app_home):
    at = _app(ws=app_home.name).run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Precomputed classes"] == "10"
    assert metrics["Precomputed pairs"] == str(ALL_PAIRS)


# --------------------------------------------------------------------------------------------
# command line: precompute (a rerun stores nothing new) and export


def test_cli_precompute_and_export(runs, clone, tmp_path, capsys):
    import duckdb

    from cli.explainer_cmd import main
    from explainer.report import load_explanation
    from explorer_core.files import read_npz

    rc = main(["precompute", "--workspace", str(clone.root), "--all", "--pairs", "all",
               "--device", "cpu", "--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "10 classes (0 now, 10 stored before)" in out
    assert f"{ALL_PAIRS} pairs (0 trained now, {ALL_PAIRS} stored before)" in out
    dest = tmp_path / "export"
    rc = main(["export", "--workspace", str(clone.root), "--out", str(dest), "--device", "cpu"])
    assert rc == 0, capsys.readouterr()
    with open(dest / "index.csv") as fh:
        index = list(csv.DictReader(fh))
    explain_rows = [r for r in index if r["kind"] == "explain"]
    assert sorted(int(r["class_a"]) for r in explain_rows) == list(range(DEMO_CLASSES))
    for r in explain_rows:
        expl = load_explanation(dest / r["folder"])
        assert expl.class_a == int(r["class_a"]) and expl.n_concepts == 4
        assert (dest / r["folder"] / "concept_0" / "crop_0.png").is_file()
    with open(dest / "pairs.csv") as fh:
        pairs = list(csv.DictReader(fh))
    assert len(pairs) == ALL_PAIRS
    assert all(int(p["class_a"]) < int(p["class_b"]) for p in pairs)
    con = duckdb.connect()
    n_parquet = con.execute(f"SELECT count(*) FROM '{dest / 'pairs.parquet'}'").fetchall()[0][0]
    con.close()
    assert n_parquet == ALL_PAIRS
    weights = read_npz(dest / "pair_weights.npz")
    assert weights["weight"].shape[0] == ALL_PAIRS
    ctx = _ctx(clone)
    row = next(p for p in pairs if (p["class_a"], p["class_b"]) == ("3", "7"))
    k = int(row["weight_row"])
    assert (weights["class_a"][k], weights["class_b"][k]) == (3, 7)
    stored = fetch_pair_classifiers(ctx, 3)
    j = list(stored.classes_b).index(7)
    assert np.array_equal(weights["weight"][k], stored.weight[j])
    assert abs(float(row["accuracy"]) - float(stored.accuracy[j])) < 1e-9


def test_cli_precompute_and_export_refuse_bad_arguments(runs, clone, tmp_path, capsys):
    from cli.explainer_cmd import main

    ws = str(clone.root)
    for argv in (["precompute", "--workspace", ws],  # neither --classes nor --all
                 ["precompute", "--workspace", ws, "--all", "--classes", "lupo"],
                 ["precompute", "--workspace", ws, "--all", "--pairs", "some"],
                 ["precompute", "--workspace", ws, "--all", "--n", "0"],
                 ["precompute", "--workspace", ws, "--all", "--block-mb", "-1"],
                 ["export", "--workspace", ws]):  # no --out
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (argv, err)
    # settings that were never precomputed: one clear line, nothing written
    assert main(["export", "--workspace", ws, "--n", "3", "--out", str(tmp_path / "x"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Nothing is precomputed" in err and "n=4" in err
    assert not (tmp_path / "x").exists()
