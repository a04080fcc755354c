"""Class contrasting (method.md §4): the A-vs-B linear classifier and the contrast scaling.

Orientation, everywhere: label **1 = class A**, 0 = class B, so ``z = w . x + b > 0`` means "A"
and ``w`` points towards A. (The authors' scripts negate ``w`` but not ``b``; not here.)
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from explorer_core.errors import ExplorerError
from explorer_core.progress import ProgressFn, report
from explorer_core.results import ClassifierInfo, Explanation, read_explanation, save_explanation

__all__ = ["CLASSIFIER_SOLVERS", "train_classifier", "contrast_scale", "class_contrast_pixels",
           "pair_classifier", "contrast_classes"]

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
    ``lbfgs`` = faster). Every pixel of A's images is then scaled ``x' = max(z, 0) * x`` and
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
    params = {**ctx.base_params(), "class_a": a, "class_b": b, "n": int(n_concepts),
              "method": method, "variant": variant, "max_images": int(max_images),
              "seed": int(seed), "m": int(m), "solver": solver,
              "classifier_solver": classifier_solver, "epochs": int(epochs), "lr": float(lr),
              "clamp": bool(clamp)}
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
