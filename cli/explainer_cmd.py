"""Command line: ``python -m explainer {explain, contrast, evaluate} ... [--layer L]``.

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

from explainer.report import write_explanation
from explorer_core.errors import ExplorerError

from .args import CliParser, class_list, int_range, output_folder, positive_int, seed, workspace_arg
from .common import ProgressBar, open_workspace

__all__ = ["main", "write_explanation"]




MAX_CROPS_PER_CONCEPT = 100  # --m: each crop is decoded again and written as a PNG


def _layer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer", default=None,
                   help="one of the catalog's layers (default: its default layer; see "
                        "'python -m data_index status')")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", required=True, type=workspace_arg,
                   help="workspace name or folder")
    p.add_argument("--n", type=int_range(1, 10), default=4,
                   help="number of concepts (1..10, default 4)")
    p.add_argument("--method", default="deeplift",
                   choices=["deeplift", "grad_x_act", "deeplift_smoothgrad"])
    p.add_argument("--variant", default="paper", choices=["paper", "reference"])
    p.add_argument("--max-images", type=positive_int, default=500)
    p.add_argument("--seed", type=seed, default=0, help="0..2**32-1")
    p.add_argument("--m", type=int_range(1, MAX_CROPS_PER_CONCEPT), default=8,
                   help=f"crops per concept (1..{MAX_CROPS_PER_CONCEPT}, default 8)")
    p.add_argument("--solver", default="sklearn", choices=["sklearn", "torch"])
    p.add_argument("--device", default="auto")
    _layer_arg(p)
    p.add_argument("--clamp", action="store_true", help="clamp negative activations")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--exclude-target", action="store_true",
                   help="write the crops with target-class crops excluded")
    p.add_argument("--out", required=True, type=output_folder,
                   help="output folder (new, or an existing folder)")


def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(prog="python -m explainer",
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
    pt.add_argument("--workspace", required=True, type=workspace_arg)
    g = pt.add_mutually_exclusive_group()
    g.add_argument("--min-images", type=positive_int, default=3)
    g.add_argument("--every", type=positive_int, default=None,
                   help="every k-th eligible class (k >= 1)")
    g.add_argument("--classes", type=class_list, default=None,
                   help="comma-separated names or indices")
    pt.add_argument("--limit", type=positive_int, default=None,
                    help="seeded subset of this many classes (>= 1)")
    pt.add_argument("--n", type=int_range(1, 10), default=4)
    pt.add_argument("--method", default="grad_x_act",
                    choices=["deeplift", "grad_x_act", "deeplift_smoothgrad"])
    pt.add_argument("--max-images", type=positive_int, default=500)
    pt.add_argument("--seed", type=seed, default=0)
    pt.add_argument("--device", default="auto")
    _layer_arg(pt)
    pt.add_argument("--out", required=True, type=output_folder)
    sh = evs.add_parser("shift-test", help="hyperplane shifting over random class pairs")
    sh.add_argument("--workspace", required=True, type=workspace_arg)
    sh.add_argument("--pairs", type=positive_int, default=30,
                    help="class pairs (>= 1; at most all ordered pairs of eligible classes)")
    sh.add_argument("--seed", type=seed, default=0)
    sh.add_argument("--min-images", type=positive_int, default=3)
    sh.add_argument("--method", default="grad_x_act",
                    choices=["deeplift", "grad_x_act", "deeplift_smoothgrad"])
    sh.add_argument("--max-images", type=positive_int, default=500)
    sh.add_argument("--classifier-solver", default="sgd", choices=["sgd", "lbfgs"])
    sh.add_argument("--device", default="auto")
    _layer_arg(sh)
    sh.add_argument("--out", required=True, type=output_folder)
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
    import torch  # after the arguments are checked: a bad one fails in a fraction of a second

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))
    from explainer.concepts import explain_class, get_context

    if args.cmd in ("explain", "contrast"):
        ctx = get_context(open_workspace(args.workspace), args.device, args.layer)
        kw = dict(n_concepts=args.n, method=args.method, variant=args.variant,
                  max_images=args.max_images, seed=args.seed, m=args.m, solver=args.solver,
                  cache=not args.no_cache, clamp=args.clamp)
        with ProgressBar(args.cmd) as cb:
            if args.cmd == "explain":
                expl = explain_class(ctx, args.class_a, progress=cb, **kw)
            else:
                from explainer.contrast import contrast_classes

                expl = contrast_classes(ctx, args.a, args.b, progress=cb,
                                        classifier_solver=args.classifier_solver, **kw)
        for warning in expl.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        write_explanation(expl, args.out, ctx.lm, ctx.catalog, args.exclude_target)
        pt, pe = expl.prediction_test, expl.prediction_test_excluded
        print(f"wrote {args.out}: {expl.n_concepts} concepts from {len(expl.image_ids)} images; "
              f"prediction test allowed p={pt.prob_target if pt else float('nan'):.3f}, "
              f"excluded p={pe.prob_target if pe else float('nan'):.3f}")
        return 0
    from explainer.evaluation import evaluate_prediction_test, evaluate_shift_test

    with ProgressBar(args.what) as cb:
        if args.what == "prediction-test":
            res = evaluate_prediction_test(open_workspace(args.workspace), args.classes,
                                           min_images=args.min_images,
                                           every=args.every, limit=args.limit,
                                           n_concepts=args.n, method=args.method,
                                           max_images=args.max_images, seed=args.seed,
                                           device=args.device, progress=cb,
                                           layer=args.layer)
            csv_name, title = "per_class.csv", "Prediction test"
        else:
            res = evaluate_shift_test(open_workspace(args.workspace), args.pairs, seed=args.seed,
                                      min_images=args.min_images, method=args.method,
                                      max_images=args.max_images,
                                      classifier_solver=args.classifier_solver,
                                      device=args.device, progress=cb, layer=args.layer)
            csv_name, title = "per_pair.csv", "Shift test"
    _write_csv(res.rows, args.out / csv_name)
    _write_summary(res, args.out, title)
    print(json.dumps(res.summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except SystemExit as exc:  # the parser's one-line error (exit 2) or --help (exit 0)
        return exc.code if isinstance(exc.code, int) else 2
    except ExplorerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing --out failed after the checks (disk full, removed, ...)
        print(f"error: {exc}", file=sys.stderr)
        return 2
