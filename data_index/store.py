"""Crop embeddings on disk: compact, sharded, memory-mapped.

One :class:`EmbeddingStore` per catalog layer holds the embeddings of every crop, in crop-id
order, as row shards (float16 by default: 2 bytes a value, 11.5 M x 2048 = 47 GB instead of
94 GB) plus the sorted crop ids and the rows' L2 norms. Nothing reads the whole store into RAM:
shards are memory-mapped, and readers take blocks (:meth:`EmbeddingStore.blocks`) or gather rows
(:meth:`EmbeddingStore.vectors`).

Layout of a store folder::

    store.json          manifest: format, dtype, dim, rows, shards, max_abs (written last)
    ids.npy             (N,) int64 crop ids, ascending
    norms.npy           (N,) float32 L2 norm of each row (as stored)
    emb-00000.npy ...   (rows_k, dim) float16 or float32 row shards

A store is written once by :class:`StoreWriter` (append blocks in crop-id order, then
``finish()``, which writes the manifest atomically); a folder without a manifest is not a store.
Opening checks every file against the manifest, so a truncated or missing file is reported by
name with the command that rebuilds it, never read as garbage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from explorer_core.errors import ExplorerError

__all__ = ["STORE_FORMAT", "DTYPES", "EmbeddingStore", "StoreWriter", "store_nbytes"]

STORE_FORMAT = "concept-explorer-embeddings/1"
DTYPES = ("float16", "float32")
MANIFEST = "store.json"
FLOAT16_MAX = 65504.0


def store_nbytes(rows: int, dim: int, dtype: str = "float16") -> int:
    """Bytes on disk of a store of ``rows`` x ``dim`` (embeddings + ids + norms)."""
    return rows * dim * np.dtype(dtype).itemsize + rows * (8 + 4)


def _rebuild_hint(folder: Path) -> str:
    ws = folder.parent.parent if folder.parent.name == "index" else folder.parent
    return f"rebuild the catalog: python -m data_index build --workspace {ws} --rebuild"


def _open_npy(path: Path, folder: Path, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Memory-map ``path`` and check its shape and dtype against the manifest."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError as exc:
        raise ExplorerError(f"Embedding file {path} is missing; {_rebuild_hint(folder)}") from exc
    except (ValueError, OSError, EOFError) as exc:
        raise ExplorerError(f"Embedding file {path} is truncated or corrupt ({exc}); "
                            f"{_rebuild_hint(folder)}") from exc
    if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise ExplorerError(f"Embedding file {path} holds {arr.dtype}{tuple(arr.shape)}, the "
                            f"manifest says {dtype}{tuple(shape)}; {_rebuild_hint(folder)}")
    return arr


@dataclass(frozen=True)
class _Shard:
    start: int  # first row
    rows: np.ndarray  # (n, dim) memory-mapped


class EmbeddingStore:
    """Read access to one layer's crop embeddings (see the module docstring).

    Attributes
    ----------
    folder : Path
    dim : int
        Embedding width ``C`` (channels of the layer).
    dtype : str
        ``float16`` or ``float32`` (as stored; everything returned is float32).
    ids : ndarray (N,) int64
        Crop ids, ascending (memory-mapped).
    norms : ndarray (N,) float32
        L2 norm of each stored row.
    """

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.folder = folder
        self.manifest = manifest
        self.dim = int(manifest["dim"])
        self.dtype = str(manifest["dtype"])
        n = int(manifest["rows"])
        self.ids = _open_npy(folder / "ids.npy", folder, (n,), "int64")
        self.norms = _open_npy(folder / "norms.npy", folder, (n,), "float32")
        self._shards: list[_Shard] = []
        start = 0
        for sh in manifest["shards"]:
            rows = int(sh["rows"])
            arr = _open_npy(folder / sh["file"], folder, (rows, self.dim), self.dtype)
            self._shards.append(_Shard(start, arr))
            start += rows
        if start != n:
            raise ExplorerError(f"Store {folder}: shards hold {start} rows, the manifest says {n}; "
                                f"{_rebuild_hint(folder)}")
        self._starts = np.asarray([s.start for s in self._shards] + [n], np.int64)

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | os.PathLike) -> EmbeddingStore:
        """Open the store in ``folder``; raises :class:`ExplorerError` naming any bad file."""
        folder = Path(folder)
        path = folder / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ExplorerError(f"No embedding store in {folder} (missing {MANIFEST}); "
                                f"{_rebuild_hint(folder)}") from exc
        except (OSError, ValueError) as exc:
            raise ExplorerError(f"Broken {path} ({exc}); {_rebuild_hint(folder)}") from exc
        if manifest.get("format") != STORE_FORMAT:
            raise ExplorerError(f"{path} is in format {manifest.get('format')!r}, this version "
                                f"reads {STORE_FORMAT!r}; {_rebuild_hint(folder)}")
        return cls(folder, manifest)

    # ---- size ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def nbytes(self) -> int:
        """Bytes on disk (embeddings, ids and norms)."""
        return store_nbytes(len(self), self.dim, self.dtype)

    # ---- reading ---------------------------------------------------------------------------
    def blocks(self, rows: int = 65536, start: int = 0, stop: int | None = None
               ) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, block (k, dim) float32)`` over rows ``start:stop`` in order; at most
        ``rows`` rows (a few MB) in memory at a time."""
        for pos, raw in self.raw_blocks(rows, start, stop):
            yield pos, np.asarray(raw, np.float32)

    def raw_blocks(self, rows: int = 65536, start: int = 0, stop: int | None = None
                   ) -> Iterator[tuple[int, np.ndarray]]:
        """Like :meth:`blocks`, but each block as stored (``dtype``; a read-only memory-mapped
        view, nothing copied): for readers that convert faster themselves."""
        stop = len(self) if stop is None else min(int(stop), len(self))
        pos = int(start)
        while pos < stop:
            k = int(np.searchsorted(self._starts, pos, side="right")) - 1
            sh = self._shards[k]
            end = min(stop, pos + rows, sh.start + len(sh.rows))
            yield pos, sh.rows[pos - sh.start:end - sh.start]
            pos = end

    def rows(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows at ``positions`` (k,) -> ``(k, dim)`` float32, in the given order."""
        pos = np.asarray(positions, np.int64).ravel()
        out = np.empty((len(pos), self.dim), np.float32)
        if len(pos) == 0:
            return out
        if pos.min() < 0 or pos.max() >= len(self):
            raise IndexError(f"row positions outside 0..{len(self) - 1}")
        shard_of = np.searchsorted(self._starts, pos, side="right") - 1
        for k in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == k)
            sh = self._shards[int(k)]
            local = pos[sel] - sh.start
            order = np.argsort(local, kind="stable")  # sorted reads are kinder to the page cache
            out[sel[order]] = sh.rows[local[order]]
        return out

    def positions(self, crop_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row positions of ``crop_ids``; unknown ids raise :class:`ExplorerError`."""
        cid = np.asarray(crop_ids, np.int64).ravel()
        pos = np.searchsorted(self.ids, cid)
        bad = (pos >= len(self)) | (self.ids[np.minimum(pos, len(self) - 1)] != cid) \
            if len(self) else np.ones(len(cid), bool)
        if np.any(bad):
            raise ExplorerError(f"No crop {int(cid[np.argmax(bad)])} in this catalog; crop ids "
                                "belong to indexed images (see 'python -m data_index status')")
        return pos

    def vectors(self, crop_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Embeddings of ``crop_ids`` -> ``(k, dim)`` float32."""
        return self.rows(self.positions(crop_ids))

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.folder)!r}, rows={len(self)}, dim={self.dim}, {self.dtype})"


class StoreWriter:
    """Write a store: :meth:`append` blocks in ascending crop-id order, then :meth:`finish`.

    Memory stays bounded by one shard's buffer (``shard_rows`` rows). ``dtype='float16'`` refuses
    values beyond float16's range (65504) with a clear error instead of storing infinities."""

    def __init__(self, folder: str | os.PathLike, dim: int, dtype: str = "float16",
                 shard_rows: int = 262_144) -> None:
        if dtype not in DTYPES:
            raise ExplorerError(f"Unknown storage dtype '{dtype}'; use one of {', '.join(DTYPES)}")
        if dim < 1 or shard_rows < 1:
            raise ExplorerError("A store needs dim >= 1 and shard_rows >= 1")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / MANIFEST).unlink(missing_ok=True)  # not a store until finished
        self.dim, self.dtype, self.shard_rows = int(dim), dtype, int(shard_rows)
        self._buf: list[np.ndarray] = []
        self._buf_rows = 0
        self._shards: list[dict] = []
        self._ids: list[np.ndarray] = []
        self._norms: list[np.ndarray] = []
        self._last_id = -1
        self._max_abs = 0.0
        self._rows = 0

    def append(self, crop_ids: np.ndarray, embeddings: np.ndarray) -> None:
        """Add rows ``embeddings (k, dim)`` for ``crop_ids (k,)`` (ascending, after earlier ones)."""
        ids = np.asarray(crop_ids, np.int64).ravel()
        emb = np.asarray(embeddings, np.float32)
        if emb.ndim != 2 or emb.shape != (len(ids), self.dim):
            raise ValueError(f"expected ({len(ids)}, {self.dim}) embeddings, got {emb.shape}")
        if len(ids) == 0:
            return
        if ids[0] <= self._last_id or np.any(np.diff(ids) <= 0):
            raise ValueError("crop ids must be appended in strictly ascending order")
        if not np.all(np.isfinite(emb)):
            raise ExplorerError("Embeddings contain NaN or infinite values; the model or layer "
                                "produces non-finite activations")
        peak = float(np.abs(emb).max())
        if self.dtype == "float16" and peak > FLOAT16_MAX:
            raise ExplorerError(f"Embedding values up to {peak:.3g} do not fit float16 (max "
                                f"{FLOAT16_MAX:g}); build with --storage float32")
        self._max_abs = max(self._max_abs, peak)
        self._last_id = int(ids[-1])
        stored = emb.astype(self.dtype)
        self._ids.append(ids)
        self._norms.append(np.linalg.norm(stored.astype(np.float32), axis=1).astype(np.float32))
        while len(stored):
            take = min(len(stored), self.shard_rows - self._buf_rows)
            self._buf.append(stored[:take])
            self._buf_rows += take
            stored = stored[take:]
            if self._buf_rows == self.shard_rows:
                self._flush()

    def _flush(self) -> None:
        if not self._buf_rows:
            return
        name = f"emb-{len(self._shards):05d}.npy"
        _atomic_save(self.folder / name, np.concatenate(self._buf))
        self._shards.append({"file": name, "rows": self._buf_rows})
        self._rows += self._buf_rows
        self._buf, self._buf_rows = [], 0

    def finish(self, extra: dict | None = None) -> EmbeddingStore:
        """Write the last shard, ids, norms and (last) the manifest; return the opened store."""
        self._flush()
        ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64)
        norms = np.concatenate(self._norms) if self._norms else np.zeros(0, np.float32)
        _atomic_save(self.folder / "ids.npy", ids)
        _atomic_save(self.folder / "norms.npy", norms)
        keep = {sh["file"] for sh in self._shards}
        for f in self.folder.glob("emb-*.npy"):  # shards of an older, longer store
            if f.name not in keep:
                f.unlink()
        manifest = {"format": STORE_FORMAT, "dtype": self.dtype, "dim": self.dim,
                    "rows": self._rows, "shards": self._shards, "max_abs": self._max_abs,
                    **(extra or {})}
        tmp = self.folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(self.folder / MANIFEST)
        return EmbeddingStore.open(self.folder)


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
