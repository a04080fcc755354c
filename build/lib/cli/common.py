"""What both command lines share: opening a workspace by name or path, the ``demo`` workspace
included (it builds itself on first use, with a progress bar on stderr)."""

from __future__ import annotations

import sys
from typing import Any

from data_index.workspace import Workspace, resolve_workspace
from demo_world.workspace import DEMO_NAME, ensure_demo_workspace
from explorer_core.progress import Progress


class ProgressBar:
    """The command lines' one progress view: a ``tqdm`` bar on stderr fed with
    :class:`~explorer_core.progress.Progress` reports (one bar; its label follows the stage).

    Use as a context manager and pass the object itself as ``progress=``."""

    def __init__(self, desc: str, quiet: bool = False) -> None:
        from tqdm import tqdm

        self.desc = desc
        self.stage = ""
        self.bar: Any = tqdm(total=None, desc=desc, file=sys.stderr, leave=False,
                             disable=quiet or None, dynamic_ncols=True)

    def __call__(self, p: Progress) -> None:
        bar = self.bar
        if bar.disable:  # quiet, or stderr is not a terminal
            return
        stage = f"{self.desc}: {p.stage}"
        if self.stage != stage:
            self.stage = stage
            bar.set_description_str(stage, refresh=False)
        total = p.total if p.total > 0 else None
        if bar.total != total:
            bar.total = total
        if p.unit and bar.unit != p.unit:
            bar.unit = p.unit
        bar.n = p.done
        post = [f"ETA {p.eta_s:.0f}s"] if p.eta_s else []
        if p.message:
            post.append(p.message)
        bar.set_postfix_str(", ".join(post), refresh=False)
        bar.refresh()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def open_workspace(name_or_path: str, *, quiet: bool = False) -> Workspace:
    """The workspace ``name_or_path``; ``demo`` is generated and its catalog built when missing."""
    if str(name_or_path) == DEMO_NAME and not (resolve_workspace(DEMO_NAME)
                                               / "workspace.toml").is_file():
        with ProgressBar("building the demo workspace", quiet) as bar:
            return ensure_demo_workspace(resolve_workspace(DEMO_NAME).parent, progress=bar)
    return Workspace.open(name_or_path)
