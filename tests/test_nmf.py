"""NMF: objective, ordering, torch solver vs scikit-learn."""

import numpy as np
import pytest

from explainer.nmf import concept_order, nmf
from explorer_core.errors import ExplorerError


def _planted(seed=0, rows=600, cols=40, k=4, noise=0.05):
    rng = np.random.default_rng(seed)
    W = rng.random((rows, k)) ** 3
    H = rng.random((k, cols)) * (rng.random((k, cols)) > 0.5)
    return (W @ H + noise * rng.random((rows, cols))).astype(np.float32)


def test_sklearn_nmf_reports_the_frobenius_objective():
    V = _planted()
    W, H, err = nmf(V, 4, solver="sklearn")
    assert W.shape == (600, 4) and H.shape == (4, 40)
    assert (W >= 0).all() and (H >= 0).all()
    direct = np.linalg.norm(V - W @ H) / np.linalg.norm(V)
    assert abs(direct - err) < 1e-5
    assert err < 0.1  # planted rank 4 + small noise


@pytest.mark.parametrize("seed", [0, 1])
def test_torch_solver_within_one_percent_of_sklearn(seed):
    V = _planted(seed, rows=1500, cols=64)
    _, _, e_sk = nmf(V, 4, solver="sklearn", seed=seed)
    W, H, e_t = nmf(V, 4, solver="torch", seed=seed)
    assert (W >= 0).all() and (H >= 0).all()
    assert e_t <= e_sk * 1.01, (e_t, e_sk)
    rng = np.random.default_rng(seed)
    V2 = (rng.random((800, 128)) ** 4).astype(np.float32)  # no planted structure
    _, _, e_sk2 = nmf(V2, 6, solver="sklearn", seed=seed)
    _, _, e_t2 = nmf(V2, 6, solver="torch", seed=seed)
    assert e_t2 <= e_sk2 * 1.01, (e_t2, e_sk2)


def test_concept_order_by_share():
    W = np.array([[1.0, 0.0, 2.0], [1.0, 1.0, 2.0]])  # column sums 2, 1, 4
    H = np.array([[1.0, 0.0], [0.0, 10.0], [0.0, 1.0]])  # norms 1, 10, 1
    order, share = concept_order(W, H)  # shares 2, 10, 4
    assert order.tolist() == [1, 2, 0]
    assert np.allclose(share, [10 / 16, 4 / 16, 2 / 16])


def test_bad_n_and_solver_raise():
    V = _planted(rows=5, cols=40)
    with pytest.raises(ExplorerError, match="n <= min"):
        nmf(V, 6)
    with pytest.raises(ExplorerError, match="Unknown NMF solver"):
        nmf(V, 2, solver="cuda-magic")
