"""The paper's experiments as one sweep (issue 10): layers x n x samples x attribution methods,
with the CRAFT and random-crops baselines side by side.

:func:`run_sweep` runs the grid over a set of classes and writes, into one output folder:

* ``results.csv`` / ``results.parquet`` - the tidy table, one row per class x setting x
  condition. A setting is ``(layer, n, samples, method)`` where ``method`` is an attribution
  method (ours: ``deeplift``, ``deeplift_smoothgrad``, ``grad_x_act``) or a baseline (``craft``,
  ``random``); the condition is ``allowed`` or ``excluded`` (target-class crops, method.md §3).
  Columns :data:`COLUMNS`: ``prob`` is P(target) of the stitched crops, ``hit`` is 1 when the
  target is the top-1 class; ``error`` holds the message when that setting failed for the class
  (``prob``/``hit`` then empty).
* ``summary.csv`` - mean P(target), hit rate and class count per setting x condition.
* ``sweep.json`` - the settings, the classes, the status (``complete`` or ``partial``),
  timings and warnings.
* ``fig4_excluded_by_n``, ``fig13_allowed_by_n``, ``fig11_excluded_by_samples``,
  ``table67_methods_by_layer`` - plotly figures in the layout of the paper's Fig. 4, Fig. 13,
  Fig. 11 and Tables 6/7, each as ``.html`` and ``.png`` (PNG through kaleido and a Chromium;
  when that fails the HTML is kept and one warning says why).

Work is shared: the attributions of a (layer, samples, method) are computed once for all
classes in shared batches and cached on disk (:func:`explainer.concepts.attribute_classes`), so
every n reuses them; CRAFT's patch activations are cached per (layer, class, samples) without n;
the random baseline's draw depends on neither samples nor method (it is the draw of
:func:`explainer.evaluation.evaluate_prediction_test`). The sweep is resumable: the unit of work
is one class at one (layer, samples, method), and a unit whose rows are all in the output
folder's ``results.csv`` is skipped; the table is rewritten atomically after each unit.
"""

from __future__ import annotations

import csv
import io
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from explorer_core.errors import ExplorerError
from explorer_core.files import atomic_write_bytes, read_json, write_json
from explorer_core.progress import Meter, ProgressFn

from .attribution import METHODS
from .concepts import (
    MAX_CONCEPTS,
    ExplainContext,
    attribute_classes,
    class_images,
    explain_class,
    get_context,
)
from .craft import craft_concepts, random_concepts
from .evaluation import _select_classes

__all__ = ["BASELINES", "COLUMNS", "CONDITIONS", "FIGURES", "SweepSpec", "SweepResult",
           "run_sweep", "load_sweep", "summarize", "sweep_figures", "write_figures",
           "sweeps_dir", "sweep_folder", "list_sweeps", "check_sweep_name"]

BASELINES = ("craft", "random")
CONDITIONS = ("allowed", "excluded")
COLUMNS = ("class", "name", "layer", "n", "samples", "method", "kind", "condition", "prob",
           "hit", "predicted", "n_images", "error")
SUMMARY_COLUMNS = ("layer", "n", "samples", "method", "kind", "condition", "n_classes",
                   "mean_prob", "hit_rate", "failed")
FIGURES = {
    "fig4_excluded_by_n": "Fig. 4: target-class crops excluded, over n",
    "fig13_allowed_by_n": "Fig. 13: target-class crops allowed, over n",
    "fig11_excluded_by_samples": "Fig. 11: target-class crops excluded, over samples",
    "table67_methods_by_layer": "Tables 6/7: methods x layers",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PNG_SIZE = (1100, 560)
_FLUSH_S = 2.0  # rewrite results.csv at most this often (and after the last unit)
IMAGES_PER_BLOCK = 1024
"""Images attributed in one batched call (Lite0 ``bn2``: 1024 x 1280 x 7 x 7 float32 = 0.26
GB of activations; a 28 x 28 layer of 240 channels: 0.77 GB)."""


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep runs. ``layers`` empty: the catalog's default layer. ``samples``: images
    per class (``max_images`` of :func:`~explainer.concepts.explain_class`). ``classes`` (names
    or indices) or a seeded ``limit`` of the classes with at least ``min_images`` predicted
    images (all of them when both are None)."""

    layers: tuple[str, ...] = ()
    n: tuple[int, ...] = (1, 2, 4, 6, 8, 10)
    samples: tuple[int, ...] = (500,)
    methods: tuple[str, ...] = ("deeplift", "grad_x_act")
    baselines: tuple[str, ...] = BASELINES
    classes: tuple[str, ...] | None = None
    limit: int | None = None
    min_images: int = 3
    seed: int = 0
    m: int = 8
    solver: str = "sklearn"
    clamp: bool = False

    def check(self) -> None:
        """Raise :class:`ExplorerError` with one clear message for a bad setting."""
        if not self.n or any(not 1 <= int(k) <= MAX_CONCEPTS for k in self.n):
            raise ExplorerError(f"Numbers of concepts {list(self.n)}: give values in "
                                f"1..{MAX_CONCEPTS}")
        if not self.samples or any(int(s) < 1 for s in self.samples):
            raise ExplorerError(f"Samples {list(self.samples)}: give images per class >= 1")
        bad = [x for x in self.methods if x not in METHODS]
        if bad:
            raise ExplorerError(f"Unknown attribution method(s) {bad}; use "
                                f"{', '.join(METHODS)}")
        bad = [x for x in self.baselines if x not in BASELINES]
        if bad:
            raise ExplorerError(f"Unknown baseline(s) {bad}; use {', '.join(BASELINES)}")
        if not self.methods and not self.baselines:
            raise ExplorerError("Nothing to sweep: give at least one method or baseline")
        if self.limit is not None and self.limit < 1:
            raise ExplorerError(f"limit={self.limit}: use at least 1 class")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SweepSpec:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("layers", "n", "samples", "methods", "baselines", "classes"):
            if known.get(k) is not None:
                known[k] = tuple(known[k])
        return cls(**known)


@dataclass
class SweepResult:
    """A finished (or partial) sweep read from its folder: the tidy rows, the summary rows and
    the record of ``sweep.json``."""

    folder: Path
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    record: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.record.get("status") == "complete"


# --------------------------------------------------------------------------------------------
# sweeps stored under a workspace (the app's Evaluate page names them, never a path)


def check_sweep_name(name: str) -> str:
    """A sweep name: letters, digits, ``_ . -``, at most 64, not starting with a dot."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ExplorerError(f"Sweep name '{name}': use 1-64 letters, digits, '_', '.' or '-', "
                            "starting with a letter or digit")
    return name


def sweeps_dir(ws: Any) -> Path:
    """Where a workspace keeps its sweeps: ``<workspace>/sweeps``."""
    return Path(ws.root) / "sweeps"


def sweep_folder(ws: Any, name: str) -> Path:
    """The folder of the workspace's sweep ``name`` (the name is checked; never a path)."""
    return sweeps_dir(ws) / check_sweep_name(name)


def list_sweeps(ws: Any) -> list[str]:
    """Names of the workspace's sweeps that have a record, newest first."""
    root = sweeps_dir(ws)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and _NAME.match(p.name) and (p / "sweep.json").is_file()]
    return [p.name for p in sorted(found, key=lambda p: -(p / "sweep.json").stat().st_mtime)]


# --------------------------------------------------------------------------------------------
# the table on disk


def _parse_row(raw: dict[str, str]) -> dict[str, Any]:
    def num(x: str, kind: type) -> Any:
        return kind(x) if x not in ("", None) else None

    return {"class": int(raw["class"]), "name": raw["name"], "layer": raw["layer"],
            "n": int(raw["n"]), "samples": int(raw["samples"]), "method": raw["method"],
            "kind": raw["kind"], "condition": raw["condition"],
            "prob": num(raw["prob"], float), "hit": num(raw["hit"], int),
            "predicted": raw["predicted"], "n_images": num(raw["n_images"], int),
            "error": raw["error"]}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The tidy rows of a ``results.csv`` (plain text parsed into numbers; nothing executes);
    an unreadable or foreign file raises :class:`ExplorerError`."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) != COLUMNS:
                raise ExplorerError(f"'{path}' is not a sweep table (columns "
                                    f"{reader.fieldnames}, expected {list(COLUMNS)})")
            return [_parse_row(r) for r in reader]
    except (ValueError, KeyError) as exc:
        raise ExplorerError(f"'{path}' is not a readable sweep table ({exc})") from None


def _csv_bytes(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else
                        (repr(r[k]) if isinstance(r[k], float) else r[k])) for k in columns})
    return buf.getvalue().encode("utf-8")


def _write_parquet(csv_path: Path, out: Path, types: dict[str, str]) -> None:
    """``csv_path`` as Parquet (DuckDB's COPY; column types given), written atomically."""
    import duckdb

    tmp = out.with_name(f".{out.name}.tmp")
    cols = ", ".join(f"'{k}': '{v}'" for k, v in types.items())
    con = duckdb.connect()
    try:
        con.execute(f"COPY (SELECT * FROM read_csv(?, header=true, columns={{{cols}}})) "
                    f"TO '{tmp.as_posix()}' (FORMAT parquet)", [str(csv_path)])
    finally:
        con.close()
    tmp.replace(out)


_ROW_TYPES = {"class": "INTEGER", "name": "VARCHAR", "layer": "VARCHAR", "n": "INTEGER",
              "samples": "INTEGER", "method": "VARCHAR", "kind": "VARCHAR",
              "condition": "VARCHAR", "prob": "DOUBLE", "hit": "INTEGER",
              "predicted": "VARCHAR", "n_images": "INTEGER", "error": "VARCHAR"}
_SUMMARY_TYPES = {"layer": "VARCHAR", "n": "INTEGER", "samples": "INTEGER",
                  "method": "VARCHAR", "kind": "VARCHAR", "condition": "VARCHAR",
                  "n_classes": "INTEGER", "mean_prob": "DOUBLE", "hit_rate": "DOUBLE",
                  "failed": "INTEGER"}


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean P(target) and hit rate per setting x condition (failed rows counted apart)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["layer"], r["n"], r["samples"], r["method"], r["kind"], r["condition"])
        groups.setdefault(key, []).append(r)
    out = []
    for key in sorted(groups, key=lambda k: (k[0], k[4] != "ours", k[3], k[2], k[1], k[5])):
        ok = [r for r in groups[key] if r["prob"] is not None]
        out.append(dict(zip(SUMMARY_COLUMNS[:6], key), n_classes=len(ok),
                        mean_prob=float(np.mean([r["prob"] for r in ok])) if ok else None,
                        hit_rate=float(np.mean([r["hit"] for r in ok])) if ok else None,
                        failed=len(groups[key]) - len(ok)))
    return out


# --------------------------------------------------------------------------------------------
# the grid


def _unit_rows(ctx: ExplainContext, cls: int, setting: str, samples: int, ns: Sequence[int],
               spec: SweepSpec, random_memo: dict[tuple, Any]) -> list[dict[str, Any]]:
    """The rows of one class at one (layer, samples, method or baseline): every n, both
    conditions."""
    rows = []
    names = ctx.lm.class_names
    for n in ns:
        error, expl = "", None
        try:
            if setting == "random":
                key = (ctx.layer, cls, n)
                if key not in random_memo:  # the draw depends on neither samples nor method
                    random_memo[key] = random_concepts(ctx, cls, n, spec.seed, m=spec.m)
                expl = random_memo[key]
            elif setting == "craft":
                expl = craft_concepts(ctx, cls, n_concepts=n, max_images=samples,
                                      seed=spec.seed, m=spec.m, solver=spec.solver,
                                      clamp=spec.clamp)
            else:
                expl = explain_class(ctx, cls, n_concepts=n, method=setting,
                                     max_images=samples, seed=spec.seed, m=spec.m,
                                     solver=spec.solver, clamp=spec.clamp, cache=True)
        except ExplorerError as exc:
            error = str(exc)
        for cond in CONDITIONS:
            pt = None if expl is None else (expl.prediction_test if cond == "allowed"
                                            else expl.prediction_test_excluded)
            rows.append({"class": cls, "name": names[cls], "layer": ctx.layer, "n": int(n),
                         "samples": int(samples), "method": setting,
                         "kind": "baseline" if setting in BASELINES else "ours",
                         "condition": cond,
                         "prob": None if pt is None else float(pt.prob_target),
                         "hit": None if pt is None else int(bool(pt.passed)),
                         "predicted": "" if pt is None else names[pt.predicted],
                         "n_images": None if expl is None else len(expl.image_ids),
                         "error": error or ("" if pt is not None
                                            else "no prediction test in the result")})
    return rows


def _blocks(ctx: ExplainContext, classes: Sequence[int], samples: int, seed: int
            ) -> list[list[int]]:
    """``classes`` in consecutive blocks of at most :data:`IMAGES_PER_BLOCK` images (a class
    with more is a block of its own), so one batched attribution holds a bounded number of
    activation maps (they go to the disk cache; the returned ones are dropped)."""
    blocks: list[list[int]] = [[]]
    held = 0
    for cls in classes:
        k = len(class_images(ctx, cls, samples, seed))
        if blocks[-1] and held + k > IMAGES_PER_BLOCK:
            blocks.append([])
            held = 0
        blocks[-1].append(cls)
        held += k
    return [b for b in blocks if b]


def _key(r: dict[str, Any]) -> tuple:
    return (r["class"], r["layer"], r["n"], r["samples"], r["method"], r["condition"])


def run_sweep(ws_or_ctx: Any, spec: SweepSpec, out: str | Path, *, device: str = "auto",
              progress: ProgressFn | None = None, figures: bool = True,
              png: bool = True) -> SweepResult:
    """Run the sweep ``spec`` and write its folder ``out`` (see the module docstring).

    Rows already in ``out/results.csv`` (an interrupted run with the same settings) are kept
    and their units skipped. Progress: stage ``sweep`` over units (one class at one layer,
    samples and method or baseline) with an ETA; attribution batches report their own stage.
    """
    spec.check()
    ctx0 = get_context(ws_or_ctx, device)
    layers = list(spec.layers) or [ctx0.layer]
    ctxs = {name: ctx0.at_layer(name) for name in layers}  # unknown layers: one clear error
    chosen = _select_classes(ctx0, list(spec.classes) if spec.classes else None,
                             spec.min_images, None, spec.limit, spec.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_csv = out / "results.csv"
    record_path = out / "sweep.json"
    record: dict[str, Any] = {
        "workspace": str(getattr(ctx0.ws, "name", "")), "model": ctx0.lm.spec,
        "spec": spec.to_json(), "layers": layers, "classes": chosen,
        "class_names": [ctx0.lm.class_names[c] for c in chosen], "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": {},
        "warnings": []}
    rows: list[dict[str, Any]] = []
    if results_csv.is_file():
        old = read_json(record_path) if record_path.is_file() else {}
        if old.get("spec", {}).get("seed", spec.seed) != spec.seed or \
                old.get("model", ctx0.lm.spec) != ctx0.lm.spec:
            raise ExplorerError(f"'{out}' holds a sweep with another model or seed; give a new "
                                "--out folder")
        rows = read_rows(results_csv)
    done = {_key(r) for r in rows}
    write_json(record_path, record)

    settings = list(spec.methods) + list(spec.baselines)
    units = [(layer, s, setting, cls) for layer in layers for s in spec.samples
             for setting in settings for cls in chosen]

    def unit_done(u: tuple) -> bool:
        layer, s, setting, cls = u
        return all((cls, layer, int(n), int(s), setting, c) in done
                   for n in spec.n for c in CONDITIONS)

    todo = [u for u in units if not unit_done(u)]
    meter = Meter(progress, "sweep", len(units), "class settings", min_interval=0.0)
    meter.start_at(len(units) - len(todo))
    meter.update(len(units) - len(todo), message=f"{len(todo)} to run", force=True)
    timings = {"attribution": 0.0, "explain": 0.0, "craft": 0.0, "random": 0.0}
    random_memo: dict[tuple, Any] = {}
    attributed: set[tuple] = set()
    last_flush = time.perf_counter()
    for i, (layer, s, setting, cls) in enumerate(todo):
        ctx = ctxs[layer]
        if setting in METHODS and (layer, s, setting) not in attributed:
            # one batched attribution for every class still to do at this (layer, samples, method)
            pending = [c for (la, ss, st, c) in todo[i:] if (la, ss, st) == (layer, s, setting)]
            t = time.perf_counter()
            for block in _blocks(ctx, pending, s, spec.seed):
                try:  # in blocks of classes: the attributions held at once stay bounded
                    attribute_classes(ctx, block, method=setting, max_images=s, seed=spec.seed,
                                      cache=True, progress=progress)
                except ExplorerError:
                    pass  # each class then reports its own error in its rows
            timings["attribution"] += time.perf_counter() - t
            attributed.add((layer, s, setting))
        t = time.perf_counter()
        new = _unit_rows(ctx, cls, setting, s, spec.n, spec, random_memo)
        timings["explain" if setting in METHODS else setting] += time.perf_counter() - t
        fresh = [r for r in new if _key(r) not in done]
        rows.extend(fresh)
        done.update(_key(r) for r in fresh)
        now = time.perf_counter()
        if now - last_flush >= _FLUSH_S or i == len(todo) - 1:
            atomic_write_bytes(results_csv, _csv_bytes(rows, COLUMNS))
            last_flush = now
        meter.update(len(units) - len(todo) + i + 1,
                     message=f"{layer} · samples {s} · {setting} · {ctx.lm.class_names[cls]}")
    if not todo or not results_csv.is_file():
        atomic_write_bytes(results_csv, _csv_bytes(rows, COLUMNS))
    return _finish(out, rows, record, timings, figures=figures, png=png, progress=progress)


def _finish(out: Path, rows: list[dict[str, Any]], record: dict[str, Any],
            timings: dict[str, float], *, figures: bool, png: bool,
            progress: ProgressFn | None) -> SweepResult:
    summary = summarize(rows)
    summary_csv = out / "summary.csv"
    atomic_write_bytes(summary_csv, _csv_bytes(summary, SUMMARY_COLUMNS))
    warnings: list[str] = []
    try:
        _write_parquet(out / "results.csv", out / "results.parquet", _ROW_TYPES)
        _write_parquet(summary_csv, out / "summary.parquet", _SUMMARY_TYPES)
    except Exception as exc:  # noqa: BLE001 - the CSVs are written; say why Parquet is not
        warnings.append(f"Parquet not written ({type(exc).__name__}: {exc})")
    failed = sum(1 for r in rows if r["prob"] is None)
    if failed:
        warnings.append(f"{failed} of {len(rows)} rows failed (see the 'error' column)")
    result = SweepResult(out, rows, summary, record, warnings)
    if figures:
        warnings.extend(write_figures(result, out, png=png, progress=progress))
    record.update(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  seconds={k: round(v, 2) for k, v in timings.items()}, warnings=warnings,
                  rows=len(rows))
    write_json(out / "sweep.json", record)
    return result


def load_sweep(folder: str | Path) -> SweepResult:
    """A sweep folder written by :func:`run_sweep` (``sweep.json`` + ``results.csv``)."""
    folder = Path(folder)
    rec, table = folder / "sweep.json", folder / "results.csv"
    if not rec.is_file():
        raise ExplorerError(f"No sweep in '{folder}' (sweep.json missing)")
    try:
        record = read_json(rec)
    except (ValueError, OSError) as exc:
        raise ExplorerError(f"'{rec}' is not a readable sweep record ({exc})") from None
    if not isinstance(record, dict) or "spec" not in record:
        raise ExplorerError(f"'{rec}' is not a sweep record")
    rows = read_rows(table) if table.is_file() else []
    return SweepResult(folder, rows, summarize(rows), record, list(record.get("warnings", [])))


# --------------------------------------------------------------------------------------------
# figures in the paper's layouts


def _label(layer: str, method: str, many_layers: bool) -> str:
    name = {"craft": "CRAFT", "random": "random crops"}.get(method, method)
    return f"{layer} · {name}" if many_layers else name


def _samples_n(ns: Sequence[int]) -> int:
    """The n of the samples figure: 4 (the paper's default) when swept, else the middle n."""
    ns = sorted(set(int(k) for k in ns))
    return 4 if 4 in ns else ns[len(ns) // 2]


def sweep_figures(result: SweepResult) -> dict[str, Any]:
    """Plotly figures of a sweep, keyed as :data:`FIGURES`: mean P(target) (left) and hit rate
    (right) over n (Fig. 4 excluded, Fig. 13 allowed; at the largest samples) and over samples
    (Fig. 11, excluded, at n = :func:`_samples_n`), one line per layer x method, baselines as
    their own dashed lines; Tables 6/7 as grouped bars of methods per layer (at n = 4 or the
    middle n, the largest samples), both conditions."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    summary = [r for r in result.summary if r["mean_prob"] is not None]
    if not summary:
        return {}
    layers = list(dict.fromkeys(r["layer"] for r in summary))
    methods = list(dict.fromkeys(r["method"] for r in summary if r["kind"] == "ours"))
    methods += [b for b in BASELINES if any(r["method"] == b for r in summary)]
    ns = sorted({r["n"] for r in summary})
    samples = sorted({r["samples"] for r in summary})
    top_s, n_mid = samples[-1], _samples_n(ns)
    many = len(layers) > 1
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
               "#17becf", "#bcbd22", "#7f7f7f"]
    # several layers: one colour per layer (early to late), one line style and marker per
    # method; one layer: one colour per method
    dashes = {"deeplift": "solid", "grad_x_act": "dashdot", "deeplift_smoothgrad": "longdash",
              "craft": "dash", "random": "dot"}
    symbols = {"deeplift": "circle", "grad_x_act": "square", "deeplift_smoothgrad": "diamond",
               "craft": "x", "random": "cross"}

    def lines(cond: str, x: str, fixed: dict[str, int], title: str) -> Any:
        fig = make_subplots(rows=1, cols=2, subplot_titles=("mean P(target)", "hit rate "
                                                            "(top-1 = target)"))
        for li, layer in enumerate(layers):
            for mi, method in enumerate(methods):
                pts = sorted((r[x], r["mean_prob"], r["hit_rate"], r["n_classes"])
                             for r in summary
                             if r["layer"] == layer and r["method"] == method
                             and r["condition"] == cond
                             and all(r[k] == v for k, v in fixed.items()))
                if not pts:
                    continue
                color = palette[(li if many else mi) % len(palette)]
                name = _label(layer, method, many)
                style = dict(color=color, dash=dashes.get(method, "solid"))
                marker = dict(symbol=symbols.get(method, "circle"), size=7)
                xs = [p[0] for p in pts]
                for col, ys in ((1, [p[1] for p in pts]), (2, [p[2] for p in pts])):
                    fig.add_trace(go.Scatter(
                        x=xs, y=ys, mode="lines+markers", name=name, legendgroup=name,
                        showlegend=col == 1, line=style, marker=marker,
                        customdata=[p[3] for p in pts],
                        hovertemplate=f"{name}<br>{x}=%{{x}}<br>%{{y:.3f}} "
                                      "(%{customdata} classes)<extra></extra>"), row=1, col=col)
        ticks = sorted({r[x] for r in summary})
        fig.update_xaxes(title_text=x, type="category" if x == "samples" else "linear",
                         tickvals=ticks)
        fig.update_yaxes(range=[-0.02, 1.02])
        fig.update_layout(title=title, height=560, width=1100, template="plotly_white",
                          legend=dict(font=dict(size=10), orientation="h", yanchor="top",
                                      y=-0.18, xanchor="left", x=0))
        return fig

    figs = {
        "fig4_excluded_by_n": lines("excluded", "n", {"samples": top_s},
                                    f"{FIGURES['fig4_excluded_by_n']} (samples {top_s})"),
        "fig13_allowed_by_n": lines("allowed", "n", {"samples": top_s},
                                    f"{FIGURES['fig13_allowed_by_n']} (samples {top_s})"),
        "fig11_excluded_by_samples": lines(
            "excluded", "samples", {"n": n_mid},
            f"{FIGURES['fig11_excluded_by_samples']} (n = {n_mid})"),
    }
    fig = make_subplots(rows=1, cols=2, subplot_titles=("excluded", "allowed"), shared_yaxes=True)
    for mi, method in enumerate(methods):
        for col, cond in ((1, "excluded"), (2, "allowed")):
            got = {r["layer"]: r for r in summary if r["method"] == method and
                   r["condition"] == cond and r["n"] == n_mid and r["samples"] == top_s}
            xs = [la for la in layers if la in got]
            fig.add_trace(go.Bar(
                x=xs, y=[got[la]["mean_prob"] for la in xs], name=_label("", method, False),
                legendgroup=method, showlegend=col == 1,
                marker_color=palette[mi % len(palette)],
                text=[f"{got[la]['mean_prob']:.2f} / {got[la]['hit_rate']:.0%}" for la in xs],
                textposition="outside"), row=1, col=col)
    fig.update_yaxes(title_text="mean P(target) (label: P / hit rate)", range=[0, 1.15], col=1)
    fig.update_layout(title=f"{FIGURES['table67_methods_by_layer']} (n = {n_mid}, samples "
                            f"{top_s})", barmode="group", height=560, width=1100,
                      template="plotly_white")
    figs["table67_methods_by_layer"] = fig
    return figs


def write_figures(result: SweepResult, out: Path, *, png: bool = True,
                  progress: ProgressFn | None = None) -> list[str]:
    """Write :func:`sweep_figures` as ``<name>.html`` (with one ``plotly.min.js`` beside them:
    they open offline) and
    ``<name>.png`` (kaleido). Returns warnings (one line when PNG export failed)."""
    import plotly.io as pio

    figs = sweep_figures(result)
    if not figs:
        return ["No figures: no setting has a result"]
    meter = Meter(progress, "figures", len(figs), "figures")
    if not (out / "plotly.min.js").is_file():  # one copy of plotly.js for all the pages
        from plotly.offline import get_plotlyjs

        atomic_write_bytes(out / "plotly.min.js", get_plotlyjs().encode())
    for i, (name, fig) in enumerate(figs.items()):
        html = pio.to_html(fig, include_plotlyjs="directory", full_html=True)
        atomic_write_bytes(out / f"{name}.html", html.encode())
        meter.update(i + 1)
    if not png:
        return []
    try:
        pio.write_images(list(figs.values()), [out / f"{k}.png" for k in figs],
                         width=_PNG_SIZE[0], height=_PNG_SIZE[1])
    except Exception as exc:  # noqa: BLE001 - kaleido/Chromium missing or broken: keep HTML
        msg = " ".join(str(exc).split())[:200]
        return [f"PNG export failed, HTML written instead ({type(exc).__name__}: {msg})"]
    return []
