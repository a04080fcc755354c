"""The samples sweep (paper Fig. 11) on a larger demo world: the shared photos have only a few
images per class, so the dependence on the number of images per class is measured here.

Generates the demo world's gallery with ``--per-class`` images per class (default 450) under
``--home``, builds a two-layer catalog (``layer3.relu_out``, ``layer4.relu_out``) and runs
``explainer.sweep.run_sweep`` over samples x n, ours (DeepLift, gradient x activation) vs CRAFT
vs random, all 10 classes; prints the summary table (excluded and allowed) and writes the sweep
to ``<home>/sweep-demo-samples/sweeps/samples``. Resumable (a finished world, catalog or sweep
rows are reused).

    python bench/sweep_demo_samples.py --home /work/cache/sweep-demo
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_index.catalog import Catalog, build_catalog  # noqa: E402
from data_index.workspace import Workspace  # noqa: E402
from demo_world.workspace import ensure_demo_world  # noqa: E402
from explainer.sweep import SweepSpec, run_sweep, sweep_folder  # noqa: E402
from explorer_core.demo_cnn import DEMO_INPUT_SIZE  # noqa: E402
from explorer_core.errors import ExplorerError  # noqa: E402

LAYERS = ("layer3.relu_out", "layer4.relu_out")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--per-class", type=int, default=450)
    ap.add_argument("--samples", default="25,50,100,200,400")
    ap.add_argument("--n", default="2,4,8")
    args = ap.parse_args()
    root = args.home / "sweep-demo-samples"
    t = time.perf_counter()
    gallery = ensure_demo_world(root / "world", n_per_class=args.per_class)
    ws = Workspace.create(root, model="demo", layers=list(LAYERS), layer=LAYERS[1],
                          images=str(gallery.relative_to(root)), input_size=DEMO_INPUT_SIZE,
                          mode="crop", seed=0, device="cpu")
    try:
        Catalog.open(ws).close()
    except ExplorerError:
        build_catalog(ws, device="cpu")
    print(f"world + catalog: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    spec = SweepSpec(layers=LAYERS, n=tuple(int(x) for x in args.n.split(",")),
                     samples=tuple(int(x) for x in args.samples.split(",")),
                     methods=("deeplift", "grad_x_act"), baselines=("craft", "random"))
    t = time.perf_counter()
    res = run_sweep(ws, spec, sweep_folder(ws, "samples"), device="cpu")
    print(f"sweep: {time.perf_counter() - t:.0f} s, {len(res.rows)} rows, "
          f"{len(res.record['classes'])} classes; warnings: {res.warnings}", file=sys.stderr)
    print("| layer | n | method | condition | " +
          " | ".join(f"samples {s}" for s in spec.samples) + " |")
    print("|---|---|---|---|" + "---|" * len(spec.samples))
    cells: dict[tuple, dict[int, str]] = {}
    for r in res.summary:
        if r["mean_prob"] is None:
            continue
        key = (r["layer"], r["n"], r["method"], r["condition"])
        cells.setdefault(key, {})[r["samples"]] = f"{r['mean_prob']:.2f} / {r['hit_rate']:.0%}"
    for key in sorted(cells, key=lambda k: (k[3], k[0], k[1], k[2])):
        print("| " + " | ".join(str(k) for k in key) + " | " +
              " | ".join(cells[key].get(s, "") for s in spec.samples) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
