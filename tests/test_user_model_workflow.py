"""The user's own model code end to end (issue 11 item 3) and ``python -m explainer synthesize``
(item 5).

* A classifier class in a temp folder: the command lines accept its ``python:`` spec (they run
  the code the user typed), build a catalog over a few noise images and explain a class.
* A UNet-style segmenter in a temp folder: loads, attributes towards its class evidence and
  yields NMF concepts (the catalog of segmentation models is another change; see README).
* ``synthesize`` on the demo workspace writes one PNG per concept, the stitched prediction test
  and the alignments, and a second run reads the cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from test_catalog_robust import noise_images
from test_seg_models import user_model

from explorer_core.models import forget_shared_models


def test_cli_accepts_a_python_spec_and_explains(tmp_path, capsys):
    from cli.data_index_cmd import main as index_main
    from cli.explainer_cmd import main as explain_main

    marker = tmp_path / "IMPORTED"
    spec = user_model(tmp_path / "model", "TinyClassifier",
                      {"kwargs": {"classes": 3}, "input_size": 48, "layer": "relu2"},
                      classes=["red", "green", "blue"])
    with open(tmp_path / "model" / "model.py", "a") as fh:
        fh.write(f"\nopen({str(marker)!r}, 'a').write('x')\n")
    forget_shared_models()
    assert index_main(["layers", "--model", spec, "--device", "cpu"]) == 0
    assert "relu2" in capsys.readouterr().out
    assert marker.exists()  # the CLI ran the file the user named
    noise_images(tmp_path / "imgs", 12, size=(64, 64))
    ws = tmp_path / "ws"
    assert index_main(["build", "--workspace", str(ws), "--model", spec, "--images",
                       str(tmp_path / "imgs"), "--device", "cpu", "--quiet"]) == 0
    assert "python:" in (ws / "workspace.toml").read_text()
    from data_index.catalog import Catalog
    from data_index.workspace import Workspace

    counts = Catalog.open(Workspace.open(ws)).predicted_counts()
    cls = max(counts, key=lambda c: counts[c])
    forget_shared_models()  # a fresh process: the workspace's spec is loaded again
    out = tmp_path / "out"
    rc = explain_main(["explain", "--workspace", str(ws), "--class", str(cls), "--n", "2",
                       "--max-images", "8", "--device", "cpu", "--m", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "explanation.json").read_text())
    assert data["model"] == spec and len(data["concepts"]) == 2
    forget_shared_models()


def test_user_unet_attributes_and_gives_concepts(tmp_path):
    from explainer.attribution import (
        attribute_checked,
        completeness_error,
        pixel_rows,
        pixel_scores,
        scale_by_scores,
    )
    from explainer.nmf import nmf
    from explorer_core.models import load_model

    spec = user_model(tmp_path / "unet", "TinyUNet", {"input_size": 64},
                      classes=["background", "cell", "stroma", "fat"])
    lm = load_model(spec, "cpu", allow_code=True)
    pix = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    shares = lm.class_scores(pix)
    _, pred = lm.predicted_classes(shares)
    assert (pred != lm.background_class).all()
    acts, attr, delta, gap = attribute_checked(lm, pix, lm.recommended_layer, pred.tolist())
    assert acts.shape == attr.shape and acts.shape[0] == 4 and acts.shape[-1] == 16
    assert completeness_error(delta, gap) < 1e-3
    V, _ = pixel_rows(scale_by_scores(acts, pixel_scores(attr)))
    W, H, err = nmf(V, 2, seed=0)
    assert H.shape == (2, acts.shape[1]) and (H >= 0).all() and err < 1


def test_synthesize_command_writes_images_and_reuses_the_cache(demo_workspace, tmp_path,
                                                                 monkeypatch, capsys):
    import shutil

    from cli.explainer_cmd import main
    from explorer_core import cache

    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(demo_workspace.root.parent))
    # a kept workspace (DEMO_WORKSPACE_HOME) may hold syntheses of an earlier run
    shutil.rmtree(demo_workspace.cache_dir / "synthesis", ignore_errors=True)
    args = ["synthesize", "--workspace", "demo", "--class", "lupo", "--n", "2",
            "--max-images", "30", "--steps", "24", "--device", "cpu"]
    cache.reset_stats()
    assert main([*args, "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    line = capsys.readouterr().out
    assert "2 synthesised concepts of lupo" in line and "prediction test" in line
    rec = json.loads((tmp_path / "a" / "synthesis.json").read_text())
    assert [c["png"] for c in rec["concepts"]] == ["concept_1.png", "concept_2.png"]
    for c in rec["concepts"]:
        assert len(c["alignments"]) == 2 and -1 <= c["alignment"] <= 1
        assert c["alignment"] == c["alignments"][c["concept"] - 1]
        assert len(c["nearest_crops"]) == 8
    assert rec["synthesis"]["size"] == 32 and rec["synthesis"]["steps"] == 24
    assert rec["prediction_test"]["score"] == "softmax"
    from PIL import Image

    assert np.asarray(Image.open(tmp_path / "a" / "concept_1.png")).shape == (32, 32, 3)
    assert np.asarray(Image.open(tmp_path / "a" / "stitched.png")).shape == (64, 32, 3)
    st = cache.STATS["synthesis"]
    assert (st.hits, st.writes) == (0, 1)
    # the same request again: read from the cache, same images and alignments
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert (cache.STATS["synthesis"].hits, cache.STATS["synthesis"].writes) == (1, 1)
    again = json.loads((tmp_path / "b" / "synthesis.json").read_text())
    assert [c["alignments"] for c in again["concepts"]] == [c["alignments"]
                                                          for c in rec["concepts"]]
    assert (Path(tmp_path / "a" / "concept_2.png").read_bytes()
            == Path(tmp_path / "b" / "concept_2.png").read_bytes())
    # a contrast's concepts are other vectors: another entry
    assert main([*args, "--b", "husko", "--out", str(tmp_path / "c")]) == 0
    assert cache.STATS["synthesis"].writes == 2
    assert json.loads((tmp_path / "c" / "synthesis.json").read_text())["class_b"] == "husko"
