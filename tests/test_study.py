"""Intruder study storage, trials and statistics (study), no model needed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from types import SimpleNamespace

import duckdb
import numpy as np
import pytest

from explorer_core.errors import ExplorerError
from study import intruder as S


def _crops(n_classes: int = 3, n_concepts: int = 4, m: int = 8) -> dict[int, list[list[int]]]:
    # crop ids encode class/concept/rank so a test can tell where a crop came from
    return {c: [[c * 1000 + k * 100 + r for r in range(m)] for k in range(n_concepts)]
            for c in range(n_classes)}


@pytest.fixture()
def study(tmp_path):
    st = S.create_study_from_crops(tmp_path / "study.duckdb", "ws", _crops(),
                                   trials_per_participant=20, seed=7)
    yield st
    S.close_all()


def test_trials_are_deterministic_and_well_formed(study):
    t1 = S.trials_for(study, "alice")
    t2 = S.trials_for(study, "alice")
    t3 = S.trials_for(study, "bob")
    assert t1 == t2
    assert [t.crop_ids for t in t1] != [t.crop_ids for t in t3]
    assert len(t1) == 20
    for t in t1:
        assert len(t.crop_ids) == 5 and len(set(t.crop_ids)) == 5
        assert t.concept != t.intruder_concept
        for pos, cid in enumerate(t.crop_ids):
            cls, concept = cid // 1000, (cid % 1000) // 100
            assert cls == t.class_idx
            assert concept == (t.intruder_concept if pos == t.intruder_position else t.concept)
    # positions and classes vary
    assert len({t.intruder_position for t in t1}) >= 3
    assert len({t.class_idx for t in t1}) >= 2


def test_answers_are_unique_durable_and_resume(study, tmp_path):
    trials = S.trials_for(study, "alice")
    out = S.record_answer(study, "alice", trials[0], trials[0].intruder_position, 900)
    assert out.stored and out.correct
    dup = S.record_answer(study, "alice", trials[0], (trials[0].intruder_position + 1) % 5, 5)
    assert not dup.stored and dup.correct  # the first answer stands
    S.record_answer(study, "alice", trials[1], (trials[1].intruder_position + 1) % 5)
    assert S.next_trial_index(study, "alice") == 2
    S.close_all()
    # a fresh process (like a restarted server) sees both answers
    con = duckdb.connect(str(tmp_path / "study.duckdb"), read_only=True)
    rows = con.execute("SELECT trial_index, correct, len(crop_ids) FROM answers "
                       "ORDER BY trial_index").fetchall()
    con.close()
    assert rows == [(0, True, 5), (1, False, 5)]
    again = S.study_by_token(tmp_path / "study.duckdb", study.token)
    assert again is not None and S.next_trial_index(again, "alice") == 2
    assert S.trials_for(again, "alice") == trials


def _stored(study) -> list[tuple]:
    return [(a["participant_id"], a["trial_index"], a["correct"], list(a["crop_ids"]),
             a["intruder_position"]) for a in S.answers(study)]


def test_record_answer_refuses_a_made_up_trial(study):
    """The client's trial is checked against the server's: a made-up trial whose 'intruder'
    is wherever the participant clicked is refused, nothing is stored."""
    from dataclasses import replace

    real = S.trials_for(study, "alice")[0]
    wrong = (real.intruder_position + 1) % 5
    forged = [
        replace(real, intruder_position=wrong),  # claims the clicked crop is the intruder
        replace(real, crop_ids=(1, 2, 3, 4, 5)),  # crops the study never showed
        replace(real, crop_ids=real.crop_ids[::-1]),  # the same crops, other positions
        replace(real, class_idx=(real.class_idx + 1) % 3),
        replace(real, concept=real.intruder_concept, intruder_concept=real.concept),
        replace(real, index=1),  # trial 0's content under index 1
        replace(real, index=20), replace(real, index=-1),
    ]
    for t in forged:
        with pytest.raises(ExplorerError, match="not the one|does not belong"):
            S.record_answer(study, "alice", t, wrong)
    with pytest.raises(ExplorerError, match="not a trial"):
        S.record_answer(study, "alice", SimpleNamespace(**vars(real)), wrong)
    assert _stored(study) == []
    # the real trial is stored, with correctness from the server's trial
    out = S.record_answer(study, "alice", real, wrong)
    assert out.stored and not out.correct
    assert _stored(study) == [("alice", 0, False, list(real.crop_ids), real.intruder_position)]


def test_record_answer_refuses_a_seven_crop_trial(study):
    from dataclasses import replace

    real = S.trials_for(study, "alice")[0]
    seven = replace(real, crop_ids=real.crop_ids + (1, 2))
    with pytest.raises(ExplorerError, match="exactly 5 crops, this one 7"):
        S.record_answer(study, "alice", seven, 6)
    with pytest.raises(ExplorerError, match="exactly 5 crops"):
        S.record_answer(study, "alice", seven, real.intruder_position)
    with pytest.raises(ExplorerError, match="Chosen position must be 0..4"):
        S.record_answer(study, "alice", real, 5)
    assert _stored(study) == []


def test_record_answer_refuses_a_trial_of_another_study_or_participant(study, tmp_path):
    other = S.create_study_from_crops(tmp_path / "study.duckdb", "ws", _crops(),
                                      trials_per_participant=20, seed=8)
    theirs = S.trials_for(other, "alice")[0]
    assert theirs != S.trials_for(study, "alice")[0]
    with pytest.raises(ExplorerError, match="not the one this study shows participant 'alice'"):
        S.record_answer(study, "alice", theirs, theirs.intruder_position)
    bobs = S.trials_for(study, "bob")[0]
    with pytest.raises(ExplorerError, match="not the one"):
        S.record_answer(study, "alice", bobs, bobs.intruder_position)
    assert _stored(study) == [] and _stored(other) == []
    assert S.record_answer(other, "alice", theirs, theirs.intruder_position).correct


def test_answer_survives_killed_process(tmp_path):
    path = tmp_path / "study.duckdb"
    st = S.create_study_from_crops(path, "ws", _crops(), trials_per_participant=5, seed=1)
    token = st.token
    S.close_all()
    code = textwrap.dedent(f"""
        import os
        from study import intruder as S
        st = S.study_by_token({str(path)!r}, {token!r})
        t = S.trials_for(st, "p1")[0]
        S.record_answer(st, "p1", t, 0, 10)
        os._exit(9)  # no clean close: the commit must already be durable
    """)
    subprocess.run([sys.executable, "-c", code], check=False, timeout=120)
    st2 = S.study_by_token(path, token)
    assert [a["trial_index"] for a in S.answers(st2)] == [0]


def test_concurrent_writers_one_process(study):
    errors = []

    def worker(pid: str) -> None:
        try:
            for t in S.trials_for(study, pid):
                S.record_answer(study, pid, t, t.intruder_position, 1)
                S.record_answer(study, pid, t, 0, 1)  # double click
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"p{i}",)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(S.answers(study)) == 8 * 20
    res = S.study_results(study)
    assert res.overall.n == 160 and res.overall.correct == 160


def test_statistics():
    lo, hi = S.wilson_interval(77, 100)
    assert lo == pytest.approx(0.67846, abs=1e-4) and hi == pytest.approx(0.84157, abs=1e-4)
    assert S.wilson_interval(0, 0) == (0.0, 1.0)
    # P(X >= 3 | n=5, p=0.2) = 0.05792
    assert S.binomial_p_greater(3, 5) == pytest.approx(0.05792, abs=1e-5)
    assert S.binomial_p_greater(0, 5) == 1.0


def test_results_and_csv(study):
    t = S.trials_for(study, "a")
    S.record_answer(study, "a", t[0], t[0].intruder_position)
    S.record_answer(study, "a", t[1], (t[1].intruder_position + 1) % 5)
    t = S.trials_for(study, "b")
    S.record_answer(study, "b", t[0], t[0].intruder_position)
    res = S.study_results(study, class_names=["x", "y", "z"])
    assert (res.overall.n, res.overall.correct) == (3, 2)
    assert {(p.label, p.n, p.correct) for p in res.per_participant} == {("a", 2, 1),
                                                                          ("b", 1, 1)}
    assert sum(c.n for c in res.per_class) == 3
    assert all(c.label in ("x", "y", "z") for c in res.per_class)
    text = S.answers_csv(study)
    lines = text.strip().splitlines()
    assert lines[0].startswith("study_id,participant_id,trial_index")
    assert len(lines) == 4


def test_bad_inputs(tmp_path, study):
    with pytest.raises(ExplorerError, match="two concepts"):
        S.create_study_from_crops(tmp_path / "x.duckdb", "ws", {0: [[1, 2, 3, 4]]})
    with pytest.raises(ExplorerError, match="Participant id"):
        S.register_participant(study, "")
    with pytest.raises(ExplorerError, match="unknown"):
        S.find_study_by_token("nonexistent", [SimpleNamespace(root=tmp_path)])
    with pytest.raises(ExplorerError, match="malformed"):
        S.find_study_by_token("a b", [])


def test_create_study_uses_explain_once_per_class(tmp_path):
    from explorer_core.results import Concept, CropRef, Explanation

    calls = []

    def fake_explain(ws, cls, **kw):
        calls.append((cls, kw["n_concepts"]))
        concepts = []
        for k in range(kw["n_concepts"]):
            refs = [CropRef(cls * 1000 + k * 100 + r, 0, "p", 0, 0, (0, 0, 1, 1), 0, 1.0, 0, 1.0)
                    for r in range(kw["m"])]
            concepts.append(Concept(k, np.ones(3), 0.25, refs, refs[::-1]))
        return Explanation("demo", "l", cls, None, {}, [], concepts, np.zeros((0, 4, 1, 1)), 0.0)

    ws = SimpleNamespace(root=tmp_path, name="ws")
    st = S.create_study(ws, [2, 5], n_concepts=3, trials_per_participant=4, explain=fake_explain)
    assert calls == [(2, 3), (5, 3)]
    assert sorted(st.concept_crops) == [2, 5]
    assert st.concept_crops[5][1] == [5100 + r for r in range(8)]
    found_ws, found = S.find_study_by_token(st.token, [ws])
    assert found.study_id == st.study_id
    S.close_all()


# ---- signed participant links ------------------------------------------------------------------


def _sig(link: str) -> str:
    from urllib.parse import parse_qs, urlsplit

    q = parse_qs(urlsplit(link).query)
    return q["sig"][0]


def test_signed_links_verify_only_their_participant(study, tmp_path):
    link = S.participant_link(study, "alice", "http://host/")
    assert link.startswith(f"http://host/?study={study.token}&participant=alice&sig=")
    sig = _sig(link)
    assert len(sig) == S.SIG_HEX and sig == S.participant_sig(study, "alice")
    assert study.secret and study.secret not in link  # the secret never leaves the server
    assert S.verify_participant(study, "alice", sig)
    assert S.verify_participant(study, " alice ", sig)  # the same cleaned id as the link's
    # another participant's signature, a tampered one, none at all: refused
    assert not S.verify_participant(study, "bob", sig)
    assert not S.verify_participant(study, "alice", S.participant_sig(study, "bob"))
    assert not S.verify_participant(study, "alice", sig[:-1] + ("0" if sig[-1] != "0" else "1"))
    for bad in ("", None, sig[:8], sig + "0", "é" * S.SIG_HEX):
        assert not S.verify_participant(study, "alice", bad)
    # the full HMAC-SHA256 (256 bits); a link of the old 64-bit form is refused
    import hashlib
    import hmac

    assert S.SIG_HEX == 64 and sig == hmac.new(study.secret.encode(), b"alice",
                                               hashlib.sha256).hexdigest()
    assert not S.verify_participant(study, "alice", sig[:16])
    assert not S.verify_participant(study, "", sig)
    assert not S.verify_participant(study, "no/slash", sig)
    # the same participant id in another study has another signature (a secret per study)
    other = S.create_study_from_crops(tmp_path / "study.duckdb", "ws", _crops(),
                                      trials_per_participant=5, seed=7)
    assert other.secret != study.secret
    assert not S.verify_participant(other, "alice", sig)
    # the secret is stored: a study read back (a restarted server) verifies the same link
    S.close_all()
    again = S.study_by_token(study.path, study.token)
    assert again.secret == study.secret and S.verify_participant(again, "alice", sig)
    assert all(len(s.secret) >= 32 for s in S.list_studies(study.path))
    # a Study without its secret in memory reads it from the file
    from dataclasses import replace

    assert S.participant_sig(replace(again, secret=""), "alice") == sig


def test_claim_participant_refuses_taken_names(study):
    assert S.claim_participant(study, " carol ") == "carol"
    with pytest.raises(S.ParticipantTaken, match="This name is taken; use your personal link"):
        S.claim_participant(study, "carol")
    # names the lead gave links to are registered, so they cannot be claimed either
    links = S.participant_links(study, ["dave", "erin", "dave"], "http://h/")
    assert [p for p, _ in links] == ["dave", "erin"]
    assert all(S.verify_participant(study, p, _sig(link)) for p, link in links)
    for name in ("dave", "erin"):
        with pytest.raises(S.ParticipantTaken):
            S.claim_participant(study, name)
    assert set(S.list_participants(study)) == {"carol", "dave", "erin"}
    text = S.participant_links_csv(links)
    assert text.splitlines()[0] == "participant_id,link"
    assert text.splitlines()[1] == f"dave,{links[0][1]}"
    assert S.parse_participant_ids("a\n\n b \na\nbad/one\n") == (["a", "b"], ["bad/one"])


def test_migration_adds_secrets_to_an_old_study_file(tmp_path):
    """A study.duckdb from before signed links (no ``secret`` column) opens, gets a distinct
    random secret per study, and keeps its studies, participants and answers."""
    path = tmp_path / "study.duckdb"
    con = duckdb.connect(str(path))
    con.execute("""
        CREATE TABLE studies (study_id VARCHAR PRIMARY KEY, created TIMESTAMP NOT NULL,
            workspace VARCHAR NOT NULL, classes INTEGER[] NOT NULL, n_concepts INTEGER NOT NULL,
            trials_per_participant INTEGER NOT NULL, seed BIGINT NOT NULL,
            token VARCHAR NOT NULL UNIQUE, params VARCHAR);
        CREATE TABLE study_crops (study_id VARCHAR NOT NULL, class INTEGER NOT NULL,
            concept INTEGER NOT NULL, rank INTEGER NOT NULL, crop_id BIGINT NOT NULL,
            PRIMARY KEY (study_id, class, concept, rank));
        CREATE TABLE participants (study_id VARCHAR NOT NULL, participant_id VARCHAR NOT NULL,
            created TIMESTAMP NOT NULL, PRIMARY KEY (study_id, participant_id));
    """)
    for sid, token in (("old1", "tok-old-1"), ("old2", "tok-old-2")):
        con.execute("INSERT INTO studies VALUES (?, now(), 'ws', [0], 2, 3, 1, ?, '')",
                    [sid, token])
        con.executemany("INSERT INTO study_crops VALUES (?, 0, ?, ?, ?)",
                        [(sid, k, r, k * 100 + r) for k in range(2) for r in range(4)])
    con.execute("INSERT INTO participants VALUES ('old1', 'alice', now())")
    con.close()

    studies = S.list_studies(path)  # opening the file migrates it
    secrets_ = {s.study_id: s.secret for s in studies}
    assert set(secrets_) == {"old1", "old2"}
    assert all(len(v) >= 32 for v in secrets_.values()) and len(set(secrets_.values())) == 2
    old1 = S.study_by_token(path, "tok-old-1")
    assert S.list_participants(old1) == ["alice"] and len(S.trials_for(old1, "alice")) == 3
    link = S.participant_link(old1, "alice")
    assert S.verify_participant(old1, "alice", _sig(link))
    assert not S.verify_participant(S.study_by_token(path, "tok-old-2"), "alice", _sig(link))
    with pytest.raises(S.ParticipantTaken):
        S.claim_participant(old1, "alice")
    # the secrets are stored once: reopening (a restarted server) keeps them, and the answers
    # table missing from the old file was created
    S.close_all()
    assert {s.study_id: s.secret for s in S.list_studies(path)} == secrets_
    t = S.trials_for(old1, "alice")[0]
    assert S.record_answer(old1, "alice", t, t.intruder_position).stored
    S.close_all()
    con = duckdb.connect(str(path), read_only=True)
    cols = [r[0] for r in con.execute("DESCRIBE studies").fetchall()]
    con.close()
    assert cols[-1] == "secret"
