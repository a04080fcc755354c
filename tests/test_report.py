"""The on-disk form of an Explanation (explorer_core.results) and the explanation folders of
the command line (explainer.report): save -> load gives the same object, ``explain --out``
keeps the concept vectors, heatmaps and crop ids, and a run that dies leaves no folder."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from explorer_core.errors import ExplorerError
from explorer_core.results import (
    Explanation,
    explanation_record,
    read_explanation,
    save_explanation,
)


def assert_same(a, b, where: str = "explanation") -> None:
    """Deep equality: dataclasses field by field, arrays by value, shape and dtype, NaN == NaN."""
    if dataclasses.is_dataclass(a):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        assert np.array_equal(a, b), where
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def demo_ctx(demo_workspace):
    from explainer.concepts import get_context

    return get_context(demo_workspace, "cpu")


@pytest.fixture(scope="module")
def demo_explanations(demo_ctx) -> tuple[Explanation, Explanation]:
    from explainer.concepts import explain_class
    from explainer.contrast import contrast_classes

    kw = dict(n_concepts=3, method="grad_x_act", max_images=30, m=5, cache=False)
    return (explain_class(demo_ctx, "lupo", **kw),
            contrast_classes(demo_ctx, "lupo", "husko", **kw))


def test_save_load_round_trip(demo_explanations, tmp_path):
    for i, expl in enumerate(demo_explanations):
        written = save_explanation(expl, tmp_path / str(i))
        assert sorted(p.name for p in written) == ["arrays.npz", "explanation.json"]
        back = read_explanation(tmp_path / str(i))
        assert_same(expl, back)
    expl, contrast = demo_explanations
    assert contrast.classifier is not None and contrast.classifier.weight.shape == (192,)
    assert "classifier_comparison" in contrast.params
    # a NaN (score of a crop not found by a search, a classifier's unknown loss) survives
    expl.concepts[0].crops[0] = dataclasses.replace(expl.concepts[0].crops[0],
                                                    score=float("nan"))
    save_explanation(expl, tmp_path / "nan")
    assert "NaN" not in (tmp_path / "nan" / "explanation.json").read_text()  # standard JSON
    assert_same(expl, read_explanation(tmp_path / "nan"))


def test_record_documents_its_arrays(demo_explanations):
    expl, contrast = demo_explanations
    record, arrays = explanation_record(contrast)
    n, N = contrast.n_concepts, len(contrast.image_ids)
    assert record["format"] == "concept-explorer/explanation" and record["version"] == 1
    assert arrays["concept_vectors"].shape == (n, 192)
    assert arrays["heatmaps"].shape == (N, n, 6, 6)
    assert arrays["crop_ids"].shape == arrays["crop_ids_excluded"].shape == (n, 5)
    assert arrays["crop_ids"][0].tolist() == [c.crop_id for c in contrast.concepts[0].crops]
    assert arrays["stitched"].dtype == np.uint8 and arrays["stitched"].shape == (3 * 32, 32, 3)
    assert arrays["classifier_weight"].shape == (192,)
    assert record["arrays"] == {k: {"shape": list(a.shape), "dtype": str(a.dtype)}
                                for k, a in arrays.items()}
    json.dumps(record, allow_nan=False)  # plain, standard JSON
    _, arrays1 = explanation_record(expl)
    assert "classifier_weight" not in arrays1


def test_load_explanation_refuses_foreign_folders(tmp_path, demo_explanations):
    from explainer.report import load_explanation

    with pytest.raises(ExplorerError, match="does not hold a readable explanation"):
        load_explanation(tmp_path)
    save_explanation(demo_explanations[0], tmp_path / "e")
    arrays = (tmp_path / "e" / "arrays.npz").read_bytes()
    (tmp_path / "e" / "arrays.npz").write_bytes(arrays[:1000])
    with pytest.raises(ExplorerError, match="does not hold a readable explanation"):
        load_explanation(tmp_path / "e")
    (tmp_path / "e" / "arrays.npz").write_bytes(arrays)
    rec = json.loads((tmp_path / "e" / "explanation.json").read_text())
    rec["image_ids"] = rec["image_ids"][:-1]  # heatmaps no longer fit
    (tmp_path / "e" / "explanation.json").write_text(json.dumps(rec))
    with pytest.raises(ExplorerError, match="heatmaps"):
        load_explanation(tmp_path / "e")


def _cli_explain(ws, out: Path, *extra: str) -> int:
    from cli.explainer_cmd import main

    return main(["explain", "--workspace", str(ws.root), "--class", "lupo", "--n", "3",
                 "--method", "grad_x_act", "--max-images", "30", "--m", "5", "--device", "cpu",
                 "--out", str(out), *extra])


def test_cli_out_folder_loads_the_main_result(demo_workspace, demo_explanations, tmp_path):
    from explainer.report import load_explanation

    out = tmp_path / "ex"
    assert _cli_explain(demo_workspace, out, "--no-cache") == 0
    got = load_explanation(out)
    ref = demo_explanations[0]  # the same parameters, computed in this process
    assert got.concept_vectors.shape == (3, 192) and got.concept_vectors.dtype == np.float32
    assert np.allclose(got.concept_vectors, ref.concept_vectors, atol=1e-5)
    assert got.heatmaps.shape == ref.heatmaps.shape
    assert np.allclose(got.heatmaps, ref.heatmaps, atol=1e-5)
    assert got.image_ids == ref.image_ids
    for c, r in zip(got.concepts, ref.concepts):
        assert [x.crop_id for x in c.crops] == [x.crop_id for x in r.crops]
        assert [x.crop_id for x in c.crops_excluded] == [x.crop_id for x in r.crops_excluded]
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"explanation.json", "arrays.npz", "summary.md", "stitched_allowed.png",
            "stitched_excluded.png", "concept_2/crop_4.png"} <= names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex"]  # no temporary folder left


def test_killed_write_leaves_no_folder(demo_workspace, tmp_path, monkeypatch):
    import explainer.report as report

    calls = []

    def dies_midway(arr, path):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as a kill would, half-way through the PNGs
        Image.fromarray(arr).save(path)

    from PIL import Image

    monkeypatch.setattr(report, "_save_png", dies_midway)
    out = tmp_path / "ex"
    with pytest.raises(KeyboardInterrupt):
        _cli_explain(demo_workspace, out)
    assert len(calls) == 4
    assert list(tmp_path.iterdir()) == []  # no out, no temporary folder
    # an earlier complete folder stays as it was until a new one is complete
    monkeypatch.undo()
    assert _cli_explain(demo_workspace, out) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls.clear()
    monkeypatch.setattr(report, "_save_png", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        _cli_explain(demo_workspace, out, "--exclude-target")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex"]
    # a failure while writing the arrays: the same
    monkeypatch.setattr("explorer_core.results.write_npz",
                        lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    assert _cli_explain(demo_workspace, tmp_path / "full") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex"]


def test_out_must_be_new_empty_or_an_explanation_folder(demo_workspace, tmp_path, capsys):
    other = tmp_path / "home"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    assert _cli_explain(demo_workspace, other) == 2
    assert "is a folder with other files" in capsys.readouterr().err
    assert (other / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    assert _cli_explain(demo_workspace, tmp_path / "file") == 2
    assert "is not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli_explain(demo_workspace, empty) == 0
    assert (empty / "arrays.npz").is_file()
