"""Concepts synthesised by optimisation (method.md §10; paper App. E; Olah et al. 2017).

For a concept vector ``v`` (C,) at a layer ``Y`` (a row of an explanation's ``H``, or a contrast's
direction), an image is optimised so that ``Y``'s activations align with ``v``. It shows what the
concept responds to, where the nearest dataset crops can only show what the dataset contains.

Recipe (lucid / lucent; Olah et al. 2017, "Feature Visualization")
-----------------------------------------------------------------
* **Parameterisation.** ``n`` images are a spectrum ``z`` (n, 3, S, S // 2 + 1, 2) of ``rfft2``
  coefficients scaled by ``1 / max(|f|, 1 / S)`` (1/f amplitudes, so the optimiser does not start
  with high-frequency noise), inverse-FFT'd, divided by 4, mixed through the square root of the
  ImageNet colour-correlation matrix (decorrelated colour), ``sigmoid`` to ``[0, 1]``, then the
  model's own normalisation (:meth:`LoadedModel.normalize`).
* **Robustness transforms** each step, drawn per image from one seeded generator: grey padding by
  ``P``, a random shift of ``0..P`` px, a random scale in ``[0.95, 1.05]`` and rotation in
  ``[-5, 5]`` degrees (one bilinear ``grid_sample``), another shift of ``0..P``; the model always
  sees ``S x S``. ``P = max(2, round(S / 24))``: 2 px at 32, 4 at 96, 9 at 224 (lucid's 12 / 8 / 4
  px are for 224 px images and would swamp a 32 px crop).
* **Objective** for an image and a unit ``v``, ``a_xy`` (C,) the activation at position
  ``(x, y)`` of the transformed image (``objective=``):

  - ``"cosine"`` (default): ``mean_xy cos(a_xy, v)``;
  - ``"dot_cos"``: ``mean_xy <a_xy, v> * max(cos(a_xy, v), 0.1) ** p`` (lucid's
    ``direction_cossim``, ``p = cos_power``).

  Adam, ``lr = 0.05``, ``steps`` steps, the objective averaged over ``batch`` transformed copies.
* **Polish.** The last ``polish`` share of the steps (default a quarter) optimises the plain
  image, without transforms: the image shown and measured is the plain one.

Why the two departures from the usual recipe: measured on the demo world (10 classes x 4 concepts
of ``explain_class(n_concepts=4, max_images=60)``, 32 px, 256 steps, seed 0); "aligned" counts
the images that align with their own concept more than with any other concept of the explanation,
"norm" is the median norm of their mean activation (500 random catalog crops: median 6, 90th
percentile 40, max 57):

=================================  =========  ========  =============================
objective                          polish     aligned   norm
=================================  =========  ========  =============================
``dot_cos`` p=4 (lucid)            0          34 / 40   99
``dot_cos`` p=4                    0.25       35 / 40   148
``cosine``                         0          36 / 40   35
``cosine`` (default)               0.25       40 / 40   32
=================================  =========  ========  =============================

(``dot_cos`` with p=8 gave 27 / 40 at 128 steps, p=16 9 / 40: from a random start the factor
``cos ** p`` is too flat to climb.) The concepts of one explanation are close to each other
(cosines 0.5-0.92 between the NMF rows of a demo class), so an image must align with its own
concept to about 0.97 to be nearer to it than to a sibling. The ``<a, v>`` factor rewards the
activation's *size* along anything near ``v``; the optimiser buys size where a sibling concept
lies, at activation norms 2-3 times those of any real crop. The cosine objective asks for the
direction only and stays at the activation sizes of real crops. The transforms keep the image
free of pixel-level tricks but blur its alignment at a 2 x 2 layer output; the polish steps settle
the plain image. Every synthesised crop set passed the stitched prediction test with either
objective (10 / 10 classes). ``dot_cos`` stays available for brighter pictures.

Library decision
----------------
torch-lucent is not a dependency: what we would use of it (``param.image(fft=True,
decorrelate=True)`` and ``transform.standard_transforms``) is about a hundred lines, and its last
release (0.1.8, 2021) does not serve better here. It installs and imports with torch 2.14 here,
but it pins ``kornia<=0.4.1`` (2020) and declares pytest, pytest-mock, coverage, coveralls and
ipython as *runtime* dependencies (they would land in the app's environment); ``render_vis``
upsamples every image under 224 px to 224 (a 32 px crop would be optimised at a size the
prediction test never feeds), hard-codes ImageNet normalisation (the demo model and
EfficientNet-Lite use their own), hooks every module of the model and leaves the hooks on; its
randomness comes from the global ``numpy`` / ``torch`` generators and its device is fixed at
import time, so a seeded call would have to reset global state. The code below follows lucent's
``optvis/param/spatial.py``, ``optvis/param/color.py`` and ``optvis/transform.py`` (Apache 2.0)
and lucid's ``optvis`` (the colour matrix and the ``/ 4`` constant are theirs).

Cost
----
Time per concept, 256 steps, on the development machine (2 CPU cores shared with other jobs: the
two figures are at load averages of about 5 and 8), one torch thread, demo model, layer
``layer4.relu_out``, batch 1:

* 32 px (crop): 0.8-1.4 s with the 4 concepts of an explanation in one batch; 0.4-0.7 s with 40
  concepts in one batch;
* 96 px (full image): 3.0-5.4 s with 4 in one batch; 2.8-7.4 s alone.

With two torch threads on the same busy cores the optimisation (thousands of tiny ops) ran 6-60
times slower (32 px, 4 concepts: 9-47 s); callers on a small shared CPU should use one thread.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from explorer_core import cache as _cache
from explorer_core.errors import ExplorerError
from explorer_core.files import read_npz
from explorer_core.models import LoadedModel, capture_layer
from explorer_core.progress import Meter, ProgressFn
from explorer_core.results import PredictionTestResult, Synthesis

from .faithfulness import prediction_tests, stitch

__all__ = [
    "COLOR_CORRELATION_SVD_SQRT",
    "DEFAULT_STEPS",
    "OBJECTIVES",
    "SYNTHESIS_KIND",
    "Synthesis",
    "alignment_matrix",
    "cached_syntheses",
    "fetch_syntheses",
    "synthesis_key",
    "mean_activations",
    "stitch_syntheses",
    "synthesis_prediction_test",
    "synthesize",
    "synthesize_concepts",
]

DEFAULT_STEPS = 256
"""Adam steps per image (the recipe's "a few hundred")."""
DEFAULT_LR = 0.05
DEFAULT_COS_POWER = 4.0
"""``p`` of the ``dot_cos`` objective ``<a, v> * cos(a, v) ** p``."""
DEFAULT_POLISH = 0.25
"""Share of the steps, at the end, run on the plain image (no transforms)."""
OBJECTIVES = ("cosine", "dot_cos")

COLOR_CORRELATION_SVD_SQRT = np.asarray([[0.26, 0.09, 0.02],
                                         [0.27, 0.00, -0.05],
                                         [0.27, -0.09, 0.03]], dtype=np.float32)
"""Square root of ImageNet's RGB colour-correlation matrix (lucid ``optvis/param/color.py``)."""
_COLOR = COLOR_CORRELATION_SVD_SQRT / np.max(np.linalg.norm(COLOR_CORRELATION_SVD_SQRT, axis=0))
_SPECTRUM_DIVISOR = 4.0  # lucid's constant: less saturation of the sigmoid at the start
_INIT_SD = 0.01
_SCALES = (0.95, 1.05)
_DEGREES = 5.0
_COS_FLOOR = 0.1


# --------------------------------------------------------------------------------------------
# parameterisation


def _frequencies(size: int) -> torch.Tensor:
    """``|f|`` on the ``rfft2`` grid of a ``size x size`` image: ``(size, size // 2 + 1)``."""
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


class _FourierImage:
    """``n`` images of ``size x size``: a 1/f-scaled spectrum with decorrelated colour (lucent
    ``param.image(fft=True, decorrelate=True)``).

    ``params`` (n, 3, S, S // 2 + 1, 2) is what the optimiser changes; :meth:`pixels` gives
    ``(n, 3, S, S)`` in ``[0, 1]``."""

    def __init__(self, n: int, size: int, generator: torch.Generator, device: torch.device
                 ) -> None:
        self.size = size
        freqs = _frequencies(size)
        scale = 1.0 / torch.clamp(freqs, min=1.0 / size)
        self.scale = scale[None, None, :, :, None].to(device)
        init = torch.randn((n, 3, *freqs.shape, 2), generator=generator) * _INIT_SD
        self.params = init.to(device).requires_grad_(True)
        self.color = torch.from_numpy(_COLOR.T.copy()).to(device)

    def pixels(self) -> torch.Tensor:
        spectrum = torch.view_as_complex((self.scale * self.params).contiguous())
        image = torch.fft.irfft2(spectrum, s=(self.size, self.size), norm="ortho")
        image = torch.einsum("nchw,cd->ndhw", image / _SPECTRUM_DIVISOR, self.color)
        return torch.sigmoid(image)


# --------------------------------------------------------------------------------------------
# robustness transforms


def _margin(size: int) -> int:
    """Padding and jitter ``P`` in pixels for an image of side ``size``."""
    return max(2, round(size / 24))


def _transform(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pad (grey), jitter, random scale + rotation, jitter: ``(B, 3, S, S)`` -> ``(B, 3, S, S)``.

    Each image of the batch gets its own draw from ``generator`` (CPU)."""
    b, _, s, _ = pixels.shape
    p = _margin(s)
    x = F.pad(pixels, [p] * 4, value=0.5)  # (B, 3, S + 2P, S + 2P)
    shifts = torch.randint(0, p + 1, (2, b, 2), generator=generator).tolist()
    side = s + p
    x = torch.stack([x[i, :, dy:dy + side, dx:dx + side] for i, (dx, dy) in enumerate(shifts[0])])
    scale = torch.empty(b).uniform_(*_SCALES, generator=generator)
    angle = torch.empty(b).uniform_(-_DEGREES, _DEGREES, generator=generator) * (math.pi / 180)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    zero = torch.zeros(b)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1),
                         torch.stack([sin, cos, zero], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grey outside the image: sample (x - 0.5) with zero padding, add 0.5 back
    x = F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros",
                      align_corners=False) + 0.5
    return torch.stack([x[i, :, dy:dy + s, dx:dx + s] for i, (dx, dy) in enumerate(shifts[1])])


# --------------------------------------------------------------------------------------------
# objective


def _objective(acts: torch.Tensor, directions: torch.Tensor, objective: str, cos_power: float
               ) -> torch.Tensor:
    """Per-image objective ``(B,)`` to maximise (see the module docstring).

    ``acts`` (B, C, h, w); ``directions`` (B, C), unit norm."""
    dot = torch.einsum("bchw,bc->bhw", acts, directions)
    cos = dot / (acts.norm(dim=1) + 1e-8)
    if objective == "cosine":
        return cos.mean(dim=(1, 2))
    return (dot * cos.clamp(min=_COS_FLOOR) ** cos_power).mean(dim=(1, 2))


# --------------------------------------------------------------------------------------------
# checks


def _unit_rows(vectors: np.ndarray | torch.Tensor, channels: int, what: str) -> torch.Tensor:
    """``vectors`` (C,) or (n, C) as unit rows ``(n, C)`` (float32, CPU)."""
    v = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    if v.dim() == 1:
        v = v[None]
    if v.dim() != 2 or v.shape[1] != channels or len(v) == 0:
        raise ExplorerError(f"{what} must be (n, {channels}) vectors over the layer's channels, "
                            f"got shape {tuple(np.shape(vectors))}; use concept vectors of this "
                            "layer")
    norms = v.norm(dim=1, keepdim=True)
    if not bool(torch.isfinite(v).all()) or bool((norms == 0).any()):
        raise ExplorerError(f"{what} holds a zero or non-finite vector; a concept direction must "
                            "be a non-zero, finite vector")
    return v / norms


def _channels(lm: LoadedModel, layer: str) -> int:
    return lm.layer_info(layer).shape[0]


def _side(lm: LoadedModel, size: int | None) -> int:
    side = int(size) if size is not None else lm.crop_size
    if not 8 <= side <= 4 * lm.input_size:
        raise ExplorerError(f"Synthesis size {side} px is outside 8..{4 * lm.input_size}; use the "
                            f"crop size ({lm.crop_size}) or the input size ({lm.input_size})")
    return side


def _check(steps: int, lr: float, cos_power: float, batch: int, polish: float,
           objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ExplorerError(f"Unknown synthesis objective '{objective}'; use one of "
                            f"{', '.join(OBJECTIVES)}")
    if steps < 1 or batch < 1:
        raise ExplorerError(f"steps={steps}, batch={batch}: use at least 1 of each")
    if not (lr > 0 and math.isfinite(lr)):
        raise ExplorerError(f"Learning rate lr={lr}: use a positive number (the recipe: 0.05)")
    if not 0 <= cos_power <= 8:
        raise ExplorerError(f"cos_power={cos_power} is outside 0..8 (the recipe uses 1-4)")
    if not 0 <= polish <= 1:
        raise ExplorerError(f"polish={polish} is outside 0..1 (the share of steps without "
                            "transforms; default 0.25)")


# --------------------------------------------------------------------------------------------
# measurements


def _as_pixels(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if x.dtype == torch.uint8:  # (N, H, W, 3) as Synthesis.image holds them
        x = x.permute(0, 3, 1, 2).float() / 255.0
    if x.dim() != 4 or x.shape[1] != 3:
        raise ExplorerError(f"Images must be (N, 3, H, W) in [0, 1] or (N, H, W, 3) uint8, got "
                            f"shape {tuple(x.shape)}")
    return x


def mean_activations(lm: LoadedModel, layer: str, images: torch.Tensor | np.ndarray,
                     batch_size: int = 64) -> np.ndarray:
    """Spatially averaged activations ``(N, C)`` of ``layer``.

    ``images``: ``(N, 3, H, W)`` float in ``[0, 1]``, or ``(N, H, W, 3)`` uint8 (as
    :attr:`Synthesis.image`)."""
    x = _as_pixels(images)
    out = [lm.logits_and_activations(x[i:i + batch_size], layer)[1].mean(dim=(2, 3)).cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, _channels(lm, layer)), np.float32)


def alignment_matrix(lm: LoadedModel, layer: str, images: torch.Tensor | np.ndarray,
                     vectors: np.ndarray | torch.Tensor) -> np.ndarray:
    """Cosine ``(N, n)`` between each image's spatially averaged activation at ``layer`` and each
    concept vector of ``vectors`` (n, C); higher = the layer sees the image as that concept.

    ``images`` as in :func:`mean_activations`. For the synthesised images of an explanation's
    concepts, in order, a faithful synthesis has each row's maximum on the diagonal."""
    v = _unit_rows(vectors, _channels(lm, layer), "vectors").numpy()
    a = mean_activations(lm, layer, images)
    a = a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-12)
    return (a @ v.T).astype(np.float32)


def stitch_syntheses(syntheses: Sequence[Synthesis]) -> torch.Tensor:
    """Synthesised images stacked along the height like crops for the prediction test:
    ``(3, k * S, S)`` in ``[0, 1]`` (concept 0 on top)."""
    if not syntheses:
        raise ExplorerError("No synthesised images to stitch")
    return stitch(torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255.0
                               for s in syntheses]))


def synthesis_prediction_test(lm: LoadedModel, syntheses: Sequence[Synthesis], target: int
                              ) -> PredictionTestResult:
    """The stitched prediction test (method.md §3) of synthesised crop-sized images, exactly as
    for an explanation's top-1 crops: stitched along the height, fed without resizing; ``passed``
    when ``target`` is the argmax. ``crop_ids`` is empty (no catalog crop)."""
    return prediction_tests(lm, [stitch_syntheses(syntheses)], [int(target)], [[]], False)[0]


# --------------------------------------------------------------------------------------------
# synthesis


def synthesize_concepts(lm: LoadedModel, layer: str, vectors: np.ndarray | torch.Tensor, *,
                        size: int | None = None, steps: int = DEFAULT_STEPS,
                        lr: float = DEFAULT_LR, seed: int = 0, objective: str = "cosine",
                        cos_power: float = DEFAULT_COS_POWER, batch: int = 1,
                        polish: float = DEFAULT_POLISH, progress: ProgressFn | None = None
                        ) -> list[Synthesis]:
    """Synthesise one image per concept vector, all optimised together in one batch.

    Parameters
    ----------
    lm : LoadedModel
        The model; it is not changed (a forward hook on ``layer`` is removed on exit, whatever
        happens; no parameter gradient is computed).
    layer : str
        Module name of the layer the vectors live in.
    vectors : (n, C) or (C,)
        Concept vectors at ``layer`` (e.g. ``Explanation.concept_vectors``); normalised here.
    size : int, optional
        Side ``S`` of the square images; default the crop size (``input_size // 3``), so they
        can be stitched for the prediction test like crops; ``lm.input_size`` gives full images.
    steps, lr : Adam steps and learning rate.
    seed : seeds the initial spectrum and every transform (same seed, same images on CPU).
    objective : ``"cosine"`` (default) or ``"dot_cos"`` (with ``cos_power`` = p).
    batch : transformed copies of each image per step.
    polish : share of the steps, at the end, on the plain image (no transforms).
    progress : called with stage ``"synthesis"``, counting steps.

    Returns
    -------
    list of Synthesis
        In the order of ``vectors``; ``alignments`` holds each image's cosine with every vector.
    """
    side = _side(lm, size)
    _check(steps, lr, cos_power, batch, polish, objective)
    v = _unit_rows(vectors, _channels(lm, layer), "vectors")
    n = len(v)
    module = lm.module(layer)
    dev = lm.device
    gen = torch.Generator().manual_seed(int(seed))
    image = _FourierImage(n, side, gen, dev)
    directions = v.to(dev).repeat(batch, 1)  # row r is image r % n
    opt = torch.optim.Adam([image.params], lr=lr)
    plain_from = steps - int(round(polish * steps))
    meter = Meter(progress, "synthesis", steps, "steps")
    meter.update(0, force=True)
    t0 = time.perf_counter()
    with capture_layer(lm.model, module) as store:
        for step in range(steps):
            pix = image.pixels().repeat(batch, 1, 1, 1)
            if step < plain_from:
                pix = _transform(pix, gen)
            lm.model(lm.normalize(pix))
            gain = _objective(store["out"].float(), directions, objective, cos_power).sum()
            # gradient of the image only: the model's parameters get no .grad
            (grad,) = torch.autograd.grad(-gain / batch, [image.params])
            image.params.grad = grad
            opt.step()
            meter.update(step + 1)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        final = image.pixels().cpu()
    uint8 = (final.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
    align = alignment_matrix(lm, layer, uint8, v)
    params = {"seed": int(seed), "size": side, "steps": int(steps), "lr": float(lr),
              "objective": objective, "cos_power": float(cos_power), "batch": int(batch),
              "polish": float(polish)}
    return [Synthesis(layer=layer, direction=v[k].numpy(), image=uint8[k],
                      alignment=float(align[k, k]), alignments=align[k].copy(), index=k,
                      steps=int(steps), seconds=seconds / n, params=dict(params))
            for k in range(n)]


def synthesize(lm: LoadedModel, layer: str, direction: np.ndarray | torch.Tensor, *,
               size: int | None = None, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
               seed: int = 0, objective: str = "cosine", cos_power: float = DEFAULT_COS_POWER,
               batch: int = 1, polish: float = DEFAULT_POLISH,
               others: np.ndarray | torch.Tensor | None = None,
               progress: ProgressFn | None = None) -> Synthesis:
    """Synthesise an image whose activations at ``layer`` align with ``direction`` (C,).

    ``others`` (m, C), optional: more vectors (e.g. the other concepts of the explanation, or
    the two sides of a contrast) whose cosine with the image goes into
    :attr:`Synthesis.alignments` after the direction's own (``alignments[0] == alignment``).
    The other parameters as in :func:`synthesize_concepts`."""
    direction = np.asarray(direction, dtype=np.float32)
    if direction.ndim != 1:
        raise ExplorerError(f"direction must be one vector (C,), got shape {direction.shape}; "
                            "use synthesize_concepts for several")
    result = synthesize_concepts(lm, layer, direction, size=size, steps=steps, lr=lr, seed=seed,
                                 objective=objective, cos_power=cos_power, batch=batch,
                                 polish=polish, progress=progress)[0]
    if others is not None:
        extra = _unit_rows(others, direction.size, "others").numpy()
        vs = np.concatenate([result.direction[None], extra])
        result.alignments = alignment_matrix(lm, layer, result.image[None], vs)[0]
    return result


# --------------------------------------------------------------------------------------------
# cached syntheses (the app and ``python -m explainer synthesize``)

SYNTHESIS_KIND = "synthesis"
"""Cache kind of :func:`cached_syntheses` entries (:mod:`explorer_core.cache`)."""


def synthesis_key(lm: LoadedModel, layer: str, vectors: np.ndarray | torch.Tensor, *,
                  size: int | None = None, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
                  seed: int = 0, objective: str = "cosine",
                  cos_power: float = DEFAULT_COS_POWER, batch: int = 1,
                  polish: float = DEFAULT_POLISH) -> dict[str, Any]:
    """The cache parameters of synthesising ``vectors`` (n, C) at ``layer``: the model spec,
    the layer, the SHA-256 of the unit vectors (float32, row order) and every parameter that
    changes the images (``size`` resolved: ``None`` and the crop size are one key). Not the
    catalog: a synthesis reads no dataset image."""
    side = _side(lm, size)
    _check(steps, lr, cos_power, batch, polish, objective)
    v = _unit_rows(vectors, _channels(lm, layer), "vectors").numpy().astype(np.float32)
    digest = hashlib.sha256(np.ascontiguousarray(v).tobytes()
                            + str(v.shape).encode()).hexdigest()
    return {"model": lm.spec, "layer": layer, "vectors": digest, "n": int(len(v)),
            "size": side, "steps": int(steps), "lr": float(lr), "seed": int(seed),
            "objective": objective, "cos_power": float(cos_power), "batch": int(batch),
            "polish": float(polish)}


def _synthesis_params(key: Mapping[str, Any]) -> dict[str, Any]:
    return {k: key[k] for k in ("seed", "size", "steps", "lr", "objective", "cos_power",
                                "batch", "polish")}


def _read_syntheses(folder: Path, key: Mapping[str, Any]) -> list[Synthesis]:
    """A cached entry, checked against ``key`` (any mismatch raises: a miss)."""
    got = read_npz(folder / _cache.ARRAYS_FILE)
    images, dirs, align, secs = (got[k] for k in ("images", "directions", "alignments",
                                                   "seconds"))
    n, s = int(key["n"]), int(key["size"])
    if images.dtype != np.uint8 or images.shape != (n, s, s, 3):
        raise ValueError(f"images {images.shape} {images.dtype}")
    if dirs.ndim != 2 or len(dirs) != n or align.shape != (n, n) or secs.shape != (n,):
        raise ValueError("arrays do not fit the key")
    params = _synthesis_params(key)
    return [Synthesis(layer=str(key["layer"]), direction=dirs[k].astype(np.float32),
                      image=images[k], alignment=float(align[k, k]),
                      alignments=align[k].astype(np.float32), index=k, steps=int(key["steps"]),
                      seconds=float(secs[k]), params=dict(params)) for k in range(n)]


def fetch_syntheses(lm: LoadedModel, layer: str, vectors: np.ndarray | torch.Tensor,
                    cache_dir: str | os.PathLike, **options: Any) -> list[Synthesis] | None:
    """The cached syntheses of ``vectors`` (``options`` as :func:`synthesis_key`), or None.
    Reads only: the app shows what an earlier visit computed without computing."""
    key = synthesis_key(lm, layer, vectors, **options)
    return _cache.fetch(cache_dir, SYNTHESIS_KIND, key, lambda d: _read_syntheses(d, key))


def cached_syntheses(lm: LoadedModel, layer: str, vectors: np.ndarray | torch.Tensor,
                     cache_dir: str | os.PathLike | None, *, cache: bool = True,
                     progress: ProgressFn | None = None, **options: Any) -> list[Synthesis]:
    """:func:`synthesize_concepts` of ``vectors`` (n, C) through the result cache under
    ``cache_dir`` (kind :data:`SYNTHESIS_KIND`, key :func:`synthesis_key`): computed once,
    then read back (a read-only workspace just skips the store). ``options``: ``size``,
    ``steps``, ``lr``, ``seed``, ``objective``, ``cos_power``, ``batch``, ``polish``.

    Returns one :class:`Synthesis` per vector, in order; ``seconds`` is the optimisation time
    per image of the run that computed it."""
    key = synthesis_key(lm, layer, vectors, **options)
    if cache and cache_dir is not None:
        got = _cache.fetch(cache_dir, SYNTHESIS_KIND, key, lambda d: _read_syntheses(d, key))
        if got is not None:
            return got
    syns = synthesize_concepts(lm, layer, vectors, progress=progress, **options)
    if cache and cache_dir is not None:
        arrays = {"images": np.stack([s.image for s in syns]),
                  "directions": np.stack([s.direction for s in syns]).astype(np.float32),
                  "alignments": np.stack([s.alignments for s in syns]).astype(np.float32),
                  "seconds": np.asarray([s.seconds for s in syns], np.float64)}
        _cache.store_arrays(cache_dir, SYNTHESIS_KIND, key, arrays)
    return syns
