"""CPU vs CUDA parity on the demo world (issue 9, the GPU check).

    python bench/gpu_parity.py [--home DIR] [--classes 5] [--json OUT.json]

Builds (or opens) the ``demo`` workspace under ``--home`` with its catalog embedded on CUDA,
then, for the first ``--classes`` classes with images:

* **catalog**: the first 64 images embedded again on the CPU (a ``--limit 64`` build in a
  second workspace over the same image folder); the largest absolute difference of their
  float16 embeddings against the CUDA-built rows, and the share of the CPU's image predictions
  equal to CUDA's;
* **explain**: the class explained on the CPU and on CUDA (DeepLift, n = 4, torch NMF, no
  cache) over the same catalog; concept vectors matched one to one (Hungarian on cosine),
  the smallest matched cosine, and the share of concepts whose top-8 crops (target allowed)
  are the same set on both devices.

Passes when the matched cosines are >= 0.99 and the top-8 sets agree for >= 90 % of concepts.
Prints one table and, last, one JSON line. Needs a CUDA device (exits 3 without one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _matched_cosines(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosines of the best one-to-one matching of the rows of ``a`` and ``b`` and the
    permutation ``p`` (row i of a <-> row p[i] of b)."""
    from scipy.optimize import linear_sum_assignment

    an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    cos = an @ bn.T
    r, c = linear_sum_assignment(-cos)
    order = np.empty(len(r), int)
    order[r] = c
    return cos[r, c], order


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", default=None, help="workspace home (default: a temp folder)")
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda",
                    help="the device compared with the CPU (cpu: a dry run of this script)")
    args = ap.parse_args()
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device; this check runs on a GPU machine", file=sys.stderr)
        return 3
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from data_index.catalog import Catalog, build_catalog
    from data_index.workspace import Workspace
    from demo_world.workspace import ensure_demo_workspace
    from explainer.concepts import explain_class, get_context

    home = Path(args.home or tempfile.mkdtemp(prefix="gpu_parity_"))
    t0 = time.perf_counter()
    ws = ensure_demo_workspace(home=home, device=dev)
    build_s = time.perf_counter() - t0
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else dev
    result: dict = {"device": name, "demo_build_s": round(build_s, 1)}

    # catalog: 64 images embedded on the CPU vs the CUDA-built rows
    cpu_ws = Workspace.create(home / "demo-cpu64", model=ws.model, layer=ws.layer,
                              images=str(ws.images_path), input_size=ws.input_size,
                              device="cpu")
    build_catalog(cpu_ws, device="cpu", limit=64)
    with Catalog.open(ws) as gpu_cat, Catalog.open(cpu_ws) as cpu_cat:
        n = cpu_cat.n_crops
        g = gpu_cat.store().rows(list(range(n))).astype(np.float32)
        c = cpu_cat.store().rows(list(range(n))).astype(np.float32)
        result["catalog_max_abs_diff"] = float(np.abs(g - c).max())
        result["catalog_rel_diff"] = float(np.abs(g - c).max() / max(np.abs(c).max(), 1e-12))
        gp = dict(gpu_cat._q("SELECT image_id, pred FROM images WHERE image_id < 64"))
        cp = dict(cpu_cat._q("SELECT image_id, pred FROM images"))
        result["catalog_same_pred"] = float(np.mean([gp[k] == v for k, v in cp.items()]))

    ctx_gpu = get_context(ws, dev)
    ctx_cpu = get_context(ws, "cpu")
    classes = [c for c, k in sorted(ctx_gpu.catalog.predicted_counts().items()) if k >= 4]
    rows = []
    for a in classes[: args.classes]:
        kw = dict(n_concepts=4, method="deeplift", solver="torch", cache=False, seed=0)
        t = time.perf_counter()
        eg = explain_class(ctx_gpu, a, device=dev, **kw)
        tg = time.perf_counter() - t
        t = time.perf_counter()
        ec = explain_class(ctx_cpu, a, device="cpu", **kw)
        tc = time.perf_counter() - t
        vg = np.stack([k.vector for k in eg.concepts])
        vc = np.stack([k.vector for k in ec.concepts])
        cos, order = _matched_cosines(vc, vg)
        same = [{r.crop_id for r in ec.concepts[i].crops} ==
                {r.crop_id for r in eg.concepts[order[i]].crops} for i in range(len(order))]
        rows.append({"class": int(a), "min_cos": float(cos.min()),
                     "same_top8": float(np.mean(same)), "cpu_s": round(tc, 2),
                     "cuda_s": round(tg, 2)})
    result["explain"] = rows
    min_cos = min(r["min_cos"] for r in rows)
    same8 = float(np.mean([r["same_top8"] for r in rows]))
    result["min_concept_cos"] = min_cos
    result["same_top8_share"] = same8
    result["pass"] = bool(min_cos >= 0.99 and same8 >= 0.9)

    print(f"# CPU vs CUDA parity on the demo world ({result['device']}); demo build on CUDA "
          f"{build_s:.1f} s")
    print(f"catalog (64 images): max |fp16 emb cpu - cuda| {result['catalog_max_abs_diff']:.2e} "
          f"(relative {result['catalog_rel_diff']:.2e}); same image predictions "
          f"{result['catalog_same_pred']:.3f}")
    print("| class | min matched concept cosine | same top-8 crops | cpu s | cuda s |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['class']} | {r['min_cos']:.5f} | {r['same_top8']:.2f} | {r['cpu_s']} | "
              f"{r['cuda_s']} |")
    print(f"parity {'PASS' if result['pass'] else 'FAIL'}: min cosine {min_cos:.5f} (>= 0.99), "
          f"same top-8 {same8:.2f} (>= 0.90)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
