"""Nearest crops by cosine similarity, with the paper's "exclude target class" filter.

:class:`CropSearch` searches one layer's crop embeddings (:meth:`Catalog.store
<data_index.catalog.Catalog.store>`, default the catalog's default layer).

``kind="flat"`` (also ``"auto"`` and ``"exact"``): exact search straight over the layer's
memory-mapped :class:`~data_index.store.EmbeddingStore`, never all of it in RAM
(:func:`_exact_topk`): for each block of stored rows (32 MB as float32; float16 rows widened into
one reused buffer) the cosines ``q . x / (|q| |x|)`` of every query are a float32 matrix product,
and a running top-m keeps the best ``m`` per query (ties: the smaller crop id first). Memory:
one block plus ``k x m``.

``kind="ivf"``: an approximate FAISS ``IndexIVFFlat`` (inner product over L2-normalised rows),
trained on a seeded sample and built from the store's blocks on first use, cached as
``index/<layer folder>/ivf_{nlist}.faiss``; ``nprobe`` lists are visited. (It holds the
vectors in RAM as float32: for small and medium catalogs only.)

Exclusion of class ``A`` drops every crop whose own (or dominant) class is ``A`` or whose source
image counts as predicted ``A`` (:meth:`Catalog.excluded_crop_ids
<data_index.catalog.Catalog.excluded_crop_ids>`, Fig. 1 caption). It runs *inside* the search:
in the exact path a boolean mask over each block's crop ids, in the IVF path a FAISS id
selector (``IDSelectorNot(IDSelectorBatch(excluded))``). Either way a search returns exactly
the top-m of the allowed set (or all allowed crops when there are fewer) -- no
over-fetch-and-filter that could come back short.

``kind="auto"`` (the default) uses the index the catalog build chose for the layer
(:mod:`data_index.vector_index`, recorded in ``index/<layer>/search/index.json`` and the
catalog's ``meta``): for small catalogs the exact scan above (on CUDA a chunked fp16 matmul +
top-k on the GPU), for large ones an IVF index with 8-bit or 4-bit codes whose candidates are
re-ranked exactly against the float16 store, so scores are exact cosines and only recall
(measured at build, ``recall_at_8:<layer>``) is approximate. ``kind="ivf-sq8"`` / ``"ivf-pq"``
require that built index; ``python -m data_index index`` rebuilds it under another kind or
memory budget.

``m`` is capped at the number of crops.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from explorer_core.errors import ExplorerError
from explorer_core.results import CropRef

from .catalog import Catalog
from .store import EmbeddingStore

__all__ = ["CropSearch", "recall_at_k", "normalize_rows", "KINDS"]

KINDS = ("auto", "flat", "exact", "ivf", "ivf-sq8", "ivf-pq")
BLOCK_BYTES = 32 << 20
"""Float32 bytes of one block of stored rows scanned at a time by the exact search."""


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


def _merge_topk(best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, i: np.ndarray, m: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The best ``m`` of two candidate sets per row: scores descending, ties by smaller id
    (``-inf`` scores are never better than a real one)."""
    cand_s = np.concatenate([best_s, s], axis=1)
    cand_i = np.concatenate([best_i, i], axis=1)
    # lexsort: the last key is the primary one; -1 ids (padding) sort after real ties
    key_i = np.where(cand_i < 0, np.iinfo(np.int64).max, cand_i)
    order = np.lexsort((key_i, -cand_s), axis=1)[:, :m]
    return np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)


def _exact_topk(store: EmbeddingStore, queries: np.ndarray, m: int,
                excluded_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-``m`` over ``store``, scanned block by block.

    Parameters
    ----------
    store : EmbeddingStore
        One layer's embeddings (rows ``x``, crop ids ascending, stored norms ``|x|``).
    queries : ndarray (k, C) float32
        Query vectors (any norm; zero rows score 0 everywhere).
    m : int
        Results per query (at most ``len(store)``).
    excluded_ids : ndarray (e,) int64, ascending, or None
        Crop ids that may not be returned (a boolean mask over each block's ids).

    Returns
    -------
    scores : ndarray (k, m) float32
        Cosine similarity ``q . x / (|q| |x|)`` (0 for a zero row), best first; ``-inf`` where
        fewer than ``m`` crops are allowed.
    ids : ndarray (k, m) int64
        Crop ids; -1 where missing. Ties are broken by the smaller crop id.
    """
    q = normalize_rows(queries)
    k = len(q)
    best_s = np.full((k, m), -np.inf, np.float32)
    best_i = np.full((k, m), -1, np.int64)
    if m <= 0 or len(store) == 0:
        return best_s[:, :0], best_i[:, :0]
    excl = None if excluded_ids is None or not len(excluded_ids) else \
        np.unique(np.asarray(excluded_ids, np.int64))
    rows = max(256, BLOCK_BYTES // (4 * max(1, store.dim)))
    ids_all, norms_all = store.ids, store.norms
    qt = torch.from_numpy(q)
    # float16 rows are widened into one reused float32 buffer (torch's conversion is several
    # times faster than numpy's); the products are float32, as a brute-force numpy search's
    buf = torch.empty((rows, store.dim), dtype=torch.float32) if store.dtype != "float32" \
        else None
    for pos, raw in store.raw_blocks(rows=rows):
        n = len(raw)
        ids = np.asarray(ids_all[pos:pos + n])
        norms = np.asarray(norms_all[pos:pos + n], np.float32)
        with warnings.catch_warnings():  # a read-only memory map: torch only reads it here
            warnings.simplefilter("ignore", UserWarning)
            block = torch.from_numpy(raw)
        if buf is not None:
            block = buf[:n].copy_(block)
        s = torch.mm(qt, block.T).numpy()  # (k, n) float32
        np.divide(s, norms, out=s, where=norms > 0)
        s[:, norms <= 0] = 0.0
        if excl is not None:
            j = np.searchsorted(excl, ids)
            masked = excl[np.minimum(j, len(excl) - 1)] == ids
            if masked.all():
                continue
            s[:, masked] = -np.inf
        take = min(m, n)
        if take < n:
            part = np.argpartition(-s, take - 1, axis=1)[:, :take]
            # ties at the cut: argpartition picks any of them, so keep every tied score (a
            # row whose cut is -inf has all its allowed crops in already)
            cut = np.take_along_axis(s, part, 1).min(axis=1, keepdims=True)
            tied = np.where(np.isfinite(cut[:, 0]), (s >= cut).sum(axis=1), 0)
            if np.any(tied > take):
                width = int(tied.max())
                part = np.argpartition(-s, width - 1, axis=1)[:, :width]
        else:
            part = np.broadcast_to(np.arange(n), (k, n))
        cs = np.take_along_axis(s, part, 1)
        ci = ids[part]
        ci = np.where(np.isneginf(cs), -1, ci)
        best_s, best_i = _merge_topk(best_s, best_i, cs, ci, m)
    return best_s.astype(np.float32), best_i


def _build_ivf(store: EmbeddingStore, nlist: int, seed: int, path: Any) -> Any:
    faiss = _faiss()
    n, d = len(store), store.dim
    quant = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    n_train = min(n, max(nlist * 64, 10_000), 500_000)
    sample = np.sort(rng.choice(n, size=n_train, replace=False))
    index.cp.seed = seed
    index.train(normalize_rows(store.rows(sample)))
    for pos, block in store.blocks(rows=100_000):
        index.add_with_ids(normalize_rows(block),
                           np.ascontiguousarray(store.ids[pos:pos + len(block)], np.int64))
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(path)
    return index


class CropSearch:
    """Cosine top-m crop search over one layer of a :class:`Catalog` (see the module
    docstring).

    Parameters
    ----------
    catalog : Catalog
    layer : str or None
        One of ``catalog.layers`` (``None``: the default layer).
    kind : ``auto`` | ``flat`` | ``exact`` (exact, over the store) or ``ivf`` (approximate).
    nlist, nprobe, seed : IVF parameters.
    """

    def __init__(self, catalog: Catalog, layer: str | None = None, kind: str = "auto",
                 nlist: int | None = None, nprobe: int = 16, seed: int = 0,
                 device: str = "cpu") -> None:
        if layer in KINDS and layer not in catalog.layers:  # the old CropSearch(cat, "flat")
            layer, kind = None, str(layer)
        if kind not in KINDS:
            raise ExplorerError(f"Unknown search kind '{kind}'; use one of {', '.join(KINDS)}")
        self.catalog = catalog
        self.layer = catalog.check_layer(layer)
        self.store = catalog.store(self.layer)
        self.kind = "ivf" if kind == "ivf" else "flat"
        self.nprobe = int(nprobe)
        self._lock = threading.Lock()
        self._excl_cache: dict[int, Any] = {}
        self.dim = self.store.dim
        self.nlist: int | None = None
        self.index: Any = None
        self.vindex: Any = None  # the catalog's built index (vector_index), when it is used
        if kind in ("auto", "ivf-sq8", "ivf-pq"):
            self._open_built(kind, str(device))
        if self.kind == "ivf":
            faiss = _faiss()
            n = len(self.store)
            self.nlist = int(nlist or max(1, min(int(4 * np.sqrt(n)), n // 39 or 1)))
            path = self.store.folder / f"ivf_{self.nlist}.faiss"
            index = None
            if path.is_file():
                try:
                    index = faiss.read_index(str(path))
                except RuntimeError:
                    index = None  # a broken cache file: build it again
                if index is not None and (index.ntotal, index.d) != (n, self.dim):
                    index = None
            self.index = index if index is not None else _build_ivf(self.store, self.nlist,
                                                                    seed, path)

    def _open_built(self, kind: str, device: str) -> None:
        """Use the index the build wrote for this layer (``index/<layer>/search/``): an IVF
        index (re-ranked exactly), or on CUDA the GPU exact scan; on the CPU an ``exact`` index
        is this class's own blocked scan. ``kind`` other than ``auto`` requires that kind."""
        from .vector_index import open_index

        folder = self.catalog.ws.layer_dir(self.layer) / "search"
        how = (f"python -m data_index index --workspace {self.catalog.ws.root} --layer "
               f"{self.layer} --index {kind}")
        if not (folder / "index.json").is_file():
            if kind != "auto":
                raise ExplorerError(f"Layer '{self.layer}' has no {kind} index; build it: {how}")
            return  # a catalog built before indexes were recorded: exact
        built = self.catalog.meta.get(f"index:{self.layer}", "exact")
        if kind != "auto" and built != kind:
            raise ExplorerError(f"Layer '{self.layer}' has a{'n' if built[0] in 'aei' else ''} "
                                f"{built} index, not {kind}; build it: {how}")
        if built == "exact" and not device.startswith("cuda"):
            return
        self.vindex = open_index(folder, self.store, device=device)
        self.kind = built

    @property
    def ntotal(self) -> int:
        return len(self.store)

    def _excluded(self, exclude_class: int | None) -> np.ndarray | None:
        if exclude_class is None:
            return None
        a = int(exclude_class)
        if a not in self._excl_cache:
            self._excl_cache[a] = self.catalog.excluded_crop_ids(a)
        return self._excl_cache[a]

    def _selector(self, exclude_class: int, excluded: np.ndarray) -> Any:
        key = -1 - int(exclude_class)  # beside the id arrays in the same cache
        if key not in self._excl_cache:
            faiss = _faiss()
            batch = faiss.IDSelectorBatch(excluded)
            self._excl_cache[key] = (faiss.IDSelectorNot(batch), batch)  # keep both alive
        return self._excl_cache[key][0]

    def search_ids(self, vectors: np.ndarray, m: int = 8, exclude_class: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Raw search: ``(scores (k, m') float32, crop ids (k, m') int64)``, ``m' = min(m,
        ntotal)``; missing = id -1."""
        q = np.array(vectors, dtype=np.float32, ndmin=2)
        if q.shape[1] != self.dim:
            raise ExplorerError(f"Query vectors have {q.shape[1]} dimensions, the embeddings of "
                                f"layer '{self.layer}' {self.dim}; use vectors of that layer")
        m = min(int(m), self.ntotal)
        if m <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        with self._lock:
            excluded = self._excluded(exclude_class)
        if self.vindex is not None:  # exact scores; exactly m allowed crops
            return self.vindex.search(q, m, exclude_ids=excluded)
        if self.kind == "flat":
            return _exact_topk(self.store, q, m, excluded)
        faiss = _faiss()
        with self._lock:
            if exclude_class is not None and excluded is not None and len(excluded):
                params = faiss.SearchParametersIVF(sel=self._selector(exclude_class, excluded),
                                                   nprobe=self.nprobe)
            else:
                params = faiss.SearchParametersIVF(nprobe=self.nprobe)
            scores, ids = self.index.search(normalize_rows(q), m, params=params)
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
        return (f"CropSearch({self.kind}, layer={self.layer!r}, n={self.ntotal}, "
                f"nlist={self.nlist}, nprobe={self.nprobe})")


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
