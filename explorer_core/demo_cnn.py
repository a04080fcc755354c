"""The demo world's classifier: a compact ResNet-like CNN with attribution-safe ReLUs.

Every ReLU is its own non-inplace :class:`torch.nn.ReLU` module (captum's DeepLift is wrong when a
ReLU module is reused). The network ends with ``AdaptiveAvgPool2d(1)`` + ``Linear``, so it accepts
any input size: the 96x96 image, a single 32x32 crop, a 128x32 column of four stitched crops.

Architecture (spatial sizes for a 96x96 input; a 32x32 crop gives 16, 16, 8, 4, 2)::

    stem    conv3x3/2  3->24, BN, ReLU        48x48
    layer1  BasicBlock 24->24                 48x48
    layer2  BasicBlock 24->48  /2             24x24
    layer3  BasicBlock 48->96  /2             12x12
    layer4  BasicBlock 96->192 /2              6x6   <- DEMO_LAYER = "layer4.relu_out" (192 ch)
    pool    AdaptiveAvgPool2d(1)
    fc      Linear 192 -> 10
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import ExplorerError as _BaseError

CLASSES: list[str] = [
    "lupo",
    "husko",
    "ladyblob",
    "zebrox",
    "sunflop",
    "plumtop",
    "checkbox",
    "tigrin",
    "pinkus",
    "mudbot",
]
"""The demo world's class names, logit index = position (``demo_world.world.CLASSES`` is built
from the same list; a test keeps the two equal)."""

__all__ = [
    "CLASSES",
    "DEMO_INPUT_SIZE",
    "DEMO_LAYER",
    "DEMO_MEAN",
    "DEMO_STD",
    "DemoCNN",
    "DemoWeightsMissing",
    "WEIGHTS_PATH",
    "build_demo_model",
    "load_demo",
]

DEMO_INPUT_SIZE = 96
"""Model input side in pixels (images of the demo world are this size; crops are 32x32)."""
DEMO_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Per-channel mean subtracted from pixels in ``[0, 1]``."""
DEMO_STD: tuple[float, float, float] = (0.25, 0.25, 0.25)
"""Per-channel std dividing pixels in ``[0, 1]`` after the mean is subtracted."""
DEMO_LAYER = "layer4.relu_out"
"""Recommended explanation layer: the last residual block's output ReLU, (B, 192, 6, 6) at 96x96."""
WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "demo_cnn.pt"
"""Committed float32 state dict of the trained demo model."""


class DemoWeightsMissing(_BaseError, FileNotFoundError):
    """The demo model's weights file is missing or unreadable."""


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN with a (projected) shortcut; separate ReLU modules ``relu1`` and ``relu_out``.

    Input ``(B, c_in, H, W)`` -> output ``(B, c_out, ceil(H/stride), ceil(W/stride))``, non-negative.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )
        else:
            self.downsample = nn.Identity()
        self.relu_out = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu_out(y + self.downsample(x))


class DemoCNN(nn.Module):
    """Compact ResNet-like classifier for the demo world.

    Parameters
    ----------
    num_classes : int
        Number of output logits.
    width : int
        Channels of the stem; stages use ``width * (1, 1, 2, 4, 8)``.

    Notes
    -----
    ``forward`` maps normalised images ``(B, 3, H, W)`` (any ``H, W >= 16``) to logits
    ``(B, num_classes)``.
    """

    def __init__(self, num_classes: int = len(CLASSES), width: int = 24) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 3, 2, 1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=False),
        )
        self.layer1 = BasicBlock(w, w, 1)
        self.layer2 = BasicBlock(w, 2 * w, 2)
        self.layer3 = BasicBlock(2 * w, 4 * w, 2)
        self.layer4 = BasicBlock(4 * w, 8 * w, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_demo_model() -> nn.Module:
    """A freshly initialised (untrained) :class:`DemoCNN` for the demo world's classes."""
    return DemoCNN(num_classes=len(CLASSES))


def load_demo(
    device: str | torch.device = "cpu",
    weights_path: str | Path | None = None,
) -> tuple[nn.Module, list[str], int, tuple[float, float, float], tuple[float, float, float]]:
    """Load the trained demo model.

    Parameters
    ----------
    device : str or torch.device
        Where to put the model.
    weights_path : str or Path, optional
        State dict to load (default :data:`WEIGHTS_PATH`).

    Returns
    -------
    model : torch.nn.Module
        In eval mode, on ``device``; input normalised ``(B, 3, H, W)``, output logits ``(B, 10)``.
    class_names : list of str
        ``CLASSES`` (logit index -> name).
    input_size : int
        :data:`DEMO_INPUT_SIZE`.
    mean, std : tuple of float
        :data:`DEMO_MEAN`, :data:`DEMO_STD` for pixels in ``[0, 1]``.

    Raises
    ------
    DemoWeightsMissing
        If the weights file does not exist or cannot be read.
    """
    path = Path(weights_path) if weights_path is not None else WEIGHTS_PATH
    model = load_bundled_weights(build_demo_model(), path, DemoWeightsMissing,
                                 "demo model weights", "python -m demo_world.train",
                                 "about 8 minutes on 2 CPU cores")
    model.to(device).eval()
    return model, list(CLASSES), DEMO_INPUT_SIZE, DEMO_MEAN, DEMO_STD


def load_bundled_weights(model: nn.Module, path: Path, error: type[Exception], what: str,
                         retrain: str, duration: str) -> nn.Module:
    """Load the state dict at ``path`` into ``model`` (strict; float16 tensors cast to float32;
    ``torch.load(weights_only=True)``: no code runs). A missing, unreadable or mismatching file
    raises ``error`` with a message naming ``what`` and the ``retrain`` command."""
    if not path.is_file():
        raise error(f"{what} not found at {path}; create them with `{retrain}` ({duration})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # corrupt file, git-lfs pointer, other architecture, ...
        raise error(f"could not read {what} {path} ({exc}); recreate them with `{retrain}`"
                    ) from exc
    return model
