"""Crop search: exact FAISS search equals brute-force cosine, exclusion is exact, IVF recall."""

from __future__ import annotations

import numpy as np
import pytest

from data_index.search import CropSearch, normalize_rows, recall_at_k
from explorer_core.errors import ExplorerError


def _brute(emb: np.ndarray, ids: np.ndarray, q: np.ndarray, m: int, allowed=None):
    e = normalize_rows(np.asarray(emb))
    s = normalize_rows(q) @ e.T
    if allowed is not None:
        s[:, ~allowed] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :m]
    return ids[order], np.take_along_axis(s, order, 1)


@pytest.fixture(scope="module")
def flat(lite0_catalog):
    return CropSearch(lite0_catalog, "flat")


@pytest.fixture(scope="module")
def queries(lite0_catalog):
    ids, emb = lite0_catalog.embeddings()
    rng = np.random.default_rng(0)
    pick = rng.choice(len(ids), 10, replace=False)
    # real crop embeddings perturbed, so the query itself is not trivially rank 0
    q = np.asarray(emb[pick]) * rng.uniform(0.5, 1.5, size=(10, emb.shape[1])).astype(np.float32)
    return q.astype(np.float32)


def test_flat_top8_equals_brute_force_cosine(lite0_catalog, flat, queries):
    ids, emb = lite0_catalog.embeddings()
    want_ids, want_s = _brute(emb, ids, queries, 8)
    res = flat.search(queries, m=8)
    assert len(res) == 10
    for j, refs in enumerate(res):
        assert [r.crop_id for r in refs] == want_ids[j].tolist()
        np.testing.assert_allclose([r.score for r in refs], want_s[j], atol=1e-4)
        assert all(-1 <= r.score <= 1.0001 for r in refs)
    one = flat.search(queries[0], m=3)  # a single (C,) vector works too
    assert [r.crop_id for r in one[0]] == want_ids[0, :3].tolist()


def test_exclusion_is_exact_top_m_of_the_allowed_set(lite0_catalog, flat, queries):
    counts = lite0_catalog.predicted_counts()
    a = max(counts, key=counts.get)
    ids, emb = lite0_catalog.embeddings()
    # query towards class A: mean embedding of crops of images predicted A
    img = lite0_catalog.images_predicted_as(a)
    qa = np.asarray(emb)[np.concatenate([np.arange(i * 9, i * 9 + 9) for i in img])].mean(0)
    q = np.vstack([qa[None], queries])
    excluded = set(lite0_catalog.excluded_crop_ids(a).tolist())
    assert len(excluded) >= 9 * counts[a]  # all crops of A images, plus crops predicted A
    allowed = np.array([i not in excluded for i in ids.tolist()])
    want_ids, _ = _brute(emb, ids, q, 8, allowed)
    plain = flat.search(q[:1], m=8)[0]
    assert any(r.image_pred == a or r.crop_pred == a for r in plain)  # the filter has work to do
    res = flat.search(q, m=8, exclude_class=a)
    for j, refs in enumerate(res):
        assert len(refs) == 8
        assert all(r.crop_pred != a and r.image_pred != a for r in refs)
        assert [r.crop_id for r in refs] == want_ids[j].tolist()


def test_bad_query_dimension_is_a_user_error(flat):
    with pytest.raises(ExplorerError, match="dimensions"):
        flat.search(np.ones((1, 7), np.float32))


def test_ivf_recall_against_exact(lite0_catalog, flat, queries):
    ivf = CropSearch(lite0_catalog, "ivf", nprobe=8)
    assert ivf.ntotal == flat.ntotal == 18000 and ivf.nlist > 8
    r = recall_at_k(ivf, flat, queries, k=8)
    r_excl = recall_at_k(ivf, flat, queries, k=8, exclude_class=0)
    print(f"IVF nlist={ivf.nlist} nprobe=8 recall@8={r:.3f} (excluding class 0: {r_excl:.3f})")
    assert r >= 0.75 and r_excl >= 0.75  # measured 0.90 on this catalog (nprobe 8 of 461)
    full = CropSearch(lite0_catalog, "ivf", nprobe=ivf.nlist)  # visiting every list = exact
    assert recall_at_k(full, flat, queries, k=8) == 1.0
    # cached beside the layer's store (catalog v2: index/<layer>/, no index/ivf_*.faiss)
    assert (lite0_catalog.store().folder / f"ivf_{ivf.nlist}.faiss").is_file()
