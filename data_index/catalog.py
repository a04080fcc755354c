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
row * 3 + col``. Paths in the tables are relative POSIX paths under the workspace's image folder.

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
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import duckdb
import numpy as np
import torch

from explorer_core.errors import ExplorerError
from explorer_core.hooks import forward_hooks
from explorer_core.results import CropRef

from .crops import GRID, cell_pool, crop_boxes, cut_crops
from .datasets import ImageEntry, ImageFolder, try_load_rgb
from .workspace import Workspace

__all__ = ["BuildProgress", "BuildStats", "Catalog", "build_catalog", "EXPORTABLE_TABLES"]

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


@dataclass(frozen=True)
class BuildProgress:
    """Passed to the ``progress`` callback after each chunk (and at phase changes)."""

    done: int  # images processed (including skipped files and resumed chunks)
    total: int
    images_per_s: float
    eta_s: float
    phase: str  # "index" | "assemble" | "done"


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
    _release_readers(path)
    try:
        return duckdb.connect(str(path))
    except duckdb.Error as exc:
        raise ExplorerError(f"Cannot open {path} for writing ({exc}); is another process (the "
                            "app, another build) using this workspace? Close it and retry") from exc


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
                  progress: Callable[[BuildProgress], None] | None = None,
                  limit: int | None = None, model: Any = None, chunk_size: int = 256,
                  num_workers: int | None = None, rebuild: bool = False) -> BuildStats:
    """Build (or resume) the crop catalog of ``ws``; see the module docstring.

    Parameters
    ----------
    batch_size : images per forward (crop mode forwards ``9 * batch_size`` crops at once).
    device : ``auto`` | ``cpu`` | ``cuda``; ``auto`` uses the workspace's device setting.
    progress : called with a :class:`BuildProgress` after every chunk.
    limit : index only the first ``limit`` files of the sorted listing.
    model : an already loaded :class:`~explorer_core.models.LoadedModel` (else ``ws.model`` is loaded).
    chunk_size : images per resumable chunk (bounded memory: about two chunks of pixels).
    num_workers : JPEG-decoding threads overlapping the forward (default ``min(4, cpus)``).
    rebuild : delete an existing catalog of this workspace first.
    """
    t_start = time.perf_counter()
    if model is None:
        from explorer_core.models import load_model

        model = load_model(ws.model, ws.device if device in (None, "", "auto") else device)
    lm = model
    if lm.input_size != ws.input_size:
        raise ExplorerError(f"Workspace input size {ws.input_size} does not match model "
                            f"{lm.spec} ({lm.input_size}); create a new workspace")
    info = lm.layer_info(ws.layer)  # raises listing valid layers
    if ws.mode not in ("crop", "cell"):
        raise ExplorerError(f"Unknown embedding mode '{ws.mode}'; use crop or cell")
    folder = ImageFolder(ws.images_path)
    ws.root.mkdir(parents=True, exist_ok=True)
    ws.index_dir.mkdir(parents=True, exist_ok=True)
    if rebuild:
        _delete_catalog(ws)

    con = _connect_rw(ws.catalog_path)
    try:
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
                if progress:
                    progress(BuildProgress(total, total, 0.0, 0.0, "done"))
                return BuildStats(n_img, n_crop, n_sk, n_ch, n_ch, 0.0, 0.0, ws.mode,
                                  int(meta.get("dim", 0)), True, True)
        else:
            con.execute("BEGIN TRANSACTION")
            for key, val in {**want, "dim": str(info.shape[0]), "complete": "false",
                             "images_root": str(ws.images_path),
                             "limit": "" if limit is None else str(int(limit))}.items():
                con.execute("INSERT INTO meta VALUES (?, ?)", [key, val])
            con.execute("COMMIT")

        n_chunks = (total + chunk_size - 1) // chunk_size
        done = {r[0] for r in con.execute("SELECT chunk_id FROM chunks").fetchall()}
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
        t_index = time.perf_counter()
        processed = 0

        def submit(k: int) -> list[Future]:
            return [pool.submit(_decode, e, lm, min_side)
                    for e in entries[k * chunk_size:(k + 1) * chunk_size]]

        try:
            pending = submit(todo[0]) if todo else []
            for i, k in enumerate(todo):
                futures = pending
                pending = submit(todo[i + 1]) if i + 1 < len(todo) else []  # overlap decoding
                _index_chunk(con, ws, k, entries[k * chunk_size:(k + 1) * chunk_size], futures,
                             embedder, boxes, batch_size, k * chunk_size)
                processed += len(futures)
                done_images += len(futures)
                if progress:
                    el = time.perf_counter() - t_index
                    rate = processed / el if el > 0 else 0.0
                    progress(BuildProgress(done_images, total, rate,
                                           (total - done_images) / rate if rate else 0.0, "index"))
        finally:
            for f in pending if todo else []:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

        if progress:
            progress(BuildProgress(total, total, 0.0, 0.0, "assemble"))
        dim = _assemble(con, ws, n_chunks, info.shape[0])
        con.execute("BEGIN TRANSACTION")
        con.execute("DELETE FROM meta WHERE key IN ('complete', 'dim', 'built_at', 'seconds')")
        secs = time.perf_counter() - t_start
        for key, val in {"complete": "true", "dim": str(dim), "seconds": f"{secs:.1f}",
                         "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}.items():
            con.execute("INSERT INTO meta VALUES (?, ?)", [key, val])
        con.execute("COMMIT")
        for k in range(n_chunks):
            (ws.index_dir / f"emb_{k:05d}.npy").unlink(missing_ok=True)
        n_img, n_crop, n_sk, _ = _counts(con)
    finally:
        con.close()
    secs = time.perf_counter() - t_start
    if progress:
        progress(BuildProgress(total, total, processed / max(secs, 1e-9), 0.0, "done"))
    return BuildStats(n_img, n_crop, n_sk, n_chunks, n_chunks - len(todo), secs,
                      processed / max(secs, 1e-9), ws.mode, dim)


def _index_chunk(con: duckdb.DuckDBPyConnection, ws: Workspace, k: int,
                 entries: Sequence[ImageEntry], futures: list[Future], embedder: _Embedder,
                 boxes: list, batch_size: int, first_id: int) -> None:
    ids: list[int] = []
    kept: list[ImageEntry] = []
    skipped: list[tuple[str, str]] = []
    outs: list[dict[str, Any]] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if batch:
            outs.append(embedder(torch.stack(batch)))
            batch.clear()

    for j, (e, fut) in enumerate(zip(entries, futures)):
        px, reason = fut.result()
        if px is None:
            skipped.append((e.rel, reason or "unknown error"))
            continue
        ids.append(first_id + j)
        kept.append(e)
        batch.append(px)
        if len(batch) >= batch_size:
            flush()
    flush()

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
                "path": np.asarray([e.rel for e in kept], dtype=object),
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
            raise ExplorerError(f"Chunk file {f} is missing; rebuild with --rebuild")
        e = np.load(f)
        if e.shape[0] == 0:
            continue
        if e.shape[1] != dim or pos + len(e) > n:
            raise ExplorerError(f"Chunk file {f} does not fit the catalog; rebuild with --rebuild")
        out[pos:pos + len(e)] = e
        en = np.ascontiguousarray(e, np.float32).copy()
        faiss.normalize_L2(en)
        index.add_with_ids(en, ids[pos:pos + len(e)])
        pos += len(e)
    if pos != n:
        raise ExplorerError(f"Embeddings ({pos}) and crops ({n}) disagree; rebuild with --rebuild")
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
    _release_readers(ws.catalog_path)
    for p in (ws.catalog_path, ws.catalog_path.with_name(ws.catalog_path.name + ".wal")):
        p.unlink(missing_ok=True)
    if ws.index_dir.is_dir():
        for f in ws.index_dir.iterdir():
            if f.is_file():
                f.unlink()


# --------------------------------------------------------------------------------------------
# reader

_READERS: dict[str, duckdb.DuckDBPyConnection] = {}
_READERS_LOCK = threading.Lock()


def _reader_connection(path: Path) -> duckdb.DuckDBPyConnection:
    key = str(path.resolve())
    with _READERS_LOCK:
        con = _READERS.get(key)
        if con is None:
            try:
                con = duckdb.connect(key, read_only=True)
            except duckdb.Error as exc:
                raise ExplorerError(f"Cannot open catalog {path} ({exc}); if a build is running "
                                    "on this workspace, wait for it to finish") from exc
            _READERS[key] = con
        return con.cursor()


def _release_readers(path: Path) -> None:
    with _READERS_LOCK:
        con = _READERS.pop(str(Path(path).resolve()), None)
    if con is not None:
        try:
            con.close()
        except duckdb.Error:
            pass


class Catalog:
    """Read-only access to a built catalog. Open with :meth:`Catalog.open`.

    Several readers in one process share one read-only DuckDB database (each has its own
    cursor, used under a lock, so a reader may be shared across threads)."""

    def __init__(self, ws: Workspace, con: duckdb.DuckDBPyConnection, meta: dict[str, str]):
        self.ws = ws
        self._con = con
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
        con = _reader_connection(ws.catalog_path)
        try:
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        except duckdb.Error:
            meta = {}
        if meta.get("complete") != "true":
            con.close()
            raise ExplorerError(f"The catalog of workspace '{ws.name}' is not complete; {how}")
        for f in ("embeddings.npy", "crop_ids.npy", "flat.faiss"):
            if not (ws.index_dir / f).is_file():
                con.close()
                raise ExplorerError(f"Workspace '{ws.name}' lacks index/{f}; {how} --rebuild")
        return cls(ws, con, meta)

    def close(self) -> None:
        with self._lock:
            self._con.close()

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
        out["abs_path"] = str(self.images_root / out["path"])
        return out

    def image_path(self, image_id: int) -> Path:
        r = self._q("SELECT path FROM images WHERE image_id = ?", [int(image_id)])
        if not r:
            raise ExplorerError(f"No image {image_id} in the catalog of '{self.ws.name}'")
        return self.images_root / r[0][0]

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
                crop_id=cid, image_id=int(r[1]), path=str(self.images_root / r[2]),
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
        """``(crop_ids int64 (N,), embeddings float32 (N, C))``, memory-mapped, crop-id order."""
        if self._emb is None:
            d = self.ws.index_dir
            self._emb = (np.load(d / "crop_ids.npy", mmap_mode="r"),
                         np.load(d / "embeddings.npy", mmap_mode="r"))
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
        p.parent.mkdir(parents=True, exist_ok=True)
        target = str(p).replace("'", "''")
        sel = f'SELECT * FROM "{table}"'
        if table == "images":
            sel = ("SELECT image_id, path, label, label_name, pred, conf, "
                   "array_to_string(top5, ' ') AS top5 FROM images") if suffix == ".csv" else sel
        with self._lock:
            self._con.execute(f"COPY ({sel}) TO '{target}' {fmt}")
        return p

    def __repr__(self) -> str:
        return f"Catalog({self.ws.name!r}, mode={self.mode}, dim={self.dim})"

