"""Nearest crops by cosine similarity (FAISS), with the paper's "exclude target class" filter.

Exclusion of class ``A`` drops every crop whose own prediction is ``A`` or whose source image is
predicted ``A`` (Fig. 1 caption). It runs *inside* FAISS with an id selector
(``IDSelectorNot(IDSelectorBatch(excluded))``), so a search returns exactly the top-m of the
allowed set -- no over-fetch-and-filter that could come back short. In ``cell`` mode crops have
no prediction of their own (NULL), so only the source image's prediction excludes.

``kind="flat"``: exact inner product over L2-normalised embeddings (``index/flat.faiss``).
``kind="ivf"``: ``IndexIVFFlat`` (inner product) trained on a seeded sample, built on first use
and cached as ``index/ivf_{nlist}.faiss``; approximate, ``nprobe`` lists are visited.

``m`` is capped at the number of indexed crops (FAISS allocates ``k x m`` results up front), and
an unreadable or truncated ``flat.faiss`` raises :class:`ExplorerError` naming the file and the
rebuild command (an unreadable IVF cache file is simply built again).
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from explorer_core.errors import ExplorerError
from explorer_core.results import CropRef

from .catalog import Catalog

__all__ = ["CropSearch", "recall_at_k", "normalize_rows"]


def _faiss() -> Any:
    """The faiss module, imported on first use (typed loosely: its SWIG stubs lack keywords)."""
    import faiss

    return faiss


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Float32 copy of ``x`` (k, C) with unit-L2 rows (zero rows stay zero)."""
    x = np.array(x, dtype=np.float32, copy=True, ndmin=2)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, n, out=x, where=n > 0)
    return x


def _build_ivf(emb: np.ndarray, ids: np.ndarray, nlist: int, seed: int, path: Path):
    faiss = _faiss()

    n, d = emb.shape
    quant = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    n_train = min(n, max(nlist * 64, 10_000), 500_000)
    sample = np.sort(rng.choice(n, size=n_train, replace=False))
    index.cp.seed = seed
    index.train(normalize_rows(emb[sample]))
    step = 100_000
    for i in range(0, n, step):
        index.add_with_ids(normalize_rows(emb[i:i + step]), np.ascontiguousarray(ids[i:i + step]))
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(path)
    return index


def _bad_index(catalog: Catalog, path: Path, why: str) -> ExplorerError:
    ws = catalog.ws
    return ExplorerError(f"The index file {path} of workspace '{ws.name}' is unreadable or "
                         f"truncated ({why}); rebuild it with 'python -m data_index build "
                         f"--workspace {ws.root} --rebuild'")


class CropSearch:
    """Cosine top-m crop search over a :class:`Catalog`."""

    def __init__(self, catalog: Catalog, kind: str = "flat", nlist: int | None = None,
                 nprobe: int = 16, seed: int = 0) -> None:
        faiss = _faiss()

        if kind not in ("flat", "ivf"):
            raise ExplorerError(f"Unknown search kind '{kind}'; use flat or ivf")
        self.catalog, self.kind, self.nprobe = catalog, kind, int(nprobe)
        self._lock = threading.Lock()
        self._excl_cache: dict[int, Any] = {}
        d = catalog.ws.index_dir
        if kind == "flat":
            path = d / "flat.faiss"
            try:
                self.index = faiss.read_index(str(path))
            except RuntimeError as exc:
                raise _bad_index(catalog, path, str(exc).strip().splitlines()[-1]) from exc
            self.nlist = None
        else:
            ids, emb = catalog.embeddings()
            n = len(ids)
            self.nlist = int(nlist or max(1, min(int(4 * np.sqrt(n)), n // 39 or 1)))
            path = d / f"ivf_{self.nlist}.faiss"
            index = None
            if path.is_file():
                try:
                    index = faiss.read_index(str(path))
                except RuntimeError:
                    index = None  # a broken cache file: build it again
                if index is not None and (index.ntotal, index.d) != (n, emb.shape[1]):
                    index = None
            self.index = index if index is not None else _build_ivf(emb, ids, self.nlist, seed,
                                                                    path)
        if (self.index.ntotal, self.index.d) != (catalog.n_crops, catalog.dim):
            raise _bad_index(catalog, path, f"{self.index.ntotal} vectors of {self.index.d} "
                             f"dimensions, the catalog has {catalog.n_crops} of {catalog.dim}")
        self.dim = self.index.d

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def _selector(self, exclude_class: int | None):
        faiss = _faiss()

        if exclude_class is None:
            return None
        a = int(exclude_class)
        if a not in self._excl_cache:
            ids = self.catalog.excluded_crop_ids(a)
            batch = faiss.IDSelectorBatch(ids)
            sel = faiss.IDSelectorNot(batch)
            self._excl_cache[a] = (sel, batch, ids)  # keep the inner objects alive
        return self._excl_cache[a][0]

    def search_ids(self, vectors: np.ndarray, m: int = 8, exclude_class: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Raw search: ``(scores (k, m') float32, crop ids (k, m') int64)``, ``m' = min(m,
        ntotal)``; missing = id -1."""
        faiss = _faiss()

        q = normalize_rows(vectors)
        if q.shape[1] != self.dim:
            raise ExplorerError(f"Query vectors have {q.shape[1]} dimensions, the catalog's "
                                f"embeddings {self.dim}; use vectors of the workspace's layer")
        m = min(int(m), self.ntotal)  # FAISS allocates k x m results: never more than there are
        if m <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        with self._lock:
            sel = self._selector(exclude_class)
            if self.kind == "ivf":
                params = faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe) if sel \
                    else faiss.SearchParametersIVF(nprobe=self.nprobe)
            else:
                params = faiss.SearchParameters(sel=sel) if sel else None
            scores, ids = self.index.search(q, m, params=params)
        return scores, ids

    def search(self, vectors: np.ndarray, m: int = 8, exclude_class: int | None = None
               ) -> list[list[CropRef]]:
        """Top-``m`` crops per query vector (``(k, C)`` or ``(C,)``), best first;
        ``CropRef.score`` is the cosine similarity."""
        scores, ids = self.search_ids(vectors, m, exclude_class)
        flat = [int(i) for i in ids.ravel() if i >= 0]
        refs = {r.crop_id: r for r in self.catalog.crop_refs(sorted(set(flat)))}
        out = []
        for srow, irow in zip(scores, ids):
            out.append([replace(refs[int(i)], score=float(s))
                        for s, i in zip(srow, irow) if i >= 0])
        return out

    def __repr__(self) -> str:
        return f"CropSearch({self.kind}, n={self.ntotal}, nlist={self.nlist}, nprobe={self.nprobe})"


def recall_at_k(search_a: CropSearch, search_b: CropSearch, queries: np.ndarray, k: int = 8,
                exclude_class: int | None = None) -> float:
    """Mean fraction of ``search_b``'s top-k (the reference, e.g. exact) that ``search_a`` finds."""
    _, ia = search_a.search_ids(queries, k, exclude_class)
    _, ib = search_b.search_ids(queries, k, exclude_class)
    hits = total = 0
    for ra, rb in zip(ia, ib):
        ref = {int(i) for i in rb if i >= 0}
        hits += len(ref & {int(i) for i in ra if i >= 0})
        total += len(ref)
    return hits / total if total else 1.0
