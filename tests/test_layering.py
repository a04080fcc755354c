"""The package layout is layered: every import (module level or inside a function) points down.

    explorer_core  (0: errors, progress, results, models, hooks, cache)
    data_index     (1: workspaces, datasets, crops, catalog, search)
    explainer      (2: attribution, NMF, concepts, contrast, faithfulness, evaluation)
    study, demo_world (3: the intruder study; the demo world; siblings, never each other)
    cli, pages, app.py (4: the command lines and the app; ``python -m data_index`` and
                   ``python -m explainer`` are 3-line ``__main__`` shims into ``cli``)

A package may import itself and any package of a lower layer, nothing else of the project.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"explorer_core": 0, "data_index": 1, "explainer": 2, "study": 3, "demo_world": 3,
          "cli": 4, "pages": 4}
ENTRY_POINTS = {"data_index/__main__.py", "explainer/__main__.py"}  # run as the top layer


def _package_files() -> list[Path]:
    files = [p for pkg in LAYERS for p in (ROOT / pkg).rglob("*.py")]
    return sorted(files + [ROOT / "app.py"])


def _imports_of_source(text: str, package: str) -> list[tuple[int, str]]:
    """``(line, top-level package)`` of every import in ``text`` (a file of ``package``),
    relative imports resolved to ``package``; sorted by line."""
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside the file's own package tree
                out.append((node.lineno, package))
            elif node.module:
                out.append((node.lineno, node.module.split(".")[0]))
    return sorted(out)


def _imports(path: Path) -> list[tuple[int, str]]:
    return _imports_of_source(path.read_text(), path.relative_to(ROOT).parts[0])


def _layer_of(path: Path) -> tuple[str, int]:
    rel = path.relative_to(ROOT)
    if rel.as_posix() in ENTRY_POINTS or rel.as_posix() == "app.py":
        return rel.as_posix(), 5
    return rel.parts[0], LAYERS[rel.parts[0]]


def test_every_import_points_down() -> None:
    bad = []
    for path in _package_files():
        own, level = _layer_of(path)
        for line, target in _imports(path):
            if target not in LAYERS or target == own:
                continue
            if LAYERS[target] >= level:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({own}, layer {level}) imports "
                           f"{target} (layer {LAYERS[target]})")
    assert not bad, "imports that do not point down:\n" + "\n".join(bad)


@pytest.mark.parametrize("pkg", ["explorer_core", "data_index", "explainer", "study",
                                 "demo_world", "cli"])
def test_no_streamlit_below_the_app(pkg: str) -> None:
    users = [f"{p.relative_to(ROOT)}:{line}" for p in (ROOT / pkg).rglob("*.py")
             for line, t in _imports(p) if t == "streamlit"]
    assert not users, f"{pkg} imports streamlit: {users}"


def test_the_checker_sees_upward_and_lazy_imports() -> None:
    """The scan can fail: a lazy upward import inside a function is found and resolved."""
    text = ("import numpy\n"
            "def f():\n    from explainer.concepts import explain_class\n"
            "from . import sibling\n")
    found = _imports_of_source(text, "data_index")
    assert found == [(1, "numpy"), (3, "explainer"), (4, "data_index")]
    assert LAYERS["explainer"] > LAYERS["data_index"]  # so data_index -> explainer is reported
