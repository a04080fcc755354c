"""Catalog build and reader: the shared real-photo catalog, resume after a crash, bad files,
cell-mode alignment."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from conftest import NIPS17, requires_shared
from PIL import Image

import data_index.catalog as catalog_mod
from data_index.catalog import Catalog, build_catalog
from data_index.crops import cell_pool, cell_weights, crop_boxes, cut_crops, split_crop_id
from data_index.store import EmbeddingStore
from data_index.workspace import Workspace
from explorer_core.errors import ExplorerError
from explorer_core.progress import Progress

ROOT = Path(__file__).resolve().parents[1]


# ---- the shared catalog (2000 real photos, crop mode) ----------------------------------------

def test_shared_catalog_counts(lite0_catalog):
    # 2000 photos; two imagenet-samples files are smaller than one 74-px crop (75x56 and
    # 68x121) but above half a crop, so the resize upscales them like any other photo
    st = lite0_catalog.status()
    assert (st["images"], st["crops"], st["skipped"], st["complete"]) == (2000, 18000, 0, True)
    assert lite0_catalog.n_images == 2000 and lite0_catalog.n_crops == 18000
    assert lite0_catalog.skipped() == []
    ids, emb = lite0_catalog.embeddings()
    assert emb.shape == (18000, 1280) and emb.dtype == np.float32 and ids.dtype == np.int64
    assert np.all(np.diff(ids) > 0) and (np.asarray(emb[:100]) >= 0).all()
    image_ids = np.asarray(lite0_catalog.image_ids())
    assert np.array_equal(ids, (image_ids[:, None] * 9 + np.arange(9)).ravel())
    assert sum(lite0_catalog.predicted_counts().values()) == 2000
    a = max(st["predicted_counts"], key=st["predicted_counts"].get)
    got = lite0_catalog.images_predicted_as(a)
    assert got == sorted(got) and len(got) == st["predicted_counts"][a]
    assert all(lite0_catalog.image_row(i)["pred"] == a for i in got)


def test_crop_predictions_and_embeddings_match_a_direct_forward(lite0_catalog, lite0):
    ids, emb = lite0_catalog.embeddings()
    sample = lite0_catalog.random_crop_ids(20, seed=3)
    refs = lite0_catalog.crop_refs(sample)
    assert [r.crop_id for r in refs] == sample  # order preserved
    px = lite0_catalog.crop_pixels(sample, lite0)
    assert px.shape == (20, 3, 74, 74) and 0 <= px.min() and px.max() <= 1
    logits, acts = lite0.logits_and_activations(px, "bn2")
    prob = torch.softmax(logits, 1)
    direct = acts.mean(dim=(2, 3)).numpy()
    for j, r in enumerate(refs):
        image_id, row, col = split_crop_id(r.crop_id)
        assert (r.image_id, r.row, r.col) == (image_id, row, col)
        assert r.box == crop_boxes(224)[row * 3 + col][2]
        assert abs(float(prob[j].max()) - r.crop_conf) < 2e-3
        if float(prob[j].max()) - float(prob[j].topk(2).values[1]) > 1e-3:
            assert int(prob[j].argmax()) == r.crop_pred
        pos = int(np.searchsorted(ids, r.crop_id))  # rows follow crop ids; skipped images leave gaps
        assert ids[pos] == r.crop_id
        np.testing.assert_allclose(emb[pos], direct[j], rtol=1e-3, atol=1e-3)


def test_image_pixels_reproduce_image_predictions(lite0_catalog, lite0):
    image_ids = lite0_catalog.image_ids()[::400]
    px = lite0_catalog.image_pixels(image_ids, lite0)
    assert px.shape == (len(image_ids), 3, 224, 224)
    prob = torch.softmax(lite0.logits(px), 1)
    for j, i in enumerate(image_ids):
        row = lite0_catalog.image_row(i)
        assert int(prob[j].argmax()) == row["pred"]
        assert abs(float(prob[j].max()) - row["conf"]) < 2e-3
        assert Path(row["abs_path"]) == lite0_catalog.image_path(i) and Path(row["abs_path"]).is_file()


def test_random_crops_exports_and_several_readers(lite0_catalog, lite0_workspace, tmp_path):
    a = lite0_catalog.random_crop_ids(50, seed=1)
    assert a == lite0_catalog.random_crop_ids(50, seed=1) != lite0_catalog.random_crop_ids(50, 2)
    cls = max(lite0_catalog.predicted_counts().items(), key=lambda kv: kv[1])[0]
    for r in lite0_catalog.crop_refs(lite0_catalog.random_crop_ids(3000, 0, exclude_class=cls)):
        assert r.crop_pred != cls and r.image_pred != cls
    second = Catalog.open(lite0_workspace)  # several readers in one process
    assert second.n_crops == lite0_catalog.n_crops
    out = lite0_catalog.export("images", tmp_path / "images.csv")
    assert len(out.read_text().splitlines()) == 2001
    pq = second.export("crops", tmp_path / "crops.parquet")
    assert duckdb.sql(f"SELECT count(*) FROM '{pq}'").fetchall()[0][0] == 18000
    with pytest.raises(ExplorerError, match="exportable"):
        lite0_catalog.export("secrets", tmp_path / "x.csv")


def test_cli_status_and_search(lite0_workspace):
    def run(*a):
        return subprocess.run([sys.executable, "-m", "data_index", *a], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    r = run("status", "--workspace", str(lite0_workspace.root))
    assert r.returncode == 0 and "18000" in r.stdout, r.stderr
    r = run("search", "--workspace", str(lite0_workspace.root), "--crop-id", "40", "-m", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()[1:]
    assert len(lines) == 3 and lines[0].split()[1] == "40"  # a crop is its own nearest
    r = run("status", "--workspace", str(lite0_workspace.root / "nope"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


# ---- small builds with a tiny random ResNet18 (fast) ------------------------------------------

@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    import torchvision

    from explorer_core.models import load_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("r18") / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return load_model(f"resnet18:{path}", "cpu")


@pytest.fixture(scope="module")
def photos40(tmp_path_factory, shared_data):
    d = tmp_path_factory.mktemp("photos40")
    for p in sorted((NIPS17 / "images").glob("*.jpg"))[:40]:
        shutil.copy(p, d / p.name)
    return d


def _ws(root, lm, images, mode="crop"):
    return Workspace.create(root, model=lm.spec, layer="layer4.1", images=str(images),
                            input_size=lm.input_size, mode=mode, device="cpu")


def _dump(ws):
    con = duckdb.connect(str(ws.catalog_path), read_only=True)
    try:
        out = {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall()
               for t in ("images", "crops", "skipped")}
        out["chunks"] = con.execute("SELECT chunk_id, n_images FROM chunks ORDER BY 1").fetchall()
        out["meta"] = con.execute("SELECT * FROM meta WHERE key NOT IN "
                                  "('seconds', 'built_at', 'build_id') ORDER BY 1").fetchall()
    finally:
        con.close()
    # catalog v2: one float16 store per layer (index/<layer>/), no index/embeddings.npy
    store = EmbeddingStore.open(ws.layer_dir(ws.layer))
    out["emb"] = np.concatenate([b for _, b in store.blocks()])
    out["ids"] = np.asarray(store.ids)
    return out


@requires_shared
def test_kill_and_resume_equals_clean_build(tmp_path, r18, photos40, monkeypatch):
    clean = _ws(tmp_path / "clean", r18, photos40)
    build_catalog(clean, model=r18, chunk_size=8, batch_size=8)
    ref = _dump(clean)
    assert len(ref["images"]) == 40 and len(ref["crops"]) == 360 and ref["emb"].shape[0] == 360

    ws = _ws(tmp_path / "crashy", r18, photos40)

    class Boom(Exception):
        pass

    def crash_after_two(p: Progress):  # the report after a saved chunk says so
        if p.stage == "index" and "chunks saved" in p.message and p.done >= 16:
            raise Boom()

    with pytest.raises(Boom):  # killed right after chunk 1 committed
        build_catalog(ws, model=r18, chunk_size=8, batch_size=8, progress=crash_after_two)
    with pytest.raises(ExplorerError, match="not complete"):
        Catalog.open(ws)

    real_save = catalog_mod._atomic_save_npy

    def die_after_emb_write(path, arr):  # killed between the embeddings file and the commit
        real_save(path, arr)
        if path.name == "emb_00003.npy":
            raise KeyboardInterrupt()

    monkeypatch.setattr(catalog_mod, "_atomic_save_npy", die_after_emb_write)
    with pytest.raises(KeyboardInterrupt):
        build_catalog(ws, model=r18, chunk_size=8, batch_size=8)
    monkeypatch.setattr(catalog_mod, "_atomic_save_npy", real_save)
    done = duckdb.connect(str(ws.catalog_path), read_only=True)
    assert sorted(r[0] for r in done.execute("SELECT chunk_id FROM chunks").fetchall()) == [0, 1, 2]
    assert done.execute("SELECT count(*) FROM crops").fetchone()[0] == 24 * 9
    done.close()
    (ws.index_dir / "emb_00003.npy").write_bytes(b"garbage")  # a stale partial file is redone

    st = build_catalog(ws, model=r18, chunk_size=8, batch_size=8)
    assert st.chunks_resumed == 3 and st.n_chunks == 5 and st.complete
    got = _dump(ws)
    for key in ("images", "crops", "skipped", "chunks", "meta"):
        if key == "meta":
            assert [r for r in got[key] if r[0] != "images_root"] == \
                [r for r in ref[key] if r[0] != "images_root"]
        else:
            assert got[key] == ref[key], key
    assert np.array_equal(got["ids"], ref["ids"])
    np.testing.assert_allclose(got["emb"], ref["emb"], rtol=1e-5, atol=1e-5)
    assert not list(ws.index_dir.glob("emb_*.npy"))  # chunk files removed once assembled
    again = build_catalog(ws, model=r18, chunk_size=8, batch_size=8)
    assert again.already_complete and again.n_crops == 360


@requires_shared
def test_bad_files_are_skipped_with_reasons_and_convertible_ones_indexed(tmp_path, r18):
    from test_datasets import _huge_png

    d = tmp_path / "imgs"
    d.mkdir()
    photos = sorted((NIPS17 / "images").glob("*.jpg"))[:3]
    for p in photos:
        shutil.copy(p, d / p.name)
    raw = photos[0].read_bytes()
    (d / "trunc.jpg").write_bytes(raw[: len(raw) // 3])
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("hello")
    (d / "notes.txt").write_text("ignored")
    Image.new("RGB", (10, 10)).save(d / "tiny.png")
    _huge_png(d / "huge.png", 20000, 20000)
    src = Image.open(photos[1]).convert("RGB")
    src.convert("L").save(d / "gray.png")
    src.convert("CMYK").save(d / "cmyk.jpg")
    rgba = src.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "rgba.png")
    ws = _ws(tmp_path / "ws", r18, d)
    st = build_catalog(ws, model=r18, batch_size=4)
    assert (st.n_images, st.n_crops, st.n_skipped) == (6, 54, 5)
    cat = Catalog.open(ws)
    reasons = dict(cat.skipped())
    assert set(reasons) == {"trunc.jpg", "zero.jpg", "text.jpg", "tiny.png", "huge.png"}
    assert "too small" in reasons["tiny.png"] and "too large" in reasons["huge.png"]
    assert "empty" in reasons["zero.jpg"] and "not a decodable" in reasons["text.jpg"]
    paths = {cat.image_row(i)["path"] for i in cat.image_ids()}
    assert {"gray.png", "cmyk.jpg", "rgba.png"} <= paths and "notes.txt" not in paths
    cat.close()


def test_open_unbuilt_workspace_says_to_build(tmp_path, r18):
    ws = _ws(tmp_path / "empty", r18, tmp_path)
    with pytest.raises(ExplorerError, match="python -m data_index build"):
        Catalog.open(ws)
    with pytest.raises(ExplorerError, match="No images"):
        build_catalog(ws, model=r18)


# ---- cell mode ---------------------------------------------------------------------------------

def test_cell_pool_of_constant_map_is_the_constant():
    acts = torch.full((2, 5, 7, 7), 3.25)
    assert torch.allclose(cell_pool(acts, 224), torch.full((2, 9, 5), 3.25))
    w = cell_weights(14, 14, 224)
    assert torch.allclose(w.sum(dim=(1, 2)), torch.ones(9, dtype=w.dtype))


def test_cell_pool_area_weights_follow_the_pixel_crops():
    # 7x7 map at 224: feature column j covers pixels [32j, 32j+32); crops are [0,74), [74,148),
    # [148,222): overlaps 32/32/10, 22/32/20, 12/32/30 pixels.
    col = torch.arange(7, dtype=torch.float64).view(1, 1, 1, 7).expand(1, 1, 7, 7)
    pooled = cell_pool(col, 224)[0, :, 0]
    expect = [(0 * 32 + 1 * 32 + 2 * 10) / 74, (2 * 22 + 3 * 32 + 4 * 20) / 74,
              (4 * 12 + 5 * 32 + 6 * 30) / 74]
    for r in range(3):
        for c in range(3):
            assert pooled[r * 3 + c].item() == pytest.approx(expect[c])
    rowmap = col.transpose(2, 3)
    pooled = cell_pool(rowmap, 224)[0, :, 0]
    assert [pooled[r * 3].item() for r in range(3)] == pytest.approx(expect)
    # the misaligned 64-px cells of the authors' scripts would give (0+1)/2 = 0.5 for crop 0
    assert expect[0] != pytest.approx(0.5)


def test_cut_crops_matches_boxes():
    px = torch.rand(2, 3, 224, 224)
    crops = cut_crops(px)
    assert crops.shape == (18, 3, 74, 74)
    for k, (_, _, (x0, y0, x1, y1)) in enumerate(crop_boxes(224)):
        assert torch.equal(crops[9 + k], px[1, :, y0:y1, x0:x1])
    assert crop_boxes(224)[-1][2] == (148, 148, 222, 222)


@requires_shared
def test_cell_mode_build_pools_full_image_activations(tmp_path, r18, photos40):
    ws = _ws(tmp_path / "cell", r18, photos40, mode="cell")
    st = build_catalog(ws, model=r18, limit=6, batch_size=3)
    assert (st.n_images, st.n_crops, st.mode) == (6, 54, "cell")
    cat = Catalog.open(ws)
    refs = cat.crop_refs(range(9, 18))
    assert all(r.crop_pred == -1 and np.isnan(r.crop_conf) for r in refs)  # NULL in cell mode
    assert all(r.image_pred == cat.image_row(1)["pred"] for r in refs)
    px = cat.image_pixels([1], r18)
    _, acts = r18.logits_and_activations(px, "layer4.1")
    ids, emb = cat.embeddings()
    # stored as float16 (catalog v2): equal within its rounding (2**-11 relative)
    np.testing.assert_allclose(emb[9:18], cell_pool(acts, 224)[0].numpy(), rtol=1e-3, atol=1e-3)
    cat.close()


def test_a_moved_workspace_still_finds_its_images(demo_workspace, tmp_path):
    """The demo workspace keeps its images inside (relative path): a copy elsewhere works."""
    from data_index.workspace import Workspace
    from explorer_core.models import load_model

    moved = tmp_path / "moved_demo"
    shutil.copytree(demo_workspace.root, moved, ignore=shutil.ignore_patterns("cache", "*.wal"))
    ws = Workspace.open(moved)
    cat = Catalog.open(ws)
    lm = load_model("demo", "cpu")
    assert str(cat.image_path(cat.image_ids()[0])).startswith(str(moved))
    ids = [0, 4, 8]
    assert torch.equal(cat.crop_pixels(ids, lm), Catalog.open(demo_workspace).crop_pixels(ids, lm))
    cat.close()
