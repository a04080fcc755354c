"""The ``demo`` workspace: the synthetic concept world, the bundled CNN and its crop catalog.

It is what the app opens on a fresh machine: the first call generates the world's gallery
images (seeded, a few seconds), records the workspace and builds the catalog (resumable, with
progress); later calls only reopen it.
"""

from __future__ import annotations

import csv
from pathlib import Path

from data_index.workspace import Workspace, workspaces_home
from explorer_core.errors import ExplorerError
from explorer_core.progress import ProgressFn, report

__all__ = ["DEMO_NAME", "DEMO_WORLD_SEED", "ensure_demo_world", "ensure_demo_workspace"]

DEMO_NAME = "demo"
DEMO_WORLD_SEED = 0
DEMO_SPLIT = "gallery"  # not a split the demo CNN was trained or validated on
DEMO_PER_CLASS = 120


def ensure_demo_world(world_dir: Path, n_per_class: int = DEMO_PER_CLASS) -> Path:
    """Generate the gallery split of the demo world under ``world_dir`` unless it is complete.

    Returns the image folder: ``world_dir/images/gallery`` with its own ``labels.csv``
    (``file,label,label_name``); ground-truth masks are under ``world_dir/masks/gallery``.
    """
    from demo_world import world

    gallery = world_dir / "images" / DEMO_SPLIT
    done = gallery / "labels.csv"
    if done.is_file():
        return gallery
    world.generate_world(world_dir, n_per_class=n_per_class, seed=DEMO_WORLD_SEED,
                         split=DEMO_SPLIT)
    rows = []
    with (world_dir / "labels.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            parts = Path(r["file"]).parts
            if len(parts) > 2 and parts[1] == DEMO_SPLIT:
                rows.append((Path(*parts[2:]).as_posix(), r["label"], r["label_name"]))
    tmp = done.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["file", "label", "label_name"])
        w.writerows(sorted(rows))
    tmp.replace(done)  # written last: marks the world as complete
    return gallery


def ensure_demo_workspace(home: Path | None = None, progress: ProgressFn | None = None,
                          device: str = "auto") -> Workspace:
    """Open the ``demo`` workspace, creating it (world + catalog) on first use.

    A catalog written by an older version (v1, :class:`~data_index.catalog.OldCatalogError`)
    is rebuilt: it is generated data, nothing of the user's is lost."""
    from data_index.catalog import Catalog, OldCatalogError, build_catalog
    from explorer_core.demo_cnn import DEMO_INPUT_SIZE, DEMO_LAYER

    root = (home or workspaces_home()) / DEMO_NAME
    if not (root / "world" / "images" / DEMO_SPLIT / "labels.csv").is_file():
        report(progress, "generating the demo world", 0, 1,
               message=f"{DEMO_PER_CLASS} images per class")
    gallery = ensure_demo_world(root / "world")
    ws = Workspace.create(root, model="demo", layer=DEMO_LAYER,
                          images=str(gallery.relative_to(root)), input_size=DEMO_INPUT_SIZE,
                          mode="crop", seed=0, device=device)
    try:
        Catalog.open(ws).close()
    except OldCatalogError:
        build_catalog(ws, device=device, progress=progress, rebuild=True)
    except ExplorerError:
        try:
            build_catalog(ws, device=device, progress=progress)
        except OldCatalogError:  # a v1 build that never completed
            build_catalog(ws, device=device, progress=progress, rebuild=True)
    return ws
