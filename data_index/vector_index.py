"""Nearest crops by cosine at any catalog size: exact scans and compressed IVF indexes.

Every index answers the same call (:class:`VectorIndex`)::

    scores, ids = index.search(queries (k, C), m, exclude_ids=None)
    # scores (k, m) float32: EXACT cosines; ids (k, m) int64 crop ids, -1 (score -inf) = missing

over one layer's :class:`~data_index.store.EmbeddingStore` (float16 rows, memory-mapped), with
the paper's "exclude target class" filter inside the search: exactly ``m`` allowed crops come
back (all allowed ones when fewer exist), never a short list.

Kinds
-----
``exact``
    Blocked cosine matmul over the store with a running top-k; excluded rows are masked
    (``-inf``) before the top-k. On CUDA: chunked fp16 matmul + ``torch.topk`` on the GPU, the
    store's rows moved to the GPU once (unit-normalised fp16) when they fit its memory, else
    streamed block by block. No FAISS flat index is held in RAM.
``ivf-sq8`` / ``ivf-pq``
    A FAISS inverted file (``nlist`` coarse cells, inner product on unit rows) holding 8-bit
    scalar-quantised codes (``C`` bytes a row) or 4-bit product-quantised codes scanned with
    FAISS's SIMD "fast scan" (``M`` sub-quantisers, ``M/2`` bytes a row), trained on a seeded
    sample and filled block by block from the store. The ``nprobe``
    nearest cells give the ``rerank`` best candidates per query (exclusion inside FAISS:
    ``IDSelectorNot(IDSelectorBatch(excluded rows))``, so every candidate is allowed); the
    candidates are then **re-ranked exactly** against the float16 store, so the scores returned
    are exact cosines and only recall is approximate. A query left with fewer than ``m``
    allowed candidates is searched again with 4x the probes, and finally exactly.

Whatever the kind, returned scores come from one function (:func:`exact_cosines`):
``dot(stored row as float32, unit query) / stored norm`` (0 for a zero row), so an index and
the exhaustive search agree to float32 rounding on the crops they both return.

The rule (:func:`choose_index`), for ``N`` rows of ``C`` dims and a memory budget ``B``
(resident bytes of the index, the process's own baseline not counted)::

    exact    if N*C*2 <= EXACT_SCAN_BYTES[device]   (CPU: 128 MiB, e.g. 52 k x 1280: its float32
                                                      rows, N*C*4, are held in RAM and one BLAS
                                                      matmul answers; CUDA: the store fits 80 %
                                                      of the GPU's memory)
    ivf-sq8  elif resident(C bytes a code) <= B and N*C <= SQ8_MAX_VALUES   (mid-size catalogs)
    ivf-pq   else, with the most sub-quantisers M in (C/4, C/8, C/16, C/32) whose
             resident(M/2 bytes a code) <= B
    exact    when not even the smallest code fits B (slow, but its memory is N*12 bytes);
             an error naming --memory-budget when that does not fit either

    resident(exact) = N*C*4 + N*12 (in RAM) or N*12 + one block (streamed, when forced)
    resident(b) = N*(b + 8)            codes + int64 ids in the inverted lists
                + N*12                 the store's ids + norms (mapped, touched by re-ranking)
                + nlist*C*4            coarse centroids
                + 16*C*4               PQ codebooks (ivf-pq only: 16 centroids each)
                + RERANK_CHUNK*rerank*C*4   re-rank gather buffer (one chunk of queries)
    nlist     = the power of two nearest sqrt(N), within [16, 65536] and <= N/39
    training  = min(N, max(39*nlist, 32768), 131072) rows sampled with the seed

``nprobe`` and ``rerank`` are tuned at build on stored crops as queries against the exhaustive
search: the cheapest pair whose recall@8 reaches ``target_recall`` (0.97), cost per query =
``nprobe*N/nlist*code_bytes + rerank*ROW_COST_BYTES`` (a row read from the store costs about
as much as scanning 16 KB of codes).

``build_index(store, folder)`` writes ``index.json`` (the spec, the store it belongs to, file
sizes, the tuned ``nprobe``/``rerank`` and the measured recall@8) and, for IVF kinds,
``ivf.faiss``; each file is written to a temporary name and renamed, the manifest last.
``open_index(folder, store)`` checks them and names any missing or truncated file with the
rebuild command. IVF indexes search on the CPU whatever the device (faiss-cpu).

Use (what ``CropSearch`` does with one layer's store)::

    index = build_index(store, ws_index_dir / layer_folder / "search", kind="auto",
                        memory_budget="2GB", seed=ws.seed, progress=progress)
    meta = index.info            # kind, spec (rule, parameters, formula), nprobe, rerank,
                                 # recall_at_8 (tuning queries) -> the catalog's meta
    index = open_index(folder, store, device="cpu")        # later, in the app / CLI
    scores, ids = index.search(vectors, 8, exclude_ids=catalog.excluded_crop_ids(a))

Build memory: the training sample (``<= 131072*C*4`` bytes), one block and the codes
themselves (``N*(code+8)``, as when searching); the store is never read whole into RAM, and
blocks and gathered rows are read with positional reads, so no mapped page of the store piles
up in the process's resident set.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from explorer_core.errors import ExplorerError
from explorer_core.progress import Meter, ProgressFn, report

from .store import EmbeddingStore

__all__ = ["VectorIndex", "IndexSpec", "ExactIndex", "IVFIndex", "TorchExactIndex",
           "choose_index", "build_index", "open_index", "measure_recall", "recall_at",
           "exact_cosines", "parse_bytes", "KINDS", "DEFAULT_MEMORY_BUDGET", "INDEX_FORMAT"]

INDEX_FORMAT = "concept-explorer-vector-index/1"
MANIFEST = "index.json"
IVF_FILE = "ivf.faiss"
KINDS = ("auto", "exact", "ivf-sq8", "ivf-pq")
ALIASES = {"flat": "exact"}
DEFAULT_MEMORY_BUDGET = 2_000_000_000  # bytes (2 GB)
EXACT_SCAN_BYTES = {"cpu": 128 * 2**20}  # CUDA: 80 % of the GPU's memory
EXACT_CACHE_BYTES = 256 * 2**20  # an exact index holds float32 rows in RAM up to this size
SQ8_MAX_VALUES = 2**29  # N*C of the largest catalog kept in 8-bit codes (e.g. 400 k x 1280)
RERANK_CHUNK = 64  # queries re-ranked at a time
QUERY_CHUNK = 1024  # queries sent to FAISS at a time
MAX_TRAIN_ROWS = 131072
DEFAULT_RERANK = 256  # candidates re-ranked exactly per query (the most the tuner tries)
RERANK_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256)
NPROBE_LADDER = (4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
TARGET_RECALL = 0.97  # nprobe/rerank are tuned to reach this on the build's recall sample
ROW_COST_BYTES = 16384  # one re-ranked row read ~ scanning this many code bytes (2-core CPU)
_SCAN_BLOCK_BYTES = 32 * 2**20


def _faiss() -> Any:
    """The faiss module, imported on first use (typed loosely: its SWIG stubs lack keywords)."""
    import faiss

    return faiss


# ---- the interface --------------------------------------------------------------------------

@runtime_checkable
class VectorIndex(Protocol):
    """What every index offers (exact or compressed, CPU or CUDA).

    Attributes
    ----------
    kind : str
        ``"exact"``, ``"ivf-sq8"`` or ``"ivf-pq"``.
    dim : int
        Embedding width ``C``.
    """

    kind: str
    dim: int

    def search(self, queries: np.ndarray, m: int, exclude_ids: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``m`` crops by cosine for each query.

        Parameters
        ----------
        queries : ndarray (k, C) or (C,)
            Any norm (cosine is computed).
        m : int
            Crops per query.
        exclude_ids : ndarray (e,) int64, optional
            Crop ids that must not come back (ids outside the store are ignored).

        Returns
        -------
        scores : ndarray (k, m) float32
            Exact cosines, best first; ``-inf`` where missing.
        ids : ndarray (k, m) int64
            Crop ids; ``-1`` where fewer than ``m`` allowed crops exist.
        """
        ...


@dataclass(frozen=True)
class IndexSpec:
    """An index choice: kind, parameters and the memory formula behind it (see the module
    docstring). ``to_meta()`` gives the flat dict stored in ``index.json`` and the catalog's
    meta."""

    kind: str
    rows: int
    dim: int
    resident_bytes: int
    budget_bytes: int
    formula: str
    reason: str
    nlist: int = 0
    pq_m: int = 0
    code_bytes: int = 0
    nprobe: int = 0
    rerank: int = 0
    train_rows: int = 0
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    def to_meta(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, d: dict) -> IndexSpec:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


def parse_bytes(text: str | int | float) -> int:
    """``"2GB"``, ``"512 MiB"``, ``"1.5e9"``, ``2000000000`` -> bytes (decimal GB, binary GiB)."""
    if isinstance(text, int | float):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*",
                         str(text).lower())
        if not m:
            raise ExplorerError(f"Cannot read memory size '{text}'; write e.g. 2GB, 512MB or "
                                "4GiB")
        unit = (m.group(2) or "b").rstrip("b") or "b"
        scale = {"b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20,
                 "gi": 2**30, "ti": 2**40}[unit]
        value = float(m.group(1)) * scale
    if not math.isfinite(value) or value <= 0:
        raise ExplorerError(f"A memory budget must be positive, got '{text}'")
    return int(value)


# ---- the rule -------------------------------------------------------------------------------

def _nlist_for(rows: int) -> int:
    if rows < 39 * 16:
        return max(1, rows // 39)
    n = 2 ** int(round(math.log2(math.sqrt(rows))))
    return int(min(65536, max(16, n), rows // 39))


def _train_rows(rows: int, nlist: int) -> int:
    return int(min(rows, max(39 * nlist, 32768), MAX_TRAIN_ROWS))


def _pq_choices(dim: int) -> list[int]:
    """Numbers of 4-bit sub-quantisers M (even, dividing C), most accurate first: C/4, C/8,
    C/16, C/32 (at least 2)."""
    out = [dim // ds for ds in (4, 8, 16, 32)
           if dim % ds == 0 and dim // ds >= 2 and (dim // ds) % 2 == 0]
    if not out:  # awkward widths: the largest even M <= C/4 that divides C, else 2 or 1
        out = [m for m in range(max(2, dim // 4), 0, -1) if dim % m == 0 and m % 2 == 0][:1] \
            or [1]
    return out


def _exact_resident(rows: int, dim: int) -> tuple[int, str]:
    if rows * dim * 4 <= EXACT_CACHE_BYTES:
        b = rows * dim * 4 + rows * 12 + RERANK_CHUNK * 16 * dim * 4
        return b, (f"N*C*4 (float32 rows in RAM) + N*12 (ids+norms) + re-rank buffer = "
                   f"{rows}*{dim}*4 + {rows}*12 + {RERANK_CHUNK}*16*{dim}*4 = {b} bytes")
    block = max(256, _SCAN_BLOCK_BYTES // (4 * dim))
    b = rows * 12 + block * dim * 6 + RERANK_CHUNK * 16 * dim * 4
    return b, (f"N*12 (ids+norms) + block*C*6 (one fp16 block and its float32 copy) + re-rank "
               f"buffer = {rows}*12 + {block}*{dim}*6 + {RERANK_CHUNK}*16*{dim}*4 = {b} bytes "
               "(streamed: the whole store is read per search)")


def _ivf_resident(rows: int, dim: int, nlist: int, code: int, pq: bool, rerank: int
                  ) -> tuple[int, str]:
    books = 16 * dim * 4 if pq else 0
    buf = RERANK_CHUNK * rerank * dim * 4
    b = rows * (code + 8) + rows * 12 + nlist * dim * 4 + books + buf
    return b, (f"N*(code+8) + N*12 + nlist*C*4{' + 16*C*4' if pq else ''} + "
               f"{RERANK_CHUNK}*rerank*C*4 = {rows}*({code}+8) + {rows}*12 + {nlist}*{dim}*4"
               f"{f' + 16*{dim}*4' if pq else ''} + {RERANK_CHUNK}*{rerank}*{dim}*4 = "
               f"{b} bytes")


def _pq_code_bytes(m: int) -> int:
    return (m + 1) // 2


def _device_memory(device: str) -> int:
    import torch

    if not torch.cuda.is_available():
        raise ExplorerError(f"Device '{device}' asked for, but CUDA is not available here; "
                            "use --device cpu")
    return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)


def choose_index(rows: int, dim: int, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
                 device: str = "cpu", kind: str = "auto", *, rerank: int = DEFAULT_RERANK,
                 device_memory_bytes: int | None = None) -> IndexSpec:
    """Pick the index for ``rows`` x ``dim`` embeddings under a memory budget (module docstring).

    Parameters
    ----------
    rows, dim : int
        Store size ``N`` x ``C``.
    memory_budget_bytes : int
        Resident bytes the index may take while searching.
    device : str
        ``"cpu"`` or ``"cuda[:i]"`` (exact search on the GPU when the store fits it).
    kind : str
        ``"auto"`` (the rule) or a kind to force (``"flat"`` = ``"exact"``); a forced IVF kind
        that does not fit the budget raises :class:`ExplorerError`.
    device_memory_bytes : int, optional
        The GPU's memory (read from torch when omitted on CUDA).

    Returns
    -------
    IndexSpec
    """
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise ExplorerError(f"Unknown index kind '{kind}'; use one of auto, exact (flat), "
                            "ivf-sq8, ivf-pq")
    rows, dim, budget = int(rows), int(dim), int(memory_budget_bytes)
    if rows < 0 or dim < 1 or budget <= 0:
        raise ExplorerError(f"Cannot index {rows} rows of {dim} dims under {budget} bytes")
    cuda = str(device).startswith("cuda")
    store_bytes = rows * dim * 2
    if cuda:
        gpu = int(device_memory_bytes) if device_memory_bytes else _device_memory(device)
        scan_limit = int(0.8 * gpu)
    else:
        scan_limit = EXACT_SCAN_BYTES["cpu"]
    ex_b, ex_f = _exact_resident(rows, dim)
    nlist = _nlist_for(rows)
    rerank = int(rerank)

    def exact(reason: str) -> IndexSpec:
        return IndexSpec("exact", rows, dim, ex_b, budget, ex_f, reason, device=str(device),
                         extra={"scan_limit_bytes": scan_limit})

    def ivf(k: str, m: int, reason: str) -> IndexSpec:
        pq = k == "ivf-pq"
        code = _pq_code_bytes(m) if pq else dim
        b, f = _ivf_resident(rows, dim, nlist, code, pq, rerank)
        return IndexSpec(k, rows, dim, b, budget, f, reason, nlist=nlist,
                         pq_m=m if pq else 0, code_bytes=code, nprobe=16, rerank=rerank,
                         train_rows=_train_rows(rows, nlist), device="cpu")

    def pq_fits(m: int) -> bool:
        return _ivf_resident(rows, dim, nlist, _pq_code_bytes(m), True, rerank)[0] <= budget

    if kind == "exact":
        return exact("asked for")
    if kind in ("ivf-sq8", "ivf-pq"):
        m = 0 if kind == "ivf-sq8" else next((m for m in _pq_choices(dim) if pq_fits(m)),
                                             _pq_choices(dim)[-1])
        spec = ivf(kind, m, "asked for")
        if spec.resident_bytes > budget:
            raise ExplorerError(f"A {kind} index of {rows} x {dim} needs about "
                                f"{spec.resident_bytes / 1e9:.2f} GB, over the memory budget of "
                                f"{budget / 1e9:.2f} GB; raise --memory-budget or use "
                                "--index auto")
        return spec
    if store_bytes <= scan_limit and ex_b <= budget:
        where = "the GPU's memory" if cuda else "the exact-scan limit"
        return exact(f"store {store_bytes} bytes <= {scan_limit} ({where})")
    if rows < 39 * 16:
        return exact("too few rows to train an inverted file")
    sq8_b = _ivf_resident(rows, dim, nlist, dim, False, rerank)[0]
    if sq8_b <= budget and rows * dim <= SQ8_MAX_VALUES:
        return ivf("ivf-sq8", 0, f"8-bit codes fit the budget ({sq8_b} <= {budget}) and "
                   f"N*C <= {SQ8_MAX_VALUES}")
    for m in _pq_choices(dim):
        if pq_fits(m):
            return ivf("ivf-pq", m, f"{m} 4-bit sub-quantisers: the most of C/4, C/8, ... "
                       "that fit the budget")
    if ex_b <= budget:
        return exact(f"no compressed index fits the budget of {budget} bytes; the exact scan "
                     "needs only N*12 bytes but reads the whole store per search")
    smallest = _ivf_resident(rows, dim, nlist, _pq_code_bytes(_pq_choices(dim)[-1]), True,
                             rerank)[0]
    raise ExplorerError(f"No index of {rows} x {dim} embeddings fits a memory budget of "
                        f"{budget / 1e9:.2f} GB (the exact scan needs {ex_b / 1e9:.2f} GB, the "
                        f"smallest compressed index {smallest / 1e9:.2f} GB); raise "
                        "--memory-budget")


# ---- reading the store without keeping it mapped --------------------------------------------

class _ShardFiles:
    """Positional reads of a store's row shards (same rows as ``store.blocks()`` /
    ``store.rows()``): blocks with one ``read`` each, gathered rows with one ``pread`` per row.
    Nothing is mapped, so the pages read never count in this process's resident set (they stay
    in the kernel's page cache, shared and reclaimable). A mapping would: each touched row maps
    its whole page-cache folio (up to 2 MB on current kernels) into the process, and re-ranking
    the candidates of a few thousand queries touches nearly every folio of the store."""

    def __init__(self, store: EmbeddingStore) -> None:
        self.store = store
        self.dim = store.dim
        self.dtype = np.dtype(store.dtype)
        self.paths: list[Path] = []
        self.offsets: list[int] = []
        starts = [0]
        for sh in store.manifest["shards"]:
            path = store.folder / sh["file"]
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(f)
                offset = f.tell()
            rows = int(sh["rows"])
            if tuple(shape) != (rows, self.dim) or np.dtype(dtype) != self.dtype:
                raise ExplorerError(f"Embedding file {path} does not match its manifest; "
                                    f"rebuild: {_rebuild_cmd(store.folder)}")
            self.paths.append(path)
            self.offsets.append(offset)
            starts.append(starts[-1] + rows)
        self.starts = np.asarray(starts, np.int64)
        self.rows = int(self.starts[-1])
        self._fds: list[int] | None = None  # opened on the first gather, closed with the object

    def block(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as stored (float16/float32), ``(stop - start, C)``."""
        out = np.empty((stop - start, self.dim), self.dtype)
        pos = start
        while pos < stop:
            k = int(np.searchsorted(self.starts, pos, side="right")) - 1
            end = min(stop, int(self.starts[k + 1]))
            n = (end - pos) * self.dim
            got = np.fromfile(self.paths[k], self.dtype, count=n,
                              offset=self.offsets[k] + (pos - int(self.starts[k])) * self.dim
                              * self.dtype.itemsize)
            if got.size != n:
                raise ExplorerError(f"Embedding file {self.paths[k]} is truncated; rebuild: "
                                    f"{_rebuild_cmd(self.store.folder)}")
            out[pos - start:end - start] = got.reshape(-1, self.dim)
            pos = end
        return out

    def blocks(self, rows: int, raw: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, block)`` over the whole store, ``rows`` rows at a time; float32 unless
        ``raw`` (then as stored)."""
        for start in range(0, self.rows, rows):
            b = self.block(start, min(self.rows, start + rows))
            yield start, (b if raw else b.astype(np.float32))

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """Rows at ``positions`` (k,) -> ``(k, C)`` float32, in the given order (one positional
        read per row, in file order)."""
        pos = np.asarray(positions, np.int64).ravel()
        if len(pos) == 0:
            return np.empty((0, self.dim), np.float32)
        if pos.min() < 0 or pos.max() >= self.rows:
            raise IndexError(f"row positions outside 0..{self.rows - 1}")
        if self._fds is None:
            self._fds = [os.open(p, os.O_RDONLY) for p in self.paths]
        order = np.argsort(pos, kind="stable")
        spos = pos[order]
        shard = np.searchsorted(self.starts, spos, side="right") - 1
        row_bytes = self.dim * self.dtype.itemsize
        offsets = (np.asarray(self.offsets, np.int64)[shard]
                   + (spos - self.starts[shard]) * row_bytes).tolist()
        fds = [self._fds[k] for k in shard.tolist()]
        pread = os.pread
        data = b"".join([pread(fd, row_bytes, off) for fd, off in zip(fds, offsets)])
        if len(data) != len(pos) * row_bytes:
            raise ExplorerError(f"An embedding file in {self.store.folder} is truncated; "
                                f"rebuild: {_rebuild_cmd(self.store.folder)}")
        out = np.empty((len(pos), self.dim), np.float32)
        out[order] = np.frombuffer(data, self.dtype).reshape(-1, self.dim)
        return out

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", None) or []:
            try:
                os.close(fd)
            except OSError:
                pass


# ---- the shared pieces ----------------------------------------------------------------------

def _rebuild_cmd(folder: Path) -> str:
    ws = next((p for p in [folder, *folder.parents] if (p / "workspace.toml").is_file()), None)
    if ws is None:
        ws = folder.parent.parent if folder.parent.name == "index" else folder.parent
    return f"python -m data_index build --workspace {ws} --rebuild"


def _unit_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    q = np.array(queries, dtype=np.float32, copy=True, ndmin=2)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ExplorerError(f"Query vectors have shape {tuple(np.shape(queries))}, the index "
                            f"holds {dim}-dimensional embeddings; use vectors of the same layer")
    if not np.all(np.isfinite(q)):
        raise ExplorerError("Query vectors contain NaN or infinite values")
    n = np.linalg.norm(q, axis=1, keepdims=True)
    np.divide(q, n, out=q, where=n > 0)
    return q


def _excluded_positions(store: EmbeddingStore, exclude_ids: np.ndarray | None) -> np.ndarray:
    """Sorted unique row positions of the ``exclude_ids`` that are in the store."""
    if exclude_ids is None or len(exclude_ids) == 0 or len(store) == 0:
        return np.zeros(0, np.int64)
    cid = np.unique(np.asarray(exclude_ids, np.int64).ravel())
    pos = np.searchsorted(store.ids, cid)
    ok = pos < len(store)
    ok[ok] = np.asarray(store.ids[pos[ok]]) == cid[ok]
    return pos[ok]


def exact_cosines(files: Any, norms: np.ndarray, q_unit: np.ndarray,
                  positions: np.ndarray) -> np.ndarray:
    """Exact cosines of unit queries with candidate rows.

    Parameters
    ----------
    files : object with ``gather(positions (u,)) -> (u, C) float32``
        The stored rows (read from the shard files, or held in RAM).
    norms : ndarray (N,) float32
        The store's row norms.
    q_unit : ndarray (k, C) float32
        Unit-norm (or zero) queries.
    positions : ndarray (k, P) int64
        Row positions per query; ``-1`` = none.

    Returns
    -------
    ndarray (k, P) float32
        ``dot(row, q) / norm(row)`` (0 for a zero row), ``-inf`` where the position is -1.
    """
    k, p = positions.shape
    out = np.full((k, p), -np.inf, np.float32)
    for a in range(0, k, RERANK_CHUNK):
        pos = positions[a:a + RERANK_CHUNK]
        valid = pos >= 0
        if not valid.any():
            continue
        uniq, inv = np.unique(pos[valid], return_inverse=True)
        qi = np.nonzero(valid)[0]
        dots = files.gather(uniq) @ q_unit[a:a + RERANK_CHUNK].T  # (u, chunk)
        dots = dots[inv, qi]
        nrm = np.asarray(norms[uniq], np.float32)[inv]
        cos = np.divide(dots, nrm, out=np.zeros_like(dots), where=nrm > 0)
        block = out[a:a + RERANK_CHUNK]
        block[valid] = cos
    return out


def _select_top(scores: np.ndarray, positions: np.ndarray, m: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Best ``m`` per row by score (ties: lower position first); -1 / -inf beyond the valid."""
    k = len(scores)
    key_pos = np.where(positions >= 0, positions, np.iinfo(np.int64).max)
    order = np.lexsort((key_pos, -scores.astype(np.float64)), axis=-1)[:, :m]
    s = np.take_along_axis(scores, order, 1)
    p = np.take_along_axis(positions, order, 1)
    if s.shape[1] < m:
        s = np.concatenate([s, np.full((k, m - s.shape[1]), -np.inf, np.float32)], 1)
        p = np.concatenate([p, np.full((k, m - p.shape[1]), -1, np.int64)], 1)
    p = np.where(np.isfinite(s), p, -1)
    return s.astype(np.float32), p


def _to_crop_ids(store: EmbeddingStore, positions: np.ndarray) -> np.ndarray:
    out = np.full(positions.shape, -1, np.int64)
    ok = positions >= 0
    out[ok] = np.asarray(store.ids[positions[ok]])
    return out


def _empty(k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((k, m), -np.inf, np.float32), np.full((k, m), -1, np.int64)


# ---- exact search on the CPU ----------------------------------------------------------------

class _RamRows:
    """A small store's rows held in RAM as float32 ``(N, C)`` (same calls as ``_ShardFiles``)."""

    def __init__(self, files: _ShardFiles) -> None:
        self.rows = files.rows
        self.dim = files.dim
        self.data = np.empty((files.rows, files.dim), np.float32)
        for start, blk in files.blocks(65536):
            self.data[start:start + len(blk)] = blk

    def blocks(self, rows: int, raw: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.rows, rows):
            yield start, self.data[start:start + rows]

    def gather(self, positions: np.ndarray) -> np.ndarray:
        return self.data[np.asarray(positions, np.int64).ravel()]


class ExactIndex:
    """Exhaustive cosine search: blocked matmul over the store with a running top-k.

    A store of at most ``cache_bytes`` as float32 (``N*C*4``; 256 MiB by default) is read into
    RAM once; a larger one is streamed, one block (``~32 MB`` float32) at a time, whatever its
    size. The exclusion is a mask on each block (``-inf`` before the top-k), so exactly ``m``
    allowed crops come back."""

    kind = "exact"

    def __init__(self, store: EmbeddingStore, spec: IndexSpec | None = None,
                 cache_bytes: int | None = None) -> None:
        self.store = store
        self.dim = store.dim
        self.rows = len(store)
        self.spec = spec or choose_index(self.rows, self.dim, kind="exact")
        self.files = _ShardFiles(store)
        limit = EXACT_CACHE_BYTES if cache_bytes is None else int(cache_bytes)
        self.source: _ShardFiles | _RamRows = (_RamRows(self.files)
                                               if self.rows * self.dim * 4 <= limit
                                               else self.files)
        self.info: dict = {}

    @property
    def cached(self) -> bool:
        """Whether the rows are held in RAM (float32)."""
        return isinstance(self.source, _RamRows)

    def candidates(self, q_unit: np.ndarray, pool: int, excluded: np.ndarray
                   ) -> np.ndarray:
        """Row positions ``(k, pool)`` of the ``pool`` best allowed rows per unit query by the
        block scores (``-1`` beyond the allowed rows)."""
        k = len(q_unit)
        pool = max(1, min(pool, self.rows))
        block = int(max(256, min(_SCAN_BLOCK_BYTES // (4 * self.dim),
                                 _SCAN_BLOCK_BYTES // (4 * max(k, 1)))))
        best_s = np.full((k, pool), -np.inf, np.float32)
        best_p = np.full((k, pool), -1, np.int64)
        floor = np.full(k, -np.inf, np.float32)  # each query's pool-th best score so far
        norms = self.store.norms
        for start, blk in self.source.blocks(block):
            stop = start + len(blk)
            s = q_unit @ blk.T  # (k, b) dots; zero rows keep 0
            nrm = np.asarray(norms[start:stop], np.float32)
            np.divide(s, nrm, out=s, where=nrm > 0)
            a, b = np.searchsorted(excluded, [start, stop])
            if b > a:
                s[:, excluded[a:b] - start] = -np.inf
            hit = s > floor[:, None]  # scores that can enter a query's pool
            count = hit.sum(1)
            rows = np.flatnonzero(count)
            if len(rows) == 0:
                continue
            width = int(count.max())
            if width > 4 * pool:  # dense (first blocks): the block's own top-pool per query
                s = s[rows]
                take = min(pool, s.shape[1])
                top = np.argpartition(-s, take - 1, axis=1)[:, :take]
                bs, bp = np.take_along_axis(s, top, 1), top + start
            else:  # sparse: only the scores above each query's floor, padded with -inf
                r, c = np.nonzero(hit[rows])
                slot = np.arange(len(r)) - np.repeat(np.cumsum(count[rows]) - count[rows],
                                                     count[rows])
                bs = np.full((len(rows), width), -np.inf, np.float32)
                bp = np.full((len(rows), width), -1, np.int64)
                bs[r, slot] = s[rows[r], c]
                bp[r, slot] = c + start
            cat_s = np.concatenate([best_s[rows], bs], 1)
            cat_p = np.concatenate([best_p[rows], bp], 1)
            top = np.argpartition(-cat_s, pool - 1, axis=1)[:, :pool]
            best_s[rows] = np.take_along_axis(cat_s, top, 1)
            best_p[rows] = np.take_along_axis(cat_p, top, 1)
            floor[rows] = best_s[rows].min(1)
        return np.where(np.isfinite(best_s), best_p, -1)

    def search_positions(self, q_unit: np.ndarray, m: int, excluded: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``m`` ``(scores, row positions)`` of unit queries."""
        cand = self.candidates(q_unit, m + 8, excluded)
        return _select_top(exact_cosines(self.source, self.store.norms, q_unit, cand), cand, m)

    def search(self, queries: np.ndarray, m: int, exclude_ids: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """See :class:`VectorIndex`."""
        q = _unit_queries(queries, self.dim)
        m = int(m)
        if m <= 0 or self.rows == 0:
            return _empty(len(q), max(m, 0))
        s, p = self.search_positions(q, m, _excluded_positions(self.store, exclude_ids))
        return s, _to_crop_ids(self.store, p)

    def __repr__(self) -> str:
        return f"ExactIndex(rows={self.rows}, dim={self.dim})"


# ---- exact search with torch (CUDA) ---------------------------------------------------------

class TorchExactIndex:
    """Exact search on a torch device: chunked fp16 matmul + ``torch.topk``.

    The store's rows are moved to the device once, unit-normalised in fp16, when they fit 80 %
    of its free memory; else they are streamed block by block for each search. The fp16 scores
    only pick a pool of ``max(4m, m + 32)`` candidates per query; those are re-scored exactly on
    the CPU (:func:`exact_cosines`), so scores and ids equal the CPU exact search's (unless more
    than the pool's slack of crops tie with the m-th within fp16 rounding, ~5e-4)."""

    kind = "exact"

    def __init__(self, store: EmbeddingStore, device: str = "cuda",
                 spec: IndexSpec | None = None, resident: bool | None = None,
                 chunk_rows: int = 1 << 18) -> None:
        import torch

        self.torch = torch
        self.store = store
        self.dim = store.dim
        self.rows = len(store)
        self.device = torch.device(device)
        self.files = _ShardFiles(store)
        self.spec = spec or IndexSpec("exact", self.rows, self.dim, 0, 0, "", "asked for",
                                      device=str(device))
        self.info: dict = {}
        self.chunk_rows = int(chunk_rows)
        need = self.rows * self.dim * 2 + self.rows * 4
        if resident is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                resident = need <= 0.8 * free
            else:
                resident = True
        self.resident = bool(resident)
        self._unit: Any = None  # (N, C) fp16 unit rows on the device, when resident
        if self.resident:
            self._unit = torch.empty((self.rows, self.dim), dtype=torch.float16,
                                     device=self.device)
            for start, blk in self.files.blocks(self.chunk_rows, raw=True):
                self._unit[start:start + len(blk)] = self._unit_rows(start, blk)

    def _unit_rows(self, start: int, blk: np.ndarray) -> Any:
        """Stored rows ``blk`` (n, C) -> unit rows (n, C) fp16 on the device."""
        torch = self.torch
        t = torch.from_numpy(np.require(blk, requirements=["C", "W"])).to(self.device)
        nrm = torch.from_numpy(np.array(self.store.norms[start:start + len(blk)],
                                        np.float32)).to(self.device)
        inv = torch.where(nrm > 0, 1.0 / nrm.clamp_min(1e-30), torch.zeros_like(nrm))
        return (t.float() * inv[:, None]).half()

    def _device_chunks(self, step: int) -> Iterator[tuple[int, Any]]:
        """``(first row, unit rows (n, C) fp16 on the device)``, ``step`` rows at a time when
        resident (views), ``chunk_rows`` when streamed."""
        if self.resident:
            for start in range(0, self.rows, step):
                yield start, self._unit[start:start + step]
        else:
            for start, blk in self.files.blocks(self.chunk_rows, raw=True):
                yield start, self._unit_rows(start, blk)

    def candidates(self, q_unit: np.ndarray, pool: int, excluded: np.ndarray) -> np.ndarray:
        torch = self.torch
        k = len(q_unit)
        pool = max(1, min(pool, self.rows))
        out = np.full((k, pool), -1, np.int64)
        # scores of one step: (queries, rows) fp16, at most 2^28 values (512 MB)
        qstep = max(1, min(k, (1 << 28) // self.chunk_rows))
        step = max(self.chunk_rows, (1 << 28) // qstep)
        excl = torch.from_numpy(excluded).to(self.device) if len(excluded) else None
        with torch.inference_mode():
            for a in range(0, k, qstep):
                q = torch.from_numpy(q_unit[a:a + qstep]).to(self.device).half()
                best_s = torch.full((len(q), pool), -torch.inf, dtype=torch.float16,
                                    device=self.device)
                best_p = torch.full((len(q), pool), -1, dtype=torch.int64, device=self.device)
                for start, rows in self._device_chunks(step):
                    s = q @ rows.T  # (q, n) fp16 cosines of unit rows
                    if excl is not None:
                        inside = excl[(excl >= start) & (excl < start + len(rows))] - start
                        if len(inside):
                            s[:, inside] = -torch.inf
                    take = min(pool, s.shape[1])
                    ts, ti = torch.topk(s, take, dim=1)
                    cat_s = torch.cat([best_s, ts], 1)
                    cat_p = torch.cat([best_p, ti + start], 1)
                    best_s, sel = torch.topk(cat_s, pool, dim=1)
                    best_p = torch.gather(cat_p, 1, sel)
                best_p = torch.where(torch.isfinite(best_s), best_p, -1)
                out[a:a + len(q)] = best_p.cpu().numpy()
        return out

    def search(self, queries: np.ndarray, m: int, exclude_ids: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """See :class:`VectorIndex`."""
        q = _unit_queries(queries, self.dim)
        m = int(m)
        if m <= 0 or self.rows == 0:
            return _empty(len(q), max(m, 0))
        cand = self.candidates(q, max(4 * m, m + 32), _excluded_positions(self.store,
                                                                           exclude_ids))
        s, p = _select_top(exact_cosines(self.files, self.store.norms, q, cand), cand, m)
        return s, _to_crop_ids(self.store, p)

    def __repr__(self) -> str:
        return (f"TorchExactIndex(rows={self.rows}, dim={self.dim}, device={self.device}, "
                f"resident={self.resident})")


# ---- the compressed index -------------------------------------------------------------------

class IVFIndex:
    """A FAISS IVF index (SQ8 or PQ codes) whose candidates are re-ranked exactly (module
    docstring). ``nprobe`` and ``rerank`` may be changed between searches."""

    def __init__(self, store: EmbeddingStore, faiss_index: Any, spec: IndexSpec,
                 info: dict | None = None) -> None:
        self.store = store
        self.index = faiss_index
        self.spec = spec
        self.kind = spec.kind
        self.dim = store.dim
        self.rows = len(store)
        self.nprobe = int((info or {}).get("nprobe") or spec.nprobe or 16)
        self.rerank = int((info or {}).get("rerank") or spec.rerank or DEFAULT_RERANK)
        self.files = _ShardFiles(store)
        self.info: dict = dict(info or {})
        self._exact: ExactIndex | None = None
        self._lock = threading.Lock()
        self.stats = {"retries": 0, "exact_fallbacks": 0}
        self._selectors: dict[tuple[int, int], tuple[Any, Any, np.ndarray]] = {}

    @property
    def nlist(self) -> int:
        return int(self.index.nlist)

    def _faiss_search(self, q: np.ndarray, kp: int, nprobe: int, excluded: np.ndarray
                      ) -> np.ndarray:
        faiss = _faiss()
        nprobe = min(nprobe, self.nlist)
        if len(excluded):
            params = faiss.SearchParametersIVF(sel=self._selector(excluded), nprobe=nprobe)
        else:
            params = faiss.SearchParametersIVF(nprobe=nprobe)
        _, pos = self.index.search(q, kp, params=params)
        return pos

    def _selector(self, excluded: np.ndarray) -> Any:
        """``IDSelectorNot(IDSelectorBatch(excluded))`` over row positions; the last few are
        kept (a class's exclusion is asked for again and again)."""
        faiss = _faiss()
        key = (len(excluded), hash(excluded.tobytes()))
        with self._lock:
            hit = self._selectors.pop(key, None)
            if hit is None or not np.array_equal(hit[2], excluded):
                batch = faiss.IDSelectorBatch(excluded)
                hit = (faiss.IDSelectorNot(batch), batch, excluded.copy())  # batch outlives Not
            self._selectors[key] = hit
            while len(self._selectors) > 4:
                self._selectors.pop(next(iter(self._selectors)))
        return hit[0]

    def candidates(self, q_unit: np.ndarray, m: int, excluded: np.ndarray, n_allowed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Candidate positions ``(k, kp)`` (all allowed, -1 padded) and a mask of the queries
        that still lack ``min(m, n_allowed)`` candidates after the retries."""
        kp = max(m, min(self.rerank, n_allowed))
        need = min(m, n_allowed)
        pos = self._faiss_search(q_unit, kp, self.nprobe, excluded)
        nprobe = self.nprobe
        short = (pos >= 0).sum(1) < need
        while short.any() and nprobe < self.nlist:
            nprobe = min(self.nlist, nprobe * 4)
            self.stats["retries"] += int(short.sum())
            pos[short] = self._faiss_search(q_unit[short], kp, nprobe, excluded)
            short = (pos >= 0).sum(1) < need
        return pos, short

    def search(self, queries: np.ndarray, m: int, exclude_ids: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """See :class:`VectorIndex`."""
        q = _unit_queries(queries, self.dim)
        m = int(m)
        if m <= 0 or self.rows == 0:
            return _empty(len(q), max(m, 0))
        excluded = _excluded_positions(self.store, exclude_ids)
        n_allowed = self.rows - len(excluded)
        if n_allowed <= 0:
            return _empty(len(q), m)
        s, p = _empty(len(q), m)
        short = np.zeros(len(q), bool)
        for a in range(0, len(q), QUERY_CHUNK):  # bounds FAISS's per-query tables and results
            qa = q[a:a + QUERY_CHUNK]
            cand, short[a:a + QUERY_CHUNK] = self.candidates(qa, m, excluded, n_allowed)
            s[a:a + QUERY_CHUNK], p[a:a + QUERY_CHUNK] = _select_top(
                exact_cosines(self.files, self.store.norms, qa, cand), cand, m)
        if short.any():  # FAISS found too few allowed rows even with every list: scan exactly
            self.stats["exact_fallbacks"] += int(short.sum())
            with self._lock:
                if self._exact is None:
                    self._exact = ExactIndex(self.store)
            s[short], p[short] = self._exact.search_positions(q[short], m, excluded)
        return s, _to_crop_ids(self.store, p)

    def __repr__(self) -> str:
        return (f"IVFIndex({self.kind}, rows={self.rows}, nlist={self.nlist}, "
                f"code={self.spec.code_bytes} B, nprobe={self.nprobe}, rerank={self.rerank})")


def _unit_rows(blk: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(blk, axis=1, keepdims=True)
    return np.divide(blk, n, out=np.zeros_like(blk), where=n > 0)


def _train_ivf(files: _ShardFiles, spec: IndexSpec, seed: int, progress: ProgressFn | None
               ) -> Any:
    faiss = _faiss()
    d = spec.dim
    quantizer = faiss.IndexFlatIP(d)
    if spec.kind == "ivf-pq":
        index = faiss.IndexIVFPQFastScan(quantizer, d, spec.nlist, spec.pq_m, 4,
                                         faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.seed = int(seed)
    else:
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, spec.nlist,
                                              faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(seed)
    index.cp.spherical = True
    index.cp.max_points_per_centroid = max(39, spec.train_rows // max(1, spec.nlist) + 1)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(files.rows, size=min(spec.train_rows, files.rows),
                                replace=False))
    report(progress, "train", 0, 1, "index", f"{spec.kind}: {spec.train_rows} training rows")
    x = np.empty((len(sample), d), np.float32)
    for a in range(0, len(sample), 16384):
        x[a:a + 16384] = _unit_rows(files.gather(sample[a:a + 16384]))
    index.train(x)
    del x
    report(progress, "train", 1, 1, "index")
    return index


def _fill_ivf(index: Any, files: _ShardFiles, progress: ProgressFn | None) -> None:
    meter = Meter(progress, "add", files.rows, "rows")
    block = max(1024, _SCAN_BLOCK_BYTES // (4 * files.dim))
    for start, blk in files.blocks(block):
        index.add_with_ids(_unit_rows(blk), np.arange(start, start + len(blk), dtype=np.int64))
        meter.update(start + len(blk))


# ---- files ----------------------------------------------------------------------------------

def _store_key(store: EmbeddingStore) -> dict:
    n = len(store)
    return {"rows": n, "dim": store.dim, "dtype": store.dtype,
            "first_id": int(store.ids[0]) if n else -1, "last_id": int(store.ids[-1]) if n else -1}


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(folder / MANIFEST)


def _bad_file(path: Path, folder: Path, why: str) -> ExplorerError:
    return ExplorerError(f"The search index file {path} is {why}; rebuild it with "
                         f"'{_rebuild_cmd(folder)}'")


def build_index(store: EmbeddingStore, folder: str | os.PathLike, kind: str = "auto",
                memory_budget: int | str = DEFAULT_MEMORY_BUDGET, seed: int = 0,
                device: str = "cpu", progress: ProgressFn | None = None, *,
                recall_queries: int = 200, target_recall: float = TARGET_RECALL,
                rerank: int = DEFAULT_RERANK, spec: IndexSpec | None = None) -> VectorIndex:
    """Choose (:func:`choose_index`), build and write the index of ``store`` into ``folder``.

    Parameters
    ----------
    store : EmbeddingStore
        One layer's embeddings (``N`` x ``C``).
    folder : path
        Where ``index.json`` (+ ``ivf.faiss``) go; created if needed.
    kind, memory_budget, device
        See :func:`choose_index` (``memory_budget`` in bytes or as ``"2GB"``).
    seed : int
        Seeds the training sample, k-means and the recall queries.
    recall_queries : int
        Stored crops used as queries to tune ``nprobe`` and ``rerank`` (the cheapest pair whose
        recall@8 after re-rank reaches ``target_recall``, see :func:`_tune`) and to measure the
        recall stored in ``index.json`` (0: neither; IVF kinds then keep ``nprobe`` 16 and
        ``rerank``).
    spec : IndexSpec, optional
        Use this choice instead of the rule (e.g. to force ``nlist`` or the code size).

    Returns
    -------
    VectorIndex
        The index as :func:`open_index` opens it from the written files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    budget = parse_bytes(memory_budget)
    spec = spec or choose_index(len(store), store.dim, budget, device, kind, rerank=rerank)
    t0 = time.perf_counter()
    (folder / MANIFEST).unlink(missing_ok=True)  # not an index until the manifest is back
    files: dict[str, int] = {}
    info: dict = {"seed": int(seed)}
    index: VectorIndex
    if spec.kind == "exact":
        (folder / IVF_FILE).unlink(missing_ok=True)
        index = _open_exact(store, spec, device)
    else:
        faiss = _faiss()
        sf = _ShardFiles(store)
        raw = _train_ivf(sf, spec, seed, progress)
        _fill_ivf(raw, sf, progress)
        tmp = folder / (IVF_FILE + ".tmp")
        faiss.write_index(raw, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(folder / IVF_FILE)
        files[IVF_FILE] = (folder / IVF_FILE).stat().st_size
        del raw  # the written copy is read back below, without the lists' growth slack
        index = IVFIndex(store, _read_ivf(folder, folder / IVF_FILE, store, files[IVF_FILE]),
                         spec, {"nprobe": spec.nprobe})
    info["build_s"] = round(time.perf_counter() - t0, 3)
    if recall_queries > 0 and len(store) > 1:
        report(progress, "recall", 0, 1, "index", f"{recall_queries} queries, exhaustive")
        qpos = _recall_sample(len(store), recall_queries, seed)
        truth = _truth(store, qpos, 8)
        if isinstance(index, IVFIndex):
            info.update(_tune(index, store, qpos, truth, target_recall, spec.rerank))
            spec = replace(spec, nprobe=index.nprobe, rerank=index.rerank)
            index.spec = spec
        info["recall_at_8"] = round(recall_at(index, store, qpos, truth, 8), 4)
        info["recall_queries"] = int(len(qpos))
        report(progress, "recall", 1, 1, "index", f"recall@8 {info['recall_at_8']:.3f}")
    manifest = {"format": INDEX_FORMAT, "kind": spec.kind, "spec": spec.to_meta(),
                "store": _store_key(store), "files": files, **info}
    _write_manifest(folder, manifest)
    if isinstance(index, IVFIndex | ExactIndex | TorchExactIndex):
        index.info = manifest
    return index


def _tune(index: IVFIndex, store: EmbeddingStore, qpos: np.ndarray, truth: np.ndarray,
          target: float, max_rerank: int) -> dict:
    """The cheapest ``(nprobe, rerank)`` whose recall@8 on the stored rows ``qpos`` (own row left
    out) reaches ``target``; sets both on ``index`` and returns them with the estimate.

    Cost per query, in bytes of codes scanned: ``nprobe * N/nlist * code_bytes`` (FAISS) plus
    ``rerank * ROW_COST_BYTES`` (each candidate re-ranked is one row read from the store). For
    each ``nprobe`` of ``NPROBE_LADDER`` one FAISS search with ``max_rerank`` candidates is
    re-scored exactly; the candidates come sorted by their approximate score, so the recall of
    every smaller ``rerank`` is that of a prefix. The ladder stops at 4x the first ``nprobe``
    that reaches the target (or at ``nlist``); when none does, the best recall found is kept.
    """
    q = _unit_queries(index.files.gather(qpos), index.dim)
    own = qpos[:, None]
    truth_sets = [set(t[t >= 0].tolist()) for t in truth]
    per_list = index.rows / index.nlist * index.spec.code_bytes
    none = np.zeros(0, np.int64)
    found: list[tuple[float, int, int, float]] = []  # (cost, nprobe, rerank, recall)
    best: tuple[float, int, int] = (-1.0, index.nlist, max_rerank)  # (recall, nprobe, rerank)
    first_ok = 0
    reranks = sorted({r for r in RERANK_LADDER if r < max_rerank} | {max_rerank})
    for nprobe in NPROBE_LADDER:
        nprobe = min(nprobe, index.nlist)
        cand = index._faiss_search(q, max_rerank, nprobe, none)
        exact = exact_cosines(index.files, store.norms, q, cand)
        for r in reranks:
            _, top = _select_top(exact[:, :r], cand[:, :r], 9)
            top = np.where(top == own, -1, top)  # the query's own row does not count
            hits = sum(len(ts & set(row[row >= 0][:8].tolist()))
                       for ts, row in zip(truth_sets, top))
            rec = hits / max(1, sum(len(ts) for ts in truth_sets))
            if rec > best[0]:
                best = (rec, nprobe, r)
            if rec >= target:
                found.append((nprobe * per_list + r * ROW_COST_BYTES, nprobe, r, rec))
                first_ok = first_ok or nprobe
                break
        if nprobe >= index.nlist or (first_ok and nprobe >= 4 * first_ok):
            break
    if found:
        cost, index.nprobe, index.rerank, rec = min(found)
    else:
        rec, index.nprobe, index.rerank = best
        cost = index.nprobe * per_list + index.rerank * ROW_COST_BYTES
    return {"nprobe": index.nprobe, "rerank": index.rerank,
            "tune": {"target": target, "recall_estimate": round(rec, 4),
                     "cost_bytes_per_query": int(cost), "row_cost_bytes": ROW_COST_BYTES}}


def _open_exact(store: EmbeddingStore, spec: IndexSpec, device: str) -> VectorIndex:
    if str(device).startswith("cuda"):
        _device_memory(device)  # a clear error when CUDA is missing
        return TorchExactIndex(store, device, spec)
    return ExactIndex(store, spec)


def _read_ivf(folder: Path, path: Path, store: EmbeddingStore, size: int | None) -> Any:
    faiss = _faiss()
    try:
        actual = path.stat().st_size
    except FileNotFoundError as exc:
        raise _bad_file(path, folder, "missing") from exc
    if size is not None and actual != size:
        raise _bad_file(path, folder, f"truncated or changed ({actual} bytes, {size} written)")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise _bad_file(path, folder, "unreadable or truncated "
                        f"({str(exc).strip().splitlines()[-1]})") from exc
    if (index.ntotal, index.d) != (len(store), store.dim):
        raise _bad_file(path, folder, f"for {index.ntotal} rows of {index.d} dims, the store "
                        f"holds {len(store)} of {store.dim}")
    return index


def open_index(folder: str | os.PathLike, store: EmbeddingStore, device: str = "cpu"
               ) -> VectorIndex:
    """Open the index written by :func:`build_index` in ``folder`` for ``store``.

    A missing or broken ``index.json``, a missing or truncated ``ivf.faiss``, or an index built
    for another store raises :class:`ExplorerError` naming the file and the rebuild command.
    ``device="cuda"`` runs an exact index on the GPU (IVF indexes stay on the CPU)."""
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise _bad_file(path, folder, "missing") from exc
    except (OSError, ValueError) as exc:
        raise _bad_file(path, folder, f"unreadable ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise _bad_file(path, folder, f"not in format {INDEX_FORMAT}")
    if manifest.get("store") != _store_key(store):
        raise _bad_file(path, folder, f"built for another store ({manifest.get('store')}, "
                        f"this one is {_store_key(store)})")
    spec = IndexSpec.from_meta(manifest["spec"])
    index: VectorIndex
    if spec.kind == "exact":
        index = _open_exact(store, spec, device)
    else:
        raw = _read_ivf(folder, folder / IVF_FILE, store, manifest.get("files", {}).get(IVF_FILE))
        index = IVFIndex(store, raw, spec, manifest)
    if isinstance(index, IVFIndex | ExactIndex | TorchExactIndex):
        index.info = manifest
    return index


# ---- recall ---------------------------------------------------------------------------------

def _recall_sample(rows: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([int(seed), 8])
    return np.sort(rng.choice(rows, size=min(n, rows), replace=False))


def _truth(store: EmbeddingStore, qpos: np.ndarray, m: int,
           excluded: np.ndarray | None = None) -> np.ndarray:
    """Exhaustive top-``m`` row positions of the stored rows ``qpos`` as queries, each query's
    own row left out (``(len(qpos), m)``)."""
    ex = ExactIndex(store)
    q = _unit_queries(ex.files.gather(qpos), store.dim)
    _, p = ex.search_positions(q, m + 1, np.zeros(0, np.int64) if excluded is None
                               else excluded)
    return _drop_self(p, qpos, m)


def _drop_self(p: np.ndarray, qpos: np.ndarray, m: int) -> np.ndarray:
    out = np.full((len(p), m), -1, np.int64)
    for i, row in enumerate(p):
        keep = row[(row != qpos[i])][:m]
        out[i, :len(keep)] = keep
    return out


def recall_at(index: VectorIndex, store: EmbeddingStore, qpos: np.ndarray, truth: np.ndarray,
              m: int = 8, exclude_ids: np.ndarray | None = None) -> float:
    """Mean fraction of ``truth`` (row positions ``(k, m)``, -1 = none) that ``index`` returns
    for the stored rows ``qpos`` as queries (own row left out)."""
    queries = _ShardFiles(store).gather(qpos)
    _, ids = index.search(queries, m + 1, exclude_ids)
    own = np.asarray(store.ids[qpos])
    hits = total = 0
    for i in range(len(qpos)):
        got = [int(x) for x in ids[i] if x >= 0 and x != own[i]][:m]
        ref = {int(store.ids[p]) for p in truth[i] if p >= 0}
        hits += len(ref & set(got))
        total += len(ref)
    return hits / total if total else 1.0


def measure_recall(index: VectorIndex, store: EmbeddingStore, n_queries: int = 200, m: int = 8,
                   seed: int = 0, exclude: np.ndarray | None = None) -> float:
    """Recall@``m`` of ``index`` against the exhaustive exact search.

    Queries are ``n_queries`` stored crops' embeddings (seeded sample); each query's own crop is
    left out of both lists, so the trivial self-match does not count. ``exclude`` (crop ids)
    applies to both searches.

    Returns
    -------
    float
        Mean over queries of ``|found & exact| / |exact|`` (1.0 on an empty store).
    """
    if len(store) < 2:
        return 1.0
    qpos = _recall_sample(len(store), n_queries, seed)
    excluded = _excluded_positions(store, exclude)
    truth = _truth(store, qpos, m, excluded)
    return recall_at(index, store, qpos, truth, m, exclude)
