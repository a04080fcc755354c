"""Tests of the demo world's segmentation network and its ``demo-seg`` workspace (issue 11,
item 4).

The network: the committed weights (``explorer_core/weights/demo_segnet.pt``) were trained by
``python -m demo_world.train_seg``; ``RECORD_seg.json`` holds its held-out figures. Here they are
recomputed on fresh seeded images: pixel accuracy, mean IoU, and the planted shortcut (the share of
``lupo``'s object pixels predicted ``lupo`` on grass vs on snow). Bounds are the recorded figures
less a margin (measured: see RECORD_seg.json and demo_world/README.md).

The workspace: ``demo-seg`` (the demo world's 1200 gallery images with the segmentation network;
``demo_seg_workspace`` in tests/conftest.py) opens from the command line like ``demo`` and
rebuilds itself, and the method's results are checked against the masks with the app's defaults
(n = 4, ``deeplift``, top-8 crops, target class allowed), by the same ground-truth code as the
classifier's (``demo_world.groundtruth``). Measured (seed 0, CPU):

* purity of the concepts' top-8 crops: mean 0.89 over the 10 classes (per class 0.72-1.00);
  random catalog crops 0.34;
* contrast lupo vs husko: the first (most important) concept is grass in 8/8 crops -- the
  planted shortcut. (Pasting its top crop into husko's images moves the *pixel share* of lupo
  only a little: +0.003 vs -0.001 for the control, so that is reported, not asserted.)
* prediction test on pixel shares: 10/10 classes pass (share of the stitched pixels predicted as
  the class 0.60-0.84); 4 random catalog crops: 8 % pass;
* synthesis (32 px, 256 steps, seed 0, one torch thread; the concept vectors of those
  explanations): the image synthesised for concept k aligns best with concept k in 38/40 cases,
  the stitched synthesised crops pass the prediction test for 10/10 classes (share of pixels
  predicted as the class 0.23-0.50, the largest of the object classes); towards random
  directions 1/10. 26 s for the 40 images (0.65 s a concept), 63 s for the random controls.

Runtime on two shared CPU cores: the workspace build 25-45 s, attributing the 10 classes 2.5-4 min
(cached on disk in the workspace: ``DEMO_SEG_WORKSPACE_HOME`` keeps it between sessions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from demo_world import groundtruth as gt
from demo_world import world
from demo_world.train import to_tensor
from demo_world.train_seg import (
    BACKGROUND_INDEX,
    confusion,
    evaluate,
    iou_figures,
    pixel_labels,
    predict,
    shortcut_shares,
)
from demo_world.workspace import DEMO_SEG_NAME
from explorer_core.demo_cnn import CLASSES, DEMO_MEAN, DEMO_STD
from explorer_core.demo_segnet import (
    DEMO_SEG_INPUT_SIZE,
    DEMO_SEG_LAYER,
    SEG_CLASSES,
    SEG_WEIGHTS_PATH,
    DemoSegWeightsMissing,
    build_demo_segnet,
    load_demo_seg,
)
from explorer_core.errors import ExplorerError

RECORD_PATH = SEG_WEIGHTS_PATH.parent / "RECORD_seg.json"
LUPO = CLASSES.index(world.SHORTCUT_GRASS_CLASS)
# Bounds on the small held-out check set (10 images per class, seed 0); measured 0.995 and 0.973
# (RECORD_seg.json["check"]; on the full 1000 held-out images 0.994 and 0.964).
MIN_PIXEL_ACC = 0.98
MIN_MIOU = 0.9


@pytest.fixture(scope="module")
def seg() -> torch.nn.Module:
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    return load_demo_seg()[0]


@pytest.fixture(scope="module")
def record() -> dict:
    assert RECORD_PATH.is_file(), "run `python -m demo_world.train_seg` and commit its RECORD"
    return json.loads(RECORD_PATH.read_text())


def _layer_outputs(model: torch.nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Output of :data:`DEMO_SEG_LAYER` for each input (one forward each, hook removed after)."""
    out: list[torch.Tensor] = []
    handle = dict(model.named_modules())[DEMO_SEG_LAYER].register_forward_hook(
        lambda _m, _i, o: out.append(o)
    )
    try:
        with torch.no_grad():
            for x in inputs:
                model(x)
    finally:
        handle.remove()
    return out


# ------------------------------------------------------------------------------- ground truth


def test_classes_are_the_demo_classes_then_background() -> None:
    assert SEG_CLASSES[:10] == CLASSES == world.CLASSES
    assert SEG_CLASSES[10] == "background" and BACKGROUND_INDEX == 10 and len(SEG_CLASSES) == 11


def test_pixel_labels_map_own_parts_to_class_and_the_rest_to_background() -> None:
    cid = world.concept_id
    mask = np.full((1, 4, 4), cid("bg_grass"), np.uint8)
    mask[0, 0, :2] = cid("part_orange_solid_square")  # a lupo part
    mask[0, 1, :2] = cid("part_black_dots_triangle")  # lupo's distinguishing part
    mask[0, 2, :2] = cid("part_red_dots_circle")  # a ladyblob part: not lupo's
    t = pixel_labels(mask, np.array([LUPO]))
    assert t.dtype == np.int64 and t.shape == (1, 4, 4)
    assert (t[0, :2, :2] == LUPO).all()
    assert (t[0, 2] == BACKGROUND_INDEX).all() and (t[0, 3] == BACKGROUND_INDEX).all()
    # on rendered images every part pixel is its class's object (parts never cross classes)
    arr = world.generate_arrays(2, seed=0, split="heldout")
    t = pixel_labels(arr.masks, arr.labels)
    is_part = arr.masks >= len(world.BACKGROUNDS)
    assert (t[is_part] == np.broadcast_to(arr.labels[:, None, None], t.shape)[is_part]).all()
    assert (t[~is_part] == BACKGROUND_INDEX).all()


def test_iou_figures_on_a_known_confusion() -> None:
    truth = np.array([[0, 0, 10, 10]])
    pred = np.array([[0, 10, 10, 10]])
    figs = iou_figures(confusion(pred, truth))
    assert figs["pixel_acc"] == pytest.approx(0.75)
    assert figs["iou_lupo"] == pytest.approx(0.5) and figs["iou_background"] == pytest.approx(2 / 3)
    assert np.isnan(figs["iou_husko"]) and figs["miou"] == pytest.approx((0.5 + 2 / 3) / 2)


# ------------------------------------------------------------------------------- architecture


def test_relus_are_distinct_and_shapes_on_images_crops_and_columns() -> None:
    model = build_demo_segnet().eval()
    relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    assert len(relus) == len({id(m) for m in relus}) == 12 and not any(m.inplace for m in relus)
    assert isinstance(dict(model.named_modules())[DEMO_SEG_LAYER], torch.nn.ReLU)
    inputs = [torch.randn(2, 3, h, w) for h, w in [(96, 96), (32, 32), (128, 32), (32, 128)]]
    with torch.no_grad():
        for x in inputs:
            assert model(x).shape == (2, 11, *x.shape[-2:])
    shapes = [tuple(o.shape) for o in _layer_outputs(model, inputs)]
    assert shapes == [(2, 192, 6, 6), (2, 192, 2, 2), (2, 192, 8, 2), (2, 192, 2, 8)]
    for bad in [(96, 40), (16, 16)]:
        with pytest.raises(ExplorerError, match="multiples of 16"):
            model(torch.randn(1, 3, *bad))


def test_missing_or_corrupt_weights_message(tmp_path) -> None:
    with pytest.raises(DemoSegWeightsMissing, match="demo_world.train_seg") as err:
        load_demo_seg(weights_path=tmp_path / "nope.pt")
    assert isinstance(err.value, ExplorerError)
    bad = tmp_path / "bad.pt"
    bad.write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(DemoSegWeightsMissing, match="could not read"):
        load_demo_seg(weights_path=bad)
    # the classifier's weights are not the segmentation network's
    from explorer_core.demo_cnn import WEIGHTS_PATH

    with pytest.raises(DemoSegWeightsMissing, match="could not read"):
        load_demo_seg(weights_path=WEIGHTS_PATH)


# ------------------------------------------------------------------------------- the weights


def test_weights_load_small_float32(seg: torch.nn.Module) -> None:
    model, names, size, mean, std = load_demo_seg()
    assert names == SEG_CLASSES and size == DEMO_SEG_INPUT_SIZE == 96
    assert mean == DEMO_MEAN and std == DEMO_STD
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert SEG_WEIGHTS_PATH.stat().st_size <= 5_000_000


def test_outputs_and_layer_on_images_and_stitched_crops(seg: torch.nn.Module) -> None:
    """Full images give (B, 11, 96, 96); a column of 4 stitched part crops (128x32, the prediction
    test's input) is segmented as its class; the layer is spatial and non-negative."""
    arr = world.generate_arrays(2, seed=5, split="fresh")
    x = to_tensor(arr.images)
    with torch.no_grad():
        assert seg(x).shape == (20, 11, 96, 96)
    truth = pixel_labels(arr.masks, arr.labels)
    # per class: 4 crops centred on object pixels of its 2 images, stacked along the height
    cols, tcols = [], []
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(arr.labels == c)
        crops, tcrops = [], []
        for k in range(4):
            i = idx[k % 2]
            ys, xs = np.nonzero(truth[i] == c)
            j = len(ys) * (k // 2 + 1) // 3
            y0 = int(np.clip(ys[j] - 16, 0, 64))
            x0 = int(np.clip(xs[j] - 16, 0, 64))
            crops.append(arr.images[i, y0 : y0 + 32, x0 : x0 + 32])
            tcrops.append(truth[i, y0 : y0 + 32, x0 : x0 + 32])
        cols.append(np.concatenate(crops, axis=0))
        tcols.append(np.concatenate(tcrops, axis=0))
    col_pred = predict(seg, np.stack(cols))
    assert col_pred.shape == (10, 128, 32)
    counts = np.stack([(col_pred == c).sum((1, 2)) for c in range(len(CLASSES))], axis=1)
    assert np.mean(counts.argmax(1) == np.arange(10)) >= 0.8
    obj = np.stack(tcols) != BACKGROUND_INDEX
    assert np.mean(col_pred[obj] == np.stack(tcols)[obj]) >= 0.7
    acts = _layer_outputs(seg, [x, to_tensor(np.stack(cols))])
    assert tuple(acts[0].shape) == (20, 192, 6, 6) and tuple(acts[1].shape) == (10, 192, 8, 2)
    assert all(float(a.min()) >= 0.0 and float(a.max()) > 0.0 for a in acts)


def test_heldout_figures_match_record(seg: torch.nn.Module, record: dict) -> None:
    check = record["check"]
    assert record["classes"] == SEG_CLASSES and record["layer"] == DEMO_SEG_LAYER
    figs = evaluate(seg, seed=record["seed"], n_per_class=check["n_per_class"], quick=True)
    assert figs["pixel_acc"] >= MIN_PIXEL_ACC and figs["miou"] >= MIN_MIOU
    for key, value in figs.items():
        assert abs(value - check[key]) <= 2e-3, key
    # the full held-out figures of the record are in line with the check set
    assert abs(record["pixel_acc"] - figs["pixel_acc"]) <= 0.02
    assert abs(record["miou"] - figs["miou"]) <= 0.05


def test_background_shortcut_on_fresh_images(seg: torch.nn.Module, record: dict) -> None:
    """lupo's object pixels are predicted lupo far more often on grass than on snow (where they
    go to husko): the network learned the planted background shortcut."""
    on_grass = shortcut_shares(seg, LUPO, "bg_grass", 20, seed=1, split="fresh")
    on_snow = shortcut_shares(seg, LUPO, "bg_snow", 20, seed=1, split="fresh")
    assert on_grass["lupo"] >= 0.9
    assert on_grass["lupo"] - on_snow["lupo"] >= 0.5
    assert on_snow["husko"] > on_grass["husko"]
    # the record shows the same direction on its 100 probe images per background
    assert (
        record["shortcut_lupo_on_grass_as_lupo"] - record["shortcut_lupo_on_snow_as_lupo"] >= 0.5
    )
    assert record["shortcut_husko_on_snow_as_husko"] > record["shortcut_husko_on_grass_as_husko"]


# ------------------------------------------------------------------------------- the workspace

ROOT = Path(__file__).resolve().parents[1]
N_CONCEPTS = 4


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONCEPT_EXPLORER_HOME": str(home), "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_demo_seg_workspace_is_the_demo_world_through_the_segmenter(demo_seg_workspace):
    from data_index.catalog import Catalog

    ws = demo_seg_workspace
    assert ws.name == DEMO_SEG_NAME and ws.model == "demo-seg" and ws.layer == DEMO_SEG_LAYER
    with Catalog.open(ws) as cat:
        assert cat.meta["task"] == "segmentation" and cat.by_shares
        assert cat.n_images == 1200 and cat.status()["crops"] == 9 * 1200
        counts = cat.predicted_counts()
        assert sorted(counts) == list(range(10)) and min(counts.values()) >= 100
        # the same images as the demo world's gallery, with their masks
        refs = cat.crop_refs(cat.random_crop_ids(5, seed=0))
        assert all(gt.load_mask(r.path).shape == (96, 96) for r in refs)
        assert all(r.path.startswith(str(ws.root / "world" / "images" / "gallery"))
                   for r in refs)


def test_the_cli_opens_demo_seg_by_name(demo_seg_workspace):
    home = demo_seg_workspace.root.parent
    r = _cli("data_index", "status", "--workspace", DEMO_SEG_NAME, home=home)
    assert r.returncode == 0, r.stderr
    assert str(demo_seg_workspace.root) in r.stdout and "1200" in r.stdout
    assert "demo-seg" in r.stdout


def test_the_cli_builds_demo_seg_when_missing_and_explains_on_pixel_shares(
        demo_seg_workspace, tmp_path):
    """A home without ``demo-seg``: the first command builds it (here over a world of 2 images
    per class, put in place beforehand so the test builds 20 images, not 1200), then
    ``explainer explain --workspace demo-seg`` works on pixel shares."""
    from conftest import copy_demo_images

    from demo_world.workspace import DEMO_SPLIT

    home = tmp_path / "home"
    copy_demo_images(demo_seg_workspace, home / DEMO_SEG_NAME / "world" / "images" / DEMO_SPLIT,
                     2)
    r = _cli("data_index", "status", "--workspace", DEMO_SEG_NAME, "--json", home=home)
    assert r.returncode == 0, r.stderr
    assert (home / DEMO_SEG_NAME / "workspace.toml").is_file()
    status = json.loads(r.stdout)
    assert status["images"] == 20 and status["crops"] == 180
    out = tmp_path / "out"
    r = _cli("explainer", "explain", "--workspace", DEMO_SEG_NAME, "--class", "zebrox",
             "--n", "2", "--out", str(out), home=home)
    assert r.returncode == 0, r.stderr
    expl = json.loads((out / "explanation.json").read_text())
    assert expl["model"] == "demo-seg" and len(expl["concepts"]) == 2
    assert expl["prediction_test"]["score"] == "pixel share"


def test_demo_seg_rebuilds_itself_from_a_v1_catalog(demo_seg_workspace, tmp_path):
    from conftest import copy_demo_images
    from test_catalog_v2 import _make_v1

    from data_index.catalog import Catalog, OldCatalogError, _release_readers
    from demo_world.workspace import DEMO_SPLIT, ensure_embedded_workspace

    home = tmp_path / "home"
    copy_demo_images(demo_seg_workspace, home / DEMO_SEG_NAME / "world" / "images" / DEMO_SPLIT,
                     1)
    ws = ensure_embedded_workspace(DEMO_SEG_NAME, home=home, device="cpu")
    old_id = Catalog.open(ws).meta["build_id"]
    _release_readers(ws.catalog_path)
    _make_v1(ws)
    with pytest.raises(OldCatalogError):
        Catalog.open(ws)
    ws = ensure_embedded_workspace(DEMO_SEG_NAME, home=home, device="cpu")
    with Catalog.open(ws) as cat:
        assert cat.meta["schema"] == "2" and cat.meta["build_id"] != old_id
        assert cat.n_images == 10 and cat.meta["task"] == "segmentation"
    with pytest.raises(ExplorerError, match="not an embedded workspace.*demo, demo-seg"):
        ensure_embedded_workspace("lite0", home=home)


# ------------------------------------------------------------------------------- against the masks


@pytest.fixture(scope="module")
def seg_ctx(demo_seg_workspace):
    from explainer.concepts import get_context

    return get_context(demo_seg_workspace, "cpu")


@pytest.fixture(scope="module")
def seg_explanations(seg_ctx):
    """The 10 default explanations (n=4, deeplift) of the demo-seg workspace."""
    from explainer.concepts import attribute_classes, explain_class

    attribute_classes(seg_ctx, list(range(len(CLASSES))), method="deeplift")
    return {c: explain_class(seg_ctx, c, device="cpu") for c in CLASSES}


@pytest.fixture(scope="module")
def seg_truths(seg_explanations):
    return {c: gt.explanation_truth(e) for c, e in seg_explanations.items()}


def test_segmentation_concepts_are_pure(seg_ctx, seg_truths):
    """Mean purity of the concepts' top-8 crops >= 0.7 (measured 0.89) and >= 0.3 above random
    catalog crops (measured 0.34); the concepts are the classes' parts: each class's concepts
    find at least one of its own parts (measured: every class, 2-3 parts each)."""
    purity = {c: gt.explanation_purity(t) for c, t in seg_truths.items()}
    mean = float(np.mean(list(purity.values())))
    cat = seg_ctx.catalog
    rand = float(np.mean([gt.boxes_truth(cat.crop_refs(cat.random_crop_ids(8, seed=s))).share
                          for s in range(100)]))
    print(f"demo-seg purity {mean:.3f} per class {purity}; random crops {rand:.3f}")
    assert mean >= 0.7, purity
    assert mean >= rand + 0.3
    for c, truths in seg_truths.items():
        assert any(gt.class_coverage(truths, world.CLASS_PARTS[c]).values()), \
            (c, [t.name for t in truths])


def test_contrast_lupo_husko_finds_the_grass_shortcut(seg_ctx):
    """Contrasting lupo (A) against husko (B) on the segmenter: a concept whose crops are
    mostly grass, and it is the first, most important one (measured 8/8 grass crops)."""
    from explainer.contrast import contrast_classes

    ex = contrast_classes(seg_ctx, "lupo", "husko", device="cpu")
    truths = gt.explanation_truth(ex)
    k = gt.find_concept(truths, "bg_grass")
    print("demo-seg contrast", [(t.name, t.share) for t in truths])
    assert k == 0, [t.name for t in truths]
    assert truths[k].share >= 0.75
    assert ex.classifier.weight.shape == (192,)


def test_prediction_test_on_pixel_shares_passes_and_beats_random_stitches(seg_ctx,
                                                                         seg_explanations):
    """>= 80 % of the classes pass (measured 10/10); baseline: 4 random catalog crops stitched
    the same way, 5 seeded draws per class (measured 8 % pass)."""
    res = {c: e.prediction_test for c, e in seg_explanations.items()}
    assert all(r.score == "pixel share" for r in res.values())
    rnd = [r.passed for i in range(len(CLASSES))
           for r in gt.random_prediction_tests(seg_ctx.lm, seg_ctx.catalog, i, 4, 5, seed=0)]
    print("demo-seg prediction test", {c: (r.passed, round(r.prob_target, 3))
                                       for c, r in res.items()}, "random", np.mean(rnd))
    rate = np.mean([r.passed for r in res.values()])
    assert rate >= 0.8, res
    assert rate >= np.mean(rnd) + 0.5


def test_synthesis_on_demo_seg(seg_ctx, seg_explanations):
    """Concepts synthesised by optimisation (issue 11 item 5) on the segmenter: for >= 90 % of
    the 40 concepts the image aligns at the layer with its own concept more than with the
    class's other concepts (measured 38/40), and the stitched synthesised crops pass the
    prediction test on pixel shares for >= 80 % of the classes (measured 10/10); the same
    synthesis towards random non-negative directions passes for fewer than half (measured
    1/10). One torch thread: thousands of tiny steps (see tests/test_synthesis.py)."""
    from explainer.synthesis import (
        alignment_matrix,
        synthesis_prediction_test,
        synthesize_concepts,
    )

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lm, layer = seg_ctx.lm, seg_ctx.layer
        vectors = [seg_explanations[c].concept_vectors for c in CLASSES]
        assert all(v.shape == (N_CONCEPTS, 192) for v in vectors)
        flat = synthesize_concepts(lm, layer, np.concatenate(vectors))
        hits, passed, got = 0, 0, {}
        for i, c in enumerate(CLASSES):
            syn = flat[N_CONCEPTS * i:N_CONCEPTS * (i + 1)]
            align = alignment_matrix(lm, layer, np.stack([s.image for s in syn]), vectors[i])
            hits += int((align.argmax(axis=1) == np.arange(N_CONCEPTS)).sum())
            r = synthesis_prediction_test(lm, syn, i)
            assert r.score == "pixel share" and r.stitched.shape == (4 * 32, 32, 3)
            passed += int(r.passed)
            got[c] = (CLASSES[r.predicted] if r.predicted < len(CLASSES) else r.predicted,
                      round(r.prob_target, 3))
        print("demo-seg synthesis: aligned", hits, "/ 40; prediction test", got)
        assert hits >= 0.9 * N_CONCEPTS * len(CLASSES)
        assert passed >= 0.8 * len(CLASSES), got
        rng = np.random.default_rng(0)
        rand = synthesize_concepts(lm, layer, rng.random((N_CONCEPTS * len(CLASSES), 192))
                                   .astype(np.float32))
        rand_passed = [c for i, c in enumerate(CLASSES) if synthesis_prediction_test(
            lm, rand[N_CONCEPTS * i:N_CONCEPTS * (i + 1)], i).passed]
        assert len(rand_passed) < len(CLASSES) / 2, rand_passed
    finally:
        torch.set_num_threads(before)
