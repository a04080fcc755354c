"""Evaluations over many classes, shared by the command line, the tests and the benchmarks.

* :func:`evaluate_prediction_test` - method.md §3 over classes: allowed, excluded and a
  random-crops baseline (n random crops, same exclusion, same stitching). Higher is better.
* :func:`evaluate_shift_test` - method.md §5 over seeded random (A, B) pairs. A high
  ``max_prob_a`` and a low ``default_prob_a`` is the expected (good) outcome.

Attribution is batched across classes (each image towards its own predicted class) and cached
per class, so the per-class work left is NMF, search and one small forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from explorer_core.errors import ExplorerError
from explorer_core.progress import Meter, ProgressFn

from .concepts import (
    ExplainContext,
    attribute_classes,
    class_images,
    explain_class,
    get_context,
    resolve_class,
)
from .contrast import pair_classifier
from .faithfulness import SHIFT_OFFSETS, prediction_tests, shift_test, stitch

__all__ = ["EvaluationResult", "eligible_classes", "evaluate_prediction_test",
           "evaluate_shift_test"]



@dataclass
class EvaluationResult:
    """Per-row numbers (one dict per class or pair) and a summary; ``higher_is_better`` names
    the summary keys where higher is better."""

    kind: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    params: dict[str, Any]
    higher_is_better: tuple[str, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)


def eligible_classes(ctx: ExplainContext, min_images: int = 3) -> list[int]:
    """Classes with at least ``min_images`` images predicted as them, ascending."""
    return sorted(c for c, k in ctx.catalog.predicted_counts().items() if k >= min_images)


def _select_classes(ctx: ExplainContext, classes: Sequence[int | str] | None, min_images: int,
                    every: int | None, limit: int | None, seed: int) -> list[int]:
    if classes:
        out = [resolve_class(ctx.lm, c) for c in classes]
        counts = ctx.catalog.predicted_counts()
        empty = [c for c in out if counts.get(c, 0) == 0]
        if empty:
            raise ExplorerError(f"No images predicted as class(es) {empty}; drop them from "
                                "--classes")
        return out
    out = eligible_classes(ctx, min_images)
    if every:
        out = out[::int(every)]
    if limit and limit < len(out):
        rng = np.random.default_rng(seed)
        out = sorted(int(c) for c in rng.choice(out, size=limit, replace=False))
    if not out:
        raise ExplorerError(f"No class has at least {min_images} predicted images in workspace "
                            f"'{ctx.ws.name}'; lower --min-images or add images")
    return out


def evaluate_prediction_test(ws_or_ctx: Any, classes: Sequence[int | str] | None = None, *,
                             min_images: int = 3, every: int | None = None,
                             limit: int | None = None, n_concepts: int = 4,
                             method: str = "grad_x_act", variant: str = "paper",
                             max_images: int = 500, seed: int = 0, solver: str = "sklearn",
                             device: str = "auto", cache: bool = True,
                             progress: ProgressFn | None = None,
                             layer: str | None = None) -> EvaluationResult:
    """Stitched prediction test over classes (all with ``>= min_images`` predicted images, every
    ``every``-th of them, a seeded ``limit`` of them, or the given ``classes``).

    Rows: ``class, name, n_images, prob_allowed, hit_allowed, prob_excluded, hit_excluded,
    prob_random, hit_random``. Summary: mean probability and hit rate of each condition.
    ``layer``: one of the catalog's layers (default: the context's, else the default one)."""
    ctx = get_context(ws_or_ctx, device, layer)
    chosen = _select_classes(ctx, classes, min_images, every, limit, seed)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    attribute_classes(ctx, chosen, method=method, max_images=max_images, seed=seed, cache=cache,
                      progress=progress)
    timings["attribution"] = time.perf_counter() - t
    t = time.perf_counter()
    rows, rnd_stitched, rnd_ids = [], [], []
    meter = Meter(progress, "explain and test", len(chosen), "classes")
    for i, cls in enumerate(chosen):
        expl = explain_class(ctx, cls, n_concepts=n_concepts, method=method, variant=variant,
                             max_images=max_images, seed=seed, solver=solver, cache=cache)
        pa, pe = expl.prediction_test, expl.prediction_test_excluded
        ids = ctx.catalog.random_crop_ids(n_concepts, seed=seed + cls, exclude_class=cls)
        rnd_ids.append(ids)
        rnd_stitched.append(stitch(ctx.catalog.crop_pixels(ids, ctx.lm)))
        rows.append({"class": cls, "name": ctx.lm.class_names[cls],
                     "n_images": len(expl.image_ids),
                     "prob_allowed": pa.prob_target if pa else float("nan"),
                     "hit_allowed": int(bool(pa and pa.passed)),
                     "prob_excluded": pe.prob_target if pe else float("nan"),
                     "hit_excluded": int(bool(pe and pe.passed))})
        meter.update(i + 1)
    rnd = prediction_tests(ctx.lm, rnd_stitched, chosen, rnd_ids, True)
    for row, r in zip(rows, rnd):
        row["prob_random"], row["hit_random"] = r.prob_target, int(r.passed)
    timings["explain_and_test"] = time.perf_counter() - t
    summary: dict[str, Any] = {"n_classes": len(rows)}
    for cond in ("allowed", "excluded", "random"):
        summary[f"mean_prob_{cond}"] = float(np.nanmean([r[f"prob_{cond}"] for r in rows]))
        summary[f"hit_rate_{cond}"] = float(np.mean([r[f"hit_{cond}"] for r in rows]))
    params = {**ctx.base_params(), "n": n_concepts, "method": method, "variant": variant,
              "max_images": max_images, "seed": seed, "solver": solver,
              "min_images": min_images, "every": every, "limit": limit}
    return EvaluationResult("prediction-test", rows, summary, params,
                            tuple(k for k in summary if k != "n_classes"), timings)


def random_pairs(classes: Sequence[int], n_pairs: int, seed: int) -> list[tuple[int, int]]:
    """``n_pairs`` distinct ordered pairs (A, B), A != B, drawn with ``seed``."""
    classes = list(classes)
    if len(classes) < 2:
        raise ExplorerError("The shift test needs at least two classes with enough predicted "
                            "images; lower --min-images or add images")
    rng = np.random.default_rng(seed)
    pairs: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    limit = len(classes) * (len(classes) - 1)
    while len(pairs) < min(n_pairs, limit):
        a, b = (int(c) for c in rng.choice(classes, size=2, replace=False))
        if (a, b) not in seen:
            seen.add((a, b))
            pairs.append((a, b))
    return pairs


def evaluate_shift_test(ws_or_ctx: Any, pairs: int | Sequence[tuple[int, int]] = 30, *,
                        seed: int = 0, min_images: int = 3, method: str = "grad_x_act",
                        variant: str = "paper", max_images: int = 500,
                        classifier_solver: str = "sgd",
                        offsets: Sequence[float] = SHIFT_OFFSETS, device: str = "auto",
                        cache: bool = True, progress: ProgressFn | None = None,
                        layer: str | None = None) -> EvaluationResult:
    """Shift test over seeded random (A, B) pairs of classes with ``>= min_images`` predicted
    images (or the given pairs). Rows: ``class_a, class_b, n_images, accuracy, default_prob_a,
    max_prob_a, best_offset``; summary: mean default and max-shifted probability of A and the
    mean per-offset curve. ``layer`` as in :func:`evaluate_prediction_test`."""
    ctx = get_context(ws_or_ctx, device, layer)
    if isinstance(pairs, int):
        pair_list = random_pairs(eligible_classes(ctx, min_images), pairs, seed)
    else:
        pair_list = [(resolve_class(ctx.lm, a), resolve_class(ctx.lm, b)) for a, b in pairs]
    involved = sorted({c for p in pair_list for c in p})
    t = time.perf_counter()
    attribute_classes(ctx, involved, method=method, max_images=max_images, seed=seed,
                      cache=cache, progress=progress)
    timings = {"attribution": time.perf_counter() - t}
    t = time.perf_counter()
    rows, curves = [], []
    meter = Meter(progress, "shift test", len(pair_list), "pairs")
    for i, (a, b) in enumerate(pair_list):
        clf = pair_classifier(ctx, a, b, method=method, variant=variant, max_images=max_images,
                              seed=seed, solver=classifier_solver, cache=cache)
        ids_b = class_images(ctx, b, max_images, seed)
        res = shift_test(ctx.lm, ctx.layer, ctx.catalog.image_pixels(ids_b, ctx.lm),
                         clf.weight, a, b, offsets, image_ids=ids_b)
        curves.append(res.mean_prob_a)
        rows.append({"class_a": a, "class_b": b, "name_a": ctx.lm.class_names[a],
                     "name_b": ctx.lm.class_names[b], "n_images": res.n_images,
                     "accuracy": clf.accuracy, "default_prob_a": res.default_prob_a,
                     "max_prob_a": res.max_prob_a, "best_offset": res.best_offset})
        meter.update(i + 1)
    timings["shift"] = time.perf_counter() - t
    curve = np.mean(np.asarray(curves), axis=0)
    summary = {"n_pairs": len(rows),
               "mean_default_prob_a": float(np.mean([r["default_prob_a"] for r in rows])),
               "mean_max_prob_a": float(np.mean([r["max_prob_a"] for r in rows])),
               "mean_accuracy": float(np.mean([r["accuracy"] for r in rows])),
               "offsets": [float(o) for o in offsets],
               "mean_prob_a_per_offset": [float(v) for v in curve]}
    params = {**ctx.base_params(), "pairs": len(pair_list), "seed": seed,
              "min_images": min_images, "method": method, "variant": variant,
              "max_images": max_images, "classifier_solver": classifier_solver}
    return EvaluationResult("shift-test", rows, summary, params, ("mean_max_prob_a",), timings)
