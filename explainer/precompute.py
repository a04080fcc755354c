"""Precompute everything once (issue 9 item 4): every requested class's explanation and every
requested pair's contrast classifier, stored in the workspace's result cache so that
:func:`~explainer.concepts.explain_class`, :func:`~explainer.contrast.contrast_classes`, the app
and the command line find them instead of computing.

Stages (each reports its own progress with an ETA, :class:`~explorer_core.progress.Meter`)
------------------------------------------------------------------------------------------
``attribution``  the classes' attributed activations, in shared batches over classes
                 (:func:`~explainer.concepts.attribute_classes`, blocks of at most
                 ``images_per_block`` images so memory stays bounded), cached per class.
``concepts``     each class's explanation (:func:`~explainer.concepts.explain_class` with the
                 same parameters, so a later call with them is a cache hit).
``pairs``        for each class A, its classifiers against every requested partner B > A in
                 one batched training (:func:`~explainer.contrast.train_pair_classifiers`:
                 exactly the paper's SGD per pair); B's pixels are fed in blocks of at most
                 ``block_bytes``. Only i < j is trained: B vs A is A vs B with its sign flipped
                 (:func:`~explainer.contrast.precomputed_classifier`).
``contrasts``    optional (``contrasts=True``): each requested pair's contrasted explanation,
                 both directions (:func:`~explainer.contrast.contrast_classes`, which then uses
                 the stored classifier).

Storage (all in ``ws.cache_dir``, one key rule: :mod:`explorer_core.cache`)
---------------------------------------------------------------------------
- ``attr/``, ``explain/``, ``contrast/``: the entries the normal calls write and read.
- ``pairs/``: one entry per class A (key :func:`~explainer.contrast.pair_params`): ``pairs.npz``
  with ``classes_b`` (J,) int64, ``weight`` (J, C) float32, ``bias`` (J,) float32,
  ``accuracy`` / ``loss`` (J,) float64, ``n_pixels_b`` (J,) int64, and ``pairs.json`` with
  ``class_a``, ``n_pixels_a``, ``epochs``, ``lr``, ``seconds``, ``created``. A later run with
  more partners merges into it.
- ``precompute/``: one record per parameter set (:func:`run_params`): which classes, pairs and
  contrasts a precompute stored and when (``status.json``), for the app's "precomputed on ..."
  notes, :func:`precompute_status` and ``python -m explainer export``.

Resuming: every unit is its own entry (a class's attribution, a class's explanation, a class's
pair classifiers, a contrast), and a run skips what is stored, so a killed run redoes only what
was missing (at most one class's pair block, or one attribution block).

Confusable pairs (``pairs="confusable"``)
-----------------------------------------
From the catalog's top-5 predictions: ``count(A, B)`` = images predicted as A with B among their
ranks 2..``confusable_top`` (default 2: B is the runner-up) plus images predicted as B with A
there. A pair {A, B} of the chosen classes is confusable when ``count(A, B) >=
confusable_min`` (default 3) and B is among A's ``confusable_partners`` (default 10) most
confused partners or A among B's, so there are at most ``classes x confusable_partners`` pairs.
"""

from __future__ import annotations

import csv
import datetime as _dt
import itertools
import re
import time
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from explorer_core import cache as _cache
from explorer_core.errors import ExplorerError
from explorer_core.files import atomic_folder, read_json, write_json
from explorer_core.progress import Meter, Progress, ProgressFn, report
from explorer_core.results import Explanation, read_explanation

from .attribution import check_method
from .concepts import (
    ExplainContext,
    _attr_params,
    _check_params,
    attribute_classes,
    explain_class,
    explain_params,
    get_context,
    resolve_class,
)
from .contrast import (
    PairClassifiers,
    class_contrast_pixels,
    contrast_classes,
    contrast_params,
    fetch_pair_classifiers,
    store_pair_classifiers,
    train_pair_classifiers,
)

__all__ = ["PAIR_MODES", "PrecomputeSummary", "precompute", "select_classes", "confusable_pairs",
           "run_params", "cached_explanation", "precomputed_note", "has_precomputed_classifier",
           "precompute_status", "ExportSummary", "export_precomputed"]

PAIR_MODES = ("none", "all", "confusable")
RECORD_KIND = "precompute"
_RECORD_FILE = "status.json"
_COMMAND = "`python -m explainer precompute`"


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _entry_time(ctx: ExplainContext, kind: str, params: dict[str, Any]) -> str:
    """When an existing entry was stored (its ``key.json``'s modification time, UTC)."""
    try:
        mtime = (_cache.entry_dir(ctx.ws.cache_dir, kind, params) / _cache.KEY_FILE).stat().st_mtime
    except OSError:
        return _now()
    return _dt.datetime.fromtimestamp(mtime, _dt.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# what to precompute


def select_classes(ctx: ExplainContext, classes: Sequence[int | str] | None = None, *,
                   all_classes: bool = False, min_images: int = 1) -> list[int]:
    """The classes to precompute, ascending: the given ones (names or indices), or with
    ``all_classes`` every class with at least ``min_images`` images predicted as it."""
    counts = ctx.catalog.predicted_counts()
    if classes:
        if all_classes:
            raise ExplorerError("Give either a list of classes or all classes, not both")
        chosen = sorted({resolve_class(ctx.lm, c) for c in classes})
        empty = [c for c in chosen if counts.get(c, 0) == 0]
        if empty:
            raise ExplorerError(f"No image of workspace '{ctx.ws.name}' is predicted as class(es) "
                                f"{empty}; drop them from the classes")
        return chosen
    if not all_classes:
        raise ExplorerError("Say which classes to precompute: a list of classes, or all classes "
                            "(--all)")
    chosen = sorted(c for c, k in counts.items() if k >= max(1, int(min_images)))
    if not chosen:
        raise ExplorerError(f"No class has at least {min_images} predicted images in workspace "
                            f"'{ctx.ws.name}'; lower --min-images or add images")
    return chosen


def confusable_pairs(ctx: ExplainContext, classes: Sequence[int], *, top: int = 2,
                     min_count: int = 3, partners: int = 10) -> list[tuple[int, int]]:
    """The confusable pairs ``(a, b)``, ``a < b``, among ``classes`` (module docstring): the
    symmetric count of images predicted as one with the other among ranks 2..``top`` is at
    least ``min_count``, and each pair is among the ``partners`` most confused partners of one
    of its classes. Sorted."""
    chosen = {int(c) for c in classes}
    count: dict[tuple[int, int], int] = {}
    for a, b, n in ctx.catalog.confusion_counts(top):
        if a in chosen and b in chosen:
            key = (min(a, b), max(a, b))
            count[key] = count.get(key, 0) + n
    ranked: dict[int, list[tuple[int, int]]] = {}
    for (a, b), n in count.items():
        if n >= min_count:
            ranked.setdefault(a, []).append((n, b))
            ranked.setdefault(b, []).append((n, a))
    keep: set[tuple[int, int]] = set()
    for a, lst in ranked.items():
        for _n, b in sorted(lst, key=lambda t: (-t[0], t[1]))[:max(1, int(partners))]:
            keep.add((min(a, b), max(a, b)))
    return sorted(keep)


def run_params(ctx: ExplainContext, *, n_concepts: int = 4, method: str = "deeplift",
               variant: str = "paper", max_images: int = 500, seed: int = 0, m: int = 8,
               solver: str = "sklearn", clamp: bool = False) -> dict[str, Any]:
    """The key of a precompute record: the parameters its explanations share (which classes
    and pairs it covers is the record's content)."""
    return {**ctx.base_params(), "n": int(n_concepts), "method": method, "variant": variant,
            "max_images": int(max_images), "seed": int(seed), "m": int(m), "solver": solver,
            "clamp": bool(clamp)}


# --------------------------------------------------------------------------------------------
# the record of what a precompute stored


def _read_record(folder: Path) -> dict[str, Any]:
    rec = read_json(folder / _RECORD_FILE)
    if not (isinstance(rec, dict) and isinstance(rec.get("classes"), dict)
            and isinstance(rec.get("pairs"), dict) and isinstance(rec.get("contrasts"), dict)):
        raise ValueError("not a precompute record")
    return rec


class _Record:
    """The precompute record of one parameter set, kept up to date while a run goes on (written
    at most every ``interval`` seconds, and at the end of every stage and of the run, also when
    it is interrupted)."""

    def __init__(self, ctx: ExplainContext, params: dict[str, Any], interval: float = 10.0):
        self.ctx, self.params, self.interval = ctx, params, interval
        got = _cache.fetch(ctx.ws.cache_dir, RECORD_KIND, params, _read_record)
        self.data: dict[str, Any] = got or {"created": _now(), "classes": {}, "pairs": {},
                                            "contrasts": {}, "failed": {}}
        self.data.setdefault("failed", {})
        self._dirty = False
        self._last = time.monotonic()

    def mark(self, section: str, key: str, value: Any) -> None:
        self.data[section][key] = value
        self._dirty = True
        self.flush(force=False)

    def fail(self, key: str, message: str) -> None:
        self.mark("failed", key, message)

    def ok(self, key: str) -> None:
        if self.data["failed"].pop(key, None) is not None:
            self._dirty = True

    def flush(self, force: bool = True) -> None:
        if not self._dirty or (not force and time.monotonic() - self._last < self.interval):
            return
        self.data["updated"] = _now()
        data = dict(self.data)
        _cache.store(self.ctx.ws.cache_dir, RECORD_KIND, self.params,
                     lambda d: write_json(d / _RECORD_FILE, data))
        self._dirty = False
        self._last = time.monotonic()


# --------------------------------------------------------------------------------------------
# precompute


@dataclass
class PrecomputeSummary:
    """What a :func:`precompute` run did.

    ``explained`` / ``explained_cached``: explanations computed now / found stored;
    ``pairs``: requested pairs (unordered); ``pairs_trained`` / ``pairs_cached``: classifiers
    trained now / found stored; ``contrasts*`` likewise (both directions); ``failed``: what
    could not be computed and why; ``seconds``: wall time per stage."""

    classes: list[int]
    pair_mode: str
    explained: int = 0
    explained_cached: int = 0
    pairs: int = 0
    pairs_trained: int = 0
    pairs_cached: int = 0
    contrasts: int = 0
    contrasts_computed: int = 0
    attributed: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"classes": len(self.classes), "pair_mode": self.pair_mode,
                "explained": self.explained, "explained_cached": self.explained_cached,
                "attributed_classes": self.attributed, "pairs": self.pairs,
                "pairs_trained": self.pairs_trained, "pairs_cached": self.pairs_cached,
                "contrasts": self.contrasts, "contrasts_computed": self.contrasts_computed,
                "failed": dict(self.failed),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


class _PixelPool:
    """Classes' contrast pixels (k, C) on the host, least recently used dropped beyond
    ``max_bytes`` (each class is read from its cached attribution when missing)."""

    def __init__(self, ctx: ExplainContext, kw: dict[str, Any], max_bytes: int) -> None:
        self.ctx, self.kw, self.max_bytes = ctx, kw, int(max_bytes)
        self._d: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._bytes = 0

    def get(self, cls: int) -> torch.Tensor:
        x = self._d.get(cls)
        if x is not None:
            self._d.move_to_end(cls)
            return x
        x = class_contrast_pixels(self.ctx, cls, warnings=[], **self.kw).contiguous()
        self._d[cls] = x
        self._bytes += x.numel() * x.element_size()
        while self._bytes > self.max_bytes and len(self._d) > 1:
            _, old = self._d.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
        return x


def _default_block_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(64 << 20, free // 5)  # training holds ~4x the B pixels
    return 512 << 20


def _meter_feed(meter: Meter, base: int, stage: str) -> ProgressFn:
    def feed(p: Progress) -> None:
        if p.stage == stage:
            meter.update(base + p.done)

    return feed


def precompute(ws_or_ctx: Any, classes: Sequence[int | str] | None = None, *,
               all_classes: bool = False, pairs: str = "none", n_concepts: int = 4,
               method: str = "deeplift", variant: str = "paper", max_images: int = 500,
               seed: int = 0, m: int = 8, solver: str = "sklearn", clamp: bool = False,
               epochs: int = 100, lr: float = 0.01, min_images: int = 1,
               confusable_top: int = 2, confusable_min: int = 3, confusable_partners: int = 10,
               contrasts: bool = False, images_per_block: int = 1024,
               block_bytes: int | None = None, pool_bytes: int = 4 << 30,
               device: str | torch.device = "auto", progress: ProgressFn | None = None
               ) -> PrecomputeSummary:
    """Precompute and store the explanations of ``classes`` (or ``all_classes``) and the
    contrast classifiers of their ``pairs`` (``none``, ``all`` pairs of the chosen classes, or
    ``confusable`` ones, see the module docstring), resumably (module docstring).

    Parameters
    ----------
    ws_or_ctx : ExplainContext | Workspace | str
    classes : class names or indices; or ``all_classes`` with at least ``min_images`` images.
    pairs : ``none`` | ``all`` | ``confusable`` (``confusable_top``, ``confusable_min``,
        ``confusable_partners``: the rule's parameters).
    n_concepts, method, variant, max_images, seed, m, solver, clamp : as in
        :func:`~explainer.concepts.explain_class` (the same defaults, so the app's default view
        finds them).
    epochs, lr : the classifiers' SGD (the paper: 100 epochs at lr 0.01, zero init).
    contrasts : also store the contrasted explanation of every requested pair, both ways.
    images_per_block : images attributed per block (bounds memory: a block's activations
        ``images x C x h x w`` float32 are held at once).
    block_bytes : the most bytes of B pixels in one batched training (None: a fifth of the free
        GPU memory on CUDA, 512 MiB on the CPU); pool_bytes: contrast pixels kept on the host.
    progress : reports stages ``attribution`` (images), ``concepts`` (classes), ``pairs``
        (pairs) and ``contrasts`` (pairs), each with rate and ETA; raising from it stops the
        run, and a rerun continues where it stopped.

    Returns
    -------
    PrecomputeSummary (counts, failures, seconds per stage).
    """
    ctx = get_context(ws_or_ctx, device)
    _check_params(n_concepts, method, variant, solver, max_images, m)
    check_method(method)
    if pairs not in PAIR_MODES:
        raise ExplorerError(f"Unknown pairs mode '{pairs}'; use one of {', '.join(PAIR_MODES)}")
    if epochs < 1 or not lr > 0:
        raise ExplorerError(f"epochs={epochs}, lr={lr}: use at least 1 epoch and lr > 0")
    if images_per_block < 1 or pool_bytes < 1 or (block_bytes is not None and block_bytes < 1):
        raise ExplorerError("images_per_block, block_bytes and pool_bytes must be positive")
    chosen = select_classes(ctx, classes, all_classes=all_classes, min_images=min_images)
    if pairs == "all":
        pair_list = list(itertools.combinations(chosen, 2))
    elif pairs == "confusable":
        pair_list = confusable_pairs(ctx, chosen, top=confusable_top, min_count=confusable_min,
                                     partners=confusable_partners)
    else:
        pair_list = []
    settings: dict[str, Any] = dict(n_concepts=n_concepts, method=method, variant=variant,
                    max_images=max_images, seed=seed, m=m, solver=solver, clamp=clamp)
    pair_kw: dict[str, Any] = dict(method=method, variant=variant, max_images=max_images, seed=seed,
                   epochs=epochs, lr=lr, clamp=clamp)
    summary = PrecomputeSummary(classes=chosen, pair_mode=pairs, pairs=len(pair_list),
                                params={**run_params(ctx, **settings), "pairs": pairs,
                                        "epochs": int(epochs), "lr": float(lr),
                                        "contrasts": bool(contrasts)})
    record = _Record(ctx, run_params(ctx, **settings))
    record.data["pair_settings"] = {"epochs": int(epochs), "lr": float(lr)}
    try:
        # what is missing (cheap checks; nothing large is read)
        explain_todo = []
        for cls in chosen:
            p = explain_params(ctx, cls, **settings)
            if not _cache.exists(ctx.ws.cache_dir, "explain", p):
                explain_todo.append(cls)
            else:
                summary.explained_cached += 1
                record.ok(f"class {cls}")
                record.mark("classes", str(cls), record.data["classes"].get(
                    str(cls)) or _entry_time(ctx, "explain", p))
        by_a: dict[int, list[int]] = {}
        for a, b in pair_list:
            by_a.setdefault(a, []).append(b)
        stored: dict[int, PairClassifiers] = {}
        pair_todo: dict[int, list[int]] = {}
        for a, bs in by_a.items():
            pc = fetch_pair_classifiers(ctx, a, **pair_kw)
            have = set() if pc is None else {int(c) for c in pc.classes_b}
            if pc is not None:
                stored[a] = pc
            miss = [b for b in bs if b not in have]
            summary.pairs_cached += len(bs) - len(miss)
            if miss:
                pair_todo[a] = miss
            else:
                record.mark("pairs", str(a), len(have))
        contrast_todo: list[tuple[int, int]] = []
        if contrasts:
            for a, b in pair_list:
                for x, y in ((a, b), (b, a)):
                    p = contrast_params(ctx, x, y, **settings, epochs=epochs, lr=lr)
                    if _cache.exists(ctx.ws.cache_dir, "contrast", p):
                        record.mark("contrasts", f"{x},{y}", record.data["contrasts"].get(
                            f"{x},{y}") or _entry_time(ctx, "contrast", p))
                    else:
                        contrast_todo.append((x, y))
        summary.contrasts = 2 * len(pair_list) if contrasts else 0

        # stage 1: attribution, in shared batches over classes
        t = time.perf_counter()
        need = set(explain_todo) | {c for a, bs in pair_todo.items() for c in (a, *bs)}
        need |= {c for p in contrast_todo for c in p}
        attr_todo = [c for c in sorted(need) if not _cache.exists(
            ctx.ws.cache_dir, "attr", _attr_params(ctx, c, method, max_images, seed))]
        counts = ctx.catalog.predicted_counts()
        sizes = {c: min(counts.get(c, 0), int(max_images)) for c in attr_todo}
        meter = Meter(progress, "attribution", sum(sizes.values()), "images")
        meter.update(0, force=True)
        done = 0
        for block in _blocks(attr_todo, sizes, images_per_block):
            attribute_classes(ctx, block, method=method, max_images=max_images, seed=seed,
                              cache=True, progress=_meter_feed(meter, done, "attribution"))
            done += sum(sizes[c] for c in block)
            meter.update(done, message=f"{len(block)} classes")
        summary.attributed = len(attr_todo)
        summary.seconds["attribution"] = time.perf_counter() - t
        record.flush()

        # stage 2: each class's explanation (the normal cache entry)
        t = time.perf_counter()
        meter = Meter(progress, "concepts", len(explain_todo), "classes")
        meter.update(0, force=True)
        for i, cls in enumerate(explain_todo):
            try:
                explain_class(ctx, cls, **settings, cache=True)
            except ExplorerError as exc:
                summary.failed[f"class {cls}"] = str(exc)
                record.fail(f"class {cls}", str(exc))
            else:
                summary.explained += 1
                record.ok(f"class {cls}")
                record.mark("classes", str(cls), _now())
            meter.update(i + 1, message=ctx.lm.class_names[cls])
        summary.seconds["concepts"] = time.perf_counter() - t
        record.flush()

        # stage 3: the pair classifiers, all partners of a class in one batched training
        t = time.perf_counter()
        total = sum(len(v) for v in pair_todo.values())
        meter = Meter(progress, "pairs", total, "pairs")
        meter.update(0, force=True)
        dev = torch.device(ctx.lm.device)
        limit = _default_block_bytes(dev) if block_bytes is None else int(block_bytes)
        pool = _PixelPool(ctx, dict(method=method, variant=variant, max_images=max_images,
                                    seed=seed, cache=True, clamp=clamp), pool_bytes)
        done = 0
        for a in sorted(pair_todo):
            miss = pair_todo[a]
            xa = pool.get(a)
            if len(xa) == 0:
                msg = f"class {a} has no contrast pixels (positive attribution)"
                for b in miss:
                    summary.failed[f"pair {a},{b}"] = msg
                done += len(miss)
                meter.update(done)
                continue
            new: PairClassifiers | None = None
            done_a = 0
            for block_b, xbs in _pixel_blocks(pool, miss, limit):
                for b in [b for b, x in zip(block_b, xbs) if len(x) == 0]:
                    summary.failed[f"pair {a},{b}"] = (f"class {b} has no contrast pixels "
                                                       "(positive attribution)")
                keep = [(b, x) for b, x in zip(block_b, xbs) if len(x)]
                if keep:
                    got = train_pair_classifiers(xa, [x for _, x in keep], class_a=a,
                                                 classes_b=[b for b, _ in keep], epochs=epochs,
                                                 lr=lr, device=dev)
                    new = got if new is None else new.merged(got)
                    summary.pairs_trained += len(keep)
                done += len(block_b)
                done_a += len(block_b)
                if done_a < len(miss):  # the last block reports once A's entry is stored
                    meter.update(done, message=f"class {a}")
            if new is not None:
                pc = new if a not in stored else stored[a].merged(new)
                store_pair_classifiers(ctx, pc, **pair_kw)
                record.mark("pairs", str(a), len(pc))
            meter.update(done, message=f"class {a}")
        summary.seconds["pairs"] = time.perf_counter() - t
        record.flush()

        # stage 4 (optional): contrasted explanations of the pairs, both directions
        if contrast_todo:
            t = time.perf_counter()
            meter = Meter(progress, "contrasts", len(contrast_todo), "pairs")
            meter.update(0, force=True)
            for i, (x, y) in enumerate(contrast_todo):
                try:
                    contrast_classes(ctx, x, y, **settings, epochs=epochs, lr=lr, cache=True)
                except ExplorerError as exc:
                    summary.failed[f"contrast {x},{y}"] = str(exc)
                else:
                    summary.contrasts_computed += 1
                    record.mark("contrasts", f"{x},{y}", _now())
                meter.update(i + 1)
            summary.seconds["contrasts"] = time.perf_counter() - t
    finally:
        record.flush()
    report(progress, "done", 1, 1)
    return summary


def _blocks(classes: Sequence[int], sizes: dict[int, int], limit: int) -> Iterator[list[int]]:
    """Consecutive groups of classes with at most ``limit`` images in all (a larger class alone)."""
    block: list[int] = []
    total = 0
    for c in classes:
        if block and total + sizes[c] > limit:
            yield block
            block, total = [], 0
        block.append(c)
        total += sizes[c]
    if block:
        yield block


def _pixel_blocks(pool: _PixelPool, classes: Sequence[int], limit: int
                  ) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
    """Consecutive groups of classes whose contrast pixels take at most ``limit`` bytes (a
    larger class alone), with those pixels."""
    names: list[int] = []
    xs: list[torch.Tensor] = []
    total = 0
    for c in classes:
        x = pool.get(c)
        size = x.numel() * x.element_size()
        if names and total + size > limit:
            yield names, xs
            names, xs, total = [], [], 0
        names.append(c)
        xs.append(x)
        total += size
    if names:
        yield names, xs


# --------------------------------------------------------------------------------------------
# what the app and the export read


def cached_explanation(ws_or_ctx: Any, class_a: int | str, class_b: int | str | None = None,
                       *, n_concepts: int = 4, method: str = "deeplift", variant: str = "paper",
                       max_images: int = 500, seed: int = 0, m: int = 8,
                       solver: str = "sklearn", clamp: bool = False, epochs: int = 100,
                       lr: float = 0.01, device: str | torch.device = "auto",
                       layer: str | None = None) -> Explanation | None:
    """The stored explanation of class A (or of A contrasted against B, with the paper's SGD
    classifier) for these parameters at ``layer`` (default: the context's), or None; computes
    nothing. The parameters and defaults are those of
    :func:`~explainer.concepts.explain_class` / ``contrast_classes``."""
    ctx = get_context(ws_or_ctx, device, layer)
    a = resolve_class(ctx.lm, class_a)
    settings: dict[str, Any] = dict(n_concepts=n_concepts, method=method, variant=variant,
                    max_images=max_images, seed=seed, m=m, solver=solver, clamp=clamp)
    if class_b is None:
        return _cache.fetch(ctx.ws.cache_dir, "explain", explain_params(ctx, a, **settings),
                            read_explanation)
    b = resolve_class(ctx.lm, class_b)
    return _cache.fetch(ctx.ws.cache_dir, "contrast",
                        contrast_params(ctx, a, b, **settings, epochs=epochs, lr=lr),
                        read_explanation)


def has_precomputed_classifier(ws_or_ctx: Any, class_a: int | str, class_b: int | str, *,
                               method: str = "deeplift", variant: str = "paper",
                               max_images: int = 500, seed: int = 0, epochs: int = 100,
                               lr: float = 0.01, clamp: bool = False,
                               device: str | torch.device = "auto",
                               layer: str | None = None) -> bool:
    """Whether the A-vs-B classifier (either direction) at ``layer`` (default: the context's)
    is stored by a precompute."""
    ctx = get_context(ws_or_ctx, device, layer)
    lo, hi = sorted((resolve_class(ctx.lm, class_a), resolve_class(ctx.lm, class_b)))
    pc = fetch_pair_classifiers(ctx, lo, method=method, variant=variant, max_images=max_images,
                                seed=seed, epochs=epochs, lr=lr, clamp=clamp)
    return pc is not None and hi in pc


def _record_of(ctx: ExplainContext, params: dict[str, Any]) -> dict[str, Any] | None:
    return _cache.fetch(ctx.ws.cache_dir, RECORD_KIND, params, _read_record)


def _day(iso: str) -> str:
    try:
        return _dt.datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return iso


def precomputed_note(ws_or_ctx: Any, expl: Explanation, device: str | torch.device = "auto"
                     ) -> str | None:
    """A line for the user when ``expl`` (or its contrast classifier) was stored by a
    precompute at ``expl``'s layer: ``precomputed on <date> by `python -m explainer
    precompute```; else None."""
    try:
        ctx = get_context(ws_or_ctx, device, expl.layer or None)
    except ExplorerError:  # a layer the catalog does not have
        return None
    p = expl.params
    try:
        params = run_params(ctx, n_concepts=int(p["n"]), method=str(p["method"]),
                            variant=str(p["variant"]), max_images=int(p["max_images"]),
                            seed=int(p["seed"]), m=int(p["m"]), solver=str(p["solver"]),
                            clamp=bool(p["clamp"]))
    except (KeyError, TypeError, ValueError):
        return None
    rec = _record_of(ctx, params)
    if expl.class_b is None:
        when = rec and rec["classes"].get(str(expl.class_a))
        return f"precomputed on {_day(when)} by {_COMMAND}" if when else None
    when = rec and rec["contrasts"].get(f"{expl.class_a},{expl.class_b}")
    if when:
        return f"precomputed on {_day(when)} by {_COMMAND}"
    when = p.get("classifier_precomputed")
    if when:
        return (f"A-vs-B classifier precomputed on {_day(str(when))} by {_COMMAND} (batched, "
                "the paper's SGD; not trained again)")
    return None


def precompute_status(ws_or_ctx: Any, device: str | torch.device = "auto"
                      ) -> list[dict[str, Any]]:
    """What precomputes stored for this workspace's current catalog and code: one dict per
    parameter set, latest first: ``n``, ``method``, ``variant``, ``max_images``, ``seed``,
    ``m``, ``solver``, ``clamp``, ``classes`` / ``pairs`` / ``contrasts`` (counts),
    ``failed`` (count), ``created``, ``updated``."""
    ctx = get_context(ws_or_ctx, device)
    base = ctx.base_params()
    out = []
    for stamp in sorted((Path(ctx.ws.cache_dir) / RECORD_KIND).glob(f"*/{_cache.KEY_FILE}")):
        try:
            key = read_json(stamp, max_bytes=1 << 20)
            params = key["params"]
            if not isinstance(params, dict) or any(params.get(k) != v for k, v in base.items()):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        rec = _record_of(ctx, params)
        if rec is None:
            continue
        out.append({**{k: v for k, v in params.items() if k not in base},
                    "classes": len(rec["classes"]),
                    "pairs": int(sum(int(v) for v in rec["pairs"].values())),
                    "contrasts": len(rec["contrasts"]), "failed": len(rec.get("failed", {})),
                    "created": rec.get("created"), "updated": rec.get("updated")})
    return sorted(out, key=lambda r: str(r.get("updated")), reverse=True)


# --------------------------------------------------------------------------------------------
# export


@dataclass
class ExportSummary:
    """What :func:`export_precomputed` wrote into ``out``."""

    out: Path
    explanations: int = 0
    contrasts: int = 0
    pairs: int = 0
    missing: list[str] = field(default_factory=list)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:60] or "class"


def _check_export_out(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExplorerError(f"--out '{out}' exists and is not a folder; choose a new folder")
    if out.is_dir():
        entries = [p.name for p in out.iterdir()]
        if entries and "index.csv" not in entries:
            raise ExplorerError(f"--out '{out}' is a folder with other files; choose a new or "
                                "empty folder (an earlier export is replaced)")


_PAIR_COLUMNS = (("class_a", "INTEGER"), ("name_a", "VARCHAR"), ("class_b", "INTEGER"),
                 ("name_b", "VARCHAR"), ("accuracy", "DOUBLE"), ("loss", "DOUBLE"),
                 ("n_pixels_a", "BIGINT"), ("n_pixels_b", "BIGINT"), ("bias", "DOUBLE"),
                 ("weight_row", "BIGINT"))


def export_precomputed(ws_or_ctx: Any, out: str | Path, *, n_concepts: int = 4,
                       method: str = "deeplift", variant: str = "paper", max_images: int = 500,
                       seed: int = 0, m: int = 8, solver: str = "sklearn", clamp: bool = False,
                       epochs: int = 100, lr: float = 0.01, exclude_target: bool = False,
                       device: str | torch.device = "auto",
                       progress: ProgressFn | None = None) -> ExportSummary:
    """Write everything a precompute with these parameters stored into the folder ``out``
    (new, empty, or an earlier export, replaced only when the new one is complete):

    - ``explanations/<class>-<name>/``: each class's explanation folder
      (:func:`~explainer.report.write_explanation`: ``explanation.json`` + ``arrays.npz``,
      readable with :func:`~explainer.report.load_explanation`, plus PNGs and ``summary.md``);
      ``contrasts/<a>-<name>__vs__<b>-<name>/`` likewise for precomputed contrasts;
    - ``pairs.csv`` and ``pairs.parquet`` (DuckDB ``COPY``): ``class_a, name_a, class_b,
      name_b, accuracy, loss, n_pixels_a, n_pixels_b, bias, weight_row``, one row per trained
      pair ``class_a < class_b`` (label 1 = class_a; B vs A is the negated classifier);
    - ``pair_weights.npz``: ``class_a`` (P,), ``class_b`` (P,) int64, ``weight`` (P, C)
      float32 (row ``weight_row`` of the table), ``bias`` (P,) float32; written one class at a
      time (memory bounded);
    - ``index.csv``: ``kind, class_a, name_a, class_b, name_b, folder, n_images,
      prob_allowed, passed_allowed, prob_excluded, passed_excluded``;
    - ``precompute.json``: the parameters and the record of the precompute.
    """
    from .report import write_explanation

    ctx = get_context(ws_or_ctx, device)
    settings: dict[str, Any] = dict(n_concepts=n_concepts, method=method, variant=variant,
                    max_images=max_images, seed=seed, m=m, solver=solver, clamp=clamp)
    params = run_params(ctx, **settings)
    rec = _record_of(ctx, params)
    if rec is None:
        have = precompute_status(ctx)
        hint = ("; precomputed here: " + "; ".join(
            f"n={r['n']} method={r['method']} max_images={r['max_images']} seed={r['seed']}"
            for r in have)) if have else ""
        raise ExplorerError(f"Nothing is precomputed in workspace '{ctx.ws.name}' with these "
                            f"parameters; run 'python -m explainer precompute --workspace ...' "
                            f"first (with the same --n, --method, --max-images, --seed){hint}")
    out = Path(out)
    _check_export_out(out)
    names = ctx.lm.class_names
    summary = ExportSummary(out=out)
    pair_kw: dict[str, Any] = dict(method=method, variant=variant, max_images=max_images, seed=seed,
                   epochs=epochs, lr=lr, clamp=clamp)
    classes = sorted(int(c) for c in rec["classes"])
    contrast_pairs = sorted(tuple(int(v) for v in k.split(",")) for k in rec["contrasts"])
    pair_as = sorted(int(a) for a in rec["pairs"])
    meter = Meter(progress, "export", len(classes) + len(contrast_pairs) + len(pair_as),
                  "entries")
    done = 0
    try:
        with atomic_folder(out) as tmp:
            index: list[dict[str, Any]] = []
            for cls in classes:
                expl = cached_explanation(ctx, cls, **settings)
                if expl is None:
                    summary.missing.append(f"class {cls}")
                else:
                    folder = f"explanations/{cls:04d}-{_safe(names[cls])}"
                    write_explanation(expl, tmp / folder, ctx.lm, ctx.catalog, exclude_target)
                    index.append(_index_row("explain", expl, names, folder))
                    summary.explanations += 1
                done += 1
                meter.update(done)
            for a, b in contrast_pairs:
                expl = cached_explanation(ctx, a, b, **settings, epochs=epochs, lr=lr)
                if expl is None:
                    summary.missing.append(f"contrast {a},{b}")
                else:
                    folder = (f"contrasts/{a:04d}-{_safe(names[a])}__vs__"
                              f"{b:04d}-{_safe(names[b])}")
                    write_explanation(expl, tmp / folder, ctx.lm, ctx.catalog, exclude_target)
                    index.append(_index_row("contrast", expl, names, folder))
                    summary.contrasts += 1
                done += 1
                meter.update(done)
            summary.pairs = _write_pairs(ctx, tmp, pair_as, pair_kw, summary, meter, done)
            cols = ["kind", "class_a", "name_a", "class_b", "name_b", "folder", "n_images",
                    "prob_allowed", "passed_allowed", "prob_excluded", "passed_excluded"]
            with open(tmp / "index.csv", "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=cols)
                w.writeheader()
                w.writerows(index)
            write_json(tmp / "precompute.json", {"params": params, "pair_settings": {
                "epochs": int(epochs), "lr": float(lr)}, "record": rec,
                "written": {"explanations": summary.explanations,
                            "contrasts": summary.contrasts, "pairs": summary.pairs,
                            "missing": summary.missing}})
    except OSError as exc:
        raise ExplorerError(f"Cannot write the export folder '{out}': {exc.strerror or exc}; "
                            "choose a writable folder") from exc
    return summary


def _index_row(kind: str, expl: Explanation, names: Sequence[str], folder: str
               ) -> dict[str, Any]:
    pa, pe = expl.prediction_test, expl.prediction_test_excluded
    b = expl.class_b
    return {"kind": kind, "class_a": expl.class_a, "name_a": names[expl.class_a],
            "class_b": "" if b is None else b, "name_b": "" if b is None else names[b],
            "folder": folder, "n_images": len(expl.image_ids),
            "prob_allowed": "" if pa is None else f"{pa.prob_target:.6g}",
            "passed_allowed": "" if pa is None else int(pa.passed),
            "prob_excluded": "" if pe is None else f"{pe.prob_target:.6g}",
            "passed_excluded": "" if pe is None else int(pe.passed)}


def _write_pairs(ctx: ExplainContext, folder: Path, pair_as: Sequence[int],
                 pair_kw: dict[str, Any], summary: ExportSummary, meter: Meter, done: int
                 ) -> int:
    """``pairs.csv`` / ``pairs.parquet`` (DuckDB COPY) and ``pair_weights.npz``. Memory stays
    bounded: the first pass over the entries keeps only their small columns, the second streams
    the weight rows into the ``.npz`` one class at a time."""
    import duckdb

    names = ctx.lm.class_names
    rows: list[tuple[int, int]] = []  # (class A, J) of the readable entries
    small: dict[str, list[np.ndarray]] = {"class_a": [], "class_b": [], "bias": []}
    dim = 0
    total = 0
    con = duckdb.connect()
    try:
        con.execute("CREATE TABLE pairs (" + ", ".join(f"{c} {t}" for c, t in _PAIR_COLUMNS)
                    + ")")
        for a in pair_as:
            pc = fetch_pair_classifiers(ctx, a, **pair_kw)
            if pc is None:
                summary.missing.append(f"pairs of class {a}")
                continue
            J = len(pc)
            dim = dim or pc.weight.shape[1]
            chunk = {"class_a": np.full(J, a, np.int32), "name_a": np.full(J, names[a]),
                     "class_b": pc.classes_b.astype(np.int32),
                     "name_b": np.asarray([names[int(b)] for b in pc.classes_b]),
                     "accuracy": pc.accuracy, "loss": pc.loss,
                     "n_pixels_a": np.full(J, pc.n_pixels_a, np.int64),
                     "n_pixels_b": pc.n_pixels_b, "bias": pc.bias.astype(np.float64),
                     "weight_row": np.arange(total, total + J, dtype=np.int64)}
            con.register("chunk", chunk)
            con.execute("INSERT INTO pairs SELECT " + ", ".join(c for c, _ in _PAIR_COLUMNS)
                        + " FROM chunk")
            con.unregister("chunk")
            small["class_a"].append(np.full(J, a, np.int64))
            small["class_b"].append(pc.classes_b.astype(np.int64))
            small["bias"].append(pc.bias.astype(np.float32))
            rows.append((a, J))
            total += J
        for name, fmt in (("pairs.csv", "(FORMAT csv, HEADER true)"),
                          ("pairs.parquet", "(FORMAT parquet)")):
            target = str(folder / name).replace("'", "''")
            con.execute(f"COPY (SELECT * FROM pairs ORDER BY weight_row) TO '{target}' {fmt}")
    finally:
        con.close()
    with zipfile.ZipFile(folder / "pair_weights.npz", "w", compression=zipfile.ZIP_STORED,
                         allowZip64=True) as zf:
        for key, parts in small.items():
            arr = (np.concatenate(parts) if parts
                   else np.zeros(0, np.float32 if key == "bias" else np.int64))
            with zf.open(f"{key}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, arr, allow_pickle=False)
        with zf.open("weight.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_1_0(fh, {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                "fortran_order": False, "shape": (total, dim)})
            for a, J in rows:
                pc = fetch_pair_classifiers(ctx, a, **pair_kw)
                if pc is None or len(pc) != J:
                    raise ExplorerError(f"The pair classifiers of class {a} changed during the "
                                        "export; run it again")
                fh.write(np.ascontiguousarray(pc.weight, np.float32).tobytes())
                done += 1
                meter.update(done)
    return total
