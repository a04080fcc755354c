"""The project installs as a package (pyproject.toml) and its packages import from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installs_and_imports_from_another_folder(tmp_path: Path) -> None:
    # build from a copy: setuptools writes build/ and *.egg-info into the source folder
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "workspaces", "artifacts", "build", "*.egg-info", "__pycache__", ".*_cache",
        ".gpu-wheels", "tests", "bench"))
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--no-index", "--target", str(target), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for pkg in ("explorer_core", "data_index", "explainer", "study", "demo_world", "cli"):
        assert (target / pkg / "__init__.py").is_file(), pkg
    assert (target / "explorer_core" / "weights" / "demo_cnn.pt").is_file()  # package data
    assert not (target / "tests").exists() and not (target / "pages").exists()
    code = ("import explainer.concepts, data_index.catalog, explorer_core.models, study, "
            "demo_world.world, cli.explainer_cmd; from explorer_core.demo_cnn import load_demo; "
            "load_demo('cpu'); print(explainer.concepts.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(target))  # the installed copy, not the checkout
