"""The catalog on hostile input (issue 8, defects 2-5): file names that are not UTF-8, folders that
cannot be listed, long thin images, truncated index files, a rebuild of a workspace in use by
another process, and over-large search sizes.

Small builds use the bundled demo CNN on a dozen seeded noise images (a few seconds each).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from conftest import SHARED, requires_shared
from PIL import Image

from data_index.catalog import Catalog, build_catalog
from data_index.datasets import ImageFolder, escape_rel, unescape_rel
from data_index.search import CropSearch
from data_index.workspace import Workspace, resolve_workspace
from explorer_core.errors import ExplorerError

ROOT = Path(__file__).resolve().parents[1]
CAFE = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8


def noise_images(folder: Path, n: int, seed: int = 0, size=(120, 100)) -> list[Path]:
    """``n`` seeded noise PNGs ``img_00.png``...; any picture will do for the demo CNN."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        p = folder / f"img_{i:02d}.png"
        Image.fromarray(arr).save(p)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def demo_lm():
    from explorer_core.models import load_model

    return load_model("demo", "cpu")


def _ws(root: Path, lm, images: Path) -> Workspace:
    from explorer_core.demo_cnn import DEMO_LAYER

    return Workspace.create(root, model="demo", layer=DEMO_LAYER, images=str(images),
                            input_size=lm.input_size, device="cpu")


def _stage(p) -> str:
    return getattr(p, "phase", None) or getattr(p, "stage", "")


class Crash(Exception):
    pass


def _crash_after(n_images: int):
    """Kill the build right after the chunk that brings it to ``n_images`` images is saved
    (the report after each saved chunk says so; other reports come per forward batch)."""
    def progress(p) -> None:
        if _stage(p) == "index" and "chunks saved" in p.message and p.done >= n_images:
            raise Crash()
    return progress


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, demo_lm):
    """A complete demo-model workspace over 12 noise images (108 crops)."""
    d = tmp_path_factory.mktemp("tiny")
    noise_images(d / "images", 12)
    ws = _ws(d / "ws", demo_lm, d / "images")
    st = build_catalog(ws, model=demo_lm, batch_size=4)
    assert (st.n_images, st.n_crops) == (12, 108)
    return ws


def _copy_ws(ws: Workspace, dest: Path) -> Workspace:
    shutil.copytree(ws.root, dest, ignore=shutil.ignore_patterns("cache", "*.wal"))
    return Workspace.open(dest)


# ---- defect 2: file names that are not valid UTF-8 ----------------------------------------------

def test_escape_rel_is_reversible_and_leaves_utf8_names_alone():
    cases = {b"caf\xe9.jpg": "caf%E9.jpg", b"sub/\xff\xfe.png": "sub/%FF%FE.png",
             "café.jpg".encode(): "café.jpg", b"50%.jpg": "50%.jpg", b"x%zz%4": "x%zz%4",
             b"%E9.png": "%25E9.png", b"a%25b": "a%2525b"}
    for raw, stored in cases.items():
        rel = os.fsdecode(raw)
        assert escape_rel(rel) == stored
        stored.encode("utf-8")  # storable as text
        assert unescape_rel(stored) == rel and os.fsencode(unescape_rel(stored)) == raw
    rng = np.random.default_rng(0)
    alphabet = list(b"%25E9Faz/.\xe9\xff\xc3\xa9")
    for _ in range(3000):
        raw = bytes(rng.choice(alphabet, size=int(rng.integers(0, 9))).tolist())
        rel = os.fsdecode(raw)
        assert unescape_rel(escape_rel(rel)) == rel


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes")
def test_non_utf8_file_names_are_indexed_resumed_and_read_back(tmp_path, demo_lm):
    d = tmp_path / "imgs"
    noise_images(d, 5)
    os.rename(d / "img_00.png", d / CAFE)  # sorts after img_*: in the second chunk
    os.rename(d / "img_01.png", d / "50%E9.png")  # a UTF-8 name that looks like an escape
    (d / os.fsdecode(b"bad\xff.png")).write_bytes(b"not an image")
    ws = _ws(tmp_path / "ws", demo_lm, d)
    with pytest.raises(Crash):  # killed after the first chunk of 2 images
        build_catalog(ws, model=demo_lm, chunk_size=2, batch_size=2, progress=_crash_after(2))
    st = build_catalog(ws, model=demo_lm, chunk_size=2, batch_size=2)  # resume
    assert st.complete and st.chunks_resumed == 1
    assert (st.n_images, st.n_skipped) == (5, 1)
    with Catalog.open(ws) as cat:
        stored = {cat.image_row(i)["path"]: i for i in cat.image_ids()}
        assert set(stored) == {"50%E9.png", CAFE, "img_02.png", "img_03.png", "img_04.png"}
        con = duckdb.connect(str(ws.catalog_path), read_only=True)
        raw = dict(con.execute("SELECT path, image_id FROM images").fetchall())
        con.close()
        assert "caf%E9.png" in raw and "50%25E9.png" in raw
        i = stored[CAFE]
        assert cat.image_path(i) == d / CAFE and cat.image_path(i).is_file()
        want = demo_lm.geometry(Image.open(d / CAFE).convert("RGB"))
        assert torch.equal(cat.image_pixels([i], demo_lm)[0], want)
        assert torch.equal(cat.crop_pixels([i * 9 + 4], demo_lm)[0], want[:, 32:64, 32:64])
        assert cat.crop_refs([i * 9])[0].path == str(d / CAFE)
        assert cat.skipped() == [("bad%FF.png", "not a decodable image (unknown or broken "
                                                "format)")]
    r = subprocess.run([sys.executable, "-m", "data_index", "search", "--workspace",
                        str(ws.root), "--crop-id", str(i * 9), "-m", "3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "caf\\xe9.png" in r.stdout.splitlines()[1]  # shown escaped, not a crash


# ---- defect 5: folders os.walk cannot list ----------------------------------------------------

def test_unlistable_sub_folder_is_recorded_in_skipped(tmp_path, demo_lm, monkeypatch):
    d = tmp_path / "imgs"
    noise_images(d, 2)
    noise_images(d / "locked", 2, seed=1)
    locked = d / "locked"
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # root reads anyway: make os.walk fail like EACCES does
            real = os.scandir

            def scandir(path=".", *a, **k):
                if Path(os.fsdecode(path)) == locked:
                    raise PermissionError(13, "Permission denied", str(locked))
                return real(path, *a, **k)

            monkeypatch.setattr(os, "scandir", scandir)
        folder = ImageFolder(d)
        assert [e.rel for e in folder] == ["img_00.png", "img_01.png"]
        assert folder.unreadable == [("locked/", "cannot list folder: Permission denied; its "
                                                 "images are not indexed")]
        ws = _ws(tmp_path / "ws", demo_lm, d)
        st = build_catalog(ws, model=demo_lm)
    finally:
        locked.chmod(0o755)
    assert (st.n_images, st.n_skipped) == (2, 1)
    with Catalog.open(ws) as cat:
        assert cat.skipped() == folder.unreadable


def test_unlistable_image_folder_itself_is_a_user_error(tmp_path, monkeypatch):
    noise_images(tmp_path, 1)

    def scandir(path=".", *a, **k):
        raise PermissionError(13, "Permission denied", os.fsdecode(path))

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ExplorerError, match="Cannot list the image folder .*Permission denied"):
        ImageFolder(tmp_path)


# ---- defect 3: long thin images, the pixel limit ------------------------------------------------

def _old_geometry(lm, image: Image.Image) -> torch.Tensor:
    """LoadedModel.geometry before issue 8 (whole image resized, then cropped)."""
    image = image.convert("RGB")
    w, h = image.size
    scale = lm.resize / min(w, h)
    nw, nh = max(lm.input_size, round(w * scale)), max(lm.input_size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), lm.interpolation)
    left, top = (nw - lm.input_size) // 2, (nh - lm.input_size) // 2
    image = image.crop((left, top, left + lm.input_size, top + lm.input_size))
    return torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1).contiguous()


@requires_shared
def test_geometry_is_unchanged_for_the_shared_photos(lite0, demo_lm):
    from data_index.datasets import try_load_rgb

    folder = ImageFolder(SHARED)
    sample = folder.entries[::20] + [e for e in folder.entries if e.rel.endswith(
        ("n01748264.jpg", "n01871265.jpg"))]  # 220x530 and 75x56: tall and tiny
    for lm in (lite0, demo_lm):
        for e in sample:
            img, _ = try_load_rgb(e.path)
            assert torch.equal(lm.geometry(img), _old_geometry(lm, img)), (lm.spec, e.rel)


def test_geometry_of_elongated_images_crops_first_and_matches_up_to_rounding(demo_lm,
                                                                              monkeypatch):
    rng = np.random.default_rng(0)
    for size in ((3000, 40), (40, 2500), (700, 300)):
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        ref = _old_geometry(demo_lm, img)
        monkeypatch.setattr(type(demo_lm), "MAX_RESIZED_PIXELS", 0)  # force the box path
        boxed = demo_lm.geometry(img)
        monkeypatch.undo()
        assert boxed.shape == ref.shape == (3, 96, 96)
        diff = (boxed - ref).abs() * 255
        assert float(diff.max()) <= 2.01 and float(diff.mean()) < 0.5, size


def test_pixel_limit_is_pillows_and_the_readme_says_so():
    from data_index.datasets import MAX_PIXELS

    assert MAX_PIXELS == Image.MAX_IMAGE_PIXELS == 89_478_485
    readme = (ROOT / "README.md").read_text()
    assert "89.5-Mpixel" in readme and "100-Mpixel" not in readme


def write_long_thin_pngs(folder: Path) -> None:
    """A 1 000 000 x 16 px and a 16 x 1 000 000 px PNG (tens of KB each)."""
    folder.mkdir(parents=True, exist_ok=True)
    a = np.zeros((16, 1_000_000, 3), np.uint8)
    a[:, ::7] = 200
    a[:, :, 1] = (np.arange(1_000_000) % 256).astype(np.uint8)
    Image.fromarray(a).save(folder / "wide.png")
    Image.fromarray(np.ascontiguousarray(a.transpose(1, 0, 2))).save(folder / "tall.png")


_PEAK_SCRIPT = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, sys.argv[3])
    from data_index.catalog import build_catalog
    from data_index.workspace import Workspace
    from explorer_core.demo_cnn import DEMO_LAYER
    from explorer_core.models import load_model
    lm = load_model("demo", "cpu")
    ws = Workspace.create(sys.argv[2], model="demo", layer=DEMO_LAYER, images=sys.argv[1],
                          input_size=lm.input_size, device="cpu")
    st = build_catalog(ws, model=lm)
    try:  # this program's own peak: ru_maxrss would start at the forking parent's size
        with open("/proc/self/status") as f:
            kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
    except OSError:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(st.n_images, st.n_skipped, kb // 1024)
""")


def test_build_over_long_thin_images_stays_under_1gb(tmp_path):
    write_long_thin_pngs(tmp_path / "imgs")
    r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "imgs"),
                        str(tmp_path / "ws"), str(ROOT)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    n_images, n_skipped, peak_mb = map(int, r.stdout.split())
    assert (n_images, n_skipped) == (2, 0)  # indexed, not dodged by skipping
    assert peak_mb < 1024, f"peak RSS {peak_mb} MB"


# ---- defect 4: the workspace lock ---------------------------------------------------------------

_READER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from data_index.catalog import Catalog
    cat = Catalog.open(sys.argv[1])
    print("open", cat.n_crops, flush=True)
    sys.stdin.read()  # until the test closes our stdin
    cat.close()
""")

_BUILDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[3])
    from data_index.catalog import build_catalog
    from data_index.workspace import Workspace
    def progress(p):
        if "chunks saved" not in p.message:
            return
        print("building", flush=True)
        time.sleep(600)  # hold the build (and its lock) until the test kills us
    build_catalog(Workspace.open(sys.argv[1]), chunk_size=int(sys.argv[2]), progress=progress)
""")


def _start(script: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", script, *args, str(ROOT)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        proc.kill()
        raise AssertionError(f"helper process failed: {proc.stderr.read() if proc.stderr else ''}")
    return proc


def _files(ws: Workspace) -> dict[str, tuple[int, int]]:
    paths = [ws.catalog_path, *sorted(ws.index_dir.iterdir())]
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_index", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_rebuild_is_refused_while_another_process_reads_the_catalog(tiny, tmp_path, demo_lm):
    ws = _copy_ws(tiny, tmp_path / "ws")
    before = _files(ws)
    reader = _start(_READER, str(ws.root))
    try:
        with pytest.raises(ExplorerError, match="in use: another process has its catalog open"):
            build_catalog(ws, model=demo_lm, rebuild=True)
        r = _cli("build", "--workspace", str(ws.root), "--rebuild", "--quiet")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: Workspace ")
        assert _files(ws) == before  # nothing deleted, nothing rewritten
        # a plain build of the complete catalog only reads it: fine beside a reader
        assert build_catalog(ws, model=demo_lm).already_complete
        with Catalog.open(ws) as cat:  # a second reader is fine too
            assert cat.n_crops == 108
    finally:
        reader.communicate("", timeout=60)
    assert reader.returncode == 0
    st = build_catalog(ws, model=demo_lm, rebuild=True)  # nobody reads it any more
    assert not st.already_complete and st.n_crops == 108


def test_build_running_in_another_process_blocks_rebuild_build_and_readers(tmp_path, demo_lm):
    noise_images(tmp_path / "imgs", 8)
    ws = _ws(tmp_path / "ws", demo_lm, tmp_path / "imgs")
    builder = _start(_BUILDER, str(ws.root), "4")  # sleeping after its first chunk
    try:
        with pytest.raises(ExplorerError, match="a build of its catalog is running"):
            build_catalog(ws, model=demo_lm, rebuild=True)
        with pytest.raises(ExplorerError, match="a build of its catalog is running"):
            build_catalog(ws, model=demo_lm)
        with pytest.raises(ExplorerError, match="a build of its catalog is running"):
            Catalog.open(ws)
        # the running build's files are still there
        assert ws.catalog_path.is_file() and (ws.index_dir / "emb_00000.npy").is_file()
    finally:
        builder.kill()  # kill -9: the kernel drops the lock with the process
        builder.communicate(timeout=60)
    st = build_catalog(ws, model=demo_lm, chunk_size=4)
    assert st.complete and st.chunks_resumed == 1 and st.n_crops == 72


def test_readers_in_one_process_share_the_lock_and_the_last_close_releases_it(tiny, tmp_path,
                                                                              demo_lm):
    ws = _copy_ws(tiny, tmp_path / "ws")
    a, b = Catalog.open(ws), Catalog.open(ws)
    a.close()
    a.close()  # idempotent: does not release b's share
    probe = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[2])
        from data_index.locking import lock_workspace
        from explorer_core.errors import ExplorerError
        try:
            lock_workspace(sys.argv[1], exclusive=True)
            print("free")
        except ExplorerError as exc:
            print("busy", exc)
    """), str(ws.root), str(ROOT)], capture_output=True, text=True, timeout=60)
    assert probe.stdout.startswith("busy") and "catalog open" in probe.stdout
    b.close()
    probe = subprocess.run(probe.args, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "free"


# ---- defect 5: truncated index files ------------------------------------------------------------

def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("name", ["emb-00000.npy", "ids.npy", "norms.npy"])
def test_truncated_index_file_names_the_file_and_the_rebuild(tiny, tmp_path, name):
    # catalog v2: a layer's embeddings are a store (index/<layer>/emb-*.npy, ids.npy,
    # norms.npy), no more index/embeddings.npy + flat.faiss
    from explorer_core.demo_cnn import DEMO_LAYER

    ws = _copy_ws(tiny, tmp_path / "ws")
    _truncate(ws.layer_dir(DEMO_LAYER) / name)
    with pytest.raises(ExplorerError) as info:  # header and size checks: no data read
        Catalog.open(ws)
    msg = str(info.value)
    assert f"index/{DEMO_LAYER}/{name}" in msg and "truncated" in msg
    assert f"python -m data_index build --workspace {ws.root} --rebuild" in msg
    r = _cli("search", "--workspace", str(ws.root), "--crop-id", "0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: ") and name in r.stderr


def test_store_file_cut_by_a_few_bytes_is_refused_at_open(tiny, tmp_path):
    from explorer_core.demo_cnn import DEMO_LAYER

    ws = _copy_ws(tiny, tmp_path / "ws")
    path = ws.layer_dir(DEMO_LAYER) / "emb-00000.npy"
    path.write_bytes(path.read_bytes()[:-16])  # one row short of a few bytes: not read as garbage
    with pytest.raises(ExplorerError, match=r"emb-00000\.npy is truncated.*--rebuild"):
        Catalog.open(ws)


def test_truncated_chunk_file_stops_the_resume_with_the_rebuild_command(tmp_path, demo_lm):
    noise_images(tmp_path / "imgs", 6)
    ws = _ws(tmp_path / "ws", demo_lm, tmp_path / "imgs")
    with pytest.raises(Crash):
        build_catalog(ws, model=demo_lm, chunk_size=2, progress=_crash_after(4))
    _truncate(ws.index_dir / "emb_00000.npy", 0.7)
    with pytest.raises(ExplorerError, match="emb_00000.npy .*truncated.*--rebuild"):
        build_catalog(ws, model=demo_lm, chunk_size=2)
    st = build_catalog(ws, model=demo_lm, chunk_size=2, rebuild=True)
    assert st.complete and st.n_crops == 54


# ---- defect 5: sizes and paths in the library ----------------------------------------------------

def test_search_m_is_capped_at_the_number_of_crops(tiny):
    with Catalog.open(tiny) as cat:
        search = CropSearch(cat, "flat")
        ids, emb = cat.embeddings()
        scores, found = search.search_ids(np.asarray(emb[:1]), m=10**7)
        assert found.shape == (1, 108) and set(found[0].tolist()) == set(ids.tolist())
        assert len(search.search(np.asarray(emb[:1]), m=10**7)[0]) == 108


def test_library_size_and_path_checks(tiny, tmp_path, demo_lm):
    for kw in ({"batch_size": 0}, {"chunk_size": 0}, {"limit": 0}, {"limit": -3}):
        with pytest.raises(ExplorerError, match="use at least 1"):
            build_catalog(tiny, model=demo_lm, **kw)
    with Catalog.open(tiny) as cat:
        with pytest.raises(ExplorerError, match="Export to '/proc/x.csv'"):
            cat.export("meta", "/proc/x.csv")
        (tmp_path / "dir.csv").mkdir()
        with pytest.raises(ExplorerError, match="is a folder"):
            cat.export("meta", tmp_path / "dir.csv")
    with pytest.raises(ExplorerError, match="not valid UTF-8"):
        resolve_workspace(os.fsdecode(b"/tmp/caf\xe9-ws"))
    with pytest.raises(ExplorerError, match="image folder .* not valid UTF-8"):
        _ws(tmp_path / "w8", demo_lm, Path(os.fsdecode(b"/tmp/imgs\xe9")))

