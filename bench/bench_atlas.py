"""Concept atlas timings (explainer/atlas.py): a page of 8 / 32 / 100 crops, where-else over the
whole catalog, the 2-D map of a class.

    python bench/bench_atlas.py [--workspace WS] [--repeat 5]

Without ``--workspace``: the demo world (``DEMO_WORKSPACE_HOME`` or a fresh build) and the
default explanation of lupo (its first concept's vector). With a workspace: the mean embedding
of the crops of the most-predicted class's images stands in for a concept vector (no
explanation is computed); the map uses that class's images. Median seconds of ``--repeat``
runs (the first run warms the page cache).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _grass_check(cat, vec, cls) -> None:
    from demo_world import groundtruth as gt
    from demo_world import world
    from explainer import atlas as A

    w = A.where_else(cat, vec, own_class=cls, m=8)
    ids, preds = cat.image_preds()
    grass = world.concept_id("bg_grass")
    is_grass = np.array([(gt.load_mask(cat.image_path(int(i))) == grass).mean() > 0.2
                         for i in ids])
    per = cat.grid.per_image
    store = cat.store()
    emb = np.concatenate([b for _, b in store.blocks()])
    s = emb @ (vec / np.linalg.norm(vec)) / np.maximum(np.asarray(store.norms), 1e-12)
    best = np.full(int(ids.max()) + 1, -np.inf)
    np.maximum.at(best, np.asarray(store.ids) // per, s)
    hit = best[ids] >= w.threshold
    other = preds != cls
    print(f"  hits outside the class: {int((hit & other).sum())} images, "
          f"{(is_grass & hit & other).sum() / max(1, (hit & other).sum()):.0%} show grass; "
          f"{(hit & is_grass & other).sum() / max(1, (is_grass & other).sum()):.0%} of the "
          f"{int((is_grass & other).sum())} grass images outside the class are hits")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import os

    from explainer import atlas as A
    from explainer.concepts import explain_class, get_context

    if args.workspace:
        ctx = get_context(args.workspace, "cpu")
        counts = ctx.catalog.predicted_counts()
        cls = max(counts, key=lambda c: counts[c])
        images = ctx.catalog.images_predicted_as(cls)
        per = ctx.catalog.grid.per_image
        ids = (np.asarray(images)[:, None] * per + np.arange(per)).ravel()
        vectors = ctx.catalog.store().vectors(ids)
        vec = vectors.mean(axis=0)
        concept_vectors = np.stack([vec, vectors[0], vectors[-1]])
    else:
        from demo_world import world
        from demo_world.workspace import ensure_demo_workspace

        home = os.environ.get("DEMO_WORKSPACE_HOME")
        ws = ensure_demo_workspace(home=Path(home) if home else Path(tempfile.mkdtemp()),
                                   device="cpu")
        ctx = get_context(ws, "cpu")
        cls = world.CLASSES.index("lupo")
        e = explain_class(ctx, cls, device="cpu", cache=True)
        vec, images, concept_vectors = e.concepts[0].vector, e.image_ids, e.concept_vectors
    cat = ctx.catalog
    print(f"{ctx.ws.name}: {cat.n_images} images, {cat.n_crops} crops, dim {cat.dim()}, "
          f"class {ctx.lm.class_names[cls]} ({len(images)} images)")
    print(f"{'step':40} {'seconds':>8}")
    for size in A.PAGE_SIZES:
        s = _median(lambda size=size: A.crops_page(ctx.search, vec, 1, size, cls), args.repeat)
        print(f"{f'page 2 of {size} crops (excluding the class)':40} {s:8.3f}")
    w = A.where_else(cat, vec, own_class=cls)
    s = _median(lambda: A.where_else(cat, vec, own_class=cls), args.repeat)
    print(f"{f'where else (occurs in {len(w.occurs_in)} classes)':40} {s:8.3f}")
    if not args.workspace:  # against the demo world's masks: are the hits grass images?
        _grass_check(cat, vec, cls)
    m = A.class_map(cat, images, concept_vectors)
    s = _median(lambda: A.class_map(cat, images, concept_vectors), args.repeat)
    print(f"{f'2-D map ({len(m.crop_ids)} crops)':40} {s:8.3f}")


if __name__ == "__main__":
    main()
