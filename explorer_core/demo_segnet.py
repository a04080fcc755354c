"""The demo world's segmentation network: a small UNet with attribution-safe ReLUs.

It labels every pixel of a demo-world image with one of the 10 demo classes (the object the pixel
belongs to) or ``background``. The encoder is :class:`~explorer_core.demo_cnn.DemoCNN`'s (the same
residual stages); a light decoder upsamples back to full resolution, fusing the encoder stage of
the same resolution at each step (UNet skip connections).

Every ReLU is its own non-inplace :class:`torch.nn.ReLU` module (captum's DeepLift is wrong when a
ReLU module is reused). The network is fully convolutional: any ``H, W`` divisible by 16 and at
least 32 works (the 96x96 image, a 32x32 crop, a 128x32 column of four stitched crops).

Architecture (spatial sizes for a 96x96 input; a 32x32 crop gives 16, 16, 8, 4, 2)::

    stem    conv3x3/2  3->24, BN, ReLU                      48x48
    layer1  BasicBlock 24->24                               48x48  -> skip to up1
    layer2  BasicBlock 24->48   /2                          24x24  -> skip to up2
    layer3  BasicBlock 48->96   /2                          12x12  -> skip to up3
    layer4  BasicBlock 96->192  /2                           6x6   <- DEMO_SEG_LAYER (192 ch)
    up3     x2 bilinear, concat layer3, conv3x3 ->64, BN, ReLU   12x12
    up2     x2 bilinear, concat layer2, conv3x3 ->32, BN, ReLU   24x24
    up1     x2 bilinear, concat layer1, conv3x3 ->24, BN, ReLU   48x48
    head    conv1x1 24 -> 11                                48x48
    upsample  x2 bilinear                                   96x96 logits

The logits are predicted at half resolution and upsampled bilinearly (as DeepLab does at x4/x8):
part outlines stay within a pixel or so, and a full-resolution convolution would cost more than
the whole decoder.

Why ``layer4.relu_out`` is the explanation layer: it is the bottleneck, the deepest and most
semantic representation and the only place where the whole image is seen at once (each of its
positions covers a 16x16 cell, its receptive field most of the image), so the evidence that turns
an orange square into ``lupo`` rather than ``husko`` -- the triangle two cells away or the grass
around it -- is there. It is the analogue of the paper's segmentation layer (App. F: ``layer3.2``,
the stride-16 stage of a ResNet34 UNet encoder) and of the classifier's ``layer4.relu_out``: 6x6 at
96 px, so a 32x32 crop of the 3x3 grid is exactly 2x2 positions. The decoder's ``up3.relu``
(12x12, 64 ch) is the finer alternative.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .demo_cnn import (
    CLASSES,
    DEMO_MEAN,
    DEMO_STD,
    BasicBlock,
    DemoWeightsMissing,
    load_bundled_weights,
)
from .errors import ExplorerError

__all__ = [
    "BACKGROUND",
    "DEMO_SEG_INPUT_SIZE",
    "DEMO_SEG_LAYER",
    "DEMO_SEG_MEAN",
    "DEMO_SEG_STD",
    "DemoSegNet",
    "DemoSegWeightsMissing",
    "SEG_CLASSES",
    "SEG_WEIGHTS_PATH",
    "build_demo_segnet",
    "load_demo_seg",
]

BACKGROUND = "background"
"""Name of the last segmentation class: every pixel that belongs to no object."""
SEG_CLASSES: list[str] = [*CLASSES, BACKGROUND]
"""Segmentation classes, logit channel = position: the 10 demo classes in
:data:`~explorer_core.demo_cnn.CLASSES` order, then ``background`` (index 10)."""

DEMO_SEG_INPUT_SIZE = 96
"""Model input side in pixels (the demo world's image size)."""
DEMO_SEG_MEAN: tuple[float, float, float] = DEMO_MEAN
"""Per-channel mean subtracted from pixels in ``[0, 1]`` (the classifier's)."""
DEMO_SEG_STD: tuple[float, float, float] = DEMO_STD
"""Per-channel std dividing pixels in ``[0, 1]`` after the mean is subtracted (the classifier's)."""
DEMO_SEG_LAYER = "layer4.relu_out"
"""Recommended explanation layer: the bottleneck's output ReLU, (B, 192, 6, 6) at 96x96 (see the
module docstring for why)."""
SEG_WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "demo_segnet.pt"
"""Committed float32 state dict of the trained segmentation network."""


class DemoSegWeightsMissing(DemoWeightsMissing):
    """The segmentation network's weights file is missing or unreadable."""


class UpBlock(nn.Module):
    """Decoder step: x2 bilinear upsampling, concat the skip, conv3x3 + BN + its own ReLU ``relu``.

    Inputs ``(B, c_in, h, w)`` and skip ``(B, c_skip, 2h, 2w)`` -> ``(B, c_out, 2h, 2w)``,
    non-negative.
    """

    def __init__(self, c_in: int, c_skip: int, c_out: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv = nn.Conv2d(c_in + c_skip, c_out, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(torch.cat([self.up(x), skip], dim=1))))


class DemoSegNet(nn.Module):
    """Small UNet for the demo world: DemoCNN's encoder plus a light decoder.

    Parameters
    ----------
    num_classes : int
        Output channels (``len(SEG_CLASSES)`` = 11: the 10 demo classes, then background).
    width : int
        Channels of the stem; encoder stages use ``width * (1, 1, 2, 4, 8)``.
    decoder : tuple of 3 int
        Channels of ``up3``, ``up2``, ``up1``.

    Notes
    -----
    ``forward`` maps normalised images ``(B, 3, H, W)`` (``H, W`` divisible by 16, at least 32) to
    logits ``(B, num_classes, H, W)``.
    """

    def __init__(
        self,
        num_classes: int = len(SEG_CLASSES),
        width: int = 24,
        decoder: tuple[int, int, int] = (64, 32, 24),
    ) -> None:
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
        d3, d2, d1 = decoder
        self.up3 = UpBlock(8 * w, 4 * w, d3)
        self.up2 = UpBlock(d3, 2 * w, d2)
        self.up1 = UpBlock(d2, w, d1)
        self.head = nn.Conv2d(d1, num_classes, 1)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % 16 or w % 16 or h < 32 or w < 32:
            raise ExplorerError(
                f"the demo segmentation network needs an input whose height and width are "
                f"multiples of 16 and at least 32 pixels, got {h}x{w}; resize or crop it"
            )
        l1 = self.layer1(self.stem(x))
        l2 = self.layer2(l1)
        l3 = self.layer3(l2)
        l4 = self.layer4(l3)
        d = self.up3(l4, l3)
        d = self.up2(d, l2)
        d = self.up1(d, l1)
        return self.upsample(self.head(d))


def build_demo_segnet() -> DemoSegNet:
    """A freshly initialised (untrained) :class:`DemoSegNet` with :data:`SEG_CLASSES` outputs."""
    return DemoSegNet(num_classes=len(SEG_CLASSES))


def load_demo_seg(
    device: str | torch.device = "cpu",
    weights_path: str | Path | None = None,
) -> tuple[nn.Module, list[str], int, tuple[float, float, float], tuple[float, float, float]]:
    """Load the trained demo segmentation network.

    Parameters
    ----------
    device : str or torch.device
        Where to put the model.
    weights_path : str or Path, optional
        State dict to load (default :data:`SEG_WEIGHTS_PATH`); float16 tensors are cast to float32.

    Returns
    -------
    model : torch.nn.Module
        In eval mode, on ``device``; input normalised ``(B, 3, H, W)``, output logits
        ``(B, 11, H, W)``.
    class_names : list of str
        :data:`SEG_CLASSES` (logit channel -> name; ``background`` last).
    input_size : int
        :data:`DEMO_SEG_INPUT_SIZE`.
    mean, std : tuple of float
        :data:`DEMO_SEG_MEAN`, :data:`DEMO_SEG_STD` for pixels in ``[0, 1]``.

    Raises
    ------
    DemoSegWeightsMissing
        If the weights file does not exist or cannot be read.
    """
    path = Path(weights_path) if weights_path is not None else SEG_WEIGHTS_PATH
    model = load_bundled_weights(build_demo_segnet(), path, DemoSegWeightsMissing,
                                 "demo segmentation weights", "python -m demo_world.train_seg",
                                 "about 10 minutes on 2 busy CPU cores")
    model.to(device).eval()
    return model, list(SEG_CLASSES), DEMO_SEG_INPUT_SIZE, DEMO_SEG_MEAN, DEMO_SEG_STD
