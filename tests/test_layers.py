"""Several layers in one catalog (issue 10, item 1): explain, contrast, search and the command
lines pick the layer among the catalog's layers; unknown layers are refused with the list; layers
with negative outputs stay marked and are refused or clamped as before.

Runs on the three-layer demo catalog of tests/conftest.py (``multilayer_workspace``: 120 demo
images, ``layer3.relu_out``, ``layer4.bn2``, ``layer4.relu_out``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import MULTI_LAYERS
from test_catalog_robust import noise_images

from data_index.catalog import Catalog
from explainer.concepts import explain_class, get_context
from explainer.contrast import contrast_classes
from explorer_core.errors import ExplorerError

ROOT = Path(__file__).resolve().parents[1]
KW = dict(n_concepts=2, method="grad_x_act", max_images=8, m=4, cache=False)


@pytest.fixture(scope="module")
def ctx(multilayer_workspace):
    return get_context(multilayer_workspace, "cpu")


@pytest.fixture(scope="module")
def cls(ctx):
    counts = ctx.catalog.predicted_counts()
    return max(counts, key=counts.get)


def test_the_context_is_at_the_default_layer_and_unknown_layers_are_refused(ctx):
    assert ctx.layer == "layer4.relu_out" and ctx.catalog.layers == MULTI_LAYERS
    other = get_context(ctx, layer="layer3.relu_out")
    assert other.layer == "layer3.relu_out" and other.catalog is ctx.catalog
    assert other.search.layer == "layer3.relu_out" and other.search.dim == 96
    assert get_context(ctx.ws, "cpu", layer="layer3.relu_out").layer == "layer3.relu_out"
    for bad in ("layer2.relu_out", "nope"):
        with pytest.raises(ExplorerError, match=f"Layer '{bad}' is not in the catalog.*"
                                                "layer3.relu_out, layer4.bn2, layer4.relu_out"):
            get_context(ctx.ws, "cpu", layer=bad)


def test_explain_at_another_layer_uses_that_layers_activations_and_crops(ctx, cls):
    deep = explain_class(ctx, cls, **KW)
    mid = explain_class(ctx, cls, layer="layer3.relu_out", **KW)
    assert (deep.layer, mid.layer) == ("layer4.relu_out", "layer3.relu_out")
    assert mid.params["layer"] == "layer3.relu_out" != deep.params["layer"]
    assert deep.concept_vectors.shape == (2, 192) and mid.concept_vectors.shape == (2, 96)
    assert mid.heatmaps.shape[2:] == (12, 12) and deep.heatmaps.shape[2:] == (6, 6)
    store = ctx.catalog.store("layer3.relu_out")
    for concept in mid.concepts:
        v = concept.vector / np.linalg.norm(concept.vector)
        for ref in concept.crops:
            x = store.vectors([ref.crop_id])[0]
            assert ref.score == pytest.approx(float(v @ x / np.linalg.norm(x)), abs=1e-5)
    # the first crop is the best of the whole layer-3 crop bank
    all_ids, emb = ctx.catalog.embeddings("layer3.relu_out")
    v = mid.concepts[0].vector
    best = all_ids[np.argmax(emb @ v / np.linalg.norm(emb, axis=1))]
    assert mid.concepts[0].crops[0].crop_id == int(best)


def test_negative_layers_stay_marked_and_are_refused_unless_clamped(ctx, cls):
    assert [ctx.catalog.nonnegative(x) for x in MULTI_LAYERS] == [True, False, True]
    with pytest.raises(ExplorerError, match="negative"):
        explain_class(ctx, cls, layer="layer4.bn2", **KW)
    clamped = explain_class(ctx, cls, layer="layer4.bn2", clamp=True, **KW)
    assert clamped.layer == "layer4.bn2" and any("clamp" in w for w in clamped.warnings)


def test_contrast_at_a_layer(ctx):
    counts = ctx.catalog.predicted_counts()
    a, b = sorted(counts, key=lambda c: -counts[c])[:2]
    expl = contrast_classes(ctx, a, b, layer="layer3.relu_out", compare_solvers=False,
                            classifier_solver="lbfgs", **KW)
    assert expl.layer == "layer3.relu_out" and expl.classifier is not None
    assert expl.classifier.weight.shape == (96,) and expl.concept_vectors.shape == (2, 96)


# ---- command lines ----------------------------------------------------------------------------

def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_cli_status_search_and_explain_at_a_layer(multilayer_workspace, cls, tmp_path):
    w = str(multilayer_workspace.root)
    r = _run("data_index", "status", "--workspace", w)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("layers"))
    assert re.search(r"layer3\.relu_out \(96 dims, [\d.]+ MiB, index exact, recall@8 1\.000\), "
                     r"layer4\.bn2 \(192 dims.*layer4\.relu_out \(192 dims, [\d.]+ MiB, index exact, "
                     r"recall@8 1\.000\) \[default\]", line)
    assert "3x3 crops of 32 px, stride 32, on 96 px images" in r.stdout
    assert re.search(r"^storage\s+float16$", r.stdout, re.M)
    r = _run("data_index", "search", "--workspace", w, "--crop-id", "40", "-m", "3",
             "--layer", "layer3.relu_out")
    assert r.returncode == 0, r.stderr
    with Catalog.open(multilayer_workspace) as cat:
        from data_index.search import CropSearch

        want = CropSearch(cat, layer="layer3.relu_out").search_ids(
            cat.store("layer3.relu_out").vectors([40]), 3)[1][0].tolist()
    assert [int(ln.split()[1]) for ln in r.stdout.splitlines()[1:]] == want
    r = _run("data_index", "search", "--workspace", w, "--crop-id", "40", "--layer", "x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "layer4.bn2" in r.stderr
    out = tmp_path / "out"
    r = _run("explainer", "explain", "--workspace", w, "--class", str(cls), "--n", "2",
             "--max-images", "6", "--method", "grad_x_act", "--layer", "layer3.relu_out",
             "--device", "cpu", "--no-cache", "--out", str(out))
    assert r.returncode == 0, r.stderr
    js = json.loads((out / "explanation.json").read_text())
    assert js["layer"] == "layer3.relu_out"
    assert np.load(out / "arrays.npz")["concept_vectors"].shape == (2, 96)


def test_cli_build_with_several_layers_in_forward_order(tmp_path):
    noise_images(tmp_path / "imgs", 3)
    ws = tmp_path / "ws"
    r = _run("data_index", "build", "--workspace", str(ws), "--model", "demo", "--images",
             str(tmp_path / "imgs"), "--layers", "layer4.relu_out,layer2.relu_out",
             "--layer", "layer4.relu_out", "--crop-size", "48", "--stride", "24",
             "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "3 images, 27 crops" in r.stdout
    text = (ws / "workspace.toml").read_text()
    assert 'layers = ["layer2.relu_out", "layer4.relu_out"]' in text  # forward order
    assert 'layer = "layer4.relu_out"' in text and "stride = 24" in text
    with Catalog.open(ws) as cat:
        assert cat.layers == ["layer2.relu_out", "layer4.relu_out"]
        assert cat.default_layer == "layer4.relu_out" and cat.grid.per_image == 9
    bad = _run("data_index", "build", "--workspace", str(tmp_path / "w2"), "--model", "demo",
               "--images", str(tmp_path / "imgs"), "--layers", "layer4.relu_out,nope")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "Unknown layer 'nope'" in bad.stderr
    dup = _run("data_index", "build", "--workspace", str(tmp_path / "w3"), "--model", "demo",
               "--images", str(tmp_path / "imgs"), "--layers", "layer4,layer4")
    assert dup.returncode == 2 and "names a layer twice" in dup.stderr


def test_cli_sharded_build_and_merge(tmp_path):
    noise_images(tmp_path / "imgs", 6)
    ws = str(tmp_path / "ws")
    base = ["data_index", "build", "--workspace", ws, "--quiet"]
    r = _run(*base, "--model", "demo", "--images", str(tmp_path / "imgs"), "--device", "cpu",
             "--shards", "2", "--shard", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("built shard 1 of 2 of 'ws': 0 images") and "--merge" in r.stdout
    r = _run(*base, "--merge")
    assert r.returncode == 2 and "shard(s) 0 missing" in r.stderr and "--shard 0" in r.stderr
    r = _run(*base, "--shards", "2", "--shard", "0")
    assert r.returncode == 0 and "built shard 0 of 2 of 'ws': 6 images" in r.stdout, r.stderr
    r = _run(*base, "--merge")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("merged 2 shards into the catalog of 'ws': 6 images, 54 crops")
    with Catalog.open(ws) as cat:
        assert cat.n_crops == 54 and len(cat.store()) == 54
