"""Result types shared by the app, the command line and the tests.

Every stage of the method returns one of these typed objects; nothing returns a bare float.
Each faithfulness result says what higher means (``higher_is_better``) and what it needed.
Arrays are numpy (CPU). ``to_json()`` gives a JSON-safe dict (large arrays left out) for a
quick look.

On-disk form of an :class:`Explanation` (the result cache and the command line's ``--out``
folders use the same one; :func:`save_explanation` / :func:`read_explanation`)
------------------------------------------------------------------------------------------------
A folder with two files; nothing in them can execute code.

``explanation.json`` (UTF-8, standard JSON; a number that is not finite, e.g. the score of a crop
that was not found by a search, is ``null``)::

    {"format": "concept-explorer/explanation", "version": 1,
     "model", "layer", "class_a", "class_b" (null for a one-class explanation),
     "params" (every parameter that changed the result), "reconstruction_error",
     "image_ids" (catalog ids of the N source images, the order of the heatmaps' first axis),
     "concepts": [{"index", "importance",
                   "crops": [CropRef], "crops_excluded": [CropRef]}, ...]   (importance order),
     "classifier": {class_a, class_b, bias, solver, epochs, lr, accuracy, n_pixels_a,
                    n_pixels_b, seconds, loss} or null,
     "prediction_test", "prediction_test_excluded": {target, exclude_target, crop_ids,
                    prob_target, predicted, prob_predicted, passed, higher_is_better,
                    score ("softmax" | "pixel share"; absent in older files: softmax)} or null,
     "timings": {stage: seconds}, "warnings": [text],
     "arrays": {name: {"shape": [...], "dtype": "..."}}}        (what arrays.npz holds)

    CropRef = {"crop_id", "image_id", "path", "row", "col", "box": [x0, y0, x1, y1],
               "crop_pred", "crop_conf", "image_pred", "image_conf", "score", "label"}

``arrays.npz`` (uncompressed, numeric arrays only; ``np.load(path, allow_pickle=False)``)::

    concept_vectors    (n, C) float32   the concept vectors (NMF basis rows), importance order
    heatmaps           (N, n, h, w)     per-pixel concept strengths over the N source images
    crop_ids           (n, m) int64     top-m crop ids per concept, target class allowed (-1 pad)
    crop_ids_excluded  (n, m) int64     the same with target-class crops excluded (-1 pad)
    classifier_weight  (C,) float32     the A-vs-B classifier's w (contrasts only)
    stitched           (H, W, 3) uint8  the stitched image of the prediction test (allowed)
    stitched_excluded  (H, W, 3) uint8  the same with target-class crops excluded
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .files import read_json, read_npz, write_json, write_npz

__all__ = [
    "CropRef",
    "Concept",
    "ClassifierInfo",
    "Explanation",
    "PredictionTestResult",
    "ShiftTestResult",
    "PatchTestResult",
    "Synthesis",
    "to_jsonable",
    "EXPLANATION_FORMAT",
    "EXPLANATION_VERSION",
    "EXPLANATION_JSON",
    "EXPLANATION_ARRAYS",
    "explanation_record",
    "explanation_from_record",
    "save_explanation",
    "read_explanation",
]


def to_jsonable(obj: Any, *, arrays: bool = False) -> Any:
    """Dataclasses / numpy to plain JSON types. Arrays with more than 64 values are dropped
    unless ``arrays`` is set (then they are listed)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name), arrays=arrays)
                for f in dataclasses.fields(obj) if not f.name.startswith("_")}
    if isinstance(obj, np.ndarray):
        if obj.size > 64 and not arrays:
            return {"array_shape": list(obj.shape)}
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, arrays=arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, arrays=arrays) for v in obj]
    return obj


@dataclass(frozen=True)
class CropRef:
    """One crop of the catalog with its provenance.

    ``box`` is ``(x0, y0, x1, y1)`` in the source image after resize + center crop to the model
    input (``input_size`` square). ``score`` is the cosine similarity to the query vector."""

    crop_id: int
    image_id: int
    path: str
    row: int
    col: int
    box: tuple[int, int, int, int]
    crop_pred: int
    crop_conf: float
    image_pred: int
    image_conf: float
    score: float = float("nan")
    label: int | None = None


@dataclass
class Concept:
    """One concept of an explanation.

    Attributes
    ----------
    index : int
        Rank by importance (0 = largest share of the reconstruction).
    vector : ndarray (C,)
        The NMF basis row (the concept vector) in the layer's channel space.
    importance : float
        Share of the reconstruction: ``sum(W[:, k]) * ||H[k]||`` over the total; sums to 1.
    crops : list of CropRef
        The m nearest crops (cosine), target class allowed.
    crops_excluded : list of CropRef
        The m nearest crops with target-class crops excluded (crop or source image predicted A).
    """

    index: int
    vector: np.ndarray
    importance: float
    crops: list[CropRef] = field(default_factory=list)
    crops_excluded: list[CropRef] = field(default_factory=list)

    def top_crops(self, exclude_target: bool) -> list[CropRef]:
        return self.crops_excluded if exclude_target else self.crops


@dataclass
class ClassifierInfo:
    """The A-vs-B linear classifier ``z = w . x + b``; label 1 = class A, 0 = class B, so
    ``w`` points towards A. Accuracy is on the training pixels (the paper's setting)."""

    class_a: int
    class_b: int
    weight: np.ndarray  # (C,)
    bias: float
    solver: str
    epochs: int
    lr: float
    accuracy: float
    n_pixels_a: int
    n_pixels_b: int
    seconds: float
    loss: float = float("nan")


@dataclass
class PredictionTestResult:
    """Stitched-crops prediction test (paper §4.3): the top-1 crop of each concept stacked along
    the height, fed without resizing. Higher ``prob_target`` is better; ``passed`` = A is argmax.

    ``score`` says what the probabilities are: ``"softmax"`` (a classifier's softmax of A), or
    ``"pixel share"`` (a segmentation model: the share of the stitched image's pixels predicted
    as A; ``predicted`` is then the most predicted class other than the background, and the
    test passes when that is A)."""

    target: int
    exclude_target: bool
    crop_ids: list[int]
    prob_target: float
    predicted: int
    prob_predicted: float
    passed: bool
    stitched: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0, 3), np.uint8))
    higher_is_better: bool = True
    score: str = "softmax"


@dataclass
class ShiftTestResult:
    """Hyperplane shifting test (paper §5.2.1): Y's output of images predicted as B replaced by
    ``relu(a + t * w)``; ``mean_prob_a[i]`` is the mean softmax of A at ``offsets[i]`` (for a
    segmentation model, ``score == "pixel share"``: the mean share of pixels predicted as A).
    Higher ``max_prob_a`` is better (the direction really moves the model to A)."""

    class_a: int
    class_b: int
    offsets: list[float]
    mean_prob_a: list[float]
    mean_prob_b: list[float]
    default_prob_a: float
    max_prob_a: float
    best_offset: float
    n_images: int
    image_ids: list[int] = field(default_factory=list)
    higher_is_better: bool = True
    score: str = "softmax"


@dataclass
class PatchTestResult:
    """Patch insertion test (paper §6). Probabilities ``(N,)`` per image for A and B, before,
    after inserting the patch and with the control fill of the same area (softmax; for a
    segmentation model, ``score == "pixel share"``: the share of pixels predicted as A / B).
    Higher ``mean_delta_a - mean_control_delta_a`` supports the hypothesis that the patch's
    content drives A."""

    class_a: int
    class_b: int
    position: str
    box: tuple[int, int, int, int]
    control: str
    image_ids: list[int]
    prob_a_before: np.ndarray
    prob_a_after: np.ndarray
    prob_a_control: np.ndarray
    prob_b_before: np.ndarray
    prob_b_after: np.ndarray
    prob_b_control: np.ndarray
    higher_is_better: bool = True
    score: str = "softmax"

    @property
    def mean_delta_a(self) -> float:
        return float(np.mean(self.prob_a_after - self.prob_a_before)) if self.image_ids else 0.0

    @property
    def mean_control_delta_a(self) -> float:
        return float(np.mean(self.prob_a_control - self.prob_a_before)) if self.image_ids else 0.0

    @property
    def mean_delta_b(self) -> float:
        return float(np.mean(self.prob_b_after - self.prob_b_before)) if self.image_ids else 0.0


@dataclass
class Explanation:
    """An explanation of class A (``class_b is None``) or of A contrasted against B.

    Attributes
    ----------
    params : dict
        Every parameter that changes the result (n, method, variant, n_images, seed, m, ...).
    image_ids : list of int
        Catalog ids of the images the concepts were computed from (predicted as A).
    concepts : list of Concept
        Ordered by importance, largest first.
    heatmaps : ndarray (N_images, n, h, w)
        Per-pixel concept strengths (NMF ``W``) over the source images, zero where filtered out.
    reconstruction_error : float
        Frobenius ``||V - W H||`` of the NMF, relative to ``||V||``.
    completeness_error : float or None
        DeepLift's relative completeness error on the attributed images (of A, and of B for a
        contrast): ``sum |sum(attr) - (f(x) - f(baseline))| / sum |f(x) - f(baseline)|`` over
        the images, ``f`` the target logit, ``attr`` at the layer (at the input where a skip
        connection bypasses the layer). Float rounding gives about 1e-6; above 1e-2 the
        attributions are wrong and ``warnings`` says so. For ``deeplift_smoothgrad``, that of
        plain DeepLift on the same images; ``None`` for ``grad_x_act``.
    """

    model: str
    layer: str
    class_a: int
    class_b: int | None
    params: dict[str, Any]
    image_ids: list[int]
    concepts: list[Concept]
    heatmaps: np.ndarray
    reconstruction_error: float
    classifier: ClassifierInfo | None = None
    prediction_test: PredictionTestResult | None = None
    prediction_test_excluded: PredictionTestResult | None = None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    completeness_error: float | None = None

    @property
    def n_concepts(self) -> int:
        return len(self.concepts)

    @property
    def concept_vectors(self) -> np.ndarray:
        """``(n, C)`` concept vectors, importance order."""
        return np.stack([c.vector for c in self.concepts])

    def to_json(self) -> dict[str, Any]:
        return to_jsonable(self)


# --------------------------------------------------------------------------------------------
# on-disk form of an Explanation (see the module docstring)

EXPLANATION_FORMAT = "concept-explorer/explanation"
EXPLANATION_VERSION = 1
EXPLANATION_JSON = "explanation.json"
EXPLANATION_ARRAYS = "arrays.npz"

_CROP_FIELDS = ("crop_id", "image_id", "path", "row", "col", "box", "crop_pred", "crop_conf",
                "image_pred", "image_conf", "score", "label")
_CLASSIFIER_FIELDS = ("class_a", "class_b", "bias", "solver", "epochs", "lr", "accuracy",
                      "n_pixels_a", "n_pixels_b", "seconds", "loss")
_TEST_FIELDS = ("target", "exclude_target", "crop_ids", "prob_target", "predicted",
                "prob_predicted", "passed", "higher_is_better", "score")


def _finite(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _json_safe(obj: Any) -> Any:
    """Plain JSON types; non-finite floats become None."""
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, (float, np.floating)):
        return _finite(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    raise TypeError(f"{type(obj).__name__} is not stored in explanation.json")


def _crop_record(c: CropRef) -> dict[str, Any]:
    return {"crop_id": int(c.crop_id), "image_id": int(c.image_id), "path": str(c.path),
            "row": int(c.row), "col": int(c.col), "box": [int(v) for v in c.box],
            "crop_pred": int(c.crop_pred), "crop_conf": _finite(c.crop_conf),
            "image_pred": int(c.image_pred), "image_conf": _finite(c.image_conf),
            "score": _finite(c.score), "label": None if c.label is None else int(c.label)}


def _crop_from(d: Mapping[str, Any]) -> CropRef:
    box = tuple(int(v) for v in d["box"])
    if len(box) != 4:
        raise ValueError(f"crop box {box} is not (x0, y0, x1, y1)")
    label = d.get("label")
    return CropRef(crop_id=int(d["crop_id"]), image_id=int(d["image_id"]), path=str(d["path"]),
                   row=int(d["row"]), col=int(d["col"]), box=box,  # type: ignore[arg-type]
                   crop_pred=int(d["crop_pred"]), crop_conf=_num(d["crop_conf"]),
                   image_pred=int(d["image_pred"]), image_conf=_num(d["image_conf"]),
                   score=_num(d["score"]), label=None if label is None else int(label))


def _padded_ids(lists: list[list[CropRef]]) -> np.ndarray:
    m = max((len(x) for x in lists), default=0)
    out = np.full((len(lists), m), -1, np.int64)
    for k, crops in enumerate(lists):
        out[k, :len(crops)] = [c.crop_id for c in crops]
    return out


def explanation_record(expl: Explanation) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The on-disk form of ``expl``: ``(record for explanation.json, arrays for arrays.npz)``
    (module docstring)."""
    n = len(expl.concepts)
    arrays: dict[str, np.ndarray] = {
        "concept_vectors": (np.stack([np.asarray(c.vector) for c in expl.concepts]) if n
                            else np.zeros((0, 0), np.float32)),
        "heatmaps": np.asarray(expl.heatmaps),
        "crop_ids": _padded_ids([c.crops for c in expl.concepts]),
        "crop_ids_excluded": _padded_ids([c.crops_excluded for c in expl.concepts]),
    }
    classifier = None
    if expl.classifier is not None:
        clf = expl.classifier
        classifier = _json_safe({f: getattr(clf, f) for f in _CLASSIFIER_FIELDS})
        arrays["classifier_weight"] = np.asarray(clf.weight)
    tests: dict[str, Any] = {}
    for name, pt in (("prediction_test", expl.prediction_test),
                     ("prediction_test_excluded", expl.prediction_test_excluded)):
        tests[name] = None
        if pt is not None:
            tests[name] = _json_safe({f: getattr(pt, f) for f in _TEST_FIELDS})
            arrays["stitched" + name[len("prediction_test"):]] = np.asarray(pt.stitched)
    record: dict[str, Any] = {
        "format": EXPLANATION_FORMAT, "version": EXPLANATION_VERSION,
        "model": expl.model, "layer": expl.layer, "class_a": int(expl.class_a),
        "class_b": None if expl.class_b is None else int(expl.class_b),
        "params": _json_safe(expl.params),
        "reconstruction_error": _finite(expl.reconstruction_error),
        "completeness_error": (None if expl.completeness_error is None
                               else _finite(expl.completeness_error)),
        "image_ids": [int(i) for i in expl.image_ids],
        "concepts": [{"index": int(c.index), "importance": _finite(c.importance),
                      "crops": [_crop_record(r) for r in c.crops],
                      "crops_excluded": [_crop_record(r) for r in c.crops_excluded]}
                     for c in expl.concepts],
        "classifier": classifier, **tests,
        "timings": _json_safe(expl.timings), "warnings": [str(w) for w in expl.warnings],
        "arrays": {k: {"shape": list(a.shape), "dtype": str(a.dtype)} for k, a in arrays.items()},
    }
    return record, arrays


def explanation_from_record(record: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
                            ) -> Explanation:
    """The :class:`Explanation` of a record and its arrays (:func:`explanation_record`'s
    output). Raises ``ValueError`` / ``KeyError`` / ``TypeError`` for another format, another
    version or arrays that do not fit the record."""
    if record.get("format") != EXPLANATION_FORMAT or record.get("version") != EXPLANATION_VERSION:
        raise ValueError(f"not a {EXPLANATION_FORMAT} version {EXPLANATION_VERSION} record")
    recs = list(record["concepts"])
    n = len(recs)
    vectors, heatmaps = arrays["concept_vectors"], arrays["heatmaps"]
    image_ids = [int(i) for i in record["image_ids"]]
    if vectors.ndim != 2 or len(vectors) != n:
        raise ValueError(f"concept_vectors {vectors.shape} do not fit {n} concepts")
    if heatmaps.ndim != 4 or heatmaps.shape[:2] != (len(image_ids), n):
        raise ValueError(f"heatmaps {heatmaps.shape} do not fit {len(image_ids)} images x {n}")
    concepts = [Concept(index=int(c["index"]), vector=vectors[k], importance=_num(c["importance"]),
                        crops=[_crop_from(r) for r in c["crops"]],
                        crops_excluded=[_crop_from(r) for r in c["crops_excluded"]])
                for k, c in enumerate(recs)]
    classifier = None
    if record.get("classifier") is not None:
        c = record["classifier"]
        weight = arrays["classifier_weight"]
        if weight.ndim != 1:
            raise ValueError(f"classifier_weight has shape {weight.shape}")
        classifier = ClassifierInfo(
            class_a=int(c["class_a"]), class_b=int(c["class_b"]), weight=weight,
            bias=_num(c["bias"]), solver=str(c["solver"]), epochs=int(c["epochs"]),
            lr=_num(c["lr"]), accuracy=_num(c["accuracy"]), n_pixels_a=int(c["n_pixels_a"]),
            n_pixels_b=int(c["n_pixels_b"]), seconds=_num(c["seconds"]), loss=_num(c["loss"]))
    tests: dict[str, PredictionTestResult | None] = {}
    for name in ("prediction_test", "prediction_test_excluded"):
        t = record.get(name)
        tests[name] = None
        if t is not None:
            stitched = arrays["stitched" + name[len("prediction_test"):]]
            if stitched.dtype != np.uint8 or stitched.ndim != 3:
                raise ValueError(f"stitched image {stitched.shape} {stitched.dtype}")
            tests[name] = PredictionTestResult(
                target=int(t["target"]), exclude_target=bool(t["exclude_target"]),
                crop_ids=[int(i) for i in t["crop_ids"]], prob_target=_num(t["prob_target"]),
                predicted=int(t["predicted"]), prob_predicted=_num(t["prob_predicted"]),
                passed=bool(t["passed"]), stitched=stitched,
                higher_is_better=bool(t.get("higher_is_better", True)),
                score=str(t.get("score", "softmax")))
    class_b = record["class_b"]
    params = record["params"]
    timings = record.get("timings") or {}
    if not isinstance(params, dict) or not isinstance(timings, dict):
        raise TypeError("params and timings must be objects")
    return Explanation(
        model=str(record["model"]), layer=str(record["layer"]), class_a=int(record["class_a"]),
        class_b=None if class_b is None else int(class_b), params=dict(params),
        image_ids=image_ids, concepts=concepts, heatmaps=heatmaps,
        reconstruction_error=_num(record["reconstruction_error"]), classifier=classifier,
        prediction_test=tests["prediction_test"],
        prediction_test_excluded=tests["prediction_test_excluded"],
        timings={str(k): _num(v) for k, v in timings.items()},
        warnings=[str(w) for w in record.get("warnings") or []],
        completeness_error=(None if record.get("completeness_error") is None
                            else _num(record["completeness_error"])))


def save_explanation(expl: Explanation, folder: str | os.PathLike) -> list[Path]:
    """Write ``explanation.json`` and ``arrays.npz`` of ``expl`` into ``folder`` (created if
    needed); returns the two paths."""
    folder = Path(folder)
    record, arrays = explanation_record(expl)
    return [write_npz(folder / EXPLANATION_ARRAYS, arrays),
            write_json(folder / EXPLANATION_JSON, record)]


def read_explanation(folder: str | os.PathLike) -> Explanation:
    """The :class:`Explanation` stored in ``folder`` by :func:`save_explanation`. Nothing read
    can execute code; a missing, truncated or foreign file raises ``OSError`` / ``ValueError``
    / ``KeyError`` / ``TypeError``."""
    folder = Path(folder)
    record = read_json(folder / EXPLANATION_JSON)
    if not isinstance(record, dict):
        raise ValueError(f"{folder / EXPLANATION_JSON} is not an object")
    return explanation_from_record(record, read_npz(folder / EXPLANATION_ARRAYS))


@dataclass
class Synthesis:
    """A concept synthesised by optimisation (method.md §10): an image whose activations at
    ``layer`` align with ``direction``.

    Attributes
    ----------
    layer : str
        The layer the direction lives in.
    direction : ndarray (C,)
        The concept vector optimised for, unit norm.
    image : ndarray (S, S, 3) uint8
        The synthesised image (before the model's normalisation).
    alignment : float
        Cosine between the image's spatially averaged activation at ``layer`` and ``direction``;
        higher is better (1 = the layer sees exactly the concept's direction).
    alignments : ndarray (n,)
        The same cosine for every vector it was synthesised with (``synthesize_concepts``: all
        concepts, its own at ``index``; ``synthesize(..., others=...)``: its own first).
    index : int
        Position of ``direction`` among those vectors.
    steps : int
        Optimisation steps run.
    seconds : float
        Wall time of the optimisation per image (a batch's time divided by its images).
    params : dict
        ``seed``, ``size``, ``steps``, ``lr``, ``objective``, ``cos_power`` (p), ``batch``,
        ``polish``: all that changes the image.
    """

    layer: str
    direction: np.ndarray
    image: np.ndarray = field(repr=False)
    alignment: float
    alignments: np.ndarray
    index: int = 0
    steps: int = 0
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    higher_is_better: bool = True

    @property
    def margin(self) -> float:
        """Own alignment minus the largest alignment with any other vector; > 0 when the image
        aligns with its own concept more than with any other."""
        others = np.delete(self.alignments, self.index)
        return float(self.alignment - others.max()) if others.size else float(self.alignment)
