"""A run taken away: a self-contained HTML report, and the machine-readable files zipped.

* :func:`explanation_html` / :func:`result_html`: one HTML file that opens offline. Every
  picture (crops, stitched prediction-test images, heatmaps with their colour bar) is an inline
  ``data:image/png;base64`` image; no script, no stylesheet and no font is fetched.
* :func:`explanation_zip`: exactly the folder ``python -m explainer explain|contrast --out``
  writes (:func:`explainer.report.write_explanation`: ``explanation.json``, ``arrays.npz``,
  ``summary.md``, ``stitched_*.png``, ``concept_<k>/crop_<j>.png``) plus ``parameters.json``,
  zipped in memory. :func:`result_zip`: a test run's ``result.json`` + ``arrays.npz`` (the run
  history's form; the CLI has no single-test output) plus ``parameters.json``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from explorer_core.files import write_npz
from explorer_core.results import Explanation, to_jsonable

from . import heatmap as hm_mod
from .report import write_explanation

__all__ = ["png_data_uri", "explanation_html", "explanation_zip", "result_html", "result_zip"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1b1b1f}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left;font-size:.9em}.pass{color:#0a7a28;font-weight:600}.fail{color:#b3121f;
font-weight:600}.row{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
figure{margin:0;text-align:center;font-size:.75em;color:#555}
img.px{image-rendering:pixelated}.note{color:#666;font-size:.85em}
"""


def png_data_uri(arr: np.ndarray) -> str:
    """``(H, W, 3)`` uint8 -> ``data:image/png;base64,...``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _u8(t: Any) -> np.ndarray:
    a = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
    if a.ndim == 3 and a.shape[0] == 3:
        a = a.transpose(1, 2, 0)
    return a if a.dtype == np.uint8 else (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def _img(arr: np.ndarray, width: int, caption: str = "", alt: str = "") -> str:
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (f'<figure><img class="px" src="{png_data_uri(arr)}" width="{int(width)}" '
            f'alt="{html.escape(alt or caption)}">{cap}</figure>')


def _name(names: Sequence[str], c: Any) -> str:
    try:
        return str(names[int(c)])
    except (IndexError, TypeError, ValueError):
        return str(c)


def _params_table(params: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v))}</td></tr>"
                   for k, v in to_jsonable(dict(params), arrays=True).items())
    return f'<table class="params">{rows}</table>'


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{body}"
            f'<p class="note">Written by the concept explorer; every picture is embedded, the '
            f"file opens offline.</p></body></html>\n")


def _test_block(pt: Any, names: Sequence[str], tag: str) -> str:
    verdict = ('<span class="pass">PASS</span>' if pt.passed
               else '<span class="fail">FAIL</span> (do not trust this explanation)')
    score = "P" if getattr(pt, "score", "softmax") == "softmax" else "pixel share"
    return (f'<div class="row test">{_img(pt.stitched, 48, alt=f"stitched crops ({tag})")}'
            f"<div><b>Prediction test, target-class crops {tag}</b>: {verdict}<br>"
            f"{score}({html.escape(_name(names, pt.target))}) = {pt.prob_target:.3f}; "
            f"predicted {html.escape(_name(names, pt.predicted))} "
            f"({pt.prob_predicted:.3f}); crops {', '.join(map(str, pt.crop_ids))}</div></div>")


def explanation_html(expl: Explanation, lm: Any, catalog: Any, *,
                     params: Mapping[str, Any] | None = None, exclude_target: bool = False,
                     title: str | None = None, n_heatmap_images: int = 4,
                     n_strongest: int = 4, opacity: float = 0.6) -> str:
    """The report of an explanation or contrast (module docstring): parameters, prediction
    tests, classifier, per concept its crops and the ``n_strongest`` source images where its
    heatmap is strongest (ranked, overlaid), and heatmaps over the first ``n_heatmap_images``
    source images with a colour bar."""
    names = lm.class_names
    what = _name(names, expl.class_a) + (f" vs {_name(names, expl.class_b)}"
                                         if expl.class_b is not None else "")
    title = title or f"Concepts of {what}"
    body = [f"<p>Model <code>{html.escape(expl.model)}</code>, layer "
            f"<code>{html.escape(expl.layer)}</code>, {len(expl.image_ids)} source images, "
            f"{expl.n_concepts} concepts, NMF relative error {expl.reconstruction_error:.3f}; "
            f"crops shown with target-class crops {'excluded' if exclude_target else 'allowed'}."
            "</p>", "<h2>Parameters</h2>",
            _params_table({**expl.params, **(params or {})})]
    body.append("<h2>Prediction tests</h2>")
    for pt, tag in ((expl.prediction_test, "allowed"), (expl.prediction_test_excluded,
                                                        "excluded")):
        if pt is not None:
            body.append(_test_block(pt, names, tag))
    if expl.classifier is not None:
        c = expl.classifier
        body.append(f"<p>A-vs-B classifier ({html.escape(c.solver)}): training accuracy "
                    f"{c.accuracy:.3f} on {c.n_pixels_a} + {c.n_pixels_b} pixels.</p>")
    heat = np.asarray(expl.heatmaps)
    scales = hm_mod.concept_scales(heat) if heat.size else np.zeros(0)
    body.append("<h2>Concepts</h2>")
    for con in expl.concepts:
        crops = con.top_crops(exclude_target)
        pix = catalog.crop_pixels([r.crop_id for r in crops], lm) if crops else []
        figs = "".join(_img(_u8(p), 72, f"#{r.crop_id} · {r.score:.2f}", f"crop {r.crop_id}")
                       for r, p in zip(crops, pix))
        body.append(f'<h3>Concept {con.index + 1} · share {con.importance:.0%}</h3>'
                    f'<div class="row crops">{figs}</div>')
        if heat.size and con.index < heat.shape[1] and n_strongest > 0:
            top = hm_mod.strongest_images(heat, list(expl.image_ids), con.index, n_strongest)
            pos = {int(i): j for j, i in enumerate(expl.image_ids)}
            imgs = catalog.image_pixels([i for i, _ in top], lm)
            figs = "".join(_img(hm_mod.overlay(_u8(p), heat[pos[i], con.index],
                                               float(scales[con.index]), opacity), 96,
                                f"{r + 1}. image {i} · max {v:.2f}", f"image {i}")
                           for r, ((i, v), p) in enumerate(zip(top, imgs)))
            body.append("<p class=\"note\">Where its heatmap is strongest (source images "
                        "ranked by the concept's maximum strength):</p>"
                        f'<div class="row strongest">{figs}</div>')
    k = min(int(n_heatmap_images), len(expl.image_ids))
    if heat.size and k > 0:
        body.append("<h2>Concept heatmaps</h2><p class=\"note\">NMF concept strength per pixel "
                    "(ours, not the paper's), one scale per concept: dark 0, bright yellow at "
                    "its 99.5th percentile.</p>")
        body.append(_img(hm_mod.colorbar(256, 12), 256, "0 → full strength", "colour bar"))
        imgs = catalog.image_pixels(list(expl.image_ids[:k]), lm)
        for i in range(k):
            img = _u8(imgs[i])
            row = [_img(img, 112, f"image {expl.image_ids[i]}")]
            row += [_img(hm_mod.overlay(img, heat[i, c], float(scales[c]), opacity), 112,
                         f"concept {c + 1}") for c in range(heat.shape[1])]
            body.append(f'<div class="row heat">{"".join(row)}</div>')
    for w in expl.warnings:
        body.append(f"<p class=\"note\">warning: {html.escape(str(w))}</p>")
    return _page(title, "".join(body))


def _zip_folder(folder: Path, extra: Mapping[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder).as_posix())
        for name, data in extra.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _params_json(params: Mapping[str, Any] | None) -> bytes:
    return (json.dumps(to_jsonable(dict(params or {}), arrays=True), indent=1) + "\n").encode()


def explanation_zip(expl: Explanation, lm: Any, catalog: Any, *,
                    params: Mapping[str, Any] | None = None,
                    exclude_target: bool = False) -> bytes:
    """The CLI's explanation folder (module docstring) plus ``parameters.json``, as zip bytes."""
    with tempfile.TemporaryDirectory(prefix="explorer-export-") as tmp:
        out = Path(tmp) / "explanation"
        write_explanation(expl, out, lm, catalog, exclude_target)
        return _zip_folder(out, {"parameters.json": _params_json(params)})


_TEST_TITLES = {"stitch": "Stitched-crops test", "patch": "Patch insertion test",
                "shift": "Shifting test"}


def result_html(kind: str, record: Mapping[str, Any], params: Mapping[str, Any],
              class_names: Sequence[str], title: str = "") -> str:
    """The report of a test run (``record``: the run history's result of a stitch, patch or
    shift test: its JSON fields, with pixel arrays such as ``stitched`` as uint8 arrays)."""
    body = ["<h2>Parameters</h2>", _params_table(params), "<h2>Result</h2>"]
    stitched = record.get("stitched")
    if isinstance(stitched, np.ndarray) and stitched.size:
        body.append(_img(stitched, 48, "stitched crops"))
    scalars = {k: v for k, v in record.items()
               if not isinstance(v, (list, dict, np.ndarray)) and k != "type"}
    for k in ("target", "predicted", "class_a", "class_b"):
        if k in scalars:
            scalars[k] = f"{scalars[k]} ({_name(class_names, scalars[k])})"
    if "passed" in record:
        body.append('<p><span class="pass">PASS</span></p>' if record["passed"]
                    else '<p><span class="fail">FAIL</span></p>')
    body.append(_params_table(scalars))
    series = {k: v for k, v in record.items() if isinstance(v, list) and v
              and all(isinstance(x, (int, float)) for x in v)}
    if series:
        n = max(len(v) for v in series.values())
        head = "".join(f"<th>{html.escape(k)}</th>" for k in series)
        rows = "".join("<tr>" + "".join(f"<td>{_cell(v, i)}</td>" for v in series.values())
                       + "</tr>" for i in range(n))
        body.append(f"<table class=\"series\"><tr>{head}</tr>{rows}</table>")
    return _page(title or _TEST_TITLES.get(kind, kind), "".join(body))


def _cell(values: list, i: int) -> str:
    if i >= len(values):
        return ""
    v = values[i]
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def result_zip(record: Mapping[str, Any], params: Mapping[str, Any]) -> bytes:
    """A test run's ``result.json`` + ``arrays.npz`` + ``parameters.json`` as zip bytes."""
    arrays = {k: v for k, v in record.items() if isinstance(v, np.ndarray)}
    rec = {k: v for k, v in record.items() if not isinstance(v, np.ndarray)}
    with tempfile.TemporaryDirectory(prefix="explorer-export-") as tmp:
        d = Path(tmp)
        write_npz(d / "arrays.npz", arrays)
        (d / "result.json").write_text(json.dumps(to_jsonable(rec, arrays=True), indent=1) + "\n")
        return _zip_folder(d, {"parameters.json": _params_json(params)})
