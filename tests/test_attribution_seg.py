"""Attribution of segmentation models (issue 11 item 1; explainer/attribution.py's docstring).

The target of class A is A's evidence: the sum of A's logits over the pixels predicted as A on the
unperturbed image, that mask held fixed for DeepLift's baseline and SmoothGrad's noisy copies.
Checked on torchvision's FCN-ResNet50 with random weights at 64 px (plumbing, shapes, the target
itself, DeepLift completeness) and on the trained demo segmentation network.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explainer.attribution import (
    ClassEvidence,
    attribute,
    attribute_checked,
    attribution_model,
    completeness_error,
)

SIZE = 64


@pytest.fixture(scope="module")
def fcn():
    from explorer_core.models import load_model

    torch.manual_seed(0)
    lm = load_model("torchvision-seg:fcn_resnet50:random", "cpu")
    lm.input_size = lm.resize = SIZE
    lm._layers = None
    return lm


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


def evidence_by_hand(logits: torch.Tensor, pred: torch.Tensor, cls: int) -> torch.Tensor:
    """(B,) sum of class ``cls``'s logits over the pixels where ``pred == cls``."""
    return torch.stack([logits[i, cls][pred[i] == cls].sum() for i in range(len(logits))])


def test_class_evidence_is_the_masked_logit_sum():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, 9, generator=gen)

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits * x.mean()  # x = ones: the logits themselves

    scorer = ClassEvidence(Fixed())
    x = torch.ones(3, 3, 7, 9)
    pred = scorer.mask(x)
    assert torch.equal(pred, logits.argmax(1))
    ev = scorer(x, pred)
    assert ev.shape == (3, 5)
    for k in range(5):
        torch.testing.assert_close(ev[:, k], evidence_by_hand(logits, pred, k))
    # another image's mask gives another evidence: the mask is an input, not recomputed
    other = torch.roll(pred, 1, dims=0)
    torch.testing.assert_close(scorer(x, other)[:, 2], evidence_by_hand(logits, other, 2))


def _classes(lm, pixels):
    """Per image, (a class with predicted pixels, a class with none)."""
    pred = lm.logits(pixels).argmax(1)
    present = [int(torch.bincount(p.flatten(), minlength=lm.num_classes).argmax()) for p in pred]
    absent = [int(np.setdiff1d(np.arange(lm.num_classes), p.unique().numpy())[0]) for p in pred]
    return present, absent


def test_deeplift_target_shapes_and_completeness(fcn, pixels):
    layer = fcn.recommended_layer
    assert layer == "backbone.layer4.2"
    present, absent = _classes(fcn, pixels)
    acts, attr, delta, gap = attribute_checked(fcn, pixels, layer, present, "deeplift")
    assert acts.shape == attr.shape == (2, 2048, SIZE // 8, SIZE // 8)
    # the gap is the evidence's change from the white baseline, with the input's mask
    with torch.no_grad():
        out_x = fcn.logits(pixels)
        out_b = fcn.model(fcn.white_baseline(pixels.shape)).float()
    pred = out_x.argmax(1)
    want = torch.stack([evidence_by_hand(out_x, pred, c)[i] - evidence_by_hand(out_b, pred, c)[i]
                        for i, c in enumerate(present)])
    torch.testing.assert_close(gap, want, rtol=1e-4, atol=1e-3)
    assert float(want.abs().min()) > 0
    assert completeness_error(delta, gap) < 1e-3  # attributions add up to the evidence change
    # an image without a pixel of the class: evidence 0 for every input, attributions 0
    _, attr0 = attribute(fcn, pixels, layer, absent, "deeplift")
    assert float(attr0.abs().max()) == 0.0
    assert float(attr.abs().max()) > 0


def test_grad_x_act_and_smoothgrad_use_the_fixed_mask(fcn, pixels, monkeypatch):
    layer = fcn.recommended_layer
    present, absent = _classes(fcn, pixels)
    _, attr = attribute(fcn, pixels, layer, present, "grad_x_act")
    assert attr.shape == (2, 2048, SIZE // 8, SIZE // 8) and float(attr.abs().max()) > 0
    _, attr0 = attribute(fcn, pixels, layer, absent, "grad_x_act")
    assert float(attr0.abs().max()) == 0.0

    seen: list[torch.Tensor] = []
    forward = ClassEvidence.forward

    def spy(self, x, pred):
        seen.append(pred.clone())
        return forward(self, x, pred)

    monkeypatch.setattr(ClassEvidence, "forward", spy)
    torch.manual_seed(0)
    _, attr_sg = attribute(fcn, pixels[:1], layer, present[:1], "deeplift_smoothgrad")
    assert attr_sg.shape == (1, 2048, SIZE // 8, SIZE // 8) and float(attr_sg.abs().max()) > 0
    clean = fcn.logits(pixels[:1]).argmax(1)[0]
    assert seen and all(len(p) % 2 == 0 for p in seen)  # noisy copies + their baselines
    assert all(torch.equal(row, clean) for p in seen for row in p)  # never a noisy copy's mask
    prepared = attribution_model(fcn)
    assert not prepared.warnings


def test_demo_seg_deeplift_completeness():
    from demo_world import world
    from explorer_core.models import load_model

    lm = load_model("demo-seg", "cpu")
    arr = world.generate_arrays(1, seed=5, split="check", classes=[0, 4, 7])
    pix = torch.from_numpy(arr.images).permute(0, 3, 1, 2).float() / 255
    acts, attr, delta, gap = attribute_checked(lm, pix, lm.recommended_layer,
                                               arr.labels.tolist(), "deeplift")
    assert acts.shape == (3, 192, 6, 6) and attr.shape == acts.shape
    assert completeness_error(delta, gap) < 1e-3
    assert float(gap.min()) > 0  # each image's own class: its evidence beats the white image's
