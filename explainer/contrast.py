"""Class contrasting (method.md §4): the A-vs-B linear classifier and the contrast scaling.

Orientation, everywhere: label **1 = class A**, 0 = class B, so ``z = w . x + b > 0`` means "A"
and ``w`` points towards A. (The authors' scripts negate ``w`` but not ``b``; not here.)
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .errors import ExplorerError
from .results import ClassifierInfo

__all__ = ["CLASSIFIER_SOLVERS", "train_classifier", "contrast_scale"]

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
            opt = torch.optim.SGD([w, b], lr=lr)
            for _ in range(epochs):
                opt.zero_grad()
                loss = bce(X @ w + b, y)
                loss.backward()
                opt.step()
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
        loss = float(bce(z, y))
        acc = float(((z > 0).float() == y).float().mean())
    if device != "cpu" and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return ClassifierInfo(class_a=int(class_a), class_b=int(class_b),
                          weight=w.detach().cpu().numpy().astype(np.float32), bias=float(b.detach()),
                          solver=solver, epochs=epochs, lr=lr if solver == "sgd" else 1.0,
                          accuracy=acc, n_pixels_a=len(xa), n_pixels_b=len(xb),
                          seconds=time.perf_counter() - t0, loss=loss)


def contrast_scale(activations: torch.Tensor, weight: np.ndarray | torch.Tensor, bias: float
                   ) -> torch.Tensor:
    """``x' = max(w . x + b, 0) * x`` at every pixel; ``activations`` (B, C, h, w)."""
    w = torch.as_tensor(np.asarray(weight), dtype=activations.dtype, device=activations.device)
    z = torch.einsum("bchw,c->bhw", activations, w) + float(bias)
    return activations * z.clamp_min(0).unsqueeze(1)
