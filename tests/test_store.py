"""The embedding store: float16 row shards, memory-mapped, checked against its manifest."""

from __future__ import annotations

import numpy as np
import pytest

from data_index.store import EmbeddingStore, StoreWriter, store_nbytes
from explorer_core.errors import ExplorerError


def _data(n: int = 1000, d: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(10 * n, size=n, replace=False)).astype(np.int64)
    return ids, rng.gamma(1.0, 2.0, size=(n, d)).astype(np.float32)


def _write(folder, ids, emb, dtype="float16", shard_rows=300, block=77):
    w = StoreWriter(folder, emb.shape[1], dtype=dtype, shard_rows=shard_rows)
    for i in range(0, len(ids), block):
        w.append(ids[i:i + block], emb[i:i + block])
    return w.finish()


def test_round_trip_in_shards_within_float16_rounding(tmp_path):
    ids, emb = _data()
    st = _write(tmp_path / "s", ids, emb)
    assert len(st) == 1000 and st.dim == 24 and st.dtype == "float16"
    assert len(list((tmp_path / "s").glob("emb-*.npy"))) == 4  # 300 + 300 + 300 + 100 rows
    assert np.array_equal(st.ids, ids)
    got = np.concatenate([b for _, b in st.blocks(rows=128)])
    assert got.dtype == np.float32 and got.shape == emb.shape
    np.testing.assert_allclose(got, emb, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(st.norms, np.linalg.norm(got, axis=1), rtol=1e-5)
    assert st.nbytes == store_nbytes(1000, 24) == 1000 * 24 * 2 + 1000 * 12
    assert isinstance(st._shards[0].rows, np.memmap)  # mapped, not read into RAM


def test_gather_by_position_and_crop_id_keeps_order(tmp_path):
    ids, emb = _data()
    st = _write(tmp_path / "s", ids, emb, dtype="float32")
    pos = np.array([999, 0, 301, 299, 300, 5])
    np.testing.assert_array_equal(st.rows(pos), emb[pos])
    np.testing.assert_array_equal(st.vectors(ids[pos]), emb[pos])
    missing = int(np.setdiff1d(np.arange(ids.max()), ids)[0])
    with pytest.raises(ExplorerError, match=f"No crop {missing} in this catalog"):
        st.vectors([ids[3], missing])
    starts = [s for s, _ in st.blocks(rows=250, start=100, stop=700)]
    assert starts == [100, 300, 550, 600]  # blocks stop at shard ends


def test_truncated_or_missing_files_name_the_file(tmp_path):
    ids, emb = _data()
    _write(tmp_path / "s", ids, emb)
    shard = tmp_path / "s" / "emb-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ExplorerError, match="emb-00001.npy.*(truncated|holds).*--rebuild"):
        EmbeddingStore.open(tmp_path / "s")
    (tmp_path / "s" / "ids.npy").unlink()
    with pytest.raises(ExplorerError, match="ids.npy is missing"):
        EmbeddingStore.open(tmp_path / "s")
    with pytest.raises(ExplorerError, match="missing store.json"):
        EmbeddingStore.open(tmp_path / "nothing")


def test_writer_refuses_what_it_cannot_store(tmp_path):
    w = StoreWriter(tmp_path / "a", 4)
    with pytest.raises(ExplorerError, match="float16.*--storage float32"):
        w.append(np.array([1]), np.full((1, 4), 1e6, np.float32))
    w = StoreWriter(tmp_path / "b", 4)
    w.append(np.array([5]), np.ones((1, 4)))
    with pytest.raises(ValueError, match="ascending"):
        w.append(np.array([5]), np.ones((1, 4)))
    with pytest.raises(ExplorerError, match="NaN"):
        StoreWriter(tmp_path / "c", 2).append(np.array([0]), np.array([[np.nan, 1.0]]))
    with pytest.raises(ExplorerError, match="storage dtype"):
        StoreWriter(tmp_path / "d", 2, dtype="int8")


def test_a_rewritten_store_drops_old_shards_and_an_unfinished_one_is_no_store(tmp_path):
    ids, emb = _data()
    _write(tmp_path / "s", ids, emb, shard_rows=100)
    assert len(list((tmp_path / "s").glob("emb-*.npy"))) == 10
    st = _write(tmp_path / "s", ids[:150], emb[:150], shard_rows=100)
    assert len(st) == 150 and len(list((tmp_path / "s").glob("emb-*.npy"))) == 2
    w = StoreWriter(tmp_path / "s", 24)  # a new write removes the manifest first
    w.append(ids[:10], emb[:10])
    with pytest.raises(ExplorerError, match="missing store.json"):
        EmbeddingStore.open(tmp_path / "s")
