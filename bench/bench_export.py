"""Size and time of a run's export (explainer/export.py) on the demo workspace.

    python bench/bench_export.py [--home DEMO_HOME] [--cls lupo] [--n 4] [--heatmap-images 4]

Explains the class (the app's defaults: deeplift, n = 4, up to 500 images, m = 8; cached in the
workspace after the first call), then times the self-contained HTML report and the zip of the
CLI's files three times each and prints a table (best of three, sizes in KiB).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo_world.workspace import ensure_demo_workspace  # noqa: E402
from explainer.concepts import explain_class, get_context  # noqa: E402
from explainer.export import explanation_html, explanation_zip  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", default=None, help="demo workspace home (default: a temp folder)")
    ap.add_argument("--cls", default="lupo")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--heatmap-images", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="bench_export_"))
    ctx = get_context(ensure_demo_workspace(home=home, device="cpu"), "cpu")
    expl = explain_class(ctx, args.cls, n_concepts=args.n, cache=True)
    params = {"class": args.cls, "n_concepts": args.n}
    rows = []
    for what, fn in (("HTML report", lambda: explanation_html(
                        expl, ctx.lm, ctx.catalog, params=params,
                        n_heatmap_images=args.heatmap_images).encode()),
                     ("zip (CLI files)", lambda: explanation_zip(expl, ctx.lm, ctx.catalog,
                                                                 params=params))):
        best, size = float("inf"), 0
        for _ in range(3):
            t0 = time.perf_counter()
            size = len(fn())
            best = min(best, time.perf_counter() - t0)
        rows.append((what, size / 1024, best))
    print(f"demo workspace, class {args.cls}: {len(expl.image_ids)} images, {expl.n_concepts} "
          f"concepts x {len(expl.concepts[0].crops)} crops, heatmaps over "
          f"{args.heatmap_images} images")
    print("| export | size KiB | seconds (best of 3) |")
    print("|---|---|---|")
    for what, kib, s in rows:
        print(f"| {what} | {kib:.0f} | {s:.3f} |")


if __name__ == "__main__":
    main()
