"""The one on-disk result cache (under ``ws.cache_dir``): data only, never code.

The one invalidation rule
-------------------------
An entry is used only when its key matches exactly, and every key is the SHA-256 of the
canonical JSON of

- the entry's ``kind`` (``"explain"``, ``"contrast"``, ``"attr"``, ...),
- every parameter that changes the result, as the caller passes them; the explainer includes
  the model spec, the layer and the catalog's identity (its file fingerprint and the id of the
  build that wrote it, so a rebuilt catalog gets new keys),
- :data:`SCHEMA_VERSION` (the layout of the stored files) and
- :func:`code_version` (a hash of the source of ``explorer_core/``, ``data_index/`` and
  ``explainer/`` and of the bundled weights, computed once per process).

So changed parameters, a rebuilt catalog, changed code or another file layout give another key:
a miss, and the result is recomputed. Nothing is ever invalidated in place; stale entries just
stop being looked up (delete ``cache/`` to reclaim the space).

Layout and reading
------------------
An entry is a folder ``cache/<kind>/<key>/`` holding ``key.json`` (kind, key, schema, code
version and the parameters, to inspect a cache by hand) and the caller's files: JSON and
``.npz`` read by :mod:`explorer_core.files` (``allow_pickle=False``, uncompressed members
only). Nothing read from the cache can execute code. A folder whose ``key.json`` is missing,
broken or names another key, or whose files the caller's reader cannot parse (truncated,
corrupt, foreign), is a miss, never an error; the next store replaces it. Files of the old
pickle cache (``*.pkl``) are never read. Entries are written to a temporary folder and renamed
into place when complete, so readers never see half an entry.

:data:`STATS` counts hits, misses and writes per kind (tests prove reuse with it, without
timing anything).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import numpy as np

from .files import atomic_folder, read_json, read_npz, write_json, write_npz

__all__ = ["SCHEMA_VERSION", "CacheStats", "STATS", "code_version", "cache_key", "entry_dir",
           "fetch", "store", "fetch_arrays", "store_arrays", "exists", "reset_stats"]

SCHEMA_VERSION = 2  # 1 was the pickle cache
KEY_FILE = "key.json"
ARRAYS_FILE = "arrays.npz"
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_CODE_PACKAGES = ("explorer_core", "data_index", "explainer")
_STALE_TMP_SECONDS = 3600.0

T = TypeVar("T")


@dataclass
class CacheStats:
    """Per-kind counters of this process: ``hits`` (an entry was used), ``misses`` (absent or
    unreadable), ``writes`` (an entry was stored), ``write_errors`` (storing failed, e.g. a
    read-only workspace; the result was still returned)."""

    hits: int = 0
    misses: int = 0
    writes: int = 0
    write_errors: int = 0


STATS: dict[str, CacheStats] = {}
_STATS_LOCK = threading.Lock()


def _count(kind: str, what: str) -> None:
    with _STATS_LOCK:
        st = STATS.setdefault(kind, CacheStats())
        setattr(st, what, getattr(st, what) + 1)


def reset_stats() -> None:
    """Zero every counter of :data:`STATS`."""
    with _STATS_LOCK:
        STATS.clear()


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """SHA-256 (first 16 hex digits) of the relative paths and bytes of every ``*.py`` file of
    ``explorer_core/``, ``data_index/`` and ``explainer/`` and of the bundled weights
    (``explorer_core/weights/``); computed once per process."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    files = [p for pkg in _CODE_PACKAGES for p in (root / pkg).rglob("*.py")]
    files += [p for p in (root / "explorer_core" / "weights").glob("*") if p.is_file()]
    for p in sorted(files):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _plain(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise TypeError(f"cache parameter of type {type(obj).__name__} is not plain JSON; pass "
                    "str, int, float, bool, None, lists or dicts")


def _key_record(kind: str, params: Mapping[str, Any]) -> dict[str, Any]:
    if not _KIND_RE.match(kind):
        raise ValueError(f"bad cache kind {kind!r}")
    return {"kind": kind, "schema": SCHEMA_VERSION, "code": code_version(), "params": params}


def cache_key(kind: str, params: Mapping[str, Any]) -> str:
    """``<kind>-<first 32 hex digits of the SHA-256 of the canonical JSON of kind, params,
    schema version and code version>`` (see the module docstring)."""
    text = json.dumps(_key_record(kind, params), sort_keys=True, default=_plain,
                      allow_nan=False, separators=(",", ":"))
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"


def entry_dir(root: str | os.PathLike, kind: str, params: Mapping[str, Any]) -> Path:
    """The folder of the entry ``(kind, params)`` under the cache folder ``root``."""
    return Path(root) / kind / cache_key(kind, params)


def fetch(root: str | os.PathLike, kind: str, params: Mapping[str, Any],
          read: Callable[[Path], T]) -> T | None:
    """The cached value of ``(kind, params)``: ``read(folder)`` of its entry folder, or None
    when there is none or when anything about it is wrong (missing or mismatched ``key.json``,
    ``read`` raising on truncated / corrupt / foreign files). Never raises for what it finds on
    disk."""
    folder = entry_dir(root, kind, params)
    key = folder.name
    try:
        stamp = read_json(folder / KEY_FILE, max_bytes=1 << 20)
        if not (isinstance(stamp, dict) and stamp.get("key") == key
                and stamp.get("schema") == SCHEMA_VERSION and stamp.get("code") == code_version()):
            raise ValueError("entry of another key")
        value = read(folder)
    except Exception:  # noqa: BLE001 - whatever is wrong with an entry, it is just a miss
        _count(kind, "misses")
        return None
    _count(kind, "hits")
    return value


def exists(root: str | os.PathLike, kind: str, params: Mapping[str, Any]) -> bool:
    """Whether ``(kind, params)`` has an entry whose ``key.json`` matches (key, schema, code
    version), without reading its files: a cheap check for batch jobs that skip work already
    stored. Its files may still turn out unreadable, which :func:`fetch` treats as a miss. Not
    counted in :data:`STATS`."""
    folder = entry_dir(root, kind, params)
    try:
        stamp = read_json(folder / KEY_FILE, max_bytes=1 << 20)
    except Exception:  # noqa: BLE001 - absent or broken: no entry
        return False
    return (isinstance(stamp, dict) and stamp.get("key") == folder.name
            and stamp.get("schema") == SCHEMA_VERSION and stamp.get("code") == code_version())


def store(root: str | os.PathLike, kind: str, params: Mapping[str, Any],
          write: Callable[[Path], Any]) -> Path | None:
    """Store an entry: ``write(folder)`` fills a temporary folder, ``key.json`` is added and the
    folder is renamed into place (replacing a broken entry of the same key). Returns the entry
    folder, or None when the disk refused (read-only workspace, disk full): caching is then
    skipped, the caller's result stays valid."""
    folder = entry_dir(root, kind, params)
    record = {"key": folder.name, **_key_record(kind, params)}
    try:
        _sweep_stale(folder.parent)
        with atomic_folder(folder) as tmp:
            write(tmp)
            write_json(tmp / KEY_FILE, record)
    except OSError:
        _count(kind, "write_errors")
        return None
    _count(kind, "writes")
    return folder


def fetch_arrays(root: str | os.PathLike, kind: str, params: Mapping[str, Any]
                 ) -> dict[str, np.ndarray] | None:
    """Arrays stored by :func:`store_arrays`, or None (see :func:`fetch`)."""
    return fetch(root, kind, params, lambda d: read_npz(d / ARRAYS_FILE))


def store_arrays(root: str | os.PathLike, kind: str, params: Mapping[str, Any],
                 arrays: Mapping[str, np.ndarray]) -> Path | None:
    """Store numeric arrays as one entry (``arrays.npz``; see :func:`store`)."""
    return store(root, kind, params, lambda d: write_npz(d / ARRAYS_FILE, arrays))


def _sweep_stale(parent: Path) -> None:
    """Delete temporary folders of writers killed more than an hour ago."""
    if not parent.is_dir():
        return
    now = time.time()
    for p in [*parent.glob(".*.tmp"), *parent.glob(".*.old")]:
        try:
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            continue
