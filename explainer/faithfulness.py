"""Faithfulness tests (method.md §3, §5, §6): functions over results, each returning a typed result.

* :func:`prediction_test` - stitched top-1 crops of the concepts, fed without resizing.
* :func:`shift_test` - the layer output shifted along the A-vs-B normal ``relu(a + t w)``.
* :func:`patch_insertion` - a patch pasted into images predicted as B, against a control fill.

All pixel work is in ``[0, 1]`` space; :meth:`LoadedModel.normalize` is applied last.

Every test reads the model through :meth:`LoadedModel.class_scores`: a classifier's softmax, or
for a segmentation model the share of the image's pixels predicted (argmax) as each class. So for
a segmentation model the stitched test reports the share of the stitched image's pixels predicted
as A and passes when A is the most predicted class other than the background; the shifting test
and patch insertion report mean pixel shares of A and B. Each result's ``score`` names which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from explorer_core.errors import ExplorerError
from explorer_core.hooks import shifted_layer
from explorer_core.models import LoadedModel
from explorer_core.results import PatchTestResult, PredictionTestResult, ShiftTestResult

__all__ = [
    "SHIFT_OFFSETS",
    "POSITIONS",
    "stitch",
    "prediction_test",
    "prediction_tests",
    "shift_test",
    "patch_box",
    "patch_insertion",
    "patch_from_crop",
    "patch_from_region",
    "patch_from_file",
    "tile_patch",
]

SHIFT_OFFSETS = (0.0, 0.5, 1.0, 2.0, 10.0, 15.0, 20.0, 35.0, 50.0, 200.0)
POSITIONS = ("bottom-right", "bottom-left", "top-left", "top-right", "center")


def stitch(crops: torch.Tensor) -> torch.Tensor:
    """Concatenate crops ``(k, 3, c, c)`` along the height: ``(3, k*c, c)`` (top-1 of concept 0
    on top)."""
    if len(crops) == 0:
        raise ExplorerError("No crops to stitch; the crop bank returned no matches")
    return torch.cat(list(crops), dim=1)


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    return (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def prediction_tests(lm: LoadedModel, stitched: Sequence[torch.Tensor], targets: Sequence[int],
                     crop_ids: Sequence[Sequence[int]], exclude_target: bool | Sequence[bool]
                     ) -> list[PredictionTestResult]:
    """Batched :func:`prediction_test` over already stitched images ``(3, H, c)`` in [0, 1].
    Images of the same size share a forward."""
    excl = ([exclude_target] * len(stitched) if isinstance(exclude_target, bool)
            else list(exclude_target))
    out: list[PredictionTestResult | None] = [None] * len(stitched)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(stitched):
        by_shape.setdefault(tuple(s.shape), []).append(i)
    for idx in by_shape.values():
        batch = torch.stack([stitched[i] for i in idx])
        probs = lm.class_scores(batch)
        _, preds = lm.predicted_classes(probs)
        for row, i in enumerate(idx):
            p = probs[row]
            pred = int(preds[row])
            t = int(targets[i])
            out[i] = PredictionTestResult(
                target=t, exclude_target=bool(excl[i]), crop_ids=[int(c) for c in crop_ids[i]],
                prob_target=float(p[t]), predicted=pred, prob_predicted=float(p[pred]),
                passed=pred == t, stitched=_to_uint8(stitched[i]), score=lm.score_name)
    return out  # type: ignore[return-value]


def prediction_test(lm: LoadedModel, catalog: Any, crop_ids: Sequence[int], target: int,
                    exclude_target: bool) -> PredictionTestResult:
    """Stitched-crops prediction test (method.md §3).

    The crops ``crop_ids`` (top-1 crop of each concept, concept order) are concatenated along the
    height in [0, 1] space (``(3, k*c, c)``), normalised and fed **without resizing**. Returns the
    softmax probability of ``target`` and whether it is the argmax (``passed``); for a
    segmentation model the share of pixels predicted as ``target`` and whether it is the most
    predicted non-background class."""
    crops = catalog.crop_pixels(list(crop_ids), lm)
    return prediction_tests(lm, [stitch(crops)], [target], [list(crop_ids)], exclude_target)[0]


# --------------------------------------------------------------------------------------------
# shifting


def shift_test(lm: LoadedModel, layer: str, images: torch.Tensor, weight: np.ndarray | torch.Tensor,
               class_a: int, class_b: int, offsets: Sequence[float] = SHIFT_OFFSETS, *,
               image_ids: Sequence[int] = (), batch_size: int = 64) -> ShiftTestResult:
    """Hyperplane shifting test (method.md §5).

    Parameters
    ----------
    images : (B, 3, S, S) in [0, 1]
        Images predicted as ``class_b``.
    weight : (C,)
        The A-vs-B normal ``w`` (label 1 = A, so it points to A), raw (not normalised).
    offsets : the shifts ``t``; ``layer``'s output ``a`` becomes ``relu(a + t * w)`` at every
        pixel. The forward hook is removed after each offset, also on errors.

    Returns mean softmax (segmentation: mean pixel share) of A and B per offset;
    ``default_prob_a`` at ``t = 0`` (the hook applied
    with ``t = 0`` is ``relu(a) = a`` for a post-ReLU layer), ``max_prob_a`` over offsets and the
    ``best_offset``."""
    if len(images) == 0:
        raise ExplorerError(f"No images predicted as class {class_b} for the shift test")
    module = lm.module(layer)
    w = torch.as_tensor(np.asarray(weight), dtype=torch.float32).to(lm.device)
    n, k = len(images), len(offsets)
    # every (offset, image) combination, batched: row r is image r % n at offset r // n
    t_all = torch.tensor([float(t) for t in offsets], dtype=torch.float32).repeat_interleave(n)
    probs = []
    with shifted_layer(module, w, 0.0) as state, torch.inference_mode():
        for s in range(0, n * k, batch_size):
            rows = torch.arange(s, min(s + batch_size, n * k))
            state["offset"] = t_all[rows]
            x = lm.normalize(images[rows % n].to(lm.device, torch.float32))
            probs.append(lm.scores_from_outputs(lm.model(x)))
    p = torch.cat(probs).view(k, n, -1)
    pa = [float(v) for v in p[:, :, class_a].mean(1)]
    pb = [float(v) for v in p[:, :, class_b].mean(1)]
    best = int(np.argmax(pa))
    default = pa[list(offsets).index(0.0)] if 0.0 in offsets else float(
        lm.class_scores(images, batch_size=batch_size)[:, class_a].mean())
    return ShiftTestResult(class_a=int(class_a), class_b=int(class_b),
                           offsets=[float(t) for t in offsets], mean_prob_a=pa, mean_prob_b=pb,
                           default_prob_a=default, max_prob_a=pa[best],
                           best_offset=float(offsets[best]), n_images=len(images),
                           image_ids=[int(i) for i in image_ids], score=lm.score_name)


# --------------------------------------------------------------------------------------------
# patch insertion


def shifted_probabilities(lm: LoadedModel, layer: str, images: torch.Tensor,
                          weight: np.ndarray | torch.Tensor, offset: float) -> np.ndarray:
    """Per-image class scores ``(B, K)`` (softmax, or pixel shares of a segmentation model) with
    ``layer``'s output replaced by ``relu(a + t * w)`` (the shifting test's forward at one offset
    ``t``; ``images`` (B, 3, S, S) in [0, 1])."""
    w = torch.as_tensor(np.asarray(weight), dtype=torch.float32).to(lm.device)
    with shifted_layer(lm.module(layer), w, float(offset)), torch.inference_mode():
        return lm.class_scores(images).numpy()


def patch_box(image_size: int, patch_h: int, patch_w: int,
              position: str | tuple[int, int] = "bottom-right") -> tuple[int, int, int, int]:
    """Box ``(x0, y0, x1, y1)`` of a ``patch_h x patch_w`` patch in a square image of side
    ``image_size``: a named corner / ``center``, or ``(x, y)`` of the top-left corner."""
    s = image_size
    if patch_h > s or patch_w > s or patch_h < 1 or patch_w < 1:
        raise ExplorerError(f"Patch {patch_h}x{patch_w} does not fit a {s}x{s} image")
    if isinstance(position, str):
        corners = {"top-left": (0, 0), "top-right": (s - patch_w, 0),
                   "bottom-left": (0, s - patch_h), "bottom-right": (s - patch_w, s - patch_h),
                   "center": ((s - patch_w) // 2, (s - patch_h) // 2)}
        if position not in corners:
            raise ExplorerError(f"Unknown patch position '{position}'; use one of "
                                f"{', '.join(POSITIONS)} or (x, y)")
        x, y = corners[position]
    else:
        x, y = (int(v) for v in position)
        if not (0 <= x <= s - patch_w and 0 <= y <= s - patch_h):
            raise ExplorerError(f"Patch at ({x}, {y}) of size {patch_w}x{patch_h} leaves the "
                                f"{s}x{s} image; use 0 <= x <= {s - patch_w}, 0 <= y <= {s - patch_h}")
    return x, y, x + patch_w, y + patch_h


def patch_insertion(lm: LoadedModel, images_b: torch.Tensor, patch: torch.Tensor, class_a: int,
                    class_b: int, position: str | tuple[int, int] = "bottom-right",
                    control: str = "mean", *, image_ids: Sequence[int] = ()) -> PatchTestResult:
    """Patch insertion test (method.md §6).

    ``images_b`` (N, 3, S, S) in [0, 1], predicted as B; ``patch`` (3, ph, pw) in [0, 1] pasted
    at ``position``. Control: the same box filled with ``mean`` (the dataset mean colour, i.e.
    zeros after normalisation) or ``black`` (pixel value 0). Per-image softmax (segmentation:
    pixel share) of A and B before, after and with the control."""
    if control not in ("mean", "black"):
        raise ExplorerError(f"Unknown control fill '{control}'; use 'mean' or 'black'")
    if len(images_b) == 0:
        raise ExplorerError(f"No images predicted as class {class_b} to insert the patch into")
    if patch.dim() != 3 or patch.shape[0] != 3:
        raise ExplorerError(f"Patch must be a (3, h, w) image, got shape {tuple(patch.shape)}")
    x0, y0, x1, y1 = patch_box(images_b.shape[-1], patch.shape[1], patch.shape[2], position)
    after = images_b.clone()
    after[:, :, y0:y1, x0:x1] = patch.to(after.dtype)
    ctrl = images_b.clone()
    fill = (torch.tensor(lm.mean, dtype=ctrl.dtype).view(3, 1, 1) if control == "mean"
            else torch.zeros(3, 1, 1, dtype=ctrl.dtype))
    ctrl[:, :, y0:y1, x0:x1] = fill
    probs = [lm.class_scores(x) for x in (images_b, after, ctrl)]
    pa = [p[:, class_a].numpy() for p in probs]
    pb = [p[:, class_b].numpy() for p in probs]
    pos = position if isinstance(position, str) else f"{position[0]},{position[1]}"
    return PatchTestResult(class_a=int(class_a), class_b=int(class_b), position=pos,
                           box=(x0, y0, x1, y1), control=control,
                           image_ids=[int(i) for i in image_ids] or list(range(len(images_b))),
                           prob_a_before=pa[0], prob_a_after=pa[1], prob_a_control=pa[2],
                           prob_b_before=pb[0], prob_b_after=pb[1], prob_b_control=pb[2],
                           score=lm.score_name)


def patch_from_crop(lm: LoadedModel, catalog: Any, crop_id: int) -> torch.Tensor:
    """A concept crop of the catalog as a patch ``(3, c, c)`` in [0, 1]."""
    return catalog.crop_pixels([int(crop_id)], lm)[0]


def patch_from_region(lm: LoadedModel, catalog: Any, image_id: int,
                      box: tuple[int, int, int, int]) -> torch.Tensor:
    """A region ``(x0, y0, x1, y1)`` of a catalog image (after resize + center crop to the model
    input) as a patch ``(3, y1-y0, x1-x0)``."""
    img = catalog.image_pixels([int(image_id)], lm)[0]
    s = img.shape[-1]
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= s and 0 <= y0 < y1 <= s):
        raise ExplorerError(f"Region {box} is not inside the {s}x{s} image; give x0 < x1 and "
                            f"y0 < y1 within 0..{s}")
    return img[:, y0:y1, x0:x1].clone()


def patch_from_file(lm: LoadedModel, path: str | Path, size: int | None = None) -> torch.Tensor:
    """An image file resized to the crop size (``input_size // 3``, or ``size``) as a patch."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ExplorerError(f"Patch image '{path}' not found; give an existing image file")
    try:
        img = Image.open(p).convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoding problem is a user file problem
        raise ExplorerError(f"Cannot read '{path}' as an image: {exc}") from exc
    c = int(size or lm.crop_size)
    img = img.resize((c, c), lm.interpolation)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def tile_patch(patch: torch.Tensor, times: int) -> torch.Tensor:
    """``patch`` (3, h, w) repeated ``times`` x ``times`` into a (3, times*h, times*w) patch (a
    larger patch of the same texture; ``times`` 1: the patch itself)."""
    t = int(times)
    if t < 1:
        raise ExplorerError(f"Tile factor {times}: use a whole number >= 1")
    return patch.repeat(1, t, t).contiguous()
