"""End to end on the demo world: what the README claims about the method's options
(``variant="reference"``, ``solver="torch"``, ``--clamp``) and DeepLift's completeness on a model
that uses functional ReLUs (defect 7). Every run uses few images and ``cache=False``."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cli.explainer_cmd import main
from explainer.attribution import (
    COMPLETENESS_TOLERANCE,
    attribute,
    pixel_rows,
    pixel_scores,
    scale_by_scores,
)
from explainer.concepts import ExplainContext, class_attributions, explain_class
from explainer.contrast import contrast_classes
from explainer.nmf import concept_order, nmf
from explorer_core.models import LoadedModel, load_model

KW = dict(n_concepts=3, max_images=12, m=2, seed=0, cache=False)


@pytest.fixture(scope="module")
def demo_ctx(demo_workspace) -> ExplainContext:
    return ExplainContext.open(demo_workspace, "cpu")


def _class(ctx: ExplainContext, name: str = "lupo") -> int:
    a = ctx.lm.class_names.index(name)
    assert len(ctx.catalog.images_predicted_as(a)) >= KW["max_images"]
    return a


# ---------------------------------------------------------------------------------- variant


def test_variant_reference_end_to_end_follows_its_formula(demo_ctx) -> None:
    ctx, a = demo_ctx, _class(demo_ctx)
    paper = explain_class(ctx, a, variant="paper", **KW)
    ref = explain_class(ctx, a, variant="reference", **KW)
    assert paper.image_ids == ref.image_ids and len(ref.image_ids) == KW["max_images"]
    assert (paper.params["variant"], ref.params["variant"]) == ("paper", "reference")

    # the documented formula, recomputed here: s = channel mean of relu(attribution),
    # a' = a * max(s, 0), NMF of the non-zero pixel rows, concepts in share order
    pixels = ctx.catalog.image_pixels(ref.image_ids, ctx.lm)
    acts, attr = attribute(ctx.lm, pixels, ctx.layer, [a] * len(pixels), "deeplift")
    s_ref = attr.clamp_min(0).mean(dim=1)
    s_paper = attr.mean(dim=1)
    assert torch.allclose(pixel_scores(attr, "reference"), s_ref)
    V, keep = pixel_rows(scale_by_scores(acts, s_ref))
    W, H, err = nmf(V, KW["n_concepts"], solver="sklearn", seed=KW["seed"])
    order, _ = concept_order(W, H)
    assert np.allclose(ref.concept_vectors, H[order], rtol=1e-4, atol=1e-5)
    assert ref.reconstruction_error == pytest.approx(err, rel=1e-5)
    # heatmaps are zero exactly where the reference score filters a pixel out
    kept = torch.from_numpy(ref.heatmaps.sum(axis=1) > 0)
    assert not kept[s_ref <= 0].any()

    # where attributions are negative the variants differ: relu raises the score ...
    neg = (attr < 0).any(dim=1)
    assert neg.float().mean() > 0.5
    assert (s_ref[neg] > s_paper[neg]).all() and torch.equal(s_ref[~neg], s_paper[~neg])
    # ... pixels the paper drops (s <= 0) are kept by the reference variant ...
    revived = (s_paper <= 0) & (s_ref > 0)
    assert revived.any()
    paper_kept = torch.from_numpy(paper.heatmaps.sum(axis=1) > 0)
    assert not paper_kept[revived].any() and kept[revived].float().mean() > 0.9
    # ... and the concepts are not the same
    assert not np.allclose(paper.concept_vectors, ref.concept_vectors, atol=1e-3)


# ---------------------------------------------------------------------------------- solver


def test_solver_torch_end_to_end(demo_ctx) -> None:
    ctx, a = demo_ctx, _class(demo_ctx)
    sk = explain_class(ctx, a, solver="sklearn", **KW)
    th = explain_class(ctx, a, solver="torch", **KW)
    assert th.params["solver"] == "torch" and th.n_concepts == KW["n_concepts"]
    # README: the torch HALS solver reaches the same or a lower error than scikit-learn's
    assert th.reconstruction_error <= 1.01 * sk.reconstruction_error
    assert 0.0 < th.reconstruction_error < 1.0
    # the reported error is that of the returned factors: ||V - W H|| / ||V||
    entry = class_attributions(ctx, a, max_images=KW["max_images"], seed=0, cache=False)
    X = scale_by_scores(torch.from_numpy(entry["acts"]), torch.from_numpy(entry["s_paper"]))
    V, keep = pixel_rows(X)
    W = th.heatmaps.transpose(0, 2, 3, 1).reshape(-1, th.n_concepts)[keep.numpy()]
    rel = np.linalg.norm(V.numpy() - W @ th.concept_vectors) / np.linalg.norm(V.numpy())
    assert rel == pytest.approx(th.reconstruction_error, rel=1e-3)
    # the prediction tests ran on the torch solver's concepts
    for pt in (th.prediction_test, th.prediction_test_excluded):
        assert pt is not None and pt.target == a and len(pt.crop_ids) == KW["n_concepts"]
    assert th.prediction_test.passed  # the demo's lupo concepts pass (README: 10/10 classes)


# ---------------------------------------------------------------------------------- small workspaces


def _small_workspace(root: Path, gallery: Path, layer: str, lm: LoadedModel | None = None,
                     classes: tuple[str, ...] = ("lupo", "husko", "zebrox", "tigrin"),
                     per_class: int = 8):
    """A workspace over ``per_class`` gallery images of each class (symlinks), at ``layer``."""
    from data_index.catalog import build_catalog
    from data_index.workspace import Workspace

    images = root / "images"
    rows = []
    with (gallery / "labels.csv").open(newline="") as fh:
        taken: dict[str, int] = {}
        for r in csv.DictReader(fh):
            name = r["label_name"]
            if name in classes and taken.get(name, 0) < per_class:
                taken[name] = taken.get(name, 0) + 1
                dst = images / r["file"]
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(gallery / r["file"], dst)
                rows.append(r)
    with (images / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "label", "label_name"])
        w.writeheader()
        w.writerows(rows)
    ws = Workspace.create(root / "ws", model="demo", layer=layer, images=str(images),
                          input_size=96, mode="crop", device="cpu")
    build_catalog(ws, device="cpu", model=lm)
    return ws


@pytest.fixture(scope="module")
def gallery(demo_workspace) -> Path:
    return demo_workspace.images_path


# ---------------------------------------------------------------------------------- --clamp


def test_clamp_from_the_command_line(tmp_path_factory, gallery, capsys) -> None:
    ws = _small_workspace(tmp_path_factory.mktemp("clamp"), gallery, "layer4.bn2")
    out = ws.root.parent / "out"
    argv = ["explain", "--workspace", str(ws.root), "--class", "lupo", "--n", "2", "--m", "2",
            "--max-images", "6", "--no-cache", "--device", "cpu", "--out", str(out)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [l for l in err.replace("\r", "\n").splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "Layer 'layer4.bn2' has negative activations" in errors[0] and "--clamp" in errors[0]
    assert not out.exists()

    assert main([*argv, "--clamp"]) == 0
    err = capsys.readouterr().err
    warned = [l for l in err.replace("\r", "\n").splitlines() if l.startswith("warning:")]
    assert any("layer4.bn2' had negative activations" in l and "clamped to zero" in l
               for l in warned), err
    data = json.loads((out / "explanation.json").read_text())
    assert data["params"]["clamp"] is True and len(data["concepts"]) == 2
    assert any("clamped" in w for w in data["warnings"])
    assert data["completeness_error"] < 1e-3  # the demo CNN is DeepLift-safe


# ---------------------------------------------------------------------------------- defect 7


def _functional_block(self, x: torch.Tensor) -> torch.Tensor:
    """The demo BasicBlock's forward with ``F.relu`` calls instead of its ReLU modules."""
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + self.downsample(x))


@pytest.fixture(scope="module")
def twin_contexts(tmp_path_factory, gallery) -> tuple[ExplainContext, ExplainContext]:
    """The demo CNN as loaded, and the same network (same weights, same function) whose last
    block calls ``F.relu``; one small workspace at ``layer3.relu_out`` (before that block)."""
    lm = load_model("demo", "cpu")
    twin_model = copy.deepcopy(lm.model)
    twin_model.layer4.forward = types.MethodType(_functional_block, twin_model.layer4)
    twin = dataclasses.replace(lm, model=twin_model, _layers=None)
    x = torch.rand(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(twin.logits(x), lm.logits(x), atol=1e-5)
    ws = _small_workspace(tmp_path_factory.mktemp("twin"), gallery, "layer3.relu_out", twin)
    return ExplainContext.open(ws, "cpu", lm=lm), ExplainContext.open(ws, "cpu", lm=twin)


def test_functional_relus_are_reported_and_warned_end_to_end(twin_contexts) -> None:
    modules, functional = twin_contexts
    a = modules.lm.class_names.index("lupo")
    kw = dict(KW, max_images=8, n_concepts=2)
    ok = explain_class(modules, a, **kw)
    assert ok.completeness_error is not None and ok.completeness_error < 1e-3
    assert not any("grad_x_act" in w for w in ok.warnings)

    bad = explain_class(functional, a, **kw)
    assert bad.image_ids == ok.image_ids
    assert bad.completeness_error > max(COMPLETENESS_TOLERANCE, 1000 * ok.completeness_error)
    warned = [w for w in bad.warnings if "completeness" in w]
    assert len(warned) == 1 and "grad_x_act" in warned[0] and "layer3.relu_out" in warned[0]
    assert bad.to_json()["completeness_error"] == pytest.approx(bad.completeness_error)
    # the same function, different code: DeepLift's concepts moved, grad_x_act's did not
    assert not np.allclose(bad.concept_vectors, ok.concept_vectors, atol=1e-3)
    gx_ok = explain_class(modules, a, method="grad_x_act", **kw)
    gx_bad = explain_class(functional, a, method="grad_x_act", **kw)
    assert gx_bad.completeness_error is None and gx_bad.warnings == []
    assert np.allclose(gx_bad.concept_vectors, gx_ok.concept_vectors, rtol=1e-3, atol=1e-4)

    b = modules.lm.class_names.index("zebrox")
    con = contrast_classes(functional, a, b, classifier_solver="lbfgs", compare_solvers=False,
                           **kw)
    assert con.completeness_error is not None
    assert con.completeness_error > max(COMPLETENESS_TOLERANCE, 1000 * ok.completeness_error)
    assert any("grad_x_act" in w for w in con.warnings)
    con_ok = contrast_classes(modules, a, b, classifier_solver="lbfgs", compare_solvers=False,
                              **kw)
    assert con_ok.completeness_error < 1e-3
