"""Real-model evaluation: EfficientNet-Lite0, layer bn2, the 2000 shared photos as images and
crop bank, n = 4, grad_x_act.

Prediction test over a seeded subset of the classes with >= 3 predicted images (the full set,
~248 classes, runs in bench/bench_explain.py); shift test over 30 seeded random pairs.
An independent implementation measured: allowed 0.75 / 83 %, excluded 0.29 / 32 %, random
0.00 / 0 %; shift default 0.001, max 0.999.
"""

import pytest

from explainer.concepts import ExplainContext
from explainer.evaluation import eligible_classes, evaluate_prediction_test, evaluate_shift_test

SUBSET = 60


@pytest.fixture(scope="module")
def ctx(lite0_workspace, lite0, lite0_catalog):
    return ExplainContext(lite0_workspace, lite0, lite0_catalog)


def test_prediction_test_allowed_excluded_random(ctx):
    assert len(eligible_classes(ctx, 3)) >= 200
    res = evaluate_prediction_test(ctx, min_images=3, limit=SUBSET, seed=0, n_concepts=4,
                                   method="grad_x_act")
    s = res.summary
    print("prediction test", s)
    assert s["n_classes"] == SUBSET and len(res.rows) == SUBSET
    assert s["hit_rate_allowed"] >= 0.70
    assert s["hit_rate_excluded"] >= 0.20
    if s["hit_rate_random"] > 0:
        assert s["hit_rate_excluded"] >= 10 * s["hit_rate_random"]
    else:
        assert s["hit_rate_excluded"] > 0 and s["mean_prob_random"] <= 0.02
    assert s["mean_prob_allowed"] > s["mean_prob_excluded"] > s["mean_prob_random"]


def test_shift_test_30_pairs(ctx):
    res = evaluate_shift_test(ctx, 30, seed=0, min_images=3, method="grad_x_act")
    s = res.summary
    print("shift test", {k: v for k, v in s.items() if k != "offsets"})
    assert s["n_pairs"] == 30
    assert s["mean_max_prob_a"] >= 0.95
    assert s["mean_default_prob_a"] <= 0.05
    curve = s["mean_prob_a_per_offset"]
    assert curve[0] == pytest.approx(s["mean_default_prob_a"])
    assert max(curve) > 10 * curve[0]
