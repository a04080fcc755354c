"""The catalog's search index: chosen and built per layer when a catalog completes, recorded
in ``meta`` (kind, recall@8 against the exhaustive search), shown by ``status``, rebuilt under
another kind or memory budget by ``python -m data_index index``, and used by ``CropSearch``
(exact scores, exclusion inside the search, exactly m allowed crops)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import MULTI_LAYERS

from cli.data_index_cmd import main as data_index_main
from data_index.catalog import Catalog, reindex_catalog
from data_index.search import CropSearch
from data_index.workspace import Workspace
from explorer_core.errors import ExplorerError


def test_a_build_records_each_layers_index_and_its_recall(multilayer_workspace, capsys):
    with Catalog.open(multilayer_workspace) as cat:
        for layer in MULTI_LAYERS:  # 1080 crops: exact, and exact finds itself
            assert cat.meta[f"index:{layer}"] == "exact"
            assert cat.recall_at_8(layer) == 1.0
            manifest = json.loads(
                (multilayer_workspace.layer_dir(layer) / "search" / "index.json").read_text())
            assert manifest["kind"] == "exact" and manifest["store"]["rows"] == cat.n_crops
        assert CropSearch(cat).vindex is None  # exact on the CPU: the store's blocked scan
    assert data_index_main(["status", "--workspace", str(multilayer_workspace.root)]) == 0
    out = capsys.readouterr().out
    assert out.count("index exact") == 3 and "recall@8 1.000" in out


@pytest.fixture(scope="module")
def ivf_workspace(multilayer_workspace, tmp_path_factory):
    """A copy of the three-layer catalog whose default layer got a forced IVF-SQ8 index."""
    root = tmp_path_factory.mktemp("ivf") / "multi"
    shutil.copytree(multilayer_workspace.root, root)
    ws = Workspace.open(root)
    stamps = reindex_catalog(ws, "ivf-sq8", "1GB", [ws.layer])
    assert set(stamps) == {f"{k}:{ws.layer}" for k in
                           ("index", "recall_at_8", "index_bytes", "index_detail", "index_id")}
    return ws


def test_reindex_records_an_ivf_index_with_its_measured_recall(ivf_workspace, capsys):
    layer = ivf_workspace.layer
    with Catalog.open(ivf_workspace) as cat:
        assert cat.meta[f"index:{layer}"] == "ivf-sq8"
        assert cat.recall_at_8(layer) >= 0.95
        assert int(cat.meta[f"index_bytes:{layer}"]) > 0
        assert json.loads(cat.meta[f"index_detail:{layer}"])["nlist"] >= 1
        assert cat.index_id(layer) not in ("", "exact")
        other = [x for x in MULTI_LAYERS if x != layer][0]
        assert cat.meta[f"index:{other}"] == "exact"  # the other layers kept theirs
        st = cat.status()
        assert st["index"][layer] == "ivf-sq8" and st["recall_at_8"][layer] >= 0.95
    assert data_index_main(["status", "--workspace", str(ivf_workspace.root)]) == 0
    assert "index ivf-sq8" in capsys.readouterr().out


def test_the_ivf_index_returns_exact_scores_and_m_allowed_crops(ivf_workspace):
    with Catalog.open(ivf_workspace) as cat:
        ivf = CropSearch(cat)  # auto: the built index
        exact = CropSearch(cat, kind="exact")
        assert ivf.kind == "ivf-sq8" and ivf.vindex is not None and exact.vindex is None
        store = cat.store()
        q = store.rows(list(range(0, len(store), 97)))  # 12 stored crops as queries
        a = next(iter(cat.predicted_counts()))
        excluded = set(cat.excluded_crop_ids(a).tolist())
        s_ivf, i_ivf = ivf.search_ids(q, 8, exclude_class=a)
        s_ex, i_ex = exact.search_ids(q, 8, exclude_class=a)
        assert i_ivf.shape == (len(q), 8) and (i_ivf >= 0).all()
        assert not excluded & set(i_ivf.ravel().tolist())  # exclusion inside the search
        overlap = np.mean([len(set(r) & set(t)) / 8 for r, t in zip(i_ivf, i_ex)])
        assert overlap >= 0.9
        # the scores are the exact cosines of the crops returned
        pos = np.searchsorted(store.ids, i_ivf.ravel())
        rows = store.rows(pos.tolist()).astype(np.float64)
        qn = np.repeat(q, 8, axis=0).astype(np.float64)
        cos = (rows * qn).sum(1) / (np.linalg.norm(rows, axis=1) * np.linalg.norm(qn, axis=1))
        np.testing.assert_allclose(s_ivf.ravel(), cos, atol=2e-3)
        assert np.all(np.diff(s_ivf, axis=1) <= 1e-6)  # best first


def test_a_kind_that_is_not_built_is_refused_with_the_command(ivf_workspace):
    with Catalog.open(ivf_workspace) as cat:
        with pytest.raises(ExplorerError, match="python -m data_index index") as e:
            CropSearch(cat, kind="ivf-pq")
        assert "ivf-sq8" in str(e.value)
        other = [x for x in MULTI_LAYERS if x != ivf_workspace.layer][0]
        with pytest.raises(ExplorerError, match="has no ivf-sq8|an exact index"):
            CropSearch(cat, layer=other, kind="ivf-sq8")


def test_explanations_of_an_approximate_index_get_their_own_cache_keys(ivf_workspace,
                                                                       multilayer_workspace):
    from explainer.concepts import get_context

    ctx = get_context(ivf_workspace, "cpu")
    base = get_context(multilayer_workspace, "cpu")
    assert ctx.base_params()["search_index"] == ctx.catalog.index_id(ctx.layer)
    assert "search_index" not in base.base_params()
    assert "search_index" not in ctx.at_layer("layer3.relu_out").base_params()


@pytest.mark.parametrize("argv, needle", [
    (["--index", "hnsw"], "invalid choice"),
    (["--memory-budget", "0"], "must be positive"),
    (["--memory-budget", "lots"], "Cannot read memory size"),
    (["--layer", "nope"], "Layer 'nope' is not in the catalog"),
])
def test_index_command_arguments_are_checked(ivf_workspace, capsys, argv, needle):
    rc = data_index_main(["index", "--workspace", str(ivf_workspace.root), "--quiet", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err
    assert err.count("error:") == 1


def test_a_build_refuses_a_bad_index_request_before_any_work(tmp_path, capsys):
    rc = data_index_main(["build", "--workspace", str(tmp_path / "w"), "--model", "demo",
                          "--images", str(tmp_path), "--memory-budget", "-3GB"])
    assert rc == 2 and "memory" in capsys.readouterr().err.lower()
    assert not (tmp_path / "w").exists()
