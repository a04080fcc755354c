"""Result types shared by the app, the command line and the tests.

Every stage of the method returns one of these typed objects; nothing returns a bare float.
Each faithfulness result says what higher means (``higher_is_better``) and what it needed.
Arrays are numpy (CPU). ``to_json()`` gives a JSON-safe dict (large arrays left out) for the CLI.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
    the height, fed without resizing. Higher ``prob_target`` is better; ``passed`` = A is argmax."""

    target: int
    exclude_target: bool
    crop_ids: list[int]
    prob_target: float
    predicted: int
    prob_predicted: float
    passed: bool
    stitched: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0, 3), np.uint8))
    higher_is_better: bool = True


@dataclass
class ShiftTestResult:
    """Hyperplane shifting test (paper §5.2.1): Y's output of images predicted as B replaced by
    ``relu(a + t * w)``; ``mean_prob_a[i]`` is the mean softmax of A at ``offsets[i]``.
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


@dataclass
class PatchTestResult:
    """Patch insertion test (paper §6). Probabilities ``(N,)`` per image for A and B, before,
    after inserting the patch and with the control fill of the same area.
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

    @property
    def n_concepts(self) -> int:
        return len(self.concepts)

    @property
    def concept_vectors(self) -> np.ndarray:
        """``(n, C)`` concept vectors, importance order."""
        return np.stack([c.vector for c in self.concepts])

    def to_json(self) -> dict[str, Any]:
        return to_jsonable(self)


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
