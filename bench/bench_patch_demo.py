"""What a user sees in the Test bench's patch insertion on the demo (README walkthrough step 4).

    python bench/bench_patch_demo.py [--home DIR] [--images 32]

Contrast lupo vs husko (app defaults: n=4, deeplift, 500 images, seed 0), take the grass
concept's top crop (the concept whose crops are grass by ground truth), and paste it into the
first ``--images`` images predicted as husko (the bench's default count), bottom-right, against a
mean-colour control of the same box, at two patch sizes: the crop as is (1x, 32 px) and the crop
tiled 2x2 (2x, 64 px; the bench's "tile 2x2" option). Prints one table row per size: mean
ΔP(lupo) with the patch and with the control, and in how many images P(lupo) rises.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo_world import groundtruth as gt  # noqa: E402
from demo_world.workspace import ensure_demo_workspace  # noqa: E402
from explainer.concepts import get_context  # noqa: E402
from explainer.contrast import contrast_classes  # noqa: E402
from explainer.faithfulness import patch_from_crop, patch_insertion, tile_patch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", default=os.environ.get("DEMO_WORKSPACE_HOME"))
    ap.add_argument("--images", type=int, default=32)
    args = ap.parse_args()
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp())
    ws = ensure_demo_workspace(home=home, device="cpu")
    ctx = get_context(ws, device="cpu")
    names = ctx.lm.class_names
    a, b = names.index("lupo"), names.index("husko")
    ex = contrast_classes(ctx, a, b, device="cpu")
    truths = gt.explanation_truth(ex, input_size=ctx.lm.input_size)
    k = gt.find_concept(truths, "bg_grass")
    if k is None:
        raise SystemExit("no grass concept in the lupo vs husko contrast")
    crop_id = ex.concepts[k].crops[0].crop_id
    ids_b = ctx.catalog.images_predicted_as(b)[:args.images]
    pix = ctx.catalog.image_pixels(ids_b, ctx.lm)
    crop = patch_from_crop(ctx.lm, ctx.catalog, crop_id)
    print(f"contrast lupo vs husko: grass concept {k + 1}, top crop {crop_id}; "
          f"{len(ids_b)} husko images, bottom-right, control mean\n")
    print("| patch | size | mean ΔP(lupo) patch | mean ΔP(lupo) control | P(lupo) rises in |")
    print("|---|---|---|---|---|")
    for label, patch in (("crop (1x)", crop), ("crop tiled 2x2 (2x)", tile_patch(crop, 2))):
        r = patch_insertion(ctx.lm, pix, patch, a, b, position="bottom-right", control="mean",
                            image_ids=ids_b)
        d = r.prob_a_after - r.prob_a_before
        dc = r.prob_a_control - r.prob_a_before
        print(f"| {label} | {patch.shape[2]} px | {d.mean():+.3f} | {dc.mean():+.4f} | "
              f"{int((d > 0).sum())}/{len(d)} |")


if __name__ == "__main__":
    main()
