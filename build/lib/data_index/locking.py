"""The workspace lock: one builder, or any number of readers, across processes.

The lock is an advisory ``flock(2)`` on the workspace folder itself (a file descriptor of the
directory), so it needs no extra file (it works in a workspace the user cannot write), survives
``build --rebuild`` (which deletes ``catalog.duckdb`` and ``index/*`` but never the folder), and
the kernel drops it when the holding process ends, however it ends (``kill -9`` included).

* A build (:func:`~data_index.catalog.build_catalog`, with or without ``rebuild``) holds it
  **exclusive** from before it deletes or writes anything until it has finished.
* A reader (:meth:`~data_index.catalog.Catalog.open`) holds it **shared** while any
  :class:`~data_index.catalog.Catalog` of that workspace is open in its process.

Both are taken without waiting: a conflict raises :class:`ExplorerError` at once, naming who
holds the workspace. ``flock`` locks belong to an open file description, so two opens within one
process conflict like two processes do. Without ``fcntl`` (Windows) locking is a no-op.
"""

from __future__ import annotations

import os
from pathlib import Path

from explorer_core.errors import ExplorerError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["WorkspaceLock", "lock_workspace"]


class WorkspaceLock:
    """A held workspace lock; :meth:`release` (or the end of a ``with`` block) drops it."""

    def __init__(self, root: Path, fd: int | None, exclusive: bool) -> None:
        self.root, self.exclusive = root, exclusive
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and fd >= 0:
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> WorkspaceLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        return f"WorkspaceLock({str(self.root)!r}, {kind}, held={self.held})"


def _try(fd: int, op: int) -> bool:
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def lock_workspace(root: str | os.PathLike, *, exclusive: bool) -> WorkspaceLock:
    """Take the lock of the workspace folder ``root`` (which must exist) without waiting.

    Raises
    ------
    ExplorerError
        When another holder conflicts: for ``exclusive``, any reader or builder; for a shared
        lock, a builder.
    """
    root = Path(root)
    if fcntl is None:  # pragma: no cover - Windows
        return WorkspaceLock(root, -1, exclusive)
    try:
        fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise ExplorerError(f"Cannot open workspace folder '{root}' to lock it: "
                            f"{exc.strerror or exc}") from exc
    if _try(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH):
        return WorkspaceLock(root, fd, exclusive)
    building = not exclusive or not _try(fd, fcntl.LOCK_SH)  # shared works: only readers hold it
    os.close(fd)
    if building:
        raise ExplorerError(f"Workspace '{root}' is in use: a build of its catalog is running in "
                            "another process; wait until it has finished (or stop it), then "
                            "retry")
    raise ExplorerError(f"Workspace '{root}' is in use: another process has its catalog open "
                        "(the app, or an explain / evaluate / search run); close it, then retry")
