"""explain_class / contrast_classes on EfficientNet-Lite0 and the shared photos, plus input checks."""

import numpy as np
import pytest
import torch

from explainer.attribution import attribute
from explainer.concepts import (
    ExplainContext,
    _check_params,
    explain_class,
    explanation_from_activations,
    resolve_class,
)
from explainer.contrast import contrast_classes
from explorer_core.errors import ExplorerError


def test_resolve_class_names_and_errors(lite0):
    assert resolve_class(lite0, "Tabby") == 281
    assert resolve_class(lite0, "281") == 281
    assert resolve_class(lite0, 0) == 0
    with pytest.raises(ExplorerError, match="did you mean: 'tabby'"):
        resolve_class(lite0, "tabbby")
    with pytest.raises(ExplorerError, match="out of range; .* 0..999"):
        resolve_class(lite0, 1000)


@pytest.mark.parametrize("kw,msg", [
    (dict(n=0), "outside 1..10"), (dict(n=11), "outside 1..10"),
    (dict(method="lrp"), "Unknown attribution method"), (dict(variant="x"), "Unknown variant"),
    (dict(solver="gpu"), "Unknown NMF solver"), (dict(max_images=0), "at least 1"),
])
def test_bad_parameters(kw, msg):
    args = dict(n=4, method="deeplift", variant="paper", solver="sklearn", max_images=500, m=8)
    args.update(kw)
    with pytest.raises(ExplorerError, match=msg):
        _check_params(**args)


def test_deeplift_completeness_on_lite0(lite0):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 224, 224, generator=g)
    acts, attr, delta = attribute(lite0, x, "bn2", [1, 2, 3, 4], "deeplift", return_delta=True)
    assert acts.shape == attr.shape == (4, 1280, 7, 7)
    assert float(acts.min()) >= 0
    with torch.no_grad():
        f = lite0.logits(x)[torch.arange(4), torch.tensor([1, 2, 3, 4])]
        f0 = lite0.logits(torch.ones(1, 3, 224, 224))[0, [1, 2, 3, 4]]
    assert torch.allclose(attr.flatten(1).sum(1), f - f0, atol=1e-3)
    assert float(delta.abs().max()) < 1e-3


@pytest.fixture(scope="module")
def ctx(lite0_workspace, lite0, lite0_catalog):
    return ExplainContext(lite0_workspace, lite0, lite0_catalog)


@pytest.fixture(scope="module")
def big_class(ctx):
    counts = ctx.catalog.predicted_counts()
    return max(counts, key=lambda c: (counts[c], -c))


def test_explain_class_end_to_end(ctx, big_class):
    expl = explain_class(ctx, big_class, n_concepts=4, method="grad_x_act", cache=False)
    n_img = len(ctx.catalog.images_predicted_as(big_class))
    assert len(expl.image_ids) == n_img >= 5
    assert expl.n_concepts == 4 and expl.concept_vectors.shape == (4, 1280)
    imp = [c.importance for c in expl.concepts]
    assert imp == sorted(imp, reverse=True) and abs(sum(imp) - 1) < 1e-5
    assert expl.heatmaps.shape == (n_img, 4, 7, 7) and expl.heatmaps.min() >= 0
    assert 0 < expl.reconstruction_error < 1
    for c in expl.concepts:
        assert len(c.crops) == 8 and len(c.crops_excluded) == 8
        scores = [r.score for r in c.crops]
        assert scores == sorted(scores, reverse=True)
        assert all(r.crop_pred != big_class and r.image_pred != big_class
                   for r in c.crops_excluded)
    pt = expl.prediction_test
    assert pt is not None and pt.stitched.shape == (4 * 74, 74, 3)
    assert pt.passed and pt.prob_target > 0.3  # the most frequent class explains well
    assert expl.prediction_test_excluded.exclude_target


def test_cache_reuses_attribution_for_other_n(ctx, big_class, monkeypatch, tmp_path):
    """Reuse proven by counting attribution calls and cache hits, never by timing."""
    import dataclasses

    import explainer.concepts as concepts
    from explorer_core import cache

    # the shared catalog with an empty cache folder of its own (ws.cache_dir = tmp_path/cache)
    ctx = ExplainContext(dataclasses.replace(ctx.ws, root=tmp_path), ctx.lm, ctx.catalog)
    calls = []
    real = concepts.attribute_checked
    monkeypatch.setattr(concepts, "attribute_checked",
                        lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    kw = dict(method="grad_x_act", max_images=6)
    cache.reset_stats()
    e1 = explain_class(ctx, big_class, n_concepts=3, **kw)
    assert calls == [6]
    n_calls = 1
    e2 = explain_class(ctx, big_class, n_concepts=3, **kw)
    assert len(calls) == n_calls and cache.STATS["explain"].hits == 1
    assert np.array_equal(e1.concept_vectors, e2.concept_vectors)
    assert np.array_equal(e1.heatmaps, e2.heatmaps)
    # another n: a new NMF on the cached attribution (no attribution call)
    e3 = explain_class(ctx, big_class, n_concepts=2, **kw)
    assert e3.n_concepts == 2 and len(e3.image_ids) == 6
    assert len(calls) == n_calls
    assert cache.STATS["attr"].hits == 1 and cache.STATS["attr"].writes == 1
    # without the cache it is attributed again
    explain_class(ctx, big_class, n_concepts=2, cache=False, **kw)
    assert calls[-1] == 6 and len(calls) == n_calls + 1


def test_class_without_images_and_too_many_concepts(ctx):
    counts = ctx.catalog.predicted_counts()
    empty = next(c for c in range(1000) if c not in counts)
    with pytest.raises(ExplorerError, match="No image .* predicted as class"):
        explain_class(ctx, empty, cache=False)
    X = torch.zeros(1, 1280, 7, 7)
    X[0, :, 0, 0] = 1.0
    X[0, :, 1, 1] = 2.0
    with pytest.raises(ExplorerError, match="Only 2 pixel"):
        explanation_from_activations(ctx, X, [0], class_a=1, class_b=None, n=3, m=8,
                                     solver="sklearn", seed=0, params={}, warnings=[],
                                     timings={})


def test_contrast_classes(ctx, big_class):
    counts = ctx.catalog.predicted_counts()
    other = sorted((c for c in counts if c != big_class), key=lambda c: (-counts[c], c))[0]
    with pytest.raises(ExplorerError, match="same"):
        contrast_classes(ctx, big_class, big_class)
    expl = contrast_classes(ctx, big_class, other, method="grad_x_act", cache=False)
    clf = expl.classifier
    assert (clf.class_a, clf.class_b) == (big_class, other)
    from explainer.contrast import class_contrast_pixels

    xa = class_contrast_pixels(ctx, big_class, method="grad_x_act").numpy()
    xb = class_contrast_pixels(ctx, other, method="grad_x_act").numpy()
    assert float(clf.weight @ (xa.mean(0) - xb.mean(0))) > 0  # w points to A
    assert clf.accuracy > 0.9
    comp = expl.params["classifier_comparison"]
    assert abs(comp["sgd"]["accuracy"] - comp["lbfgs"]["accuracy"]) <= 0.01
    assert expl.n_concepts == 4 and expl.heatmaps.shape[0] == len(expl.image_ids)
    assert expl.prediction_test is not None
