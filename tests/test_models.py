"""Model adapters: real EfficientNet-Lite0 accuracy, spec parsing, user errors, other loaders."""

from __future__ import annotations

import pytest
import torch

from explorer_core.errors import ExplorerError
from explorer_core.models import KNOWN_SPECS, load_model, parse_spec


def test_lite0_top1_on_nips17_via_catalog(lite0_catalog):
    # the catalog ran the project's own ImageFolder + geometry + model code over the photos
    rows = lite0_catalog._q("SELECT label, pred FROM images "
                            "WHERE path LIKE 'imagenet-nips17/%' AND label IS NOT NULL")
    assert len(rows) == 1000
    top1 = sum(int(l == p) for l, p in rows) / len(rows)
    assert top1 >= 0.88, top1  # README of the photo sets: 89.3 %


def test_lite0_top5_contains_pred_and_samples_accuracy(lite0_catalog):
    rows = lite0_catalog._q("SELECT label, pred, top5 FROM images "
                            "WHERE path LIKE 'imagenet-samples/%'")
    assert len(rows) == 1000  # incl. two photos smaller than a crop, upscaled
    assert all(r[2][0] == r[1] and len(r[2]) == 5 for r in rows)
    top1 = sum(int(l == p) for l, p, _ in rows) / len(rows)
    top5 = sum(int(l in t) for l, _, t in rows) / len(rows)
    assert top1 >= 0.85 and top5 >= top1 + 0.05, (top1, top5)


def test_bad_specs_list_what_is_valid(tmp_path):
    with pytest.raises(ExplorerError) as e:
        load_model("resnet5O", "cpu")
    assert "valid specs" in str(e.value) and "efficientnet_lite0" in str(e.value)
    with pytest.raises(ExplorerError, match="not found"):
        load_model(f"resnet18:{tmp_path / 'missing.pth'}", "cpu")
    with pytest.raises(ExplorerError, match="needs a file"):
        parse_spec("torchscript")
    with pytest.raises(ExplorerError, match="Empty model spec"):
        parse_spec("  ")


def test_unknown_layer_lists_candidates(lite0):
    with pytest.raises(ExplorerError) as e:
        lite0.module("layer4.2")
    assert "bn2" in str(e.value) and "candidate" in str(e.value)


@pytest.mark.parametrize("spec", ["demo", "efficientnet_lite0", "resnet50", "resnet18:/w/x.pth",
                                  "resnet50_robust:/c.pt", "torchscript:/m.pt",
                                  "timm:resnet18:/s.pth", "torchvision:vgg11:/s.pth"])
def test_parse_spec_round_trip(spec):
    assert str(parse_spec(spec)) == spec
    assert parse_spec(str(parse_spec(spec))) == parse_spec(spec)


def test_every_listed_spec_form_parses_and_is_named_in_errors():
    filled = [k.replace("[:WEIGHTS]", "").replace("CHECKPOINT", "/c.pt").replace("FILE", "/m.pt")
              .replace("seg:ARCH", "seg:fcn_resnet50").replace("ARCH", "resnet18")
              .replace("[:STATE_DICT|random]", ":STATE_DICT").replace("CLASS", "Net")
              .replace("STATE_DICT", "/s.pth") for k in KNOWN_SPECS]
    parsed = [parse_spec(f) for f in filled]
    assert [str(p) for p in parsed] == filled
    assert {p.kind for p in parsed} == {"demo", "lite", "resnet", "resnet50_robust",
                                        "torchscript", "timm", "torchvision", "demo-seg",
                                        "torchvision-seg", "python"}
    assert {p.arch for p in parsed if p.kind == "lite"} == {
        "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    with pytest.raises(ExplorerError) as e:
        parse_spec("resnet5O")
    assert all(k in str(e.value) for k in KNOWN_SPECS)


def test_lite0_candidate_layers(lite0):
    layers = {l.name: l for l in lite0.candidate_layers()}
    bn2 = layers["bn2"]
    assert bn2.shape == (1280, 7, 7) and bn2.nonnegative and bn2.recommended
    assert sum(l.recommended for l in layers.values()) == 1
    assert lite0.input_size == 224 and lite0.crop_size == 74 and lite0.num_classes == 1000


def test_resnet18_state_dict_loads_two_ways(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    x = torch.rand(2, 3, 224, 224)
    outs = []
    for spec in (f"resnet18:{path}", f"torchvision:resnet18:{path}"):
        lm = load_model(spec, "cpu")
        assert lm.recommended_layer == "layer4.1"
        info = lm.layer_info("layer4.1")
        assert info.shape == (512, 7, 7) and info.nonnegative
        outs.append(lm.logits(x))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    with torch.no_grad():
        ref = net.eval()(load_model(f"resnet18:{path}", "cpu").normalize(x))
    assert torch.allclose(outs[0], ref, atol=1e-4)


def test_wrong_state_dict_is_a_user_error(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ExplorerError, match="do not fit"):
        load_model(f"resnet18:{path}", "cpu")


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


def test_torchscript_file_loads(tmp_path):
    torch.manual_seed(0)
    net = _Tiny().eval()
    path = tmp_path / "tiny.pt"
    torch.jit.script(net).save(str(path))
    lm = load_model(f"torchscript:{path}", "cpu")
    assert lm.num_classes == 10 and lm.input_size == 224
    x = torch.rand(3, 3, 224, 224)
    with torch.no_grad():
        ref = net(lm.normalize(x))
    assert torch.allclose(lm.logits(x), ref, atol=1e-5)
    # TorchScript refuses forward hooks: no candidate layers, and a clear message for a layer
    assert lm.candidate_layers() == [] and lm.recommended_layer is None
    with pytest.raises(ExplorerError, match="TorchScript"):
        lm.module("conv")


def test_resnet50_robust_checkpoint_keys_are_stripped(tmp_path):
    """A Madry-lab ``robustness`` checkpoint: ``{"model": state, "epoch", ...}`` whose state
    holds ``module.model.*`` (the network), ``module.attacker.model.*`` (a copy for the attack)
    and ``module.normalizer.*`` / ``module.attacker.normalize.*`` (mean/std buffers)."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).eval()
    ref = net.state_dict()
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    state = {"module.normalizer.new_mean": mean.view(3, 1, 1),
             "module.normalizer.new_std": std.view(3, 1, 1),
             "module.attacker.normalize.new_mean": mean.view(3, 1, 1),
             "module.attacker.normalize.new_std": std.view(3, 1, 1)}
    state.update({f"module.model.{k}": v for k, v in ref.items()})
    state.update({f"module.attacker.model.{k}": torch.zeros_like(v) for k, v in ref.items()})
    path = tmp_path / "robust.pt"
    torch.save({"model": state, "epoch": 90, "schedule": None}, path)
    lm = load_model(f"resnet50_robust:{path}", "cpu")
    got = lm.model.state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)  # the network, not the attacker's zeros
    assert lm.recommended_layer == "layer4.2" and lm.num_classes == 1000
    assert (lm.input_size, lm.mean, lm.std) == (224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(lm.logits(x), net(lm.normalize(x)), atol=1e-4)
    # a checkpoint of another network is refused with the reason
    torch.save({"model": {"module.model.fc.weight": torch.zeros(10, 2048)}}, path)
    with pytest.raises(ExplorerError, match="do not fit"):
        load_model(f"resnet50_robust:{path}", "cpu")


@pytest.mark.parametrize("spec,size,resize", [("efficientnet_lite1", 240, 272),
                                              ("efficientnet_lite2", 260, 292)])
def test_lite1_lite2_load_real_weights_and_classify_photos(spec, size, resize, shared_data):
    import csv

    from PIL import Image

    lm = load_model(spec, "cpu")
    assert (lm.input_size, lm.resize, lm.crop_size) == (size, resize, size // 3)
    assert lm.recommended_layer == "bn2" and lm.layer_info("bn2").nonnegative
    assert lm.layer_info("bn2").shape == (1280, (size + 31) // 32, (size + 31) // 32)
    with (shared_data / "imagenet-samples" / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))[::50]  # 20 photos of 20 classes
    pixels = torch.stack([lm.geometry(Image.open(shared_data / "imagenet-samples" / r["file"]))
                          for r in rows])
    assert pixels.shape == (20, 3, size, size)
    pred = lm.logits(pixels).argmax(dim=1).tolist()
    hits = sum(int(p == int(r["label"])) for p, r in zip(pred, rows))
    assert hits >= 16, (hits, pred)  # lite0 gets 85 % of these photos; lite1/2 are stronger


def _tiny_lm(task: str, background: int | None = None):
    """A LoadedModel around a 1x1-conv 'segmenter' (or its pooled classifier twin)."""
    import torch
    from torch import nn

    from explorer_core.models import LoadedModel

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1)
    model = conv if task == "segmentation" else nn.Sequential(
        conv, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return LoadedModel("test", model.eval(), torch.device("cpu"), 8, 8, (0.5,) * 3, (0.25,) * 3,
                       ["a", "b", "c", "bg"], task=task, background_class=background)


def test_segmentation_scores_are_pixel_shares_and_pred_skips_background():
    import torch

    lm = _tiny_lm("segmentation", background=3)
    x = torch.rand(2, 3, 8, 8)
    out = lm.model(lm.normalize(x))
    argmax = out.argmax(1)
    shares = lm.class_scores(x)
    assert shares.shape == (2, 4)
    for b in range(2):
        for k in range(4):
            assert shares[b, k].item() == pytest.approx(float((argmax[b] == k).float().mean()))
    assert torch.allclose(shares.sum(1), torch.ones(2))
    p = lm.summarize(out)
    assert p.shares is not None and p.shares.shape == (2, 4)
    fg = shares[:, :3]
    assert p.pred.tolist() == fg.argmax(1).tolist()  # the background never wins
    assert p.conf.tolist() == pytest.approx(fg.max(1).values.tolist())
    assert p.top5.shape == (2, 4)


def test_classification_summary_is_softmax_argmax():
    import torch

    lm = _tiny_lm("classification")
    x = torch.rand(3, 3, 8, 8)
    logits = lm.model(lm.normalize(x))
    p = lm.summarize(logits)
    probs = torch.softmax(logits, 1)
    assert p.shares is None
    assert p.pred.tolist() == probs.argmax(1).tolist()
    assert p.conf.tolist() == pytest.approx(probs.max(1).values.tolist())
    assert torch.allclose(lm.class_scores(x), probs, atol=1e-6)
