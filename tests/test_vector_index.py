"""Crop search at any size (data_index/vector_index.py): the exact scan equals brute force, the
compressed IVF index re-ranked exactly returns the exhaustive top-8 when its candidates cover it
and reaches recall@8 >= 0.95 on a clustered 200 k bank, the exclusion filter stays exact (m
allowed crops, never an excluded one), broken index files are named, and the index rule picks
exact for small stores, compressed above, within the memory budget."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from data_index.store import EmbeddingStore, StoreWriter
from data_index.vector_index import (
    DEFAULT_MEMORY_BUDGET,
    ExactIndex,
    IndexSpec,
    IVFIndex,
    TorchExactIndex,
    VectorIndex,
    build_index,
    choose_index,
    measure_recall,
    open_index,
    parse_bytes,
)
from explorer_core.errors import ExplorerError

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "bench_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _store(folder, n=3000, d=32, seed=0, shard_rows=700) -> tuple[EmbeddingStore, np.ndarray]:
    """A small store of non-negative rows (a few zero rows too), crop ids with gaps."""
    rng = np.random.default_rng(seed)
    emb = np.maximum(rng.standard_normal((n, d)).astype(np.float32) + 0.3, 0)
    emb[[5, 17]] = 0.0
    ids = np.sort(rng.choice(20 * n, n, replace=False)).astype(np.int64)
    w = StoreWriter(folder, d, shard_rows=shard_rows)
    for i in range(0, n, 500):
        w.append(ids[i:i + 500], emb[i:i + 500])
    return w.finish(), ids


def _brute(store: EmbeddingStore, q: np.ndarray, m: int, exclude=None):
    """Reference: numpy over every row (float16 as stored -> float32), cosine, stable order."""
    rows = np.concatenate([b for _, b in store.blocks()])
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    nrm = np.linalg.norm(rows, axis=1)
    cos = np.divide(rows @ qn.T, nrm[:, None], out=np.zeros((len(rows), len(q)), np.float32),
                    where=nrm[:, None] > 0).T
    if exclude is not None:
        cos[:, np.isin(np.asarray(store.ids), exclude)] = -np.inf
    order = np.argsort(-cos, axis=1, kind="stable")[:, :m]
    s = np.take_along_axis(cos, order, 1)
    return s, np.where(np.isfinite(s), np.asarray(store.ids)[order], -1)


# ---- exact -------------------------------------------------------------------------------------

def test_exact_index_equals_brute_force_with_and_without_exclusion(tmp_path):
    st, ids = _store(tmp_path / "s")
    rng = np.random.default_rng(1)
    q = np.vstack([rng.random((6, 32)).astype(np.float32) * 5, st.vectors(ids[[3, 999]])])
    idx = ExactIndex(st)
    assert isinstance(idx, VectorIndex) and idx.kind == "exact" and idx.dim == 32
    s, got = idx.search(q, 8)
    rs, ref = _brute(st, q, 8)
    assert got.shape == (8, 8) and got.dtype == np.int64 and s.dtype == np.float32
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_allclose(s, rs, rtol=1e-5, atol=1e-6)
    assert got[6, 0] == ids[3] and s[6, 0] == pytest.approx(1.0, abs=1e-6)  # a crop finds itself
    excl = np.concatenate([ref[:, :5].ravel(), [10**9]])  # the best crops, and an unknown id
    s, got = idx.search(q, 8, excl)
    rs, ref = _brute(st, q, 8, excl)
    np.testing.assert_array_equal(got, ref)
    assert not np.isin(got, excl).any() and (got >= 0).all()
    # (C,) query, and more crops asked for than are allowed: all allowed ones, then -1 / -inf
    keep = ids[:5]
    s, got = idx.search(q[0], 8, np.setdiff1d(ids, keep))
    assert got.shape == (1, 8) and sorted(got[0, :5]) == sorted(keep)
    assert (got[0, 5:] == -1).all() and np.isneginf(s[0, 5:]).all()
    with pytest.raises(ExplorerError, match="32-dimensional"):
        idx.search(np.ones((2, 31)), 8)


def test_torch_exact_path_matches_the_cpu_scan(tmp_path):
    """The GPU code path (fp16 matmul + topk, then exact re-scoring) on CPU tensors: same ids."""
    st, ids = _store(tmp_path / "s", n=2500, d=24)
    q = np.random.default_rng(2).random((5, 24)).astype(np.float32)
    excl = ids[::3]
    for resident in (True, False):  # rows moved once / streamed block by block
        t = TorchExactIndex(st, "cpu", resident=resident, chunk_rows=600)
        assert t.resident == resident and (t._unit is not None) == resident
        for ex in (None, excl):
            ts, ti = t.search(q, 8, ex)
            cs, ci = ExactIndex(st).search(q, 8, ex)
            np.testing.assert_array_equal(ti, ci)
            np.testing.assert_allclose(ts, cs, rtol=1e-6)  # the same exact re-scoring


@pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                    reason="no CUDA device: the GPU exact search is checked on a GPU machine")
def test_cuda_exact_search_gives_the_cpu_ids(tmp_path):
    st, ids = _store(tmp_path / "s", n=20000, d=64)
    q = np.random.default_rng(3).random((32, 64)).astype(np.float32)
    gpu = TorchExactIndex(st, "cuda")
    assert gpu.resident
    for ex in (None, ids[::5]):
        _, gi = gpu.search(q, 8, ex)
        _, ci = ExactIndex(st).search(q, 8, ex)
        np.testing.assert_array_equal(gi, ci)


# ---- compressed ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ivf-pq", "ivf-sq8"])
def test_compressed_index_reranked_returns_the_exhaustive_top8_when_candidates_cover_it(
        tmp_path, kind):
    st, ids = _store(tmp_path / "s", n=4000, d=32)
    spec = dataclasses.replace(choose_index(len(st), st.dim, kind=kind), nlist=16,
                               train_rows=4000)
    idx = build_index(st, tmp_path / "i", spec=spec, recall_queries=0)
    assert isinstance(idx, IVFIndex) and idx.kind == kind and idx.nlist == 16
    idx.nprobe, idx.rerank = 16, 4000  # every list probed, every allowed row a candidate
    q = np.random.default_rng(4).random((10, 32)).astype(np.float32)
    for ex in (None, ids[::2]):
        s, got = idx.search(q, 8, ex)
        rs, ref = _brute(st, q, 8, ex)
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_allclose(s, rs, rtol=1e-5, atol=1e-6)  # exact cosines, not codes
    assert idx.stats["exact_fallbacks"] == 0


def test_exclusion_under_the_compressed_index_returns_exactly_m_allowed(tmp_path):
    st, ids = _store(tmp_path / "s", n=4000, d=32)
    spec = dataclasses.replace(choose_index(len(st), st.dim, kind="ivf-pq"), nlist=32,
                               train_rows=4000)
    idx = build_index(st, tmp_path / "i", spec=spec, recall_queries=0)
    idx.nprobe, idx.rerank = 1, 16
    q = np.asarray(st.vectors(ids[20:40]))
    # 97 % excluded: one probed list rarely holds 8 allowed rows -> retries, maybe the exact scan
    allowed = np.random.default_rng(5).choice(ids, 120, replace=False)
    excl = np.setdiff1d(ids, allowed)
    s, got = idx.search(q, 8, excl)
    assert (got >= 0).all() and np.isin(got, allowed).all()
    assert all(len(set(r)) == 8 for r in got)
    assert idx.stats["retries"] > 0
    rows, nrm = st.vectors(got.ravel()), np.linalg.norm(st.vectors(got.ravel()), axis=1)
    qn = np.repeat(q / np.linalg.norm(q, axis=1, keepdims=True), 8, 0)
    np.testing.assert_allclose(s.ravel(), (rows * qn).sum(1) / nrm, rtol=1e-5)  # exact cosines
    assert (np.diff(s, axis=1) <= 0).all()  # best first
    # fewer allowed crops than m: all of them, then -1
    s, got = idx.search(q[:3], 8, np.setdiff1d(ids, allowed[:5]))
    assert all(sorted(r[:5]) == sorted(allowed[:5]) for r in got) and (got[:, 5:] == -1).all()
    _, got = idx.search(q[:2], 8, ids)
    assert (got == -1).all()


def test_when_faiss_comes_back_short_the_exact_scan_answers(tmp_path, monkeypatch):
    st, ids = _store(tmp_path / "s", n=3000, d=32)
    spec = dataclasses.replace(choose_index(len(st), st.dim, kind="ivf-sq8"), nlist=16)
    idx = build_index(st, tmp_path / "i", spec=spec, recall_queries=0)
    q = np.random.default_rng(6).random((4, 32)).astype(np.float32)
    monkeypatch.setattr(idx, "_faiss_search",
                        lambda qq, kp, nprobe, ex: np.full((len(qq), kp), -1, np.int64))
    s, got = idx.search(q, 8, ids[::3])
    rs, ref = _brute(st, q, 8, ids[::3])
    np.testing.assert_array_equal(got, ref)
    assert idx.stats["exact_fallbacks"] == 4


# ---- the clustered 200 k bank (built once for this module) ---------------------------------------

@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    """200 k x 256 clustered crops (bench/bench_scale.py's generator, the real StoreWriter) and
    its compressed index, built with the rule's parameters and tuned nprobe/rerank."""
    root = tmp_path_factory.mktemp("bank")
    st = _bench().write_clustered_bank(root / "store", 200_000, 256, seed=0)
    idx = build_index(st, root / "index", kind="ivf-pq", seed=0)
    return st, idx, root


def test_recall_at_8_on_a_clustered_200k_bank(bank):
    st, idx, root = bank
    assert isinstance(idx, IVFIndex) and idx.kind == "ivf-pq" and idx.spec.nlist == 512
    info = idx.info
    assert info["recall_at_8"] >= 0.95 and 4 <= info["nprobe"] <= 512 and info["rerank"] <= 256
    held_out = measure_recall(idx, st, n_queries=200, m=8, seed=1)  # not the tuning queries
    assert held_out >= 0.95, held_out
    reopened = open_index(root / "index", st)
    assert (reopened.nprobe, reopened.rerank) == (info["nprobe"], info["rerank"])
    q = st.rows(np.arange(0, 200_000, 9973))
    np.testing.assert_array_equal(reopened.search(q, 8)[1], idx.search(q, 8)[1])


def test_exclusion_of_a_class_stays_exact_on_the_bank(bank):
    st, idx, _ = bank
    classes = _bench().bank_classes(len(st))
    q = st.rows(np.arange(5, 200_000, 4999))
    excl = np.asarray(st.ids)[np.isin(classes, classes[np.arange(5, 200_000, 4999)])]
    s, got = idx.search(q, 8, excl)  # every query's own class excluded: its best neighbours
    assert (got >= 0).all() and not np.isin(got, excl).any()
    rec = measure_recall(idx, st, n_queries=100, m=8, seed=2, exclude=excl)
    assert rec >= 0.9, rec
    s_ref, ref = ExactIndex(st).search(q, 8, excl)
    assert (s <= s_ref[:, :1] + 1e-6).all()  # never better than the exhaustive best


def test_searching_does_not_pile_up_resident_store_pages(bank):
    """4000 queries re-rank most of the store's rows: the file-backed part of the process's
    resident set (RssFile: mapped store pages) must not grow by the store's size, since rows are
    read, not left mapped (a mapped gather grows it by ~100 MB here)."""
    st, idx, root = bank
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        import numpy as np
        from data_index.store import EmbeddingStore
        from data_index.vector_index import _ShardFiles, open_index
        def rss_file():
            with open('/proc/self/status') as f:
                return next(int(l.split()[1]) for l in f if l.startswith('RssFile:')) / 1024
        st = EmbeddingStore.open({str(root / 'store')!r})
        idx = open_index({str(root / 'index')!r}, st)
        q = _ShardFiles(st).gather(np.random.default_rng(0).choice(len(st), 4000, replace=False))
        idx.search(q[:64], 8)
        before = rss_file()
        idx.rerank = 256
        idx.search(q, 8)
        print(before, rss_file())
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = map(float, r.stdout.split())
    store_mb = st.nbytes / 2**20  # ~100 MB
    assert after - before < 0.2 * store_mb, (before, after, store_mb)


# ---- files ----------------------------------------------------------------------------------------

def test_broken_or_foreign_index_files_are_named_with_the_rebuild_command(tmp_path):
    ws = tmp_path / "ws"
    (ws / "index" / "layer").mkdir(parents=True)
    (ws / "workspace.toml").write_text("")
    st, ids = _store(ws / "index" / "layer" / "store", n=3000)
    folder = ws / "index" / "layer" / "search"
    spec = dataclasses.replace(choose_index(len(st), st.dim, kind="ivf-sq8"), nlist=16)
    build_index(st, folder, spec=spec, recall_queries=50)
    assert not list(folder.glob("*.tmp"))
    f = folder / "ivf.faiss"
    f.write_bytes(f.read_bytes()[:-1000])
    hint = f"python -m data_index build --workspace {ws} --rebuild"
    with pytest.raises(ExplorerError, match=r"ivf\.faiss is truncated.*" + hint):
        open_index(folder, st)
    f.unlink()
    with pytest.raises(ExplorerError, match=r"ivf\.faiss is missing"):
        open_index(folder, st)
    (folder / "index.json").write_text('{"format": "concept-explorer-vector-index/1", ')
    with pytest.raises(ExplorerError, match=r"index\.json is unreadable"):
        open_index(folder, st)
    (folder / "index.json").unlink()
    with pytest.raises(ExplorerError, match=r"index\.json is missing.*--rebuild"):
        open_index(folder, st)
    build_index(st, folder, kind="exact", recall_queries=0)
    other, _ = _store(tmp_path / "other", n=2000)
    with pytest.raises(ExplorerError, match="built for another store"):
        open_index(folder, other)
    assert open_index(folder, st).kind == "exact"


# ---- the rule -------------------------------------------------------------------------------------

def test_choose_index_exact_when_small_compressed_above_and_within_the_budget():
    small = choose_index(30_000, 1280)  # the shared photos: 18 k crops
    assert small.kind == "exact" and small.resident_bytes <= DEFAULT_MEMORY_BUDGET
    mid = choose_index(300_000, 1280)
    assert mid.kind == "ivf-sq8" and mid.code_bytes == 1280 and mid.nlist == 512
    big = choose_index(1_000_000, 1280, parse_bytes("2GB"))
    assert big.kind == "ivf-pq" and big.pq_m == 320 and big.nlist == 1024
    assert big.resident_bytes <= 2e9 and "N*(code+8)" in big.formula
    huge = choose_index(11_500_000, 1280, parse_bytes("4GB"))
    assert huge.kind == "ivf-pq" and huge.resident_bytes <= 4e9 and huge.nlist == 4096
    tight = choose_index(11_500_000, 1280, parse_bytes("1.2GB"))
    assert tight.kind == "ivf-pq" and tight.pq_m < huge.pq_m and tight.resident_bytes <= 1.2e9
    slow = choose_index(11_500_000, 1280, parse_bytes("300MB"))
    assert slow.kind == "exact" and "no compressed index fits" in slow.reason
    for spec in (small, mid, big, huge, tight, slow):
        assert spec.resident_bytes <= spec.budget_bytes
        assert IndexSpec.from_meta(spec.to_meta()) == spec
    with pytest.raises(ExplorerError, match="No index .* fits a memory budget.*--memory-budget"):
        choose_index(11_500_000, 1280, parse_bytes("100MB"))
    with pytest.raises(ExplorerError, match="over the memory budget.*--memory-budget"):
        choose_index(11_500_000, 1280, parse_bytes("1GB"), kind="ivf-sq8")
    gpu = choose_index(11_500_000, 1280, device="cuda", device_memory_bytes=80 * 2**30)
    assert gpu.kind == "exact"
    assert choose_index(11_500_000, 2048, device="cuda",
                        device_memory_bytes=40 * 2**30).kind == "ivf-pq"
    assert choose_index(100, 8, kind="flat").kind == "exact"
    with pytest.raises(ExplorerError, match="Unknown index kind"):
        choose_index(100, 8, kind="hnsw")


def test_parse_bytes():
    assert parse_bytes("2GB") == 2_000_000_000 and parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes(1e9) == 10**9 and parse_bytes("1.5gb") == 1_500_000_000
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(ExplorerError):
            parse_bytes(bad)
