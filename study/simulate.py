"""Simulated participants for the intruder study (issue 12, item 6), before recruiting people.

A *machine participant* (an :class:`Observer`) sees the study's trials -- built exactly as a
human participant's (:func:`study.intruder.trials_for`, for a participant called
``simulated``) -- and picks the odd one out by distance in an embedding: each of the 5 crops is
embedded (a model's layer, spatially averaged), and the crop with the lowest mean cosine
similarity to the other 4 is chosen. Observers:

* the workspace's own model at *another layer* (``layer3``): crops forwarded at their native
  size, as the catalog embeds them in ``crop`` mode;
* *another model* (``efficientnet_lite2``, optionally ``efficientnet_lite2@blocks.5``): crops
  resized to its input size, its recommended layer unless one is named.

Results: accuracy per observer overall, per class and per (class, concept) with a Wilson 95 %
interval and the binomial p-value against chance (1/5, :data:`~study.intruder.CHANCE`); the
same observers on a *shuffled control* -- the crops of each class reassigned at random to its
concepts, so a trial's intruder is no longer from another concept -- which should sit at chance;
and trials flagged *ambiguous*: the intruder margin (the chosen crop's oddness minus the
runner-up's, in cosine units) is below ``margin`` for some observer, or the observers choose
different crops.

Cost: one forward per distinct crop of the study and observer (a study of 4 classes x 4
concepts x 8 crops embeds 128 crops), forwarded 32 at a time; the crops' pixels are cut once
when they fit in :data:`PIXELS_IN_RAM`, else per observer and batch (memory: one batch);
nothing stored on disk.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from explorer_core.errors import ExplorerError
from explorer_core.progress import ProgressFn, report

from .intruder import CHANCE, AccuracyStat, Study, Trial, _stat, trials_for

__all__ = ["Observer", "SimTrial", "ObserverResult", "Simulation", "parse_observer",
           "default_observers", "observer_choice", "shuffled_crops", "simulate_study",
           "simulation_csv", "SIM_PARTICIPANT", "DEFAULT_MARGIN"]

SIM_PARTICIPANT = "simulated"
DEFAULT_MARGIN = 0.02
"""Trials whose intruder margin (cosine units) is below this for an observer are ambiguous."""
_BATCH = 32
PIXELS_IN_RAM = 256 << 20
"""Crop pixels up to this many float32 bytes are cut once and shared by the observers; more are
cut again per observer, one batch at a time."""


@dataclass(frozen=True)
class Observer:
    """A machine participant: ``model`` (a spec; ``""`` = the workspace's model) at ``layer``
    (``""`` = the model's recommended layer)."""

    model: str = ""
    layer: str = ""

    @property
    def label(self) -> str:
        who = self.model or "this model"
        return f"{who} · {self.layer}" if self.layer else f"{who} · recommended layer"


@dataclass(frozen=True)
class SimTrial:
    """One simulated trial: per observer the chosen position and the intruder margin."""

    trial: Trial
    choices: tuple[int, ...]
    margins: tuple[float, ...]
    ambiguous: bool
    reason: str = ""


@dataclass(frozen=True)
class ObserverResult:
    observer: Observer
    overall: AccuracyStat
    per_class: list[AccuracyStat]
    per_concept: list[AccuracyStat]
    shuffled: AccuracyStat
    seconds: float


@dataclass
class Simulation:
    """What :func:`simulate_study` found. ``chance`` = 1/5; ``trials`` are the real (not
    shuffled) trials with every observer's choice."""

    study_id: str
    results: list[ObserverResult]
    trials: list[SimTrial]
    margin: float
    chance: float = CHANCE
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def n_ambiguous(self) -> int:
        return sum(t.ambiguous for t in self.trials)


# --------------------------------------------------------------------------------------------
# observers


def parse_observer(text: str, lm: Any) -> Observer:
    """An observer from text: a layer of the workspace's model ``lm`` (``layer3``), or a model
    spec with an optional ``@layer`` (``efficientnet_lite2``, ``efficientnet_lite2@blocks.5``).
    Raises :class:`ExplorerError` for an empty text or an unknown layer of ``lm``."""
    t = (text or "").strip()
    if not t:
        raise ExplorerError("Name an observer: a layer of this model (e.g. layer3) or a model "
                            "(e.g. efficientnet_lite2, efficientnet_lite2@blocks.5)")
    names = {n for n, _ in lm.model.named_modules() if n}
    if t in names:
        return Observer("", t)
    spec, _, layer = t.partition("@")
    from explorer_core.models import parse_spec

    try:
        parse_spec(spec)
    except ExplorerError as err:
        layers = [i.name for i in lm.candidate_layers() if i.nonnegative and "." not in i.name]
        raise ExplorerError(f"'{t}' is neither a layer of {lm.spec} (e.g. "
                            f"{', '.join(layers[-4:]) or 'see its candidate layers'}) nor a "
                            f"model: {err}") from err
    if spec == lm.spec and layer:
        lm.module(layer)  # an unknown layer of this model: the list of valid ones
        return Observer("", layer)
    return Observer(spec, layer)


def default_observers(lm: Any, catalog_layer: str) -> list[Observer]:
    """Two observers that differ from the catalog's view: the workspace model one block
    earlier than ``catalog_layer`` (the last non-negative candidate layer of the previous
    top-level module), and EfficientNet-Lite2 at its recommended layer."""
    top = catalog_layer.split(".")[0]
    names = [info.name for info in lm.candidate_layers() if info.nonnegative]
    stop = names.index(catalog_layer) if catalog_layer in names else len(names)
    earlier = [n for n in names[:stop] if n.split(".")[0] != top]
    out = [Observer("", earlier[-1])] if earlier else []
    return out + [Observer("efficientnet_lite2", "")]


def _observer_model(obs: Observer, lm: Any, device: str) -> tuple[Any, str, bool]:
    """``(loaded model, layer, resize)`` of an observer."""
    if not obs.model or obs.model == lm.spec:
        model, resize = lm, False
    else:
        from explorer_core.models import shared_model

        model, resize = shared_model(obs.model, device), True
    layer = obs.layer or model.recommended_layer
    if not layer:
        raise ExplorerError(f"Model {model.spec} has no recommended layer; name one "
                            f"({model.spec}@LAYER)")
    model.module(layer)  # an unknown layer raises with the candidate layers
    return model, layer, resize


@torch.no_grad()
def _embed(pixels: Callable[[Sequence[int]], torch.Tensor], crop_ids: Sequence[int], model: Any,
           layer: str, resize: bool) -> np.ndarray:
    """``(k, C)`` float32: ``layer``'s activations of the crops, spatially averaged; the crops'
    pixels come from ``pixels(ids)``, :data:`_BATCH` at a time."""
    out = []
    for i in range(0, len(crop_ids), _BATCH):
        x = pixels(list(crop_ids[i:i + _BATCH])).float()
        if resize:
            s = int(model.input_size)
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False,
                              antialias=True).clamp(0, 1)
        _, act = model.logits_and_activations(x, layer)
        out.append(act.float().mean(dim=(2, 3)).cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def observer_choice(emb: np.ndarray) -> tuple[int, float]:
    """The odd one out of ``emb`` (5, C): ``(position, margin)``. Each crop's oddness is one
    minus its mean cosine similarity to the others; the choice is the oddest crop and the margin
    its oddness minus the runner-up's (>= 0; small = ambiguous)."""
    x = np.asarray(emb, np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, n, out=np.zeros_like(x), where=n > 0)
    sim = x @ x.T
    k = len(x)
    mean_sim = (sim.sum(axis=1) - np.diag(sim)) / max(1, k - 1)
    odd = 1.0 - mean_sim
    order = np.argsort(-odd, kind="stable")
    margin = float(odd[order[0]] - odd[order[1]]) if k > 1 else 0.0
    return int(order[0]), margin


# --------------------------------------------------------------------------------------------
# the shuffled control


def shuffled_crops(concept_crops: Mapping[int, Mapping[int, Sequence[int]]], seed: int = 0
                   ) -> dict[int, dict[int, list[int]]]:
    """The crops of each class reassigned at random to its concepts (same concept sizes as far
    as the class's distinct crops allow): a control in which a trial's intruder is a crop like
    the others, so any observer should sit at chance."""
    rng = np.random.default_rng(seed)
    out: dict[int, dict[int, list[int]]] = {}
    for cls in sorted(concept_crops):
        concepts = concept_crops[cls]
        ks = sorted(concepts)
        pool = np.array(sorted({int(c) for k in ks for c in concepts[k]}), np.int64)
        rng.shuffle(pool)
        per = min(len(concepts[k]) for k in ks) if ks else 0
        per = min(per, len(pool) // max(1, len(ks)))
        out[int(cls)] = {int(k): [int(c) for c in pool[i * per:(i + 1) * per]]
                         for i, k in enumerate(ks)}
    return out


# --------------------------------------------------------------------------------------------
# running a simulation


def _accuracy(trials: Sequence[Trial], choices: Sequence[int], class_names: Sequence[str] | None
              ) -> tuple[AccuracyStat, list[AccuracyStat], list[AccuracyStat]]:
    def cname(c: int) -> str:
        return class_names[c] if class_names and 0 <= c < len(class_names) else f"class {c}"

    ok = [int(ch == t.intruder_position) for t, ch in zip(trials, choices)]
    by_class: dict[int, list[int]] = {}
    by_concept: dict[tuple[int, int], list[int]] = {}
    for t, o in zip(trials, ok):
        by_class.setdefault(t.class_idx, []).append(o)
        by_concept.setdefault((t.class_idx, t.concept), []).append(o)
    overall = _stat("overall", sum(ok), len(ok))
    per_class = [_stat(cname(c), sum(v), len(v)) for c, v in sorted(by_class.items())]
    per_concept = [_stat(f"{cname(c)} · concept {k + 1}", sum(v), len(v))
                   for (c, k), v in sorted(by_concept.items())]
    return overall, per_class, per_concept


def simulate_study(study: Study, catalog: Any, lm: Any, observers: Sequence[Observer], *,
                   n_trials: int = 500, seed: int = 0, margin: float = DEFAULT_MARGIN,
                   device: str = "cpu", class_names: Sequence[str] | None = None,
                   progress: ProgressFn | None = None) -> Simulation:
    """Run ``n_trials`` trials of ``study`` with each machine participant of ``observers``.

    ``catalog`` / ``lm``: the study's workspace catalog and model (the crops' pixels are cut
    from the catalog's images through ``lm``'s geometry). The trials are the study's own trial
    construction for the participant :data:`SIM_PARTICIPANT` with ``seed`` as the study seed;
    the shuffled control uses :func:`shuffled_crops` with the same seed."""
    t0 = time.perf_counter()
    if not observers:
        raise ExplorerError("Pick at least one simulated participant (a layer or a model)")
    if not 1 <= int(n_trials) <= 20000:
        raise ExplorerError("Simulated trials must be between 1 and 20000")
    if not 0.0 <= float(margin) <= 1.0:
        raise ExplorerError("The ambiguity margin must be between 0 and 1 (cosine units)")
    crops = study.concept_crops
    if not crops:
        from .intruder import get_study

        crops = get_study(study.path, study.study_id).concept_crops
    base = replace(study, concept_crops=crops, trials_per_participant=int(n_trials),
                   seed=int(seed))
    trials = trials_for(base, SIM_PARTICIPANT)
    control = trials_for(replace(base, concept_crops=shuffled_crops(crops, seed)),
                         SIM_PARTICIPANT)
    ids = sorted({c for t in trials + control for c in t.crop_ids})
    pos = {c: i for i, c in enumerate(ids)}
    side = int(catalog.grid.crop_size)
    if len(ids) * 3 * side * side * 4 <= PIXELS_IN_RAM:
        cut = catalog.crop_pixels(ids, lm)

        def pixels(batch: Sequence[int]) -> torch.Tensor:
            return cut[[pos[c] for c in batch]]
    else:
        def pixels(batch: Sequence[int]) -> torch.Tensor:
            return catalog.crop_pixels(list(batch), lm)
    results: list[ObserverResult] = []
    all_choices: list[list[int]] = []
    all_margins: list[list[float]] = []
    for j, obs in enumerate(observers):
        report(progress, "simulated participants", j, len(observers), "observers",
               message=obs.label)
        t1 = time.perf_counter()
        model, layer, resize = _observer_model(obs, lm, device)
        emb = _embed(pixels, ids, model, layer, resize)
        picks = [observer_choice(emb[[pos[c] for c in t.crop_ids]]) for t in trials]
        ctrl = [observer_choice(emb[[pos[c] for c in t.crop_ids]])[0] for t in control]
        overall, per_class, per_concept = _accuracy(trials, [p for p, _ in picks], class_names)
        shuffled, _, _ = _accuracy(control, ctrl, class_names)
        results.append(ObserverResult(Observer(obs.model, layer), overall, per_class,
                                      per_concept, replace(shuffled, label="shuffled control"),
                                      time.perf_counter() - t1))
        all_choices.append([p for p, _ in picks])
        all_margins.append([m for _, m in picks])
    report(progress, "simulated participants", len(observers), len(observers), "observers")
    sim_trials = []
    for i, t in enumerate(trials):
        ch = tuple(c[i] for c in all_choices)
        mg = tuple(float(m[i]) for m in all_margins)
        why = []
        if min(mg) < margin:
            why.append(f"margin {min(mg):.3f} < {margin:g}")
        if len(set(ch)) > 1:
            why.append("observers disagree")
        sim_trials.append(SimTrial(t, ch, mg, bool(why), "; ".join(why)))
    return Simulation(study.study_id, results, sim_trials, float(margin),
                      seconds=time.perf_counter() - t0)


def simulation_csv(sim: Simulation) -> str:
    """One row per simulated trial: the trial, each observer's choice and margin, the flag."""
    buf = io.StringIO()
    w = csv.writer(buf)
    labels = [r.observer.label for r in sim.results]
    w.writerow(["trial_index", "class", "concept", "intruder_concept", "crop_ids",
                "intruder_position"]
               + [f"chosen[{lab}]" for lab in labels] + [f"margin[{lab}]" for lab in labels]
               + ["ambiguous", "reason"])
    for s in sim.trials:
        t = s.trial
        w.writerow([t.index, t.class_idx, t.concept, t.intruder_concept,
                    ";".join(map(str, t.crop_ids)), t.intruder_position, *s.choices,
                    *(f"{m:.4f}" for m in s.margins), s.ambiguous, s.reason])
    return buf.getvalue()

