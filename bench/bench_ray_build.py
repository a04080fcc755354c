"""Catalog build throughput on a local Ray: 1 worker vs 2 (or more), against the single-process
build, and a check that every Ray catalog equals the single-process one.

    python bench/bench_ray_build.py [--limit 400] [--workers 1,2] [--model efficientnet_lite0]
                                    [--layers bn2] [--mode crop] [--batch-size 32]
                                    [--chunk-size 64] [--num-cpus N] [--device cpu]

"Equal" means the same rows in the images, crops and skipped tables (confidences within 1e-5:
torch on another thread count may round them in the last bit) and the same stored embeddings.
Each build starts from an empty workspace over the first ``--limit`` shared photos
(``../shared/data``). The Ray builds run on one local Ray started with ``--num-cpus`` CPUs (default:
all of this machine's); each worker gets ``num_cpus // workers`` CPUs (torch threads), so on a
2-core machine 1 worker x 2 threads is compared with 2 workers x 1 thread. Times include Ray's
actor start (model load per worker) but not Ray's own start. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_index.catalog import Catalog, build_catalog  # noqa: E402
from data_index.ray_build import build_catalog_ray, init_ray  # noqa: E402
from data_index.workspace import Workspace  # noqa: E402
from explorer_core.models import load_model  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data"


def _rows(ws: Workspace) -> dict[str, list]:
    import duckdb

    con = duckdb.connect(str(ws.catalog_path), read_only=True)
    try:
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall()
                for t in ("images", "crops", "skipped")}
    finally:
        con.close()


def _rows_close(a: dict[str, list], b: dict[str, list], tol: float = 1e-5) -> bool:
    """Same rows; float fields (confidences) within ``tol``: a forward on another number of
    torch threads may round them differently in the last bit."""
    def same(x: object, y: object) -> bool:
        if isinstance(x, float) and isinstance(y, float):
            return abs(x - y) <= tol
        return x == y
    return all(len(a[t]) == len(b[t]) and all(all(map(same, r, q)) for r, q in zip(a[t], b[t]))
               for t in b)


def _max_diff(a: Workspace, b: Workspace) -> float:
    out = 0.0
    with Catalog.open(a) as ca, Catalog.open(b) as cb:
        for layer in ca.layers:
            for (_, x), (_, y) in zip(ca.store(layer).blocks(), cb.store(layer).blocks()):
                out = max(out, float(np.abs(x - y).max()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default=str(PHOTOS))
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--layers", default="bn2")
    ap.add_argument("--mode", default="crop", choices=["crop", "cell"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.num_cpus)
    lm = load_model(a.model, "cpu")
    layers = [x for x in a.layers.split(",") if x]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        def workspace(name: str) -> Workspace:
            return Workspace.create(Path(tmp) / name, model=lm.spec, layers=layers,
                                    images=a.images, input_size=lm.input_size, mode=a.mode,
                                    device=a.device)

        ref = workspace("single")
        t = time.perf_counter()
        st = build_catalog(ref, model=lm, batch_size=a.batch_size, chunk_size=a.chunk_size,
                           limit=a.limit)
        secs = time.perf_counter() - t
        results["single process"] = {"workers": 0, "seconds": round(secs, 1),
                                     "images_per_s": round(st.n_images / secs, 2)}
        ref_rows = _rows(ref)
        t = time.perf_counter()
        init_ray(num_cpus=a.num_cpus)
        ray_start = time.perf_counter() - t
        import ray

        try:
            for n in [int(x) for x in a.workers.split(",") if x]:
                ws = workspace(f"ray{n}")
                t = time.perf_counter()
                st = build_catalog_ray(ws, workers=n, batch_size=a.batch_size,
                                       chunk_size=a.chunk_size, limit=a.limit, model=lm,
                                       device=a.device)
                secs = time.perf_counter() - t
                results[f"ray, {n} worker(s)"] = {
                    "workers": n, "seconds": round(secs, 1),
                    "images_per_s": round(st.n_images / secs, 2),
                    "rows_identical": _rows(ws) == ref_rows,
                    "rows_equal": _rows_close(_rows(ws), ref_rows),
                    "max_abs_diff": _max_diff(ws, ref)}
        finally:
            ray.shutdown()
    print(f"\n## Catalog build: {a.model} {','.join(layers)} ({a.mode} mode), {a.limit} photos, "
          f"local Ray with {a.num_cpus} CPUs (started in {ray_start:.1f} s)\n")
    print("| build | seconds | images/s | equal to single-process |\n|---|---:|---:|---|")
    for name, r in results.items():
        if "rows_equal" not in r:
            same = "-"
        else:
            rows = ("identical" if r["rows_identical"] else
                    "yes (conf within 1e-5)" if r["rows_equal"] else "NO")
            same = f"rows {rows}, embeddings max |diff| {r['max_abs_diff']:.2g}"
        print(f"| {name} | {r['seconds']} | {r['images_per_s']} | {same} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
