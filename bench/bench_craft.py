"""Ours vs the CRAFT baseline vs random crops on the stitched prediction test, and CRAFT's cost.

    python bench/bench_craft.py [--home DIR] [--max-images 30,120] [--n 4]
                                [--lite0 WS] [--time-images 8] [--device cpu]

1. Demo world (``--home``, default $DEMO_WORKSPACE_HOME or a temporary folder), all 10
   classes, for each ``--max-images``: mean P(A) and hit rate of the stitched top-1 crops,
   target crops allowed and excluded, for ours (``explain_class``, deeplift), CRAFT
   (``craft_concepts``, patches resized to the input as in the reference), CRAFT with patches at
   native size (``resize_patches=False``: not CRAFT, measures the scale mismatch between
   CRAFT's upscaled patches and the catalog's native-size crops) and random crops
   (``random_concepts``, the evaluation's random draw). tests/test_craft.py asserts the
   ordering at 30 images.
2. Time per image of CRAFT's patch encoding (16 patches, each resized to the input) and of our
   attribution (deeplift), on the demo model and, with ``--lite0`` (default
   $LITE0_WORKSPACE), on EfficientNet-Lite0 at 224 px.

Nothing is written to the workspaces (every cache is off).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo_world.workspace import ensure_demo_workspace  # noqa: E402
from explainer.concepts import (  # noqa: E402
    attribute_classes,
    class_attributions,
    explain_class,
    get_context,
)
from explainer.craft import craft_activations, craft_concepts, random_concepts  # noqa: E402


def row(name: str, expls: list) -> str:
    v = np.asarray([(e.prediction_test.prob_target, e.prediction_test.passed,
                     e.prediction_test_excluded.prob_target, e.prediction_test_excluded.passed)
                    for e in expls], float).mean(axis=0)
    return f"| {name} | {v[0]:.3f} / {v[1]:.0%} | {v[2]:.3f} / {v[3]:.0%} |"


def compare(ctx, max_images: int, n: int) -> None:
    classes = list(range(ctx.lm.num_classes))
    print(f"\n## demo world, {len(classes)} classes, n={n}, max_images={max_images}\n")
    t = time.perf_counter()
    attrs = attribute_classes(ctx, classes, method="deeplift", max_images=max_images,
                              cache=False)
    del attrs  # explain_class below recomputes (cache off); this times the batched pass
    t_attr = time.perf_counter() - t
    out: dict[str, list] = {"ours (deeplift)": [], "CRAFT": [], "CRAFT, native-size patches": [],
                            "random crops": []}
    t_craft = 0.0
    n_images = 0
    for c in classes:
        out["ours (deeplift)"].append(explain_class(ctx, c, n_concepts=n, method="deeplift",
                                                    max_images=max_images, cache=False))
        t = time.perf_counter()
        e = craft_concepts(ctx, c, n_concepts=n, max_images=max_images, cache=False)
        t_craft += time.perf_counter() - t
        n_images += len(e.image_ids)
        out["CRAFT"].append(e)
        out["CRAFT, native-size patches"].append(craft_concepts(
            ctx, c, n_concepts=n, max_images=max_images, cache=False, resize_patches=False))
        out["random crops"].append(random_concepts(ctx, c, n, 0))
    print("| method | allowed: P(A) / hit | excluded: P(A) / hit |")
    print("|---|---|---|")
    for name, expls in out.items():
        print(row(name, expls))
    print(f"\n{n_images} images; ours' attribution {t_attr / n_images * 1000:.1f} ms/image, "
          f"CRAFT (encoding + NMF + search + test) {t_craft / n_images * 1000:.1f} ms/image")


def timing(ctx, cls: int, k: int, label: str) -> None:
    torch.manual_seed(0)
    t = time.perf_counter()
    entry = craft_activations(ctx, cls, max_images=k, cache=False)
    t_craft = time.perf_counter() - t
    k = len(entry["image_ids"])
    P = len(entry["boxes"])
    t = time.perf_counter()
    class_attributions(ctx, cls, method="deeplift", max_images=k, cache=False)
    t_ours = time.perf_counter() - t
    S = ctx.lm.input_size
    print(f"| {label} | {S} | {P} | {t_craft / k:.3f} | {t_craft / (k * P) * 1000:.1f} | "
          f"{t_ours / k:.3f} | {t_craft / k * 500 / 60:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", default=os.environ.get("DEMO_WORKSPACE_HOME"))
    ap.add_argument("--max-images", default="30,120")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--lite0", default=os.environ.get("LITE0_WORKSPACE"))
    ap.add_argument("--time-images", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()) if args.device == "cpu"
                          else torch.get_num_threads())
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="demo_home"))
    ctx = get_context(ensure_demo_workspace(home=home, device=args.device), args.device)
    for k in (int(v) for v in args.max_images.split(",")):
        compare(ctx, k, args.n)
    print(f"\n## time per image ({args.device}, {torch.get_num_threads()} threads)\n")
    print("| model | input px | patches/image | CRAFT s/image | ms/patch | ours (deeplift) "
          "s/image | CRAFT min per 500-image class |")
    print("|---|---|---|---|---|---|---|")
    timing(ctx, 0, max(args.time_images, 32), "demo")
    if args.lite0:
        lctx = get_context(args.lite0, args.device)
        counts = lctx.catalog.predicted_counts()
        big = max(counts, key=lambda c: counts[c])
        timing(lctx, big, args.time_images, f"{lctx.lm.spec} {lctx.layer}")


if __name__ == "__main__":
    main()
