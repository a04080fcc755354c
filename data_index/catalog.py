"""The crop catalog (v2): one streaming, resumable pass over an image folder, and its reader.

:func:`build_catalog` writes, for a :class:`~data_index.workspace.Workspace`:

* ``catalog.duckdb`` with the tables
  ``images(image_id, path, label, label_name, pred, conf, top5)``,
  ``image_classes(image_id, class, share)``,
  ``crops(crop_id, image_id, row, col, x0, y0, x1, y1, pred, conf)``,
  ``skipped(path, reason, chunk_id)``, ``chunks(chunk_id, n_images, done_at)`` and
  ``meta(key, value)``;
* ``index/<layer folder>/`` per catalog layer: an :class:`~data_index.store.EmbeddingStore`
  (float16 by default, ``storage`` in the workspace) of the crop embeddings, rows in crop-id
  order (folder names: :func:`~data_index.workspace.layer_folder`).

``meta`` holds the build settings (``schema`` = 2, ``model``, ``layers`` (JSON list, forward
order), ``layer`` (the default layer), ``mode``, ``input_size``, ``image_size``, ``crop_size``,
``stride``, ``storage``, ``task``, ``fingerprint``, ``n_files``, ``chunk_size``, ``limit``,
``images_root``), per layer ``dim:<layer>``, ``nonnegative:<layer>`` (``true``/``false``,
:class:`~explorer_core.models.LayerInfo`) and ``index:<layer>`` (the search index; ``exact``),
``dim`` (the default layer's), ``image_share_threshold``, ``background_class`` (segmentation),
and ``complete``, ``seconds``, ``built_at``, ``build_id`` (stamps of the completed build).

Predictions (:mod:`data_index.embed`, through :meth:`LoadedModel.summarize
<explorer_core.models.LoadedModel.summarize>` only):

* classifiers: ``images.pred`` / ``conf`` / ``top5`` = argmax, its softmax, the 5 best;
  ``image_classes`` is empty; ``crops.pred`` / ``conf`` = the crop's own prediction in ``crop``
  mode, NULL in ``cell`` mode.
* segmentation models (``LoadedModel.task == "segmentation"``): ``images.pred`` = the
  non-background class with the largest predicted pixel share, ``conf`` = that share, ``top5`` =
  the five classes with the largest shares; ``image_classes`` holds every class's share (> 0);
  ``crops.pred`` / ``conf`` = the crop's dominant predicted class and its share, from the crop's
  own forward in ``crop`` mode, from the whole image's prediction inside the crop box in ``cell``
  mode.

"Images predicted as A" (:meth:`Catalog.images_predicted_as`) are those with ``pred = A`` for
classifiers, and those whose share of A is at least ``image_share_threshold``
(:data:`IMAGE_SHARE_THRESHOLD`, 0.05) when the catalog has ``image_classes`` rows. Excluding
class A (:meth:`Catalog.excluded_crop_ids`) drops every crop whose own / dominant class is A or
whose source image counts as predicted A.

Ids: ``image_id`` is the file's position in the folder's sorted listing (see
:class:`~data_index.datasets.ImageFolder`); skipped files leave gaps. ``crop_id = image_id *
per_image + k`` with ``k = row * cols + col`` in the workspace's
:class:`~data_index.crops.CropGrid` (default 3 x 3: ``image_id * 9 + row * 3 + col``). Paths are
relative POSIX paths under the image folder, stored through
:func:`~data_index.datasets.escape_rel` (bytes that are not UTF-8 as ``%XX``); sub-folders that
cannot be listed are rows of ``skipped`` (path ending in ``/``, ``chunk_id`` -1).

Embedding modes (``ws.mode``) and layers: :mod:`data_index.embed` (one forward gives every
layer's embeddings; ``crop``: each crop forwarded at its native size, ``cell``: the whole image
forwarded once and area-pooled over the crop boxes). Big images stream: a forward batch holds
at most ``batch_size * input_size**2`` pixels and images are decoded a few batches ahead.

Resumability: the folder is processed in chunks (``chunk_size`` images). A chunk's embeddings (all
layers side by side, float32) are written to ``index/emb_{chunk:05d}.npy`` (tmp file + rename)
*before* one DuckDB transaction inserts all its rows together with its ``chunks`` row. A build
killed at any point and re-run skips the committed chunks, redoes the partial one and ends with
exactly the rows of a clean run; the chunk files are then streamed, in crop-id order, into each
layer's store (memory: one chunk and one store shard per layer) and deleted. A committed chunk
whose ``emb_*.npy`` file is unreadable stops the resume with an error that names the file and
the ``--rebuild`` command.

Sharded builds: ``build_catalog(ws, shards=N, shard=i)`` processes only the chunks ``k`` with
``k % N == i`` into ``shards/<i>/`` (its own ``catalog.duckdb`` and chunk files, resumable per
chunk); any number of shards may run at once, in any processes or machines sharing the
workspace folder. :func:`merge_shards` then writes the one catalog: every table's rows in chunk
(= image-id) order and the layers' stores assembled from the shards' chunk files, equal to a
single-process build (same rows except the build stamps, embeddings equal). The Ray build
(:mod:`data_index.ray_build`) computes chunks on a cluster and commits them here, in the driver.

Old catalogs (v1: ``index/embeddings.npy`` + ``flat.faiss``, meta ``schema`` 1) are refused
with :class:`OldCatalogError`, which says to rebuild (``--rebuild``).

Locking (:mod:`data_index.locking`): a build holds the workspace lock exclusively before it deletes
(``rebuild``) or writes anything, so a build or rebuild of a workspace that another process is
building or reading fails at once with one clear error; a build of an already complete catalog
only reads it (shared lock) and returns. A shard build holds the workspace lock shared (several
shards and readers at once, no rebuild or merge) and its shard folder's lock exclusively; a merge
holds the workspace lock and every shard's exclusively. :class:`Catalog` readers hold the lock
shared.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import torch

from explorer_core.errors import ExplorerError
from explorer_core.progress import Meter, Progress, ProgressFn, report
from explorer_core.results import CropRef

from .crops import CropGrid
from .datasets import ImageEntry, ImageFolder, escape_rel, unescape_rel
from .embed import ChunkResult, Embedder, compute_chunk, min_side_of, stream_decoded
from .locking import WorkspaceLock, lock_workspace
from .store import EmbeddingStore, StoreWriter
from .workspace import Workspace

__all__ = ["BuildStats", "Catalog", "OldCatalogError", "build_catalog", "merge_shards",
           "reindex_catalog",
           "EXPORTABLE_TABLES", "IMAGE_SHARE_THRESHOLD", "SCHEMA_VERSION"]

SCHEMA_VERSION = "2"
EXPORTABLE_TABLES = ("images", "image_classes", "crops", "skipped", "chunks", "meta")
IMAGE_SHARE_THRESHOLD = 0.05
"""Segmentation: an image counts as predicted A when at least this share of its pixels is
predicted A (stored in ``meta`` as ``image_share_threshold``)."""
STORE_SHARD_BYTES = 64 << 20
"""Target size of one embedding-store shard file (and of the assembly's buffer per layer)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    image_id BIGINT PRIMARY KEY, path VARCHAR NOT NULL, label INTEGER, label_name VARCHAR,
    pred INTEGER NOT NULL, conf FLOAT NOT NULL, top5 INTEGER[] NOT NULL);
CREATE TABLE IF NOT EXISTS image_classes (
    image_id BIGINT NOT NULL, "class" INTEGER NOT NULL, share FLOAT NOT NULL,
    PRIMARY KEY (image_id, "class"));
CREATE TABLE IF NOT EXISTS crops (
    crop_id BIGINT PRIMARY KEY, image_id BIGINT NOT NULL, "row" SMALLINT NOT NULL,
    col SMALLINT NOT NULL, x0 INTEGER NOT NULL, y0 INTEGER NOT NULL, x1 INTEGER NOT NULL,
    y1 INTEGER NOT NULL, pred INTEGER, conf FLOAT);
CREATE TABLE IF NOT EXISTS skipped (path VARCHAR NOT NULL, reason VARCHAR NOT NULL,
    chunk_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (chunk_id INTEGER PRIMARY KEY, n_images INTEGER NOT NULL,
    done_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
"""
_STAMPS = ("complete", "seconds", "built_at", "build_id")
_SHARD_KEYS = ("shards", "shard")


class OldCatalogError(ExplorerError):
    """A catalog written by an older version (v1: ``index/embeddings.npy`` + ``flat.faiss``)."""


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
    layers: tuple[str, ...] = ()
    dims: dict[str, int] = field(default_factory=dict)
    shard: int | None = None
    shards: int = 1


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


def _read_meta(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    try:
        return dict(con.execute("SELECT key, value FROM meta").fetchall())
    except duckdb.Error:
        return {}


def _is_v1(ws: Workspace, meta: dict[str, str]) -> bool:
    if meta.get("schema") == "1":
        return True
    return not meta.get("schema") and any(
        (ws.index_dir / f).is_file() for f in ("embeddings.npy", "flat.faiss"))


def _old_catalog(ws: Workspace) -> OldCatalogError:
    return OldCatalogError(
        f"The catalog of workspace '{ws.name}' was built by an older version of the explorer "
        "(catalog v1: index/embeddings.npy + flat.faiss); this version stores float16 "
        f"embeddings per layer. Rebuild it: python -m data_index build --workspace {ws.root} "
        "--rebuild")


def _open_complete(ws: Workspace) -> tuple[duckdb.DuckDBPyConnection, _Reader] | None:
    """``(cursor, reader)`` on the catalog (shared lock) when it is complete, else ``None``
    with nothing held. Raises when a build is running in another process."""
    if not ws.catalog_path.is_file():
        return None
    con, reader = _reader_connection(ws.catalog_path)  # raises if another process is building
    if _read_meta(con).get("complete") == "true":
        return con, reader
    con.close()
    _drop_reader(reader)
    return None


def _check_chunk_files(ws: Workspace, chunk_dir: Path, chunk_ids: Sequence[int], dim: int
                       ) -> None:
    """Every committed chunk's ``emb_*.npy`` exists and its header fits (``(n, dim)`` float32,
    file long enough) -- checked before a resume does any work."""
    for k in sorted(chunk_ids):
        f = chunk_dir / f"emb_{k:05d}.npy"
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


def _store_shard_rows(dim: int, storage: str) -> int:
    return max(1024, STORE_SHARD_BYTES // (dim * np.dtype(storage).itemsize))


# --------------------------------------------------------------------------------------------
# the plan of a build


@dataclass
class _Plan:
    """What a build of ``ws`` over ``entries`` produces (shared by every way to build)."""

    ws: Workspace
    lm: Any
    entries: list[ImageEntry]
    chunk_size: int
    limit: int | None
    dims: list[int]
    nonnegative: list[bool]
    grid: CropGrid

    @property
    def layers(self) -> list[str]:
        return list(self.ws.layers)

    @property
    def total(self) -> int:
        return len(self.entries)

    @property
    def n_chunks(self) -> int:
        return (self.total + self.chunk_size - 1) // self.chunk_size

    @property
    def total_dim(self) -> int:
        return sum(self.dims)

    def chunk(self, k: int) -> list[ImageEntry]:
        return self.entries[k * self.chunk_size:(k + 1) * self.chunk_size]

    def chunk_files(self, ks: Sequence[int]) -> int:
        return sum(min(self.chunk_size, self.total - k * self.chunk_size) for k in ks)

    def want(self) -> dict[str, str]:
        """The settings a resumed build must share (compared with ``meta``)."""
        ws, lm = self.ws, self.lm
        return {"schema": SCHEMA_VERSION, "model": lm.spec, "layer": ws.layer,
                "layers": json.dumps(self.layers), "mode": ws.mode,
                "input_size": str(lm.input_size), **self.grid.to_meta(),
                "storage": ws.storage, "task": str(getattr(lm, "task", "classification")),
                "fingerprint": _fingerprint(self.entries), "n_files": str(self.total),
                "chunk_size": str(self.chunk_size)}

    def static_meta(self) -> dict[str, str]:
        """``want`` plus what is known before any forward (dims, flags, limit, threshold)."""
        ws, lm = self.ws, self.lm
        out = {**self.want(), "complete": "false", "images_root": str(ws.images_path),
               "limit": "" if self.limit is None else str(int(self.limit)),
               "dim": str(self.dims[self.layers.index(ws.layer)]),
               "image_share_threshold": repr(IMAGE_SHARE_THRESHOLD)}
        for layer, d, nn in zip(self.layers, self.dims, self.nonnegative):
            out[f"dim:{layer}"] = str(d)
            out[f"nonnegative:{layer}"] = "true" if nn else "false"
        bg = getattr(lm, "background_class", None)
        if bg is not None:
            out["background_class"] = str(int(bg))
        return out


def _check_model(ws: Workspace, lm: Any) -> tuple[list[int], list[bool]]:
    if lm.input_size != ws.input_size:
        raise ExplorerError(f"Workspace input size {ws.input_size} does not match model "
                            f"{lm.spec} ({lm.input_size}); create a new workspace")
    if ws.mode not in ("crop", "cell"):
        raise ExplorerError(f"Unknown embedding mode '{ws.mode}'; use crop or cell")
    infos = [lm.layer_info(layer) for layer in ws.layers]  # raises listing valid layers
    return [int(i.shape[0]) for i in infos], [bool(i.nonnegative) for i in infos]


def _make_plan(ws: Workspace, lm: Any, folder: ImageFolder, limit: int | None,
               chunk_size: int, dims: list[int], nonneg: list[bool]) -> _Plan:
    entries = folder.entries if limit is None else folder.entries[:max(0, int(limit))]
    if not entries:
        raise ExplorerError(f"No images (jpg, jpeg, png, bmp, gif, webp, tif, tiff) found "
                            f"under '{ws.images_path}'")
    return _Plan(ws, lm, list(entries), int(chunk_size), limit, dims, nonneg, ws.grid)


def _check_sizes(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and int(value) < 1:
            raise ExplorerError(f"{name}={value}: use at least 1")


# --------------------------------------------------------------------------------------------
# chunks: compute (local) and commit


ChunkSource = Callable[[_Plan, list[int], Callable[[int, int], None]], Iterator[ChunkResult]]
"""``source(plan, todo, on_images)`` yields the :class:`ChunkResult` of every chunk of ``todo``,
in that order; ``on_images(k, n)`` may report ``n`` files of chunk ``k`` handled so far."""


def local_source(lm: Any, batch_size: int, num_workers: int | None = None) -> ChunkSource:
    """Chunks computed in this process: decoding threads overlap the forward (across chunk
    boundaries), a few batches ahead."""

    def source(plan: _Plan, todo: list[int], on_images: Callable[[int, int], None]
               ) -> Iterator[ChunkResult]:
        embedder = Embedder(lm, plan.layers, plan.ws.mode, plan.grid, batch_size)
        workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
        workers = max(1, workers)
        window = max(2 * embedder.images_per_batch, 2 * workers)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        stream = stream_decoded((e for k in todo for e in plan.chunk(k)), lm,
                                plan.grid.image_size, min_side_of(plan.grid), pool, window)
        try:
            for k in todo:
                def report_images(n: int, k: int = k) -> None:
                    on_images(k, n)

                yield compute_chunk(embedder, k, k * plan.chunk_size, plan.chunk(k), stream,
                                    report_images)
        finally:
            stream.close()
            pool.shutdown(wait=True, cancel_futures=True)

    return source


def _commit_chunk(con: duckdb.DuckDBPyConnection, chunk_dir: Path, grid: CropGrid,
                  r: ChunkResult) -> None:
    """Write the chunk's embeddings file, then all its rows in one transaction."""
    _atomic_save_npy(chunk_dir / f"emb_{r.chunk_id:05d}.npy",
                     np.ascontiguousarray(r.emb, np.float32))
    P = grid.per_image
    con.execute("BEGIN TRANSACTION")
    try:
        n = len(r.image_ids)
        if n:
            img_tab = {
                "image_id": r.image_ids, "path": np.asarray(r.rels, dtype=object),
                "label": r.labels, "label_name": np.asarray(r.label_names, dtype=object),
                "pred": r.pred.astype(np.int32), "conf": r.conf.astype(np.float32),
                "top5_str": np.asarray([",".join(map(str, t)) for t in r.top5.tolist()],
                                       dtype=object)}
            con.register("_img_tab", img_tab)
            con.execute("""INSERT INTO images SELECT image_id, path, NULLIF(label, -1),
                NULLIF(label_name, ''), pred, conf,
                CAST(string_split(top5_str, ',') AS INTEGER[]) FROM _img_tab""")
            con.unregister("_img_tab")
            if r.shares is not None:
                rows, cls = np.nonzero(r.shares > 0)
                con.register("_cls_tab", {"image_id": r.image_ids[rows],
                                          "cls": cls.astype(np.int32),
                                          "share": r.shares[rows, cls].astype(np.float32)})
                con.execute('INSERT INTO image_classes SELECT image_id, cls, share FROM _cls_tab')
                con.unregister("_cls_tab")
            boxes = grid.boxes()
            bx = np.asarray([b[2] for b in boxes] * n, np.int32).reshape(-1, 4)
            img_ids = np.repeat(r.image_ids, P)
            crop_tab = {
                "crop_id": (r.image_ids[:, None] * P + np.arange(P)).ravel(),
                "image_id": img_ids,
                "row": np.asarray([b[0] for b in boxes] * n, np.int16),
                "col": np.asarray([b[1] for b in boxes] * n, np.int16),
                "x0": bx[:, 0], "y0": bx[:, 1], "x1": bx[:, 2], "y1": bx[:, 3],
                "pred": r.crop_pred if r.crop_pred is not None else np.full(n * P, -1, np.int64),
                "conf": r.crop_conf.astype(np.float64) if r.crop_conf is not None
                else np.full(n * P, np.nan, np.float64)}
            con.register("_crop_tab", crop_tab)
            con.execute("""INSERT INTO crops SELECT crop_id, image_id, "row", col, x0, y0, x1, y1,
                NULLIF(pred, -1), CASE WHEN isnan(conf) THEN NULL ELSE conf END
                FROM _crop_tab""")
            con.unregister("_crop_tab")
        for path, reason in r.skipped:
            con.execute("INSERT INTO skipped VALUES (?, ?, ?)", [path, reason, r.chunk_id])
        con.execute("INSERT INTO chunks VALUES (?, ?, now()::TIMESTAMP)", [r.chunk_id, r.n_files])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _run_chunks(con: duckdb.DuckDBPyConnection, chunk_dir: Path, plan: _Plan, todo: list[int],
                done: set[int], source: ChunkSource, progress: ProgressFn | None,
                of_total: int) -> int:
    """Compute and commit the ``todo`` chunks; progress per forward batch and after each saved
    chunk (``"k/K chunks saved"``, ``K = of_total``). Returns the files processed."""
    meter = Meter(progress, "index", plan.chunk_files([*done, *todo]), "images",
                  min_interval=1.0)
    done_images = plan.chunk_files(sorted(done))
    meter.start_at(done_images)
    base = {"n": done_images}

    def on_images(_k: int, n: int) -> None:
        meter.update(base["n"] + n)

    processed = 0
    for i, r in enumerate(source(plan, todo, on_images)):
        if r.chunk_id != todo[i]:
            raise RuntimeError(f"chunk {r.chunk_id} came back where {todo[i]} was expected")
        _commit_chunk(con, chunk_dir, plan.grid, r)
        processed += r.n_files
        base["n"] += r.n_files
        saved = len(done) + i + 1
        meter.update(base["n"], message=f"{saved}/{of_total} chunks saved", force=True)
    return processed


# --------------------------------------------------------------------------------------------
# assembling the stores


def _assemble(con: duckdb.DuckDBPyConnection, ws: Workspace, plan: _Plan,
              chunk_path: Callable[[int], Path]) -> dict[str, EmbeddingStore]:
    """Stream the chunk files, in chunk (= crop-id) order, into one store per layer."""
    offsets = np.cumsum([0, *plan.dims])
    writers = [StoreWriter(ws.layer_dir(layer), d, ws.storage,
                           shard_rows=_store_shard_rows(d, ws.storage))
               for layer, d in zip(plan.layers, plan.dims)]
    pos = 0
    for k in range(plan.n_chunks):
        lo, hi = k * plan.chunk_size, (k + 1) * plan.chunk_size
        ids = con.execute("SELECT crop_id FROM crops WHERE image_id >= ? AND image_id < ? "
                          "ORDER BY crop_id", [lo, hi]).fetchnumpy()["crop_id"]
        ids = np.asarray(ids, np.int64)
        f = chunk_path(k)
        if not f.is_file():
            raise ExplorerError(f"Chunk file {f} is missing; {_rebuild_hint(ws)}")
        try:
            e = np.load(f, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise _unreadable_index_file(ws, f, exc) from exc
        if e.ndim != 2 or e.shape != (len(ids), plan.total_dim):
            raise ExplorerError(f"Chunk file {f} ({e.shape}) does not fit the catalog "
                                f"({len(ids)} crops x {plan.total_dim}); {_rebuild_hint(ws)}")
        for w, a, b in zip(writers, offsets[:-1], offsets[1:]):
            w.append(ids, e[:, a:b])
        pos += len(ids)
        del e
    n_crops = _counts(con)[1]
    if pos != n_crops:
        raise ExplorerError(f"Embeddings ({pos}) and crops ({n_crops}) disagree; "
                            f"{_rebuild_hint(ws)}")
    return {layer: w.finish({"layer": layer}) for layer, w in zip(plan.layers, writers)}


def _search_stamps(ws: Workspace, layers: Sequence[str], kind: str, memory_budget: int | str,
                   progress: ProgressFn | None) -> dict[str, str]:
    """Build each layer's search index (:func:`data_index.vector_index.build_index`, chosen
    by ``kind`` and ``memory_budget``) into ``index/<layer>/search/`` and return the ``meta``
    rows that describe it: ``index:<layer>`` (the kind), ``recall_at_8:<layer>`` (measured
    against the exhaustive search on stored crops as queries), ``index_bytes:<layer>``,
    ``index_detail:<layer>`` (JSON: nlist, nprobe, rerank, code bytes, why this kind) and
    ``index_id:<layer>`` (new for every approximate index; part of the result cache's keys)."""
    from .vector_index import build_index

    out: dict[str, str] = {}
    for layer in layers:
        store = EmbeddingStore.open(ws.layer_dir(layer))
        report(progress, "search index", 0, 1, "layers", message=f"{layer}: choosing the index")
        idx = build_index(store, ws.layer_dir(layer) / "search", kind=kind,
                          memory_budget=memory_budget, seed=int(ws.seed), progress=progress)
        info = dict(getattr(idx, "info", {}) or {})
        spec = dict(info.get("spec") or {})
        out[f"index:{layer}"] = str(info.get("kind", "exact"))
        out[f"recall_at_8:{layer}"] = (f"{float(info['recall_at_8']):.4f}"
                                       if "recall_at_8" in info else "")
        out[f"index_bytes:{layer}"] = str(sum(int(v) for v in (info.get("files") or {}).values()))
        out[f"index_detail:{layer}"] = json.dumps(spec, sort_keys=True)
        out[f"index_id:{layer}"] = ("exact" if out[f"index:{layer}"] == "exact"
                                    else uuid.uuid4().hex)
    return out


def _complete(con: duckdb.DuckDBPyConnection, ws: Workspace, plan: _Plan,
              chunk_path: Callable[[int], Path], t_start: float,
              progress: ProgressFn | None, index: str = "auto",
              memory_budget: int | str | None = None) -> None:
    """Assemble the stores, build each layer's search index, mark the catalog complete,
    delete the chunk files."""
    from .vector_index import DEFAULT_MEMORY_BUDGET

    report(progress, "assemble", plan.total, plan.total, "images",
           message=f"{len(plan.layers)} layer store(s)")
    _assemble(con, ws, plan, chunk_path)
    search = _search_stamps(ws, plan.layers, index, memory_budget or DEFAULT_MEMORY_BUDGET,
                            progress)
    con.execute("BEGIN TRANSACTION")
    stamps = {"complete": "true", "seconds": f"{time.perf_counter() - t_start:.1f}",
              "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
              # build_id: new on every completed build, part of the result cache's keys
              "build_id": uuid.uuid4().hex, **search}
    _write_stamps(con, stamps)
    con.execute("COMMIT")
    for k in range(plan.n_chunks):
        chunk_path(k).unlink(missing_ok=True)


def _check_index_request(kind: str, memory_budget: int | str | None) -> None:
    """Refuse an unknown index kind or an unreadable / non-positive memory budget."""
    from .vector_index import ALIASES, KINDS, parse_bytes

    if ALIASES.get(kind, kind) not in KINDS:
        raise ExplorerError(f"Unknown index kind '{kind}'; use one of auto, exact (flat), "
                            "ivf-sq8, ivf-pq")
    if memory_budget is not None and parse_bytes(memory_budget) <= 0:
        raise ExplorerError(f"Memory budget '{memory_budget}' must be positive, e.g. 2GB")


def _write_stamps(con: duckdb.DuckDBPyConnection, stamps: dict[str, str]) -> None:
    """Replace the ``meta`` rows named by ``stamps`` (inside the caller's transaction)."""
    con.execute("DELETE FROM meta WHERE key IN (SELECT unnest(?::VARCHAR[]))", [list(stamps)])
    for key, val in stamps.items():
        con.execute("INSERT INTO meta VALUES (?, ?)", [key, val])


def reindex_catalog(ws: Workspace, kind: str = "auto", memory_budget: int | str | None = None,
                    layers: Sequence[str] | None = None,
                    progress: ProgressFn | None = None) -> dict[str, str]:
    """(Re)build the search index of ``layers`` (default: all) of a complete catalog, under the
    exclusive workspace lock (refused while the workspace is in use), and record it in
    ``meta`` (see :func:`_search_stamps`). Returns the ``meta`` rows written."""
    from .vector_index import DEFAULT_MEMORY_BUDGET

    _check_index_request(kind, memory_budget)
    _release_readers(ws.catalog_path)
    lock = lock_workspace(ws.root, exclusive=True)
    try:
        if not ws.catalog_path.is_file():
            raise ExplorerError(f"Workspace '{ws.name}' has no catalog yet; build it first: "
                                f"python -m data_index build --workspace {ws.root}")
        con = _connect_rw(ws.catalog_path)
        try:
            meta = _read_meta(con)
            if _is_v1(ws, meta):
                raise _old_catalog(ws)
            if meta.get("complete") != "true":
                raise ExplorerError(f"The catalog of workspace '{ws.name}' is not complete; "
                                    f"finish it first: python -m data_index build --workspace "
                                    f"{ws.root}")
            have = json.loads(meta.get("layers") or "[]")
            todo = list(layers or have)
            unknown = [x for x in todo if x not in have]
            if unknown:
                raise ExplorerError(f"Layer '{unknown[0]}' is not in the catalog of workspace "
                                    f"'{ws.name}'; its layers: {', '.join(have)}")
            stamps = _search_stamps(ws, todo, kind, memory_budget or DEFAULT_MEMORY_BUDGET,
                                    progress)
            con.execute("BEGIN TRANSACTION")
            _write_stamps(con, stamps)
            con.execute("COMMIT")
        finally:
            con.close()
    finally:
        lock.release()
    return stamps


def _delete_catalog(ws: Workspace) -> None:
    """Remove the catalog, its index and any shards; the caller holds the exclusive lock."""
    for p in (ws.catalog_path, ws.catalog_path.with_name(ws.catalog_path.name + ".wal")):
        p.unlink(missing_ok=True)
    for d in (ws.index_dir, ws.shards_dir):
        if d.is_dir():
            for f in d.iterdir():
                if f.is_dir() and not f.is_symlink():
                    shutil.rmtree(f)
                else:
                    f.unlink()
    if ws.shards_dir.is_dir():
        ws.shards_dir.rmdir()


def _start_meta(con: duckdb.DuckDBPyConnection, plan: _Plan, meta: dict[str, str],
                extra: dict[str, str], unreadable: Sequence[tuple[str, str]],
                where: Path) -> bool:
    """Compare a resumed build's ``meta`` with the plan (raises on a difference) or write the
    first meta rows. Returns whether the catalog (or shard) is already complete."""
    want = {**plan.want(), **extra}
    if meta:
        diff = [k for k, v in want.items() if meta.get(k) != v]
        if diff:
            raise ExplorerError(
                f"The catalog in '{where}' was built with other settings or another image "
                f"list ({', '.join(diff)} differ); rebuild it with "
                f"'python -m data_index build --workspace {plan.ws.root} --rebuild'")
        return meta.get("complete") == "true"
    con.execute("BEGIN TRANSACTION")
    for key, val in {**plan.static_meta(), **extra}.items():
        con.execute("INSERT INTO meta VALUES (?, ?)", [key, val])
    for path, reason in unreadable:  # folders os.walk could not list
        con.execute("INSERT INTO skipped VALUES (?, ?, -1)", [escape_rel(path), reason])
    con.execute("COMMIT")
    return False


# --------------------------------------------------------------------------------------------
# build


def build_catalog(ws: Workspace, *, batch_size: int = 32, device: str = "auto",
                  progress: ProgressFn | None = None,
                  limit: int | None = None, model: Any = None, chunk_size: int = 256,
                  num_workers: int | None = None, rebuild: bool = False, shards: int = 1,
                  shard: int = 0, source: ChunkSource | None = None, index: str = "auto",
                  memory_budget: int | str | None = None) -> BuildStats:
    """Build (or resume) the crop catalog of ``ws``; see the module docstring.

    Parameters
    ----------
    batch_size : images per forward at the model's input size (crop mode forwards the crops of
        that many images at once); larger images make smaller batches (same pixels).
    device : ``auto`` | ``cpu`` | ``cuda``; ``auto`` uses the workspace's device setting.
    progress : called with a :class:`~explorer_core.progress.Progress` after every forward batch
        (stage ``index``, images done / total with rate and ETA; after each saved chunk with the
        message ``"k/K chunks saved"``), then ``assemble`` and ``done``.
    limit : index only the first ``limit`` files of the sorted listing.
    model : an already loaded :class:`~explorer_core.models.LoadedModel` (else ``ws.model`` is loaded).
    chunk_size : images per resumable chunk.
    num_workers : JPEG-decoding threads overlapping the forward (default ``min(4, cpus)``).
    rebuild : delete an existing catalog of this workspace first (under the exclusive
        workspace lock: refused while another process builds or reads the workspace); with
        ``shards > 1``, only this shard's own work is deleted.
    shards, shard : build only the chunks ``k % shards == shard`` into ``shards/<shard>/``;
        :func:`merge_shards` makes the catalog once every shard is done.
    source : where chunks are computed (default: in this process; the Ray build passes its
        workers, :mod:`data_index.ray_build`).
    index, memory_budget : the search index built for every layer when the catalog completes
        (:func:`data_index.vector_index.choose_index`: ``auto`` | ``exact`` | ``ivf-sq8`` |
        ``ivf-pq``; budget in bytes or ``"2GB"``, default 2 GB); :func:`reindex_catalog`
        changes it later.

    Returns
    -------
    BuildStats (``complete`` is False for a shard: the catalog exists after the merge).
    """
    t_start = time.perf_counter()
    _check_sizes(batch_size=batch_size, chunk_size=chunk_size, limit=1 if limit is None
                 else limit, shards=shards)
    _check_index_request(index, memory_budget)  # before hours of work, not after
    if not 0 <= int(shard) < int(shards):
        raise ExplorerError(f"shard={shard}: use a shard number in 0..{int(shards) - 1}")
    if model is None:
        from explorer_core.models import shared_model

        model = shared_model(ws.model, ws.device if device in (None, "", "auto") else device)
    lm = model
    dims, nonneg = _check_model(ws, lm)
    folder = ImageFolder(ws.images_path)
    ws.root.mkdir(parents=True, exist_ok=True)
    src = source or local_source(lm, batch_size, num_workers)
    if int(shards) > 1:
        return _build_shard(ws, lm, folder, dims, nonneg, int(shards), int(shard), src,
                            limit=limit, chunk_size=chunk_size, rebuild=rebuild,
                            progress=progress, t_start=t_start)
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
    processed, todo = 0, []
    try:
        if lock is not None:
            con.execute(_SCHEMA)
        meta = _read_meta(con)
        if _is_v1(ws, meta):
            raise _old_catalog(ws)
        if limit is None and meta.get("limit"):  # resuming a limited build: same limit
            limit = int(meta["limit"])
        plan = _make_plan(ws, lm, folder, limit, chunk_size, dims, nonneg)
        if _start_meta(con, plan, meta, {}, folder.unreadable, ws.root):
            n_img, n_crop, n_sk, n_ch = _counts(con)
            report(progress, "done", plan.total, plan.total, "images")
            return BuildStats(n_img, n_crop, n_sk, n_ch, n_ch, 0.0, 0.0, ws.mode,
                              int(meta.get("dim", 0)), True, True, tuple(plan.layers),
                              dict(zip(plan.layers, dims)))
        if lock is None:  # opened read-only for a complete catalog that no longer matches
            raise ExplorerError(f"The catalog in '{ws.root}' is not complete; "
                                f"{_rebuild_hint(ws)}")
        done = {int(r[0]) for r in con.execute("SELECT chunk_id FROM chunks").fetchall()}
        _check_chunk_files(ws, ws.index_dir, list(done), plan.total_dim)
        todo = [k for k in range(plan.n_chunks) if k not in done]
        processed = _run_chunks(con, ws.index_dir, plan, todo, done, src, progress,
                                plan.n_chunks)
        _complete(con, ws, plan, lambda k: ws.index_dir / f"emb_{k:05d}.npy", t_start,
                  progress, index, memory_budget)
        n_img, n_crop, n_sk, _ = _counts(con)
    finally:
        con.close()
        if lock is not None:
            lock.release()
        if reader is not None:
            _drop_reader(reader)
    secs = time.perf_counter() - t_start
    if progress:
        progress(Progress("done", plan.total, plan.total, "images",
                          processed / max(secs, 1e-9), 0.0))
    return BuildStats(n_img, n_crop, n_sk, plan.n_chunks, plan.n_chunks - len(todo), secs,
                      processed / max(secs, 1e-9), ws.mode, dims[plan.layers.index(ws.layer)],
                      True, False, tuple(plan.layers), dict(zip(plan.layers, dims)))


def _shard_dir(ws: Workspace, shard: int) -> Path:
    return ws.shards_dir / str(int(shard))


def _build_shard(ws: Workspace, lm: Any, folder: ImageFolder, dims: list[int],
                 nonneg: list[bool], shards: int, shard: int, source: ChunkSource, *,
                 limit: int | None, chunk_size: int, rebuild: bool,
                 progress: ProgressFn | None, t_start: float) -> BuildStats:
    """One shard of a sharded build (see :func:`build_catalog`)."""
    layers = tuple(ws.layers)
    if not rebuild:
        opened = _open_complete(ws)
        if opened is not None:  # the merged catalog exists: nothing to do
            con, reader = opened
            try:
                meta = _read_meta(con)
                if _is_v1(ws, meta):
                    raise _old_catalog(ws)
                n_img, n_crop, n_sk, n_ch = _counts(con)
            finally:
                con.close()
                _drop_reader(reader)
            report(progress, "done", n_img, n_img, "images")
            return BuildStats(n_img, n_crop, n_sk, n_ch, n_ch, 0.0, 0.0, ws.mode,
                              int(meta.get("dim", 0)), True, True, layers,
                              dict(zip(layers, dims)), shard, shards)
    wlock = lock_workspace(ws.root, exclusive=False)  # no rebuild or merge meanwhile
    locks = [wlock]
    try:
        sdir = _shard_dir(ws, shard)
        (sdir / "index").mkdir(parents=True, exist_ok=True)
        locks.append(lock_workspace(sdir, exclusive=True))  # one builder per shard
        db = sdir / "catalog.duckdb"
        if rebuild:
            for p in (db, db.with_name(db.name + ".wal")):
                p.unlink(missing_ok=True)
            for f in (sdir / "index").iterdir():
                f.unlink()
        con = _connect_rw(db)
        try:
            con.execute(_SCHEMA)
            meta = _read_meta(con)
            if limit is None and meta.get("limit"):
                limit = int(meta["limit"])
            plan = _make_plan(ws, lm, folder, limit, chunk_size, dims, nonneg)
            extra = {"shards": str(shards), "shard": str(shard)}
            _start_meta(con, plan, meta, extra, folder.unreadable if shard == 0 else [], sdir)
            mine = [k for k in range(plan.n_chunks) if k % shards == shard]
            done = {int(r[0]) for r in con.execute("SELECT chunk_id FROM chunks").fetchall()}
            _check_chunk_files(ws, sdir / "index", list(done), plan.total_dim)
            todo = [k for k in mine if k not in done]
            processed = _run_chunks(con, sdir / "index", plan, todo, done, source, progress,
                                    len(mine))
            con.execute("DELETE FROM meta WHERE key = 'complete'")
            con.execute("INSERT INTO meta VALUES ('complete', 'true')")
            n_img, n_crop, n_sk, n_ch = _counts(con)
        finally:
            con.close()
    finally:
        for lk in reversed(locks):
            lk.release()
    secs = time.perf_counter() - t_start
    report(progress, "done", plan.chunk_files(mine), plan.chunk_files(mine), "images",
           message=f"shard {shard + 1} of {shards} done; merge when all are")
    return BuildStats(n_img, n_crop, n_sk, len(mine), len(mine) - len(todo), secs,
                      processed / max(secs, 1e-9), ws.mode, dims[plan.layers.index(ws.layer)],
                      False, False, layers, dict(zip(layers, dims)), shard, shards)


# --------------------------------------------------------------------------------------------
# merge


def _shard_metas(ws: Workspace) -> dict[int, dict[str, str]]:
    out: dict[int, dict[str, str]] = {}
    if not ws.shards_dir.is_dir():
        return out
    for d in sorted(ws.shards_dir.iterdir()):
        if d.name.isdigit() and (d / "catalog.duckdb").is_file():
            con = duckdb.connect(str(d / "catalog.duckdb"), read_only=True)
            try:
                out[int(d.name)] = _read_meta(con)
            finally:
                con.close()
    return out


def merge_shards(ws: Workspace, *, model: Any = None, device: str = "auto",
                 progress: ProgressFn | None = None, index: str = "auto",
                 memory_budget: int | str | None = None) -> BuildStats:
    """Merge the shards of a sharded build (``shards/<i>/``) into the workspace's catalog:
    every table's rows in chunk (= image-id) order, each layer's store assembled from the
    shards' chunk files -- the catalog a single-process build writes (same rows but the build
    stamps, equal embeddings). Refused, naming what to run, while a shard is missing or
    incomplete; replaces an existing catalog; deletes ``shards/`` when done."""
    t_start = time.perf_counter()
    _check_index_request(index, memory_budget)
    if model is None:
        from explorer_core.models import shared_model

        model = shared_model(ws.model, ws.device if device in (None, "", "auto") else device)
    lm = model
    dims, nonneg = _check_model(ws, lm)
    folder = ImageFolder(ws.images_path)
    _release_readers(ws.catalog_path)
    lock = lock_workspace(ws.root, exclusive=True)
    locks = [lock]
    con: duckdb.DuckDBPyConnection | None = None
    try:
        metas = _shard_metas(ws)
        if not metas:
            raise ExplorerError(f"Workspace '{ws.name}' has no shards to merge; build them "
                                f"first: python -m data_index build --workspace {ws.root} "
                                "--shards N --shard i (for every i in 0..N-1)")
        n = int(next(iter(metas.values())).get("shards", "0") or 0)
        if n < 2:
            raise ExplorerError(f"The shards of workspace '{ws.name}' do not say how many there "
                                f"are; rebuild them with --rebuild: python -m data_index build "
                                f"--workspace {ws.root} --shards N --shard I --rebuild")
        for i in metas:
            locks.append(lock_workspace(_shard_dir(ws, i), exclusive=True))
        limit_s = next(iter(metas.values())).get("limit") or ""
        plan = _make_plan(ws, lm, folder, int(limit_s) if limit_s else None,
                          int(next(iter(metas.values())).get("chunk_size", "256")), dims,
                          nonneg)
        want = plan.want()
        how = (f"python -m data_index build --workspace {ws.root} --shards {n} --shard I")
        for i, m in sorted(metas.items()):
            diff = [k for k, v in want.items() if m.get(k) != v]
            if m.get("shards") != str(n) or diff:
                raise ExplorerError(
                    f"Shard {i} of workspace '{ws.name}' was built with other settings "
                    f"({', '.join(diff) or 'number of shards'} differ); rebuild the shards "
                    f"with --rebuild ({how})")
        missing = [i for i in range(n) if i not in metas]
        incomplete = [i for i in range(n) if i in metas and metas[i].get("complete") != "true"]
        if missing or incomplete:
            raise ExplorerError(
                f"Cannot merge workspace '{ws.name}': shard(s) {', '.join(map(str, missing))}"
                f"{' missing' if missing else ''}{'; ' if missing and incomplete else ''}"
                f"{', '.join(map(str, incomplete))}{' not complete' if incomplete else ''}; "
                f"run {how.replace('I', str((missing + incomplete)[0]))} first")
        _delete_main_catalog(ws)
        ws.index_dir.mkdir(parents=True, exist_ok=True)
        con = _connect_rw(ws.catalog_path)
        con.execute(_SCHEMA)
        _start_meta(con, plan, {}, {}, [], ws.root)  # the unlistable folders: from shard 0
        for i in range(n):
            db = str(_shard_dir(ws, i) / "catalog.duckdb").replace("'", "''")
            con.execute(f"ATTACH '{db}' AS s{i} (READ_ONLY)")
        meter = Meter(progress, "merge", plan.n_chunks, "chunks", min_interval=1.0)
        con.execute("BEGIN TRANSACTION")
        con.execute("INSERT INTO skipped SELECT * FROM s0.skipped WHERE chunk_id = -1 "
                    "ORDER BY rowid")
        for k in range(plan.n_chunks):
            s, lo, hi = f"s{k % n}", k * plan.chunk_size, (k + 1) * plan.chunk_size
            rng = "WHERE image_id >= ? AND image_id < ?"
            con.execute(f"INSERT INTO images SELECT * FROM {s}.images {rng} ORDER BY image_id",
                        [lo, hi])
            con.execute(f"INSERT INTO image_classes SELECT * FROM {s}.image_classes {rng} "
                        'ORDER BY image_id, "class"', [lo, hi])
            con.execute(f"INSERT INTO crops SELECT * FROM {s}.crops {rng} ORDER BY crop_id",
                        [lo, hi])
            con.execute(f"INSERT INTO skipped SELECT * FROM {s}.skipped WHERE chunk_id = ? "
                        "ORDER BY rowid", [k])
            con.execute(f"INSERT INTO chunks SELECT * FROM {s}.chunks WHERE chunk_id = ?", [k])
            meter.update(k + 1)
        con.execute("COMMIT")
        for i in range(n):
            con.execute(f"DETACH s{i}")
        _complete(con, ws, plan, lambda k: _shard_dir(ws, k % n) / "index" / f"emb_{k:05d}.npy",
                  t_start, progress, index, memory_budget)
        n_img, n_crop, n_sk, n_ch = _counts(con)
        con.close()
        con = None
        for lk in locks[1:]:
            lk.release()
        del locks[1:]
        shutil.rmtree(ws.shards_dir)
    finally:
        if con is not None:
            con.close()
        for lk in reversed(locks):
            lk.release()
    secs = time.perf_counter() - t_start
    report(progress, "done", plan.total, plan.total, "images", message=f"{n} shards merged")
    layers = tuple(plan.layers)
    return BuildStats(n_img, n_crop, n_sk, n_ch, n_ch, secs, 0.0, ws.mode,
                      dims[plan.layers.index(ws.layer)], True, False, layers,
                      dict(zip(layers, dims)), None, n)


def _delete_main_catalog(ws: Workspace) -> None:
    """Remove the catalog and its index, keeping the shards (a merge replaces them)."""
    for p in (ws.catalog_path, ws.catalog_path.with_name(ws.catalog_path.name + ".wal")):
        p.unlink(missing_ok=True)
    if ws.index_dir.is_dir():
        shutil.rmtree(ws.index_dir)


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


EMBEDDINGS_IN_RAM_LIMIT = 1 << 30
""":meth:`Catalog.embeddings` refuses layers whose float32 copy would exceed this (1 GiB)."""


class Catalog:
    """Read-only access to a built catalog. Open with :meth:`Catalog.open`.

    Several readers in one process share one read-only DuckDB database (each has its own
    cursor, used under a lock, so a reader may be shared across threads). While any of them is
    open the process holds the workspace lock shared, so no other process can rebuild the
    catalog under it; :meth:`close` the catalog (or use it as a context manager) to let go.

    Attributes
    ----------
    layers : list of str
        The catalog's layers, in model forward order.
    default_layer : str
        The layer used when none is named.
    grid : CropGrid
    storage : str
        ``float16`` or ``float32``.
    mode : str
        ``crop`` or ``cell``.
    share_threshold : float
        Segmentation: the pixel share from which an image counts as predicted as a class.
    """

    def __init__(self, ws: Workspace, con: duckdb.DuckDBPyConnection, meta: dict[str, str],
                 reader: _Reader | None = None,
                 stores: dict[str, EmbeddingStore] | None = None):
        self.ws = ws
        self._con = con
        self._reader = reader
        self._closed = False
        self._lock = threading.RLock()
        self.meta = meta
        # the workspace record is the truth (a relative image folder moves with the workspace)
        self.images_root = ws.images_path
        self.mode = meta.get("mode", ws.mode)
        self.layers: list[str] = list(json.loads(meta.get("layers") or "[]")) or [ws.layer]
        self.default_layer = meta.get("layer") or self.layers[0]
        self.grid = CropGrid(int(meta.get("image_size", ws.image_size)),
                             int(meta.get("crop_size", ws.crop_size)),
                             int(meta.get("stride", ws.stride)))
        self.storage = meta.get("storage", ws.storage)
        self.share_threshold = float(meta.get("image_share_threshold", IMAGE_SHARE_THRESHOLD))
        bg = meta.get("background_class")
        self.background_class = int(bg) if bg not in (None, "") else None
        self._stores = dict(stores or {})
        row = self._q("SELECT EXISTS (SELECT 1 FROM image_classes)")
        self.by_shares = bool(row[0][0]) if row else False

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
            meta = _read_meta(con)
            if _is_v1(ws, meta):
                raise _old_catalog(ws)
            if meta.get("complete") != "true":
                raise ExplorerError(f"The catalog of workspace '{ws.name}' is not complete; {how}")
            row = con.execute("SELECT count(*) FROM crops").fetchone()
            n = int(row[0]) if row else 0
            stores = {}
            for layer in json.loads(meta.get("layers") or "[]"):
                st = EmbeddingStore.open(ws.layer_dir(layer))  # checks every file's header
                want = int(meta.get(f"dim:{layer}", 0))
                if len(st) != n or st.dim != want:
                    raise ExplorerError(
                        f"The embedding store {st.folder} holds {len(st)} x {st.dim}, the "
                        f"catalog {n} crops x {want}; {_rebuild_hint(ws)}")
                stores[layer] = st
        except BaseException:
            con.close()
            _drop_reader(reader)
            raise
        return cls(ws, con, meta, reader, stores)

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
            self._stores = {}
        if self._reader is not None:
            _drop_reader(self._reader)

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _q(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        with self._lock:
            return self._con.execute(sql, params or []).fetchall()

    # ---- layers and embeddings -------------------------------------------------------------
    def check_layer(self, layer: str | None = None) -> str:
        """``layer`` if it is one of the catalog's layers (``None``: the default layer); an
        unknown layer raises :class:`ExplorerError` listing the catalog's layers."""
        if layer is None or layer == "":
            return self.default_layer
        if layer not in self.layers:
            raise ExplorerError(
                f"Layer '{layer}' is not in the catalog of workspace '{self.ws.name}'; its "
                f"layers: {', '.join(self.layers)}. To add a layer, rebuild the catalog with "
                "'python -m data_index build ... --layers a,b,c --rebuild'")
        return layer

    def dim(self, layer: str | None = None) -> int:
        """Embedding width ``C`` of ``layer`` (default layer when ``None``)."""
        return int(self.meta.get(f"dim:{self.check_layer(layer)}", 0))

    def nonnegative(self, layer: str | None = None) -> bool:
        """Whether ``layer``'s outputs were non-negative on the probe inputs (post-ReLU)."""
        return self.meta.get(f"nonnegative:{self.check_layer(layer)}") == "true"

    def recall_at_8(self, layer: str | None = None) -> float | None:
        """Recall@8 of ``layer``'s search index against the exhaustive search, measured when
        the index was built (``None`` for catalogs built before it was measured)."""
        text = self.meta.get(f"recall_at_8:{self.check_layer(layer)}") or ""
        return float(text) if text else None

    def index_id(self, layer: str | None = None) -> str:
        """``exact`` or the id of ``layer``'s approximate search index (new on every index
        build): what the crops a search returns depend on, beside the catalog itself."""
        return self.meta.get(f"index_id:{self.check_layer(layer)}") or "exact"

    def store(self, layer: str | None = None) -> EmbeddingStore:
        """The crop embeddings of ``layer`` (memory-mapped :class:`EmbeddingStore`)."""
        name = self.check_layer(layer)
        with self._lock:
            if self._closed:
                raise ExplorerError(f"The catalog of '{self.ws.name}' is closed")
            st = self._stores.get(name)
            if st is None:
                st = self._stores[name] = EmbeddingStore.open(self.ws.layer_dir(name))
            return st

    def embeddings(self, layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Deprecated (small catalogs only): ``(crop_ids int64 (N,), embeddings float32 (N,
        C))`` of ``layer`` read into RAM. Refuses a layer whose float32 copy exceeds
        :data:`EMBEDDINGS_IN_RAM_LIMIT`; use :meth:`store` (blocks, gathers) instead."""
        st = self.store(layer)
        need = len(st) * st.dim * 4
        if need > EMBEDDINGS_IN_RAM_LIMIT:
            raise ExplorerError(f"The embeddings of layer '{self.check_layer(layer)}' take "
                                f"{need / 2**30:.1f} GiB as float32, too many to read into RAM; "
                                "read them in blocks with Catalog.store(layer).blocks()")
        emb = np.empty((len(st), st.dim), np.float32)
        for pos, block in st.blocks():
            emb[pos:pos + len(block)] = block
        return np.asarray(st.ids), emb

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
        """``{class: number of images predicted as it}``, classes with at least one image
        (segmentation: images whose share of the class reaches the threshold; the background
        class is not counted)."""
        if self.by_shares:
            bg = -1 if self.background_class is None else self.background_class
            rows = self._q('SELECT "class", count(*) FROM image_classes WHERE share >= ? AND '
                           '"class" != ? GROUP BY "class" ORDER BY "class"',
                           [self.share_threshold, bg])
        else:
            rows = self._q("SELECT pred, count(*) FROM images GROUP BY pred ORDER BY pred")
        return {int(p): int(n) for p, n in rows}

    def status(self) -> dict[str, Any]:
        stores = {layer: self.store(layer) for layer in self.layers}
        return {"workspace": str(self.ws.root), "model": self.meta.get("model"),
                "layer": self.default_layer, "layers": list(self.layers),
                "dims": {k: s.dim for k, s in stores.items()},
                "mode": self.mode, "dim": self.dim(), "storage": self.storage,
                "grid": self.grid.label(),
                "index": {k: self.meta.get(f"index:{k}", "exact") for k in self.layers},
                "recall_at_8": {k: self.recall_at_8(k) for k in self.layers},
                "index_bytes": {k: int(self.meta.get(f"index_bytes:{k}") or 0)
                                for k in self.layers},
                "store_bytes": {k: s.nbytes for k, s in stores.items()},
                "images": self.n_images, "crops": self.n_crops, "skipped": self.n_skipped,
                "complete": self.meta.get("complete") == "true",
                "built_at": self.meta.get("built_at"), "build_seconds": self.meta.get("seconds"),
                "predicted_counts": self.predicted_counts()}

    # ---- images ----------------------------------------------------------------------------
    def _predicted_sql(self, alias: str) -> str:
        """SQL: image ``alias`` counts as predicted as class ``?`` (one parameter)."""
        if self.by_shares:
            return (f"{alias}.image_id IN (SELECT image_id FROM image_classes WHERE "
                    f'"class" = ? AND share >= {float(self.share_threshold)!r})')
        return f"{alias}.pred = ?"

    def images_predicted_as(self, cls: int) -> list[int]:
        """Ids of the images predicted as ``cls``, ascending (classifiers: ``pred = cls``;
        segmentation: the share of ``cls`` is at least :attr:`share_threshold`)."""
        return [int(r[0]) for r in self._q(
            f"SELECT image_id FROM images i WHERE {self._predicted_sql('i')} ORDER BY image_id",
            [int(cls)])]

    def image_classes(self, image_id: int) -> dict[int, float]:
        """``{class: predicted pixel share}`` of one image (segmentation; ``{}`` otherwise)."""
        return {int(c): float(s) for c, s in self._q(
            'SELECT "class", share FROM image_classes WHERE image_id = ? ORDER BY "class"',
            [int(image_id)])}

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

    def image_preds(self) -> tuple[np.ndarray, np.ndarray]:
        """``(image ids, predicted classes)``, both int64 ``(N,)``, by image id."""
        rows = self._q("SELECT image_id, pred FROM images ORDER BY image_id")
        return (np.fromiter((r[0] for r in rows), np.int64, len(rows)),
                np.fromiter((r[1] for r in rows), np.int64, len(rows)))

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

        return lm.geometry(load_rgb(self.image_path(image_id)), self.grid.image_size)

    def image_pixels(self, image_ids: Sequence[int], lm: Any) -> torch.Tensor:
        """``(B, 3, S, S)`` [0, 1] pixels of the images (decoded again, through
        ``lm.geometry`` at the grid's image size ``S``)."""
        if not len(image_ids):
            s = self.grid.image_size
            return torch.zeros(0, 3, s, s)
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
        """``(k, 3, c, c)`` [0, 1] pixels of the crops (``c`` the grid's crop size), order
        preserved."""
        c = self.grid.crop_size
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
        """Crop ids, ascending, whose own (or dominant) class is ``cls`` or whose source image
        counts as predicted ``cls`` (:meth:`images_predicted_as`)."""
        rows = self._q(f"""SELECT c.crop_id FROM crops c JOIN images i USING (image_id)
            WHERE c.pred = ? OR {self._predicted_sql('i')} ORDER BY c.crop_id""",
                       [int(cls), int(cls)])
        return np.asarray([r[0] for r in rows], np.int64)

    def random_crop_ids(self, n: int, seed: int = 0, exclude_class: int | None = None
                        ) -> list[int]:
        """``n`` distinct crop ids drawn with ``seed`` (fewer if the catalog is smaller)."""
        if exclude_class is None:
            ids = np.asarray([r[0] for r in self._q("SELECT crop_id FROM crops ORDER BY crop_id")],
                             np.int64)
        else:
            ids = np.asarray([r[0] for r in self._q(
                f"""SELECT c.crop_id FROM crops c JOIN images i USING (image_id)
                WHERE NOT (coalesce(c.pred = ?, false) OR {self._predicted_sql('i')})
                ORDER BY c.crop_id""", [int(exclude_class), int(exclude_class)])], np.int64)
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
        order = {"images": " ORDER BY image_id", "crops": " ORDER BY crop_id",
                 "image_classes": ' ORDER BY image_id, "class"'}.get(table, "")
        sel = f'SELECT * FROM "{table}"{order}'
        if table == "images" and suffix == ".csv":
            sel = ("SELECT image_id, path, label, label_name, pred, conf, "
                   "array_to_string(top5, ' ') AS top5 FROM images ORDER BY image_id")
        with self._lock:
            try:
                self._con.execute(f"COPY ({sel}) TO '{target}' {fmt}")
            except duckdb.Error as exc:
                raise ExplorerError(f"Export to '{path}' failed: {exc}") from exc
        return p

    def __repr__(self) -> str:
        return (f"Catalog({self.ws.name!r}, mode={self.mode}, layers={self.layers}, "
                f"{self.storage})")
