"""Catalog build throughput and crop-search latency.

    python bench/bench_catalog.py [--n 256] [--batch-size 32] [--workspace WS] [--big 1000000]
                                  [--big-dim 256] [--layers blocks.2.1.bn2,blocks.4.2.bn2,bn2]

1. Forward-only throughput of full images (pre-decoded, same images, same batch size) vs the
   catalog build in ``cell`` and ``crop`` mode (decode + forwards + DuckDB + assembly), with ratios;
   the crop-mode build with one layer and with ``--layers`` (one forward, several layers), and
   the bytes of the layer stores (float16) against float32.
2. Search latency (one query vector per call) p50/p95: at ~20k crops (the workspace's catalog if
   given -- exact search over its float16 store --, else synthetic 18000 x 1280 in FAISS), with
   and without class exclusion.
3. At ``--big`` synthetic crops (clustered non-negative vectors, ``--big-dim``): exact
   ``IndexFlatIP`` vs ``IndexIVFFlat`` with recall@8.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_index.catalog import Catalog, build_catalog  # noqa: E402
from data_index.datasets import ImageFolder, load_rgb  # noqa: E402
from data_index.search import CropSearch, normalize_rows  # noqa: E402
from data_index.store import store_nbytes  # noqa: E402
from data_index.workspace import Workspace  # noqa: E402
from explorer_core.models import load_model  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "imagenet-nips17"


def forward_only(lm, px: torch.Tensor, bs: int) -> float:
    with torch.inference_mode():
        lm.model(lm.normalize(px[:bs]))  # warm-up
        t = time.perf_counter()
        for i in range(0, len(px), bs):
            lm.model(lm.normalize(px[i:i + bs]))
    return len(px) / (time.perf_counter() - t)


def build_rate(lm, mode: str, n: int, bs: int, tmp: Path, layers: list[str] | None = None
               ) -> tuple[float, int, int]:
    """(images/s, bytes of the layer stores, bytes the same embeddings take as float32)."""
    layers = layers or [lm.recommended_layer]
    ws = Workspace.create(tmp / f"ws_{mode}_{len(layers)}", model=lm.spec, layers=layers,
                          images=str(PHOTOS), input_size=lm.input_size, mode=mode, device="cpu")
    t = time.perf_counter()
    st = build_catalog(ws, model=lm, batch_size=bs, limit=n, rebuild=True)
    rate = st.n_images / (time.perf_counter() - t)
    with Catalog.open(ws) as cat:
        nbytes = sum(cat.store(x).nbytes for x in layers)
        f32 = sum(store_nbytes(len(cat.store(x)), cat.dim(x), "float32") for x in layers)
    return rate, nbytes, f32


def latencies(fn, queries: np.ndarray) -> tuple[float, float]:
    fn(queries[:1])
    ts = []
    for q in queries:
        t = time.perf_counter()
        fn(q[None])
        ts.append((time.perf_counter() - t) * 1e3)
    return float(np.percentile(ts, 50)), float(np.percentile(ts, 95))


def clustered(n: int, d: int, seed: int = 0, centers: int = 2000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = np.maximum(rng.standard_normal((centers, d), dtype=np.float32), 0)
    out = np.empty((n, d), np.float32)
    step = 100_000
    for i in range(0, n, step):
        k = min(step, n - i)
        out[i:i + k] = np.maximum(c[rng.integers(0, centers, k)]
                                  + 0.7 * rng.standard_normal((k, d), dtype=np.float32), 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workspace", default=None, help="a built workspace for the ~20k search")
    ap.add_argument("--big", type=int, default=1_000_000)
    ap.add_argument("--big-dim", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", default="blocks.2.1.bn2,blocks.4.2.bn2,bn2",
                    help="layers of the multi-layer build (comma-separated)")
    a = ap.parse_args()
    import faiss

    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    lm = load_model(a.model, "cpu")
    rows = []
    entries = ImageFolder(PHOTOS).entries[:a.n]
    px = torch.stack([lm.geometry(load_rgb(e.path)) for e in entries])
    forward_only(lm, px, a.batch_size)  # a whole warm-up pass: oneDNN's first pass runs ~2x slower
    fwd = forward_only(lm, px, a.batch_size)
    del px
    rows.append(("forward only (full images, pre-decoded)", fwd, 1.0))
    sizes = []
    many = [x for x in a.layers.split(",") if x]
    with tempfile.TemporaryDirectory() as tmp:
        for mode, layers in (("cell", None), ("crop", None), ("crop", many)):
            r, nbytes, f32 = build_rate(lm, mode, a.n, a.batch_size, Path(tmp), layers)
            what = f"{len(layers)} layers" if layers else f"1 layer ({lm.recommended_layer})"
            rows.append((f"catalog build, {mode} mode, {what} (decode+all)", r, r / fwd))
            sizes.append((f"{mode}, {what}", nbytes, f32))
    print(f"\n## Build throughput: {a.model}, {a.n} photos (imagenet-nips17), batch "
          f"{a.batch_size}, {a.threads} threads\n")
    print("| pass | images/s | ratio to forward-only |\n|---|---:|---:|")
    for name, r, ratio in rows:
        print(f"| {name} | {r:.1f} | {ratio:.2f} |")
    print("\n| catalog | store bytes (float16) | as float32 | ratio |\n|---|---:|---:|---:|")
    for name, nbytes, f32 in sizes:
        print(f"| {name} | {nbytes:,} | {f32:,} | {nbytes / f32:.3f} |")

    print("\n## Search latency (1 query per call, ms)\n")
    print("| crops | dim | index | exclusion | p50 ms | p95 ms | recall@8 |\n"
          "|---:|---:|---|---|---:|---:|---:|")
    rng = np.random.default_rng(1)
    if a.workspace:
        cat = Catalog.open(a.workspace)
        flat = CropSearch(cat)  # exact, over the default layer's store
        store = cat.store()
        q = store.rows(rng.choice(len(store), 100, replace=False))
        cls = max(cat.predicted_counts().items(), key=lambda kv: kv[1])[0]
        for excl in (None, cls):
            p50, p95 = latencies(lambda x, excl=excl: flat.search(x, 8, excl), q)
            print(f"| {len(store)} | {store.dim} | exact over the {store.dtype} store "
                  "(catalog, CropRefs) | "
                  f"{'class ' + str(excl) if excl is not None else 'none'} | {p50:.2f} | "
                  f"{p95:.2f} | 1 |")
    else:
        emb = normalize_rows(clustered(18000, 1280))
        idx = faiss.IndexIDMap2(faiss.IndexFlatIP(1280))
        idx.add_with_ids(emb, np.arange(18000, dtype=np.int64))
        q = emb[rng.choice(18000, 100, replace=False)]
        p50, p95 = latencies(lambda x: idx.search(x, 8), q)
        print(f"| 18000 | 1280 | flat (synthetic) | none | {p50:.2f} | {p95:.2f} | 1 |")

    if not a.big:  # --big 0: no synthetic large-scale search
        return
    n, d = a.big, a.big_dim
    t = time.perf_counter()
    big = normalize_rows(clustered(n, d))
    ids = np.arange(n, dtype=np.int64)
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    flat.add_with_ids(big, ids)
    q = normalize_rows(big[rng.choice(n, 100, replace=False)]
                       + 0.3 * rng.standard_normal((100, d)).astype(np.float32))
    excl = rng.choice(n, n // 100, replace=False).astype(np.int64)  # ~1 % of crops excluded
    sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(excl))
    p50, p95 = latencies(lambda x: flat.search(x, 8), q)
    print(f"| {n} | {d} | flat exact (synthetic) | none | {p50:.1f} | {p95:.1f} | 1 |")
    p50, p95 = latencies(lambda x: flat.search(x, 8, params=faiss.SearchParameters(sel=sel)), q)
    print(f"| {n} | {d} | flat exact (synthetic) | 1 % ids | {p50:.1f} | {p95:.1f} | 1 |")
    _, ref = flat.search(q, 8)
    nlist = int(4 * np.sqrt(n))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    t = time.perf_counter()
    ivf.train(big[rng.choice(n, min(n, 64 * nlist), replace=False)])
    ivf.add_with_ids(big, ids)
    t_build = time.perf_counter() - t
    for nprobe in (8, 32):
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        p50, p95 = latencies(lambda x, params=params: ivf.search(x, 8, params=params), q)
        _, got = ivf.search(q, 8, params=params)
        rec = np.mean([len(set(g) & set(r)) / 8 for g, r in zip(got, ref)])
        print(f"| {n} | {d} | IVFFlat nlist={nlist} nprobe={nprobe} | none | {p50:.2f} | "
              f"{p95:.2f} | {rec:.3f} |")
    print(f"\n(IVF train+add {t_build:.0f} s; synthetic = 2000 clustered non-negative centres + "
          f"noise, L2-normalised; {n} x {d} float32 = {n * d * 4 / 1e9:.1f} GB)")


if __name__ == "__main__":
    main()
