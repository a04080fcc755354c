"""Files that carry data, never code: JSON and uncompressed ``.npz``, written atomically.

Everything the explorer stores for later (the result cache, the command line's output folders)
goes through these helpers, so one place decides what a file may contain when it is read back:

- :func:`read_npz` reads an ``.npz`` with ``np.load(..., allow_pickle=False)`` (an object array,
  which would need pickle, is refused) and only when every member is an uncompressed (stored)
  ``.npy``: the arrays it returns never take more memory than the file's size on disk, so a
  small crafted file cannot expand into gigabytes.
- :func:`read_json` reads a JSON file of at most ``max_bytes`` bytes.
- :func:`atomic_folder` builds a folder under a temporary sibling name and renames it into
  place only when it is complete; :func:`atomic_write_bytes` does the same for one file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

__all__ = ["read_npz", "write_npz", "read_json", "write_json", "atomic_write_bytes",
           "atomic_folder", "replace_folder", "MAX_JSON_BYTES"]

MAX_JSON_BYTES = 64 * 2**20  # 64 MiB: far above any record the explorer writes
_ARRAY_KINDS = "biuf"  # bool, signed / unsigned integers, floats: no objects, no structs


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling file and a rename, so a reader
    sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as JSON (indented, UTF-8, standard JSON: no NaN), written atomically."""
    text = json.dumps(obj, indent=1, allow_nan=False, ensure_ascii=False)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in ``path``; ``ValueError`` when the file is larger than ``max_bytes``
    or not valid JSON (``OSError`` when it cannot be read)."""
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path} is larger than {max_bytes} bytes")
    return json.loads(data.decode("utf-8"))


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """Save ``arrays`` (numeric or bool only) as an uncompressed ``.npz``, atomically."""
    path = Path(path)
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray) or a.dtype.kind not in _ARRAY_KINDS:
            raise TypeError(f"array '{name}': only numeric / bool ndarrays are stored, got "
                            f"{type(a).__name__} {getattr(a, 'dtype', '')}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` written by :func:`write_npz`, loaded into memory.

    Raises ``ValueError`` (or ``OSError`` / ``zipfile.BadZipFile``) for anything else: a
    compressed member, a member that is not ``.npy``, members larger in total than the file, an
    object / structured array (never unpickled: ``allow_pickle=False``) or a truncated file."""
    size = os.path.getsize(path)
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                raise ValueError(f"{path}: member {info.filename!r} is not a stored .npy")
        if sum(i.file_size for i in infos) > size:
            raise ValueError(f"{path}: members are larger than the file")
    out: dict[str, np.ndarray] = {}
    with np.load(path, allow_pickle=False) as data:
        for name in data.files:
            a = data[name]
            if a.dtype.kind not in _ARRAY_KINDS:
                raise ValueError(f"{path}: array '{name}' has dtype {a.dtype}")
            out[name] = a
    return out


def replace_folder(new: Path, target: Path) -> None:
    """Move the complete folder ``new`` to ``target``. An existing ``target`` folder is moved
    aside first and deleted after the rename (a file or link at ``target`` is removed)."""
    if target.is_symlink() or target.is_file():
        target.unlink()
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
        os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        if old is not None and not target.exists():
            os.rename(old, target)  # put the previous one back
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target`` (a hidden ``.<name>.*.tmp``); when
    the ``with`` block ends normally it becomes ``target`` (see :func:`replace_folder`), when it
    raises the temporary folder is deleted and ``target`` is left as it was.

    A process killed inside the block leaves only the hidden temporary folder, never a
    half-written ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    tmp.mkdir()  # the usual permissions (umask), unlike tempfile.mkdtemp's 0700
    try:
        yield tmp
        replace_folder(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
