"""The run history of a workspace: every explanation, contrast and test the user ran, with its
parameters, kept so that two runs can be compared side by side and exported later.

Storage (inside the workspace folder, nothing outside it):

* ``runs.duckdb``, table ``runs``: ``id`` (1, 2, ...), ``key`` (a digest of the kind and the
  parameters: the same parameters are recorded once), ``kind`` (``explain``, ``contrast``,
  ``stitch``, ``patch``, ``shift``), ``created`` (UTC), ``title``, ``params`` and ``summary``
  (JSON text) and ``folder`` (the result's folder name under ``runs/``).
* ``runs/<key>/``: the result. An explanation or contrast as ``explanation.json`` +
  ``arrays.npz`` (the format of :mod:`explorer_core.results`, what the CLI's ``--out`` writes);
  a test as ``result.json`` + ``arrays.npz``. JSON and pickle-free ``.npz`` only: nothing read
  back can execute code.

Every operation opens the database, runs one short transaction and closes it again, so several
app servers or scripts can share a workspace; when another process holds the file longer than
a few seconds the caller gets an :class:`ExplorerError` saying so (nothing is half written: the
result folder is written before its row, and a row is deleted before its folder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from explorer_core.errors import ExplorerError
from explorer_core.files import atomic_folder, read_json, read_npz, write_json, write_npz
from explorer_core.results import (
    EXPLANATION_JSON,
    Explanation,
    read_explanation,
    save_explanation,
    to_jsonable,
)

__all__ = ["KINDS", "Run", "RunHistory", "run_key", "params_diff", "explanation_summary"]

KINDS = ("explain", "contrast", "stitch", "patch", "shift")
DB_NAME = "runs.duckdb"
FOLDER = "runs"
RESULT_JSON = "result.json"
RESULT_ARRAYS = "arrays.npz"
LOCK_WAIT_S = 5.0  # how long an operation waits for another process's transaction

_SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS run_ids START 1;
CREATE TABLE IF NOT EXISTS runs (
    id BIGINT PRIMARY KEY DEFAULT nextval('run_ids'),
    key VARCHAR UNIQUE NOT NULL,
    kind VARCHAR NOT NULL,
    created TIMESTAMP NOT NULL,
    title VARCHAR NOT NULL,
    params VARCHAR NOT NULL,
    summary VARCHAR NOT NULL,
    folder VARCHAR NOT NULL
);
"""


@dataclass(frozen=True)
class Run:
    """One row of the run history (the result itself: :meth:`RunHistory.result`)."""

    id: int
    key: str
    kind: str
    created: str
    title: str
    params: dict[str, Any]
    summary: dict[str, Any]
    folder: str


def _canonical(obj: Any) -> str:
    return json.dumps(to_jsonable(obj, arrays=True), sort_keys=True, separators=(",", ":"),
                      allow_nan=False, default=str)


def run_key(kind: str, params: Mapping[str, Any]) -> str:
    """The digest that identifies a run: its kind and parameters (same parameters, same key)."""
    return hashlib.sha256(f"{kind}\n{_canonical(dict(params))}".encode()).hexdigest()[:20]


def params_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any, bool]]:
    """``(name, value in a, value in b, differs)`` over the union of both parameter sets,
    names in a's order then b's."""
    names = list(a) + [k for k in b if k not in a]
    return [(k, a.get(k), b.get(k), _canonical(a.get(k)) != _canonical(b.get(k))) for k in names]


def _test_summary(pt: Any) -> dict[str, Any] | None:
    if pt is None:
        return None
    return {"passed": bool(pt.passed), "target": int(pt.target), "prob_target": float(pt.prob_target),
            "predicted": int(pt.predicted), "prob_predicted": float(pt.prob_predicted),
            "crop_ids": [int(i) for i in pt.crop_ids], "score": str(pt.score)}


def explanation_summary(expl: Explanation) -> dict[str, Any]:
    """What the run list shows of an explanation: the tests, the concepts' shares and crops."""
    out: dict[str, Any] = {
        "n_images": len(expl.image_ids), "n_concepts": expl.n_concepts,
        "reconstruction_error": float(expl.reconstruction_error),
        "prediction_test": _test_summary(expl.prediction_test),
        "prediction_test_excluded": _test_summary(expl.prediction_test_excluded),
        "concepts": [{"importance": float(c.importance),
                      "crops": [int(r.crop_id) for r in c.crops],
                      "crops_excluded": [int(r.crop_id) for r in c.crops_excluded]}
                     for c in expl.concepts]}
    if expl.classifier is not None:
        out["classifier_accuracy"] = float(expl.classifier.accuracy)
    return out


def _test_record(result: Any) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """A test result (prediction, patch or shift test) as ``(json record, arrays, summary)``:
    arrays of pixels go to the ``.npz``, everything else (probabilities included) to JSON."""
    arrays: dict[str, np.ndarray] = {}
    record: dict[str, Any] = {"type": type(result).__name__}
    for f in dataclasses.fields(result):
        v = getattr(result, f.name)
        if isinstance(v, np.ndarray) and v.dtype == np.uint8:
            arrays[f.name] = v
        else:
            record[f.name] = to_jsonable(v, arrays=True)
    summary: dict[str, Any] = {}
    for name in ("passed", "prob_target", "predicted", "prob_predicted", "mean_delta_a",
                 "mean_control_delta_a", "mean_delta_b", "default_prob_a", "max_prob_a",
                 "best_offset", "n_images"):
        if hasattr(result, name):
            v = getattr(result, name)
            summary[name] = v.item() if hasattr(v, "item") else v
    for name in ("mean_delta_a", "mean_control_delta_a", "mean_delta_b"):
        if name in summary:
            record[name] = summary[name]
    if "image_ids" in record:
        summary["n_images"] = len(record["image_ids"])
    return record, arrays, summary


class RunHistory:
    """The run history of the workspace folder ``root`` (module docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.db_path = self.root / DB_NAME
        self.folder = self.root / FOLDER

    # ---- the database: one short transaction per call ---------------------------------------

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise ExplorerError(f"The workspace folder '{self.root}' does not exist; open or "
                                "create the workspace first")

    @contextlib.contextmanager
    def _connect(self, write: bool) -> Iterator[Any]:
        import duckdb

        self._check_root()
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                con = duckdb.connect(str(self.db_path))
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise ExplorerError(
                        f"The run history '{self.db_path}' is in use by another process (a "
                        "second app server or a script) or cannot be opened; try again in a "
                        f"moment ({str(exc).splitlines()[0]})") from exc
                time.sleep(0.1)  # another process's short transaction: wait for it to end
        try:
            con.execute(_SCHEMA)
            if write:
                con.execute("BEGIN TRANSACTION")
                try:
                    yield con
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
            else:
                yield con
        finally:
            con.close()

    @staticmethod
    def _row(r: tuple) -> Run:
        return Run(id=int(r[0]), key=str(r[1]), kind=str(r[2]),
                   created=r[3].isoformat(timespec="seconds") if hasattr(r[3], "isoformat")
                   else str(r[3]), title=str(r[4]), params=json.loads(r[5]),
                   summary=json.loads(r[6]), folder=str(r[7]))

    _COLS = "id, key, kind, created, title, params, summary, folder"

    # ---- public API --------------------------------------------------------------------------

    def record(self, kind: str, params: Mapping[str, Any], result: Any, *,
               title: str = "") -> tuple[Run, bool]:
        """Keep ``result`` (an :class:`Explanation` or a test result) with its ``params``;
        returns ``(run, new)``. A run of the same kind and parameters is recorded once:
        recording it again returns the stored run with ``new = False`` and writes nothing."""
        if kind not in KINDS:
            raise ValueError(f"unknown run kind {kind!r}")
        self._check_root()
        params = to_jsonable(dict(params), arrays=True)
        key = run_key(kind, params)
        old = self.find(key)
        if old is not None:
            return old, False
        target = self.folder / key
        try:
            with atomic_folder(target) as tmp:
                if isinstance(result, Explanation):
                    save_explanation(result, tmp)
                    summary = explanation_summary(result)
                else:
                    rec, arrays, summary = _test_record(result)
                    write_npz(tmp / RESULT_ARRAYS, arrays)
                    write_json(tmp / RESULT_JSON, rec)
        except OSError as exc:
            raise ExplorerError(f"Cannot keep the run in '{self.folder}': {exc.strerror or exc}; "
                                "is the workspace folder writable?") from exc
        created = _dt.datetime.now(_dt.UTC).replace(tzinfo=None, microsecond=0)
        with self._connect(write=True) as con:
            con.execute("INSERT INTO runs (key, kind, created, title, params, summary, folder) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
                        [key, kind, created, title or kind, _canonical(params),
                         _canonical(summary), key])
            row = con.execute(f"SELECT {self._COLS} FROM runs WHERE key = ?", [key]).fetchone()
        return self._row(row), True

    def find(self, key: str) -> Run | None:
        """The run recorded under ``key`` (:func:`run_key`), or None."""
        if not self.db_path.is_file():
            return None
        with self._connect(write=False) as con:
            row = con.execute(f"SELECT {self._COLS} FROM runs WHERE key = ?", [key]).fetchone()
        return None if row is None else self._row(row)

    def list_runs(self, kinds: list[str] | None = None, text: str = "", limit: int = 500) -> list[Run]:
        """The runs, newest first; ``kinds`` keeps those kinds, ``text`` those whose title
        contains it (case-insensitive)."""
        if not self.db_path.is_file():
            return []
        sql = f"SELECT {self._COLS} FROM runs WHERE 1 = 1"
        args: list[Any] = []
        if kinds:
            sql += f" AND kind IN ({', '.join('?' for _ in kinds)})"
            args += list(kinds)
        if text.strip():
            sql += " AND title ILIKE ?"
            args.append(f"%{text.strip()}%")
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(int(limit))
        with self._connect(write=False) as con:
            rows = con.execute(sql, args).fetchall()
        return [self._row(r) for r in rows]

    def get(self, run_id: int) -> Run:
        with self._connect(write=False) as con:
            row = con.execute(f"SELECT {self._COLS} FROM runs WHERE id = ?",
                              [int(run_id)]).fetchone()
        if row is None:
            raise ExplorerError(f"There is no run {run_id} in this workspace's history (it may "
                                "have been deleted); pick another run")
        return self._row(row)

    def result(self, run: Run) -> Any:
        """The stored result: an :class:`Explanation`, or a test's JSON record (dict) with its
        uint8 arrays (e.g. ``stitched``) added as arrays."""
        d = self.folder / run.folder
        try:
            if (d / EXPLANATION_JSON).is_file():
                return read_explanation(d)
            rec = read_json(d / RESULT_JSON)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
            rec.update(read_npz(d / RESULT_ARRAYS))
            return rec
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ExplorerError(f"The stored result of run {run.id} ('{d}') cannot be read "
                                f"({exc}); delete the run and run it again") from exc

    def delete(self, run_id: int) -> bool:
        """Delete a run (its row, then its folder); False when there was none."""
        with self._connect(write=True) as con:
            row = con.execute("SELECT folder FROM runs WHERE id = ?", [int(run_id)]).fetchone()
            if row is None:
                return False
            con.execute("DELETE FROM runs WHERE id = ?", [int(run_id)])
        folder = self.folder / str(row[0])
        if folder.parent == self.folder:  # never anything outside runs/
            shutil.rmtree(folder, ignore_errors=True)
        return True
