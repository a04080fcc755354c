"""Train the demo world's segmentation network on CPU and record how good it is.

Run ``python -m demo_world.train_seg [--out DIR] [--seed 0]``. It generates the world in memory
(the ``train`` and ``heldout`` splits of the given seed, as ``python -m demo_world.train`` does),
trains :class:`explorer_core.demo_segnet.DemoSegNet` for a few minutes on 2 CPU threads and writes
``DIR/demo_segnet.pt`` (float32 state dict) and ``DIR/RECORD_seg.json``.

Ground truth per pixel (:func:`pixel_labels`): a pixel whose mask concept is one of the parts of
its image's class gets that class; every other pixel (a background concept) gets ``background``
(index 10). The head's bias starts at the log of these labels' priors (about 81 % background), so
training starts from "all background" rather than from chance. Training mixes two kinds of
batches, so the network also segments the partial views the method feeds it at native scale
(crops, and columns of crops stitched along the height):

* full 96x96 images,
* columns of 1-4 crops of 32x32 (half grid-aligned, half at random offsets) from different images
  of one class, stacked vertically, with their cropped ground truth.

Only horizontal flips are used as augmentation and the splits keep the world's default shortcut
(``lupo`` on grass and ``husko`` on snow in 90 % of their images): the body and head of the two
look-alikes are identical, so a pixel of either can only be told apart by the small triangle (hidden
in half of the images) or by the background, and the network learns the background shortcut.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # Before torch loads its OpenMP runtime. On a shared, oversubscribed machine the default
    # busy-waiting of idle OpenMP threads made a 2-thread training step 4x slower than with
    # passive waiting (6.5 s vs 1.5 s, measured under a load of 8 on 2 cores).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import time

import numpy as np
import torch
from torch import nn

from demo_world import world
from demo_world.train import (
    CROP,
    N_HELDOUT_PER_CLASS,
    N_PROBE_PER_CLASS,
    N_TRAIN_PER_CLASS,
    fit,
    to_tensor,
    training_args,
    write_weights_and_record,
)
from demo_world.train import _crop_offsets as crop_offsets
from demo_world.train import _crops as gather_crops
from demo_world.train import _grid_crops as grid_crops
from demo_world.train import _grid_dominant as grid_dominant
from explorer_core.demo_segnet import (
    DEMO_SEG_LAYER,
    SEG_CLASSES,
    SEG_WEIGHTS_PATH,
    build_demo_segnet,
)

__all__ = [
    "BACKGROUND_INDEX",
    "CHECK_PER_CLASS",
    "column_batch",
    "confusion",
    "evaluate",
    "iou_figures",
    "main",
    "pixel_labels",
    "predict",
    "shortcut_shares",
    "train",
]

BACKGROUND_INDEX = len(SEG_CLASSES) - 1
"""Label of every pixel that belongs to no object (10)."""
N_CLASSES = len(SEG_CLASSES)
CHECK_PER_CLASS = 10
"""Held-out images per class of the small ``check`` set recorded for a fast recomputation."""

# (class, concept id) -> label: the class for the class's own parts, background otherwise.
_LUT = np.full((len(world.CLASSES), len(world.CONCEPTS)), BACKGROUND_INDEX, dtype=np.int64)
for _c, _name in enumerate(world.CLASSES):
    for _part in world.CLASS_PARTS[_name]:
        _LUT[_c, world.concept_id(_part)] = _c


def pixel_labels(masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-pixel segmentation ground truth.

    Parameters
    ----------
    masks : numpy.ndarray
        uint8 ``(N, H, W)`` concept ids (``world`` masks).
    labels : numpy.ndarray
        int ``(N,)`` class index of each image.

    Returns
    -------
    numpy.ndarray
        int64 ``(N, H, W)``: the image's class where the concept is one of its class's parts,
        :data:`BACKGROUND_INDEX` elsewhere.
    """
    return _LUT[np.asarray(labels)[:, None, None], masks]


def column_batch(
    images: np.ndarray,
    targets: np.ndarray,
    by_class: list[np.ndarray],
    batch: int,
    k: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Columns of ``k`` crops from ``k`` images of one class each, with their ground truth.

    Returns
    -------
    cols : numpy.ndarray
        uint8 ``(batch, 32k, 32, 3)``.
    col_targets : numpy.ndarray
        int64 ``(batch, 32k, 32)`` (the crops of ``targets``, same offsets).
    """
    cls = rng.integers(0, len(by_class), batch)
    cols, tcols = [], []
    for _ in range(k):
        idx = np.array([by_class[c][rng.integers(len(by_class[c]))] for c in cls])
        y0, x0 = crop_offsets(rng, batch, images.shape[1])
        cols.append(gather_crops(images, idx, y0, x0))
        tcols.append(gather_crops(targets, idx, y0, x0))
    return np.concatenate(cols, axis=1), np.concatenate(tcols, axis=1)


def _flip(x: np.ndarray, t: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flip images ``(B, H, W, 3)`` and targets ``(B, H, W)`` horizontally, each with prob 0.5."""
    f = rng.random(x.shape[0]) < 0.5
    x, t = x.copy(), t.copy()
    x[f] = x[f][:, :, ::-1]
    t[f] = t[f][:, :, ::-1]
    return x, t


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch: int = 100) -> np.ndarray:
    """Predicted class per pixel: uint8 images ``(B, H, W, 3)`` -> int64 ``(B, H, W)``."""
    model.eval()
    out = [
        model(to_tensor(images[i : i + batch])).argmax(1).numpy()
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(out) if out else np.empty((0, *images.shape[1:3]), dtype=np.int64)


def confusion(pred: np.ndarray, truth: np.ndarray, k: int = N_CLASSES) -> np.ndarray:
    """Pixel confusion matrix ``(k, k)``: row = true class, column = predicted class."""
    return np.bincount(
        truth.ravel().astype(np.int64) * k + pred.ravel().astype(np.int64), minlength=k * k
    ).reshape(k, k)


def iou_figures(conf: np.ndarray) -> dict[str, float]:
    """Pixel accuracy, mean IoU and per-class IoU of a confusion matrix ``(K, K)``.

    Returns
    -------
    dict
        ``pixel_acc``; ``miou`` (mean over the classes that occur in truth or prediction);
        ``iou_<name>`` for every class of :data:`SEG_CLASSES` (NaN when it occurs nowhere).
    """
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    res = {"pixel_acc": float(tp.sum() / conf.sum()), "miou": float(np.nanmean(iou))}
    res.update({f"iou_{name}": float(v) for name, v in zip(SEG_CLASSES, iou)})
    return res


def shortcut_shares(
    model: nn.Module, class_idx: int, background: str, n: int, seed: int, split: str = "probe"
) -> dict[str, float]:
    """Where the object pixels of one class go when every image is forced onto one background.

    Parameters
    ----------
    model : torch.nn.Module
        The segmentation network.
    class_idx : int
        Class whose images are rendered (index into ``world.CLASSES``).
    background : str
        Background forced onto every image (e.g. ``"bg_grass"``).
    n : int
        Number of images.
    seed : int
        World seed; ``split`` names the image stream.

    Returns
    -------
    dict
        Share of all object pixels (ground truth ``class_idx``) predicted as each class of the
        look-alike pair, keys ``"lupo"`` and ``"husko"`` (the two shortcut classes), and
        ``"background"``.
    """
    probe = world.generate_arrays(n, seed, split, background=background, classes=[class_idx])
    truth = pixel_labels(probe.masks, probe.labels)
    pred = predict(model, probe.images)[truth == class_idx]
    names = (world.SHORTCUT_GRASS_CLASS, world.SHORTCUT_LOOKALIKE_CLASS, "background")
    return {name: float(np.mean(pred == SEG_CLASSES.index(name))) for name in names}


def _column_figures(
    model: nn.Module, held: world.WorldArrays, truth: np.ndarray, seed: int
) -> dict[str, float]:
    """The prediction test's setting: columns of 4 part-dominated grid crops of one class.

    For every held-out image, 4 images of its class (seeded), one grid crop of each whose dominant
    concept is a part, stacked along the height to ``128 x 32`` and segmented.

    Returns
    -------
    dict
        ``column4_parts_object_acc``: share of the columns' object pixels predicted as the class.
        ``column4_parts_top_acc``: share of columns whose most predicted non-background class is
        the class. ``column4_parts_min_class_top_acc`` and ``column4_parts_classes_ok``: the
        per-class minimum of the latter and the share of classes where it is >= 0.5.
    """
    rng = np.random.default_rng([seed, 4242])
    crops = grid_crops(held.images)  # (N, 9, 32, 32, 3)
    n = truth.shape[0]
    tcrops = truth.reshape(n, 3, CROP, 3, CROP).transpose(0, 1, 3, 2, 4).reshape(n, 9, CROP, CROP)
    is_part = grid_dominant(held.masks) >= len(world.BACKGROUNDS)  # (N, 9)
    by_class = [np.flatnonzero(held.labels == c) for c in range(len(world.CLASSES))]
    cols, tcols = [], []
    for j in range(n):
        c = int(held.labels[j])
        cells = []
        for i in rng.choice(by_class[c], 4, replace=False):
            part_cells = np.flatnonzero(is_part[i])
            cell = int(rng.choice(part_cells)) if part_cells.size else int(rng.integers(9))
            cells.append((i, cell))
        cols.append(np.concatenate([crops[i, cell] for i, cell in cells], axis=0))
        tcols.append(np.concatenate([tcrops[i, cell] for i, cell in cells], axis=0))
    pred, tc = predict(model, np.stack(cols)), np.stack(tcols)  # (N, 128, 32) each
    lab = held.labels
    obj = tc != BACKGROUND_INDEX
    counts = np.stack([(pred == c).sum((1, 2)) for c in range(len(world.CLASSES))], axis=1)
    top_ok = counts.argmax(1) == lab
    per_class = np.array([top_ok[lab == c].mean() for c in range(len(world.CLASSES))])
    return {
        "column4_parts_object_acc": float(np.mean(pred[obj] == tc[obj])),
        "column4_parts_top_acc": float(top_ok.mean()),
        "column4_parts_min_class_top_acc": float(per_class.min()),
        "column4_parts_classes_ok": float(np.mean(per_class >= 0.5)),
    }


def evaluate(
    model: nn.Module, seed: int = 0, n_per_class: int = N_HELDOUT_PER_CLASS, quick: bool = False
) -> dict[str, float]:
    """Held-out figures of the segmentation network on the seeded ``heldout`` split.

    Parameters
    ----------
    model : torch.nn.Module
        The segmentation network (logits ``(B, 11, H, W)``).
    seed : int
        World seed (the held-out split of this seed is regenerated).
    n_per_class : int
        Held-out images per class.
    quick : bool
        Only the pixel figures on full images (what the tests recompute), no columns or probes.

    Returns
    -------
    dict
        ``pixel_acc``, ``miou``, ``iou_<class>`` (11 classes, background last): over all pixels
        of the held-out images. ``object_pixel_acc``: share of object pixels predicted as their
        class. ``image_acc``: share of images whose most predicted non-background class is their
        class. Unless ``quick``: the ``column4_parts_*`` figures of :func:`_column_figures` and
        ``shortcut_<cls>_on_<bg>_as_<name>``: for ``lupo`` and ``husko`` images forced onto grass
        or snow (``probe`` split, :data:`N_PROBE_PER_CLASS` each), the share of their object pixels
        predicted as ``lupo``, ``husko`` or ``background`` (:func:`shortcut_shares`).
    """
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    held = world.generate_arrays(n_per_class, seed, "heldout")
    truth = pixel_labels(held.masks, held.labels)
    pred = predict(model, held.images)
    res = iou_figures(confusion(pred, truth))
    obj = truth != BACKGROUND_INDEX
    res["object_pixel_acc"] = float(np.mean(pred[obj] == truth[obj]))
    counts = np.stack([(pred == c).sum((1, 2)) for c in range(len(world.CLASSES))], axis=1)
    res["image_acc"] = float(np.mean(counts.argmax(1) == held.labels))
    if quick:
        return res
    res.update(_column_figures(model, held, truth, seed))
    for cls in (world.SHORTCUT_GRASS_CLASS, world.SHORTCUT_LOOKALIKE_CLASS):
        for bg in ("bg_grass", "bg_snow"):
            shares = shortcut_shares(model, world.CLASSES.index(cls), bg, N_PROBE_PER_CLASS, seed)
            for name, v in shares.items():
                res[f"shortcut_{cls}_on_{bg[3:]}_as_{name}"] = v
    return res


def train(
    seed: int = 0,
    epochs: int = 4,
    n_per_class: int = N_TRAIN_PER_CLASS,
    batch: int = 32,
    lr: float = 3e-3,
    log: bool = True,
) -> tuple[nn.Module, dict[str, float]]:
    """Train the segmentation network on the seeded ``train`` split.

    Each step does one full-image batch (``batch`` images) and one column batch (``batch``
    columns of 1-4 crops), summing the two pixel-wise cross-entropy losses.

    Returns
    -------
    model : torch.nn.Module
        The trained network (eval mode).
    info : dict
        ``train_seconds``, ``n_train_images``, ``steps``, ``final_loss``.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1234])
    t0 = time.time()
    data = world.generate_arrays(n_per_class, seed, "train")
    images, labels = data.images, data.labels
    targets = pixel_labels(data.masks, labels)
    by_class = [np.flatnonzero(labels == c) for c in range(len(world.CLASSES))]
    if log:
        print(f"generated {len(labels)} training images in {time.time() - t0:.1f}s", flush=True)

    model = build_demo_segnet()
    # start from the class priors (about 81 % background): "all background", not chance
    prior = np.bincount(targets.ravel(), minlength=N_CLASSES) / targets.size
    assert model.head.bias is not None
    with torch.no_grad():
        model.head.bias.copy_(torch.from_numpy(np.log(np.maximum(prior, 1e-4))).float())
    loss_fn = nn.CrossEntropyLoss()

    def step_loss(idx: np.ndarray) -> torch.Tensor:
        full, tfull = _flip(images[idx], targets[idx], rng)
        cols, tcols = column_batch(
            images, targets, by_class, batch, int(rng.integers(1, 5)), rng
        )
        cols, tcols = _flip(cols, tcols, rng)
        return loss_fn(model(to_tensor(full)), torch.from_numpy(tfull)) + loss_fn(
            model(to_tensor(cols)), torch.from_numpy(tcols)
        )

    info = fit(model, step_loss, len(labels), batch, epochs, lr, rng, t0, log, ".4f")
    return model, info

def main(argv: list[str] | None = None) -> int:
    """Command line entry: train, evaluate, write weights and ``RECORD_seg.json``."""
    args = training_args("python -m demo_world.train_seg", __doc__, SEG_WEIGHTS_PATH.parent,
                         "folder for demo_segnet.pt and RECORD_seg.json", 4, argv)
    model, info = train(seed=args.seed, epochs=args.epochs, n_per_class=args.n_per_class)
    t = time.time()
    figures = evaluate(model, seed=args.seed)
    check = evaluate(model, seed=args.seed, n_per_class=CHECK_PER_CLASS, quick=True)
    print(json.dumps(figures, indent=2))
    write_weights_and_record(args, model, SEG_WEIGHTS_PATH.name, "RECORD_seg.json",
                             "demo_world.train_seg", argv, {
        **info,
        "n_params": sum(int(v.numel()) for v in model.parameters()),
        "n_heldout_images": N_HELDOUT_PER_CLASS * len(world.CLASSES),
        "heldout_split": {"seed": args.seed, "split": "heldout", "n_per_class": N_HELDOUT_PER_CLASS},
        **{k: round(v, 4) for k, v in figures.items()},
        "check": {
            "what": "evaluate(model, seed, n_per_class, quick=True): recomputed by the tests",
            "split": "heldout",
            "n_per_class": CHECK_PER_CLASS,
            **{k: round(v, 4) for k, v in check.items()},
        },
        "eval_seconds": round(time.time() - t, 1),
        "layer": DEMO_SEG_LAYER,
        "classes": SEG_CLASSES,
        "ground_truth": "a pixel whose mask concept is a part of its image's class -> that class; "
        "every other pixel -> background",
        "shortcut": {
            "grass_class": world.SHORTCUT_GRASS_CLASS,
            "lookalike_class": world.SHORTCUT_LOOKALIKE_CLASS,
            "probability": world.SHORTCUT_PROB,
            "probe": f"{N_PROBE_PER_CLASS} images per class and background, split 'probe'",
        },
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
