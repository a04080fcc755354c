"""Command line: ``python -m explainer {explain, contrast, evaluate} ...``.

User errors (:class:`ExplorerError`) print ``error: <message>`` on stderr and exit 2, without a
traceback. Progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from explorer_core.errors import ExplorerError
from explorer_core.results import Explanation

from .common import open_workspace

__all__ = ["main", "write_explanation"]


def _bar(desc: str, total: int | None = None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty() and total is None)


def _stage_progress(desc: str) -> Any:
    bar = _bar(desc, 100)

    def cb(stage: str, frac: float) -> None:
        bar.set_description(f"{desc}: {stage}")
        bar.n = int(100 * frac)
        bar.refresh()
    return bar, cb


def _tick_progress(desc: str) -> Any:
    bar = _bar(desc, 1)

    def cb(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
    return bar, cb


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path)


def write_explanation(expl: Explanation, out: Path, lm: Any, catalog: Any,
                      exclude_target: bool = False) -> list[Path]:
    """Write ``explanation.json``, concept crop PNGs, the stitched images and ``summary.md``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "explanation.json"]
    (out / "explanation.json").write_text(json.dumps(expl.to_json(), indent=1))
    names = lm.class_names
    title = names[expl.class_a] + (f" vs {names[expl.class_b]}" if expl.class_b is not None
                                   else "")
    lines = [f"# {title}", "",
             f"Model `{expl.model}`, layer `{expl.layer}`, {len(expl.image_ids)} images, "
             f"n = {expl.n_concepts}, method `{expl.params.get('method')}`, "
             f"variant `{expl.params.get('variant')}`, seed {expl.params.get('seed')}; "
             f"NMF relative error {expl.reconstruction_error:.3f}.", ""]
    if expl.classifier is not None:
        c = expl.classifier
        lines += [f"Classifier ({c.solver}, label 1 = {names[c.class_a]}): training accuracy "
                  f"{c.accuracy:.3f} on {c.n_pixels_a} + {c.n_pixels_b} pixels.", ""]
        comp = expl.params.get("classifier_comparison")
        if comp:
            lines += ["| solver | accuracy | loss | seconds |", "|---|---|---|---|"]
            lines += [f"| {k} | {v['accuracy']:.3f} | {v['loss']:.4f} | {v['seconds']:.3f} |"
                      for k, v in comp.items()]
            lines.append("")
    for pt, tag in ((expl.prediction_test, "allowed"), (expl.prediction_test_excluded,
                                                         "excluded")):
        if pt is None:
            continue
        _save_png(pt.stitched, out / f"stitched_{tag}.png")
        written.append(out / f"stitched_{tag}.png")
        verdict = "PASSED" if pt.passed else "FAILED (do not trust this explanation)"
        lines.append(f"- Prediction test, target-class crops {tag}: p({names[pt.target]}) = "
                     f"{pt.prob_target:.3f}, predicted {names[pt.predicted]} -> {verdict}")
    lines.append("")
    for con in expl.concepts:
        crops = con.top_crops(exclude_target)
        d = out / f"concept_{con.index}"
        d.mkdir(exist_ok=True)
        pix = catalog.crop_pixels([c.crop_id for c in crops], lm)
        for j, p in enumerate(pix):
            arr = (p.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
            _save_png(arr, d / f"crop_{j}.png")
        lines.append(f"## Concept {con.index} (share {con.importance:.2f})")
        lines += [f"- crop {c.crop_id}: {Path(c.path).name} box {c.box}, cosine {c.score:.3f}, "
                  f"crop predicted {names[c.crop_pred] if c.crop_pred >= 0 else '?'}"
                  for c in crops]
        lines.append("")
    for w in expl.warnings:
        lines.append(f"> warning: {w}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    written.append(out / "summary.md")
    return written


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", required=True, help="workspace name or folder")
    p.add_argument("--n", type=int, default=4, help="number of concepts (1..10, default 4)")
    p.add_argument("--method", default="deeplift",
                   choices=["deeplift", "grad_x_act", "deeplift_smoothgrad"])
    p.add_argument("--variant", default="paper", choices=["paper", "reference"])
    p.add_argument("--max-images", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--m", type=int, default=8, help="crops per concept")
    p.add_argument("--solver", default="sklearn", choices=["sklearn", "torch"])
    p.add_argument("--device", default="auto")
    p.add_argument("--clamp", action="store_true", help="clamp negative activations")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--exclude-target", action="store_true",
                   help="write the crops with target-class crops excluded")
    p.add_argument("--out", required=True, type=Path)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m explainer",
                                 description="Concept explanations and class contrasting.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("explain", help="explain one class")
    ex.add_argument("--class", dest="class_a", required=True, help="class name or index")
    _common(ex)
    co = sub.add_parser("contrast", help="contrast class A against class B")
    co.add_argument("--a", required=True, help="class A (name or index)")
    co.add_argument("--b", required=True, help="class B (name or index)")
    co.add_argument("--classifier-solver", default="sgd", choices=["sgd", "lbfgs"])
    _common(co)
    ev = sub.add_parser("evaluate", help="evaluations over many classes")
    evs = ev.add_subparsers(dest="what", required=True)
    pt = evs.add_parser("prediction-test", help="stitched-crops test over classes")
    pt.add_argument("--workspace", required=True)
    g = pt.add_mutually_exclusive_group()
    g.add_argument("--min-images", type=int, default=3)
    g.add_argument("--every", type=int, default=None, help="every k-th eligible class")
    g.add_argument("--classes", default=None, help="comma-separated names or indices")
    pt.add_argument("--limit", type=int, default=None, help="seeded subset of this many classes")
    pt.add_argument("--n", type=int, default=4)
    pt.add_argument("--method", default="grad_x_act",
                    choices=["deeplift", "grad_x_act", "deeplift_smoothgrad"])
    pt.add_argument("--max-images", type=int, default=500)
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--device", default="auto")
    pt.add_argument("--out", required=True, type=Path)
    sh = evs.add_parser("shift-test", help="hyperplane shifting over random class pairs")
    sh.add_argument("--workspace", required=True)
    sh.add_argument("--pairs", type=int, default=30)
    sh.add_argument("--seed", type=int, default=0)
    sh.add_argument("--min-images", type=int, default=3)
    sh.add_argument("--method", default="grad_x_act",
                    choices=["deeplift", "grad_x_act", "deeplift_smoothgrad"])
    sh.add_argument("--max-images", type=int, default=500)
    sh.add_argument("--classifier-solver", default="sgd", choices=["sgd", "lbfgs"])
    sh.add_argument("--device", default="auto")
    sh.add_argument("--out", required=True, type=Path)
    return ap


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _write_summary(res: Any, out: Path, title: str) -> None:
    (out / "summary.json").write_text(json.dumps({"summary": res.summary, "params": res.params,
                                                  "seconds": res.seconds}, indent=1))
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    for k, v in res.summary.items():
        if isinstance(v, list):
            v = ", ".join(f"{x:.3f}" for x in v)
        elif isinstance(v, float):
            v = f"{v:.3f}"
        arrow = " (higher is better)" if k in res.higher_is_better else ""
        lines.append(f"| {k}{arrow} | {v} |")
    lines += ["", "Parameters: " + ", ".join(f"{k}={v}" for k, v in res.params.items()), ""]
    (out / "summary.md").write_text("\n".join(lines))


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))
    from explainer.concepts import explain_class, get_context

    if args.cmd in ("explain", "contrast"):
        ctx = get_context(open_workspace(args.workspace), args.device)
        kw = dict(n_concepts=args.n, method=args.method, variant=args.variant,
                  max_images=args.max_images, seed=args.seed, m=args.m, solver=args.solver,
                  cache=not args.no_cache, clamp=args.clamp)
        bar, cb = _stage_progress(args.cmd)
        try:
            if args.cmd == "explain":
                expl = explain_class(ctx, args.class_a, progress=cb, **kw)
            else:
                from explainer.contrast import contrast_classes

                expl = contrast_classes(ctx, args.a, args.b, progress=cb,
                                        classifier_solver=args.classifier_solver, **kw)
        finally:
            bar.close()
        for warning in expl.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        write_explanation(expl, args.out, ctx.lm, ctx.catalog, args.exclude_target)
        pt, pe = expl.prediction_test, expl.prediction_test_excluded
        print(f"wrote {args.out}: {expl.n_concepts} concepts from {len(expl.image_ids)} images; "
              f"prediction test allowed p={pt.prob_target if pt else float('nan'):.3f}, "
              f"excluded p={pe.prob_target if pe else float('nan'):.3f}")
        return 0
    from explainer.evaluation import evaluate_prediction_test, evaluate_shift_test

    bar, cb = _tick_progress(args.what)
    try:
        if args.what == "prediction-test":
            classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
            res = evaluate_prediction_test(open_workspace(args.workspace), classes,
                                           min_images=args.min_images,
                                           every=args.every, limit=args.limit,
                                           n_concepts=args.n, method=args.method,
                                           max_images=args.max_images, seed=args.seed,
                                           device=args.device, progress=cb)
            csv_name, title = "per_class.csv", "Prediction test"
        else:
            res = evaluate_shift_test(open_workspace(args.workspace), args.pairs, seed=args.seed,
                                      min_images=args.min_images, method=args.method,
                                      max_images=args.max_images,
                                      classifier_solver=args.classifier_solver,
                                      device=args.device, progress=cb)
            csv_name, title = "per_pair.csv", "Shift test"
    finally:
        bar.close()
    _write_csv(res.rows, args.out / csv_name)
    _write_summary(res, args.out, title)
    print(json.dumps(res.summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except ExplorerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
