"""What both command lines share: opening a workspace by name or path, the embedded ``demo`` and
``demo-seg`` workspaces included (they build themselves on first use, with a progress bar on
stderr)."""

from __future__ import annotations

import sys
from typing import Any

from data_index.workspace import Workspace, resolve_workspace
from demo_world.workspace import ensure_embedded_workspace, is_embedded
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
    """The workspace ``name_or_path``; an embedded one (``demo``, ``demo-seg``) is generated and
    its catalog built when missing."""
    name = str(name_or_path)
    if is_embedded(name) and not (resolve_workspace(name) / "workspace.toml").is_file():
        with ProgressBar(f"building the {name} workspace", quiet) as bar:
            return ensure_embedded_workspace(name, resolve_workspace(name).parent, progress=bar)
    return Workspace.open(name_or_path)
