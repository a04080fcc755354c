"""Concept atlas timings (explainer/atlas.py): a page of 8 / 32 / 100 crops, where-else over the
whole catalog, the 2-D map of a class.

    python bench/bench_atlas.py [--workspace WS] [--repeat 5]
    python bench/bench_atlas.py --scale 1000000 [--dim 256]

``--scale N``: where-else alone over a synthetic clustered bank of N crops (bench_scale.py's,
written through the real store, float16) with random image predictions (1000 classes): seconds
and the anonymous memory the scan adds in a fresh process (sampled after each block; the
store's memory-mapped pages are page cache, not counted), against the store's size: one 32 MB
block plus one float per image, not the store.

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


class _BankCatalog:
    """What :func:`explainer.atlas.where_else` reads of a catalog, over a bare store."""

    def __init__(self, folder: Path) -> None:
        from data_index.crops import CropGrid
        from data_index.store import EmbeddingStore

        self._store = EmbeddingStore.open(folder)
        self.grid = CropGrid(96, 32, 32)  # 9 crops per image, as the bank's
        n_img = (len(self._store) + 8) // 9
        self._preds = np.random.default_rng(0).integers(0, 1000, n_img)

    def store(self, layer=None):
        return self._store

    def check_layer(self, layer=None):
        return "bank"

    def image_preds(self):
        return np.arange(len(self._preds), dtype=np.int64), self._preds


def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def _scale_child(folder: str) -> None:
    """In a fresh process: where-else over the bank; one JSON line with seconds and memory."""
    import json

    from explainer import atlas as A

    cat = _BankCatalog(Path(folder))
    store = cat.store()
    vec = store.rows([5])[0]
    base = _vm("RssAnon")
    peak = [base]
    raw_blocks = store.raw_blocks

    def sampled(*a, **k):  # anonymous memory (not the mapped store's pages) after each block
        for item in raw_blocks(*a, **k):
            yield item
            peak[0] = max(peak[0], _vm("RssAnon"))

    store.raw_blocks = sampled
    t = time.perf_counter()
    w = A.where_else(cat, vec, own_class=0)
    s = time.perf_counter() - t
    print(json.dumps({"seconds": s, "peak_anon": peak[0], "base_anon": base,
                      "store_bytes": store.nbytes, "crops": w.n_crops}))


def _scale(rows: int, dim: int) -> None:
    import json
    import shutil
    import subprocess

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_scale import write_clustered_bank

    folder = Path(tempfile.mkdtemp()) / "bank"
    try:
        t = time.perf_counter()
        write_clustered_bank(folder, rows, dim)
        print(f"wrote {rows:,} x {dim} float16 in {time.perf_counter() - t:.0f} s")
        out = subprocess.run([sys.executable, __file__, "--scale-child", str(folder)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        mb = 2 ** 20
        print(f"{'crops':>12} {'store MB':>9} {'seconds':>8} {'anon. memory added MB':>22}")
        print(f"{r['crops']:>12,} {r['store_bytes'] / mb:9.0f} {r['seconds']:8.2f} "
              f"{(r['peak_anon'] - r['base_anon']) / mb:22.0f}")
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--scale", type=int)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--scale-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.scale_child:
        return _scale_child(args.scale_child)
    if args.scale:
        return _scale(args.scale, args.dim)
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
