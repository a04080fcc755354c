"""Ground-truth figures of the method on the demo world, concepts vs a random-crops baseline.

    python bench/bench_demo_groundtruth.py [--home DIR] [--methods deeplift,grad_x_act]
                                           [--shift-pairs 6] [--shift-images 32] [--random 8]

Builds (or reopens) the ``demo`` workspace under ``--home`` (default: $DEMO_WORKSPACE_HOME or
a temporary folder), explains every class with the app's defaults (n=4, top-8 crops, target
class allowed) for each attribution method, and prints, per method:

1. purity per class (share of a concept's 8 crops whose dominant ground-truth concept is the
   concept's majority; mean over the 4 concepts) with the majority concepts, vs random catalog
   crops and random crops of the class's own images; purity with target-class crops excluded;
2. coverage of the defining parts (n=4, and n = parts + 1), vs random crop sets;
3. prediction test pass rate / mean P(target) (allowed and excluded) vs stitched random crops;
4. the planted shortcut: contrast lupo vs husko, the grass concept's purity and the patch
   insertion margins (grass crop vs control, vs random crops as patches), also husko vs lupo
   with snow;
5. the shift test over seeded pairs (incl. lupo/husko both ways) vs a random direction.
These are the figures of the closing note of issue #4; tests/test_demo_groundtruth.py asserts
bounds on the deeplift ones.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo_world import groundtruth as gt  # noqa: E402
from demo_world import world  # noqa: E402
from demo_world.workspace import ensure_demo_workspace  # noqa: E402
from explainer.concepts import attribute_classes, class_images, explain_class, get_context  # noqa: E402
from explainer.contrast import contrast_classes, pair_classifier  # noqa: E402
from explainer.evaluation import random_pairs  # noqa: E402
from explainer.faithfulness import shift_test  # noqa: E402

CLASSES = world.CLASSES


def short(name: str) -> str:
    return name.replace("part_", "").replace("_", " ")


def section(title: str) -> None:
    print(f"\n## {title}\n")


def purity_block(ctx, method: str, exps: dict, truths: dict) -> dict:
    cat = ctx.catalog
    rand_all = float(np.mean([gt.boxes_truth(cat.crop_refs(cat.random_crop_ids(8, seed=s))).share
                              for s in range(200)]))
    print("| class | purity | purity excl. | random (own images) | majority concepts |")
    print("|---|---|---|---|---|")
    rows = {}
    for i, c in enumerate(CLASSES):
        p = gt.explanation_purity(truths[c])
        pe = gt.explanation_purity(gt.explanation_truth(exps[c], exclude_target=True))
        paths = gt.gallery_paths(cat, cat.images_predicted_as(i))
        pr = float(np.mean([gt.boxes_truth(gt.random_boxes(paths, 8, s)).share
                            for s in range(20)]))
        rows[c] = (p, pe, pr)
        maj = ", ".join(f"{short(t.name)} {t.count(t.majority)}/8" for t in truths[c])
        print(f"| {c} | {p:.3f} | {pe:.3f} | {pr:.3f} | {maj} |")
    m = np.mean([r[0] for r in rows.values()])
    me = np.mean([r[1] for r in rows.values()])
    mr = np.mean([r[2] for r in rows.values()])
    print(f"| **mean** | **{m:.3f}** | {me:.3f} | {mr:.3f} | random catalog crops: "
          f"{rand_all:.3f} |")
    return {"purity": m, "purity_excl": me, "random_own": mr, "random_all": rand_all}


def coverage_block(ctx, method: str, truths: dict, counts: dict) -> dict:
    cat = ctx.catalog
    print("Gallery crops dominated by each part (k = 20 to be counted): " + ", ".join(
        f"{short(p)} {counts.get(p, 0)}" for p in sorted(world.PARTS)))
    print()
    print("| class | parts found (n=4) | missing (n=4) | n=parts+1 missing | random sets |")
    print("|---|---|---|---|---|")
    cov4, covp, covr = [], [], []
    for i, c in enumerate(CLASSES):
        parts = gt.coverable_parts(c, counts, 20)
        found = gt.class_coverage(truths[c], parts)
        n_big = len(world.CLASS_PARTS[c]) + 1
        tb = gt.explanation_truth(explain_class(ctx, c, n_concepts=n_big, method=method,
                                                device="cpu"))
        found_big = gt.class_coverage(tb, parts)
        paths = gt.gallery_paths(cat, cat.images_predicted_as(i))
        rsets = [gt.boxes_truth(gt.random_boxes(paths, 8, 1000 + 10 * i + k)) for k in range(4)]
        rfound = gt.class_coverage(rsets, parts)
        cov4.append(all(found.values()))
        covp.append(all(found_big.values()))
        covr.append(all(rfound.values()))
        miss = [short(p) for p, ok in found.items() if not ok] or ["-"]
        missb = [short(p) for p, ok in found_big.items() if not ok] or ["-"]
        print(f"| {c} | {sum(found.values())}/{len(parts)} | {', '.join(miss)} | "
              f"(n={n_big}) {', '.join(missb)} | {sum(rfound.values())}/{len(parts)} |")
    print(f"| **classes fully covered** | **{sum(cov4)}/10** | | {sum(covp)}/10 | "
          f"{sum(covr)}/10 |")
    return {"coverage": float(np.mean(cov4)), "coverage_big_n": float(np.mean(covp)),
            "coverage_random": float(np.mean(covr))}


def prediction_block(ctx, exps: dict, n_random: int) -> dict:
    rnd = [r for i in range(len(CLASSES))
           for r in gt.random_prediction_tests(ctx.lm, ctx.catalog, i, 4, n_random, seed=0)]
    pa = [e.prediction_test for e in exps.values()]
    pe = [e.prediction_test_excluded for e in exps.values()]
    print("| crops | pass rate | mean P(target) |")
    print("|---|---|---|")
    for name, rs in (("concept top-1, allowed", pa), ("concept top-1, excluded", pe),
                     (f"random catalog crops ({n_random}/class)", rnd)):
        print(f"| {name} | {np.mean([r.passed for r in rs]):.0%} | "
              f"{np.mean([r.prob_target for r in rs]):.3f} |")
    failed = [CLASSES[r.target] for r in pa + pe if not r.passed]
    if failed:
        print(f"\nfailed: {failed}")
    return {"pt_allowed": float(np.mean([r.passed for r in pa])),
            "pt_excluded": float(np.mean([r.passed for r in pe])),
            "pt_random": float(np.mean([r.passed for r in rnd]))}


def shortcut_block(ctx, method: str, n_random: int) -> dict:
    out = {}
    print("| contrast (A vs B) | background | concept (share) | crop | ΔP(A) patch | ΔP(A) control "
          "| margin | images up | random patches: mean margin (their ground truth) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for a, b, bg in (("lupo", "husko", "bg_grass"), ("husko", "lupo", "bg_snow")):
        ex = contrast_classes(ctx, a, b, method=method, device="cpu")
        ib = class_images(ctx, CLASSES.index(b), 500, 0)
        chk = gt.shortcut_check(ctx, ex, ctx.catalog.image_pixels(ib, ctx.lm), ib,
                                background=bg, n_random=n_random, seed=0)
        names = ", ".join(short(n) for n in chk.random_concepts)
        rgrass = [r.margin for r, n in zip(chk.random, chk.random_concepts) if n == bg]
        rother = [r.margin for r, n in zip(chk.random, chk.random_concepts) if n != bg]
        if chk.patch is None:
            print(f"| {a} vs {b} | {bg} | not found: "
                  f"{[t.name for t in gt.explanation_truth(ex)]} | | | | | | "
                  f"{chk.random_margin:+.4f} |")
        else:
            p = chk.patch
            print(f"| {a} vs {b} | {bg} | {chk.concept + 1} ({chk.share:.0%}) | {chk.crop_id} | "
                  f"{p.delta_a:+.4f} | {p.control_delta_a:+.4f} | **{p.margin:+.4f}** | "
                  f"{p.share_up:.0%} of {p.n_images} | {chk.random_margin:+.4f} ({names}; "
                  f"{bg} ones {np.mean(rgrass) if rgrass else float('nan'):+.4f}, others "
                  f"{np.mean(rother) if rother else float('nan'):+.4f}) |")
        out[f"{a}_vs_{b}"] = chk
        print(f"<!-- contrast {a} vs {b}: prediction test "
              f"{'pass' if ex.prediction_test.passed else 'FAIL'} "
              f"P={ex.prediction_test.prob_target:.3f}; classifier acc "
              f"{ex.classifier.accuracy:.3f} -->")
    return out


def shift_block(ctx, method: str, n_pairs: int, n_images: int) -> dict:
    fixed = [(0, 1), (1, 0)]
    pairs = fixed + [p for p in random_pairs(range(len(CLASSES)), n_pairs + 2, 0)
                     if p not in fixed][: max(n_pairs - 2, 0)]
    print("| A | B | default P(A) | max P(A) | best t | random direction max P(A) |")
    print("|---|---|---|---|---|---|")
    got, rnd = [], []
    for a, b in pairs:
        clf = pair_classifier(ctx, a, b, method=method)
        ids = class_images(ctx, b, n_images, 0)
        pix = ctx.catalog.image_pixels(ids, ctx.lm)
        r = shift_test(ctx.lm, ctx.layer, pix, clf.weight, a, b, image_ids=ids)
        rr = shift_test(ctx.lm, ctx.layer, pix, gt.random_direction(clf.weight, a * 10 + b), a, b)
        got.append(r.max_prob_a)
        rnd.append(rr.max_prob_a)
        print(f"| {CLASSES[a]} | {CLASSES[b]} | {r.default_prob_a:.3f} | {r.max_prob_a:.3f} | "
              f"{r.best_offset:g} | {rr.max_prob_a:.3f} |")
    print(f"| **mean** | | | **{np.mean(got):.3f}** ({sum(g >= 0.9 for g in got)}/{len(got)} "
          f">= 0.9) | | {np.mean(rnd):.3f} |")
    return {"shift_mean_max": float(np.mean(got)), "shift_random": float(np.mean(rnd))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", default=os.environ.get("DEMO_WORKSPACE_HOME"))
    ap.add_argument("--methods", default="deeplift,grad_x_act")
    ap.add_argument("--shift-pairs", type=int, default=6)
    ap.add_argument("--shift-images", type=int, default=32)
    ap.add_argument("--random", type=int, default=8,
                    help="random crops per baseline (patches; stitches per class)")
    args = ap.parse_args()
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="demo_gt_"))
    t0 = time.perf_counter()
    ws = ensure_demo_workspace(home=home, device="cpu")
    ctx = get_context(ws, "cpu")
    print(f"# Demo world ground truth ({ctx.catalog.n_images} gallery images, "
          f"{ctx.catalog.n_crops} crops, layer {ctx.layer}; workspace ready in "
          f"{time.perf_counter() - t0:.0f}s)")
    counts = gt.concept_crop_counts(gt.gallery_paths(ctx.catalog))
    summary = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        t = time.perf_counter()
        attribute_classes(ctx, list(range(len(CLASSES))), method=method)
        exps = {c: explain_class(ctx, c, method=method, device="cpu") for c in CLASSES}
        truths = {c: gt.explanation_truth(e) for c, e in exps.items()}
        print(f"\n# method `{method}` (10 explanations in {time.perf_counter() - t:.0f}s)")
        section("Concept purity (top-8 crops, n=4)")
        s = purity_block(ctx, method, exps, truths)
        section("Coverage of the defining parts")
        s.update(coverage_block(ctx, method, truths, counts))
        section("Prediction test (4 stitched crops)")
        s.update(prediction_block(ctx, exps, args.random))
        section("Planted shortcut: contrast and patch insertion (bottom-right, mean-colour control)")
        chk = shortcut_block(ctx, method, args.random)
        lh = chk["lupo_vs_husko"]
        s.update({"grass_share": lh.share, "patch_margin": lh.patch.margin if lh.patch else
                  float("nan"), "patch_random": lh.random_margin})
        section(f"Shift test ({args.shift_images} images of B, paper offsets)")
        s.update(shift_block(ctx, method, args.shift_pairs, args.shift_images))
        summary[method] = s
        print(f"\n({method}: {time.perf_counter() - t:.0f}s)")

    section("Summary: concepts vs random baseline")
    meths = list(summary)
    print("| figure | " + " | ".join(meths) + " | random baseline (" + meths[0] + ") |")
    print("|---|" + "---|" * (len(meths) + 1))
    rows = [("mean purity", "purity", "random_all", "{:.3f}"),
            ("mean purity vs own-image random crops", "purity", "random_own", "{:.3f}"),
            ("classes fully covered (n=4)", "coverage", "coverage_random", "{:.0%}"),
            ("classes fully covered (n=parts+1)", "coverage_big_n", "coverage_random", "{:.0%}"),
            ("prediction test pass (allowed)", "pt_allowed", "pt_random", "{:.0%}"),
            ("prediction test pass (excluded)", "pt_excluded", "pt_random", "{:.0%}"),
            ("lupo vs husko: grass concept share", "grass_share", None, "{:.0%}"),
            ("grass patch margin ΔP(lupo) - control", "patch_margin", "patch_random", "{:+.4f}"),
            ("shift: mean max P(A)", "shift_mean_max", "shift_random", "{:.3f}")]
    for label, key, rkey, fmt in rows:
        vals = " | ".join(fmt.format(summary[m][key]) for m in meths)
        base = fmt.format(summary[meths[0]][rkey]) if rkey else "-"
        print(f"| {label} | {vals} | {base} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
