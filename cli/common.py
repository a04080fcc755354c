"""What both command lines share: opening a workspace by name or path, the ``demo`` workspace
included (it builds itself on first use, with a progress bar on stderr)."""

from __future__ import annotations

import sys

from data_index.workspace import Workspace, resolve_workspace
from demo_world.workspace import DEMO_NAME, ensure_demo_workspace


def open_workspace(name_or_path: str, *, quiet: bool = False) -> Workspace:
    """The workspace ``name_or_path``; ``demo`` is generated and its catalog built when missing."""
    if str(name_or_path) == DEMO_NAME and not (resolve_workspace(DEMO_NAME)
                                               / "workspace.toml").is_file():
        from tqdm import tqdm

        bar = tqdm(total=None, unit="img", desc="building the demo workspace", disable=quiet,
                   file=sys.stderr)

        def progress(p) -> None:  # type: ignore[no-untyped-def]
            bar.total = p.total
            bar.n = p.done
            bar.refresh()

        try:
            return ensure_demo_workspace(resolve_workspace(DEMO_NAME).parent, progress=progress)
        finally:
            bar.close()
    return Workspace.open(name_or_path)
