"""The crop catalog: one streaming, resumable pass over an image folder, and its reader.

:func:`build_catalog` writes, for a :class:`~data_index.workspace.Workspace`:

* ``catalog.duckdb`` with the tables
  ``images(image_id, path, label, label_name, pred, conf, top5)``,
  ``crops(crop_id, image_id, row, col, x0, y0, x1, y1, pred, conf)``,
  ``skipped(path, reason, chunk_id)``, ``chunks(chunk_id, n_images, done_at)`` and
  ``meta(key, value)``;
* ``index/embeddings.npy`` (N, C) float32 raw crop embeddings in ``crop_id`` order,
  ``index/crop_ids.npy`` (N,) int64 and ``index/flat.faiss`` -- an
  ``IndexIDMap2(IndexFlatIP(C))`` over the L2-normalised embeddings, ids = crop ids.

Ids: ``image_id`` is the file's position in the folder's sorted listing (see
:class:`~data_index.datasets.ImageFolder`); skipped files leave gaps. ``crop_id = image_id * 9 +
row * 3 + col``. Paths in the tables are relative POSIX paths under the workspace's image folder,
stored through :func:`~data_index.datasets.escape_rel` (a file name that is not valid UTF-8 is
indexed with its bad bytes written ``%XX``; the reader maps them back with
:func:`~data_index.datasets.unescape_rel`). Sub-folders that cannot be listed are rows of
``skipped`` (path ending in ``/``, ``chunk_id`` -1).

Embedding modes (``ws.mode``):

* ``crop`` (default, paper text): each 3x3-grid crop (``S//3`` px, cut in [0, 1] pixel space) is
  forwarded at its native size; its embedding is the spatial mean of the layer's activations and
  its prediction / confidence come from the same forward.
* ``cell`` (faster): one forward of the whole image; embeddings are the layer's activations
  area-pooled over exactly the crop boxes (:func:`~data_index.crops.cell_pool`). Crop predictions
  would cost another forward of 9 crops (about as much as the whole image again), so cell mode
  stores **NULL** crop ``pred`` / ``conf`` and the "exclude target class" filter then rests on the
  source image's prediction only. :class:`~explorer_core.results.CropRef` shows ``crop_pred = -1``.

Resumability: the folder is processed in chunks (``chunk_size`` images). A chunk's embeddings are
written to ``index/emb_{chunk:05d}.npy`` (tmp file + rename) *before* one DuckDB transaction
inserts all its rows together with its ``chunks`` row. A build killed at any point and re-run
skips the committed chunks, redoes the partial one and ends with exactly the rows of a clean run.
A committed chunk whose ``emb_*.npy`` file is unreadable stops the resume with an error that names
the file and the ``--rebuild`` command.

Locking (:mod:`data_index.locking`): a build holds the workspace lock exclusively before it deletes
(``rebuild``) or writes anything, so a build or rebuild of a workspace that another process is
building or reading fails at once with one clear error; a build of an already complete catalog
only reads it (shared lock) and returns. :class:`Catalog` readers hold the lock shared.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import duckdb
import numpy as np
import torch

from explorer_core.errors import ExplorerError
from explorer_core.hooks import forward_hooks
from explorer_core.progress import Meter, Progress, ProgressFn, report
from explorer_core.results import CropRef

from .crops import GRID, cell_pool, crop_boxes, cut_crops
from .datasets import ImageEntry, ImageFolder, escape_rel, try_load_rgb, unescape_rel
from .locking import WorkspaceLock, lock_workspace
from .workspace import Workspace

__all__ = ["BuildStats", "Catalog", "build_catalog", "EXPORTABLE_TABLES"]

SCHEMA_VERSION = "1"
EXPORTABLE_TABLES = ("images", "crops", "skipped", "chunks", "meta")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    image_id BIGINT PRIMARY KEY, path VARCHAR NOT NULL, label INTEGER, label_name VARCHAR,
    pred INTEGER NOT NULL, conf FLOAT NOT NULL, top5 INTEGER[] NOT NULL);
CREATE TABLE IF NOT EXISTS crops (
    crop_id BIGINT PRIMARY KEY, image_id BIGINT NOT NULL, "row" TINYINT NOT NULL,
    col TINYINT NOT NULL, x0 SMALLINT NOT NULL, y0 SMALLINT NOT NULL, x1 SMALLINT NOT NULL,
    y1 SMALLINT NOT NULL, pred INTEGER, conf FLOAT);
CREATE TABLE IF NOT EXISTS skipped (path VARCHAR NOT NULL, reason VARCHAR NOT NULL,
    chunk_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (chunk_id INTEGER PRIMARY KEY, n_images INTEGER NOT NULL,
    done_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
"""


@dataclass
class BuildStats:
    n_images: int
    n_crops: int
    n_skipped: int
    n_chunks: int
    chunks_resumed: int
    seconds: float
    images_per_s: float
    mode: str
    dim: int
    complete: bool = True
    already_complete: bool = False


# --------------------------------------------------------------------------------------------
# helpers


def _fingerprint(entries: Sequence[ImageEntry]) -> str:
    h = hashlib.sha1()
    for e in entries:
        h.update(e.rel.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()


def _counts(con: duckdb.DuckDBPyConnection) -> tuple[int, int, int, int]:
    """Rows of ``images``, ``crops``, ``skipped`` and ``chunks``."""
    row = con.execute("SELECT (SELECT count(*) FROM images), (SELECT count(*) FROM crops), "
                      "(SELECT count(*) FROM skipped), (SELECT count(*) FROM chunks)").fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _connect_rw(path: Path) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(str(path))
    except duckdb.Error as exc:
        raise ExplorerError(f"Cannot open {path} for writing ({exc}); is another process (the "
                            "app, another build) using this workspace? Close it and retry") from exc


def _rebuild_hint(ws: Workspace) -> str:
    return f"rebuild it with 'python -m data_index build --workspace {ws.root} --rebuild'"


def _unreadable_index_file(ws: Workspace, path: Path, exc: BaseException | str) -> ExplorerError:
    return ExplorerError(f"The index file {path} of workspace '{ws.name}' is unreadable or "
                         f"truncated ({exc}); {_rebuild_hint(ws)}")


def _open_complete(ws: Workspace) -> tuple[duckdb.DuckDBPyConnection, _Reader] | None:
    """``(cursor, reader)`` on the catalog (shared lock) when it is complete, else ``None``
    with nothing held. Raises when a build is running in another process."""
    if not ws.catalog_path.is_file():
        return None
    con, reader = _reader_connection(ws.catalog_path)  # raises if another process is building
    try:
        complete = dict(con.execute("SELECT key, value FROM meta").fetchall()).get("complete")
    except duckdb.Error:
        complete = None
    if complete == "true":
        return con, reader
    con.close()
    _drop_reader(reader)
    return None


def _check_index_files(ws: Workspace, n: int, dim: int) -> None:
    """Cheap checks (headers and sizes, no data read) that ``index/`` holds ``n`` crops of
    ``dim`` dimensions; raises naming the first file that is truncated or does not fit."""
    d = ws.index_dir
    for name, shape, dtype in (("crop_ids.npy", (n,), np.int64),
                               ("embeddings.npy", (n, dim), np.float32)):
        try:
            a = np.load(d / name, mmap_mode="r", allow_pickle=False)  # checks the length too
        except (OSError, ValueError, EOFError) as exc:
            raise _unreadable_index_file(ws, d / name, exc) from exc
        if a.shape != shape or a.dtype != dtype:
            raise _unreadable_index_file(ws, d / name, f"shape {a.shape} {a.dtype}, expected "
                                                       f"{shape} {np.dtype(dtype)}")
        del a
    need = n * (4 * dim + 8)  # an IndexIDMap2(IndexFlatIP): the vectors and their ids
    size = (d / "flat.faiss").stat().st_size
    if size < need:
        raise _unreadable_index_file(ws, d / "flat.faiss", f"{size} bytes, {n} crops of {dim} "
                                                           f"dimensions need at least {need}")


def _check_chunk_files(ws: Workspace, chunk_ids: Sequence[int], dim: int) -> None:
    """Every committed chunk's ``emb_*.npy`` exists and its header fits (``(n, dim)`` float32,
    file long enough) -- checked before a resume does any work."""
    for k in sorted(chunk_ids):
        f = ws.index_dir / f"emb_{k:05d}.npy"
        if not f.is_file():
            raise ExplorerError(f"The chunk file {f} of a committed chunk is missing; "
                                f"{_rebuild_hint(ws)}")
        try:
            e = np.load(f, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise _unreadable_index_file(ws, f, exc) from exc
        if e.ndim != 2 or (len(e) and e.shape[1] != dim) or e.dtype != np.float32:
            raise _unreadable_index_file(ws, f, f"shape {e.shape} {e.dtype}, expected "
                                                f"(n, {dim}) float32")
        del e


def _decode(entry: ImageEntry, lm: Any, min_side: int) -> tuple[torch.Tensor | None, str | None]:
    img, reason = try_load_rgb(entry.path, min_side)
    if img is None:
        return None, reason
    try:
        return lm.geometry(img), None
    except Exception as exc:  # noqa: BLE001 - a file that decodes but fails resizing is skipped
        return None, f"cannot resize image: {exc}"


class _Embedder:
    """Forward passes for one batch of [0, 1] images: image logits + crop embeddings/preds."""

    def __init__(self, lm: Any, layer: str, mode: str) -> None:
        self.lm, self.mode = lm, mode
        self.module = lm.module(layer)
        self.s = lm.input_size

    def _forward(self, pixels: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        store: dict[str, torch.Tensor] = {}

        def hook(_m: Any, _i: Any, out: torch.Tensor) -> None:
            store["out"] = reduce(out.float())  # reduce at once: later in-place ops can't touch it

        with forward_hooks([(self.module, hook)]):
            x = self.lm.normalize(pixels.to(self.lm.device, torch.float32))
            logits = self.lm.model(x).float()
        if "out" not in store:
            raise ExplorerError("The layer did not run in the forward pass; pick another layer")
        return logits, store["out"]

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> dict[str, np.ndarray | None]:
        b = pixels.shape[0]
        if self.mode == "cell":
            logits, emb = self._forward(pixels, lambda a: cell_pool(a, self.s))
            crop_pred = crop_conf = None
        else:
            logits = self.lm.model(self.lm.normalize(pixels.to(self.lm.device,
                                                                torch.float32))).float()
            crops = cut_crops(pixels, self.s)
            clog, emb = self._forward(crops, lambda a: a.mean(dim=(2, 3)))
            cprob = torch.softmax(clog, dim=1)
            cconf, cpred = cprob.max(dim=1)
            crop_pred, crop_conf = cpred.cpu().numpy(), cconf.cpu().numpy()
        prob = torch.softmax(logits, dim=1)
        conf, pred = prob.max(dim=1)
        top5 = torch.topk(logits, min(5, logits.shape[1]), dim=1).indices
        return {
            "pred": pred.cpu().numpy(), "conf": conf.cpu().numpy(), "top5": top5.cpu().numpy(),
            "emb": emb.reshape(b * GRID * GRID, -1).cpu().numpy().astype(np.float32),
            "crop_pred": crop_pred, "crop_conf": crop_conf,
        }


# --------------------------------------------------------------------------------------------
# build


def build_catalog(ws: Workspace, *, batch_size: int = 32, device: str = "auto",
                  progress: ProgressFn | None = None,
                  limit: int | None = None, model: Any = None, chunk_size: int = 256,
                  num_workers: int | None = None, rebuild: bool = False) -> BuildStats:
    """Build (or resume) the crop catalog of ``ws``; see the module docstring.

    Parameters
    ----------
    batch_size : images per forward (crop mode forwards ``9 * batch_size`` crops at once).
    device : ``auto`` | ``cpu`` | ``cuda``; ``auto`` uses the workspace's device setting.
    progress : called with a :class:`~explorer_core.progress.Progress` after every forward batch
        (stage ``index``, images done / total with rate and ETA), then ``assemble`` and ``done``.
    limit : index only the first ``limit`` files of the sorted listing.
    model : an already loaded :class:`~explorer_core.models.LoadedModel` (else ``ws.model`` is loaded).
    chunk_size : images per resumable chunk (bounded memory: about two chunks of pixels).
    num_workers : JPEG-decoding threads overlapping the forward (default ``min(4, cpus)``).
    rebuild : delete an existing catalog of this workspace first (under the exclusive
        workspace lock: refused while another process builds or reads the workspace).
    """
    t_start = time.perf_counter()
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size),
                        ("limit", 1 if limit is None else limit)):
        if int(value) < 1:
            raise ExplorerError(f"{name}={value}: use at least 1")
    if model is None:
        from explorer_core.models import shared_model

        model = shared_model(ws.model, ws.device if device in (None, "", "auto") else device)
    lm = model
    if lm.input_size != ws.input_size:
        raise ExplorerError(f"Workspace input size {ws.input_size} does not match model "
                            f"{lm.spec} ({lm.input_size}); create a new workspace")
    info = lm.layer_info(ws.layer)  # raises listing valid layers
    if ws.mode not in ("crop", "cell"):
        raise ExplorerError(f"Unknown embedding mode '{ws.mode}'; use crop or cell")
    folder = ImageFolder(ws.images_path)
    ws.root.mkdir(parents=True, exist_ok=True)
    lock: WorkspaceLock | None = None
    reader: _Reader | None = None
    opened = None if rebuild else _open_complete(ws)  # complete: read it, build nothing
    if opened is not None:
        con, reader = opened
    else:
        _release_readers(ws.catalog_path)  # this process's own readers would block the lock
        lock = lock_workspace(ws.root, exclusive=True)  # before anything is deleted or written
        try:
            if rebuild:
                _delete_catalog(ws)
            ws.index_dir.mkdir(parents=True, exist_ok=True)
            con = _connect_rw(ws.catalog_path)
        except BaseException:
            lock.release()
            raise
    try:
        if lock is not None:
            con.execute(_SCHEMA)
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        if limit is None and meta.get("limit"):  # resuming a limited build: same limit
            limit = int(meta["limit"])
        entries = folder.entries if limit is None else folder.entries[:max(0, int(limit))]
        if not entries:
            raise ExplorerError(f"No images (jpg, jpeg, png, bmp, gif, webp, tif, tiff) found "
                                f"under '{ws.images_path}'")
        total = len(entries)
        fp = _fingerprint(entries)
        want = {"schema": SCHEMA_VERSION, "model": lm.spec, "layer": ws.layer, "mode": ws.mode,
                "input_size": str(lm.input_size), "fingerprint": fp, "n_files": str(total),
                "chunk_size": str(chunk_size)}
        if meta:
            diff = [k for k, v in want.items() if meta.get(k) != v]
            if diff:
                raise ExplorerError(
                    f"The catalog in '{ws.root}' was built with other settings or another image "
                    f"list ({', '.join(diff)} differ); rebuild it with "
                    f"'python -m data_index build --workspace {ws.root} --rebuild'")
            if meta.get("complete") == "true":
                n_img, n_crop, n_sk, n_ch = _counts(con)
                report(progress, "done", total, total, "images")
                return BuildStats(n_img, n_crop, n_sk, n_ch, n_ch, 0.0, 0.0, ws.mode,
                                  int(meta.get("dim", 0)), True, True)
        else:
            con.execute("BEGIN TRANSACTION")
            for key, val in {**want, "dim": str(info.shape[0]), "complete": "false",
                             "images_root": str(ws.images_path),
                             "limit": "" if limit is None else str(int(limit))}.items():
                con.execute("INSERT INTO meta VALUES (?, ?)", [key, val])
            for path, reason in folder.unreadable:  # folders os.walk could not list
                con.execute("INSERT INTO skipped VALUES (?, ?, -1)", [escape_rel(path), reason])
            con.execute("COMMIT")
        if lock is None:  # opened read-only for a complete catalog that no longer matches
            raise ExplorerError(f"The catalog in '{ws.root}' is not complete; "
                                f"{_rebuild_hint(ws)}")

        n_chunks = (total + chunk_size - 1) // chunk_size
        done = {r[0] for r in con.execute("SELECT chunk_id FROM chunks").fetchall()}
        _check_chunk_files(ws, list(done), info.shape[0])
        todo = [k for k in range(n_chunks) if k not in done]
        done_images = sum(min(chunk_size, total - k * chunk_size) for k in done)
        embedder = _Embedder(lm, ws.layer, ws.mode)
        boxes = crop_boxes(lm.input_size)
        # Smaller-than-a-crop photos are upscaled by the usual resize, as any ImageNet pipeline
        # does (two of the shared ImageNet photos are 56 and 68 px high); only images under half
        # a crop side, where the upscaled pixels would carry nothing, are skipped.
        min_side = max(8, lm.crop_size // 2)
        workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode")
        processed = 0
        meter = Meter(progress, "index", total, "images", min_interval=1.0)
        meter.start_at(done_images)

        def submit(k: int) -> list[Future]:
            return [pool.submit(_decode, e, lm, min_side)
                    for e in entries[k * chunk_size:(k + 1) * chunk_size]]

        try:
            pending = submit(todo[0]) if todo else []
            for i, k in enumerate(todo):
                futures = pending
                pending = submit(todo[i + 1]) if i + 1 < len(todo) else []  # overlap decoding
                base = done_images

                def on_images(n: int, base: int = base) -> None:
                    meter.update(base + n)

                _index_chunk(con, ws, k, entries[k * chunk_size:(k + 1) * chunk_size], futures,
                             embedder, boxes, batch_size, k * chunk_size, on_images)
                processed += len(futures)
                done_images += len(futures)
                saved = n_chunks - len(todo) + i + 1
                meter.update(done_images, message=f"{saved}/{n_chunks} chunks saved", force=True)
        finally:
            for f in pending if todo else []:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

        report(progress, "assemble", total, total, "images")
        dim = _assemble(con, ws, n_chunks, info.shape[0])
        con.execute("BEGIN TRANSACTION")
        con.execute("DELETE FROM meta WHERE key IN ('complete', 'dim', 'built_at', 'seconds', "
                    "'build_id')")
        secs = time.perf_counter() - t_start
        # build_id: new on every completed build, part of the result cache's keys
        for key, val in {"complete": "true", "dim": str(dim), "seconds": f"{secs:.1f}",
                         "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         "build_id": uuid.uuid4().hex}.items():
            con.execute("INSERT INTO meta VALUES (?, ?)", [key, val])
        con.execute("COMMIT")
        for k in range(n_chunks):
            (ws.index_dir / f"emb_{k:05d}.npy").unlink(missing_ok=True)
        n_img, n_crop, n_sk, _ = _counts(con)
    finally:
        con.close()
        if lock is not None:
            lock.release()
        if reader is not None:
            _drop_reader(reader)
    secs = time.perf_counter() - t_start
    if progress:
        progress(Progress("done", total, total, "images", processed / max(secs, 1e-9), 0.0))
    return BuildStats(n_img, n_crop, n_sk, n_chunks, n_chunks - len(todo), secs,
                      processed / max(secs, 1e-9), ws.mode, dim)


def _index_chunk(con: duckdb.DuckDBPyConnection, ws: Workspace, k: int,
                 entries: Sequence[ImageEntry], futures: list[Future], embedder: _Embedder,
                 boxes: list, batch_size: int, first_id: int,
                 on_images: Callable[[int], None] | None = None) -> None:
    """Decode, forward and commit one chunk; ``on_images(n)`` after each forward batch with the
    number of the chunk's files handled so far (decoded or skipped)."""
    ids: list[int] = []
    kept: list[ImageEntry] = []
    skipped: list[tuple[str, str]] = []
    outs: list[dict[str, Any]] = []
    batch: list[torch.Tensor] = []

    def flush(handled: int) -> None:
        if batch:
            outs.append(embedder(torch.stack(batch)))
            batch.clear()
        if on_images is not None:
            on_images(handled)

    for j, (e, fut) in enumerate(zip(entries, futures)):
        px, reason = fut.result()
        if px is None:
            skipped.append((escape_rel(e.rel), reason or "unknown error"))
            continue
        ids.append(first_id + j)
        kept.append(e)
        batch.append(px)
        if len(batch) >= batch_size:
            flush(j + 1)
    flush(len(entries))

    c = GRID * GRID
    dim = outs[0]["emb"].shape[1] if outs else 0
    emb = np.concatenate([o["emb"] for o in outs]) if outs else np.zeros((0, dim), np.float32)
    _atomic_save_npy(ws.index_dir / f"emb_{k:05d}.npy", np.ascontiguousarray(emb, np.float32))

    con.execute("BEGIN TRANSACTION")
    try:
        if ids:
            n = len(ids)
            pred = np.concatenate([o["pred"] for o in outs]).astype(np.int32)
            conf = np.concatenate([o["conf"] for o in outs]).astype(np.float32)
            top5 = np.concatenate([o["top5"] for o in outs]).astype(np.int32)
            top5_list = [list(map(int, r)) for r in top5]
            img_tab = {
                "image_id": np.asarray(ids, np.int64),
                "path": np.asarray([escape_rel(e.rel) for e in kept], dtype=object),
                "label": np.asarray([-1 if e.label is None else e.label for e in kept], np.int64),
                "label_name": np.asarray([e.label_name or "" for e in kept], dtype=object),
                "pred": pred, "conf": conf,
            }
            img_tab["top5_str"] = np.asarray([",".join(map(str, t)) for t in top5_list],
                                             dtype=object)
            con.register("_img_tab", img_tab)
            con.execute("""INSERT INTO images SELECT image_id, path, NULLIF(label, -1),
                NULLIF(label_name, ''), pred, conf,
                CAST(string_split(top5_str, ',') AS INTEGER[]) FROM _img_tab""")
            con.unregister("_img_tab")
            rows = np.asarray([b[0] for b in boxes] * n, np.int8)
            cols = np.asarray([b[1] for b in boxes] * n, np.int8)
            bx = np.asarray([b[2] for b in boxes] * n, np.int16).reshape(-1, 4)
            img_ids = np.repeat(np.asarray(ids, np.int64), c)
            crop_ids = img_ids * c + rows.astype(np.int64) * GRID + cols.astype(np.int64)
            if outs[0]["crop_pred"] is not None:
                cpred = np.concatenate([o["crop_pred"] for o in outs]).astype(np.int64)
                cconf = np.concatenate([o["crop_conf"] for o in outs]).astype(np.float64)
            else:
                cpred = np.full(n * c, -1, np.int64)
                cconf = np.full(n * c, np.nan, np.float64)
            crop_tab = {"crop_id": crop_ids, "image_id": img_ids, "row": rows, "col": cols,
                        "x0": bx[:, 0], "y0": bx[:, 1], "x1": bx[:, 2], "y1": bx[:, 3],
                        "pred": cpred, "conf": cconf}
            con.register("_crop_tab", crop_tab)
            con.execute("""INSERT INTO crops SELECT crop_id, image_id, "row", col, x0, y0, x1, y1,
                NULLIF(pred, -1), CASE WHEN isnan(conf) THEN NULL ELSE conf END
                FROM _crop_tab""")
            con.unregister("_crop_tab")
        for path, reason in skipped:
            con.execute("INSERT INTO skipped VALUES (?, ?, ?)", [path, reason, k])
        con.execute("INSERT INTO chunks VALUES (?, ?, now()::TIMESTAMP)", [k, len(entries)])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _assemble(con: duckdb.DuckDBPyConnection, ws: Workspace, n_chunks: int, dim: int) -> int:
    """Concatenate the chunk embeddings into embeddings.npy / crop_ids.npy / flat.faiss."""
    import faiss

    ids = np.asarray([r[0] for r in con.execute(
        "SELECT crop_id FROM crops ORDER BY crop_id").fetchall()], np.int64)
    n = len(ids)
    d = ws.index_dir
    emb_tmp = d / "embeddings.npy.tmp"
    out = np.lib.format.open_memmap(emb_tmp, mode="w+", dtype=np.float32, shape=(n, dim))
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    pos = 0
    for k in range(n_chunks):
        f = d / f"emb_{k:05d}.npy"
        if not f.is_file():
            raise ExplorerError(f"Chunk file {f} is missing; {_rebuild_hint(ws)}")
        try:
            e = np.load(f, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise _unreadable_index_file(ws, f, exc) from exc
        if e.ndim != 2:
            raise _unreadable_index_file(ws, f, f"shape {e.shape}")
        if e.shape[0] == 0:
            continue
        if e.shape[1] != dim or pos + len(e) > n:
            raise ExplorerError(f"Chunk file {f} does not fit the catalog; {_rebuild_hint(ws)}")
        out[pos:pos + len(e)] = e
        en = np.ascontiguousarray(e, np.float32).copy()
        faiss.normalize_L2(en)
        index.add_with_ids(en, ids[pos:pos + len(e)])
        pos += len(e)
    if pos != n:
        raise ExplorerError(f"Embeddings ({pos}) and crops ({n}) disagree; {_rebuild_hint(ws)}")
    out.flush()
    del out
    emb_tmp.replace(d / "embeddings.npy")
    _atomic_save_npy(d / "crop_ids.npy", ids)
    tmp = d / "flat.faiss.tmp"
    faiss.write_index(index, str(tmp))
    tmp.replace(d / "flat.faiss")
    for f in d.glob("ivf_*.faiss"):  # stale IVF caches
        f.unlink(missing_ok=True)
    return dim


def _delete_catalog(ws: Workspace) -> None:
    """Remove the catalog and index files; the caller holds the exclusive workspace lock."""
    for p in (ws.catalog_path, ws.catalog_path.with_name(ws.catalog_path.name + ".wal")):
        p.unlink(missing_ok=True)
    if ws.index_dir.is_dir():
        for f in ws.index_dir.iterdir():
            if f.is_file():
                f.unlink()


# --------------------------------------------------------------------------------------------
# reader

@dataclass(eq=False)
class _Reader:
    """One read-only DuckDB database per catalog file and process, shared by its readers, and
    the shared workspace lock, held while ``users`` > 0."""

    key: str
    con: duckdb.DuckDBPyConnection
    lock: WorkspaceLock
    users: int = 0

    def close(self) -> None:
        try:
            self.con.close()
        except duckdb.Error:
            pass
        self.lock.release()


_READERS: dict[str, _Reader] = {}
_READERS_LOCK = threading.Lock()


def _reader_connection(path: Path) -> tuple[duckdb.DuckDBPyConnection, _Reader]:
    """A cursor on the shared read-only connection of the catalog ``path``, and the reader it
    counts as one more user of (give it back with :func:`_drop_reader`). The first user takes
    the shared workspace lock; it raises :class:`ExplorerError` if another process builds."""
    key = str(path.resolve())
    with _READERS_LOCK:
        reader = _READERS.get(key)
        if reader is None:
            lock = lock_workspace(Path(key).parent, exclusive=False)
            try:
                con = duckdb.connect(key, read_only=True)
            except duckdb.Error as exc:
                lock.release()
                raise ExplorerError(f"Cannot open catalog {path} ({exc}); if a build is running "
                                    "on this workspace, wait for it to finish") from exc
            reader = _READERS[key] = _Reader(key, con, lock)
        reader.users += 1
        return reader.con.cursor(), reader


def _drop_reader(reader: _Reader) -> None:
    """One user of ``reader`` is done; the last one closes it and drops the lock."""
    with _READERS_LOCK:
        reader.users -= 1
        if reader.users > 0 or _READERS.get(reader.key) is not reader:
            return  # still in use, or already closed by _release_readers
        del _READERS[reader.key]
    reader.close()


def _release_readers(path: Path) -> None:
    """Close this process's reader of ``path`` whatever its users (before building it here)."""
    with _READERS_LOCK:
        reader = _READERS.pop(str(Path(path).resolve()), None)
    if reader is not None:
        reader.close()


class Catalog:
    """Read-only access to a built catalog. Open with :meth:`Catalog.open`.

    Several readers in one process share one read-only DuckDB database (each has its own
    cursor, used under a lock, so a reader may be shared across threads). While any of them is
    open the process holds the workspace lock shared, so no other process can rebuild the
    catalog under it; :meth:`close` the catalog (or use it as a context manager) to let go."""

    def __init__(self, ws: Workspace, con: duckdb.DuckDBPyConnection, meta: dict[str, str],
                 reader: _Reader | None = None):
        self.ws = ws
        self._con = con
        self._reader = reader
        self._closed = False
        self._lock = threading.RLock()
        self.meta = meta
        # the workspace record is the truth (a relative image folder moves with the workspace)
        self.images_root = ws.images_path
        self.mode = meta.get("mode", ws.mode)
        self.dim = int(meta.get("dim", 0))
        self._emb: tuple[np.ndarray, np.ndarray] | None = None

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, ws: Workspace | str | os.PathLike) -> Catalog:
        if not isinstance(ws, Workspace):
            ws = Workspace.open(ws)
        how = (f"run 'python -m data_index build --workspace {ws.root}' (it resumes where it "
               "stopped)")
        if not ws.catalog_path.is_file():
            raise ExplorerError(f"Workspace '{ws.name}' has no catalog yet; {how}")
        con, reader = _reader_connection(ws.catalog_path)
        try:
            try:
                meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
            except duckdb.Error:
                meta = {}
            if meta.get("complete") != "true":
                raise ExplorerError(f"The catalog of workspace '{ws.name}' is not complete; {how}")
            for f in ("embeddings.npy", "crop_ids.npy", "flat.faiss"):
                if not (ws.index_dir / f).is_file():
                    raise ExplorerError(f"Workspace '{ws.name}' lacks index/{f}; "
                                        f"{_rebuild_hint(ws)}")
            row = con.execute("SELECT count(*) FROM crops").fetchone()
            _check_index_files(ws, int(row[0]) if row else 0, int(meta.get("dim", 0)))
        except BaseException:
            con.close()
            _drop_reader(reader)
            raise
        return cls(ws, con, meta, reader)

    def close(self) -> None:
        """Close this reader (idempotent); the process's last one drops the workspace lock."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._con.close()
            except duckdb.Error:
                pass
            self._emb = None
        if self._reader is not None:
            _drop_reader(self._reader)

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _q(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        with self._lock:
            return self._con.execute(sql, params or []).fetchall()

    # ---- counts ----------------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        return int(self._q("SELECT count(*) FROM images")[0][0])

    @property
    def n_crops(self) -> int:
        return int(self._q("SELECT count(*) FROM crops")[0][0])

    @property
    def n_skipped(self) -> int:
        return int(self._q("SELECT count(*) FROM skipped")[0][0])

    def predicted_counts(self) -> dict[int, int]:
        """``{class: number of images predicted as it}``, classes with at least one image."""
        return {int(p): int(n) for p, n in
                self._q("SELECT pred, count(*) FROM images GROUP BY pred ORDER BY pred")}

    def status(self) -> dict[str, Any]:
        return {"workspace": str(self.ws.root), "model": self.meta.get("model"),
                "layer": self.meta.get("layer"), "mode": self.mode, "dim": self.dim,
                "images": self.n_images, "crops": self.n_crops, "skipped": self.n_skipped,
                "complete": self.meta.get("complete") == "true",
                "built_at": self.meta.get("built_at"), "build_seconds": self.meta.get("seconds"),
                "predicted_counts": self.predicted_counts()}

    # ---- images ----------------------------------------------------------------------------
    def images_predicted_as(self, cls: int) -> list[int]:
        return [int(r[0]) for r in
                self._q("SELECT image_id FROM images WHERE pred = ? ORDER BY image_id", [int(cls)])]

    def confusion_counts(self, top: int = 2) -> list[tuple[int, int, int]]:
        """``(a, b, count)``: how many images predicted as class ``a`` have class ``b`` among
        their ranks 2..``top`` of the top-5 (``top=2``: ``b`` is the runner-up), for every such
        pair with a count > 0. ``top`` is clipped to 2..5."""
        top = max(2, min(5, int(top)))
        return [(int(a), int(b), int(n)) for a, b, n in self._q(
            f"""SELECT a, b, count(*) FROM (SELECT pred AS a, unnest(top5[2:{top}]) AS b
                FROM images) WHERE a <> b GROUP BY a, b ORDER BY a, b""")]

    def image_ids_with_label(self, label: int) -> list[int]:
        return [int(r[0]) for r in self._q(
            "SELECT image_id FROM images WHERE label = ? ORDER BY image_id", [int(label)])]

    def image_ids(self) -> list[int]:
        return [int(r[0]) for r in self._q("SELECT image_id FROM images ORDER BY image_id")]

    def image_row(self, image_id: int) -> dict[str, Any]:
        with self._lock:
            cur = self._con.execute("SELECT * FROM images WHERE image_id = ?", [int(image_id)])
            row = cur.fetchone()
            names = [d[0] for d in cur.description]
        if row is None:
            raise ExplorerError(f"No image {image_id} in the catalog of '{self.ws.name}'")
        out = dict(zip(names, row))
        out["top5"] = [int(t) for t in out["top5"]]
        out["path"] = unescape_rel(out["path"])
        out["abs_path"] = str(self.images_root / out["path"])
        return out

    def image_path(self, image_id: int) -> Path:
        r = self._q("SELECT path FROM images WHERE image_id = ?", [int(image_id)])
        if not r:
            raise ExplorerError(f"No image {image_id} in the catalog of '{self.ws.name}'")
        return self.images_root / unescape_rel(r[0][0])

    def _load_geometry(self, image_id: int, lm: Any) -> torch.Tensor:
        from .datasets import load_rgb

        return lm.geometry(load_rgb(self.image_path(image_id)))

    def image_pixels(self, image_ids: Sequence[int], lm: Any) -> torch.Tensor:
        """``(B, 3, S, S)`` [0, 1] pixels of the images (decoded again, through ``lm.geometry``)."""
        if not len(image_ids):
            return torch.zeros(0, 3, lm.input_size, lm.input_size)
        return torch.stack([self._load_geometry(int(i), lm) for i in image_ids])

    # ---- crops -----------------------------------------------------------------------------
    def crop_refs(self, crop_ids: Sequence[int], scores: Sequence[float] | None = None
                  ) -> list[CropRef]:
        """:class:`CropRef` per crop id, order preserved (with the source image's pred/conf)."""
        ids = [int(c) for c in crop_ids]
        if not ids:
            return []
        rows = self._q("""SELECT c.crop_id, c.image_id, i.path, c."row", c.col, c.x0, c.y0,
                c.x1, c.y1, c.pred, c.conf, i.pred, i.conf, i.label
            FROM crops c JOIN images i USING (image_id)
            WHERE c.crop_id IN (SELECT unnest(?::BIGINT[]))""", [ids])
        by_id = {r[0]: r for r in rows}
        out = []
        for j, cid in enumerate(ids):
            r = by_id.get(cid)
            if r is None:
                raise ExplorerError(f"No crop {cid} in the catalog of '{self.ws.name}'")
            out.append(CropRef(
                crop_id=cid, image_id=int(r[1]),
                path=str(self.images_root / unescape_rel(r[2])),
                row=int(r[3]), col=int(r[4]), box=(int(r[5]), int(r[6]), int(r[7]), int(r[8])),
                crop_pred=-1 if r[9] is None else int(r[9]),
                crop_conf=float("nan") if r[10] is None else float(r[10]),
                image_pred=int(r[11]), image_conf=float(r[12]),
                score=float(scores[j]) if scores is not None else float("nan"),
                label=None if r[13] is None else int(r[13])))
        return out

    def crop_pixels(self, crop_ids: Sequence[int], lm: Any) -> torch.Tensor:
        """``(k, 3, c, c)`` [0, 1] pixels of the crops, order preserved."""
        c = lm.crop_size
        if not len(crop_ids):
            return torch.zeros(0, 3, c, c)
        refs = self.crop_refs(crop_ids)
        cache: dict[int, torch.Tensor] = {}
        out = []
        for r in refs:
            if r.image_id not in cache:
                cache[r.image_id] = self._load_geometry(r.image_id, lm)
            x0, y0, x1, y1 = r.box
            out.append(cache[r.image_id][:, y0:y1, x0:x1])
        return torch.stack(out)

    def excluded_crop_ids(self, cls: int) -> np.ndarray:
        """Crop ids whose own prediction is ``cls`` or whose source image is predicted ``cls``."""
        rows = self._q("""SELECT c.crop_id FROM crops c JOIN images i USING (image_id)
            WHERE c.pred = ? OR i.pred = ? ORDER BY c.crop_id""", [int(cls), int(cls)])
        return np.asarray([r[0] for r in rows], np.int64)

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """``(crop_ids int64 (N,), embeddings float32 (N, C))``, memory-mapped, crop-id order.

        Raises :class:`ExplorerError` naming the file (and the rebuild command) when
        ``index/crop_ids.npy`` or ``index/embeddings.npy`` is truncated or does not fit."""
        if self._emb is None:
            d = self.ws.index_dir
            loaded = []
            for name in ("crop_ids.npy", "embeddings.npy"):
                try:
                    loaded.append(np.load(d / name, mmap_mode="r", allow_pickle=False))
                except (OSError, ValueError, EOFError) as exc:
                    raise _unreadable_index_file(self.ws, d / name, exc) from exc
            ids, emb = loaded
            n = self.n_crops
            if ids.shape != (n,) or ids.dtype != np.int64:
                raise _unreadable_index_file(self.ws, d / "crop_ids.npy",
                                             f"shape {ids.shape} {ids.dtype}, expected ({n},) "
                                             "int64")
            if emb.shape != (n, self.dim) or emb.dtype != np.float32:
                raise _unreadable_index_file(self.ws, d / "embeddings.npy",
                                             f"shape {emb.shape} {emb.dtype}, expected "
                                             f"({n}, {self.dim}) float32")
            self._emb = (ids, emb)
        return self._emb

    def random_crop_ids(self, n: int, seed: int = 0, exclude_class: int | None = None
                        ) -> list[int]:
        """``n`` distinct crop ids drawn with ``seed`` (fewer if the catalog is smaller)."""
        if exclude_class is None:
            ids = np.asarray([r[0] for r in self._q("SELECT crop_id FROM crops ORDER BY crop_id")],
                             np.int64)
        else:
            ids = np.asarray([r[0] for r in self._q(
                """SELECT c.crop_id FROM crops c JOIN images i USING (image_id)
                WHERE NOT (coalesce(c.pred = ?, false) OR i.pred = ?) ORDER BY c.crop_id""",
                [int(exclude_class), int(exclude_class)])], np.int64)
        rng = np.random.default_rng(seed)
        k = min(int(n), len(ids))
        return [int(i) for i in rng.choice(ids, size=k, replace=False)] if k else []

    def skipped(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of each skipped file (or unlistable folder, path ending in ``/``),
        by path; paths as stored (``%XX`` for bytes that are not UTF-8)."""
        return [(str(p), str(r)) for p, r in
                self._q("SELECT path, reason FROM skipped ORDER BY path")]

    def export(self, table: str, path: str | os.PathLike) -> Path:
        """Write a table to CSV or Parquet (by the file suffix) with DuckDB ``COPY``."""
        if table not in EXPORTABLE_TABLES:
            raise ExplorerError(f"Unknown table '{table}'; exportable: "
                                f"{', '.join(EXPORTABLE_TABLES)}")
        p = Path(path).expanduser().resolve()
        suffix = p.suffix.lower()
        if suffix == ".csv":
            fmt = "(FORMAT csv, HEADER true)"
        elif suffix in (".parquet", ".pq"):
            fmt = "(FORMAT parquet)"
        else:
            raise ExplorerError(f"Export to '{path}': use a .csv or .parquet file name")
        if p.is_dir():
            raise ExplorerError(f"Export to '{path}': that is a folder; give a file name")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExplorerError(f"Export to '{path}': cannot create its folder "
                                f"({exc.strerror or exc})") from exc
        target = str(p).replace("'", "''")
        sel = f'SELECT * FROM "{table}"'
        if table == "images":
            sel = ("SELECT image_id, path, label, label_name, pred, conf, "
                   "array_to_string(top5, ' ') AS top5 FROM images") if suffix == ".csv" else sel
        with self._lock:
            try:
                self._con.execute(f"COPY ({sel}) TO '{target}' {fmt}")
            except duckdb.Error as exc:
                raise ExplorerError(f"Export to '{path}' failed: {exc}") from exc
        return p

    def __repr__(self) -> str:
        return f"Catalog({self.ws.name!r}, mode={self.mode}, dim={self.dim})"

