"""Baselines for the concept extraction, shown and tested exactly like ours (method.md §9).

* :func:`craft_concepts` - CRAFT (Fel et al., CVPR 2023) over the same catalog: the images
  predicted as A are cut into CRAFT's own patches, each patch is resized back to the model input
  and encoded up to the layer, the spatial mean of the activations is one row of the matrix
  ``A`` (patches, C), and NMF ``A ≈ U W`` gives the concept bank ``W`` (n, C).
* :func:`random_concepts` - ``n`` random crops (target class excluded) as concepts.

Both return :class:`explorer_core.results.Explanation` through the same tail as ours
(:func:`explainer.concepts.explanation_from_concepts`: nearest crops through ``ctx.search``,
target crops excluded or allowed, the stitched prediction test), so a comparison isolates the
concept extraction.

Where :func:`craft_concepts` differs from the authors' ``craft/craft_torch.py``:

* **Importance.** CRAFT orders concepts by Sobol total indices (Halton masks over ``U``, 32
  designs, Jansen estimator, of the class logit through the rest of the network). The stitched
  prediction test needs no importance except for the order in which the top crops are stacked;
  here concepts are ordered by their share of the NMF reconstruction
  (:func:`explainer.nmf.concept_order`), exactly as ours. No Sobol indices are computed.
* **Patch geometry.** The reference has a fixed ``patch_size`` (64) for 224 px inputs; here
  the default scales with the model input: ``round(64 * S / 224)`` (27 px at the demo's 96 px),
  stride ``int(0.8 * patch)`` as in the reference. With either, a 224 or 96 px image gives
  4 x 4 = 16 patches and the last ``S - 3 * stride - patch`` rows/columns (7 px at 224, 6 px at
  96) are in no patch (``unfold`` drops them, as in the reference).
* **Images.** The seeded choice of at most ``max_images`` images predicted as A
  (:func:`explainer.concepts.class_images`, the same images as ours), not a user-given set.
* **NMF.** scikit-learn with its defaults (as the reference) but ``random_state=seed``
  (the reference leaves it unset; ``nndsvda`` uses a randomised SVD).
* **Visualisation.** CRAFT shows the patches with the highest ``U``; here, to isolate the
  concept extraction, each concept vector is shown by its nearest crops of the catalog's crop
  bank (3 x 3 grid crops, fed at native size), with the same search and exclusion as ours. So
  the crops in the stitched test are catalog crops, not CRAFT patches. CRAFT's concept vectors
  come from patches upscaled to the model input (about 3.5x), the crop embeddings from crops
  at native size: the search compares activations of inputs of different scale, which costs
  CRAFT much of its score in the stitched test. ``resize_patches=False`` (not CRAFT, recorded
  as ``params["patch_input"] == "native"``) feeds the patches at native size to measure that.
* **Heatmaps.** CRAFT has no pixel heatmaps. ``Explanation.heatmaps`` (N, n, h, w) holds the
  per-patch coefficients ``U`` mapped to the layer's (h, w) grid at the model input: each cell
  gets the mean ``U`` of the patches whose box contains the cell's centre (0 where none does).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from explorer_core import cache as _cache
from explorer_core.errors import ExplorerError
from explorer_core.progress import Meter, ProgressFn, report
from explorer_core.results import Explanation

from .attribution import check_nonnegative
from .concepts import (
    MAX_CONCEPTS,
    ExplainContext,
    class_images,
    explanation_from_concepts,
    get_context,
    resolve_class,
)
from .nmf import SOLVERS, concept_order, nmf

__all__ = [
    "CRAFT_PATCH_AT_224",
    "CRAFT_STRIDE_FRACTION",
    "craft_patch_size",
    "craft_stride",
    "patch_boxes",
    "extract_patches",
    "craft_activations",
    "craft_concepts",
    "random_concepts",
]

CRAFT_PATCH_AT_224 = 64
"""The reference implementation's default ``patch_size`` at 224 px inputs."""
CRAFT_STRIDE_FRACTION = 0.8
"""The reference implementation's stride: ``int(0.8 * patch_size)``."""
_IMAGE_CHUNK = 32  # images decoded at a time


# --------------------------------------------------------------------------------------------
# patch geometry (the reference: torch unfold, kernel = patch, stride = int(0.8 * patch))


def craft_patch_size(input_size: int) -> int:
    """CRAFT's patch side for a model input of ``input_size`` px: 64 at 224, scaled
    (``round(64 * S / 224)``, at least 1)."""
    return max(1, round(CRAFT_PATCH_AT_224 * int(input_size) / 224))


def craft_stride(patch_size: int) -> int:
    """CRAFT's patch stride ``int(0.8 * patch_size)`` (at least 1)."""
    return max(1, int(CRAFT_STRIDE_FRACTION * int(patch_size)))


def _geometry(input_size: int, patch_size: int | None, stride: int | None) -> tuple[int, int]:
    p = craft_patch_size(input_size) if patch_size is None else int(patch_size)
    s = craft_stride(p) if stride is None else int(stride)
    if not 1 <= p <= input_size:
        raise ExplorerError(f"CRAFT patch size {p} does not fit the {input_size} px model input; "
                            f"use 1..{input_size} (default {craft_patch_size(input_size)})")
    if s < 1:
        raise ExplorerError(f"CRAFT stride {s}: use at least 1 (default int(0.8 * patch) = "
                            f"{craft_stride(p)})")
    return p, s


def patch_boxes(input_size: int, patch_size: int, stride: int) -> np.ndarray:
    """Boxes ``(x0, y0, x1, y1)`` of the patches of one ``input_size`` square image, in
    ``unfold`` order (row by row, left to right).

    Returns
    -------
    (P, 4) int64, ``P = (floor((S - p) / s) + 1) ** 2``.
    """
    k = (int(input_size) - int(patch_size)) // int(stride) + 1
    starts = np.arange(k, dtype=np.int64) * int(stride)
    ys, xs = np.meshgrid(starts, starts, indexing="ij")
    x0, y0 = xs.ravel(), ys.ravel()
    return np.stack([x0, y0, x0 + patch_size, y0 + patch_size], axis=1)


def extract_patches(pixels: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """CRAFT's patches of images ``(B, 3, S, S)``: ``unfold`` with kernel ``patch_size`` and
    ``stride``, as in the reference.

    Returns
    -------
    (B * P, 3, patch_size, patch_size), image-major, each image's patches in
    :func:`patch_boxes` order.
    """
    cols = F.unfold(pixels, kernel_size=patch_size, stride=stride)  # (B, 3*p*p, P)
    return cols.transpose(1, 2).reshape(-1, pixels.shape[1], patch_size, patch_size)


# --------------------------------------------------------------------------------------------
# patch activations (cached per class; the key has no n)


def _acts_params(ctx: ExplainContext, cls: int, max_images: int, seed: int, patch_size: int,
                 stride: int, resize_patches: bool) -> dict[str, Any]:
    return {**ctx.base_params(), "class": int(cls), "max_images": int(max_images),
            "seed": int(seed), "patch_size": int(patch_size), "stride": int(stride),
            "resize_patches": bool(resize_patches)}


def craft_activations(ctx: ExplainContext, cls: int, *, max_images: int = 500, seed: int = 0,
                      patch_size: int | None = None, stride: int | None = None,
                      batch_size: int = 64, resize_patches: bool = True, clamp: bool = False,
                      cache: bool = True, progress: ProgressFn | None = None
                      ) -> dict[str, np.ndarray]:
    """CRAFT's patch activations of the images predicted as ``cls``.

    Each image's patches (:func:`extract_patches`) are resized (bilinear, ``align_corners``
    False) back to the model input ``S`` (CRAFT; ``resize_patches=False`` feeds them at their
    native size instead, like the catalog's crops), normalised and fed to the model in batches
    of ``batch_size`` patches; the layer's output (P, C, h, w) is averaged over space. Negative
    activations raise :class:`ExplorerError` unless ``clamp`` (then they are clamped to zero
    before the average).

    Returns
    -------
    dict with ``image_ids`` (N,), ``acts`` (N * P, C) float32 (image-major, patches in
    :func:`patch_boxes` order), ``boxes`` (P, 4), ``grid`` (2,) = the layer's (h, w) at the
    model input, ``neg_share`` () = share of negative activation values (clamped).
    """
    S = ctx.lm.input_size
    p, s = _geometry(S, patch_size, stride)
    params = _acts_params(ctx, cls, max_images, seed, p, s, resize_patches)
    entry = _cache.fetch_arrays(ctx.ws.cache_dir, "craftacts", params) if cache else None
    if entry is None:
        entry = _encode_class(ctx, cls, max_images, seed, p, s, batch_size, resize_patches,
                              clamp, progress)
        if cache:
            _cache.store_arrays(ctx.ws.cache_dir, "craftacts", params, entry)
    share = float(entry["neg_share"])
    if share > 0 and not clamp:
        raise ExplorerError(f"Layer '{ctx.layer}' has negative activations on CRAFT's patches "
                            f"({share:.1%} of values); NMF needs non-negative ones. Pick a "
                            "post-ReLU layer or pass clamp=True (--clamp) to clamp them to zero")
    return entry


def _encode_class(ctx: ExplainContext, cls: int, max_images: int, seed: int, p: int, s: int,
                  batch_size: int, resize_patches: bool, clamp: bool,
                  progress: ProgressFn | None) -> dict[str, np.ndarray]:
    lm, S = ctx.lm, ctx.catalog.grid.image_size  # the catalog's images (default: the input)
    grid = lm.layer_info(ctx.layer).shape[1:]  # (h, w) of a whole input; refuses non-spatial
    ids = class_images(ctx, cls, max_images, seed)
    boxes = patch_boxes(S, p, s)
    P = len(boxes)
    bs = max(1, int(batch_size))
    meter = Meter(progress, "craft patches", len(ids), "images")
    meter.update(0, force=True)
    rows: list[np.ndarray] = []
    neg, total = 0, 0
    for start in range(0, len(ids), _IMAGE_CHUNK):
        pix = ctx.catalog.image_pixels(ids[start:start + _IMAGE_CHUNK], lm)
        patches = extract_patches(pix, p, s)
        del pix
        for b in range(0, len(patches), bs):
            x = patches[b:b + bs].to(lm.device, torch.float32)
            if resize_patches:
                x = F.interpolate(x, size=(lm.input_size, lm.input_size), mode="bilinear",
                                  align_corners=False)
            _, acts = lm.logits_and_activations(x, ctx.layer)
            n_neg = int((acts < 0).sum())
            if n_neg:
                acts, _ = check_nonnegative(acts, ctx.layer, clamp)  # raises unless clamp
                neg += n_neg
            total += acts.numel()
            rows.append(acts.mean(dim=(2, 3)).float().cpu().numpy())
            meter.update(start + (b + len(x)) / P)
        del patches
    return {"image_ids": np.asarray(ids, np.int64), "acts": np.concatenate(rows),
            "boxes": boxes, "grid": np.asarray(grid, np.int64),
            "neg_share": np.asarray(neg / max(total, 1), np.float64)}


def patch_heatmaps(U: np.ndarray, boxes: np.ndarray, input_size: int, grid: tuple[int, int]
                   ) -> np.ndarray:
    """Per-patch coefficients on the layer grid.

    Parameters
    ----------
    U : (N * P, n) patch coefficients, image-major.
    boxes : (P, 4) the patch boxes of one image (:func:`patch_boxes`).
    grid : (h, w) cells over the ``input_size`` square image.

    Returns
    -------
    (N, n, h, w) float32: each cell holds the mean ``U`` of the patches whose box contains the
    cell's centre (0 where no patch does).
    """
    h, w = grid
    P, n = len(boxes), U.shape[1]
    cy = (np.arange(h) + 0.5) * input_size / h
    cx = (np.arange(w) + 0.5) * input_size / w
    inside_y = (boxes[:, 1][None] <= cy[:, None]) & (cy[:, None] < boxes[:, 3][None])  # (h, P)
    inside_x = (boxes[:, 0][None] <= cx[:, None]) & (cx[:, None] < boxes[:, 2][None])  # (w, P)
    cover = (inside_y[:, None, :] & inside_x[None, :, :]).reshape(h * w, P).astype(np.float32)
    cover /= np.maximum(cover.sum(axis=1, keepdims=True), 1.0)
    per_image = U.reshape(-1, P, n).astype(np.float32)
    return np.einsum("cp,ipk->ikc", cover, per_image).reshape(-1, n, h, w)


# --------------------------------------------------------------------------------------------
# the baselines


def _check(n: int, max_images: int, m: int, solver: str) -> None:
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_CONCEPTS:
        raise ExplorerError(f"Number of concepts n={n} is outside 1..{MAX_CONCEPTS}; the paper "
                            "uses 4")
    if max_images < 1:
        raise ExplorerError(f"max_images={max_images}: use at least 1 (CRAFT advises >= 500)")
    if m < 1:
        raise ExplorerError(f"m={m} crops per concept: use at least 1 (paper: 8)")
    if solver not in SOLVERS:
        raise ExplorerError(f"Unknown NMF solver '{solver}'; use one of {', '.join(SOLVERS)}")


def craft_concepts(ws_or_ctx: Any, class_a: int | str, *, n_concepts: int = 4,
                   max_images: int = 500, seed: int = 0, patch_size: int | None = None,
                   stride: int | None = None, m: int = 8, solver: str = "sklearn",
                   batch_size: int = 64, resize_patches: bool = True, clamp: bool = False,
                   cache: bool = True,
                   device: str | torch.device = "auto", progress: ProgressFn | None = None,
                   layer: str | None = None) -> Explanation:
    """The CRAFT baseline for class A (method.md §9), visualised and tested like ours.

    Parameters
    ----------
    ws_or_ctx : ExplainContext | Workspace | str
        The workspace (its model, layer and catalog).
    class_a : int | str
        Class index or name.
    n_concepts : NMF components (1..10).
    max_images : at most this many images predicted as A (the same seeded choice as ours).
    patch_size, stride : CRAFT's patches; default ``round(64 * S / 224)`` and
        ``int(0.8 * patch_size)``.
    m : crops per concept. solver : NMF solver, ``sklearn`` (scikit-learn defaults, as CRAFT)
        or ``torch``.
    batch_size : patches per forward (memory bound: ``batch_size`` inputs of ``S x S``).
    resize_patches : ``True`` (CRAFT): each patch is resized to the model input before the
        forward. ``False`` (not CRAFT; named ``native`` in ``params["patch_input"]``): patches
        are fed at their native size, the way the catalog's crops are embedded in ``crop`` mode,
        so concept vectors and crop embeddings come from inputs of the same scale.
    clamp : clamp negative layer activations to zero (with a warning) instead of refusing.
    cache : read/write the patch activations (key without n) under ``ws.cache_dir``.
    layer : one of the catalog's layers (default: the context's, else the catalog's default).

    Returns
    -------
    Explanation with ``params["method"] == "craft"``, ``concepts`` (vector = NMF basis row,
    importance = share of the reconstruction, largest first), ``heatmaps`` (N, n, h, w) = patch
    coefficients on the layer grid (:func:`patch_heatmaps`) and the prediction tests (allowed /
    excluded target-class crops).
    """
    ctx = get_context(ws_or_ctx, device, layer)
    _check(n_concepts, max_images, m, solver)
    a = resolve_class(ctx.lm, class_a)
    S = ctx.catalog.grid.image_size  # the model input unless the catalog's images are larger
    p, s = _geometry(S, patch_size, stride)
    params = {**ctx.base_params(), "class_a": a, "n": int(n_concepts), "method": "craft",
              "max_images": int(max_images), "seed": int(seed), "m": int(m), "solver": solver,
              "patch_size": p, "stride": s, "patches_per_image": len(patch_boxes(S, p, s)),
              "patch_input": "resized" if resize_patches else "native",
              "batch_size": int(batch_size), "clamp": bool(clamp),
              "importance": "reconstruction share (no Sobol indices)",
              "heatmaps": "patch coefficients U on the layer grid"}
    timings: dict[str, float] = {}
    warnings: list[str] = []
    t = time.perf_counter()
    entry = craft_activations(ctx, a, max_images=max_images, seed=seed, patch_size=p, stride=s,
                              batch_size=batch_size, resize_patches=resize_patches, clamp=clamp,
                              cache=cache, progress=progress)
    timings["patch_activations"] = time.perf_counter() - t
    share = float(entry["neg_share"])
    if share > 0:
        warnings.append(f"Layer '{ctx.layer}' had negative activations on CRAFT's patches "
                        f"({share:.1%} of values); they were clamped to zero")
    A = entry["acts"]
    if len(A) < n_concepts:
        raise ExplorerError(f"Only {len(A)} CRAFT patches for class {a}, fewer than "
                            f"n={n_concepts} concepts; use fewer concepts or more images")
    if not A.any():
        raise ExplorerError(f"Every CRAFT patch activation of class {a} at layer "
                            f"'{ctx.layer}' is zero; pick another layer")
    t = time.perf_counter()
    report(progress, "nmf", 0, 1, message=f"{len(A)} patches x {A.shape[1]} channels, "
                                          f"n={n_concepts}")
    dev = ctx.lm.device if solver == "torch" else None
    U, W, err = nmf(A, n_concepts, solver=solver, seed=seed, device=dev)
    order, shares = concept_order(U, W)
    U, W = U[:, order], W[order]
    timings["nmf"] = time.perf_counter() - t
    grid = (int(entry["grid"][0]), int(entry["grid"][1]))
    heatmaps = patch_heatmaps(U, entry["boxes"], S, grid)
    return explanation_from_concepts(
        ctx, W, shares, entry["image_ids"].tolist(), class_a=a, class_b=None, m=m,
        heatmaps=heatmaps, reconstruction_error=err, params=params, warnings=warnings,
        timings=timings, progress=progress)


def random_concepts(ws_or_ctx: Any, class_a: int | str, n_concepts: int = 4, seed: int = 0, *,
                    m: int = 8, device: str | torch.device = "auto",
                    progress: ProgressFn | None = None, layer: str | None = None
                    ) -> Explanation:
    """The random baseline: ``n_concepts`` random crops as concepts.

    The crops are the draw of :func:`explainer.evaluation.evaluate_prediction_test`'s random
    baseline, ``catalog.random_crop_ids(n, seed=seed + A, exclude_class=A)`` (neither the crop
    nor its source image predicted as A); their embeddings are the concept vectors, shown and
    tested through the same tail as ours. A crop's nearest crop is itself, so both prediction
    tests stitch the drawn crops (allowed equals excluded, barring crops with identical
    embeddings).

    Returns
    -------
    Explanation with ``params["method"] == "random"``, equal importances ``1 / n``, no source
    images and empty heatmaps (0, n, 0, 0).
    """
    ctx = get_context(ws_or_ctx, device, layer)
    _check(n_concepts, 1, m, "sklearn")
    a = resolve_class(ctx.lm, class_a)
    ids = ctx.catalog.random_crop_ids(n_concepts, seed=seed + a, exclude_class=a)
    if len(ids) < n_concepts:
        raise ExplorerError(f"Only {len(ids)} crops of workspace '{ctx.ws.name}' are not of "
                            f"class {a}; fewer than n={n_concepts} random concepts")
    vectors = ctx.catalog.store(ctx.layer).vectors(ids)  # (n, C) float32, gathered rows
    params = {**ctx.base_params(), "class_a": a, "n": int(n_concepts), "method": "random",
              "seed": int(seed), "m": int(m), "random_crop_ids": [int(i) for i in ids],
              "draw": "catalog.random_crop_ids(n, seed=seed + class_a, exclude_class=class_a)"}
    return explanation_from_concepts(
        ctx, vectors, np.full(n_concepts, 1.0 / n_concepts), [], class_a=a, class_b=None, m=m,
        heatmaps=np.zeros((0, n_concepts, 0, 0), np.float32), reconstruction_error=math.nan,
        params=params, warnings=[], timings={}, progress=progress)
