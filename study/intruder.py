"""Intruder detection study (paper App. C, Table 5), without any user interface.

A *trial* shows 5 crops: 4 from one concept of a class and 1 (the intruder) from another concept
of the same class, shuffled; the participant picks the intruder. Chance is 1/5 = 20 %.

Storage: one DuckDB file per workspace (``ws.root / "study.duckdb"``)::

    studies(study_id, created, workspace, classes, n_concepts, trials_per_participant, seed,
            token, params, secret)
    study_crops(study_id, class, concept, rank, crop_id)     -- precomputed at creation
    participants(study_id, participant_id, created)
    answers(study_id, participant_id, trial_index, class, concept, intruder_concept,
            crop_ids, intruder_position, chosen_position, correct, answered_at, response_ms)
            UNIQUE (study_id, participant_id, trial_index)

The concept crops are computed once when the study is created (``explain_class`` per class), so a
trial never recomputes anything. A participant's trials are a pure function of the stored crops,
the study seed and the participant id: a returning participant gets the same trials and continues
at the first unanswered one. Every answer is committed the moment it is given; a second answer to
the same trial (a double click, a reload) is ignored, never double-counted.

Participant links are signed: ``?study=<token>&participant=<id>&sig=<sig>``, where ``sig`` is
HMAC-SHA256 of the participant id under the study's server-side ``secret`` (never in a URL),
all 64 hex characters (256 bits). The study token is shared by every participant; the signature
is what stops a participant from answering as another one by editing ``participant=``. Links of
earlier versions carried only 16 hex characters (64 bits); they are refused (the participant
sees "This link is not valid"), and the lead hands out the links the Study page regenerates
(the same participants, their answers kept).
Study files from before the secret existed get the column and a random secret per study when
they are opened (their old unsigned links stop working: hand out the signed ones).

Concurrency: one process-wide connection per file, guarded by a lock; each call uses its own
cursor and holds the lock only for one short statement or transaction. DuckDB allows one writing
process per file, so run the study from one server process.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as _dt
import hashlib
import hmac
import io
import math
import re
import secrets
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from explorer_core.errors import ExplorerError
from explorer_core.progress import ProgressFn, report

__all__ = [
    "STUDY_FILE",
    "CHANCE",
    "CROPS_PER_TRIAL",
    "Study",
    "Trial",
    "AnswerOutcome",
    "AccuracyStat",
    "StudyResults",
    "study_path",
    "create_study",
    "create_study_from_crops",
    "list_studies",
    "get_study",
    "study_by_token",
    "find_study_by_token",
    "ParticipantTaken",
    "register_participant",
    "claim_participant",
    "list_participants",
    "trials_for",
    "answered_indices",
    "next_trial_index",
    "record_answer",
    "answers",
    "study_results",
    "answers_csv",
    "export_answers_csv",
    "wilson_interval",
    "binomial_p_greater",
    "participant_link",
    "participant_sig",
    "verify_participant",
    "parse_participant_ids",
    "participant_links",
    "participant_links_csv",
    "close_all",
]

STUDY_FILE = "study.duckdb"
CROPS_PER_TRIAL = 5
CHANCE = 1.0 / CROPS_PER_TRIAL
_PARTICIPANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.@+-]{0,63}$")
SIG_HEX = 64  # hex characters of the participant link signature: the full HMAC-SHA256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_id VARCHAR PRIMARY KEY,
    created TIMESTAMP NOT NULL,
    workspace VARCHAR NOT NULL,
    classes INTEGER[] NOT NULL,
    n_concepts INTEGER NOT NULL,
    trials_per_participant INTEGER NOT NULL,
    seed BIGINT NOT NULL,
    token VARCHAR NOT NULL UNIQUE,
    params VARCHAR,
    secret VARCHAR
);
CREATE TABLE IF NOT EXISTS study_crops (
    study_id VARCHAR NOT NULL,
    class INTEGER NOT NULL,
    concept INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    crop_id BIGINT NOT NULL,
    PRIMARY KEY (study_id, class, concept, rank)
);
CREATE TABLE IF NOT EXISTS participants (
    study_id VARCHAR NOT NULL,
    participant_id VARCHAR NOT NULL,
    created TIMESTAMP NOT NULL,
    PRIMARY KEY (study_id, participant_id)
);
CREATE TABLE IF NOT EXISTS answers (
    study_id VARCHAR NOT NULL,
    participant_id VARCHAR NOT NULL,
    trial_index INTEGER NOT NULL,
    class INTEGER NOT NULL,
    concept INTEGER NOT NULL,
    intruder_concept INTEGER NOT NULL,
    crop_ids BIGINT[] NOT NULL,
    intruder_position INTEGER NOT NULL,
    chosen_position INTEGER NOT NULL,
    correct BOOLEAN NOT NULL,
    answered_at TIMESTAMP NOT NULL,
    response_ms INTEGER,
    PRIMARY KEY (study_id, participant_id, trial_index)
);
"""


# --------------------------------------------------------------------------------------------
# connections: one per file and process, a lock, a cursor per call


class _Db:
    def __init__(self, path: Path) -> None:
        import duckdb

        self.path = path
        self.lock = threading.RLock()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = duckdb.connect(str(path))
        except duckdb.IOException as exc:
            raise ExplorerError(
                f"Cannot open the study database '{path}': {exc}. Another process (a second "
                "app server or a script) may hold it; stop it and try again") from exc
        with self.lock:
            self.conn.execute(_SCHEMA)
            _migrate(self.conn)

    @contextlib.contextmanager
    def cursor(self) -> Iterator[Any]:
        """A fresh cursor under the file's lock (held only for the ``with`` block)."""
        with self.lock:
            cur = self.conn.cursor()
            try:
                yield cur
            finally:
                cur.close()


def _new_secret() -> str:
    return secrets.token_hex(32)


def _migrate(conn: Any) -> None:
    """Bring an older study file up to the current schema: the per-study link ``secret``
    (column added when missing; every study without one gets a fresh random secret)."""
    conn.execute("ALTER TABLE studies ADD COLUMN IF NOT EXISTS secret VARCHAR")
    missing = conn.execute("SELECT study_id FROM studies WHERE secret IS NULL OR secret = ''"
                           ).fetchall()
    if not missing:
        return
    conn.execute("BEGIN TRANSACTION")
    try:
        for (sid,) in missing:
            conn.execute("UPDATE studies SET secret = ? WHERE study_id = ? AND "
                         "(secret IS NULL OR secret = '')", [_new_secret(), sid])
        conn.execute("COMMIT")
    except Exception:
        conn.execute("ROLLBACK")
        raise


_DBS: dict[str, _Db] = {}
_DBS_LOCK = threading.Lock()


def _db(path: str | Path) -> _Db:
    key = str(Path(path).resolve())
    with _DBS_LOCK:
        db = _DBS.get(key)
        if db is None:
            db = _Db(Path(key))
            _DBS[key] = db
        return db


def close_all() -> None:
    """Close every study connection of this process (tests, clean shutdown)."""
    with _DBS_LOCK:
        for db in _DBS.values():
            with db.lock:
                db.conn.close()
        _DBS.clear()


def study_path(ws_or_root: Any) -> Path:
    """The study database of a workspace (``ws.root / "study.duckdb"``); a folder works too."""
    root = getattr(ws_or_root, "root", ws_or_root)
    return Path(root) / STUDY_FILE


# --------------------------------------------------------------------------------------------
# types


@dataclass(frozen=True)
class Study:
    """A study's record. ``concept_crops[class][concept]`` is the ranked crop id list.
    ``secret`` signs the participant links (server-side only: never shown, never in a URL)."""

    study_id: str
    created: _dt.datetime
    workspace: str
    classes: list[int]
    n_concepts: int
    trials_per_participant: int
    seed: int
    token: str
    path: Path
    params: str = ""
    concept_crops: Mapping[int, Mapping[int, list[int]]] = field(default_factory=dict,
                                                                 repr=False)
    secret: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True)
class Trial:
    """One trial: ``crop_ids[intruder_position]`` is the intruder (from ``intruder_concept``);
    the other four come from ``concept``; all of class ``class_idx``."""

    index: int
    class_idx: int
    concept: int
    intruder_concept: int
    crop_ids: tuple[int, ...]
    intruder_position: int


@dataclass(frozen=True)
class AnswerOutcome:
    """What :func:`record_answer` did: ``stored`` is False when the trial had an answer already
    (then ``correct`` is the stored answer's)."""

    stored: bool
    correct: bool
    trial_index: int


@dataclass(frozen=True)
class AccuracyStat:
    """Intruder detection accuracy with a 95 % Wilson interval and the one-sided exact binomial
    p-value against chance (20 %). Higher accuracy is better."""

    label: str
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    p_value: float
    higher_is_better: bool = True


@dataclass(frozen=True)
class StudyResults:
    overall: AccuracyStat
    per_participant: list[AccuracyStat]
    per_class: list[AccuracyStat]


# --------------------------------------------------------------------------------------------
# statistics


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95 % Wilson score interval for ``k`` successes out of ``n``; ``(0, 1)`` when ``n == 0``."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_p_greater(k: int, n: int, p: float = CHANCE) -> float:
    """One-sided exact binomial test ``P(X >= k)`` for ``X ~ Bin(n, p)``; 1.0 when ``n == 0``."""
    if n <= 0 or k <= 0:
        return 1.0
    from scipy.stats import binom

    return float(binom.sf(k - 1, n, p))


def _stat(label: str, k: int, n: int) -> AccuracyStat:
    lo, hi = wilson_interval(k, n)
    return AccuracyStat(label, n, k, (k / n) if n else float("nan"), lo, hi,
                        binomial_p_greater(k, n))


# --------------------------------------------------------------------------------------------
# creating and reading studies


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC).replace(tzinfo=None)


def _check_concept_crops(concept_crops: Mapping[int, Sequence[Sequence[int]]]) -> None:
    usable = [c for c, concepts in concept_crops.items()
              if sum(len(x) >= CROPS_PER_TRIAL - 1 for x in concepts) >= 2]
    if not usable:
        raise ExplorerError(
            "No class has two concepts with at least 4 crops each, so no trial can be built; "
            "pick other classes or more concepts (n >= 2)")


def create_study_from_crops(path: str | Path, workspace: str,
                            concept_crops: Mapping[int, Sequence[Sequence[int]]], *,
                            n_concepts: int | None = None, trials_per_participant: int = 50,
                            seed: int = 0, params: str = "") -> Study:
    """Create a study from precomputed crops: ``concept_crops[class][k]`` = ranked crop ids of
    concept ``k`` of that class. Returns the stored :class:`Study` (with a fresh link token)."""
    if trials_per_participant < 1 or trials_per_participant > 1000:
        raise ExplorerError("Trials per participant must be between 1 and 1000")
    if not concept_crops:
        raise ExplorerError("Pick at least one class for the study")
    _check_concept_crops(concept_crops)
    n_concepts = n_concepts or max(len(v) for v in concept_crops.values())
    study_id = uuid.uuid4().hex[:12]
    token = secrets.token_urlsafe(9)
    secret = _new_secret()
    created = _now()
    classes = sorted(int(c) for c in concept_crops)
    rows = [(study_id, int(c), int(k), int(r), int(cid))
            for c, concepts in concept_crops.items()
            for k, crops in enumerate(concepts) for r, cid in enumerate(crops)]
    db = _db(path)
    with db.cursor() as cur:
        cur.execute("BEGIN TRANSACTION")
        try:
            cur.execute(f"INSERT INTO studies ({_STUDY_COLS}) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [study_id, created, workspace, classes, int(n_concepts),
                         int(trials_per_participant), int(seed), token, params, secret])
            cur.executemany("INSERT INTO study_crops VALUES (?, ?, ?, ?, ?)", rows)
            cur.execute("COMMIT")
        except Exception:
            cur.execute("ROLLBACK")
            raise
    return get_study(path, study_id)


def create_study(ws: Any, classes: Iterable[int], *, n_concepts: int = 4,
                 trials_per_participant: int = 50, seed: int = 0, m: int = 8,
                 method: str = "deeplift", max_images: int = 500, exclude_target: bool = False,
                 progress: ProgressFn | None = None,
                 explain: Callable[..., Any] | None = None) -> Study:
    """Create a study in ``ws``: explain each class once (``explain_class``) and store the top
    ``m`` crops of each concept, so trials never recompute.

    ``exclude_target`` picks the crops with target-class crops excluded (default: the plain top
    crops, as the paper's visualisations). ``progress`` gets a :class:`Progress` per class.
    ``explain`` replaces :func:`explainer.concepts.explain_class` (tests)."""
    classes = list(dict.fromkeys(int(c) for c in classes))
    if not classes:
        raise ExplorerError("Pick at least one class for the study")
    if not 2 <= n_concepts <= 10:
        raise ExplorerError("An intruder study needs 2 to 10 concepts per class")
    if m < CROPS_PER_TRIAL - 1:
        raise ExplorerError(f"Need at least {CROPS_PER_TRIAL - 1} crops per concept (m >= 4)")
    inner: dict[str, Any] = {}
    if explain is None:
        from explainer.concepts import explain_class

        explain = explain_class
        inner_progress = progress is not None
    else:
        inner_progress = False  # a replacement explain may not take progress=
    concept_crops: dict[int, list[list[int]]] = {}
    for i, cls in enumerate(classes):
        report(progress, "explaining classes", i, len(classes), "classes",
               message=f"class {cls}")
        if inner_progress and progress is not None:
            # the class's own stages (attribution images with rate and ETA), so a study's
            # progress moves within a class, not only between classes
            tag = f"class {i + 1}/{len(classes)} · "
            inner["progress"] = (lambda p, tag=tag, outer=progress:
                                 outer(dataclasses.replace(p, stage=tag + p.stage)))
        exp = explain(ws, cls, n_concepts=n_concepts, method=method, max_images=max_images,
                      seed=seed, m=m, **inner)
        concept_crops[cls] = [[c.crop_id for c in con.top_crops(exclude_target)]
                              for con in exp.concepts]
    report(progress, "storing the study", len(classes), len(classes), "classes")
    params = f"m={m};method={method};max_images={max_images};exclude_target={exclude_target}"
    return create_study_from_crops(study_path(ws), ws.name, concept_crops,
                                   n_concepts=n_concepts,
                                   trials_per_participant=trials_per_participant, seed=seed,
                                   params=params)


def _load_crops(cur: Any, study_id: str) -> dict[int, dict[int, list[int]]]:
    out: dict[int, dict[int, list[int]]] = {}
    for cls, k, cid in cur.execute(
            "SELECT class, concept, crop_id FROM study_crops WHERE study_id = ? "
            "ORDER BY class, concept, rank", [study_id]).fetchall():
        out.setdefault(int(cls), {}).setdefault(int(k), []).append(int(cid))
    return out


_STUDY_COLS = ("study_id, created, workspace, classes, n_concepts, trials_per_participant, "
               "seed, token, params, secret")


def _row_to_study(row: Sequence[Any], path: Path, crops: Mapping) -> Study:
    return Study(row[0], row[1], row[2], [int(c) for c in row[3]], int(row[4]), int(row[5]),
                 int(row[6]), row[7], Path(path), row[8] or "", crops, row[9] or "")


def get_study(path: str | Path, study_id: str) -> Study:
    """The study ``study_id`` stored in ``path``."""
    db = _db(path)
    with db.cursor() as cur:
        row = cur.execute(f"SELECT {_STUDY_COLS} FROM studies WHERE study_id = ?",
                          [study_id]).fetchone()
        if row is None:
            raise ExplorerError(f"No study '{study_id}' in {path}; create one on the study page")
        return _row_to_study(row, Path(path), _load_crops(cur, study_id))


def study_by_token(path: str | Path, token: str) -> Study | None:
    """The study whose participant-link token is ``token``, or None."""
    if not Path(path).is_file():
        return None
    db = _db(path)
    with db.cursor() as cur:
        row = cur.execute(f"SELECT {_STUDY_COLS} FROM studies WHERE token = ?",
                          [token]).fetchone()
        if row is None:
            return None
        return _row_to_study(row, Path(path), _load_crops(cur, row[0]))


def find_study_by_token(token: str, workspaces: Iterable[Any]) -> tuple[Any, Study]:
    """Search the study files of ``workspaces`` for ``token``; ExplorerError when unknown."""
    if not token or not re.fullmatch(r"[A-Za-z0-9_-]{4,64}", token):
        raise ExplorerError("This study link is malformed; ask the study lead for a new link")
    for ws in workspaces:
        p = study_path(ws)
        if p.is_file():
            st = study_by_token(p, token)
            if st is not None:
                return ws, st
    raise ExplorerError("This study link is unknown or the study was removed; ask the study "
                        "lead for a new link")


def list_studies(path: str | Path) -> list[Study]:
    """Every study in ``path``, newest first (without their crops)."""
    if not Path(path).is_file():
        return []
    db = _db(path)
    with db.cursor() as cur:
        rows = cur.execute(f"SELECT {_STUDY_COLS} FROM studies ORDER BY created DESC").fetchall()
    return [_row_to_study(r, Path(path), {}) for r in rows]


# --------------------------------------------------------------------------------------------
# signed participant links


def _secret(study: Study) -> str:
    if study.secret:
        return study.secret
    # a Study built by hand (or before the file was migrated): read the stored secret
    secret = get_study(study.path, study.study_id).secret
    if not secret:
        raise ExplorerError(f"Study '{study.study_id}' has no link secret; reopen the study file")
    return secret


def participant_sig(study: Study, participant_id: str) -> str:
    """The signature of a participant's link: HMAC-SHA256 of the (cleaned) participant id under
    the study's secret, all :data:`SIG_HEX` (64) hex characters."""
    pid = _check_participant(participant_id)
    mac = hmac.new(_secret(study).encode(), pid.encode("utf-8"), hashlib.sha256)
    return mac.hexdigest()[:SIG_HEX]


def verify_participant(study: Study, participant_id: str | None, sig: str | None) -> bool:
    """Whether ``sig`` is the signature of ``participant_id`` in this study (constant-time
    compare). False for a missing or malformed id or signature, never an exception."""
    if not participant_id or not sig or len(sig) != SIG_HEX:
        return False
    try:
        want = participant_sig(study, participant_id)
    except ExplorerError:
        return False
    return hmac.compare_digest(want.encode(), sig.lower().encode("utf-8", "replace"))


def participant_link(study: Study, participant_id: str, base_url: str = "") -> str:
    """The participant's signed URL query (``?study=<token>&participant=<id>&sig=<sig>``),
    after ``base_url``. Only this link opens the participant's trials."""
    from urllib.parse import urlencode

    pid = _check_participant(participant_id)
    q = urlencode({"study": study.token, "participant": pid,
                   "sig": participant_sig(study, pid)})
    return f"{base_url}?{q}"


def parse_participant_ids(text: str) -> tuple[list[str], list[str]]:
    """Participant ids from text, one per line (blank lines skipped, duplicates once):
    ``(valid ids, invalid lines)``."""
    ok: list[str] = []
    bad: list[str] = []
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        try:
            pid = _check_participant(line)
        except ExplorerError:
            bad.append(line.strip())
            continue
        if pid not in ok:
            ok.append(pid)
    return ok, bad


def participant_links(study: Study, participant_ids: Iterable[str], base_url: str = "",
                      register: bool = True) -> list[tuple[str, str]]:
    """``(participant id, signed link)`` for each id; ``register`` records the participants
    first, so nobody can take their names through the open registration form."""
    pids = list(dict.fromkeys(_check_participant(p) for p in participant_ids))
    if register and pids:
        now = _now()
        with _db(study.path).cursor() as cur:
            cur.executemany("INSERT INTO participants VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                            [(study.study_id, pid, now) for pid in pids])
    return [(pid, participant_link(study, pid, base_url)) for pid in pids]


def participant_links_csv(links: Iterable[tuple[str, str]]) -> str:
    """``participant_id,link`` CSV text of :func:`participant_links`' rows."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(("participant_id", "link"))
    w.writerows(links)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# participants and trials


def _check_participant(participant_id: str) -> str:
    pid = (participant_id or "").strip()
    if not _PARTICIPANT_RE.match(pid):
        raise ExplorerError("Participant id must be 1-64 characters: letters, digits, space, "
                            "'_', '.', '@', '+', '-' (starting with a letter or digit)")
    return pid


class ParticipantTaken(ExplorerError):
    """:func:`claim_participant` of a name that is already registered."""


def register_participant(study: Study, participant_id: str) -> str:
    """Record the participant (idempotent); returns the cleaned id."""
    pid = _check_participant(participant_id)
    db = _db(study.path)
    with db.cursor() as cur:
        cur.execute("INSERT INTO participants VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    [study.study_id, pid, _now()])
    return pid


def claim_participant(study: Study, participant_id: str) -> str:
    """Register a NEW participant (self-registration); returns the cleaned id. Raises
    :class:`ParticipantTaken` when the id is registered already (by the lead, or by someone
    else), so nobody takes over another participant's trials by typing their name."""
    pid = _check_participant(participant_id)
    db = _db(study.path)
    with db.cursor() as cur:
        new = cur.execute("INSERT INTO participants VALUES (?, ?, ?) ON CONFLICT DO NOTHING "
                          "RETURNING participant_id", [study.study_id, pid, _now()]).fetchall()
    if not new:
        raise ParticipantTaken(f"This name is taken; use your personal link (ask the study lead "
                               f"for the link of '{pid}'), or pick another name")
    return pid


def list_participants(study: Study) -> list[str]:
    db = _db(study.path)
    with db.cursor() as cur:
        rows = cur.execute("SELECT participant_id FROM participants WHERE study_id = ? "
                           "ORDER BY created, participant_id", [study.study_id]).fetchall()
    return [r[0] for r in rows]


def participant_seed(study_seed: int, participant_id: str) -> int:
    """The participant's trial seed: derived from the study seed and the participant id."""
    h = hashlib.sha256(f"{int(study_seed)}\x00{participant_id}".encode()).digest()
    return int.from_bytes(h[:8], "little")


def trials_for(study: Study, participant_id: str) -> list[Trial]:
    """The participant's ``trials_per_participant`` trials (deterministic).

    Each trial: a random usable class, a random ordered pair (concept, intruder concept), 4 crops
    drawn from the concept's top crops and 1 from the intruder concept's (never one that is also
    among the concept's top crops, when avoidable), placed at a random position."""
    pid = _check_participant(participant_id)
    crops = study.concept_crops or get_study(study.path, study.study_id).concept_crops
    usable: dict[int, list[int]] = {}
    for cls in sorted(crops):
        ks = [k for k in sorted(crops[cls]) if len(crops[cls][k]) >= CROPS_PER_TRIAL - 1]
        if len(ks) >= 2:
            usable[cls] = ks
    if not usable:
        raise ExplorerError("This study has no class with two usable concepts")
    rng = np.random.default_rng(participant_seed(study.seed, pid))
    classes = sorted(usable)
    trials = []
    for i in range(study.trials_per_participant):
        cls = classes[int(rng.integers(len(classes)))]
        a, b = (int(x) for x in rng.choice(usable[cls], size=2, replace=False))
        pool_a = crops[cls][a]
        four = [int(x) for x in rng.choice(pool_a, size=CROPS_PER_TRIAL - 1, replace=False)]
        pool_b = [c for c in crops[cls][b] if c not in set(pool_a)]
        if not pool_b:
            pool_b = [c for c in crops[cls][b] if c not in set(four)] or list(crops[cls][b])
        intruder = int(pool_b[int(rng.integers(len(pool_b)))])
        pos = int(rng.integers(CROPS_PER_TRIAL))
        ids = four[:pos] + [intruder] + four[pos:]
        trials.append(Trial(i, cls, a, b, tuple(ids), pos))
    return trials


def answered_indices(study: Study, participant_id: str) -> set[int]:
    db = _db(study.path)
    with db.cursor() as cur:
        rows = cur.execute("SELECT trial_index FROM answers WHERE study_id = ? AND "
                           "participant_id = ?", [study.study_id, participant_id]).fetchall()
    return {int(r[0]) for r in rows}


def next_trial_index(study: Study, participant_id: str) -> int | None:
    """The first unanswered trial of the participant, or None when all are answered."""
    done = answered_indices(study, participant_id)
    for i in range(study.trials_per_participant):
        if i not in done:
            return i
    return None


def _server_trial(study: Study, participant_id: str, trial: Trial) -> Trial:
    """The study's own trial ``trials_for(study, participant_id)[trial.index]``, after checking
    that ``trial`` (from the client) is exactly it: same class, concepts, crops and intruder
    position. Anything else raises :class:`ExplorerError`."""
    if not isinstance(trial, Trial) or isinstance(trial.index, bool) or not isinstance(
            trial.index, (int, np.integer)):
        raise ExplorerError("This is not a trial of the study; reload the page")
    if not 0 <= int(trial.index) < study.trials_per_participant:
        raise ExplorerError("This trial does not belong to the study; reload the page")
    if len(trial.crop_ids) != CROPS_PER_TRIAL:
        raise ExplorerError(f"A trial shows exactly {CROPS_PER_TRIAL} crops, this one "
                            f"{len(trial.crop_ids)}; reload the page")
    server = trials_for(study, participant_id)[int(trial.index)]
    given = (int(trial.class_idx), int(trial.concept), int(trial.intruder_concept),
             tuple(int(c) for c in trial.crop_ids), int(trial.intruder_position))
    want = (server.class_idx, server.concept, server.intruder_concept, server.crop_ids,
            server.intruder_position)
    if given != want:
        raise ExplorerError(f"Trial {int(trial.index) + 1} is not the one this study shows "
                            f"participant '{participant_id}'; reload the page")
    return server


def record_answer(study: Study, participant_id: str, trial: Trial, chosen_position: int,
                  response_ms: int | None = None) -> AnswerOutcome:
    """Store the answer to ``trial`` now (one committed statement). A repeated answer is
    ignored.

    The given ``trial`` must be the study's own ``trials_for(study, participant_id)
    [trial.index]`` (same class, concepts, crops and positions): a made-up trial, one with
    another number of crops or one of another study or participant raises
    :class:`ExplorerError`. What is stored, correctness included, comes from the server's
    trial, never from the client."""
    pid = _check_participant(participant_id)
    trial = _server_trial(study, pid, trial)
    if isinstance(chosen_position, bool) or not isinstance(chosen_position, (int, np.integer)) \
            or not 0 <= int(chosen_position) < CROPS_PER_TRIAL:
        raise ExplorerError(f"Chosen position must be 0..{CROPS_PER_TRIAL - 1}")
    correct = int(chosen_position) == trial.intruder_position
    db = _db(study.path)
    with db.cursor() as cur:
        cur.execute("INSERT INTO participants VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    [study.study_id, pid, _now()])
        res = cur.execute(
            "INSERT INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING RETURNING correct",
            [study.study_id, pid, trial.index, trial.class_idx, trial.concept,
             trial.intruder_concept, list(trial.crop_ids), trial.intruder_position,
             int(chosen_position), correct, _now(),
             None if response_ms is None else int(response_ms)]).fetchall()
        if res:
            return AnswerOutcome(True, bool(res[0][0]), trial.index)
        old = cur.execute("SELECT correct FROM answers WHERE study_id = ? AND participant_id = ? "
                          "AND trial_index = ?", [study.study_id, pid, trial.index]).fetchone()
    return AnswerOutcome(False, bool(old[0]) if old else correct, trial.index)


# --------------------------------------------------------------------------------------------
# results


_ANSWER_COLS = ("study_id", "participant_id", "trial_index", "class", "concept",
                "intruder_concept", "crop_ids", "intruder_position", "chosen_position",
                "correct", "answered_at", "response_ms")


def answers(study: Study, participant_id: str | None = None) -> list[dict[str, Any]]:
    """Stored answers (all, or one participant's), ordered by participant and trial."""
    db = _db(study.path)
    sql = f"SELECT {', '.join(_ANSWER_COLS)} FROM answers WHERE study_id = ?"
    args: list[Any] = [study.study_id]
    if participant_id is not None:
        sql += " AND participant_id = ?"
        args.append(participant_id)
    with db.cursor() as cur:
        rows = cur.execute(sql + " ORDER BY participant_id, trial_index", args).fetchall()
    return [dict(zip(_ANSWER_COLS, r)) for r in rows]


def study_results(study: Study, class_names: Sequence[str] | None = None) -> StudyResults:
    """Accuracy overall, per participant and per class (Wilson 95 % CI, binomial p vs 20 %)."""
    db = _db(study.path)
    with db.cursor() as cur:
        k, n = cur.execute("SELECT coalesce(sum(correct::INT), 0), count(*) FROM answers "
                           "WHERE study_id = ?", [study.study_id]).fetchone()
        per_p = cur.execute("SELECT participant_id, sum(correct::INT), count(*) FROM answers "
                            "WHERE study_id = ? GROUP BY 1 ORDER BY 1",
                            [study.study_id]).fetchall()
        per_c = cur.execute("SELECT class, sum(correct::INT), count(*) FROM answers "
                            "WHERE study_id = ? GROUP BY 1 ORDER BY 1",
                            [study.study_id]).fetchall()

    def cname(c: int) -> str:
        return class_names[c] if class_names and 0 <= c < len(class_names) else f"class {c}"

    return StudyResults(_stat("overall", int(k), int(n)),
                        [_stat(p, int(a), int(b)) for p, a, b in per_p],
                        [_stat(cname(int(c)), int(a), int(b)) for c, a, b in per_c])


def answers_csv(study: Study) -> str:
    """All answers of the study as CSV text (crop ids joined by ';')."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(_ANSWER_COLS)
    for row in answers(study):
        vals = [row[c] for c in _ANSWER_COLS]
        vals[_ANSWER_COLS.index("crop_ids")] = ";".join(str(x) for x in row["crop_ids"])
        vals[_ANSWER_COLS.index("answered_at")] = row["answered_at"].isoformat()
        w.writerow(vals)
    return buf.getvalue()


def export_answers_csv(study: Study, path: str | Path) -> Path:
    """Write :func:`answers_csv` to ``path``."""
    p = Path(path)
    p.write_text(answers_csv(study))
    return p
