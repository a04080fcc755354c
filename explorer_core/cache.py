"""On-disk cache of per-class results under ``ws.cache_dir``.

Keys are the SHA-1 of a canonical JSON of every parameter that changes the result; the key's
parameters are stored next to the value so a cache folder can be inspected. Writes are atomic
(temporary file + rename), so concurrent readers never see half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["cache_key", "load_pickle", "save_pickle", "load_arrays", "save_arrays"]


def cache_key(kind: str, params: dict[str, Any]) -> str:
    """``kind-<sha1 of sorted JSON params>`` (first 20 hex digits)."""
    text = json.dumps({"kind": kind, **params}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha1(text.encode()).hexdigest()[:20]}"


def _path(root: Path, key: str, suffix: str) -> Path:
    return Path(root) / key.split("-", 1)[0] / f"{key}{suffix}"


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
    tmp.replace(path)


def save_pickle(root: Path, key: str, params: dict[str, Any], value: Any) -> Path:
    path = _path(root, key, ".pkl")
    _atomic_write(path, lambda fh: pickle.dump({"params": params, "value": value}, fh,
                                               protocol=pickle.HIGHEST_PROTOCOL))
    return path


def load_pickle(root: Path, key: str) -> Any | None:
    """The stored value, or ``None`` when absent or unreadable (then it is recomputed)."""
    path = _path(root, key, ".pkl")
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)["value"]
    except Exception:  # noqa: BLE001 - a broken cache entry is just a miss
        return None


def save_arrays(root: Path, key: str, params: dict[str, Any], **arrays: np.ndarray) -> Path:
    path = _path(root, key, ".npz")
    meta = np.frombuffer(json.dumps(params, default=str).encode(), dtype=np.uint8)
    _atomic_write(path, lambda fh: np.savez(fh, _params=meta, **arrays))  # type: ignore[arg-type]
    return path


def load_arrays(root: Path, key: str) -> dict[str, np.ndarray] | None:
    path = _path(root, key, ".npz")
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files if k != "_params"}
    except Exception:  # noqa: BLE001
        return None
