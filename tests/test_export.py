"""Export of a run (explainer/export.py) and the heatmap pictures (explainer/heatmap.py): the
HTML report embeds the crops, heatmaps, parameters and tests and fetches nothing; the zip holds
the files ``python -m explainer explain --out`` writes."""

from __future__ import annotations

import base64
import io
import json
import re
import zipfile

import numpy as np
import pytest
from PIL import Image

from explainer import heatmap
from explainer.export import explanation_html, explanation_zip, result_html, result_zip


@pytest.fixture(scope="module")
def demo_ctx(demo_workspace):
    from explainer.concepts import get_context

    return get_context(demo_workspace, "cpu")


@pytest.fixture(scope="module")
def lupo(demo_ctx):
    from explainer.concepts import explain_class

    return explain_class(demo_ctx, "lupo", n_concepts=3, method="grad_x_act", max_images=30,
                         m=5, cache=True)


def _images(page: str) -> list[np.ndarray]:
    out = []
    for b64 in re.findall(r'<img[^>]* src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page):
        out.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))))
    return out


def test_html_report_embeds_crops_heatmaps_params_and_tests(lupo, demo_ctx):
    page = explanation_html(lupo, demo_ctx.lm, demo_ctx.catalog,
                            params={"exclude_target": False, "n_concepts": 3},
                            n_heatmap_images=2)
    imgs = _images(page)
    c = demo_ctx.catalog.grid.crop_size
    crops = [a for a in imgs if a.shape[:2] == (c, c)]
    assert len(crops) == sum(len(con.crops) for con in lupo.concepts)  # 3 concepts x 5 crops
    n_stitched = sum(pt is not None for pt in (lupo.prediction_test,
                                               lupo.prediction_test_excluded))
    # 2 source images + 2 x 3 overlays, the colour bar, the stitched test images, and per
    # concept the 4 source images where it is strongest
    assert len(imgs) == len(crops) + 2 * (1 + 3) + 1 + n_stitched + 3 * 4
    for con in lupo.concepts:
        assert f"#{con.crops[0].crop_id} " in page
    assert "n_concepts" in page and "grad_x_act" in page  # parameters
    pt = lupo.prediction_test
    assert ("PASS" if pt.passed else "FAIL") in page and f"{pt.prob_target:.3f}" in page
    for k in range(3):
        top = heatmap.strongest_images(lupo.heatmaps, lupo.image_ids, k, 4)
        assert f"1. image {top[0][0]} · max {top[0][1]:.2f}" in page
    # self-contained: no script, stylesheet or image fetched from anywhere
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "<script" not in page


def test_zip_holds_the_cli_files(lupo, demo_ctx, tmp_path):
    from explainer.report import load_explanation, write_explanation

    data = explanation_zip(lupo, demo_ctx.lm, demo_ctx.catalog, params={"n_concepts": 3})
    zf = zipfile.ZipFile(io.BytesIO(data))
    names = set(zf.namelist())
    cli = write_explanation(lupo, tmp_path / "cli", demo_ctx.lm, demo_ctx.catalog)
    assert {p.relative_to(tmp_path / "cli").as_posix() for p in cli} | {"parameters.json"} == names
    assert json.loads(zf.read("parameters.json")) == {"n_concepts": 3}
    zf.extractall(tmp_path / "unzipped")
    back = load_explanation(tmp_path / "unzipped")
    assert back.n_concepts == 3 and back.image_ids == lupo.image_ids
    assert np.array_equal(back.heatmaps, lupo.heatmaps)


def test_test_run_report_and_zip():
    rec = {"type": "PatchTestResult", "class_a": 1, "class_b": 2, "image_ids": [4, 8],
           "prob_a_before": [0.1, 0.2], "prob_a_after": [0.5, 0.6], "mean_delta_a": 0.4,
           "stitched": np.zeros((64, 32, 3), np.uint8)}
    page = result_html("patch", rec, {"position": "center"}, ["x", "lupo", "husko"])
    assert "Patch insertion test" in page and "center" in page and "1 (lupo)" in page
    assert "0.5000" in page and len(_images(page)) == 1
    zf = zipfile.ZipFile(io.BytesIO(result_zip(rec, {"position": "center"})))
    assert sorted(zf.namelist()) == ["arrays.npz", "parameters.json", "result.json"]
    assert json.loads(zf.read("result.json"))["prob_a_after"] == [0.5, 0.6]
    arr = np.load(io.BytesIO(zf.read("arrays.npz")), allow_pickle=False)
    assert arr["stitched"].shape == (64, 32, 3)


def test_heatmap_scale_overlay_colorbar_and_ranking():
    rng = np.random.default_rng(0)
    hm = rng.random((5, 2, 4, 4)).astype(np.float32)
    hm[3, 1, 2, 2] = 9.0  # image id 30's peak on concept 1
    scales = heatmap.concept_scales(hm)
    assert scales.shape == (2,) and 0 < scales[0] <= 1 and scales[1] < 9.0
    ranked = heatmap.strongest_images(hm, [0, 10, 20, 30, 40], 1, top=3)
    assert ranked[0] == (30, 9.0) and len(ranked) == 3
    assert ranked[1][1] >= ranked[2][1]
    img = np.full((32, 32, 3), 128, np.uint8)
    zero = heatmap.overlay(img, np.zeros((4, 4)), 1.0, opacity=0.0)
    assert np.array_equal(zero, img)  # opacity 0: the image unchanged
    full = heatmap.overlay(img, np.ones((4, 4)), 1.0, opacity=1.0)
    assert tuple(full[0, 0]) == tuple(heatmap.COLORMAP[255])  # full strength, full colour
    dim = heatmap.overlay(img, np.ones((4, 4)), 1.0, opacity=1.0, dim=True)
    assert dim.mean() < full.mean() / 2
    assert heatmap.overlay(img, np.ones((4, 4)), 1.0, size=96).shape == (96, 96, 3)
    bar = heatmap.colorbar(100, 10)
    assert bar.shape == (10, 100, 3) and bar[0, 0].sum() < bar[0, -1].sum()
    with pytest.raises(ValueError, match="opacity"):
        heatmap.overlay(img, np.ones((4, 4)), 1.0, opacity=1.5)
