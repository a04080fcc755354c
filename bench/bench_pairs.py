"""All pair classifiers of one class in one batched training vs one training per pair.

    python bench/bench_pairs.py [--workspace WS] [--j 100,243] [--method deeplift]
                                [--min-images 3] [--separate 10] [--repeat 3] [--device cpu]
                                [--pixels FILE.npz]
    python bench/bench_pairs.py --synthetic 2000 --channels 2048 --j 100,999 --device cuda

On a workspace (default $LITE0_WORKSPACE: EfficientNet-Lite0 over the 2000 shared photos, whose
244 classes with >= 3 predicted images give J up to 243), every eligible class's contrast
pixels are computed (attribution with the cache off: nothing is written to the workspace). For
class A (the eligible class with the most contrast pixels) and each J, A's classifiers against
the first J other classes are trained

- batched (``train_pair_classifiers``: one training, the paper's SGD, 100 epochs, lr 0.01);
- separately (``train_classifier``, solver ``sgd``) for ``--separate`` of them, timed, and the
  separate total extrapolated to J;

and the batched weights are checked against the separate ones (max |dw|). ``--synthetic N``
uses no workspace: every class gets N random non-negative pixels of ``--channels`` channels
(ImageNet-like shapes for a GPU run; J + 1 classes x N x C x 4 bytes must fit the device, about
1.25x that while training). The last line is one
JSON object with the figures per J, plus the shapes needed to extrapolate (pixels of A, pixels
of all B, channels).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explainer.attribution import contrast_filter  # noqa: E402
from explainer.concepts import attribute_classes, get_context  # noqa: E402
from explainer.contrast import train_classifier, train_pair_classifiers  # noqa: E402
from explainer.evaluation import eligible_classes  # noqa: E402


def contrast_pixels(ctx, classes, method, block=128) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    t = time.perf_counter()
    for i in range(0, len(classes), block):
        got = attribute_classes(ctx, classes[i:i + block], method=method, cache=False)
        for c, e in got.items():
            out[c] = contrast_filter(torch.from_numpy(e["acts"]), torch.from_numpy(e["s_paper"]))
        print(f"  contrast pixels: {len(out)}/{len(classes)} classes "
              f"({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", default=os.environ.get("LITE0_WORKSPACE"))
    ap.add_argument("--j", default="100,243")
    ap.add_argument("--method", default="deeplift")
    ap.add_argument("--min-images", type=int, default=3)
    ap.add_argument("--separate", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--synthetic", type=int, default=0,
                    help="pixels per class of random synthetic classes (no workspace)")
    ap.add_argument("--channels", type=int, default=2048, help="with --synthetic")
    ap.add_argument("--pixels", default=None,
                    help="an .npz to keep the contrast pixels in between runs (read if present)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.synthetic:
        n_cls = max(int(x) for x in args.j.split(",")) + 1
        g = torch.Generator().manual_seed(0)
        classes = list(range(n_cls))
        pix = {c: (torch.randn(args.synthetic, args.channels, generator=g) * 0.5
                   + 1.0 + 0.02 * (c % 7)).abs() for c in classes}
    elif not args.workspace:
        sys.exit("error: give --workspace, set LITE0_WORKSPACE or use --synthetic N")
    else:
        pix = workspace_pixels(args)
    a = max(pix, key=lambda c: len(pix[c]))
    others = [c for c in pix if c != a and len(pix[c])]
    run(args, pix, a, others)


def workspace_pixels(args) -> dict[int, torch.Tensor]:
    ctx = get_context(args.workspace, args.device)
    classes = eligible_classes(ctx, args.min_images)
    print(f"{ctx.ws.name}: {len(classes)} classes with >= {args.min_images} images, layer "
          f"{ctx.layer}", file=sys.stderr)
    if args.pixels and Path(args.pixels).is_file():
        from explorer_core.files import read_npz

        pix = {int(k[1:]): torch.from_numpy(v) for k, v in read_npz(args.pixels).items()}
    else:
        pix = contrast_pixels(ctx, classes, args.method)
        if args.pixels:
            from explorer_core.files import write_npz

            write_npz(args.pixels, {f"c{c}": x.numpy() for c, x in pix.items()})
    return pix


def run(args, pix: dict[int, torch.Tensor], a: int, others: list[int]) -> None:
    dev = torch.device(args.device)  # pixels stay on the host: both timings include the copy
    result: dict[str, dict] = {}
    print("| J | pixels A | pixels B (all) | batched s | separate s/pair | separate x J s | "
          "speed-up | max abs dw |")
    print("|---|---|---|---|---|---|---|---|")
    for J in [int(x) for x in args.j.split(",")]:
        bs = others[:J]
        J = len(bs)
        xbs = [pix[b] for b in bs]
        train_pair_classifiers(pix[a], xbs[:2], class_a=a, classes_b=bs[:2], device=dev)  # warm
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            pc = train_pair_classifiers(pix[a], xbs, class_a=a, classes_b=bs, device=dev)
            times.append(time.perf_counter() - t)
        batched = statistics.median(times)
        k = min(args.separate, J)
        sep_t, dw = [], 0.0
        for j in range(k):
            t = time.perf_counter()
            clf = train_classifier(pix[a], xbs[j], class_a=a, class_b=bs[j], device=dev)
            sep_t.append(time.perf_counter() - t)
            dw = max(dw, float(np.abs(clf.weight - pc.weight[j]).max()))
        per_pair = statistics.median(sep_t)
        nb = int(sum(len(x) for x in xbs))
        print(f"| {J} | {len(pix[a])} | {nb} | {batched:.3f} | {per_pair:.4f} | "
              f"{per_pair * J:.2f} | {per_pair * J / batched:.1f}x | {dw:.1e} |")
        result[str(J)] = {"batched_s": batched, "separate_s_per_pair": per_pair,
                          "separate_total_s": per_pair * J, "pixels_a": len(pix[a]),
                          "pixels_b": nb, "channels": int(pix[a].shape[1]),
                          "max_abs_dw": dw}
    print(json.dumps({"device": str(dev), "threads": args.threads, "class_a": a,
                      "results": result}))


if __name__ == "__main__":
    main()
