"""Argument validation of both command lines (issue 8, defect 5): every size, seed and output path
is checked by the parser before any work starts; a bad one is exactly one ``error: ...`` line on
stderr and exit status 2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli import data_index_cmd, explainer_cmd
from cli.args import SEED_MAX

W = "some_ws"  # the parser only resolves the name; nothing is opened


def _bad_inputs(tmp: Path) -> list[tuple[str, list[str], str]]:
    """``(command line, argv, the argument named in the error)``."""
    f = tmp / "a_file"
    ex = ["explain", "--workspace", W, "--class", "1"]
    pt = ["evaluate", "prediction-test", "--workspace", W]
    sh = ["evaluate", "shift-test", "--workspace", W]
    out = ["--out", str(tmp / "o")]
    nonutf8 = os.fsdecode(b"/tmp/caf\xe9")
    return [
        ("data_index", ["build", "--workspace", W, "--batch-size", "0"], "--batch-size"),
        ("data_index", ["build", "--workspace", W, "--batch-size=-4"], "--batch-size"),
        ("data_index", ["build", "--workspace", W, "--batch-size", "many"], "--batch-size"),
        ("data_index", ["build", "--workspace", W, "--limit", "0"], "--limit"),
        ("data_index", ["build", "--workspace", W, "--limit=-1"], "--limit"),
        ("data_index", ["build", "--workspace", nonutf8, "--model", "demo"], "--workspace"),
        ("data_index", ["search", "--workspace", W, "--crop-id", "0", "-m", "0"], "-m"),
        ("data_index", ["search", "--workspace", W, "--crop-id", "0", "-m=-3"], "-m"),
        ("data_index", ["search", "--workspace", W, "--crop-id=-1"], "--crop-id"),
        ("data_index", ["search", "--workspace", W, "--crop-id", str(2**70)], "--crop-id"),
        ("data_index", ["search", "--workspace", W, "--crop-id", "0", "--exclude-class=-1"],
         "--exclude-class"),
        ("data_index", ["status", "--workspace", nonutf8], "--workspace"),
        ("data_index", ["status", "--workspace", "bad name!"], "--workspace"),
        ("data_index", ["export", "--workspace", W, "--table", "meta", "--out", "/proc/x.csv"],
         "--out"),
        ("data_index", ["export", "--workspace", W, "--table", "meta", "--out",
                        str(tmp / "x.txt")], "--out"),
        ("data_index", ["export", "--workspace", W, "--table", "meta", "--out",
                        str(f / "x.csv")], "--out"),
        ("explainer", [*ex, "--seed=-1", *out], "--seed"),
        ("explainer", [*ex, "--seed", str(SEED_MAX + 1), *out], "--seed"),
        ("explainer", [*ex, "--n", "0", *out], "--n"),
        ("explainer", [*ex, "--n", "11", *out], "--n"),
        ("explainer", [*ex, "--max-images", "0", *out], "--max-images"),
        ("explainer", [*ex, "--m", "0", *out], "--m"),
        ("explainer", [*ex, "--m", "1000000000", *out], "--m"),
        ("explainer", [*ex, "--out", str(f)], "--out"),
        ("explainer", [*ex, "--out", str(f / "sub")], "--out"),
        ("explainer", [*ex, "--out", "/proc/x"], "--out"),
        ("explainer", ["contrast", "--workspace", W, "--a", "1", "--b", "2", "--seed=-1", *out],
         "--seed"),
        ("explainer", [*pt, "--every", "0", *out], "--every"),
        ("explainer", [*pt, "--every=-2", *out], "--every"),
        ("explainer", [*pt, "--limit=-1", *out], "--limit"),
        ("explainer", [*pt, "--limit", "0", *out], "--limit"),
        ("explainer", [*pt, "--min-images", "0", *out], "--min-images"),
        ("explainer", [*pt, "--classes", " , ", *out], "--classes"),
        ("explainer", [*pt, "--n", "0", *out], "--n"),
        ("explainer", [*pt, "--seed", str(2**40), *out], "--seed"),
        ("explainer", [*sh, "--pairs", "0", *out], "--pairs"),
        ("explainer", [*sh, "--pairs=-5", *out], "--pairs"),
        ("explainer", [*sh, "--seed", str(SEED_MAX + 1), *out], "--seed"),
        ("explainer", [*sh, "--max-images", "0", *out], "--max-images"),
    ]


_PARSERS = {"data_index": data_index_cmd.build_parser, "explainer": explainer_cmd.build_parser}


def test_every_bad_argument_is_one_error_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    cases = _bad_inputs(tmp_path)
    assert len(cases) >= 35
    for prog, argv, arg in cases:
        with pytest.raises(SystemExit) as info:
            _PARSERS[prog]().parse_args(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2, (prog, argv)
        assert err.count("\n") == 1 and err.startswith(f"error: argument {arg}"), (argv, err)
        assert "usage:" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing was created by the checks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_boundary_values_are_accepted(tmp_path):
    ex = ["explain", "--workspace", W, "--class", "1", "--out", str(tmp_path / "new" / "o")]
    a = explainer_cmd.build_parser().parse_args(
        [*ex, "--seed", str(SEED_MAX), "--n", "10", "--m", "100", "--max-images", "1"])
    assert (a.seed, a.n, a.m, a.max_images) == (SEED_MAX, 10, 100, 1)
    assert a.out == tmp_path / "new" / "o" and not a.out.exists()
    a = explainer_cmd.build_parser().parse_args([*ex, "--seed", "0", "--n", "1"])
    assert (a.seed, a.n) == (0, 1)
    a = explainer_cmd.build_parser().parse_args(
        ["evaluate", "prediction-test", "--workspace", W, "--classes", "tabby, 3,,",
         "--limit", "1", "--out", str(tmp_path)])  # an existing folder is fine
    assert a.classes == ["tabby", "3"] and a.limit == 1
    a = data_index_cmd.build_parser().parse_args(
        ["search", "--workspace", W, "--crop-id", "0", "-m", "1000000000"])
    assert a.m == 10**9  # valid: capped at the number of crops when it runs
    a = data_index_cmd.build_parser().parse_args(
        ["export", "--workspace", W, "--table", "crops", "--out", str(tmp_path / "d" / "c.PQ")])
    assert a.out == tmp_path / "d" / "c.PQ"


def test_main_reports_library_errors_as_one_line(tmp_path, capsys):
    rc = data_index_cmd.main(["status", "--workspace", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: No workspace at") and err.count("\n") == 1
