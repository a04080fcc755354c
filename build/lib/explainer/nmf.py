"""Non-negative matrix factorisation (method.md §1.4): one function, two solvers, one objective."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from explorer_core.errors import ExplorerError

__all__ = ["nmf", "SOLVERS", "concept_order"]

SOLVERS = ("sklearn", "torch")


def nmf(V: np.ndarray | torch.Tensor, n: int, *, solver: str = "sklearn", seed: int = 0,
        max_iter: int = 200, tol: float = 1e-4, device: str | torch.device | None = None
        ) -> tuple[np.ndarray, np.ndarray, float]:
    r"""Factorise ``V ≈ W H`` with non-negative factors.

    Minimises the squared Frobenius reconstruction error, without regularisation:

    .. math::  \min_{W \ge 0,\, H \ge 0} \; \lVert V - W H \rVert_F^2

    Parameters
    ----------
    V : (N, C) non-negative
        One row per pixel (all-zero rows already dropped).
    n : int
        Number of components (concepts), ``1 <= n <= min(N, C)``.
    solver : ``sklearn`` | ``torch``
        ``sklearn``: :class:`sklearn.decomposition.NMF` with its default parameters (init
        ``nndsvda``, coordinate descent, ``max_iter`` 200, ``tol`` 1e-4) and
        ``random_state=seed`` - the paper's setting. ``torch``: HALS (hierarchical alternating
        least squares) from the same NNDSVDa initialisation, on ``device`` (GPU when given);
        stops when the relative error improves by less than ``tol`` over 10 iterations.
    seed : int
        ``random_state`` (sklearn) / generator seed of the randomised SVD (torch).

    Returns
    -------
    W : (N, n) float32 - per-row component strengths
    H : (n, C) float32 - the components (concept vectors)
    rel_error : float - ``||V - W H||_F / ||V||_F``
    """
    if solver not in SOLVERS:
        raise ExplorerError(f"Unknown NMF solver '{solver}'; use one of {', '.join(SOLVERS)}")
    rows, cols = V.shape
    if not 1 <= n <= min(rows, cols):
        raise ExplorerError(f"NMF needs 1 <= n <= min(rows, channels) = {min(rows, cols)}; "
                            f"got n={n}. Use fewer concepts or more images")
    if solver == "sklearn":
        from sklearn.decomposition import NMF

        Vn = V.detach().cpu().numpy() if isinstance(V, torch.Tensor) else np.asarray(V)
        Vn = Vn.astype(np.float32, copy=False)
        model = NMF(n_components=n, random_state=seed, max_iter=max_iter, tol=tol)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter: sklearn default
            W = model.fit_transform(Vn)
        H = model.components_
        Wt, Ht, Vt = torch.from_numpy(W), torch.from_numpy(H), torch.from_numpy(Vn)
        err = _rel_error(Vt.double(), Wt.double(), Ht.double())
        return W.astype(np.float32), H.astype(np.float32), err
    dev = torch.device(device) if device is not None else (
        V.device if isinstance(V, torch.Tensor) else torch.device("cpu"))
    Vt = torch.as_tensor(V, dtype=torch.float32).to(dev)
    W, H = _nndsvda(Vt, n, seed)
    W, H = _hals(Vt, W, H, max_iter, tol)
    err = _rel_error(Vt.double(), W.double(), H.double())
    return W.cpu().numpy(), H.cpu().numpy(), err


def _rel_error(V: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    """``||V - WH||_F / ||V||_F`` without forming ``WH``."""
    vv = (V * V).sum()
    sq = vv - 2 * ((W.T @ V) * H).sum() + ((W.T @ W) * (H @ H.T)).sum()
    return float(torch.sqrt(sq.clamp_min(0) / vv.clamp_min(1e-30)))


def _nndsvda(V: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVD initialisation with zeros filled by the mean of V (sklearn's ``nndsvda``)."""
    rows, cols = V.shape
    if min(rows, cols) <= 2048 and rows * cols <= 4_000_000:
        U, S, Vh = torch.linalg.svd(V, full_matrices=False)
    else:
        g = torch.random.fork_rng(devices=[V.device] if V.device.type == "cuda" else [])
        with g:
            torch.manual_seed(seed)
            U, S, Vv = torch.svd_lowrank(V, q=min(n + 10, min(rows, cols)), niter=7)
        Vh = Vv.T
    U, S, Vh = U[:, :n], S[:n], Vh[:n]
    W = torch.zeros(rows, n, dtype=V.dtype, device=V.device)
    H = torch.zeros(n, cols, dtype=V.dtype, device=V.device)
    W[:, 0] = S[0].sqrt() * U[:, 0].abs()
    H[0] = S[0].sqrt() * Vh[0].abs()
    for j in range(1, n):
        x, y = U[:, j], Vh[j]
        xp, yp, xn, yn = x.clamp_min(0), y.clamp_min(0), (-x).clamp_min(0), (-y).clamp_min(0)
        xpn, ypn, xnn, ynn = xp.norm(), yp.norm(), xn.norm(), yn.norm()
        mp, mn = xpn * ypn, xnn * ynn
        if mp > mn:
            u, v, sigma = xp / xpn, yp / ypn, mp
        else:
            u, v, sigma = xn / xnn.clamp_min(1e-30), yn / ynn.clamp_min(1e-30), mn
        lbd = (S[j] * sigma).sqrt()
        W[:, j] = lbd * u
        H[j] = lbd * v
    eps = 1e-6
    avg = V.mean()
    W[W < eps] = avg
    H[H < eps] = avg
    return W, H


def _hals(V: torch.Tensor, W: torch.Tensor, H: torch.Tensor, max_iter: int, tol: float
          ) -> tuple[torch.Tensor, torch.Tensor]:
    n = W.shape[1]
    eps = 1e-12
    prev = _rel_error(V, W, H)
    for it in range(1, max_iter + 1):
        VHt, HHt = V @ H.T, H @ H.T
        for k in range(n):
            W[:, k] = (W[:, k] + (VHt[:, k] - W @ HHt[:, k]) / HHt[k, k].clamp_min(eps)).clamp_min(0)
        WtV, WtW = W.T @ V, W.T @ W
        for k in range(n):
            H[k] = (H[k] + (WtV[k] - WtW[k] @ H) / WtW[k, k].clamp_min(eps)).clamp_min(0)
        if it % 10 == 0:
            err = _rel_error(V, W, H)
            if prev - err < tol * max(prev, eps):
                break
            prev = err
    return W, H


def concept_order(W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order components by their share of the reconstruction ``sum(W[:, k]) * ||H[k]||``,
    largest first. Returns ``(order, shares)``, shares normalised to sum 1 (in that order)."""
    share = W.sum(axis=0) * np.linalg.norm(H, axis=1)
    order = np.argsort(-share, kind="stable")
    total = share.sum()
    return order, (share[order] / total if total > 0 else np.full(len(order), 1 / len(order)))
