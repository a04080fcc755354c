"""Train the demo world's CNN on CPU and record how good it is.

Run ``python -m demo_world.train [--out DIR] [--seed 0]``. It generates the world in memory
(``train`` and ``heldout`` splits of the given seed), trains for a few minutes on 2 CPU threads and
writes ``DIR/demo_cnn.pt`` (float32 state dict) and ``DIR/RECORD.json``.

Training mixes three kinds of batches so the model works on the partial views the method feeds it
at native scale (the paper's prediction test stitches 4 crops vertically without resizing):

* full 96x96 images,
* single 32x32 crops (half grid-aligned, half at random offsets) labelled with their image's class,
* columns of 2-4 such crops from different images of the same class, stacked vertically.

Only horizontal flips are used as augmentation: backgrounds are kept as they are, so the planted
grass/snow shortcut is learned.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from demo_world import world
from explorer_core.demo_cnn import DEMO_LAYER, DEMO_MEAN, DEMO_STD, WEIGHTS_PATH, build_demo_model

__all__ = [
    "CROP",
    "column_batch",
    "crop_batch",
    "evaluate",
    "main",
    "predict",
    "to_tensor",
    "train",
]

CROP = world.DEFAULT_SIZE // 3
"""Crop side in pixels (32): the catalog's 3x3 grid at the 96-px input size."""
N_TRAIN_PER_CLASS = 300
N_HELDOUT_PER_CLASS = 100
N_PROBE_PER_CLASS = 100


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> normalised float32 ``(B, 3, H, W)`` (``(x/255 - mean) / std``)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(DEMO_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DEMO_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _crops(images: np.ndarray, idx: np.ndarray, y0: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """Gather ``CROP x CROP`` crops: images ``(N, H, W, 3)`` -> ``(len(idx), CROP, CROP, 3)``."""
    r = np.arange(CROP)
    ys = (y0[:, None] + r)[:, :, None]
    xs = (x0[:, None] + r)[:, None, :]
    return images[idx[:, None, None], ys, xs]


def _crop_offsets(
    rng: np.random.Generator, n: int, size: int, aligned_share: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners ``(y0, x0)``, each ``(n,)``: grid-aligned with prob ``aligned_share``, else free."""
    free_y = rng.integers(0, size - CROP + 1, n)
    free_x = rng.integers(0, size - CROP + 1, n)
    grid_y = rng.integers(0, 3, n) * CROP
    grid_x = rng.integers(0, 3, n) * CROP
    aligned = rng.random(n) < aligned_share
    return np.where(aligned, grid_y, free_y), np.where(aligned, grid_x, free_x)


def crop_batch(
    images: np.ndarray, labels: np.ndarray, idx: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Single crops, one per index: ``(B, 32, 32, 3)`` uint8 and labels ``(B,)``."""
    y0, x0 = _crop_offsets(rng, idx.size, images.shape[1])
    return _crops(images, idx, y0, x0), labels[idx]


def column_batch(
    images: np.ndarray,
    labels: np.ndarray,
    by_class: list[np.ndarray],
    batch: int,
    k: int,
    rng: np.random.Generator,
    aligned_share: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Columns of ``k`` crops from ``k`` images of one class each: ``(B, 32k, 32, 3)``, labels ``(B,)``."""
    cls = rng.integers(0, len(by_class), batch)
    cols = []
    for _ in range(k):
        idx = np.array([by_class[c][rng.integers(len(by_class[c]))] for c in cls])
        y0, x0 = _crop_offsets(rng, batch, images.shape[1], aligned_share)
        cols.append(_crops(images, idx, y0, x0))
    return np.concatenate(cols, axis=1), cls.astype(np.int64)


def _flip(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    f = rng.random(x.shape[0]) < 0.5
    out = x.copy()
    out[f] = out[f][:, :, ::-1]
    return out


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Predicted class indices ``(B,)`` for uint8 images ``(B, H, W, 3)`` of any one size."""
    model.eval()
    out = [
        model(to_tensor(images[i : i + batch])).argmax(1).numpy()
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def _grid_crops(images: np.ndarray) -> np.ndarray:
    """All 9 grid crops: ``(N, H, W, 3)`` -> ``(N, 9, 32, 32, 3)`` (row-major over the grid)."""
    n = images.shape[0]
    return (
        images.reshape(n, 3, CROP, 3, CROP, 3)
        .transpose(0, 1, 3, 2, 4, 5)
        .reshape(n, 9, CROP, CROP, 3)
    )


def _grid_dominant(masks: np.ndarray) -> np.ndarray:
    """Dominant concept of each grid crop: masks ``(N, H, W)`` -> ``(N, 9)``."""
    n = masks.shape[0]
    return np.array(
        [
            [
                world.dominant_concept(m, (c * CROP, r * CROP, (c + 1) * CROP, (r + 1) * CROP))
                for r in range(3)
                for c in range(3)
            ]
            for m in masks
        ]
    ).reshape(n, 9)


def evaluate(
    model: nn.Module, seed: int = 0, n_per_class: int = N_HELDOUT_PER_CLASS, full_only: bool = False
) -> dict[str, float]:
    """Held-out figures of a model on the seeded ``heldout`` split (and shortcut probes).

    Parameters
    ----------
    model : torch.nn.Module
        The demo model.
    seed : int
        World seed (the held-out split of this seed is regenerated).
    n_per_class : int
        Held-out images per class.
    full_only : bool
        Only compute ``heldout_acc_full`` (fast; what the tests check).

    Returns
    -------
    dict
        ``heldout_acc_full``: accuracy on full 96x96 images.
        ``heldout_acc_crop_all``: accuracy of all 9 grid crops (pure-background crops included).
        ``heldout_acc_crop_part``: accuracy of grid crops whose dominant concept is a class part.
        ``heldout_acc_column4``: columns of 4 random grid crops from 4 images of the class.
        ``heldout_acc_column4_parts``: columns of 4 part-dominated grid crops (the prediction test's setting).
        ``column4_parts_classes_ok``: share of classes whose part-column accuracy is >= 0.5.
        ``shortcut_*``: accuracy of the grass class and its look-alike forced onto grass / snow.
    """
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    held = world.generate_arrays(n_per_class, seed, "heldout")
    res: dict[str, float] = {
        "heldout_acc_full": float(np.mean(predict(model, held.images) == held.labels))
    }
    if full_only:
        return res
    rng = np.random.default_rng([seed, 4242])
    crops = _grid_crops(held.images)  # (N, 9, 32, 32, 3)
    dom = _grid_dominant(held.masks)  # (N, 9)
    crop_pred = predict(model, crops.reshape(-1, CROP, CROP, 3)).reshape(-1, 9)
    res["heldout_acc_crop_all"] = float(np.mean(crop_pred == held.labels[:, None]))
    is_part = dom >= len(world.BACKGROUNDS)
    res["heldout_acc_crop_part"] = float(np.mean((crop_pred == held.labels[:, None])[is_part]))

    by_class = [np.flatnonzero(held.labels == c) for c in range(len(world.CLASSES))]
    n_col = len(held.labels)
    cols, col_parts, lab = [], [], []
    for j in range(n_col):
        c = int(held.labels[j])
        imgs = rng.choice(by_class[c], 4, replace=False)
        cols.append(np.concatenate([crops[i, rng.integers(9)] for i in imgs], axis=0))
        part_cells = []
        for i in imgs:
            cells = np.flatnonzero(is_part[i])
            cell = int(rng.choice(cells)) if cells.size else int(rng.integers(9))
            part_cells.append(crops[i, cell])
        col_parts.append(np.concatenate(part_cells, axis=0))
        lab.append(c)
    lab_a = np.asarray(lab)
    ok_cols = predict(model, np.stack(cols)) == lab_a
    ok_parts = predict(model, np.stack(col_parts)) == lab_a
    res["heldout_acc_column4"] = float(ok_cols.mean())
    res["heldout_acc_column4_parts"] = float(ok_parts.mean())
    per_class = [float(ok_parts[lab_a == c].mean()) for c in range(len(world.CLASSES))]
    res["column4_parts_min_class_acc"] = min(per_class)
    res["column4_parts_classes_ok"] = float(np.mean(np.asarray(per_class) >= 0.5))

    g = world.CLASSES.index(world.SHORTCUT_GRASS_CLASS)
    h = world.CLASSES.index(world.SHORTCUT_LOOKALIKE_CLASS)
    for cls_idx, cls_name in ((g, "grass_class"), (h, "lookalike_class")):
        for bg in ("bg_grass", "bg_snow"):
            probe = world.generate_arrays(
                N_PROBE_PER_CLASS, seed, "probe", background=bg, classes=[cls_idx]
            )
            res[f"shortcut_{cls_name}_acc_on_{bg[3:]}"] = float(
                np.mean(predict(model, probe.images) == cls_idx)
            )
    return res


def train(
    seed: int = 0,
    epochs: int = 10,
    n_per_class: int = N_TRAIN_PER_CLASS,
    batch: int = 64,
    lr: float = 3e-3,
    log: bool = True,
) -> tuple[nn.Module, dict[str, float]]:
    """Train the demo CNN on the seeded ``train`` split.

    Each step does one full-image batch (``batch`` images), one single-crop batch (``2 * batch``)
    and one column batch (``batch`` columns of 2, 3 or 4 crops), summing the three losses.

    Returns
    -------
    model : torch.nn.Module
        The trained model (eval mode).
    info : dict
        ``train_seconds``, ``n_train_images``, ``steps``, ``final_loss``.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1234])
    t0 = time.time()
    data = world.generate_arrays(n_per_class, seed, "train")
    images, labels = data.images, data.labels
    by_class = [np.flatnonzero(labels == c) for c in range(len(world.CLASSES))]
    if log:
        print(f"generated {len(labels)} training images in {time.time() - t0:.1f}s", flush=True)

    model = build_demo_model()
    loss_fn = nn.CrossEntropyLoss()

    def step_loss(idx: np.ndarray) -> torch.Tensor:
        full = _flip(images[idx], rng)
        cidx = rng.integers(0, len(labels), 2 * batch)
        crops, clab = crop_batch(images, labels, cidx, rng)
        cols, col_lab = column_batch(
            images, labels, by_class, batch, int(rng.integers(2, 5)), rng
        )
        return (
            loss_fn(model(to_tensor(full)), torch.from_numpy(labels[idx]))
            + loss_fn(model(to_tensor(_flip(crops, rng))), torch.from_numpy(clab))
            + loss_fn(model(to_tensor(_flip(cols, rng))), torch.from_numpy(col_lab))
        )

    info = fit(model, step_loss, len(labels), batch, epochs, lr, rng, t0, log, ".3f")
    return model, info


def fit(
    model: nn.Module,
    step_loss: Callable[[np.ndarray], torch.Tensor],
    n_items: int,
    batch: int,
    epochs: int,
    lr: float,
    rng: np.random.Generator,
    t0: float,
    log: bool,
    loss_format: str = ".3f",
) -> dict:
    """The demo networks' training loop (classifier and segmentation net): AdamW + one-cycle
    learning rate, each epoch a seeded permutation of the ``n_items`` training images cut into
    batches of ``batch``; ``step_loss(idx)`` returns one step's loss for those images. Leaves
    ``model`` in eval mode; returns ``train_seconds``, ``n_train_images``, ``steps``,
    ``final_loss``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = n_items // batch
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    step = 0
    loss_val = float("nan")
    for ep in range(epochs):
        model.train()
        order = rng.permutation(n_items)
        run = 0.0
        for s in range(steps_per_epoch):
            loss = step_loss(order[s * batch : (s + 1) * batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            run += float(loss.detach())
        loss_val = run / steps_per_epoch
        if log:
            print(
                f"epoch {ep + 1}/{epochs} loss {loss_val:{loss_format}} "
                f"({time.time() - t0:.0f}s)",
                flush=True,
            )
    model.eval()
    return {
        "train_seconds": round(time.time() - t0, 1),
        "n_train_images": int(n_items),
        "steps": step,
        "final_loss": round(loss_val, 4),
    }


def float32_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous float32 copies (integer buffers copied as they
    are): what the committed weights files hold."""
    return {
        k: v.detach().to(torch.float32).contiguous().clone() if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
    }

def training_args(prog: str, doc: str | None, out: Path, out_help: str, epochs: int,
                  argv: list[str] | None) -> argparse.Namespace:
    """The options every demo training script takes (``--out --seed --epochs --n-per-class
    --threads``), parsed; torch's thread count set from ``--threads``."""
    p = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    p.add_argument("--out", type=Path, default=out, help=out_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--n-per-class", type=int, default=N_TRAIN_PER_CLASS)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def write_weights_and_record(args: argparse.Namespace, model: nn.Module, weights_name: str,
                             record_name: str, prog: str, argv: list[str] | None,
                             fields: dict) -> None:
    """Write the model's float32 weights and its RECORD (``fields`` between the run's settings
    and the machine it ran on) into ``args.out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / weights_name
    torch.save(float32_state(model), weights)
    record = {
        "seed": args.seed,
        "epochs": args.epochs,
        "threads": args.threads,
        **fields,
        "device": "cpu",
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus visible, {args.threads} torch threads used",
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "weights_bytes": weights.stat().st_size,
        "command": (f"python -m {prog} "
                    + shlex.join(argv if argv is not None else sys.argv[1:])).strip(),
    }
    (args.out / record_name).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {weights} and {args.out / record_name}")


def main(argv: list[str] | None = None) -> int:
    """Command line entry: train, evaluate, write weights and ``RECORD.json``."""
    args = training_args("python -m demo_world.train", __doc__, WEIGHTS_PATH.parent,
                         "folder for demo_cnn.pt and RECORD.json", 10, argv)
    model, info = train(seed=args.seed, epochs=args.epochs, n_per_class=args.n_per_class)
    t = time.time()
    figures = evaluate(model, seed=args.seed)
    print(json.dumps(figures, indent=2))
    write_weights_and_record(args, model, "demo_cnn.pt", "RECORD.json", "demo_world.train", argv, {
        **info,
        "n_heldout_images": N_HELDOUT_PER_CLASS * len(world.CLASSES),
        "heldout_split": {
            "seed": args.seed,
            "split": "heldout",
            "n_per_class": N_HELDOUT_PER_CLASS,
        },
        **{k: round(v, 4) for k, v in figures.items()},
        "eval_seconds": round(time.time() - t, 1),
        "layer": DEMO_LAYER,
        "classes": world.CLASSES,
        "shortcut": {
            "grass_class": world.SHORTCUT_GRASS_CLASS,
            "lookalike_class": world.SHORTCUT_LOOKALIKE_CLASS,
        },
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
