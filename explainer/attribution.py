"""Stage 1 of the method (method.md §1 steps 2-4): layer activations, their attribution
towards a logit, the per-pixel score and the pixel matrix.

Every function takes batches; nothing runs at batch size 1.

Segmentation models (``lm.task == "segmentation"``, output ``(B, K, H, W)``)
------------------------------------------------------------------------------
The attributed quantity for class A is A's *evidence*: the sum of A's logits over the pixels the
model predicts as A on the input image (method.md §11; the paper does not state its target for
a dense output). :class:`ClassEvidence` wraps the model to return ``(B, K)`` evidences, so every
captum method takes ``target=A`` as for a classifier. The mask (each pixel's argmax class) is
computed once, from the unperturbed image, and then held fixed: DeepLift's white baseline and
SmoothGrad's noisy copies are scored on the same pixels, so the evidence is a fixed linear
function of the logits and DeepLift's completeness (attributions add up to ``evidence(x) -
evidence(baseline)``) holds as for a classifier. An image with no pixel predicted as A has
evidence 0 for A, whatever the input: its attributions are 0, so it adds nothing (images
"predicted as A" have at least ``SEG_SHARE_THRESHOLD`` of their pixels predicted as A anyway).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Literal, overload

import numpy as np
import torch
from torch import nn

from explorer_core.errors import ExplorerError
from explorer_core.hooks import AttributionModel, forward_hooks, prepare_for_attribution
from explorer_core.models import LoadedModel, capture_layer
from explorer_core.progress import Meter, ProgressFn

__all__ = [
    "COMPLETENESS_TOLERANCE",
    "ClassEvidence",
    "METHODS",
    "VARIANTS",
    "attribute",
    "attribute_checked",
    "attribution_model",
    "completeness_error",
    "completeness_layer",
    "completeness_warning",
    "deeplift_completeness",
    "layer_is_cut",
    "pixel_scores",
    "scale_by_scores",
    "pixel_rows",
    "contrast_filter",
    "check_nonnegative",
]

METHODS = ("deeplift", "grad_x_act", "deeplift_smoothgrad")
VARIANTS = ("paper", "reference")
SMOOTHGRAD_SAMPLES = 20
SMOOTHGRAD_STDEV = 0.25
COMPLETENESS_TOLERANCE = 1e-2
"""Largest relative DeepLift completeness error taken as float rounding (about 1e-6 on CPU,
more with TF32 convolutions on a GPU); above it the attributions are wrong (a nonlinearity
captum's DeepLift does not handle exactly) and explanations warn."""

_prepared: weakref.WeakKeyDictionary[nn.Module, AttributionModel] = weakref.WeakKeyDictionary()


def attribution_model(lm: LoadedModel) -> AttributionModel:
    """The model copy with unshared, non-inplace nonlinearities (made once per model; see
    :func:`explorer_core.hooks.prepare_for_attribution`), probed on a seeded random image."""
    prepared = _prepared.get(lm.model)
    if prepared is None:
        s = lm.input_size
        probe = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(0))
        prepared = prepare_for_attribution(lm.model, lm.normalize(probe.to(lm.device)))
        _prepared[lm.model] = prepared
    return prepared


class ClassEvidence(nn.Module):
    """A segmentation model as a ``(B, K)`` scorer for captum's ``target``: class k's evidence
    is the sum of k's logits over the pixels whose predicted class (``pred``) is k.

    ``forward(x, pred)``: ``x`` (B, 3, H, W) model input; ``pred`` (B, H', W') int64, each
    pixel's class on the *unperturbed* image (:meth:`mask`), passed as captum's
    ``additional_forward_args`` so that captum repeats it with the inputs (DeepLift's baseline
    half, SmoothGrad's noisy copies). Returns (B, K). Linear in the logits for a fixed ``pred``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @torch.no_grad()
    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """Each pixel's predicted class ``(B, H', W')`` int64 of model input ``x``."""
        return self.model(x).argmax(dim=1)

    def forward(self, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        b, k = out.shape[:2]
        own = out.gather(1, pred.unsqueeze(1)).flatten(1)  # (B, H'W') logit of the pixel's class
        return torch.zeros(b, k, dtype=out.dtype, device=out.device).scatter_add(
            1, pred.flatten(1), own)


def _scorer(lm: LoadedModel, model: nn.Module, x: torch.Tensor
            ) -> tuple[nn.Module, tuple[torch.Tensor, ...] | None]:
    """What captum attributes ``target`` of: the model itself (classification) or its
    :class:`ClassEvidence` with the mask of ``x`` (segmentation), and the extra forward args."""
    if lm.task != "segmentation":
        return model, None
    scorer = ClassEvidence(model)
    return scorer, (scorer.mask(x),)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ExplorerError(f"Unknown attribution method '{method}'; use one of "
                            f"{', '.join(METHODS)}")


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ExplorerError(f"Unknown variant '{variant}'; use 'paper' (s = mean of the "
                            "attribution) or 'reference' (s = mean of relu(attribution))")


@overload
def attribute(lm: LoadedModel, pixels: torch.Tensor, layer: str,
              targets: Sequence[int] | torch.Tensor, method: str = ..., *, batch_size: int = ...,
              progress: ProgressFn | None = ...,
              return_delta: Literal[False] = ...) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def attribute(lm: LoadedModel, pixels: torch.Tensor, layer: str,
              targets: Sequence[int] | torch.Tensor, method: str = ..., *, batch_size: int = ...,
              progress: ProgressFn | None = ...,
              return_delta: Literal[True]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def attribute(lm: LoadedModel, pixels: torch.Tensor, layer: str,
              targets: Sequence[int] | torch.Tensor, method: str = "deeplift", *,
              batch_size: int = 32, progress: ProgressFn | None = None,
              return_delta: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations of ``layer`` and their attribution towards logit ``targets[i]`` (for a
    segmentation model: towards class ``targets[i]``'s evidence, the sum of its logits over the
    pixels predicted as it; see the module docstring).

    Parameters
    ----------
    pixels : (B, 3, S, S) float in [0, 1]
        Images (normalised here).
    targets : (B,) int
        Logit index per image (images of different classes can share a batch).
    method : ``deeplift`` | ``grad_x_act`` | ``deeplift_smoothgrad``
        captum ``LayerDeepLift`` (baseline: white image), ``LayerGradientXActivation``, or
        ``NoiseTunnel`` smoothgrad (20 samples, stdev 0.25) over ``LayerDeepLift``.
    progress : ProgressFn, optional
        Reports stage ``attribution`` in ``images`` (with rate and ETA) after every batch.

    Returns
    -------
    activations : (B, C, h, w) float32, CPU
    attributions : (B, C, h, w) float32, CPU
    delta : (B,) float32, CPU, only with ``return_delta`` (DeepLift's convergence delta
        ``sum(attr) - (f(x) - f(baseline))``; ``f`` the evidence for a segmentation model).
    """
    from captum.attr import LayerDeepLift, LayerGradientXActivation, NoiseTunnel

    check_method(method)
    lm.module(layer)  # validates the name
    prepared = attribution_model(lm)
    model, module = prepared.model, prepared.layer(layer)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    n = len(pixels)
    if len(targets) != n:
        raise ValueError(f"{n} images but {len(targets)} targets")
    if return_delta and method != "deeplift":
        raise ValueError("return_delta needs method='deeplift'")
    if method == "deeplift_smoothgrad":
        batch_size = max(2, batch_size // 4)  # 20 noisy copies each
    acts_out, attr_out, delta_out = [], [], []
    meter = Meter(progress, "attribution", n, "images")
    for start in range(0, n, batch_size):
        x = lm.normalize(pixels[start:start + batch_size].to(lm.device, torch.float32))
        x.requires_grad_(True)  # DeepLift hooks tensors upstream of the layer too
        t = targets[start:start + batch_size].to(lm.device)
        b = len(x)
        scorer, extra = _scorer(lm, model, x)
        if method == "grad_x_act":
            with capture_layer(model, module) as store:
                attr = LayerGradientXActivation(scorer, module).attribute(
                    x, target=t, additional_forward_args=extra)
            acts = store["out"].detach()
        elif method == "deeplift":
            base = lm.white_baseline(x.shape)
            outs: list[torch.Tensor] = []
            logits: list[torch.Tensor] = []
            with forward_hooks([(module, _appender(outs)), (scorer, _appender(logits))]):
                attr = LayerDeepLift(scorer, module).attribute(
                    x, baselines=base, target=t, additional_forward_args=extra)
            if outs and len(outs[0]) == 2 * b:  # captum's one forward: cat(x, baseline)
                acts = outs[0][:b]
            else:
                with torch.inference_mode():
                    _, acts = _forward_acts(model, module, x)
            if return_delta:
                # captum's convergence delta sum(attr) - (f(x) - f(baseline)), from the logits
                # of the same forward (captum's own recomputes both: two more forwards)
                if logits and len(logits[0]) == 2 * b:
                    both = logits[0].float()
                else:
                    with torch.inference_mode():
                        args = extra or ()
                        both = torch.cat([scorer(x, *args), scorer(base, *args)]).float()
                rows = torch.arange(b, device=both.device)
                gap = both[:b][rows, t] - both[b:][rows, t]
                total = (attr[0] if isinstance(attr, tuple) else attr).detach().float()
                delta = total.flatten(1).sum(1) - gap
                delta_out.append(delta.detach().cpu())
            del outs, logits
        else:
            nt = NoiseTunnel(LayerDeepLift(scorer, module))
            attr = nt.attribute(x, baselines=lm.white_baseline(x.shape), target=t,
                                additional_forward_args=extra,
                                nt_type="smoothgrad", nt_samples=SMOOTHGRAD_SAMPLES,
                                stdevs=SMOOTHGRAD_STDEV, nt_samples_batch_size=4)
            with torch.inference_mode():
                _, acts = _forward_acts(model, module, x)
        if isinstance(attr, tuple):
            attr = attr[0]
        acts_out.append(acts.float().cpu().clone())
        attr_out.append(attr.detach().float().cpu())
        meter.update(min(start + b, n))
    if not acts_out:
        raise ExplorerError("No images to attribute")
    result = (torch.cat(acts_out), torch.cat(attr_out))
    if return_delta:
        return (*result, torch.cat(delta_out))
    return result


def layer_is_cut(lm: LoadedModel, layer: str) -> bool:
    """Whether every path from the input to the logits passes through ``layer``: with the
    layer's output on a probe image replaced by its output on the baseline, the logits must be
    the baseline's. Not so inside a residual block (the skip connection bypasses ``bn2``); there
    DeepLift's attributions at the layer cannot add up to ``f(x) - f(baseline)``. Probed once
    per model and layer."""
    prepared = attribution_model(lm)
    if layer not in prepared.layer_cuts:
        model, module = prepared.model, prepared.layer(layer)
        x = _probe(lm)
        base = lm.white_baseline(x.shape)
        with torch.no_grad():
            with capture_layer(model, module) as store:
                f_base = model(base)
            a_base = store["out"]
            with forward_hooks([(module, lambda _m, _i, _o: a_base)]):
                f_swapped = model(x)
        prepared.layer_cuts[layer] = bool(torch.allclose(f_swapped, f_base, rtol=1e-4,
                                                         atol=1e-5))
    return prepared.layer_cuts[layer]


def _probe(lm: LoadedModel) -> torch.Tensor:
    s = lm.input_size
    return lm.normalize(torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(1))
                        .to(lm.device))


def completeness_layer(lm: LoadedModel, layer: str) -> str | None:
    """Where DeepLift's completeness for ``layer`` is measured: ``layer`` itself when every path
    passes through it (:func:`layer_is_cut`), else the latest layer of the loaded model that
    finishes before it and is a cut (the block input, for a layer inside a residual block: its
    attributions pass through every module after ``layer``), else ``None`` (the input)."""
    if layer_is_cut(lm, layer):
        return layer
    prepared = attribution_model(lm)
    if not prepared.call_order:
        order: list[str] = []

        def done(name: str) -> Callable[[nn.Module, object, object], None]:
            def hook(_m: nn.Module, _i: object, _o: object) -> None:
                if name not in order:
                    order.append(name)
            return hook

        pairs = [(m, done(n)) for n, m in prepared.model.named_modules()
                 if n and not isinstance(m, torch.jit.ScriptModule)]
        with forward_hooks(pairs), torch.no_grad():
            prepared.model(_probe(lm))
        prepared.call_order = order
    original = dict(lm.model.named_modules())
    target = prepared.aliases.get(layer, layer)
    if target not in prepared.call_order:
        return None
    earlier = prepared.call_order[:prepared.call_order.index(target)]
    for name in reversed(earlier):
        if name in original and layer_is_cut(lm, name):
            return name
    return None


def deeplift_completeness(lm: LoadedModel, pixels: torch.Tensor, layer: str,
                          targets: Sequence[int] | torch.Tensor, *, batch_size: int = 32
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepLift's completeness for ``layer`` on ``pixels`` (B, 3, S, S) in [0, 1] (white
    baseline, logit ``targets[i]``, or its evidence for a segmentation model): of the
    attributions at :func:`completeness_layer` (``layer`` itself when every path passes through
    it), else at the input; the multipliers from the logit back to ``layer`` are checked either
    way.

    Returns
    -------
    delta : (B,) float32, CPU
        captum's convergence delta ``sum(attr) - (f(x) - f(baseline))``.
    gap : (B,) float32, CPU
        ``f(x) - f(baseline)``, what the attributions should add up to.
    """
    at = completeness_layer(lm, layer)
    if at is not None:
        _, attr, delta = attribute(lm, pixels, at, targets, "deeplift",
                                   batch_size=batch_size, return_delta=True)
        return delta, attr.flatten(1).sum(1) - delta
    from captum.attr import DeepLift

    lm.module(layer)  # validates the name
    model = attribution_model(lm).model
    tgt = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    deltas, gaps = [], []
    for start in range(0, len(pixels), batch_size):
        x = lm.normalize(pixels[start:start + batch_size].to(lm.device, torch.float32))
        scorer, extra = _scorer(lm, model, x)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Setting forward, backward hooks")
            attr, delta = DeepLift(scorer).attribute(
                x.requires_grad_(True), baselines=lm.white_baseline(x.shape),
                target=tgt[start:start + batch_size].to(lm.device),
                additional_forward_args=extra, return_convergence_delta=True)
        delta = delta.detach().float().cpu()
        deltas.append(delta)
        gaps.append(attr.detach().float().cpu().flatten(1).sum(1) - delta)
    return torch.cat(deltas), torch.cat(gaps)


def attribute_checked(lm: LoadedModel, pixels: torch.Tensor, layer: str,
                      targets: Sequence[int] | torch.Tensor, method: str = "deeplift", *,
                      batch_size: int = 32, progress: ProgressFn | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                 torch.Tensor | None]:
    """:func:`attribute` plus DeepLift's completeness on the same images
    (:func:`deeplift_completeness`; free for ``deeplift`` at a layer every path passes through).

    Returns ``(activations, attributions, delta, gap)``; ``delta`` and ``gap`` (B,) are ``None``
    for ``grad_x_act``."""
    if method == "deeplift" and completeness_layer(lm, layer) == layer:
        acts, attr, delta = attribute(lm, pixels, layer, targets, method, batch_size=batch_size,
                                      progress=progress, return_delta=True)
        return acts, attr, delta, attr.flatten(1).sum(1) - delta
    acts, attr = attribute(lm, pixels, layer, targets, method, batch_size=batch_size,
                           progress=progress)
    if method == "grad_x_act":
        return acts, attr, None, None
    delta, gap = deeplift_completeness(lm, pixels, layer, targets, batch_size=batch_size)
    return acts, attr, delta, gap


def completeness_error(delta: np.ndarray | torch.Tensor, gap: np.ndarray | torch.Tensor
                       ) -> float | None:
    """Relative completeness error of DeepLift over images: ``sum_i |delta_i| / sum_i |gap_i|``
    (``delta``, ``gap`` (N,) from :func:`deeplift_completeness`); a ratio of sums, so images whose
    logit barely moves from the baseline do not dominate. ``None`` for no images."""
    d = np.abs(np.asarray(delta, dtype=np.float64))
    g = np.abs(np.asarray(gap, dtype=np.float64))
    if d.size == 0:
        return None
    return float(d.sum() / max(g.sum(), 1e-12))


def completeness_warning(error: float | None, layer: str, method: str) -> str | None:
    """The warning for a DeepLift completeness ``error`` above :data:`COMPLETENESS_TOLERANCE`
    (else ``None``)."""
    if error is None or not error > COMPLETENESS_TOLERANCE:
        return None
    return (f"{method} attributions for layer '{layer}' are wrong: DeepLift's attributions do "
            "not add up to the logit change from the baseline (relative completeness error "
            f"{error:.1%}), so the model has nonlinearities captum's DeepLift does not handle "
            "exactly (functional calls such as F.relu, modules used more than once, or an "
            "overlapping MaxPool). Use method grad_x_act "
            "(--method grad_x_act), or give the model one nn.ReLU module per use")


def _appender(outs: list[torch.Tensor]) -> Callable[[nn.Module, object, torch.Tensor], None]:
    """A forward hook appending each (detached) output to ``outs``."""
    def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
        outs.append(out.detach())
    return hook


def _forward_acts(model: nn.Module, module: nn.Module, x: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    with capture_layer(model, module) as store:
        logits = model(x)
    return logits, store["out"]


def check_nonnegative(acts: torch.Tensor, layer: str, clamp: bool) -> tuple[torch.Tensor, str | None]:
    """Activations must be non-negative (a post-ReLU layer). Negative values raise
    :class:`ExplorerError` unless ``clamp``; then they are clamped and a warning text returned."""
    neg = int((acts < 0).sum())
    if neg == 0:
        return acts, None
    share = neg / acts.numel()
    if not clamp:
        raise ExplorerError(f"Layer '{layer}' has negative activations ({share:.1%} of values); "
                            "NMF needs non-negative ones. Pick a post-ReLU layer or pass "
                            "clamp=True (--clamp) to clamp them to zero")
    return acts.clamp_min(0), (f"Layer '{layer}' had negative activations ({share:.1%} of "
                               "values); they were clamped to zero")


def pixel_scores(attributions: torch.Tensor, variant: str = "paper") -> torch.Tensor:
    """Per-pixel score ``s`` (B, h, w): mean over channels of the attribution (``paper``) or of
    ``relu(attribution)`` (``reference``, the authors' scripts)."""
    check_variant(variant)
    if variant == "reference":
        attributions = attributions.clamp_min(0)
    return attributions.mean(dim=1)


def scale_by_scores(activations: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Filter-and-scale (method.md §1.3): ``a' = a * max(s, 0)``; ``a`` (B, C, h, w),
    ``s`` (B, h, w). Pixels with ``s <= 0`` become zero."""
    return activations * scores.clamp_min(0).unsqueeze(1)


def pixel_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pixel of every image as a row: (B, C, h, w) -> V (B*h*w, C) with all-zero rows
    dropped, and the boolean keep-mask (B*h*w,) in (image, y, x) order."""
    rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    keep = (rows != 0).any(dim=1)
    return rows[keep], keep


def contrast_filter(activations: torch.Tensor, scores: torch.Tensor, fraction: float = 0.25
                    ) -> torch.Tensor:
    """Contrast pixels of one class (method.md §4): keep pixels with ``s > 0`` and
    ``s >= fraction * max(s over that image)``; return their *unscaled* activation vectors
    (k, C). (The authors' scripts let negative-score pixels pass when an image's max is < 0;
    here ``s > 0`` is enforced.)"""
    smax = scores.flatten(1).max(dim=1).values.view(-1, 1, 1)
    keep = (scores > 0) & (scores >= fraction * smax)
    rows = activations.permute(0, 2, 3, 1)[keep]
    return rows.reshape(-1, activations.shape[1])
