"""Argument parsing both command lines share: the parser with the project's error format and
the argument types that validate every size, seed and output path before any work starts.

Every bad argument ends the command with exactly one line ``error: <message>`` on stderr and exit
status 2, as an :class:`~explorer_core.errors.ExplorerError` from the libraries does. The library
functions keep their own checks for programmatic callers; these types only make the command
lines fail early and alike.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Callable, NoReturn

from data_index.workspace import resolve_workspace
from explorer_core.errors import ExplorerError

__all__ = ["CliParser", "SEED_MAX", "choice_list", "class_list", "int_list", "int_range",
           "name_list", "output_file", "output_folder", "positive_int", "seed", "workspace_arg"]

SEED_MAX = 2**32 - 1  # numpy and scikit-learn take seeds in 0..2**32-1
_INT64_MAX = 2**63 - 1


class CliParser(argparse.ArgumentParser):
    """:class:`argparse.ArgumentParser` whose errors are one ``error: ...`` line, exit 2
    (argparse's default prints the usage block first). Sub-parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        msg = " ".join(message.split())
        self.exit(2, f"error: {msg} (see '{self.prog} --help')\n")


def int_range(lo: int, hi: int | None = None, hint: str = "") -> Callable[[str], int]:
    """An argparse type: an integer in ``lo..hi`` (``hi=None``: no upper bound but int64)."""
    top = _INT64_MAX if hi is None else hi

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if not lo <= value <= top:
            want = f"at least {lo}" if hi is None else f"in {lo}..{hi}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: use a whole number "
                                             f"{want}{hint}")
        return value

    parse.__name__ = "int"
    return parse


positive_int = int_range(1)
seed = int_range(0, SEED_MAX)


def class_list(text: str) -> list[str]:
    """``--classes a,b,3``: the non-empty, comma-separated names or indices."""
    items = [c.strip() for c in text.split(",") if c.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give at least one class name or index, "
                                         "comma-separated")
    return items


def int_list(lo: int, hi: int | None = None) -> Callable[[str], list[int]]:
    """An argparse type: ``1,2,4``, comma-separated integers in ``lo..hi``, each once, in the
    given order."""
    one = int_range(lo, hi)

    def parse(text: str) -> list[int]:
        items = [c.strip() for c in text.split(",") if c.strip()]
        if not items:
            raise argparse.ArgumentTypeError("give at least one whole number, comma-separated")
        values = [one(c) for c in items]
        if len(set(values)) < len(values):
            raise argparse.ArgumentTypeError(f"'{text}' names a value twice")
        return values

    parse.__name__ = "integer list"
    return parse


def choice_list(choices: tuple[str, ...] | list[str], *, allow_empty: bool = False
                ) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names out of ``choices``, each once (``""`` or
    ``none``: the empty list when ``allow_empty``)."""

    def parse(text: str) -> list[str]:
        items = [c.strip() for c in text.split(",") if c.strip()]
        if allow_empty and (not items or items == ["none"]):
            return []
        if not items:
            raise argparse.ArgumentTypeError(f"give at least one of {', '.join(choices)}")
        bad = [c for c in items if c not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(repr(b) for b in bad)}; use "
                                             f"{', '.join(choices)} (comma-separated)")
        if len(set(items)) < len(items):
            raise argparse.ArgumentTypeError(f"'{text}' names a value twice")
        return items

    parse.__name__ = "choice list"
    return parse


def name_list(text: str) -> list[str]:
    """``a,b,c``: non-empty comma-separated names (e.g. layers), each once."""
    items = [c.strip() for c in text.split(",") if c.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give at least one name, comma-separated")
    if len(set(items)) < len(items):
        raise argparse.ArgumentTypeError(f"'{text}' names a value twice")
    return items


def workspace_arg(text: str) -> str:
    """A workspace name or folder that can be resolved (kept as given: the embedded ``demo`` and
    ``demo-seg`` are special)."""
    try:
        resolve_workspace(text)
    except ExplorerError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _writable_under(target: Path, what: str) -> None:
    """Probe that ``target`` (not yet existing, or an existing folder) can be created/written:
    a temporary folder is made and removed in its nearest existing ancestor."""
    probe = target
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise argparse.ArgumentTypeError(f"{what} '{target}': '{probe}' is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=probe))
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{what} '{target}': cannot write under '{probe}' "
                                         f"({exc.strerror or exc})") from None


def output_folder(text: str) -> Path:
    """An output folder: absent (it is created) or an existing folder, writable."""
    p = Path(text).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' exists and is not a folder; give a new or "
                                         "an existing folder")
    _writable_under(p, "output folder")
    return p


def output_file(*suffixes: str) -> Callable[[str], Path]:
    """An argparse type: an output file with one of ``suffixes`` in a writable folder."""

    def parse(text: str) -> Path:
        p = Path(text).expanduser().absolute()
        if p.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"'{text}': use a file name ending in "
                                             f"{' or '.join(suffixes)}")
        if p.is_dir():
            raise argparse.ArgumentTypeError(f"'{text}' is a folder; give a file name")
        _writable_under(p.parent, "output file's folder")
        return p

    parse.__name__ = "output file"
    return parse
