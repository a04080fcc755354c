"""Explain one class (method.md §1-3): images predicted as A -> attribution -> filter-and-scale ->
NMF -> concept vectors, crops, heatmaps and the stitched prediction test.

Entry point: :func:`explain_class`. :class:`ExplainContext` bundles a workspace with its model,
catalog and crop search (opened once and reused). Per-class attributed activations are cached
on disk separately from explanations (their key has no ``n``), so a new ``n`` or variant reuses
them; :func:`attribute_classes` fills that cache for many classes in shared batches. Both go
through :mod:`explorer_core.cache` (one key rule: kind + parameters + the catalog's identity +
schema and code version; data files only, never pickle).
"""

from __future__ import annotations

import difflib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from explorer_core import cache as _cache
from explorer_core.errors import ExplorerError
from explorer_core.files import read_npz
from explorer_core.models import LoadedModel
from explorer_core.progress import Meter, Progress, ProgressFn, report
from explorer_core.results import Concept, Explanation, read_explanation, save_explanation

from .attribution import (
    attribute_checked,
    check_method,
    check_nonnegative,
    check_variant,
    completeness_error,
    completeness_warning,
    pixel_rows,
    pixel_scores,
    scale_by_scores,
)
from .faithfulness import prediction_tests, stitch
from .nmf import SOLVERS, concept_order, nmf

__all__ = ["ExplainContext", "explain_class", "resolve_class", "class_images",
           "class_attributions", "attribute_classes", "explanation_from_activations",
           "explanation_from_concepts", "explain_params", "MAX_CONCEPTS"]

MAX_CONCEPTS = 10


# --------------------------------------------------------------------------------------------
# context


@dataclass
class ExplainContext:
    """A workspace with its model, catalog and crop search at one of the catalog's layers,
    opened once.

    ``layer`` is the layer explanations are computed at (one of ``catalog.layers``; default the
    catalog's default layer); the crop search runs over that layer's embeddings."""

    ws: Any  # data_index.workspace.Workspace
    lm: LoadedModel
    catalog: Any  # data_index.catalog.Catalog
    layer: str = ""
    _search: Any = field(default=None, repr=False)
    stamp: int = field(default=-1, repr=False)  # catalog file mtime when opened

    def __post_init__(self) -> None:
        self.layer = self.catalog.check_layer(self.layer or None)

    @classmethod
    def open(cls, ws: Any, device: str | torch.device = "auto", lm: LoadedModel | None = None,
             layer: str | None = None) -> ExplainContext:
        from data_index.catalog import Catalog
        from data_index.workspace import Workspace
        from explorer_core.models import shared_model

        if not isinstance(ws, Workspace):
            ws = Workspace.open(ws)
        catalog = Catalog.open(ws)
        try:
            layer = catalog.check_layer(layer)  # unknown: an error listing the layers
            if lm is None:
                lm = shared_model(ws.model, device)
            elif lm.spec != ws.model:
                raise ExplorerError(f"Model {lm.spec} does not match workspace model {ws.model}")
        except BaseException:
            catalog.close()
            raise
        return cls(ws, lm, catalog, layer)

    def at_layer(self, layer: str | None) -> ExplainContext:
        """This context at another of the catalog's layers (same model and catalog)."""
        name = self.catalog.check_layer(layer)
        if name == self.layer:
            return self
        return ExplainContext(self.ws, self.lm, self.catalog, name, stamp=self.stamp)

    @property
    def search(self) -> Any:
        if self._search is None:
            from data_index.search import CropSearch

            self._search = CropSearch(self.catalog, layer=self.layer,
                                      device=str(getattr(self.lm, "device", "cpu")))
        return self._search

    @property
    def identity(self) -> str:
        """What identifies the catalog's content: its image-list fingerprint, embedding mode and
        the id of the build that completed it (new on every build, so a rebuilt catalog never
        shares cache keys with the old one). Catalogs built before build ids existed fall back
        to the completion time and the catalog file's modification time."""
        meta = getattr(self.catalog, "meta", {}) or {}
        build = meta.get("build_id")
        if not build:
            build = f"{meta.get('built_at', '')}@{_catalog_stamp(self.ws)}"
        return "|".join((str(meta.get("fingerprint", "")), str(meta.get("mode", "")), build))

    def base_params(self) -> dict[str, Any]:
        """Parameters every cached result of this context is keyed on (the layer included)."""
        params = {"model": self.lm.spec, "layer": self.layer, "catalog": self.identity}
        index = self.catalog.index_id(self.layer)
        if index != "exact":  # an approximate index may return other crops: its own keys
            params["search_index"] = index
        return params


_CONTEXTS: dict[tuple[str, str, str], ExplainContext] = {}


def get_context(ws_or_ctx: Any, device: str | torch.device = "auto",
                layer: str | None = None) -> ExplainContext:
    """An :class:`ExplainContext` from a context, a Workspace, or a workspace name/path, at
    ``layer`` (``None``: a given context's own layer, else the catalog's default layer; a layer
    the catalog lacks raises :class:`ExplorerError` listing its layers). Opened contexts are
    reused within the process."""
    if isinstance(ws_or_ctx, ExplainContext):
        return ws_or_ctx if layer is None else ws_or_ctx.at_layer(layer)
    root = str(getattr(ws_or_ctx, "root", ws_or_ctx))
    key = (os.path.abspath(root) if os.sep in root else root, str(device), layer or "")
    ctx = _CONTEXTS.get(key)
    if ctx is None or ctx.stamp != _catalog_stamp(ctx.ws):
        # first use, or the catalog was rebuilt since: reopen (keeping the loaded model)
        lm = ctx.lm if ctx is not None else None
        if lm is None:
            lm = next((c.lm for k, c in _CONTEXTS.items() if k[:2] == key[:2]), None)
        ctx = ExplainContext.open(ws_or_ctx, device, lm=lm, layer=layer)
        ctx.stamp = _catalog_stamp(ctx.ws)
        _CONTEXTS[key] = ctx
    return ctx


def _catalog_stamp(ws: Any) -> int:
    try:
        return os.stat(ws.catalog_path).st_mtime_ns
    except OSError:
        return -1


# --------------------------------------------------------------------------------------------
# validation


def resolve_class(lm: LoadedModel, value: int | str) -> int:
    """A class index from an index or a name (case-insensitive). Unknown names raise
    :class:`ExplorerError` listing close matches."""
    k = lm.num_classes
    if isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.strip().isdigit()):
        idx = int(value)
        if not 0 <= idx < k:
            raise ExplorerError(f"Class index {idx} is out of range; {lm.spec} has classes 0..{k - 1}")
        return idx
    if not isinstance(value, str) or not value.strip():
        raise ExplorerError("No class given; pass a class name or index")
    name = value.strip().lower()
    lower = [c.lower() for c in lm.class_names]
    if name in lower:
        return lower.index(name)
    close = difflib.get_close_matches(name, lower, n=5, cutoff=0.6)
    close += [c for c in lower if name in c and c not in close][:5]
    hint = ("; did you mean: " + ", ".join(f"'{lm.class_names[lower.index(c)]}' "
                                             f"({lower.index(c)})" for c in close[:6])
            if close else f"; give a class index 0..{k - 1} or an exact name")
    raise ExplorerError(f"Unknown class '{value}' for model {lm.spec}{hint}")


def _check_params(n: int, method: str, variant: str, solver: str, max_images: int, m: int) -> None:
    check_method(method)
    check_variant(variant)
    if solver not in SOLVERS:
        raise ExplorerError(f"Unknown NMF solver '{solver}'; use one of {', '.join(SOLVERS)}")
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_CONCEPTS:
        raise ExplorerError(f"Number of concepts n={n} is outside 1..{MAX_CONCEPTS}; the paper "
                            "uses 4")
    if max_images < 1:
        raise ExplorerError(f"max_images={max_images}: use at least 1 (paper: 500)")
    if m < 1:
        raise ExplorerError(f"m={m} crops per concept: use at least 1 (paper: 8)")


def class_images(ctx: ExplainContext, cls: int, max_images: int, seed: int, *,
                 role: str = "") -> list[int]:
    """Catalog ids of images predicted as ``cls``; a seeded choice of at most ``max_images``,
    returned sorted."""
    ids = ctx.catalog.images_predicted_as(cls)
    if not ids:
        name = ctx.lm.class_names[cls]
        raise ExplorerError(
            f"No image of workspace '{ctx.ws.name}' is predicted as {role}class {cls} "
            f"('{name}'); add images of it to the dataset, or contrast it against a class "
            "that has some")
    if len(ids) > max_images:
        rng = np.random.default_rng(seed)
        ids = sorted(int(i) for i in rng.choice(np.asarray(ids), size=max_images, replace=False))
    return [int(i) for i in ids]


# --------------------------------------------------------------------------------------------
# attributed activations (cached per class, key without n)


def _attr_params(ctx: ExplainContext, cls: int, method: str, max_images: int, seed: int
                 ) -> dict[str, Any]:
    return {**ctx.base_params(), "class": int(cls), "method": method,
            "max_images": int(max_images), "seed": int(seed)}


def attribute_classes(ctx: ExplainContext, classes: Sequence[int], *, method: str = "deeplift",
                      max_images: int = 500, seed: int = 0, batch_size: int = 32,
                      cache: bool = True, progress: ProgressFn | None = None
                      ) -> dict[int, dict[str, np.ndarray]]:
    """Attributed activations of many classes in shared batches (each image attributed towards
    its own predicted class), cached per class. Returns ``{class: {"image_ids", "acts"
    (N, C, h, w), "s_paper" (N, h, w), "s_reference" (N, h, w)}}``; for the DeepLift methods also
    ``"delta"`` (N,) and ``"gap"`` (N,), DeepLift's completeness per image (see
    :func:`~explainer.attribution.deeplift_completeness`; for ``deeplift_smoothgrad`` that of
    plain DeepLift on the same images)."""
    check_method(method)
    out: dict[int, dict[str, np.ndarray]] = {}
    todo: list[tuple[int, list[int]]] = []
    for cls in classes:
        got = (_cache.fetch(ctx.ws.cache_dir, "attr",
                            _attr_params(ctx, cls, method, max_images, seed), _read_attr)
               if cache else None)
        if got is not None:
            out[int(cls)] = got
        else:
            todo.append((int(cls), class_images(ctx, cls, max_images, seed)))
    if todo:
        ids = [i for _, im in todo for i in im]
        targets = [c for c, im in todo for _ in im]
        acts_all, s_p, s_r, deltas, gaps = [], [], [], [], []
        chunk = 256  # decode + attribute in chunks to bound memory
        meter = Meter(progress, "attribution", len(ids), "images")
        meter.update(0, force=True)
        for start in range(0, len(ids), chunk):
            pix = ctx.catalog.image_pixels(ids[start:start + chunk], ctx.lm)

            def prog(p: Progress, start: int = start) -> None:
                meter.update(start + int(p.done))

            acts, attr, delta, gap = attribute_checked(
                ctx.lm, pix, ctx.layer, targets[start:start + chunk], method,
                batch_size=batch_size, progress=prog)
            if delta is not None and gap is not None:
                deltas.append(delta.numpy())
                gaps.append(gap.numpy())
            acts_all.append(acts.numpy())
            s_p.append(pixel_scores(attr, "paper").numpy())
            s_r.append(pixel_scores(attr, "reference").numpy())
            del attr
        acts_np, sp, sr = (np.concatenate(a) for a in (acts_all, s_p, s_r))
        pos = 0
        for cls, im in todo:
            sl = slice(pos, pos + len(im))
            pos += len(im)
            entry = {"image_ids": np.asarray(im, np.int64), "acts": acts_np[sl].copy(),
                     "s_paper": sp[sl].copy(), "s_reference": sr[sl].copy()}
            if deltas:
                entry["delta"] = np.concatenate(deltas)[sl].copy()
                entry["gap"] = np.concatenate(gaps)[sl].copy()
            if cache:
                _cache.store_arrays(ctx.ws.cache_dir, "attr",
                                    _attr_params(ctx, cls, method, max_images, seed), entry)
            out[cls] = entry
    return out


def _read_attr(folder: Path) -> dict[str, np.ndarray]:
    """A cached attribution entry, checked: ``image_ids`` (N,) int, ``acts`` (N, C, h, w)
    float32, ``s_paper`` / ``s_reference`` (N, h, w) float32 (anything else raises: a miss)."""
    got = read_npz(folder / _cache.ARRAYS_FILE)
    ids, acts = got["image_ids"], got["acts"]
    N = len(ids)
    if ids.ndim != 1 or ids.dtype.kind != "i" or acts.ndim != 4 or len(acts) != N or N == 0:
        raise ValueError("attribution entry of the wrong shape")
    for k in ("acts", "s_paper", "s_reference"):
        if got[k].dtype != np.float32:
            raise ValueError(f"{k} is {got[k].dtype}")
    for k in ("s_paper", "s_reference"):
        if got[k].shape != (N, *acts.shape[2:]):
            raise ValueError(f"{k} has shape {got[k].shape}")
    return {k: got[k] for k in ("image_ids", "acts", "s_paper", "s_reference")}


def class_attributions(ctx: ExplainContext, cls: int, *, method: str = "deeplift",
                       max_images: int = 500, seed: int = 0, cache: bool = True,
                       progress: ProgressFn | None = None) -> dict[str, np.ndarray]:
    """One class's attributed activations (see :func:`attribute_classes`)."""
    return attribute_classes(ctx, [cls], method=method, max_images=max_images, seed=seed,
                             cache=cache, progress=progress)[int(cls)]


def completeness_of(entries: Sequence[dict[str, np.ndarray]], layer: str, method: str,
                    warnings: list[str]) -> float | None:
    """DeepLift's relative completeness error over the images of ``entries`` (cached entries of
    :func:`attribute_classes`; ``None`` for ``grad_x_act``); a warning suggesting
    ``grad_x_act`` is added to ``warnings`` when it is above tolerance."""
    if not entries or any("delta" not in e for e in entries):
        return None
    err = completeness_error(np.concatenate([e["delta"] for e in entries]),
                             np.concatenate([e["gap"] for e in entries]))
    warn = completeness_warning(err, layer, method)
    if warn and warn not in warnings:
        warnings.append(warn)
    return err


def activations_checked(ctx: ExplainContext, entry: dict[str, np.ndarray], clamp: bool,
                        warnings: list[str]) -> torch.Tensor:
    acts, warn = check_nonnegative(torch.from_numpy(entry["acts"]), ctx.layer, clamp)
    if warn and warn not in warnings:
        warnings.append(warn)
    return acts


# --------------------------------------------------------------------------------------------
# NMF -> concepts -> crops -> heatmaps -> prediction test


def explanation_from_activations(ctx: ExplainContext, X: torch.Tensor, image_ids: Sequence[int],
                                 *, class_a: int, class_b: int | None, n: int, m: int,
                                 solver: str, seed: int, params: dict[str, Any],
                                 warnings: list[str], timings: dict[str, float],
                                 progress: ProgressFn | None = None) -> Explanation:
    """Steps shared by explain and contrast: NMF of the pixel rows of ``X`` (N, C, h, w),
    concepts in share order, top-m crops (allowed / excluding A), heatmaps (N, n, h, w) and the
    stitched prediction test for A (allowed and excluded)."""
    N, C, h, w = X.shape
    V, keep = pixel_rows(X)
    if len(V) < n:
        raise ExplorerError(
            f"Only {len(V)} pixel(s) of class {class_a} have a positive score, fewer than n={n} "
            "concepts; use fewer concepts, more images or another attribution method")
    t = time.perf_counter()
    report(progress, "nmf", 0, 1, message=f"{len(V)} pixels x {C} channels, n={n}")
    dev = ctx.lm.device if solver == "torch" else None
    W, H, err = nmf(V, n, solver=solver, seed=seed, device=dev)
    order, shares = concept_order(W, H)
    W, H = W[:, order], H[order]
    timings["nmf"] = time.perf_counter() - t
    full = np.zeros((N * h * w, n), np.float32)
    full[keep.numpy()] = W
    heatmaps = full.reshape(N, h, w, n).transpose(0, 3, 1, 2).copy()
    return explanation_from_concepts(
        ctx, H, shares, image_ids, class_a=class_a, class_b=class_b, m=m, heatmaps=heatmaps,
        reconstruction_error=err, params=params, warnings=warnings, timings=timings,
        progress=progress)


def explanation_from_concepts(ctx: ExplainContext, H: np.ndarray, importance: np.ndarray,
                              image_ids: Sequence[int], *, class_a: int, class_b: int | None,
                              m: int, heatmaps: np.ndarray, reconstruction_error: float,
                              params: dict[str, Any], warnings: list[str],
                              timings: dict[str, float], progress: ProgressFn | None = None
                              ) -> Explanation:
    """The tail shared by every concept extractor (ours, contrast, the CRAFT and random
    baselines): concept vectors ``H`` (n, C) in the given order with their ``importance`` (n,)
    -> top-m crops (allowed / excluding A) and the stitched prediction test for A (allowed and
    excluded). ``heatmaps`` (N, n, h, w) and ``reconstruction_error`` are stored as given."""
    n = len(H)
    t = time.perf_counter()
    report(progress, "crops", 0, 1, message="nearest crops of each concept")
    allowed = ctx.search.search(H, m=m)
    excluded = ctx.search.search(H, m=m, exclude_class=class_a)
    concepts = [Concept(index=k, vector=H[k].astype(np.float32), importance=float(importance[k]),
                        crops=allowed[k], crops_excluded=excluded[k]) for k in range(n)]
    timings["crops"] = time.perf_counter() - t

    t = time.perf_counter()
    tops = [[c.crops[0].crop_id for c in concepts if c.crops],
            [c.crops_excluded[0].crop_id for c in concepts if c.crops_excluded]]
    stitched, test_ids, flags = [], [], []
    for excl, ids in ((False, tops[0]), (True, tops[1])):
        if ids:
            stitched.append(stitch(ctx.catalog.crop_pixels(ids, ctx.lm)))
            test_ids.append(ids)
            flags.append(excl)
    tests = prediction_tests(ctx.lm, stitched, [class_a] * len(stitched), test_ids, flags)
    by_flag = dict(zip(flags, tests))
    pt_allowed, pt_excluded = by_flag.get(False), by_flag.get(True)
    timings["prediction_test"] = time.perf_counter() - t
    report(progress, "done", 1, 1)
    return Explanation(model=ctx.lm.spec, layer=ctx.layer, class_a=int(class_a),
                       class_b=None if class_b is None else int(class_b), params=params,
                       image_ids=[int(i) for i in image_ids], concepts=concepts,
                       heatmaps=heatmaps, reconstruction_error=float(reconstruction_error),
                       prediction_test=pt_allowed, prediction_test_excluded=pt_excluded,
                       timings=timings, warnings=warnings)


def explain_params(ctx: ExplainContext, class_a: int, *, n_concepts: int = 4,
                   method: str = "deeplift", variant: str = "paper", max_images: int = 500,
                   seed: int = 0, m: int = 8, solver: str = "sklearn", clamp: bool = False
                   ) -> dict[str, Any]:
    """The cache key parameters of :func:`explain_class` (class index already resolved)."""
    return {**ctx.base_params(), "class_a": int(class_a), "n": int(n_concepts),
            "method": method, "variant": variant, "max_images": int(max_images),
            "seed": int(seed), "m": int(m), "solver": solver, "clamp": bool(clamp)}


def explain_class(ws_or_ctx: Any, class_a: int | str, *, n_concepts: int = 4,
                  method: str = "deeplift", variant: str = "paper", max_images: int = 500,
                  seed: int = 0, m: int = 8, solver: str = "sklearn",
                  device: str | torch.device = "auto", progress: ProgressFn | None = None,
                  cache: bool = True, clamp: bool = False,
                  layer: str | None = None) -> Explanation:
    """Explain class A with ``n_concepts`` concepts (method.md §1-3).

    Parameters
    ----------
    ws_or_ctx : ExplainContext | Workspace | str
        The workspace (its model, layer and catalog).
    layer : one of the catalog's layers (default: the context's, else the catalog's default).
    class_a : int | str
        Class index or name (case-insensitive).
    method : ``deeplift`` (white baseline) | ``grad_x_act`` | ``deeplift_smoothgrad``
    variant : ``paper`` (``s`` = channel mean of the attribution) | ``reference``
        (channel mean of ``relu(attribution)``, the authors' scripts).
    max_images : at most this many images predicted as A (seeded choice).
    m : crops per concept. solver : NMF solver, ``sklearn`` or ``torch``.
    clamp : clamp negative layer activations to zero (with a warning) instead of refusing.
    cache : read/write the on-disk cache under ``ws.cache_dir``.

    Returns
    -------
    Explanation with ``concepts`` in share order, ``heatmaps`` (N, n, h, w) and the prediction
    tests (allowed / excluded target-class crops).
    """
    ctx = get_context(ws_or_ctx, device, layer)
    _check_params(n_concepts, method, variant, solver, max_images, m)
    a = resolve_class(ctx.lm, class_a)
    params = explain_params(ctx, a, n_concepts=n_concepts, method=method, variant=variant,
                            max_images=max_images, seed=seed, m=m, solver=solver, clamp=clamp)
    if cache:
        hit = _cache.fetch(ctx.ws.cache_dir, "explain", params, read_explanation)
        if hit is not None:
            return hit
    timings: dict[str, float] = {}
    warnings: list[str] = []
    t = time.perf_counter()
    entry = class_attributions(ctx, a, method=method, max_images=max_images, seed=seed,
                               cache=cache, progress=progress)
    timings["attribution"] = time.perf_counter() - t
    completeness = completeness_of([entry], ctx.layer, method, warnings)
    acts = activations_checked(ctx, entry, clamp, warnings)
    scores = torch.from_numpy(entry["s_paper" if variant == "paper" else "s_reference"])
    X = scale_by_scores(acts, scores)
    expl = explanation_from_activations(
        ctx, X, entry["image_ids"].tolist(), class_a=a, class_b=None, n=n_concepts, m=m,
        solver=solver, seed=seed, params=params, warnings=warnings, timings=timings,
        progress=progress)
    expl.completeness_error = completeness
    if cache:
        _cache.store(ctx.ws.cache_dir, "explain", params, lambda d: save_explanation(expl, d))
    return expl
