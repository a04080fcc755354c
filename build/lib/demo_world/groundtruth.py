"""Ground-truth checks of explanations of the demo world (Streamlit-free).

The demo world labels every pixel with the concept covering it (``world.mask_path_for``), so a
concept found by the method can be checked: which ground-truth concept dominates each of its top
crops, how pure the crops are, whether every defining part of a class is found, and whether the
planted ``lupo``-on-grass shortcut shows up. The same measures applied to *random* crops give
the baseline that makes the numbers mean something.

Geometry: the demo images are exactly the model input size (96x96), so the catalog's
resize + center crop is the identity and a crop box ``(x0, y0, x1, y1)`` in model-input
coordinates indexes the mask 1:1. :func:`crop_concept` checks that (image and mask size equal
the input size) instead of assuming it.

Vocabulary: for a set of crops, the *majority* concept is the ground-truth concept that dominates
most of them; the *purity* (share) is the fraction of the crops it dominates.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from . import world

__all__ = [
    "ConceptTruth",
    "PatchMargin",
    "load_mask",
    "crop_concept",
    "crop_concepts",
    "concept_truth",
    "explanation_truth",
    "explanation_purity",
    "class_coverage",
    "concept_crop_counts",
    "coverable_parts",
    "find_concept",
    "grid_boxes",
    "random_boxes",
    "boxes_truth",
    "patch_margin",
    "gallery_paths",
    "random_prediction_tests",
    "ShortcutCheck",
    "shortcut_check",
    "random_direction",
]


# --------------------------------------------------------------------------------------------
# masks and crops


@lru_cache(maxsize=4096)
def _mask_and_size(image_path: str) -> tuple[np.ndarray, tuple[int, int]]:
    mpath = world.mask_path_for(image_path)
    if not Path(mpath).is_file():
        raise FileNotFoundError(f"no ground-truth mask for {image_path} (expected {mpath}); "
                                "is this an image of the demo world?")
    mask = np.asarray(Image.open(mpath))
    with Image.open(image_path) as im:  # header only
        size = im.size
    mask.setflags(write=False)
    return mask, size


def load_mask(image_path: str | Path) -> np.ndarray:
    """The uint8 ``(H, W)`` ground-truth concept-id mask of a demo image (cached, read-only)."""
    return _mask_and_size(str(image_path))[0]


def crop_concept(path: str | Path, box: Sequence[int], input_size: int = world.DEFAULT_SIZE
                 ) -> int:
    """Concept id (index into ``world.CONCEPTS``) dominating the crop ``box`` of image ``path``.

    ``box`` is in model-input coordinates. It maps 1:1 to the mask only when the image already
    has the input size (the catalog's resize + center crop is then the identity): this is
    checked and a ``ValueError`` raised otherwise."""
    mask, (w, h) = _mask_and_size(str(path))
    if mask.shape != (h, w) or (w, h) != (input_size, input_size):
        raise ValueError(f"{path}: image {w}x{h}, mask {mask.shape[1]}x{mask.shape[0]}, model "
                         f"input {input_size}x{input_size}; the crop box maps to the mask 1:1 "
                         "only when all three are equal")
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"crop box {tuple(box)} is not inside the {w}x{h} image {path}")
    return world.dominant_concept(mask, (x0, y0, x1, y1))


def crop_concepts(refs: Sequence[Any], input_size: int = world.DEFAULT_SIZE) -> list[int]:
    """:func:`crop_concept` of each crop (anything with ``.path`` and ``.box``, e.g. CropRef)."""
    return [crop_concept(r.path, r.box, input_size) for r in refs]


# --------------------------------------------------------------------------------------------
# purity and coverage


@dataclass
class ConceptTruth:
    """Ground truth of one set of crops (a concept's top-m crops, or a random set).

    ``concept_ids``: dominant concept of each crop, in crop order; ``majority``: the most frequent
    one (ties: the one whose first crop ranks highest); ``share``: its fraction of the crops."""

    concept_ids: list[int]
    majority: int
    share: float

    @property
    def name(self) -> str:
        return world.CONCEPTS[self.majority]

    def count(self, concept: int | str) -> int:
        cid = world.concept_id(concept) if isinstance(concept, str) else int(concept)
        return sum(1 for c in self.concept_ids if c == cid)


def concept_truth(concept_ids: Sequence[int]) -> ConceptTruth:
    """Majority concept and purity of a list of per-crop concept ids."""
    ids = [int(c) for c in concept_ids]
    if not ids:
        raise ValueError("no crops: the purity of an empty set is undefined")
    counts = Counter(ids)
    best = max(counts.values())
    majority = next(c for c in ids if counts[c] == best)  # tie: the higher-ranked crop wins
    return ConceptTruth(ids, majority, best / len(ids))


def explanation_truth(expl: Any, exclude_target: bool = False, m: int | None = None,
                      input_size: int = world.DEFAULT_SIZE) -> list[ConceptTruth]:
    """:class:`ConceptTruth` of each concept of an Explanation (its top ``m`` crops, default
    all stored; target-class crops allowed unless ``exclude_target``)."""
    out = []
    for con in expl.concepts:
        refs = list(con.top_crops(exclude_target))[:m]
        out.append(concept_truth(crop_concepts(refs, input_size)))
    return out


def explanation_purity(truths: Sequence[ConceptTruth]) -> float:
    """Mean purity over the concepts of one explanation."""
    return float(np.mean([t.share for t in truths]))


def class_coverage(truths: Sequence[ConceptTruth], parts: Sequence[str]) -> dict[str, bool]:
    """For each part name: whether it is the majority concept of at least one concept."""
    found = {t.name for t in truths}
    return {p: p in found for p in parts}


def find_concept(truths: Sequence[ConceptTruth], concept: str) -> int | None:
    """Index of the concept whose crops are most often dominated by ``concept`` among those
    whose majority it is (None when no concept has it as majority)."""
    cid = world.concept_id(concept)
    cands = [(t.share, -i) for i, t in enumerate(truths) if t.majority == cid]
    return -max(cands)[1] if cands else None


def grid_boxes(input_size: int = world.DEFAULT_SIZE) -> list[tuple[int, int, int, int]]:
    """The catalog's 3x3 crop grid boxes ``(x0, y0, x1, y1)``, row-major."""
    c = input_size // 3
    return [(col * c, row * c, (col + 1) * c, (row + 1) * c) for row in range(3)
            for col in range(3)]


def concept_crop_counts(image_paths: Sequence[str | Path], input_size: int = world.DEFAULT_SIZE
                        ) -> dict[str, int]:
    """How many grid crops of these images each concept dominates (concept name -> count)."""
    boxes = grid_boxes(input_size)
    counts: Counter[int] = Counter()
    for p in image_paths:
        for b in boxes:
            counts[crop_concept(p, b, input_size)] += 1
    return {world.CONCEPTS[k]: int(v) for k, v in sorted(counts.items())}


def coverable_parts(class_name: str, crop_counts: dict[str, int], min_crops: int) -> list[str]:
    """The class's defining parts that dominate at least ``min_crops`` crops (the others cannot
    fairly be asked of a crop-based explanation: no crop shows them)."""
    return [p for p in world.CLASS_PARTS[class_name] if crop_counts.get(p, 0) >= min_crops]


# --------------------------------------------------------------------------------------------
# random baseline


@dataclass(frozen=True)
class _Box:
    path: str
    box: tuple[int, int, int, int]


def random_boxes(image_paths: Sequence[str | Path], n: int, seed: int,
                 input_size: int = world.DEFAULT_SIZE) -> list[_Box]:
    """``n`` distinct random grid crops (``.path``, ``.box``) of the given images, seeded."""
    boxes = grid_boxes(input_size)
    pool = [(str(p), b) for p in image_paths for b in boxes]
    if not pool:
        raise ValueError("no images to draw random crops from")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return [_Box(*pool[int(i)]) for i in idx]


def boxes_truth(items: Sequence[Any], input_size: int = world.DEFAULT_SIZE) -> ConceptTruth:
    """:class:`ConceptTruth` of any crops with ``.path`` and ``.box``."""
    return concept_truth(crop_concepts(items, input_size))


# --------------------------------------------------------------------------------------------
# patch insertion


@dataclass
class PatchMargin:
    """Summary of a patch insertion result (``explorer_core.results.PatchTestResult``).

    ``delta_a``: mean change of P(A) with the patch; ``control_delta_a``: with the control fill;
    ``margin = delta_a - control_delta_a`` (what the patch's *content* adds beyond covering the
    area); ``share_up``: share of images where P(A) ends higher with the patch than with the
    control."""

    delta_a: float
    control_delta_a: float
    margin: float
    share_up: float
    n_images: int


def patch_margin(res: Any) -> PatchMargin:
    """:class:`PatchMargin` of a PatchTestResult."""
    up = np.asarray(res.prob_a_after) - np.asarray(res.prob_a_control)
    return PatchMargin(delta_a=res.mean_delta_a, control_delta_a=res.mean_control_delta_a,
                       margin=res.mean_delta_a - res.mean_control_delta_a,
                       share_up=float(np.mean(up > 0)) if up.size else 0.0,
                       n_images=len(res.image_ids))


# --------------------------------------------------------------------------------------------
# whole checks over an explain context (ExplainContext: .lm, .catalog, .layer)


def gallery_paths(catalog: Any, image_ids: Sequence[int] | None = None) -> list[str]:
    """Absolute image paths of catalog images (all, or the given ids), id order."""
    ids = catalog.image_ids() if image_ids is None else image_ids
    return [str(catalog.image_path(int(i))) for i in ids]


def random_prediction_tests(lm: Any, catalog: Any, target: int, n_crops: int, n_trials: int,
                            seed: int = 0) -> list[Any]:
    """Baseline of the stitched prediction test: ``n_trials`` stitches of ``n_crops`` random
    catalog crops (target class allowed), each tested for ``target``."""
    from explainer.faithfulness import prediction_test

    out = []
    for t in range(n_trials):
        ids = catalog.random_crop_ids(n_crops, seed=seed * 100_003 + 1_000 * int(target) + t)
        out.append(prediction_test(lm, catalog, ids, int(target), exclude_target=False))
    return out


@dataclass
class ShortcutCheck:
    """Result of :func:`shortcut_check`.

    ``concept``: index of the contrasted concept whose majority ground truth is the shortcut
    background (None: not found); ``share``: its purity; ``crop_id``: the highest-ranked of its
    crops dominated by that background (the patch); ``patch``: margin of that patch;
    ``random``: margins of random catalog crops used as patches, with ``random_concepts`` their
    ground-truth concept names."""

    background: str
    concept: int | None
    share: float
    crop_id: int | None
    patch: PatchMargin | None
    random: list[PatchMargin]
    random_concepts: list[str]

    @property
    def random_margin(self) -> float:
        return float(np.mean([r.margin for r in self.random])) if self.random else float("nan")


def shortcut_check(ctx: Any, contrast: Any, images_b: Any, image_ids_b: Sequence[int], *,
                   background: str = "bg_grass", n_random: int = 8, seed: int = 0,
                   position: str = "bottom-right", control: str = "mean") -> ShortcutCheck:
    """Does the A-vs-B contrast surface ``background``, and does pasting it move B to A?

    ``contrast``: the contrasted Explanation (A = ``contrast.class_a``); ``images_b``:
    ``(N, 3, S, S)`` pixels of images predicted as B. The patch is the top crop of the concept
    whose majority ground truth is ``background`` (``patch_from_crop``) inserted at ``position``;
    the baseline pastes ``n_random`` seeded random catalog crops instead."""
    from explainer.faithfulness import patch_from_crop, patch_insertion

    a, b = int(contrast.class_a), int(contrast.class_b)
    truths = explanation_truth(contrast, input_size=ctx.lm.input_size)
    k = find_concept(truths, background)
    crop_id, patch = None, None
    bid = world.concept_id(background)

    def margin(cid: int) -> PatchMargin:
        res = patch_insertion(ctx.lm, images_b, patch_from_crop(ctx.lm, ctx.catalog, cid), a, b,
                              position=position, control=control, image_ids=image_ids_b)
        return patch_margin(res)

    if k is not None:
        crop_id = next(r.crop_id for r, c in zip(contrast.concepts[k].crops,
                                                  truths[k].concept_ids) if c == bid)
        patch = margin(crop_id)
    rand_ids = ctx.catalog.random_crop_ids(n_random, seed=seed)
    rand_names = [world.CONCEPTS[c] for c in
                  crop_concepts(ctx.catalog.crop_refs(rand_ids), ctx.lm.input_size)]
    return ShortcutCheck(background=background, concept=k,
                         share=truths[k].share if k is not None else 0.0, crop_id=crop_id,
                         patch=patch, random=[margin(c) for c in rand_ids],
                         random_concepts=rand_names)


def random_direction(weight: np.ndarray, seed: int) -> np.ndarray:
    """A seeded Gaussian direction with the norm of ``weight`` (shift-test baseline)."""
    w = np.asarray(weight, np.float32)
    r = np.random.default_rng(seed).normal(size=w.shape).astype(np.float32)
    return r * (np.linalg.norm(w) / max(float(np.linalg.norm(r)), 1e-12))
