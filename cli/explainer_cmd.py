"""Command line: ``python -m explainer {explain, contrast, synthesize, evaluate, sweep,
precompute, export} ... [--layer L]``.

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
from explorer_core.trust import user_code_allowed

from .args import (
    CliParser,
    choice_list,
    class_list,
    int_list,
    int_range,
    name_list,
    output_file,
    output_folder,
    positive_int,
    seed,
    workspace_arg,
)
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
    _add_synthesize(sub)
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
    _add_sweep(sub)
    _add_precompute(sub)
    _add_export(sub)
    return ap


def _add_sweep(sub: Any) -> None:
    sw = sub.add_parser("sweep", help="the paper's sweeps: layers x n x samples x methods, with "
                        "the CRAFT and random baselines (resumable)")
    sw.add_argument("--workspace", required=True, type=workspace_arg,
                    help="workspace name or folder")
    sw.add_argument("--layers", type=name_list, default=None,
                    help="comma-separated catalog layers (default: the default layer)")
    sw.add_argument("--n", type=int_list(1, 10), default=[1, 2, 4, 6, 8, 10],
                    help="numbers of concepts, comma-separated, each in 1..10 (default "
                         "1,2,4,6,8,10)")
    sw.add_argument("--samples", type=int_list(1), default=[500],
                    help="images per class, comma-separated, each >= 1 (default 500)")
    sw.add_argument("--methods", type=choice_list(METHODS, allow_empty=True),
                    default=["deeplift", "grad_x_act"],
                    help=f"attribution methods of ours, comma-separated, out of "
                         f"{', '.join(METHODS)}, or none (default deeplift,grad_x_act)")
    sw.add_argument("--baselines", type=choice_list(("craft", "random"), allow_empty=True),
                    default=["craft", "random"],
                    help="baselines, comma-separated, out of craft, random, or none (default "
                         "both)")
    g = sw.add_mutually_exclusive_group()
    g.add_argument("--classes", type=class_list, default=None,
                   help="comma-separated class names or indices")
    g.add_argument("--limit", type=positive_int, default=None,
                   help="a seeded choice of this many classes (>= 1) among those with at least "
                        "--min-images predicted images")
    sw.add_argument("--min-images", type=positive_int, default=3,
                    help="classes with at least this many predicted images (default 3)")
    sw.add_argument("--seed", type=seed, default=0, help="0..2**32-1")
    sw.add_argument("--solver", default="sklearn", choices=["sklearn", "torch"])
    sw.add_argument("--clamp", action="store_true",
                    help="clamp negative activations (layers with negative outputs)")
    sw.add_argument("--no-png", action="store_true", help="figures as HTML only")
    sw.add_argument("--device", default="auto")
    sw.add_argument("--out", required=True, type=output_folder,
                    help="output folder (new, or an earlier sweep's: its rows are kept and "
                         "skipped)")


def _run_sweep(args: argparse.Namespace) -> int:
    from explainer.sweep import SweepSpec, run_sweep

    spec = SweepSpec(layers=tuple(args.layers or ()), n=tuple(args.n),
                     samples=tuple(args.samples), methods=tuple(args.methods),
                     baselines=tuple(args.baselines),
                     classes=tuple(args.classes) if args.classes else None, limit=args.limit,
                     min_images=args.min_images, seed=args.seed, solver=args.solver,
                     clamp=args.clamp)
    spec.check()
    with ProgressBar("sweep") as cb:
        res = run_sweep(open_workspace(args.workspace), spec, args.out, device=args.device,
                        progress=cb, png=not args.no_png)
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {args.out}: {len(res.rows)} rows over {len(res.record['classes'])} classes "
          f"(results.csv, results.parquet, summary.csv, figures)")
    print("layer | n | samples | method | condition | mean P(target) | hit rate")
    for r in res.summary:
        if r["mean_prob"] is not None:
            print(f"{r['layer']} | {r['n']} | {r['samples']} | {r['method']} | "
                  f"{r['condition']} | {r['mean_prob']:.3f} | {r['hit_rate']:.0%}")
    return 0


METHODS = ["deeplift", "grad_x_act", "deeplift_smoothgrad"]


def _result_settings(p: argparse.ArgumentParser) -> None:
    """The parameters a precomputed explanation is stored under (the app's defaults)."""
    p.add_argument("--workspace", required=True, type=workspace_arg,
                   help="workspace name or folder")
    p.add_argument("--n", type=int_range(1, 10), default=4,
                   help="number of concepts (1..10, default 4)")
    p.add_argument("--method", default="deeplift", choices=METHODS)
    p.add_argument("--variant", default="paper", choices=["paper", "reference"])
    p.add_argument("--max-images", type=positive_int, default=500,
                   help="images per class (>= 1, default 500)")
    p.add_argument("--seed", type=seed, default=0, help="0..2**32-1")
    p.add_argument("--m", type=int_range(1, MAX_CROPS_PER_CONCEPT), default=8,
                   help=f"crops per concept (1..{MAX_CROPS_PER_CONCEPT}, default 8)")
    p.add_argument("--solver", default="sklearn", choices=["sklearn", "torch"],
                   help="NMF solver")
    p.add_argument("--clamp", action="store_true", help="clamp negative activations")
    p.add_argument("--device", default="auto")


def _add_precompute(sub: Any) -> None:
    pc = sub.add_parser("precompute", help="precompute and store the explanations of many "
                        "classes and the classifiers of their pairs (resumable)")
    _result_settings(pc)
    which = pc.add_mutually_exclusive_group(required=True)
    which.add_argument("--classes", type=class_list, default=None,
                       help="comma-separated class names or indices")
    which.add_argument("--all", dest="all_classes", action="store_true",
                       help="every class with at least --min-images predicted images")
    pc.add_argument("--min-images", type=positive_int, default=1,
                    help="with --all: classes with at least this many images (default 1)")
    pc.add_argument("--pairs", default="none", choices=["none", "all", "confusable"],
                    help="which pairs' contrast classifiers to train (default none)")
    pc.add_argument("--contrasts", action="store_true",
                    help="also store each pair's contrasted explanation, both directions")
    pc.add_argument("--confusable-top", type=int_range(2, 5), default=2,
                    help="confusable: the other class among ranks 2..K of the top-5 (default "
                         "2, the runner-up)")
    pc.add_argument("--confusable-min", type=positive_int, default=3,
                    help="confusable: at least this many such images, both ways (default 3)")
    pc.add_argument("--confusable-partners", type=positive_int, default=10,
                    help="confusable: at most this many partners per class (default 10)")
    pc.add_argument("--images-per-block", type=positive_int, default=1024,
                    help="images attributed together (bounds memory, default 1024)")
    pc.add_argument("--block-mb", type=positive_int, default=None,
                    help="MiB of B pixels per batched classifier training (default: a fifth "
                         "of the free GPU memory, 512 on the CPU)")
    pc.add_argument("--json", dest="json_out", type=output_file(".json"), default=None,
                    help="also write the summary to this .json file")


def _add_export(sub: Any) -> None:
    ex = sub.add_parser("export", help="write every precomputed result into a folder")
    _result_settings(ex)
    ex.add_argument("--exclude-target", action="store_true",
                    help="the crop PNGs with target-class crops excluded")
    ex.add_argument("--out", required=True, type=output_folder,
                    help="output folder (new, empty, or an earlier export: replaced)")


def _settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return dict(n_concepts=args.n, method=args.method, variant=args.variant,
                max_images=args.max_images, seed=args.seed, m=args.m, solver=args.solver,
                clamp=args.clamp)


def _run_precompute(args: argparse.Namespace) -> int:
    from explainer.concepts import get_context
    from explainer.precompute import precompute

    ctx = get_context(open_workspace(args.workspace), args.device)
    with ProgressBar("precompute") as cb:
        res = precompute(ctx, args.classes, all_classes=args.all_classes, pairs=args.pairs,
                         min_images=args.min_images, contrasts=args.contrasts,
                         confusable_top=args.confusable_top,
                         confusable_min=args.confusable_min,
                         confusable_partners=args.confusable_partners,
                         images_per_block=args.images_per_block,
                         block_bytes=None if args.block_mb is None else args.block_mb << 20,
                         progress=cb, **_settings_of(args))
    for what, msg in res.failed.items():
        print(f"warning: {what}: {msg}", file=sys.stderr)
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items())
    print(f"precomputed {len(res.classes)} classes ({res.explained} now, "
          f"{res.explained_cached} stored before), {res.pairs} pairs ({res.pairs_trained} "
          f"trained now, {res.pairs_cached} stored before)"
          + (f", {res.contrasts} contrasts ({res.contrasts_computed} now)" if args.contrasts
             else "") + f"; {secs}")
    summary = res.to_json()
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from explainer.concepts import get_context
    from explainer.precompute import export_precomputed

    ctx = get_context(open_workspace(args.workspace), args.device)
    with ProgressBar("export") as cb:
        res = export_precomputed(ctx, args.out, exclude_target=args.exclude_target,
                                 progress=cb, **_settings_of(args))
    for what in res.missing:
        print(f"warning: {what} is no longer stored (catalog rebuilt or cache deleted?); "
              "run precompute again", file=sys.stderr)
    print(f"wrote {res.out}: {res.explanations} explanations, {res.contrasts} contrasts, "
          f"{res.pairs} pair classifiers (index.csv, pairs.csv, pairs.parquet, "
          "pair_weights.npz)")
    return 0


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
    if args.cmd == "precompute":
        return _run_precompute(args)
    if args.cmd == "export":
        return _run_export(args)
    if args.cmd == "sweep":
        return _run_sweep(args)
    from explainer.concepts import explain_class, get_context

    if args.cmd == "synthesize":
        return _run_synthesize(args)
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


# --------------------------------------------------------------------------------------------
# synthesize: concept images by optimisation (method.md §10)


def _add_synthesize(sub: Any) -> None:
    sy = sub.add_parser("synthesize", help="synthesise an image per concept (explain or contrast)")
    sy.add_argument("--workspace", required=True, type=workspace_arg,
                    help="workspace name or folder")
    sy.add_argument("--class", dest="class_a", required=True, help="class A (name or index)")
    sy.add_argument("--b", default=None,
                    help="class B (name or index): synthesise the concepts of A contrasted "
                         "against B instead of A's explanation")
    sy.add_argument("--n", type=int_range(1, 10), default=4,
                    help="number of concepts (1..10, default 4)")
    sy.add_argument("--method", default="deeplift",
                    choices=["deeplift", "grad_x_act", "deeplift_smoothgrad"])
    sy.add_argument("--max-images", type=positive_int, default=500)
    sy.add_argument("--seed", type=seed, default=0,
                    help="seed of the explanation and of the synthesis (0..2**32-1)")
    sy.add_argument("--size", type=int_range(8, 4096), default=None,
                    help="side of the synthesised images in px (default the crop size; the "
                         "model's input size gives full images)")
    sy.add_argument("--steps", type=int_range(1, 10000), default=256,
                    help="optimisation steps per image (default 256)")
    sy.add_argument("--threads", type=int_range(1, 256), default=1,
                    help="torch threads for the optimisation (default 1: thousands of tiny "
                         "steps run fastest on one thread of a small shared CPU)")
    sy.add_argument("--device", default="auto")
    sy.add_argument("--no-cache", action="store_true")
    sy.add_argument("--out", required=True, type=output_folder,
                    help="output folder (new, or an existing folder)")


def _run_synthesize(args: argparse.Namespace) -> int:
    """Explain A (or contrast A against B), synthesise each concept, write
    ``concept_<k>.png``, ``stitched.png`` and ``synthesis.json`` into ``--out``."""
    import numpy as np
    import torch
    from PIL import Image

    from explainer.concepts import explain_class, get_context
    from explainer.synthesis import cached_syntheses, synthesis_prediction_test

    ctx = get_context(open_workspace(args.workspace), args.device)
    kw = dict(n_concepts=args.n, method=args.method, max_images=args.max_images,
              seed=args.seed, cache=not args.no_cache)
    with ProgressBar("synthesize") as cb:
        if args.b is None:
            expl = explain_class(ctx, args.class_a, progress=cb, **kw)
        else:
            from explainer.contrast import contrast_classes

            expl = contrast_classes(ctx, args.class_a, args.b, progress=cb, **kw)
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            syns = cached_syntheses(ctx.lm, ctx.layer, expl.concept_vectors, ctx.ws.cache_dir,
                                    cache=not args.no_cache, progress=cb, size=args.size,
                                    steps=args.steps, seed=args.seed)
        finally:
            torch.set_num_threads(threads)
    pt = synthesis_prediction_test(ctx.lm, syns, expl.class_a)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = ctx.lm.class_names
    concepts = []
    for con, syn in zip(expl.concepts, syns):
        png = f"concept_{con.index + 1}.png"
        Image.fromarray(syn.image).save(out / png)
        concepts.append({"concept": con.index + 1, "importance": float(con.importance),
                         "png": png, "alignment": syn.alignment,
                         "alignments": [float(a) for a in syn.alignments],
                         "margin": syn.margin, "aligned": bool(syn.margin > 0),
                         "nearest_crops": [int(c.crop_id) for c in con.crops[:8]],
                         "seconds": syn.seconds})
    Image.fromarray(pt.stitched).save(out / "stitched.png")
    record = {
        "model": ctx.lm.spec, "layer": ctx.layer, "class_a": names[expl.class_a],
        "class_b": None if expl.class_b is None else names[expl.class_b],
        "explanation": {k: v for k, v in kw.items() if k != "cache"},
        "synthesis": dict(syns[0].params), "concepts": concepts,
        "aligned": int(sum(s.margin > 0 for s in syns)),
        "seconds_per_concept": float(np.mean([s.seconds for s in syns])),
        "prediction_test": {"target": names[pt.target], "predicted": names[pt.predicted],
                            "score": pt.score, "prob_target": pt.prob_target,
                            "prob_predicted": pt.prob_predicted, "passed": pt.passed,
                            "png": "stitched.png"},
    }
    (out / "synthesis.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out}: {len(syns)} synthesised concepts of {names[expl.class_a]}"
          + (f" vs {names[expl.class_b]}" if expl.class_b is not None else "")
          + f", {record['aligned']}/{len(syns)} aligned with their own concept; prediction "
          f"test {'PASS' if pt.passed else 'FAIL'} ({pt.score} of "
          f"{names[pt.target]} {pt.prob_target:.3f})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        with user_code_allowed():  # the user typed the spec (or owns the workspace): it may run
            return run(argv)
    except SystemExit as exc:  # the parser's one-line error (exit 2) or --help (exit 0)
        return exc.code if isinstance(exc.code, int) else 2
    except ExplorerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing --out failed after the checks (disk full, removed, ...)
        print(f"error: {exc}", file=sys.stderr)
        return 2
