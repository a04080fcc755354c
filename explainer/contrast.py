"""Class contrasting (method.md §4): the A-vs-B linear classifier and the contrast scaling.

Orientation, everywhere: label **1 = class A**, 0 = class B, so ``z = w . x + b > 0`` means "A"
and ``w`` points towards A. (The authors' scripts negate ``w`` but not ``b``; not here.)
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from explorer_core.errors import ExplorerError
from explorer_core.files import read_json, read_npz, write_json, write_npz
from explorer_core.progress import ProgressFn, report
from explorer_core.results import ClassifierInfo, Explanation, read_explanation, save_explanation

__all__ = ["CLASSIFIER_SOLVERS", "train_classifier", "contrast_scale", "class_contrast_pixels",
           "pair_classifier", "contrast_params", "contrast_classes", "PairClassifiers",
           "flip_classifier", "train_pair_classifiers",
           "pair_params", "store_pair_classifiers", "fetch_pair_classifiers",
           "precomputed_classifier"]

CLASSIFIER_SOLVERS = ("sgd", "lbfgs")


def train_classifier(x_a: torch.Tensor | np.ndarray, x_b: torch.Tensor | np.ndarray, *,
                     class_a: int = 1, class_b: int = 0, solver: str = "sgd", epochs: int = 100,
                     lr: float = 0.01, l2: float = 1e-4, device: str | torch.device = "cpu"
                     ) -> ClassifierInfo:
    """Train ``z = w . x + b`` with sigmoid + binary cross-entropy, label 1 = A (rows of
    ``x_a`` (Na, C)), 0 = B (rows of ``x_b`` (Nb, C)).

    ``sgd`` (the paper): ``w, b`` start at zero; ``epochs`` full-batch steps of plain SGD
    (no momentum, no weight decay) with learning rate ``lr`` on the mean BCE.
    ``lbfgs`` (faster to converge): torch L-BFGS (strong Wolfe line search, ``epochs`` iterations)
    on the mean BCE + ``l2/2 * ||w||^2`` (a small ridge keeps ``w`` finite on separable pixels).

    Accuracy is measured on the training pixels, as in the paper."""
    if solver not in CLASSIFIER_SOLVERS:
        raise ExplorerError(f"Unknown classifier solver '{solver}'; use one of "
                            f"{', '.join(CLASSIFIER_SOLVERS)}")
    xa = torch.as_tensor(np.asarray(x_a), dtype=torch.float32, device=device)
    xb = torch.as_tensor(np.asarray(x_b), dtype=torch.float32, device=device)
    if len(xa) == 0 or len(xb) == 0:
        which = class_a if len(xa) == 0 else class_b
        raise ExplorerError(f"Class {which} has no pixels with positive attribution to train the "
                            "contrast classifier; use more images or another attribution method")
    X = torch.cat([xa, xb])
    y = torch.cat([torch.ones(len(xa), device=device), torch.zeros(len(xb), device=device)])
    w = torch.zeros(X.shape[1], device=device, requires_grad=True)
    b = torch.zeros((), device=device, requires_grad=True)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    t0 = time.perf_counter()
    with torch.enable_grad():
        if solver == "sgd":
            sgd = torch.optim.SGD([w, b], lr=lr)
            for _ in range(epochs):
                sgd.zero_grad()
                bce(X @ w + b, y).backward()
                sgd.step()
        else:
            opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=epochs, line_search_fn="strong_wolfe",
                                    tolerance_grad=1e-9, tolerance_change=1e-12)

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = bce(X @ w + b, y) + 0.5 * l2 * (w * w).sum()
                loss.backward()
                return loss

            opt.step(closure)
    with torch.no_grad():
        z = X @ w + b
        final_loss = float(bce(z, y))
        acc = float(((z > 0).float() == y).float().mean())
    if device != "cpu" and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return ClassifierInfo(class_a=int(class_a), class_b=int(class_b),
                          weight=w.detach().cpu().numpy().astype(np.float32), bias=float(b.detach()),
                          solver=solver, epochs=epochs, lr=lr if solver == "sgd" else 1.0,
                          accuracy=acc, n_pixels_a=len(xa), n_pixels_b=len(xb),
                          seconds=time.perf_counter() - t0, loss=final_loss)


def contrast_scale(activations: torch.Tensor, weight: np.ndarray | torch.Tensor, bias: float
                   ) -> torch.Tensor:
    """``x' = max(w . x + b, 0) * x`` at every pixel; ``activations`` (B, C, h, w)."""
    w = torch.as_tensor(np.asarray(weight), dtype=activations.dtype, device=activations.device)
    z = torch.einsum("bchw,c->bhw", activations, w) + float(bias)
    return activations * z.clamp_min(0).unsqueeze(1)


# --------------------------------------------------------------------------------------------
# the pipeline: contrast A against B


def class_contrast_pixels(ctx: Any, cls: int, *, method: str = "deeplift", variant: str = "paper",
                          max_images: int = 500, seed: int = 0, cache: bool = True,
                          clamp: bool = False, warnings: list[str] | None = None,
                          completeness: list[dict[str, np.ndarray]] | None = None
                          ) -> torch.Tensor:
    """The class's contrast pixels (k, C): unscaled activations of pixels with ``s > 0`` and
    ``s >= 0.25 * max(s of the image)`` over its images (derived from the per-class cached
    attribution). DeepLift's per-image completeness (``delta``, ``gap``) of the class's images
    is appended to ``completeness`` when given."""
    from .attribution import contrast_filter
    from .concepts import activations_checked, class_attributions

    entry = class_attributions(ctx, cls, method=method, max_images=max_images, seed=seed,
                               cache=cache)
    if completeness is not None:
        completeness.append({k: entry[k] for k in ("delta", "gap") if k in entry})
    acts = activations_checked(ctx, entry, clamp, warnings if warnings is not None else [])
    scores = torch.from_numpy(entry["s_paper" if variant == "paper" else "s_reference"])
    return contrast_filter(acts, scores)


def pair_classifier(ctx: Any, class_a: int, class_b: int, *, method: str = "deeplift",
                    variant: str = "paper", max_images: int = 500, seed: int = 0,
                    solver: str = "sgd", epochs: int = 100, lr: float = 0.01,
                    cache: bool = True, clamp: bool = False,
                    warnings: list[str] | None = None) -> ClassifierInfo:
    """The A-vs-B classifier on both classes' contrast pixels (label 1 = A; ``w`` points to A)."""
    kw: dict[str, Any] = dict(method=method, variant=variant, max_images=max_images, seed=seed,
                              cache=cache, clamp=clamp, warnings=warnings)
    xa = class_contrast_pixels(ctx, class_a, **kw)
    xb = class_contrast_pixels(ctx, class_b, **kw)
    torch.manual_seed(seed)
    return train_classifier(xa, xb, class_a=class_a, class_b=class_b, solver=solver,
                            epochs=epochs, lr=lr, device=ctx.lm.device)


def contrast_params(ctx: Any, class_a: int, class_b: int, *, n_concepts: int = 4,
                    method: str = "deeplift", variant: str = "paper", max_images: int = 500,
                    seed: int = 0, m: int = 8, solver: str = "sklearn",
                    classifier_solver: str = "sgd", epochs: int = 100, lr: float = 0.01,
                    clamp: bool = False) -> dict[str, Any]:
    """The cache key parameters of :func:`contrast_classes` (class indices already resolved)."""
    return {**ctx.base_params(), "class_a": int(class_a), "class_b": int(class_b),
            "n": int(n_concepts), "method": method, "variant": variant,
            "max_images": int(max_images), "seed": int(seed), "m": int(m), "solver": solver,
            "classifier_solver": classifier_solver, "epochs": int(epochs), "lr": float(lr),
            "clamp": bool(clamp)}


def contrast_classes(ws_or_ctx: Any, class_a: int | str, class_b: int | str, *,
                     n_concepts: int = 4, method: str = "deeplift", variant: str = "paper",
                     max_images: int = 500, seed: int = 0, m: int = 8, solver: str = "sklearn",
                     classifier_solver: str = "sgd", epochs: int = 100, lr: float = 0.01,
                     compare_solvers: bool = True, device: str | torch.device = "auto",
                     progress: ProgressFn | None = None, cache: bool = True,
                     clamp: bool = False, layer: str | None = None) -> Explanation:
    """Explain what separates class A from class B (method.md §4), at ``layer`` (one of the
    catalog's layers; default: the context's, else the catalog's default layer).

    Both classes' contrast pixels train ``z = w . x + b`` (label 1 = A, so ``w`` points to A;
    ``classifier_solver`` ``sgd`` = the paper's 100 epochs of plain full-batch SGD at lr 0.01,
    ``lbfgs`` = faster; an ``sgd`` classifier stored by ``python -m explainer precompute`` is
    used instead of training one, and ``params["classifier_precomputed"]`` says when it was
    trained). Every pixel of A's images is then scaled ``x' = max(z, 0) * x`` and
    NMF, crops, heatmaps and the prediction test run as in :func:`explain_class`.
    With ``compare_solvers`` the other solver is trained too and reported side by side in
    ``params["classifier_comparison"]``. Returns an Explanation with ``classifier`` set."""
    from explorer_core import cache as _cache

    from .concepts import (
        _check_params,
        activations_checked,
        class_attributions,
        completeness_of,
        explanation_from_activations,
        get_context,
        resolve_class,
    )

    ctx = get_context(ws_or_ctx, device, layer)
    _check_params(n_concepts, method, variant, solver, max_images, m)
    if classifier_solver not in CLASSIFIER_SOLVERS:
        raise ExplorerError(f"Unknown classifier solver '{classifier_solver}'; use one of "
                            f"{', '.join(CLASSIFIER_SOLVERS)}")
    a, b = resolve_class(ctx.lm, class_a), resolve_class(ctx.lm, class_b)
    if a == b:
        raise ExplorerError(f"Class A and class B are the same ({a}, "
                            f"'{ctx.lm.class_names[a]}'); pick two different classes")
    params = contrast_params(ctx, a, b, n_concepts=n_concepts, method=method, variant=variant,
                             max_images=max_images, seed=seed, m=m, solver=solver,
                             classifier_solver=classifier_solver, epochs=epochs, lr=lr,
                             clamp=clamp)
    key_params = dict(params)  # the result's params gain "classifier_comparison" below
    if cache:
        hit = _cache.fetch(ctx.ws.cache_dir, "contrast", key_params, read_explanation)
        if hit is not None:
            return hit
    from .concepts import class_images

    class_images(ctx, a, max_images, seed, role="A: ")  # clear errors before any work
    class_images(ctx, b, max_images, seed, role="B: ")
    warnings: list[str] = []
    timings: dict[str, float] = {}
    t = time.perf_counter()
    kw: dict[str, Any] = dict(method=method, variant=variant, max_images=max_images, seed=seed,
                              cache=cache, clamp=clamp, warnings=warnings)
    report(progress, "attribution", 0, 2, "classes")
    parts: list[dict[str, np.ndarray]] = []
    xa = class_contrast_pixels(ctx, a, completeness=parts, **kw)
    xb = class_contrast_pixels(ctx, b, completeness=parts, **kw)
    timings["attribution"] = time.perf_counter() - t
    completeness = completeness_of(parts, ctx.layer, method, warnings)
    pre = (precomputed_classifier(ctx, a, b, method=method, variant=variant,
                                  max_images=max_images, seed=seed, epochs=epochs, lr=lr,
                                  clamp=clamp)
           if cache and classifier_solver == "sgd" else None)
    if pre is not None:  # stored by ``python -m explainer precompute``: no training
        clf, params["classifier_precomputed"] = pre
    else:
        clf = train_classifier(xa, xb, class_a=a, class_b=b, solver=classifier_solver,
                               epochs=epochs, lr=lr, device=ctx.lm.device)
    timings["classifier"] = clf.seconds
    if compare_solvers:
        comp = {classifier_solver: clf}
        for other in CLASSIFIER_SOLVERS:
            if other != classifier_solver:
                comp[other] = train_classifier(xa, xb, class_a=a, class_b=b, solver=other,
                                               epochs=epochs, lr=lr, device=ctx.lm.device)
        params["classifier_comparison"] = {
            k: {"accuracy": v.accuracy, "loss": v.loss, "seconds": v.seconds}
            for k, v in comp.items()}
    entry = class_attributions(ctx, a, method=method, max_images=max_images, seed=seed,
                               cache=cache)
    acts = activations_checked(ctx, entry, clamp, warnings)
    X = contrast_scale(acts, clf.weight, clf.bias)
    expl = explanation_from_activations(
        ctx, X, entry["image_ids"].tolist(), class_a=a, class_b=b, n=n_concepts, m=m,
        solver=solver, seed=seed, params=params, warnings=warnings, timings=timings,
        progress=progress)
    expl.classifier = clf
    expl.completeness_error = completeness
    if cache:
        _cache.store(ctx.ws.cache_dir, "contrast", key_params, lambda d: save_explanation(expl, d))
    return expl


# --------------------------------------------------------------------------------------------
# all pairs of one class in one training (method.md §4: "batched training of all pairs of one
# class"; and from the authors' bug list: (i, j) and (j, i) need not both be trained, the second
# is the first with its sign flipped)

PAIRS_KIND = "pairs"  # cache kind of a class's stored pair classifiers
_PAIRS_ARRAYS = "pairs.npz"
_PAIRS_JSON = "pairs.json"


@dataclass
class PairClassifiers:
    """The classifiers A vs B_j of one class A against J classes B_j, as
    :func:`train_pair_classifiers` trains them together. Label 1 = A, so row ``j`` of ``weight``
    points towards A; ``B_j`` vs A is the same classifier negated (:func:`flip_classifier`).

    Attributes
    ----------
    class_a : int
    classes_b : ndarray (J,) int64
    weight : ndarray (J, C) float32
        Row ``j``: the normal ``w`` of A vs ``classes_b[j]``.
    bias : ndarray (J,) float32
    accuracy, loss : ndarray (J,) float64
        Training accuracy and final mean BCE of each classifier (on its training pixels).
    n_pixels_a : int
        A's contrast pixels (shared by all J classifiers).
    n_pixels_b : ndarray (J,) int64
    epochs, lr : the SGD setting (the paper's: 100 epochs, lr 0.01).
    seconds : float
        Wall time of the training(s) that produced the J classifiers, all together.
    created : str
        When they were trained (ISO 8601, UTC).
    """

    class_a: int
    classes_b: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    accuracy: np.ndarray
    loss: np.ndarray
    n_pixels_a: int
    n_pixels_b: np.ndarray
    epochs: int
    lr: float
    seconds: float
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC)
                         .isoformat(timespec="seconds"))

    def __len__(self) -> int:
        return len(self.classes_b)

    def __contains__(self, class_b: object) -> bool:
        return isinstance(class_b, (int, np.integer)) and bool(np.any(self.classes_b == class_b))

    def classifier(self, class_b: int) -> ClassifierInfo:
        """The classifier A vs ``class_b`` (label 1 = A); ``seconds`` is its share of the
        batched training's time. Raises ``KeyError`` when ``class_b`` is not among them."""
        hit = np.flatnonzero(self.classes_b == int(class_b))
        if not len(hit):
            raise KeyError(class_b)
        j = int(hit[0])
        return ClassifierInfo(class_a=int(self.class_a), class_b=int(class_b),
                              weight=self.weight[j].copy(), bias=float(self.bias[j]),
                              solver="sgd", epochs=int(self.epochs), lr=float(self.lr),
                              accuracy=float(self.accuracy[j]), n_pixels_a=int(self.n_pixels_a),
                              n_pixels_b=int(self.n_pixels_b[j]),
                              seconds=float(self.seconds) / max(1, len(self)),
                              loss=float(self.loss[j]))

    def merged(self, other: PairClassifiers) -> PairClassifiers:
        """These classifiers and ``other``'s (same class A; ``other`` wins where both have a
        B), ordered by B. ``seconds`` adds up, ``created`` is the later one."""
        if other.class_a != self.class_a or other.weight.shape[1:] != self.weight.shape[1:]:
            raise ValueError("merging pair classifiers of another class or layer")
        keep = ~np.isin(self.classes_b, other.classes_b)
        cat = {k: np.concatenate([getattr(self, k)[keep], getattr(other, k)])
               for k in ("classes_b", "weight", "bias", "accuracy", "loss", "n_pixels_b")}
        order = np.argsort(cat["classes_b"], kind="stable")
        return PairClassifiers(class_a=self.class_a, n_pixels_a=other.n_pixels_a,
                               epochs=other.epochs, lr=other.lr,
                               seconds=self.seconds + other.seconds,
                               created=max(self.created, other.created),
                               **{k: v[order] for k, v in cat.items()})


def flip_classifier(clf: ClassifierInfo) -> ClassifierInfo:
    """B vs A from A vs B: ``w`` and ``b`` negated (both: the authors' scripts negate only
    ``w``), the classes and pixel counts swapped. The BCE of the swapped labels is the same
    function, so SGD from zero on (B, A) gives exactly this up to float rounding; loss and
    accuracy carry over (accuracy differs only for a pixel with ``z == 0`` exactly)."""
    return ClassifierInfo(class_a=clf.class_b, class_b=clf.class_a, weight=-clf.weight,
                          bias=-clf.bias, solver=clf.solver, epochs=clf.epochs, lr=clf.lr,
                          accuracy=clf.accuracy, n_pixels_a=clf.n_pixels_b,
                          n_pixels_b=clf.n_pixels_a, seconds=clf.seconds, loss=clf.loss)


def train_pair_classifiers(x_a: torch.Tensor | np.ndarray,
                           x_bs: Sequence[torch.Tensor | np.ndarray], *, class_a: int,
                           classes_b: Sequence[int], epochs: int = 100, lr: float = 0.01,
                           device: str | torch.device = "cpu") -> PairClassifiers:
    """Train the J classifiers A vs B_j in one training, each exactly as
    :func:`train_classifier` (``solver="sgd"``) trains it alone: ``w_j, b_j`` start at zero,
    ``epochs`` full-batch steps of plain SGD at ``lr`` on its own mean BCE over A's pixels
    (label 1) and B_j's (label 0).

    The J losses are independent (classifier ``j`` sees only A's pixels and B_j's), so a step
    on their sum is J separate steps. Per epoch, with A's pixels ``X_A`` (Na, C) shared by all
    and B_j's pixels ``X_j`` (N_j, C) in classifier ``j``'s loss only::

        Z_A = X_A W^T + b                    (Na, J)   every classifier on A's pixels
        z_j = X_j w_j + b_j                  (N_j,)    classifier j on B_j's pixels
        g_j = (X_A^T (sigmoid(Z_A[:, j]) - 1) + X_j^T sigmoid(z_j)) / (Na + N_j)
        w_j <- w_j - lr g_j,   b_j <- b_j - lr (sum of the same residuals) / (Na + N_j)

    which costs ``O((Na J + sum_j N_j) C)`` per epoch: A's pixels are read once for all J, each
    B_j's twice (two batched products over B's pixels, padded in buckets of similar size).

    Parameters
    ----------
    x_a : (Na, C) A's contrast pixels.
    x_bs : J arrays (N_j, C), B_j's contrast pixels.
    class_a, classes_b : the class ids (``classes_b`` (J,), no repeats, not ``class_a``).
    device : where to train (the arrays are copied there; memory ~1.25x the B pixels).

    Returns
    -------
    PairClassifiers with ``classes_b`` in the given order.
    """
    J = len(x_bs)
    if len(classes_b) != J or J == 0:
        raise ValueError(f"{J} pixel sets for {len(classes_b)} classes B")
    if len(set(int(c) for c in classes_b)) != J or int(class_a) in {int(c) for c in classes_b}:
        raise ExplorerError(f"Classes B {list(classes_b)} repeat a class or contain class A "
                            f"({class_a}); give each other class once")
    xa = _f32(x_a, device)
    sizes = [len(x) for x in x_bs]
    empty = [int(c) for c, n in zip(classes_b, sizes) if n == 0]
    if len(xa) == 0 or empty:
        which = class_a if len(xa) == 0 else empty[0]
        raise ExplorerError(f"Class {which} has no pixels with positive attribution to train the "
                            "contrast classifier; use more images or another attribution method")
    C = xa.shape[1]
    if any(tuple(x.shape[1:]) != (C,) for x in x_bs):
        raise ValueError(f"B pixels must have A's {C} channels")
    buckets = _pad_buckets(x_bs, sizes, device)
    n = len(xa) + torch.as_tensor(sizes, dtype=torch.float32, device=device)  # (J,)
    W = torch.zeros(J, C, device=device)
    b = torch.zeros(J, device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(epochs):
            res_a = torch.sigmoid(torch.addmm(b, xa, W.T)) - 1.0  # (Na, J): dBCE/dz, label 1
            grad_w = res_a.T @ xa  # (J, C)
            grad_b = res_a.sum(0)
            for idx, xp, mask in buckets:  # B_j's pixels, label 0: dBCE/dz = sigmoid(z)
                res_b = torch.sigmoid(torch.bmm(xp, W[idx].unsqueeze(2)).squeeze(2)
                                      + b[idx].unsqueeze(1)) * mask  # (Jb, L)
                grad_w[idx] += torch.bmm(res_b.unsqueeze(1), xp).squeeze(1)
                grad_b[idx] += res_b.sum(1)
            W -= lr * grad_w / n[:, None]
            b -= lr * grad_b / n
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        z_a = torch.addmm(b, xa, W.T)
        loss = bce(z_a, torch.ones_like(z_a), reduction="none").sum(0)
        correct = (z_a > 0).sum(0).to(torch.float32)
        for idx, xp, mask in buckets:
            z_b = torch.bmm(xp, W[idx].unsqueeze(2)).squeeze(2) + b[idx].unsqueeze(1)
            loss[idx] += (bce(z_b, torch.zeros_like(z_b), reduction="none") * mask).sum(1)
            correct[idx] += ((z_b <= 0).to(torch.float32) * mask).sum(1)
        loss /= n
        acc = correct / n
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return PairClassifiers(class_a=int(class_a),
                           classes_b=np.asarray([int(c) for c in classes_b], np.int64),
                           weight=W.cpu().numpy().astype(np.float32),
                           bias=b.cpu().numpy().astype(np.float32),
                           accuracy=acc.cpu().numpy().astype(np.float64),
                           loss=loss.cpu().numpy().astype(np.float64), n_pixels_a=len(xa),
                           n_pixels_b=np.asarray(sizes, np.int64), epochs=int(epochs),
                           lr=float(lr), seconds=time.perf_counter() - t0)


def _f32(x: torch.Tensor | np.ndarray, device: str | torch.device) -> torch.Tensor:
    """``x`` as a float32 tensor on ``device`` (no copy when it is one already)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32)
    return torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)


def _pad_buckets(x_bs: Sequence[torch.Tensor | np.ndarray], sizes: Sequence[int],
                 device: str | torch.device, slack: float = 1.25
                 ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """B's pixel sets grouped by size into zero-padded batches, so each epoch reads every B
    pixel twice with two batched matrix products (no per-row gather).

    Returns ``(idx (Jb,) long, pixels (Jb, L, C) float32, mask (Jb, L) float32)`` per bucket:
    classes sorted by size, largest first; a bucket grows while its padded size ``Jb x L``
    stays within ``slack`` times its pixels (so padding costs at most 25 %)."""
    order = sorted(range(len(sizes)), key=lambda j: -sizes[j])
    groups: list[list[int]] = []
    for j in order:
        g = groups[-1] if groups else None
        if g is not None and (len(g) + 1) * sizes[g[0]] <= slack * (
                sum(sizes[i] for i in g) + sizes[j]):
            g.append(j)
        else:
            groups.append([j])
    out = []
    for g in groups:
        L = sizes[g[0]]
        C = int(x_bs[g[0]].shape[1])
        xp = torch.zeros(len(g), L, C, dtype=torch.float32, device=device)
        mask = torch.zeros(len(g), L, dtype=torch.float32, device=device)
        for k, j in enumerate(g):
            xp[k, :sizes[j]] = _f32(x_bs[j], device)
            mask[k, :sizes[j]] = 1.0
        out.append((torch.as_tensor(g, dtype=torch.long, device=device), xp, mask))
    return out


def pair_params(ctx: Any, class_a: int, *, method: str = "deeplift", variant: str = "paper",
                max_images: int = 500, seed: int = 0, epochs: int = 100, lr: float = 0.01,
                clamp: bool = False) -> dict[str, Any]:
    """The cache key parameters of class A's stored pair classifiers (every parameter that
    changes them; which classes B they cover is part of the entry, not of its key)."""
    return {**ctx.base_params(), "class_a": int(class_a), "method": method, "variant": variant,
            "max_images": int(max_images), "seed": int(seed), "classifier_solver": "sgd",
            "epochs": int(epochs), "lr": float(lr), "clamp": bool(clamp)}


def _write_pairs(pc: PairClassifiers, folder: Path) -> None:
    write_npz(folder / _PAIRS_ARRAYS, {
        "classes_b": np.asarray(pc.classes_b, np.int64),
        "weight": np.asarray(pc.weight, np.float32), "bias": np.asarray(pc.bias, np.float32),
        "accuracy": np.asarray(pc.accuracy, np.float64),
        "loss": np.asarray(pc.loss, np.float64),
        "n_pixels_b": np.asarray(pc.n_pixels_b, np.int64)})
    write_json(folder / _PAIRS_JSON, {"class_a": int(pc.class_a), "n_pixels_a": int(pc.n_pixels_a),
                                      "epochs": int(pc.epochs), "lr": float(pc.lr),
                                      "seconds": float(pc.seconds), "created": pc.created})


def _read_pairs(folder: Path) -> PairClassifiers:
    """A stored entry, checked (anything of the wrong shape or type raises: a miss)."""
    meta = read_json(folder / _PAIRS_JSON, max_bytes=1 << 20)
    arr = read_npz(folder / _PAIRS_ARRAYS)
    J = len(arr["classes_b"])
    if (arr["classes_b"].ndim != 1 or arr["classes_b"].dtype.kind != "i"
            or arr["weight"].ndim != 2 or len(arr["weight"]) != J
            or arr["weight"].dtype != np.float32
            or any(arr[k].shape != (J,) for k in ("bias", "accuracy", "loss", "n_pixels_b"))):
        raise ValueError("pair classifiers of the wrong shape")
    return PairClassifiers(class_a=int(meta["class_a"]), classes_b=arr["classes_b"],
                           weight=arr["weight"], bias=arr["bias"], accuracy=arr["accuracy"],
                           loss=arr["loss"], n_pixels_a=int(meta["n_pixels_a"]),
                           n_pixels_b=arr["n_pixels_b"], epochs=int(meta["epochs"]),
                           lr=float(meta["lr"]), seconds=float(meta["seconds"]),
                           created=str(meta["created"]))


def store_pair_classifiers(ctx: Any, pc: PairClassifiers, **params: Any) -> Path | None:
    """Store class A's pair classifiers in the workspace cache (kind ``pairs``, key
    :func:`pair_params` of ``pc.class_a`` and ``params``), replacing an earlier entry of that
    key (merge first with :meth:`PairClassifiers.merged` to keep its classes B)."""
    from explorer_core import cache as _cache

    return _cache.store(ctx.ws.cache_dir, PAIRS_KIND, pair_params(ctx, pc.class_a, **params),
                        lambda d: _write_pairs(pc, d))


def fetch_pair_classifiers(ctx: Any, class_a: int, **params: Any) -> PairClassifiers | None:
    """Class A's stored pair classifiers for ``params`` (see :func:`pair_params`), or None."""
    from explorer_core import cache as _cache

    return _cache.fetch(ctx.ws.cache_dir, PAIRS_KIND, pair_params(ctx, class_a, **params),
                        _read_pairs)


def precomputed_classifier(ctx: Any, class_a: int, class_b: int, **params: Any
                           ) -> tuple[ClassifierInfo, str] | None:
    """The stored A-vs-B classifier and when it was trained, or None. Only the pair's lower
    class stores it (``python -m explainer precompute`` trains i < j); the other direction is
    the same classifier with its sign flipped (:func:`flip_classifier`)."""
    lo, hi = sorted((int(class_a), int(class_b)))
    pc = fetch_pair_classifiers(ctx, lo, **params)
    if pc is None or hi not in pc:
        return None
    clf = pc.classifier(hi)
    return (clf if lo == int(class_a) else flip_classifier(clf)), pc.created
