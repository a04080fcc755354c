"""Explanation folders: what ``python -m explainer explain|contrast --out FOLDER`` writes, and
how to read one back.

A folder holds the explanation in its loadable form (``explanation.json`` + ``arrays.npz``,
documented in :mod:`explorer_core.results`; the result cache stores the same two files) and,
for people, ``summary.md``, the stitched prediction-test images ``stitched_allowed.png`` /
``stitched_excluded.png`` and the top crops of each concept ``concept_<k>/crop_<j>.png``.

The folder is written under a hidden temporary sibling name and renamed to ``out`` when
complete: a run that is killed or fails leaves no half-written ``out``, and an existing
explanation folder is replaced only by a complete new one.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from explorer_core.errors import ExplorerError
from explorer_core.files import atomic_folder
from explorer_core.results import (
    EXPLANATION_ARRAYS,
    EXPLANATION_JSON,
    Explanation,
    read_explanation,
    save_explanation,
)

__all__ = ["write_explanation", "load_explanation"]


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path)


def _check_out(out: Path) -> None:
    """``out`` may be new, an empty folder or an earlier explanation folder (replaced); anything
    else is refused so no unrelated folder is ever deleted."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExplorerError(f"--out '{out}' exists and is not a folder; choose a new folder")
    if out.is_dir():
        try:
            entries = os.listdir(out)
        except OSError as exc:
            raise ExplorerError(f"Cannot read the output folder '{out}': {exc.strerror}; "
                                "choose another folder") from exc
        if entries and EXPLANATION_JSON not in entries:
            raise ExplorerError(f"--out '{out}' is a folder with other files; choose a new or "
                                "empty folder (an earlier explanation folder is replaced)")


def write_explanation(expl: Explanation, out: str | os.PathLike, lm: Any, catalog: Any,
                      exclude_target: bool = False) -> list[Path]:
    """Write the explanation folder ``out`` (module docstring); returns the written files.

    Parameters
    ----------
    expl : the explanation (concepts, heatmaps (N, n, h, w), prediction tests, ...).
    out : the folder to create or replace (new, empty, or an earlier explanation folder).
    lm, catalog : the loaded model (class names, preprocessing) and the catalog the crops come
        from (their pixels are cut again for the PNGs).
    exclude_target : the PNGs and summary show the crops with target-class crops excluded.
    """
    out = Path(out)
    _check_out(out)
    try:
        with atomic_folder(out) as tmp:
            names = [p.name for p in save_explanation(expl, tmp)]
            names += _write_pictures(expl, tmp, lm, catalog, exclude_target)
    except OSError as exc:
        raise ExplorerError(f"Cannot write the output folder '{out}': "
                            f"{exc.strerror or exc}; choose a writable folder") from exc
    return [out / n for n in names]


def _write_pictures(expl: Explanation, out: Path, lm: Any, catalog: Any,
                    exclude_target: bool) -> list[str]:
    """PNGs and ``summary.md`` into ``out``; returns their paths relative to ``out``."""
    written: list[str] = []
    names = lm.class_names
    title = names[expl.class_a] + (f" vs {names[expl.class_b]}" if expl.class_b is not None
                                   else "")
    lines = [f"# {title}", "",
             f"Model `{expl.model}`, layer `{expl.layer}`, {len(expl.image_ids)} images, "
             f"n = {expl.n_concepts}, method `{expl.params.get('method')}`, "
             f"variant `{expl.params.get('variant')}`, seed {expl.params.get('seed')}; "
             f"NMF relative error {expl.reconstruction_error:.3f}.", "",
             f"Concept vectors, heatmaps and crop ids: `{EXPLANATION_JSON}` + "
             f"`{EXPLANATION_ARRAYS}` (read them with `explainer.report.load_explanation`).", ""]
    if expl.classifier is not None:
        c = expl.classifier
        lines += [f"Classifier ({c.solver}, label 1 = {names[c.class_a]}): training accuracy "
                  f"{c.accuracy:.3f} on {c.n_pixels_a} + {c.n_pixels_b} pixels.", ""]
        comp = expl.params.get("classifier_comparison")
        if comp:
            lines += ["| solver | accuracy | loss | seconds |", "|---|---|---|---|"]
            lines += [f"| {k} | {v['accuracy']:.3f} | {v['loss']:.4f} | {v['seconds']:.3f} |"
                      for k, v in comp.items()]
            lines.append("")
    for pt, tag in ((expl.prediction_test, "allowed"), (expl.prediction_test_excluded,
                                                         "excluded")):
        if pt is None:
            continue
        _save_png(pt.stitched, out / f"stitched_{tag}.png")
        written.append(f"stitched_{tag}.png")
        verdict = "PASSED" if pt.passed else "FAILED (do not trust this explanation)"
        lines.append(f"- Prediction test, target-class crops {tag}: p({names[pt.target]}) = "
                     f"{pt.prob_target:.3f}, predicted {names[pt.predicted]} -> {verdict}")
    lines.append("")
    for con in expl.concepts:
        crops = con.top_crops(exclude_target)
        d = out / f"concept_{con.index}"
        d.mkdir(exist_ok=True)
        pix = catalog.crop_pixels([c.crop_id for c in crops], lm)
        for j, p in enumerate(pix):
            arr = (p.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
            _save_png(arr, d / f"crop_{j}.png")
            written.append(f"concept_{con.index}/crop_{j}.png")
        lines.append(f"## Concept {con.index} (share {con.importance:.2f})")
        lines += [f"- crop {c.crop_id}: {Path(c.path).name} box {c.box}, cosine {c.score:.3f}, "
                  f"crop predicted {names[c.crop_pred] if c.crop_pred >= 0 else '?'}"
                  for c in crops]
        lines.append("")
    for w in expl.warnings:
        lines.append(f"> warning: {w}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    written.append("summary.md")
    return written


def load_explanation(folder: str | os.PathLike) -> Explanation:
    """The :class:`Explanation` stored in an explanation folder (``explanation.json`` +
    ``arrays.npz``, written by :func:`write_explanation` or the result cache).

    Raises :class:`ExplorerError` when the folder does not hold a readable explanation of this
    format (nothing read can execute code)."""
    folder = Path(folder)
    try:
        return read_explanation(folder)
    except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError,
            zipfile.BadZipFile) as exc:
        raise ExplorerError(f"'{folder}' does not hold a readable explanation "
                            f"({EXPLANATION_JSON} + {EXPLANATION_ARRAYS}): {exc}; write it again "
                            "with 'python -m explainer explain ... --out FOLDER'") from exc
