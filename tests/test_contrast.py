"""Contrast stage: classifier orientation (w points to A), SGD exactness, L-BFGS agreement."""

import numpy as np
import pytest
import torch

from explainer.contrast import contrast_scale, train_classifier
from explorer_core.errors import ExplorerError


def _toy(seed=0, n=300, c=16, sep=1.0):
    # A is strong on the first half of the channels, B on the second half
    rng = np.random.default_rng(seed)
    mu_a = np.r_[np.full(c // 2, 1.0 + sep), np.full(c - c // 2, 1.0)]
    mu_b = mu_a[::-1]
    xa = np.abs(rng.normal(mu_a, 0.3, (n, c)))
    xb = np.abs(rng.normal(mu_b, 0.3, (n + 50, c)))
    return xa.astype(np.float32), xb.astype(np.float32)


def test_orientation_label_one_is_a():
    xa, xb = _toy()
    clf = train_classifier(xa, xb, class_a=7, class_b=3)
    assert (clf.class_a, clf.class_b) == (7, 3)
    assert float(clf.weight @ (xa.mean(0) - xb.mean(0))) > 0  # w points to A
    assert clf.accuracy > 0.98
    za = xa @ clf.weight + clf.bias
    assert (za > 0).mean() > 0.97  # A pixels score positive
    # swapping the classes flips the direction
    clf2 = train_classifier(xb, xa)
    assert float(clf2.weight @ (xa.mean(0) - xb.mean(0))) < 0


def test_sgd_matches_a_hand_written_loop():
    xa, xb = _toy(1, n=50, c=8)
    clf = train_classifier(xa, xb, epochs=100, lr=0.01)
    X = np.concatenate([xa, xb]).astype(np.float64)
    y = np.concatenate([np.ones(len(xa)), np.zeros(len(xb))])
    w, b = np.zeros(X.shape[1]), 0.0
    for _ in range(100):
        p = 1 / (1 + np.exp(-(X @ w + b)))
        w -= 0.01 * X.T @ (p - y) / len(y)
        b -= 0.01 * float(np.mean(p - y))
    assert np.allclose(clf.weight, w, atol=1e-5)
    assert abs(clf.bias - b) < 1e-5


def test_lbfgs_agrees_with_sgd_within_one_point():
    xa, xb = _toy(2, sep=0.25)  # overlapping classes
    sgd = train_classifier(xa, xb, solver="sgd")
    lb = train_classifier(xa, xb, solver="lbfgs")
    assert abs(sgd.accuracy - lb.accuracy) <= 0.01 + 1e-9 or lb.accuracy > sgd.accuracy
    assert lb.loss <= sgd.loss + 1e-6
    cos = lb.weight @ sgd.weight / np.linalg.norm(lb.weight) / np.linalg.norm(sgd.weight)
    assert cos > 0.5


def test_contrast_scale_is_relu_z_times_x():
    a = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # 2 channels, 1x2 pixels
    w = np.array([1.0, -1.0])
    out = contrast_scale(a, w, 0.5)  # z = 1-3+.5=-1.5 -> 0 ; 2-0+.5=2.5
    assert torch.allclose(out, torch.tensor([[[[0.0, 5.0]], [[0.0, 0.0]]]]))


def test_empty_class_raises():
    with pytest.raises(ExplorerError, match="no pixels"):
        train_classifier(np.zeros((0, 4)), np.ones((3, 4)))
