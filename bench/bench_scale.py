"""Crop search at scale: a synthetic but clustered crop bank through the real storage path.

    python bench/bench_scale.py [--rows 1000000 3000000] [--dim 1280] [--memory-budget 2GB]
                                [--kind auto] [--device cpu|cuda] [--workdir DIR] [--keep]
                                [--stages write,index,search,flat[,cuda]] [--threads 2]

For each ``--rows`` size N (skipped with a message when the disk cannot hold it):

1. ``write``: N x ``--dim`` crops generated block by block (:func:`bank_block`) and written
   through the real :class:`~data_index.store.StoreWriter` (float16 shards); time, bytes on disk,
   peak RSS.
2. ``index``: :func:`~data_index.vector_index.build_index` with the rule (``--kind auto``) under
   ``--memory-budget``, tuning ``nprobe``/``rerank`` on 200 stored crops; time, index bytes,
   peak RSS (the build's memory, to compare across N).
3. ``search`` (a fresh process, so its VmHWM is the search's own): opens the index, then top-8
   latency p50/p95 over batches of 4 query vectors (50 batches) and of 4000 (3 batches), with a
   1 % exclusion too, and recall@8 after re-rank against the exhaustive exact search on 200
   held-out stored crops (own crop left out); peak RSS (VmHWM from /proc/self/status).
4. ``flat``: the exact CPU scan (blocked matmul over the store) for 4 queries, 5 batches: the
   baseline the ratio refers to (``flat_p95_ms / p95_ms``).
5. ``cuda`` (with ``--device cuda``): exact search on the GPU (chunked fp16 matmul + topk),
   p50/p95 for 4 and 4000 queries, its load time, and the share of its top-8 ids equal to the
   CPU exact search's on 16 queries.

The synthetic bank: 9 crops per image, 1000 classes; each crop is one of its class's 4 "part"
concepts (60 %) or one of 1000 shared "background" concepts, in a 128-d latent space with an
image offset and crop noise, mapped to ``--dim`` channels by a fixed random matrix plus channel
noise and a ReLU (about half the values 0, like post-ReLU activations). Its neighbourhoods are
about as hard as real EfficientNet-Lite0 crops' (mean top-8 cosine 0.74 vs 0.63; 8 % vs 14 % of
the top-8 from the query's own image; IVF recall vs probed fraction alike).

Prints one table (growth with N) and, last, ONE JSON line with the figures per size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_index.store import EmbeddingStore, StoreWriter, store_nbytes  # noqa: E402

BLOCK = 9 * 4096  # rows generated at a time (whole images of 9 crops)
CLASSES, PARTS, SHARED, LATENT = 1000, 4, 1000, 128


def bank_block(block_no: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``block_no*BLOCK ...`` of the clustered bank: ``(x (BLOCK, dim) float32 >= 0,
    class (BLOCK,) int64)``; the same for a given ``(block_no, dim, seed)`` whatever else runs."""
    g = np.random.default_rng([seed, 0])
    centres = g.standard_normal((CLASSES * PARTS + SHARED, LATENT), dtype=np.float32)
    proj = g.standard_normal((LATENT, dim), dtype=np.float32) / np.sqrt(LATENT)
    r = np.random.default_rng([seed, 1, block_no])
    n_img = BLOCK // 9
    cls = np.repeat(r.integers(0, CLASSES, n_img), 9)
    own = r.random(BLOCK) < 0.6
    concept = np.where(own, cls * PARTS + r.integers(0, PARTS, BLOCK),
                       CLASSES * PARTS + r.integers(0, SHARED, BLOCK))
    z = centres[concept] + np.repeat(0.35 * r.standard_normal((n_img, LATENT), dtype=np.float32),
                                     9, 0)
    z += 0.6 * r.standard_normal((BLOCK, LATENT), dtype=np.float32)
    x = z @ proj
    x += 0.25 * r.standard_normal((BLOCK, dim), dtype=np.float32) - 0.25
    return np.maximum(x, 0, out=x), cls


def write_clustered_bank(folder: str | os.PathLike, rows: int, dim: int, seed: int = 0,
                         shard_rows: int = 262_144) -> EmbeddingStore:
    """Write ``rows`` x ``dim`` bank rows (crop ids ``0..rows-1``) through :class:`StoreWriter`
    (float16); memory: one generated block plus the writer's shard buffer."""
    w = StoreWriter(folder, dim, "float16", shard_rows=shard_rows)
    for b in range((rows + BLOCK - 1) // BLOCK):
        x, _ = bank_block(b, dim, seed)
        n = min(BLOCK, rows - b * BLOCK)
        w.append(np.arange(b * BLOCK, b * BLOCK + n, dtype=np.int64), x[:n])
    return w.finish({"synthetic": f"bench_scale seed={seed}"})


def bank_classes(rows: int, seed: int = 0) -> np.ndarray:
    """Class of each bank row ``(rows,)`` (regenerates the blocks; for small banks/tests)."""
    return np.concatenate([bank_block(b, 8, seed)[1] for b in range((rows + BLOCK - 1)
                                                                    // BLOCK)])[:rows]


# ---- stages (each runs in its own process; prints one JSON line) ------------------------------

def _peak_gb() -> float:
    try:  # this process's own peak (ru_maxrss of a child can start at the parent's size)
        with open("/proc/self/status") as f:
            kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / 2**20, 3)


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
    return round(kb / 2**20, 3)


def _pct(ts: list[float]) -> tuple[float, float]:
    return (round(float(np.percentile(ts, 50)) * 1e3, 2),
            round(float(np.percentile(ts, 95)) * 1e3, 2))


def _timed(fn, batches: list[np.ndarray], warm: int = 2) -> tuple[float, float]:
    for b in batches[:warm]:
        fn(b)
    ts = []
    for b in batches:
        t = time.perf_counter()
        fn(b)
        ts.append(time.perf_counter() - t)
    return _pct(ts)


def _queries(store: EmbeddingStore, n: int, seed: int) -> np.ndarray:
    from data_index.vector_index import _ShardFiles

    rng = np.random.default_rng([seed, 77])
    return _ShardFiles(store).gather(np.sort(rng.choice(len(store), n, replace=False)))


def _exclusion(store: EmbeddingStore, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 99])
    return np.asarray(store.ids[np.sort(rng.choice(len(store), len(store) // 100,
                                                   replace=False))])


def stage_write(a: argparse.Namespace) -> dict:
    t = time.perf_counter()
    st = write_clustered_bank(a.store, a.n, a.dim, a.seed)
    return {"write_s": round(time.perf_counter() - t, 1), "store_bytes": st.nbytes,
            "write_peak_rss_gb": _peak_gb()}


def stage_index(a: argparse.Namespace) -> dict:
    from data_index.vector_index import build_index

    st = EmbeddingStore.open(a.store)
    t = time.perf_counter()
    idx = build_index(st, a.index, kind=a.kind, memory_budget=a.memory_budget, seed=a.seed)
    info = getattr(idx, "info", {})
    files = sum(f.stat().st_size for f in Path(a.index).iterdir() if f.is_file())
    spec = info.get("spec", {})
    return {"index_s": round(time.perf_counter() - t, 1), "index_bytes": files,
            "index_peak_rss_gb": _peak_gb(), "kind": idx.kind, "nlist": spec.get("nlist"),
            "pq_m": spec.get("pq_m"), "code_bytes": spec.get("code_bytes"),
            "nprobe": info.get("nprobe"), "rerank": info.get("rerank"),
            "tune_recall_at_8": info.get("recall_at_8"),
            "formula_bytes": spec.get("resident_bytes"), "reason": spec.get("reason")}


def stage_search(a: argparse.Namespace) -> dict:
    import faiss

    from data_index.vector_index import measure_recall, open_index

    faiss.omp_set_num_threads(a.threads)
    st = EmbeddingStore.open(a.store)
    base = _rss_gb()
    idx = open_index(a.index, st)
    opened = _rss_gb()
    q4 = _queries(st, 4 * 50, a.seed + 1).reshape(50, 4, -1)
    excl = _exclusion(st, a.seed)
    p50, p95 = _timed(lambda q: idx.search(q, 8), list(q4))
    e50, e95 = _timed(lambda q: idx.search(q, 8, excl), list(q4))
    q4000 = _queries(st, 4000, a.seed + 2)
    b50, b95 = _timed(lambda q: idx.search(q, 8), [q4000] * 3, warm=0)
    _, ids = idx.search(q4000[:64], 8, excl)
    assert not np.isin(ids, excl).any() and (ids >= 0).all(), "exclusion broken"
    rec = measure_recall(idx, st, 200, 8, seed=a.seed + 1)
    rec_ex = measure_recall(idx, st, 200, 8, seed=a.seed + 1, exclude=excl)
    return {"p50_ms": p50, "p95_ms": p95, "excl_p50_ms": e50, "excl_p95_ms": e95,
            "p50_ms_4000": b50, "p95_ms_4000": b95, "recall_at_8": round(rec, 4),
            "recall_at_8_excl": round(rec_ex, 4), "peak_rss_gb": _peak_gb(),
            "baseline_rss_gb": base, "opened_rss_gb": opened}


def stage_flat(a: argparse.Namespace) -> dict:
    from data_index.vector_index import ExactIndex

    st = EmbeddingStore.open(a.store)
    idx = ExactIndex(st)
    q4 = _queries(st, 4 * 5, a.seed + 1).reshape(5, 4, -1)
    p50, p95 = _timed(lambda q: idx.search(q, 8), list(q4), warm=1)
    return {"flat_p50_ms": p50, "flat_p95_ms": p95, "flat_peak_rss_gb": _peak_gb()}


def stage_cuda(a: argparse.Namespace) -> dict:
    import torch

    from data_index.vector_index import ExactIndex, TorchExactIndex

    st = EmbeddingStore.open(a.store)
    t = time.perf_counter()
    gpu = TorchExactIndex(st, "cuda")
    torch.cuda.synchronize()
    load = time.perf_counter() - t
    q4 = _queries(st, 4 * 50, a.seed + 1).reshape(50, 4, -1)
    p50, p95 = _timed(lambda q: gpu.search(q, 8), list(q4))
    q4000 = _queries(st, 4000, a.seed + 2)
    b50, b95 = _timed(lambda q: gpu.search(q, 8), [q4000] * 3, warm=1)
    _, g = gpu.search(q4000[:16], 8)
    _, c = ExactIndex(st).search(q4000[:16], 8)
    return {"cuda_p50_ms": p50, "cuda_p95_ms": p95, "cuda_p50_ms_4000": b50,
            "cuda_p95_ms_4000": b95, "cuda_load_s": round(load, 1),
            "cuda_resident": gpu.resident, "cuda_same_ids_as_cpu": float(np.mean(g == c)),
            "cuda_device": torch.cuda.get_device_name(0)}


STAGES = {"write": stage_write, "index": stage_index, "search": stage_search,
          "flat": stage_flat, "cuda": stage_cuda}


def _run_stage(name: str, a: argparse.Namespace, n: int, store: Path, index: Path) -> dict:
    cmd = [sys.executable, __file__, "--stage", name, "--n", str(n), "--dim", str(a.dim),
           "--store", str(store), "--index", str(index), "--seed", str(a.seed),
           "--kind", a.kind, "--memory-budget", str(a.memory_budget),
           "--threads", str(a.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        return {f"{name}_error": r.stderr.strip().splitlines()[-1] if r.stderr.strip()
                else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _fmt(v, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000])
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--memory-budget", default="2GB")
    ap.add_argument("--kind", default="auto")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--stages", default=None, help="comma list (default write,index,search,flat"
                    " and cuda with --device cuda)")
    ap.add_argument("--workdir", default=None, help="where the banks go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep each bank (default: delete)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--index", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if a.stage:
        print(json.dumps(STAGES[a.stage](a)))
        return
    stages = (a.stages.split(",") if a.stages else
              ["write", "index", "search", "flat"] + (["cuda"] if a.device == "cuda" else []))
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# bench_scale: dim {a.dim}, budget {a.memory_budget}, kind {a.kind}, stages "
          f"{','.join(stages)}, {a.threads} threads, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    out: dict[str, dict] = {}
    for n in a.rows:
        store, index = work / f"bank_{n}_{a.dim}", work / f"index_{n}_{a.dim}"
        need = store_nbytes(n, a.dim) + n * (a.dim // 8 + 8) + 2**30
        have = shutil.disk_usage(work).free + (sum(f.stat().st_size for f in store.glob("*"))
                                               if store.exists() else 0)
        if "write" in stages and need > have:
            print(f"skip {n} rows: needs ~{need / 1e9:.1f} GB on disk, {have / 1e9:.1f} GB "
                  f"free in {work}", flush=True)
            out[str(n)] = {"skipped": f"disk: needs {need / 1e9:.1f} GB, "
                                      f"{have / 1e9:.1f} GB free"}
            continue
        res: dict = {"rows": n, "dim": a.dim}
        for name in stages:
            t = time.perf_counter()
            res.update(_run_stage(name, a, n, store, index))
            print(f"  {n} rows: {name} done in {time.perf_counter() - t:.0f} s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
        if res.get("p95_ms") and res.get("flat_p95_ms"):
            res["flat_ratio"] = round(res["flat_p95_ms"] / res["p95_ms"], 1)
        out[str(n)] = res
        if not a.keep:
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(index, ignore_errors=True)
    print("\n| crops | write s | store GB | index | build s | build peak GB | index MB | "
          "nprobe/rerank | p50/p95 ms (4 q) | p95 ms excl 1 % | p50/p95 s (4000 q) | "
          "recall@8 | search peak RSS GB | flat p95 ms | flat / index |")
    print("|" + "---:|" * 3 + "---|" + "---:|" * 11)
    for n, r in out.items():
        if "skipped" in r:
            print(f"| {n} | skipped: {r['skipped']} |")
            continue
        kind = r.get("kind", "-")
        if r.get("pq_m"):
            kind += f" M={r['pq_m']}"
        kind += f" nlist={r['nlist']}" if r.get("nlist") else ""
        b = r.get("p50_ms_4000")
        print(f"| {n} | {_fmt(r.get('write_s'))} | "
              f"{_fmt(r.get('store_bytes') and r['store_bytes'] / 1e9, '.2f')} | {kind} | "
              f"{_fmt(r.get('index_s'))} | {_fmt(r.get('index_peak_rss_gb'))} | "
              f"{_fmt(r.get('index_bytes') and r['index_bytes'] / 1e6, '.0f')} | "
              f"{_fmt(r.get('nprobe'))}/{_fmt(r.get('rerank'))} | {_fmt(r.get('p50_ms'))} / "
              f"{_fmt(r.get('p95_ms'))} | {_fmt(r.get('excl_p95_ms'))} | "
              f"{_fmt(b and b / 1e3, '.1f')} / "
              f"{_fmt(r.get('p95_ms_4000') and r['p95_ms_4000'] / 1e3, '.1f')} | "
              f"{_fmt(r.get('recall_at_8'))} | {_fmt(r.get('peak_rss_gb'))} | "
              f"{_fmt(r.get('flat_p95_ms'))} | {_fmt(r.get('flat_ratio'))} |")
        if "cuda_p95_ms" in r:
            print(f"|  | cuda exact ({r['cuda_device']}): p50/p95 {r['cuda_p50_ms']} / "
                  f"{r['cuda_p95_ms']} ms (4 q), {r['cuda_p95_ms_4000']} ms (4000 q), same ids "
                  f"as CPU {r['cuda_same_ids_as_cpu']:.3f} |")
    if a.workdir is None and not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
