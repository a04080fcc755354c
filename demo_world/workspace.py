"""The embedded workspaces: the synthetic concept world with the bundled CNN (``demo``) or the
bundled segmentation UNet (``demo-seg``), and their crop catalogs.

``demo`` is what the app opens on a fresh machine: the first call generates the world's gallery
images (seeded, a few seconds), records the workspace and builds the catalog (resumable, with
progress); later calls only reopen it. ``demo-seg`` is the same over its own copy of the same
gallery (same seed, so the same images and masks) with the segmentation network
(:mod:`explorer_core.demo_segnet`); its catalog stores pixel shares (``image_classes``).
Both rebuild a catalog of an older version by themselves (it is generated data).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

from data_index.workspace import Workspace, workspaces_home
from explorer_core.errors import ExplorerError
from explorer_core.progress import ProgressFn, report

__all__ = ["DEMO_NAME", "DEMO_SEG_NAME", "DEMO_WORLD_SEED", "EMBEDDED_WORKSPACES",
           "ensure_demo_world", "ensure_demo_workspace", "ensure_demo_seg_workspace",
           "ensure_embedded_workspace", "is_embedded"]

DEMO_NAME = "demo"
DEMO_SEG_NAME = "demo-seg"
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


def _ensure(name: str, model: str, layer: str, input_size: int, home: Path | None,
            progress: ProgressFn | None, device: str) -> Workspace:
    """Open the embedded workspace ``name`` over the demo world's gallery with ``model``,
    generating the world and building (or rebuilding an older version of) the catalog first."""
    from data_index.catalog import Catalog, OldCatalogError, build_catalog

    root = (home or workspaces_home()) / name
    if not (root / "world" / "images" / DEMO_SPLIT / "labels.csv").is_file():
        report(progress, "generating the demo world", 0, 1,
               message=f"{DEMO_PER_CLASS} images per class")
    gallery = ensure_demo_world(root / "world")
    ws = Workspace.create(root, model=model, layer=layer,
                          images=str(gallery.relative_to(root)), input_size=input_size,
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


def ensure_demo_workspace(home: Path | None = None, progress: ProgressFn | None = None,
                          device: str = "auto") -> Workspace:
    """Open the ``demo`` workspace, creating it (world + catalog) on first use.

    A catalog written by an older version (v1, :class:`~data_index.catalog.OldCatalogError`)
    is rebuilt: it is generated data, nothing of the user's is lost."""
    from explorer_core.demo_cnn import DEMO_INPUT_SIZE, DEMO_LAYER

    return _ensure(DEMO_NAME, "demo", DEMO_LAYER, DEMO_INPUT_SIZE, home, progress, device)


def ensure_demo_seg_workspace(home: Path | None = None, progress: ProgressFn | None = None,
                              device: str = "auto") -> Workspace:
    """Open the ``demo-seg`` workspace (the demo world's gallery, 1200 images of 96x96 with
    their masks, explained through the ``demo-seg`` UNet at ``layer4.relu_out``; 10800 crops),
    creating it on first use and rebuilding a catalog of an older version, like
    :func:`ensure_demo_workspace`."""
    from explorer_core.demo_segnet import DEMO_SEG_INPUT_SIZE, DEMO_SEG_LAYER

    return _ensure(DEMO_SEG_NAME, "demo-seg", DEMO_SEG_LAYER, DEMO_SEG_INPUT_SIZE, home,
                   progress, device)


EMBEDDED_WORKSPACES: dict[str, Callable[..., Workspace]] = {
    DEMO_NAME: ensure_demo_workspace,
    DEMO_SEG_NAME: ensure_demo_seg_workspace,
}
"""The workspaces the project brings along, by name: each builds itself on first use."""


def is_embedded(name: object) -> bool:
    """Whether ``name`` (as given on a command line or in a URL) names an embedded workspace."""
    return isinstance(name, str) and name in EMBEDDED_WORKSPACES


def ensure_embedded_workspace(name: str, home: Path | None = None,
                              progress: ProgressFn | None = None,
                              device: str = "auto") -> Workspace:
    """Open the embedded workspace ``name`` (``demo`` or ``demo-seg``) under ``home`` (default
    :func:`~data_index.workspace.workspaces_home`), building it first when needed."""
    if not is_embedded(name):
        raise ExplorerError(f"'{name}' is not an embedded workspace; those are "
                            f"{', '.join(EMBEDDED_WORKSPACES)}")
    return EMBEDDED_WORKSPACES[name](home=home, progress=progress, device=device)
