"""Shared fixtures: the real photo sets, EfficientNet-Lite0 and one catalog built per session.

``lite0_workspace`` indexes both shared photo sets (2000 images, 18000 crops, crop mode, layer
``bn2``) once per test session; every test that needs a catalog reuses it (a few minutes on two
CPU cores, paid once).
"""

from __future__ import annotations

import os
from pathlib import Path

# OpenMP threads that sleep instead of spinning while they wait: on a machine whose few cores are
# shared (CI runners, parallel sessions) spinning threads made torch steps 4x slower. Set before
# torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NIPS17 = SHARED / "imagenet-nips17"
SAMPLES = SHARED / "imagenet-samples"
_MISSING_REASON = "../shared/data not found: real-photo tests need the shared ImageNet photo sets"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

if IN_CI and not (NIPS17 / "labels.csv").is_file():
    # in CI a missing photo folder must fail loudly, never silently skip the real-data tests
    raise RuntimeError(f"{_MISSING_REASON} (expected at {SHARED})")

requires_shared = pytest.mark.skipif(not (NIPS17 / "labels.csv").is_file(),
                                     reason=_MISSING_REASON)

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (NIPS17 / "labels.csv").is_file():
        if IN_CI:
            pytest.fail(f"{_MISSING_REASON} (expected at {SHARED})")
        pytest.skip(_MISSING_REASON)
    return SHARED


@pytest.fixture(scope="session")
def lite0():
    from explorer_core.models import load_model

    return load_model("efficientnet_lite0", "cpu")


@pytest.fixture(scope="session")
def lite0_workspace(tmp_path_factory, lite0, shared_data):
    """A workspace over both shared photo sets (2000 photos, 18000 crops), crop
    mode, layer bn2, built once per session."""
    from data_index.catalog import Catalog, build_catalog
    from data_index.workspace import Workspace
    from explorer_core.errors import ExplorerError

    # LITE0_WORKSPACE=/some/folder keeps the build between sessions (a complete catalog with the
    # same settings and files is reused as is; anything else is refused by build_catalog)
    keep = os.environ.get("LITE0_WORKSPACE")
    root = Path(keep) if keep else tmp_path_factory.mktemp("ws") / "lite0"
    ws = Workspace.create(root, model="efficientnet_lite0", layer="bn2", images=str(shared_data),
                          input_size=lite0.input_size, mode="crop", device="cpu")
    try:  # a complete kept build is only read (several test runs may share it)
        Catalog.open(ws).close()
    except ExplorerError:
        build_catalog(ws, model=lite0, batch_size=32)
    return ws


@pytest.fixture(scope="session")
def lite0_catalog(lite0_workspace):
    from data_index.catalog import Catalog

    return Catalog.open(lite0_workspace)


# ----------------------------------------------------------------------------------------------
# Demo world workspace (synthetic images with ground-truth masks + the bundled demo CNN).
# Used by tests/test_demo_groundtruth.py; any test may reuse it.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory):
    """The ``demo`` workspace (world gallery: 1200 images of 96x96 with masks, 10800 crops,
    layer ``layer4.relu_out``), built once per session with ``ensure_demo_workspace(home=...,
    device="cpu")`` (about 20-60 s on two CPU cores). ``DEMO_WORKSPACE_HOME=/some/folder`` keeps
    the build and its on-disk explanation cache between sessions."""
    from demo_world.workspace import ensure_demo_workspace

    keep = os.environ.get("DEMO_WORKSPACE_HOME")
    home = Path(keep) if keep else tmp_path_factory.mktemp("demo_home")
    return ensure_demo_workspace(home=home, device="cpu")


@pytest.fixture(scope="session")
def demo_seg_workspace(tmp_path_factory):
    """The ``demo-seg`` workspace (the same 1200 gallery images with masks, 10800 crops, the
    ``demo-seg`` UNet at ``layer4.relu_out``; its catalog holds pixel shares), built once per
    session with ``ensure_demo_seg_workspace(home=..., device="cpu")``.
    ``DEMO_SEG_WORKSPACE_HOME=/some/folder`` keeps the build and its on-disk result cache
    between sessions (the workspace is ``<home>/demo-seg``)."""
    from demo_world.workspace import ensure_demo_seg_workspace

    keep = os.environ.get("DEMO_SEG_WORKSPACE_HOME")
    home = Path(keep) if keep else tmp_path_factory.mktemp("demo_seg_home")
    return ensure_demo_seg_workspace(home=home, device="cpu")


def copy_demo_images(demo_workspace, dest: Path, per_class: int) -> Path:
    """The first ``per_class`` gallery images of every demo class, copied to ``dest`` with their
    labels.csv (a small labelled image folder of the demo world)."""
    import csv
    import shutil

    src = demo_workspace.images_path
    dest.mkdir(parents=True, exist_ok=True)
    taken: dict[str, int] = {}
    rows = []
    with (src / "labels.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            cls = r["file"].split("/")[0]
            if taken.get(cls, 0) >= per_class:
                continue
            taken[cls] = taken.get(cls, 0) + 1
            (dest / cls).mkdir(exist_ok=True)
            shutil.copy(src / r["file"], dest / r["file"])
            rows.append(r)
    with (dest / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "label", "label_name"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return dest


MULTI_LAYERS = ["layer3.relu_out", "layer4.bn2", "layer4.relu_out"]


@pytest.fixture(scope="session")
def multilayer_workspace(tmp_path_factory, demo_workspace):
    """A three-layer catalog (``layer3.relu_out`` 96 ch, ``layer4.bn2`` 192 ch with negative
    outputs, ``layer4.relu_out`` 192 ch, the default) over 12 demo images per class (120
    images), in a workspace home of its own: ``<home>/multi``."""
    from data_index.catalog import build_catalog
    from data_index.workspace import Workspace
    from explorer_core.demo_cnn import DEMO_INPUT_SIZE, DEMO_LAYER

    home = tmp_path_factory.mktemp("multi_home")
    images = copy_demo_images(demo_workspace, home / "images", 12)
    ws = Workspace.create(home / "multi", model="demo", layers=MULTI_LAYERS, layer=DEMO_LAYER,
                          images=str(images), input_size=DEMO_INPUT_SIZE, device="cpu")
    build_catalog(ws, device="cpu")
    return ws
