"""The result cache (explorer_core.cache): one key rule, data files only, broken entries are
misses; on the demo workspace: a planted pickle is never executed and a rebuilt catalog never
serves an old entry. Reuse is proven by counting calls, never by timing."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from explorer_core import cache as C
from explorer_core.files import atomic_folder, read_npz, write_npz


class _Evil:
    """Unpickling this creates ``marker`` (what an attacker's pickle would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"value": _Evil(marker)})


def _evil_npz(path: Path, marker: Path) -> None:
    """An .npz whose member is an object array (its data is a pickle)."""
    with open(path, "wb") as fh:
        np.savez(fh, acts=np.array([_Evil(marker)], dtype=object))


# --------------------------------------------------------------------------------------------
# unit tests of the cache and the file helpers


def test_key_is_kind_params_schema_and_code(monkeypatch):
    p = {"model": "demo", "layer": "l", "catalog": "fp|crop|b1", "n": 4}
    k = C.cache_key("explain", p)
    assert k.startswith("explain-") and len(k) == len("explain-") + 32
    assert C.cache_key("explain", dict(reversed(list(p.items())))) == k  # canonical JSON
    assert C.cache_key("contrast", p) != k
    assert C.cache_key("explain", {**p, "n": 5}) != k
    assert C.cache_key("explain", {**p, "catalog": "fp|crop|b2"}) != k  # a rebuilt catalog
    assert C.cache_key("explain", {**p, "n": np.int64(4)}) == k
    monkeypatch.setattr(C, "SCHEMA_VERSION", C.SCHEMA_VERSION + 1)
    assert C.cache_key("explain", p) != k
    monkeypatch.undo()
    monkeypatch.setattr(C, "code_version", lambda: "0" * 16)
    assert C.cache_key("explain", p) != k
    with pytest.raises(TypeError):
        C.cache_key("explain", {"x": object()})
    with pytest.raises(ValueError):
        C.cache_key("../x", p)


def test_code_version_hashes_the_source(tmp_path):
    v = C.code_version()
    assert len(v) == 16 and v == C.code_version()
    root = Path(C.__file__).resolve().parents[1]
    h = hashlib.sha256()
    files = [p for pkg in ("explorer_core", "data_index", "explainer")
             for p in (root / pkg).rglob("*.py")]
    files += [p for p in (root / "explorer_core" / "weights").glob("*") if p.is_file()]
    for p in sorted(files):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    assert h.hexdigest()[:16] == v
    assert any(p.name == "concepts.py" for p in files) and any(p.suffix == ".pt" for p in files)


def test_store_fetch_and_stats(tmp_path):
    C.reset_stats()
    p = {"a": 1}
    arrays = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "ids": np.array([5, 6])}
    assert C.fetch_arrays(tmp_path, "attr", p) is None
    folder = C.store_arrays(tmp_path, "attr", p, arrays)
    assert folder == C.entry_dir(tmp_path, "attr", p) and folder.is_dir()
    assert sorted(f.name for f in folder.iterdir()) == ["arrays.npz", "key.json"]
    stamp = json.loads((folder / "key.json").read_text())
    assert stamp == {"key": folder.name, "kind": "attr", "schema": C.SCHEMA_VERSION,
                     "code": C.code_version(), "params": p}
    got = C.fetch_arrays(tmp_path, "attr", p)
    assert got is not None and set(got) == {"x", "ids"}
    assert np.array_equal(got["x"], arrays["x"]) and got["x"].dtype == np.float32
    assert C.STATS["attr"] == C.CacheStats(hits=1, misses=1, writes=1, write_errors=0)
    # no temporary folder is left beside the entry
    assert [f.name for f in folder.parent.iterdir()] == [folder.name]


def _broken_variants(folder: Path, marker: Path) -> list:
    good = (folder / "arrays.npz").read_bytes()
    stamp = (folder / "key.json").read_text()

    def truncated():
        (folder / "arrays.npz").write_bytes(good[:len(good) // 2])

    def garbage():
        (folder / "arrays.npz").write_bytes(os.urandom(300))

    def pickled():
        (folder / "arrays.npz").write_bytes(_evil_pickle(marker))

    def object_array():
        _evil_npz(folder / "arrays.npz", marker)

    def compressed():
        with open(folder / "arrays.npz", "wb") as fh:
            np.savez_compressed(fh, x=np.zeros(10, np.float32))

    def other_key():
        (folder / "arrays.npz").write_bytes(good)
        (folder / "key.json").write_text(stamp.replace(folder.name, "attr-" + "0" * 32))

    def other_code():
        (folder / "key.json").write_text(stamp.replace(C.code_version(), "f" * 16))

    def no_stamp():
        (folder / "key.json").unlink()

    def stamp_garbage():
        (folder / "key.json").write_bytes(b"\xff\x00[[[")

    return [truncated, garbage, pickled, object_array, compressed, other_key, other_code,
            no_stamp, stamp_garbage]


def test_broken_entries_are_misses_never_errors(tmp_path):
    marker = tmp_path / "EXECUTED"
    root = tmp_path / "cache"
    p = {"a": 1}
    arrays = {"x": np.ones((2, 3), np.float32)}
    for breaker in _broken_variants(C.store_arrays(root, "attr", p, arrays), marker):
        C.store_arrays(root, "attr", p, arrays)
        assert C.fetch_arrays(root, "attr", p) is not None
        breaker()
        assert C.fetch_arrays(root, "attr", p) is None, breaker.__name__
        assert not marker.exists(), breaker.__name__
    # a file where the entry folder belongs: a miss, and the next store replaces it
    folder = C.entry_dir(root, "attr", p)
    shutil.rmtree(folder)
    folder.write_bytes(_evil_pickle(marker))
    assert C.fetch_arrays(root, "attr", p) is None
    assert C.store_arrays(root, "attr", p, arrays) == folder and folder.is_dir()
    assert np.array_equal(C.fetch_arrays(root, "attr", p)["x"], arrays["x"])
    assert not marker.exists()


def test_read_npz_refuses_what_could_run_code_or_expand(tmp_path):
    marker = tmp_path / "EXECUTED"
    _evil_npz(tmp_path / "obj.npz", marker)
    with pytest.raises(ValueError):
        read_npz(tmp_path / "obj.npz")
    assert not marker.exists()
    # a compressed member could expand far beyond the file's size: refused
    with open(tmp_path / "bomb.npz", "wb") as fh:
        np.savez_compressed(fh, x=np.zeros(10_000_000, np.uint8))
    assert os.path.getsize(tmp_path / "bomb.npz") < 100_000
    with pytest.raises(ValueError, match="not a stored .npy"):
        read_npz(tmp_path / "bomb.npz")
    with pytest.raises(TypeError):
        write_npz(tmp_path / "o.npz", {"x": np.array([object()])})
    write_npz(tmp_path / "ok.npz", {"x": np.arange(3, dtype=np.int64)})
    assert np.array_equal(read_npz(tmp_path / "ok.npz")["x"], [0, 1, 2])


def test_unwritable_cache_is_skipped_not_raised(tmp_path):
    C.reset_stats()
    root = tmp_path / "cache"
    root.write_text("a file where the cache folder should be")
    assert C.store_arrays(root, "attr", {"a": 1}, {"x": np.zeros(2)}) is None
    assert C.STATS["attr"].write_errors == 1


def test_atomic_folder_keeps_the_old_folder_when_writing_fails(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out) as d:
        (d / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as d:
            (d / "a.txt").write_text("two, half")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    with atomic_folder(out) as d:
        (d / "b.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------------------------
# the explainer's use of the cache, on the demo world


@pytest.fixture
def attribution_calls(monkeypatch):
    """Counts calls of the attribution (``explainer.concepts.attribute_checked``)."""
    import explainer.concepts as concepts

    calls = []
    real = concepts.attribute_checked

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(concepts, "attribute_checked", counting)
    return calls


def _linked_copy(src: Path, dst: Path) -> Path:
    """A workspace folder sharing ``src``'s catalog, index and images, with its own cache."""
    dst.mkdir(parents=True)
    shutil.copy(src / "workspace.toml", dst / "workspace.toml")
    for name in ("catalog.duckdb", "index", "world"):
        (dst / name).symlink_to(src / name)
    return dst


def _old_pickle_key(kind: str, params: dict) -> str:
    """The key the removed pickle cache used for ``params``."""
    text = json.dumps({"kind": kind, **params}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha1(text.encode()).hexdigest()[:20]}"


def test_planted_pickles_are_never_executed(demo_workspace, tmp_path, attribution_calls):
    from data_index.workspace import Workspace
    from explainer.concepts import explain_class, get_context

    ws = Workspace.open(_linked_copy(demo_workspace.root, tmp_path / "ws"))
    ctx = get_context(ws, "cpu")
    kw = dict(n_concepts=3, method="grad_x_act", max_images=20, seed=0)
    clean = explain_class(ctx, "lupo", **kw)
    assert len(attribution_calls) == 1
    marker = tmp_path / "EXECUTED"
    # the attacker's files: pickles where the old cache looked (the explanation's params are
    # its cache parameters) ...
    (ws.cache_dir / "explain" / (_old_pickle_key("explain", clean.params) + ".pkl")).write_bytes(
        _evil_pickle(marker))
    (ws.cache_dir / "evil.pkl").write_bytes(_evil_pickle(marker))
    # ... and inside the entries of the new cache (a pickle as arrays.npz, an object array)
    explain_entry = C.entry_dir(ws.cache_dir, "explain", clean.params)
    attr_entry = next(p for p in (ws.cache_dir / "attr").iterdir() if p.is_dir())
    (explain_entry / "arrays.npz").write_bytes(_evil_pickle(marker))
    (explain_entry / "explanation.pkl").write_bytes(_evil_pickle(marker))
    _evil_npz(attr_entry / "arrays.npz", marker)

    again = explain_class(ctx, "lupo", **kw)
    assert not marker.exists()
    assert len(attribution_calls) == 2  # both entries were misses: recomputed
    assert np.array_equal(again.concept_vectors, clean.concept_vectors)
    assert np.array_equal(again.heatmaps, clean.heatmaps)
    assert [c.crops for c in again.concepts] == [c.crops for c in clean.concepts]
    # the broken entries were replaced by good ones: the next call is a hit
    C.reset_stats()
    explain_class(ctx, "lupo", **kw)
    assert len(attribution_calls) == 2 and C.STATS["explain"].hits == 1
    assert not marker.exists()


def test_rebuilt_catalog_never_serves_an_old_entry(demo_workspace, tmp_path, monkeypatch,
                                                   attribution_calls):
    """A tiny catalog (40 demo images), explained, rebuilt, explained again: recomputed. Both
    builds stamp the same ``built_at`` (as two builds within one second would)."""
    import data_index.catalog as catalog_mod
    from data_index.catalog import Catalog, build_catalog
    from data_index.workspace import Workspace
    from explainer.concepts import explain_class, get_context
    from explorer_core.demo_cnn import DEMO_INPUT_SIZE, DEMO_LAYER
    from explorer_core.models import load_model

    gallery = demo_workspace.images_path
    images = tmp_path / "images"
    images.mkdir()
    for cls in ("lupo", "husko"):
        for p in sorted((gallery / cls).glob("*.png"))[:20]:
            shutil.copy(p, images / f"{cls}_{p.name}")
    lm = load_model("demo", "cpu")
    ws = Workspace.create(tmp_path / "tiny", model="demo", layer=DEMO_LAYER,
                          images=str(images), input_size=DEMO_INPUT_SIZE, device="cpu")
    monkeypatch.setattr(catalog_mod.time, "strftime", lambda *a: "2026-01-01T00:00:00")
    build_catalog(ws, model=lm, batch_size=64)
    counts = Catalog.open(ws).predicted_counts()
    cls = max(counts, key=lambda c: (counts[c], -c))
    kw = dict(n_concepts=2, method="grad_x_act", max_images=10, m=4)
    first = explain_class(get_context(ws, "cpu"), cls, **kw)
    explain_class(get_context(ws, "cpu"), cls, **kw)
    assert len(attribution_calls) == 1  # the second call was served by the cache
    old_catalog = first.params["catalog"]

    build_catalog(ws, model=lm, batch_size=64, rebuild=True)
    ctx = get_context(ws, "cpu")
    assert ctx.catalog.meta["built_at"] == "2026-01-01T00:00:00"
    second = explain_class(ctx, cls, **kw)
    assert len(attribution_calls) == 2, "a rebuilt catalog served a cached result"
    assert second.params["catalog"] != old_catalog
    assert np.allclose(second.concept_vectors, first.concept_vectors, atol=1e-5)
