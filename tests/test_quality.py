"""The linter (ruff) and the type checker (mypy) run as part of the test suite, so CI enforces
them; their configuration is in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    r = _run("ruff", "check", "--no-cache", ".")
    assert r.returncode == 0, f"ruff check failed:\n{r.stdout}\n{r.stderr}"


def test_mypy_finds_nothing(tmp_path: Path) -> None:
    r = _run("mypy", "--cache-dir", str(tmp_path / "mypy-cache"))
    assert r.returncode == 0, f"mypy failed:\n{r.stdout}\n{r.stderr}"
    assert "Success" in r.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="git is needed to list tracked files")
def test_no_pickle_in_tracked_code() -> None:
    """Nothing the project reads may execute code: no ``pickle`` / ``torch.load`` without
    ``weights_only=True`` / ``allow_pickle=True`` in the packages, the app or the CLI."""
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split()
    bad = []
    for f in files:
        if f.startswith(("tests/", "bench/")):
            continue
        for i, line in enumerate((ROOT / f).read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if "import pickle" in code or "pickle.load" in code or "allow_pickle=True" in code:
                bad.append(f"{f}:{i}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in line:
                bad.append(f"{f}:{i}: {line.strip()}")
    assert not bad, "code that can execute untrusted files:\n" + "\n".join(bad)
