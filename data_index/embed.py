"""The catalog build's compute step: decode a chunk of images, forward them once, and return
everything the catalog stores of them (:class:`ChunkResult`), with no database or file writes.

The single-process build, every shard of a sharded build and every Ray worker run exactly this
code (:func:`compute_chunk`), so their catalogs are equal.

* **One forward, several layers.** Forward hooks on every catalog layer record each layer's
  output reduced at once: in ``crop`` mode every crop is forwarded at its native size and a
  layer's crop embedding is the spatial mean of its activations; in ``cell`` mode the whole
  image is forwarded once and each layer is area-pooled over exactly the crop boxes
  (:meth:`~data_index.crops.CropGrid.cell_pool`). A layer's embeddings do not depend on which
  other layers are hooked.
* **Predictions** go through the model adapter only (:meth:`LoadedModel.summarize
  <explorer_core.models.LoadedModel.summarize>`): per image ``pred``, ``conf``, ``top5`` and,
  for segmentation models, the pixel share of every class; per crop ``pred`` / ``conf`` from
  the crop's own forward (``crop`` mode), or in ``cell`` mode, for dense (``(B, K, H, W)``)
  outputs, from the whole image's prediction inside the crop's box (classifiers: none, NULL).
* **Bounded memory.** A forward batch holds at most ``batch_size * input_size**2`` pixels (the
  pixels of ``batch_size`` model inputs): ``batch_size`` images at the model's own size, a
  single 1536 px image for a 96 px model. Crops are cut per forward, never all at once, and
  images are decoded a few batches ahead (:func:`stream_decoded`, as 8-bit pixels), never a
  whole chunk.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from explorer_core.errors import ExplorerError
from explorer_core.hooks import forward_hooks

from .crops import CropGrid
from .datasets import ImageEntry, escape_rel, try_load_rgb

__all__ = ["ChunkResult", "Embedder", "compute_chunk", "decode_image", "stream_decoded",
           "min_side_of"]

Decoded = tuple[torch.Tensor | None, str | None]


@dataclass
class ChunkResult:
    """What the catalog stores of one chunk of images (``n`` kept images, ``P`` crops each).

    Attributes
    ----------
    chunk_id : int
    n_files : int
        Files of the chunk (kept + skipped).
    image_ids : ndarray (n,) int64
    rels : list of str
        Stored (escaped) relative paths of the kept images.
    labels : ndarray (n,) int64
        Label or -1.
    label_names : list of str
        Label name or "".
    pred, conf, top5 : ndarray (n,) int64, (n,) float32, (n, t) int64
        Image predictions (:class:`explorer_core.models.Predictions`).
    shares : ndarray (n, K) float32 or None
        Predicted pixel share of every class (segmentation models), else None.
    crop_pred, crop_conf : ndarray (n * P,) int64 / float32, or None
        Crop predictions (None: NULL in the catalog).
    emb : ndarray (n * P, sum of the layers' channels) float32
        Crop embeddings, crop-id order, the layers side by side in catalog order.
    skipped : list of (str, str)
        ``(stored path, reason)`` of each skipped file.
    seconds : float
        Decode + forward time of the chunk.
    """

    chunk_id: int
    n_files: int
    image_ids: np.ndarray
    rels: list[str]
    labels: np.ndarray
    label_names: list[str]
    pred: np.ndarray
    conf: np.ndarray
    top5: np.ndarray
    shares: np.ndarray | None
    crop_pred: np.ndarray | None
    crop_conf: np.ndarray | None
    emb: np.ndarray
    skipped: list[tuple[str, str]]
    seconds: float = 0.0


def min_side_of(grid: CropGrid) -> int:
    """Shorter side below which a file is skipped: half a crop (at least 8 px). Smaller photos
    above it are upscaled by the ordinary resize."""
    return max(8, grid.crop_size // 2)


def decode_image(entry: ImageEntry, lm: Any, size: int, min_side: int) -> Decoded:
    """``(pixels (3, size, size) uint8, None)`` or ``(None, reason)`` for a skipped file.

    The pixels are ``lm.geometry``'s, kept as the 8-bit values they are made of (a quarter of
    the memory while they wait for their batch); :func:`to_unit` gives back exactly
    ``lm.geometry``'s ``[0, 1]`` floats."""
    img, reason = try_load_rgb(entry.path, min_side)
    if img is None:
        return None, reason
    try:
        px = lm.geometry(img, size)
    except Exception as exc:  # noqa: BLE001 - a file that decodes but fails resizing is skipped
        return None, f"cannot resize image: {exc}"
    return px.mul_(255.0).round_().to(torch.uint8), None


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in ``[0, 1]``: ``u / 255`` in float32, bit-identical to
    :meth:`LoadedModel.geometry <explorer_core.models.LoadedModel.geometry>`'s values."""
    return pixels.to(torch.float32).div_(255.0)


def stream_decoded(entries: Iterable[ImageEntry], lm: Any, size: int, min_side: int,
                   pool: ThreadPoolExecutor, window: int) -> Generator[Decoded, None, None]:
    """Decoded images of ``entries`` in order, at most ``window`` decoded ahead (memory:
    ``window`` images of ``3 x size x size`` float32, whatever the number of entries)."""
    pending: deque[Future] = deque()
    it = iter(entries)

    def fill() -> None:
        while len(pending) < window:
            e = next(it, None)
            if e is None:
                return
            pending.append(pool.submit(decode_image, e, lm, size, min_side))

    try:
        fill()
        while pending:
            result = pending.popleft().result()
            fill()
            yield result
    finally:
        for f in pending:
            f.cancel()


class Embedder:
    """Forward passes of ``[0, 1]`` image batches: image predictions, crop predictions and the
    crop embeddings of every catalog layer (see the module docstring).

    Parameters
    ----------
    lm : LoadedModel
    layers : sequence of str
        Module names, in catalog order.
    mode : ``crop`` | ``cell``
    grid : CropGrid
    batch_size : int
        Forward batches hold at most ``batch_size * lm.input_size**2`` pixels.
    """

    def __init__(self, lm: Any, layers: Sequence[str], mode: str, grid: CropGrid,
                 batch_size: int) -> None:
        if mode not in ("crop", "cell"):
            raise ExplorerError(f"Unknown embedding mode '{mode}'; use crop or cell")
        self.lm, self.layers, self.mode, self.grid = lm, list(layers), mode, grid
        self.modules = [lm.module(name) for name in self.layers]
        self.dims = [int(lm.layer_info(name).shape[0]) for name in self.layers]
        budget = int(batch_size) * lm.input_size ** 2
        self.images_per_batch = max(1, min(int(batch_size), budget // grid.image_size ** 2))
        self.crops_per_forward = max(1, min(self.images_per_batch * grid.per_image,
                                            budget // grid.crop_size ** 2))

    @property
    def total_dim(self) -> int:
        return sum(self.dims)

    def _forward(self, pixels: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Model outputs and each layer's reduced output for ``pixels`` (one forward)."""
        store: dict[int, torch.Tensor] = {}

        def hook_for(i: int) -> Callable[..., None]:
            def hook(_m: Any, _i: Any, out: torch.Tensor) -> None:
                store[i] = reduce(out.float())  # at once: later in-place ops can't touch it
            return hook

        with forward_hooks([(m, hook_for(i)) for i, m in enumerate(self.modules)]):
            outputs = self.lm.model(self.lm.normalize(pixels.to(self.lm.device, torch.float32)))
        missing = [self.layers[i] for i in range(len(self.layers)) if i not in store]
        if missing:
            raise ExplorerError(f"Layer(s) {', '.join(missing)} did not run in the forward "
                                "pass; pick other layers")
        return outputs, [store[i] for i in range(len(self.layers))]

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> dict[str, Any]:
        """One batch ``(B, 3, S, S)`` -> ``{"img": Predictions, "crop_pred": (B*P,) | None,
        "crop_conf": (B*P,) | None, "emb": (B*P, total_dim) float32}``."""
        b, P = pixels.shape[0], self.grid.per_image
        if self.mode == "cell":
            outputs, embs = self._forward(pixels, self.grid.cell_pool)
            img = self.lm.summarize(outputs)
            emb = torch.cat([e.reshape(b * P, -1) for e in embs], dim=1)
            crop_pred, crop_conf = self._dense_crop_predictions(outputs)
        else:
            x = self.lm.normalize(pixels.to(self.lm.device, torch.float32))
            img = self.lm.summarize(self.lm.model(x))
            boxes = self.grid.boxes()
            parts, preds, confs = [], [], []
            for start in range(0, b * P, self.crops_per_forward):
                flat = range(start, min(b * P, start + self.crops_per_forward))
                crops = torch.stack([pixels[f // P, :, y0:y1, x0:x1] for f in flat
                                     for (x0, y0, x1, y1) in [boxes[f % P][2]]])
                out_c, embs = self._forward(crops, lambda a: a.mean(dim=(2, 3)))
                pc = self.lm.summarize(out_c)
                parts.append(torch.cat(embs, dim=1).cpu())
                preds.append(pc.pred)
                confs.append(pc.conf)
            emb = torch.cat(parts)
            crop_pred, crop_conf = np.concatenate(preds), np.concatenate(confs)
        return {"img": img, "crop_pred": crop_pred, "crop_conf": crop_conf,
                "emb": emb.cpu().numpy().astype(np.float32, copy=False)}

    def _dense_crop_predictions(self, outputs: torch.Tensor
                                ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Cell mode: for dense outputs ``(B, K, H, W)`` each crop's dominant predicted class
        inside its box (its box mapped to the output's resolution); classifiers: None."""
        if outputs.dim() != 4:
            return None, None
        b, P = outputs.shape[0], self.grid.per_image
        h, w = outputs.shape[-2:]
        s = self.grid.image_size
        pred = np.zeros((b, P), np.int64)
        conf = np.zeros((b, P), np.float32)
        for k, (_, _, (x0, y0, x1, y1)) in enumerate(self.grid.boxes()):
            ya, xa = y0 * h // s, x0 * w // s
            yb, xb = max(ya + 1, y1 * h // s), max(xa + 1, x1 * w // s)
            p = self.lm.summarize(outputs[:, :, ya:yb, xa:xb])
            pred[:, k], conf[:, k] = p.pred, p.conf
        return pred.ravel(), conf.ravel()


def compute_chunk(embedder: Embedder, chunk_id: int, first_id: int,
                  entries: Sequence[ImageEntry], decoded: Iterator[Decoded],
                  on_images: Callable[[int], None] | None = None) -> ChunkResult:
    """Forward the chunk ``entries`` (image ids ``first_id + j``) whose decoded pixels come, in
    order, from ``decoded``; ``on_images(n)`` after each forward batch with the number of the
    chunk's files handled so far."""
    t = time.perf_counter()
    ids: list[int] = []
    kept: list[ImageEntry] = []
    skipped: list[tuple[str, str]] = []
    outs: list[dict[str, Any]] = []
    batch: list[torch.Tensor] = []

    def flush(handled: int) -> None:
        if batch:
            outs.append(embedder(to_unit(torch.stack(batch))))
            batch.clear()
        if on_images is not None:
            on_images(handled)

    for j, e in enumerate(entries):
        px, reason = next(decoded)
        if px is None:
            skipped.append((escape_rel(e.rel), reason or "unknown error"))
            continue
        ids.append(first_id + j)
        kept.append(e)
        batch.append(px)
        if len(batch) >= embedder.images_per_batch:
            flush(j + 1)
    flush(len(entries))

    def cat(key: str, dtype: Any, width: int | None = None) -> np.ndarray:
        if outs:
            return np.concatenate([np.asarray(getattr(o["img"], key)) for o in outs]
                                  ).astype(dtype)
        return np.zeros((0,) if width is None else (0, width), dtype)

    with_crop_preds = bool(outs) and outs[0]["crop_pred"] is not None
    with_shares = bool(outs) and outs[0]["img"].shares is not None
    return ChunkResult(
        chunk_id=int(chunk_id), n_files=len(entries),
        image_ids=np.asarray(ids, np.int64),
        rels=[escape_rel(e.rel) for e in kept],
        labels=np.asarray([-1 if e.label is None else e.label for e in kept], np.int64),
        label_names=[e.label_name or "" for e in kept],
        pred=cat("pred", np.int64), conf=cat("conf", np.float32), top5=cat("top5", np.int64, 5),
        shares=np.concatenate([o["img"].shares for o in outs]).astype(np.float32)
        if with_shares else None,
        crop_pred=np.concatenate([o["crop_pred"] for o in outs]).astype(np.int64)
        if with_crop_preds else None,
        crop_conf=np.concatenate([o["crop_conf"] for o in outs]).astype(np.float32)
        if with_crop_preds else None,
        emb=np.ascontiguousarray(np.concatenate([o["emb"] for o in outs]), np.float32) if outs
        else np.zeros((0, embedder.total_dim), np.float32),
        skipped=skipped, seconds=time.perf_counter() - t)
