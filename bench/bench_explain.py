"""Explanation timing and the full evaluation on EfficientNet-Lite0 (CPU by default).

    python bench/bench_explain.py --workspace WS [--classes 3] [--images 50] [--skip-eval]

WS: a built lite0 workspace (``python -m data_index build --workspace WS --model
efficientnet_lite0 --layer bn2 --images ../shared/data``). Prints

1. per-class explanation time, cold (attribution + NMF + search + test, nothing cached) and
   cached (second call), for classes with the most predicted images (at most ``--images``);
2. the full prediction-test table (allowed / excluded / random crops) over all classes with
   >= 3 predicted images, n = 4, grad_x_act, and the shift test over 30 seeded random pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explainer.concepts import ExplainContext, explain_class  # noqa: E402
from explainer.evaluation import evaluate_prediction_test, evaluate_shift_test  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--method", default="deeplift")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="evaluate a seeded subset of classes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ctx = ExplainContext.open(args.workspace, "cpu")
    # a private cache folder so "cold" is really cold
    tmp = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    ctx.ws = dataclasses.replace(ctx.ws, root=tmp)  # cache_dir = tmp/cache; catalog stays
    counts = ctx.catalog.predicted_counts()
    top = sorted(counts, key=lambda c: (-counts[c], c))[:args.classes]
    print("| class | images | method | cold s | attribution | nmf | crops | test | cached s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in top:
        t = time.perf_counter()
        e = explain_class(ctx, c, method=args.method, max_images=args.images)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        explain_class(ctx, c, method=args.method, max_images=args.images)
        warm = time.perf_counter() - t
        tm = e.timings
        print(f"| {ctx.lm.class_names[c]} | {len(e.image_ids)} | {args.method} | {cold:.2f} | "
              f"{tm['attribution']:.2f} | {tm['nmf']:.2f} | {tm['crops']:.2f} | "
              f"{tm['prediction_test']:.2f} | {warm:.3f} |")
    # the shared photos give at most ~10 images per class: time the same stages on the first
    # --images catalog images attributed towards one class, as a class of that size would be
    from explainer.attribution import attribute, pixel_scores, scale_by_scores
    from explainer.concepts import explanation_from_activations

    ids = ctx.catalog.image_ids()[:args.images]
    t = time.perf_counter()
    pix = ctx.catalog.image_pixels(ids, ctx.lm)
    acts, attr = attribute(ctx.lm, pix, ctx.layer, [top[0]] * len(ids), args.method)
    t_attr = time.perf_counter() - t
    tm: dict[str, float] = {}
    t = time.perf_counter()
    e = explanation_from_activations(ctx, scale_by_scores(acts, pixel_scores(attr)), ids,
                                     class_a=top[0], class_b=None, n=4, m=8, solver="sklearn",
                                     seed=0, params={}, warnings=[], timings=tm)
    rest = time.perf_counter() - t
    print(f"| {len(ids)} images as {ctx.lm.class_names[top[0]]} | {len(ids)} | {args.method} | "
          f"{t_attr + rest:.2f} | {t_attr:.2f} | {tm['nmf']:.2f} | {tm['crops']:.2f} | "
          f"{tm['prediction_test']:.2f} | (n/a) |")
    if args.skip_eval:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    t = time.perf_counter()
    pt = evaluate_prediction_test(ctx, min_images=3, limit=args.limit, n_concepts=4,
                                  method="grad_x_act")
    t_pt = time.perf_counter() - t
    t = time.perf_counter()
    sh = evaluate_shift_test(ctx, 30, seed=0, min_images=3, method="grad_x_act")
    t_sh = time.perf_counter() - t
    s = pt.summary
    print(f"\nPrediction test, {s['n_classes']} classes (>= 3 images), n=4, grad_x_act, "
          f"{t_pt:.0f} s")
    print("| crops | mean prob | hit rate |\n|---|---|---|")
    for cond in ("allowed", "excluded", "random"):
        print(f"| {cond} | {s[f'mean_prob_{cond}']:.3f} | {100 * s[f'hit_rate_{cond}']:.1f} % |")
    s = sh.summary
    print(f"\nShift test, {s['n_pairs']} pairs, {t_sh:.0f} s: default p(A) "
          f"{s['mean_default_prob_a']:.4f}, max-shifted {s['mean_max_prob_a']:.4f}, "
          f"classifier accuracy {s['mean_accuracy']:.3f}")
    print("| offset | " + " | ".join(f"{o:g}" for o in s["offsets"]) + " |")
    print("|---" * (len(s["offsets"]) + 1) + "|")
    print("| mean p(A) | " + " | ".join(f"{v:.3f}" for v in s["mean_prob_a_per_offset"]) + " |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
