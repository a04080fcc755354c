"""Ground-truth checks of the method on the demo world (issue #4, item 4).

The demo world labels every pixel with its concept, so what the method finds can be checked
against the truth, and compared with a random-crops baseline so the numbers mean something.
Everything runs on the shared ``demo_workspace`` (tests/conftest.py) with the defaults of the
app: ``explain_class`` with n=4 concepts, ``deeplift``, top-8 crops, target class allowed.

Measured on this repository's demo model (seed 0, CPU), recorded so the bounds below can be
judged (``python bench/bench_demo_groundtruth.py`` prints the full table):

* purity (share of a concept's 8 crops whose dominant ground truth is the concept's majority):
  mean 0.89 over the 10 classes; random catalog crops 0.34; random crops of the class's own
  images 0.42.
* coverage (every defining part is the majority of >= 1 concept): 9/10 classes with n=4
  (``mudbot``'s brown checkered square is not found); random crop sets 0/10.
* contrast lupo vs husko: the first concept is grass in 8/8 crops; its top grass crop pasted
  bottom-right into the 124 images predicted as husko raises mean P(lupo) by +0.028 vs +0.002
  for the mean-colour control (margin 0.025, higher with the patch than with the control in
  124/124 images); 8 seeded random catalog crops as patches: mean margin 0.007 (the two of them
  that happen to be grass give 0.027, the others 0.000: the concept's merit is to *find* grass).
* prediction test (target crops allowed): 10/10 classes pass; 4 random crops: 14 % pass.
* shift test (32 images of B, the paper's offsets): max P(A) 1.00 for every tested pair (at
  t=200); a random direction of the same norm: mean 0.016.

Runtime on two shared CPU cores: about 2 minutes beyond the workspace build (measured 153 s
for the file including a ~35 s build); the ten explanations dominate and are computed once per
session (a module fixture; they are also cached on disk per workspace).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from demo_world import groundtruth as gt
from demo_world import world

CLASSES = world.CLASSES
SHIFT_IMAGES = 32  # images of B per shift test (the app's default is 64; every offset is run)
SHIFT_PAIRS_SEED = 0


# --------------------------------------------------------------------------------------------
# fixtures (module scope: every class is explained once per session)


@pytest.fixture(scope="module")
def ctx(demo_workspace):
    from explainer.concepts import get_context

    return get_context(demo_workspace, "cpu")


@pytest.fixture(scope="module")
def explanations(ctx):
    """The 10 default explanations (n=4, deeplift), attributed in shared batches first."""
    from explainer.concepts import attribute_classes, explain_class

    attribute_classes(ctx, list(range(len(CLASSES))), method="deeplift")
    return {c: explain_class(ctx, c, device="cpu") for c in CLASSES}


@pytest.fixture(scope="module")
def truths(explanations):
    return {c: gt.explanation_truth(e) for c, e in explanations.items()}


@pytest.fixture(scope="module")
def husko_images(ctx):
    from explainer.concepts import class_images

    ids = class_images(ctx, CLASSES.index("husko"), 500, 0)
    return ids, ctx.catalog.image_pixels(ids, ctx.lm)


# --------------------------------------------------------------------------------------------
# helpers on a rendered image (no workspace)


def _write(tmp_path, name, img, mask):
    ip = tmp_path / "images" / "s" / f"{name}.png"
    mp = world.mask_path_for(ip)
    ip.parent.mkdir(parents=True, exist_ok=True)
    mp.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(ip)
    Image.fromarray(mask).save(mp)
    return ip


def test_crop_concept_reads_the_mask_one_to_one(tmp_path):
    img, mask = world.render(CLASSES.index("zebrox"), np.random.default_rng(3))
    ip = _write(tmp_path, "a", img, mask)
    for box in gt.grid_boxes(96):
        assert gt.crop_concept(ip, box) == world.dominant_concept(mask, box)
    # a box that is all one part: that part
    mask2 = np.zeros((96, 96), np.uint8)
    mask2[40:70, 10:30] = world.concept_id("part_red_dots_circle")
    ip2 = _write(tmp_path, "b", img, mask2)
    assert gt.crop_concept(ip2, (10, 40, 30, 70)) == world.concept_id("part_red_dots_circle")
    assert gt.crop_concept(ip2, (0, 0, 32, 32)) == 0
    # an image that is not the model input size has no 1:1 box mapping: refused
    small = _write(tmp_path, "c", img[:64, :64], mask[:64, :64])
    with pytest.raises(ValueError, match="1:1"):
        gt.crop_concept(small, (0, 0, 32, 32))
    with pytest.raises(ValueError, match="inside"):
        gt.crop_concept(ip, (64, 64, 100, 96))
    with pytest.raises(FileNotFoundError):
        gt.crop_concept(tmp_path / "images" / "s" / "missing.png", (0, 0, 32, 32))


def test_truth_purity_coverage_and_find():
    g, s = world.concept_id("bg_grass"), world.concept_id("bg_snow")
    t = gt.concept_truth([s, g, g, s, 7])
    assert t.majority == s and t.share == pytest.approx(0.4) and t.count("bg_grass") == 2
    t2 = gt.concept_truth([g] * 6 + [s] * 2)
    assert t2.name == "bg_grass" and t2.share == 0.75
    assert gt.explanation_purity([t, t2]) == pytest.approx(0.575)
    assert gt.find_concept([t, t2], "bg_grass") == 1
    assert gt.find_concept([t, t2], "bg_rock") is None
    assert gt.class_coverage([t, t2], ["bg_grass", "bg_rock"]) == {"bg_grass": True,
                                                                  "bg_rock": False}
    with pytest.raises(ValueError):
        gt.concept_truth([])
    counts = {"part_black_dots_triangle": 3, "part_orange_solid_square": 50,
              "part_brown_solid_circle": 50}
    assert gt.coverable_parts("lupo", counts, 10) == ["part_orange_solid_square",
                                                      "part_brown_solid_circle"]
    w = np.arange(5, dtype=np.float32)
    r = gt.random_direction(w, 0)
    assert np.linalg.norm(r) == pytest.approx(np.linalg.norm(w), rel=1e-5)
    assert np.array_equal(r, gt.random_direction(w, 0))


# --------------------------------------------------------------------------------------------
# the workspace geometry


def test_catalog_crops_are_the_mask_boxes(ctx):
    """Demo images are exactly 96x96 = the model input, so the catalog's crop boxes index the
    image (and its mask) 1:1: the crop pixels equal the PNG's pixels in the box."""
    cat, lm = ctx.catalog, ctx.lm
    assert lm.input_size == 96 and lm.crop_size == 32
    ids = cat.random_crop_ids(12, seed=1)
    refs = cat.crop_refs(ids)
    pix = cat.crop_pixels(ids, lm).numpy()
    for r, p in zip(refs, pix):
        raw = np.asarray(Image.open(r.path).convert("RGB"), np.float32) / 255.0
        assert raw.shape == (96, 96, 3)
        assert r.box in gt.grid_boxes(96)
        x0, y0, x1, y1 = r.box
        assert np.abs(p.transpose(1, 2, 0) - raw[y0:y1, x0:x1]).max() < 1.5 / 255
        assert gt.load_mask(r.path).shape == (96, 96)


# --------------------------------------------------------------------------------------------
# purity and coverage


def test_concept_purity_beats_random_crops(ctx, truths):
    """Mean purity of the concepts' top-8 crops (measured 0.89) >= 0.7, and >= 0.3 above
    random catalog crops (measured 0.34) and >= 0.25 above random crops of the class's own
    images (measured 0.42, higher because a class's images share its parts)."""
    purity = {c: gt.explanation_purity(t) for c, t in truths.items()}
    mean = float(np.mean(list(purity.values())))
    cat = ctx.catalog
    rand_all = float(np.mean([gt.boxes_truth(cat.crop_refs(cat.random_crop_ids(8, seed=s))).share
                              for s in range(100)]))
    rand_cls = []
    for i in range(len(CLASSES)):
        paths = gt.gallery_paths(cat, cat.images_predicted_as(i))
        rand_cls += [gt.boxes_truth(gt.random_boxes(paths, 8, s)).share for s in range(10)]
    rand_cls_mean = float(np.mean(rand_cls))
    print(f"purity {mean:.3f} per class {purity}; random all {rand_all:.3f}, "
          f"random class images {rand_cls_mean:.3f}")
    assert mean >= 0.7, purity
    assert mean >= rand_all + 0.3
    assert mean >= rand_cls_mean + 0.25


def test_coverage_of_defining_parts(ctx, truths):
    """With n=4 (the default), every defining part of a class is the majority concept of one
    of its concepts for >= 80 % of the classes (measured 9/10: ``mudbot``, three parts, is
    explained by its triangle and circle only).

    Parts are counted when they dominate at least 20 crops of the gallery (``coverable``): the
    lupo/husko triangle is small and visible in half of their images, so it dominates only 35
    (dotted) and 28 (striped) gallery crops against >= 111 for every other part. Both still pass
    the threshold and both were found, so the filter changes nothing today; it keeps the test
    honest if a part ever stops dominating any crop. Random baseline: 4 random sets of 8 crops
    of the class's own images as "concepts" cover 0/10 classes (background dominates)."""
    cat = ctx.catalog
    counts = gt.concept_crop_counts(gt.gallery_paths(cat))
    assert counts["part_black_dots_triangle"] >= 20 and counts["part_black_stripes_triangle"] >= 20
    covered, rand_covered = {}, {}
    for i, c in enumerate(CLASSES):
        parts = gt.coverable_parts(c, counts, 20)
        covered[c] = all(gt.class_coverage(truths[c], parts).values())
        paths = gt.gallery_paths(cat, cat.images_predicted_as(i))
        rsets = [gt.boxes_truth(gt.random_boxes(paths, 8, 1000 + 10 * i + k)) for k in range(4)]
        rand_covered[c] = all(gt.class_coverage(rsets, parts).values())
    print("coverage", covered, "random", rand_covered)
    share = np.mean(list(covered.values()))
    assert share >= 0.8, covered
    assert share >= np.mean(list(rand_covered.values())) + 0.5


# --------------------------------------------------------------------------------------------
# the planted shortcut


def test_contrast_lupo_husko_finds_grass_and_the_patch_moves_husko(ctx, husko_images):
    """Contrasting lupo (A) against husko (B) yields a concept whose crops are mostly grass
    (measured 8/8). Its top grass crop pasted bottom-right (default) into all images predicted
    as husko raises mean P(lupo) by more than the mean-colour control does: measured margin
    0.025 (+0.028 vs +0.002), in 124/124 images. One 32x32 grass patch covers 1/9 of an image
    that is mostly snow and shows both husko parts, so the absolute rise is small; the bound
    0.01 is 40 % of the measured margin (clear of run-to-run noise, which is ~0 here since all
    is seeded on CPU, and of BLAS differences). The patch must also beat random catalog crops
    as patches (8 seeded; measured mean margin 0.007, two of them grass) by >= 0.01."""
    from explainer.contrast import contrast_classes

    ex = contrast_classes(ctx, "lupo", "husko", device="cpu")
    ids, pix = husko_images
    chk = gt.shortcut_check(ctx, ex, pix, ids, background="bg_grass", n_random=8, seed=0)
    print("shortcut", chk.concept, chk.share, chk.patch, "random", chk.random_margin,
          chk.random_concepts)
    assert chk.concept is not None, [t.name for t in gt.explanation_truth(ex)]
    assert chk.share >= 0.75
    assert chk.patch.margin >= 0.01
    assert chk.patch.share_up >= 0.9
    assert chk.patch.margin >= chk.random_margin + 0.01
    assert ex.classifier.weight.shape == (192,)


# --------------------------------------------------------------------------------------------
# faithfulness tests


def test_prediction_test_passes_and_beats_random_stitches(ctx, explanations):
    """Target crops allowed, >= 90 % of classes pass (measured 10/10). Baseline: 4 random
    catalog crops stitched the same way, 5 seeded draws per class (measured 14 % pass)."""
    passed = {c: e.prediction_test.passed for c, e in explanations.items()}
    rnd = [r.passed for i in range(len(CLASSES))
           for r in gt.random_prediction_tests(ctx.lm, ctx.catalog, i, 4, 5, seed=0)]
    print("prediction test", passed, "random pass rate", np.mean(rnd))
    rate = np.mean(list(passed.values()))
    assert rate >= 0.9, passed
    assert rate >= np.mean(rnd) + 0.6


def _shift_pairs() -> list[tuple[int, int]]:
    from explainer.evaluation import random_pairs

    fixed = [(0, 1), (1, 0)]  # (lupo, husko), (husko, lupo)
    extra = [p for p in random_pairs(range(len(CLASSES)), 8, SHIFT_PAIRS_SEED) if p not in fixed]
    return fixed + extra[:4]


def test_shift_moves_every_pair_to_the_target(ctx):
    """The A-vs-B normal (the contrast's classifier) shifts B's images to A: max over the
    paper's offsets of mean P(A) >= 0.9 for each of 6 pairs (lupo/husko both ways and 4 seeded
    pairs; measured 1.00 each, at t=200; 32 seeded images of B per pair). A random direction of
    the same norm reaches a mean max P(A) of 0.016 (the bound leaves room for a random
    direction that happens to point to A)."""
    from explainer.concepts import class_images
    from explainer.contrast import pair_classifier
    from explainer.faithfulness import shift_test

    got, rnd = {}, []
    for a, b in _shift_pairs():
        clf = pair_classifier(ctx, a, b)
        ids = class_images(ctx, b, SHIFT_IMAGES, 0)
        pix = ctx.catalog.image_pixels(ids, ctx.lm)
        res = shift_test(ctx.lm, ctx.layer, pix, clf.weight, a, b, image_ids=ids)
        got[(CLASSES[a], CLASSES[b])] = (round(res.default_prob_a, 3), round(res.max_prob_a, 3))
        rres = shift_test(ctx.lm, ctx.layer, pix, gt.random_direction(clf.weight, a * 10 + b), a, b)
        rnd.append(rres.max_prob_a)
    print("shift (default, max)", got, "random direction max", np.round(rnd, 3))
    assert all(mx >= 0.9 for _, mx in got.values()), got
    assert np.mean([mx for _, mx in got.values()]) >= np.mean(rnd) + 0.4
