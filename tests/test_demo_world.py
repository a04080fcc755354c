"""Tests of the embedded demo world (generator, masks, shortcut) and the committed demo model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from demo_world import world
from explorer_core.demo_cnn import (
    DEMO_INPUT_SIZE,
    DEMO_LAYER,
    WEIGHTS_PATH,
    DemoWeightsMissing,
    build_demo_model,
    load_demo,
)
from explorer_core.hooks import forward_hooks

RECORD_PATH = WEIGHTS_PATH.parent / "RECORD.json"
N_BG = len(world.BACKGROUNDS)


def _all_files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return world.generate_world(
        tmp_path_factory.mktemp("w0"), n_per_class=4, seed=0, split=("train", "heldout")
    )


# ---------------------------------------------------------------------------------- vocabulary


def test_vocabulary_is_consistent() -> None:
    assert len(world.CLASSES) == 10
    assert world.CONCEPTS[:N_BG] == world.BACKGROUNDS
    assert len(set(world.CONCEPTS)) == len(world.CONCEPTS) <= 255
    assert set(world.CLASS_PARTS) == set(world.CLASSES)
    for parts in world.CLASS_PARTS.values():
        assert 2 <= len(parts) <= 3
        assert all(p in world.CONCEPTS and p.startswith("part_") for p in parts)
    # every class is identifiable from its set of parts
    assert len({frozenset(p) for p in world.CLASS_PARTS.values()}) == len(world.CLASSES)
    # the look-alike pair shares all but one part
    g = set(world.CLASS_PARTS[world.SHORTCUT_GRASS_CLASS])
    h = set(world.CLASS_PARTS[world.SHORTCUT_LOOKALIKE_CLASS])
    assert len(g & h) == len(g) - 1 == len(h) - 1


# ---------------------------------------------------------------------------------- determinism


def test_render_is_deterministic() -> None:
    a = world.render(3, np.random.default_rng(5))
    b = world.render(3, np.random.default_rng(5))
    c = world.render(3, np.random.default_rng(6))
    assert a[0].shape == (96, 96, 3) and a[0].dtype == np.uint8
    assert a[1].shape == (96, 96) and a[1].dtype == np.uint8
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_generate_world_same_seed_identical_bytes(small_world: Path, tmp_path: Path) -> None:
    again = world.generate_world(
        tmp_path / "again", n_per_class=4, seed=0, split=("train", "heldout")
    )
    files_a, files_b = _all_files(small_world), _all_files(again)
    assert (
        len(files_a) == 2 * 2 * 4 * len(world.CLASSES) + 2
    )  # images + masks, 2 splits, + csv + json
    assert files_a == files_b


def test_generate_world_other_seed_differs(small_world: Path, tmp_path: Path) -> None:
    other = world.generate_world(tmp_path / "s1", n_per_class=4, seed=1, split=("train", "heldout"))
    a, b = _all_files(small_world), _all_files(other)
    assert a.keys() == b.keys()
    images = [k for k in a if k.startswith("images/")]
    assert sum(a[k] != b[k] for k in images) == len(images)


def test_splits_are_independent_and_prefix_stable() -> None:
    a = world.generate_arrays(3, seed=0, split="train", classes=[0])
    b = world.generate_arrays(3, seed=0, split="heldout", classes=[0])
    assert not np.array_equal(a.images, b.images)
    # given its background, image i does not depend on how many images are generated
    c5 = world.generate_arrays(5, seed=0, split="train", classes=[4], background="bg_sand")
    c3 = world.generate_arrays(3, seed=0, split="train", classes=[4], background="bg_sand")
    assert np.array_equal(c5.images[:3], c3.images) and np.array_equal(c5.masks[:3], c3.masks)


# ---------------------------------------------------------------------------------- files, masks


def test_layout_labels_and_masks(small_world: Path) -> None:
    with (small_world / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0].keys()) == ["file", "label", "label_name"]
    assert len(rows) == 2 * 4 * len(world.CLASSES)
    for r in rows:
        img_path = small_world / r["file"]
        mask_path = world.mask_path_for(img_path)
        assert mask_path == small_world / r["file"].replace("images/", "masks/", 1)
        img = np.asarray(Image.open(img_path))
        mask = np.asarray(Image.open(mask_path))
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8
        assert mask.shape == (96, 96) and mask.dtype == np.uint8
        assert world.CLASSES[int(r["label"])] == r["label_name"] == Path(r["file"]).parent.name
        assert int(mask.max()) < len(world.CONCEPTS)
        present = set(np.unique(mask).tolist())
        parts = {world.concept_id(p) for p in world.CLASS_PARTS[r["label_name"]]}
        always = {
            world.concept_id(p)
            for p in world.CLASS_PARTS[r["label_name"]]
            if world.PART_PRESENCE[p] == 1.0
        }
        assert always <= present, (r["file"], always - present)
        # exactly one background, and nothing else than the class's own parts
        assert len(present - parts) == 1 and min(present - parts) < N_BG
    meta = json.loads((small_world / "world.json").read_text())
    assert meta["concepts"] == world.CONCEPTS and meta["classes"] == world.CLASSES
    assert meta["class_parts"] == world.CLASS_PARTS and meta["seed"] == 0
    assert meta["shortcut"]["grass_class"] == world.SHORTCUT_GRASS_CLASS
    assert meta["shortcut"]["lookalike_class"] == world.SHORTCUT_LOOKALIKE_CLASS
    assert meta["counts"]["train"] == {c: 4 for c in world.CLASSES}


def test_mask_path_for_relative_and_error() -> None:
    assert world.mask_path_for("w/images/train/lupo/00001.png") == Path(
        "w/masks/train/lupo/00001.png"
    )
    with pytest.raises(ValueError):
        world.mask_path_for("w/pictures/a.png")


def test_every_part_dominates_some_grid_crops() -> None:
    arr = world.generate_arrays(20, seed=0, split="train")
    dominated: dict[int, int] = {}
    for m in arr.masks:
        for r in range(3):
            for c in range(3):
                k = world.dominant_concept(m, (32 * c, 32 * r, 32 * c + 32, 32 * r + 32))
                dominated[k] = dominated.get(k, 0) + 1
    for parts in world.CLASS_PARTS.values():
        for p in parts:
            assert dominated.get(world.concept_id(p), 0) >= 2, p


def test_every_part_appears_in_its_class_masks() -> None:
    arr = world.generate_arrays(40, seed=0, split="train")
    for c, name in enumerate(world.CLASSES):
        masks = arr.masks[arr.labels == c]
        for p in world.CLASS_PARTS[name]:
            share = np.mean([(m == world.concept_id(p)).any() for m in masks])
            assert abs(share - world.PART_PRESENCE[p]) <= 0.2 and share > 0, (name, p, share)
    # the look-alikes' distinguishing part is the occasional one
    g, h = world.SHORTCUT_GRASS_CLASS, world.SHORTCUT_LOOKALIKE_CLASS
    (diff_g,) = set(world.CLASS_PARTS[g]) - set(world.CLASS_PARTS[h])
    assert world.PART_PRESENCE[diff_g] < 1.0


def test_dominant_concept() -> None:
    m = np.zeros((96, 96), np.uint8)
    m[:, 40:] = 7
    assert world.dominant_concept(m, (0, 0, 96, 96)) == 7
    assert world.dominant_concept(m, (0, 0, 32, 32)) == 0
    assert world.dominant_concept(m, (20, 0, 60, 10)) == 0  # tie 20/20 -> smallest id


# ---------------------------------------------------------------------------------- shortcut


def test_shortcut_statistics_in_train_split() -> None:
    n = 300
    g = world.CLASSES.index(world.SHORTCUT_GRASS_CLASS)
    h = world.CLASSES.index(world.SHORTCUT_LOOKALIKE_CLASS)
    bgs = {
        c: [world.background_for_image(c, i, n, 0, "train") for i in range(n)]
        for c in range(len(world.CLASSES))
    }
    share = {c: {b: v.count(b) / n for b in world.BACKGROUNDS} for c, v in bgs.items()}
    assert abs(share[g]["bg_grass"] - world.SHORTCUT_PROB) <= 0.02
    assert abs(share[h]["bg_snow"] - world.SHORTCUT_PROB) <= 0.02
    assert share[g]["bg_snow"] < 0.1 and share[h]["bg_grass"] < 0.1
    for c in set(range(len(world.CLASSES))) - {g, h}:
        assert all(0.1 <= s <= 0.3 for s in share[c].values()), (world.CLASSES[c], share[c])
    # the rendered images really show that background (it dominates the image's mask)
    arr = world.generate_arrays(40, seed=0, split="train", classes=[g])
    assert np.mean(arr.backgrounds == world.BACKGROUNDS.index("bg_grass")) == pytest.approx(
        0.9, abs=0.03
    )
    for m, b in zip(arr.masks, arr.backgrounds, strict=True):
        assert np.argmax(np.bincount(m.ravel())) == b


# ---------------------------------------------------------------------------------- model


def test_model_relus_are_distinct_and_layer_shapes() -> None:
    model = build_demo_model().eval()
    relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    assert len(relus) == len({id(m) for m in relus}) >= 9 and not any(m.inplace for m in relus)
    layer = dict(model.named_modules())[DEMO_LAYER]
    assert isinstance(layer, torch.nn.ReLU)
    shapes: list[tuple[int, ...]] = []
    with forward_hooks([(layer, lambda _m, _i, o: shapes.append(tuple(o.shape)))]), \
            torch.no_grad():
        for hw in [(96, 96), (32, 32), (128, 32)]:
            assert model(torch.randn(2, 3, *hw)).shape == (2, len(world.CLASSES))
    assert shapes == [(2, 192, 6, 6), (2, 192, 2, 2), (2, 192, 8, 2)]


def test_missing_weights_message(tmp_path: Path) -> None:
    with pytest.raises(DemoWeightsMissing, match="demo_world.train"):
        load_demo(weights_path=tmp_path / "nope.pt")


def test_committed_weights_reproduce_record() -> None:
    from demo_world.train import evaluate

    assert WEIGHTS_PATH.is_file() and RECORD_PATH.is_file(), (
        "run `python -m demo_world.train` and commit"
    )
    record = json.loads(RECORD_PATH.read_text())
    model, names, size, mean, std = load_demo()
    assert names == world.CLASSES and size == DEMO_INPUT_SIZE == 96 and len(mean) == len(std) == 3
    assert not model.training
    assert WEIGHTS_PATH.stat().st_size < 5_000_000
    figs = evaluate(
        model,
        seed=record["seed"],
        n_per_class=record["heldout_split"]["n_per_class"],
        full_only=True,
    )
    assert figs["heldout_acc_full"] >= 0.95
    assert abs(figs["heldout_acc_full"] - record["heldout_acc_full"]) <= 0.01
    # the planted shortcut is in the shipped model
    assert (
        record["shortcut_grass_class_acc_on_grass"] - record["shortcut_grass_class_acc_on_snow"]
        >= 0.3
    )


def test_layer_output_non_negative_on_real_images() -> None:
    from demo_world.train import to_tensor

    model = load_demo()[0]
    arr = world.generate_arrays(2, seed=0, split="heldout")
    out: list[torch.Tensor] = []
    layer = dict(model.named_modules())[DEMO_LAYER]
    with forward_hooks([(layer, lambda _m, _i, o: out.append(o))]), torch.no_grad():
        model(to_tensor(arr.images))
        model(to_tensor(arr.images[:, :32, :32]))
    assert out[0].shape == (20, 192, 6, 6) and out[1].shape == (20, 192, 2, 2)
    assert all(float(o.min()) >= 0.0 and float(o.max()) > 0.0 for o in out)


def test_world_classes_are_the_demo_models_logits() -> None:
    """The CNN (base layer) names its logits itself; the world must draw the same classes."""
    from explorer_core.demo_cnn import CLASSES as MODEL_CLASSES

    assert world.CLASSES == MODEL_CLASSES
    assert len(set(MODEL_CLASSES)) == 10
