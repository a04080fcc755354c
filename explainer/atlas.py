"""A concept's atlas (issue 12, item 2): more of its crops, where they come from, where else in
the catalog it occurs, and a 2-D map of a class's crops coloured by concept.

Everything here works on one layer's crop embeddings in the catalog (the explanation's layer):

* :func:`crops_page` -- page ``p`` of the concept's nearest crops (``page_size`` 8 / 32 / 100),
  the ranks ``p * page_size ..`` of the same crop search the explanation's top crops come from
  (:class:`~data_index.search.CropSearch`, with the same "exclude target class" filter).
* :func:`breakdown` -- counts of the crops shown by the crop's own predicted class, its source
  image's predicted class and the image's true label (``unknown`` where the dataset has none).
* :func:`where_else` -- every crop of the catalog scored by cosine to the concept vector, streamed
  block by block from the memory-mapped store (memory: one block plus one float per image); each
  image scored by its best crop; images aggregated per predicted class: images, *hits* (images
  whose best crop reaches ``threshold``: by default :data:`HIT_FACTOR` times the best-crop
  cosine of the ``m``-th best image outside the explained class), share of hits and mean image
  score; and the best images outside the class. On the demo world the lupo concept whose
  crops are grass (target class excluded) has hits in all 9 classes that have grass images, 93 %
  of the hit images outside lupo really show grass, and every grass image outside lupo is a hit
  (tests/test_atlas.py).
* :func:`class_map` -- the class's crops (its explanation's images; at most ``max_points``, a
  seeded sample beyond) projected on the first two principal components (numpy SVD of the
  centred unit rows) and coloured by their *dominant concept* (the concept vector of highest
  cosine), with that cosine.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from explorer_core.errors import ExplorerError
from explorer_core.results import CropRef

__all__ = ["PAGE_SIZES", "HIT_FACTOR", "crops_page", "Breakdown", "breakdown", "ClassOccurrence", "WhereElse",
           "where_else", "ClassMap", "class_map"]

PAGE_SIZES = (8, 32, 100)
MAX_RANK = 2000
"""Deepest rank a page may reach (page * page_size + page_size)."""
BLOCK_BYTES = 32 << 20
"""Float32 bytes of one block of stored rows scored at a time by :func:`where_else`."""
HIT_FACTOR = 0.8
"""Default hit threshold of :func:`where_else`: this times the best-crop cosine of the
``m``-th best image outside the explained class (0.8: precision 0.93, recall 1.0 of grass
images for the demo's grass concept; 0.9: precision 1.0, recall 0.37)."""
TOP_IMAGES = 24


def _name(names: Sequence[str] | None, c: int | None) -> str:
    if c is None or c < 0:
        return "unknown"
    return names[c] if names and c < len(names) else f"class {c}"


# --------------------------------------------------------------------------------------------
# show more


def crops_page(search: Any, vector: np.ndarray, page: int, page_size: int = 8,
               exclude_class: int | None = None) -> list[CropRef]:
    """Page ``page`` (0-based) of the crops nearest to ``vector``: ranks ``page * page_size``
    to ``(page + 1) * page_size - 1`` of one exact search (``search``: a
    :class:`~data_index.search.CropSearch`), best first; fewer (or none) past the last crop.
    ``exclude_class`` drops the class's crops as the explanation's excluded view does."""
    if page_size not in PAGE_SIZES:
        raise ExplorerError(f"Crops per page must be one of {', '.join(map(str, PAGE_SIZES))}")
    if page < 0:
        raise ExplorerError("The page number must be 0 or more")
    stop = (int(page) + 1) * int(page_size)
    if stop > MAX_RANK:
        raise ExplorerError(f"Only the {MAX_RANK} nearest crops can be paged through; pick a "
                            "larger page size or an earlier page")
    refs = search.search(np.asarray(vector, np.float32), m=stop, exclude_class=exclude_class)[0]
    return refs[int(page) * int(page_size):stop]


# --------------------------------------------------------------------------------------------
# breakdown


@dataclass(frozen=True)
class Breakdown:
    """``(name, count)`` lists, largest first; each sums to ``n`` (the crops counted)."""

    n: int
    crop_pred: list[tuple[str, int]]
    image_pred: list[tuple[str, int]]
    label: list[tuple[str, int]]

    def rows(self) -> list[dict[str, Any]]:
        """Long-form rows ``{"of": ..., "class": ..., "crops": ...}`` (a bar chart's data)."""
        out = []
        for what, pairs in (("crop predicted", self.crop_pred),
                            ("source image predicted", self.image_pred),
                            ("true label", self.label)):
            out += [{"of": what, "class": name, "crops": n} for name, n in pairs]
        return out


def breakdown(refs: Sequence[CropRef], class_names: Sequence[str] | None = None) -> Breakdown:
    """Where the crops ``refs`` come from: by crop prediction (``n/a (cell mode)`` where the
    catalog stores none), by source image prediction, by true label (``unknown`` when none)."""
    def count(values: Sequence[str]) -> list[tuple[str, int]]:
        return sorted(Counter(values).items(), key=lambda kv: (-kv[1], kv[0]))

    crop = [_name(class_names, r.crop_pred) if r.crop_pred >= 0 else "n/a (cell mode)"
            for r in refs]
    image = [_name(class_names, r.image_pred) for r in refs]
    label = [_name(class_names, r.label) for r in refs]
    return Breakdown(len(refs), count(crop), count(image), count(label))


# --------------------------------------------------------------------------------------------
# where else


@dataclass(frozen=True)
class ClassOccurrence:
    """One predicted class: ``images`` predicted as it, ``hits`` of them whose best crop
    reaches the threshold, and the mean / max of the images' best-crop cosine."""

    class_idx: int
    name: str
    images: int
    hits: int
    mean_score: float
    max_score: float

    @property
    def share(self) -> float:
        return self.hits / self.images if self.images else 0.0


@dataclass
class WhereElse:
    """:func:`where_else`'s answer: ``classes`` sorted by share of hits, then mean score."""

    threshold: float
    classes: list[ClassOccurrence]
    n_crops: int
    seconds: float
    own_class: int | None = None
    min_share: float = 0.05
    top_images: list[tuple[int, float]] = field(default_factory=list)
    """``(image_id, best-crop cosine)`` of the best images outside ``own_class``, best first."""

    @property
    def occurs_in(self) -> list[ClassOccurrence]:
        """Classes where at least ``min_share`` of the images have a hit."""
        return [c for c in self.classes if c.share >= self.min_share]


def where_else(catalog: Any, vector: np.ndarray, *, layer: str | None = None,
               threshold: float | None = None, own_class: int | None = None, m: int = 8,
               min_share: float = 0.05, class_names: Sequence[str] | None = None,
               block_rows: int | None = None) -> WhereElse:
    """Which predicted classes' images score highest on the concept ``vector``, over the whole
    catalog at ``layer``.

    Each crop's cosine to ``vector`` is computed block by block from the layer's store (memory:
    one block of ``block_rows`` rows, default :data:`BLOCK_BYTES` as float32, and one float per
    image); an image's score is its best crop's. ``threshold``
    (default: :data:`HIT_FACTOR` times the score of the ``m``-th best image not predicted as
    ``own_class``, or of the ``m``-th best image overall when no class is given) decides a
    *hit*. ``top_images`` lists the :data:`TOP_IMAGES` best images outside ``own_class``.
    Images are grouped by their predicted class (``images.pred``; for a segmentation catalog
    the dominant class)."""
    t0 = time.perf_counter()
    store = catalog.store(layer)
    q = np.asarray(vector, np.float32).ravel()
    if q.shape[0] != store.dim:
        raise ExplorerError(f"The concept vector has {q.shape[0]} dimensions, the layer "
                            f"'{catalog.check_layer(layer)}' {store.dim}")
    qn = float(np.linalg.norm(q))
    if qn <= 0:
        raise ExplorerError("The concept vector is zero; it occurs nowhere")
    q = q / qn
    per_image = int(catalog.grid.per_image)
    img_ids, preds = catalog.image_preds()
    if not len(img_ids):
        raise ExplorerError("The catalog has no images")
    best = np.full(int(img_ids.max()) + 1, -np.inf, np.float32)
    norms_all = store.norms
    rows = int(block_rows) if block_rows else max(256, BLOCK_BYTES // (4 * max(1, store.dim)))
    qt = torch.from_numpy(q)
    # float16 rows widened into one reused float32 buffer by torch (several times faster than
    # numpy's conversion), as the exact crop search does
    buf = torch.empty((rows, store.dim), dtype=torch.float32) if store.dtype != "float32" \
        else None
    for pos, raw in store.raw_blocks(rows=rows):
        n = len(raw)
        ids = np.asarray(store.ids[pos:pos + n], np.int64)
        norms = np.asarray(norms_all[pos:pos + n], np.float32)
        with warnings.catch_warnings():  # a read-only memory map: torch only reads it here
            warnings.simplefilter("ignore", UserWarning)
            block = torch.from_numpy(raw)
        if buf is not None:
            block = buf[:n].copy_(block)
        s = torch.mv(block, qt).numpy()
        np.divide(s, norms, out=s, where=norms > 0)
        s[norms <= 0] = 0.0
        img = ids // per_image
        # rows are in crop-id order, so an image's crops are one run: reduce each run, then
        # merge (an image split across two blocks, or any order, is still right)
        starts = np.flatnonzero(np.r_[True, img[1:] != img[:-1]])
        np.maximum.at(best, img[starts], np.maximum.reduceat(s.astype(np.float32), starts))
    scores = best[img_ids]
    outside = np.isfinite(scores) if own_class is None else \
        np.isfinite(scores) & (preds != int(own_class))
    if not outside.any():
        outside = np.isfinite(scores)
    if threshold is None:
        pool = np.sort(scores[outside])
        k = min(int(m), len(pool))
        threshold = HIT_FACTOR * float(pool[-k]) if k else 0.0
    order = np.flatnonzero(outside)[np.argsort(-scores[outside], kind="stable")[:TOP_IMAGES]]
    top = [(int(img_ids[i]), float(scores[i])) for i in order]
    out = []
    for c in np.unique(preds):
        sc = scores[preds == c]
        sc = sc[np.isfinite(sc)]
        if not len(sc):
            continue
        out.append(ClassOccurrence(int(c), _name(class_names, int(c)), len(sc),
                                   int((sc >= threshold).sum()), float(sc.mean()),
                                   float(sc.max())))
    out.sort(key=lambda o: (-o.share, -o.mean_score, o.class_idx))
    return WhereElse(float(threshold), out, len(store), time.perf_counter() - t0, own_class,
                     float(min_share), top)


# --------------------------------------------------------------------------------------------
# 2-D map


@dataclass
class ClassMap:
    """``xy`` (n, 2): PCA coordinates of the crops ``crop_ids``; ``concept`` (n,) their dominant
    concept (0-based), ``score`` (n,) its cosine; ``variance`` the share of variance of the two
    components; ``sampled`` whether the crops are a sample of more."""

    crop_ids: np.ndarray
    xy: np.ndarray
    concept: np.ndarray
    score: np.ndarray
    variance: tuple[float, float]
    total: int
    sampled: bool = False
    image_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def class_map(catalog: Any, image_ids: Sequence[int], concept_vectors: np.ndarray, *,
              layer: str | None = None, max_points: int = 3000, seed: int = 0) -> ClassMap:
    """The crops of ``image_ids`` (a class's images) in 2-D, coloured by concept (see the
    module docstring). At most ``max_points`` crops (a seeded sample beyond)."""
    if max_points < 3:
        raise ExplorerError("A map needs at least 3 points")
    store = catalog.store(layer)
    V = np.asarray(concept_vectors, np.float32)
    if V.ndim != 2 or V.shape[1] != store.dim:
        raise ExplorerError(f"Concept vectors of shape {V.shape} do not match the layer's "
                            f"{store.dim} dimensions")
    per = int(catalog.grid.per_image)
    imgs = np.asarray(sorted({int(i) for i in image_ids}), np.int64)
    ids = (imgs[:, None] * per + np.arange(per)[None, :]).ravel()
    total = len(ids)
    if total < 3:
        raise ExplorerError("The class has too few crops for a map (3 or more needed)")
    sampled = total > max_points
    if sampled:
        rng = np.random.default_rng(seed)
        ids = np.sort(rng.choice(ids, size=int(max_points), replace=False))
    X = _unit(store.vectors(ids).astype(np.float64))
    sims = X @ _unit(V.astype(np.float64)).T
    concept = sims.argmax(axis=1)
    score = sims[np.arange(len(ids)), concept]
    Xc = X - X.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)
    xy = Xc @ vt[:2].T
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    var = s ** 2
    tot = float(var.sum()) or 1.0
    v2 = (float(var[0] / tot) if len(var) > 0 else 0.0, float(var[1] / tot) if len(var) > 1
          else 0.0)
    return ClassMap(ids, xy.astype(np.float32), concept.astype(np.int64),
                    score.astype(np.float32), v2, total, sampled, ids // per)
