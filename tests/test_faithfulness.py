"""Faithfulness tests on a tiny model: shift hook, patch geometry and fills, stitching."""

import numpy as np
import pytest
import torch
from torch import nn

from explainer.faithfulness import (
    patch_box,
    patch_from_file,
    patch_insertion,
    prediction_tests,
    shift_test,
    shifted_probabilities,
    stitch,
)
from explorer_core.errors import ExplorerError
from explorer_core.models import LoadedModel


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


@pytest.fixture()
def tiny():
    model = Tiny().eval()
    return LoadedModel("tiny", model, torch.device("cpu"), 30, 30, (0.5, 0.4, 0.3),
                       (0.2, 0.2, 0.2), ["a", "b", "c"])


def test_shift_offset_zero_is_identity_and_large_offset_moves_to_a(tiny):
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(5, 3, 30, 30, generator=g)
    w = tiny.model.fc.weight[0] - tiny.model.fc.weight[1]  # points to class 0 vs class 1
    res = shift_test(tiny, "relu", imgs, w.detach().numpy(), 0, 1, offsets=(0, 1, 1000))
    base = torch.softmax(tiny.logits(imgs), 1)[:, 0].mean().item()
    assert abs(res.default_prob_a - base) < 1e-6
    assert res.max_prob_a > 0.99 and res.best_offset == 1000
    assert len(res.mean_prob_a) == 3 and res.n_images == 5


def test_per_image_shifted_probabilities_average_to_the_shift_curve(tiny):
    g = torch.Generator().manual_seed(1)
    imgs = torch.rand(6, 3, 30, 30, generator=g)
    w = (tiny.model.fc.weight[0] - tiny.model.fc.weight[1]).detach().numpy()
    res = shift_test(tiny, "relu", imgs, w, 0, 1, offsets=(0, 2, 50))
    for t, mean_a, mean_b in zip(res.offsets, res.mean_prob_a, res.mean_prob_b):
        p = shifted_probabilities(tiny, "relu", imgs, w, t)
        assert p.shape == (6, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
        assert abs(p[:, 0].mean() - mean_a) < 1e-5 and abs(p[:, 1].mean() - mean_b) < 1e-5
    assert not tiny.model.relu._forward_hooks  # hook removed


def test_shift_hook_removed_even_after_an_error(tiny):
    imgs = torch.rand(2, 3, 30, 30)
    before = tiny.logits(imgs)
    with pytest.raises(RuntimeError, match="size of tensor"):
        shift_test(tiny, "relu", imgs, np.ones(7), 0, 1)  # wrong width: fails inside the hook
    assert len(tiny.model.relu._forward_hooks) == 0
    assert torch.equal(tiny.logits(imgs), before)


def test_patch_box_positions():
    assert patch_box(224, 74, 74, "bottom-right") == (150, 150, 224, 224)
    assert patch_box(224, 74, 74, "top-left") == (0, 0, 74, 74)
    assert patch_box(224, 10, 20, "top-right") == (204, 0, 224, 10)
    assert patch_box(224, 10, 20, "bottom-left") == (0, 214, 20, 224)
    assert patch_box(224, 74, 74, "center") == (75, 75, 149, 149)
    assert patch_box(224, 74, 74, (5, 7)) == (5, 7, 79, 81)
    with pytest.raises(ExplorerError, match="leaves the"):
        patch_box(224, 74, 74, (200, 0))
    with pytest.raises(ExplorerError, match="Unknown patch position"):
        patch_box(224, 74, 74, "middle")


def test_patch_insertion_fills(tiny, monkeypatch):
    imgs = torch.rand(3, 3, 30, 30)
    patch = torch.full((3, 10, 10), 0.9)
    seen = []
    orig = tiny.class_scores  # what every test reads (softmax, or a segmenter's pixel shares)
    monkeypatch.setattr(tiny, "class_scores",
                        lambda x, **k: (seen.append(x.clone()), orig(x))[1])
    res = patch_insertion(tiny, imgs, patch, 0, 1, "bottom-right", control="mean")
    before, after, ctrl = seen
    assert res.box == (20, 20, 30, 30)
    assert torch.equal(before, imgs)
    assert torch.allclose(after[:, :, 20:, 20:], torch.tensor(0.9))
    assert torch.equal(after[:, :, :20], imgs[:, :, :20])
    # mean control: zeros after normalisation
    assert torch.allclose(tiny.normalize(ctrl)[:, :, 20:, 20:], torch.tensor(0.0), atol=1e-6)
    seen.clear()
    res = patch_insertion(tiny, imgs, patch, 0, 1, (0, 0), control="black")
    assert float(seen[2][:, :, :10, :10].abs().max()) == 0.0
    assert res.prob_a_after.shape == (3,)
    with pytest.raises(ExplorerError, match="control"):
        patch_insertion(tiny, imgs, patch, 0, 1, control="grey")


def test_stitch_and_prediction_tests(tiny):
    crops = torch.rand(3, 3, 10, 10)
    s = stitch(crops)
    assert s.shape == (3, 30, 10)
    assert torch.equal(s[:, 10:20], crops[1])
    res = prediction_tests(tiny, [s, s], [0, 2], [[1, 2, 3], [1, 2, 3]], [False, True])
    p = torch.softmax(tiny.logits(s[None]), 1)[0]
    assert abs(res[0].prob_target - float(p[0])) < 1e-6
    assert abs(res[1].prob_target - float(p[2])) < 1e-6
    assert res[0].passed == (int(p.argmax()) == 0)
    assert res[0].stitched.shape == (30, 10, 3)


def test_patch_from_file(tiny, tmp_path):
    from PIL import Image

    Image.new("RGB", (50, 40), (255, 0, 0)).save(tmp_path / "p.png")
    p = patch_from_file(tiny, tmp_path / "p.png")
    assert p.shape == (3, 10, 10)
    assert float(p[0].min()) == 1.0 and float(p[1].max()) == 0.0
    with pytest.raises(ExplorerError, match="not found"):
        patch_from_file(tiny, tmp_path / "nope.png")
