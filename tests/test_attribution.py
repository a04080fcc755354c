"""Attribution stage: ReLU unsharing (DeepLift completeness), filter-and-scale, pixel rows."""

import pytest
import torch
import torchvision

from explainer.attribution import contrast_filter, pixel_rows, pixel_scores, scale_by_scores
from explorer_core.hooks import attribution_copy, reused_nonlinearities


def _resnet(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = getattr(torchvision.models, arch)(weights=None, num_classes=10).eval()
    # random init + eval BN gives near-zero logits; spread the BN stats for a meaningful test
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_var.fill_(0.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _deeplift_delta(model, layer, x, base, target):
    from captum.attr import LayerDeepLift

    mod = dict(model.named_modules())[layer]
    x = x.clone().requires_grad_(True)
    attr, delta = LayerDeepLift(model, mod).attribute(x, baselines=base, target=target,
                                                      return_convergence_delta=True)
    with torch.no_grad():
        x = x.detach()
        gap = model(x)[torch.arange(len(x)), target] - model(base)[torch.arange(len(x)), target]
    return attr, delta, gap


@pytest.mark.parametrize("arch,layer", [("resnet18", "layer3.1"), ("resnet50", "layer3.5")])
def test_unshared_relus_give_deeplift_completeness(arch, layer):
    model = _resnet(arch)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 64, 64, generator=g)
    base = torch.ones_like(x)
    target = torch.tensor([0, 3, 5, 7])
    assert reused_nonlinearities(model, x[:1])  # torchvision blocks reuse self.relu
    fixed = attribution_copy(model)
    assert reused_nonlinearities(fixed, x[:1]) == []
    with torch.no_grad():  # the rewrite must not change the function
        assert torch.allclose(fixed(x), model(x), atol=1e-5)
    attr, delta, gap = _deeplift_delta(fixed, layer, x, base, target)
    rel = (attr.flatten(1).sum(1) - gap).abs() / gap.abs().clamp_min(1e-3)
    assert rel.max() < 1e-3, rel
    assert delta.abs().max() < 1e-3 * gap.abs().max()
    # the original (shared ReLU) model: captum either refuses or is measurably off
    try:
        attr0, _, _ = _deeplift_delta(model, layer, x, base, target)
    except RuntimeError as exc:
        assert "used more than once" in str(exc)
    else:
        rel0 = (attr0.flatten(1).sum(1) - gap).abs() / gap.abs().clamp_min(1e-3)
        assert rel0.max() > 10 * rel.max()


def test_attribution_copy_keeps_names_and_original_untouched():
    model = _resnet("resnet18")
    fixed = attribution_copy(model)
    names = {n for n, _ in model.named_modules()}
    assert names <= {n for n, _ in fixed.named_modules()}
    assert not hasattr(model.layer1[0], "relu_1")


def test_inplace_activations_are_made_non_inplace():
    import timm

    m = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    assert any(getattr(x, "inplace", False) for x in m.modules())
    fixed = attribution_copy(m)
    assert not any(getattr(x, "inplace", False) for x in fixed.modules())


def test_filter_and_scale_paper_and_reference():
    # 1 image, 2 channels, 1x3 pixels
    a = torch.tensor([[[[1.0, 2.0, 3.0]], [[4.0, 0.0, 1.0]]]])
    attr = torch.tensor([[[[1.0, -2.0, 3.0]], [[1.0, 1.0, -4.0]]]])
    s = pixel_scores(attr, "paper")  # means: 1, -0.5, -0.5
    assert torch.allclose(s, torch.tensor([[[1.0, -0.5, -0.5]]]))
    scaled = scale_by_scores(a, s)
    assert torch.allclose(scaled, torch.tensor([[[[1.0, 0.0, 0.0]], [[4.0, 0.0, 0.0]]]]))
    s_ref = pixel_scores(attr, "reference")  # relu means: 1, 0.5, 1.5
    assert torch.allclose(s_ref, torch.tensor([[[1.0, 0.5, 1.5]]]))
    scaled = scale_by_scores(a, s_ref)
    assert torch.allclose(scaled, torch.tensor([[[[1.0, 1.0, 4.5]], [[4.0, 0.0, 1.5]]]]))


def test_pixel_rows_drop_zero_rows_in_image_y_x_order():
    x = torch.zeros(2, 3, 2, 2)
    x[0, :, 0, 1] = torch.tensor([1.0, 2.0, 3.0])
    x[1, 1, 1, 0] = 5.0
    V, keep = pixel_rows(x)
    assert V.shape == (2, 3)
    assert keep.nonzero().flatten().tolist() == [1, 6]  # image 0 (0,1) ; image 1 (1,0)
    assert V[0].tolist() == [1.0, 2.0, 3.0]


def test_contrast_filter_keeps_positive_and_quarter_of_max():
    a = torch.arange(8.0).view(1, 2, 2, 2) + 1
    s = torch.tensor([[[4.0, 1.0], [0.5, -1.0]]])  # max 4 -> threshold 1: keep 4 and 1
    rows = contrast_filter(a, s)
    assert rows.tolist() == [[1.0, 5.0], [2.0, 6.0]]
    # an image whose scores are all negative contributes nothing (authors' bug: it passed)
    s_neg = torch.tensor([[[-4.0, -1.0], [-0.5, -1.0]]])
    assert contrast_filter(a, s_neg).shape == (0, 2)


def test_negative_activations_refused_unless_clamped():
    from explainer.attribution import check_nonnegative
    from explorer_core.errors import ExplorerError

    a = torch.tensor([[[[1.0, -2.0]], [[0.5, 3.0]]]])
    with pytest.raises(ExplorerError, match="negative activations \\(25.0% of values\\).*clamp"):
        check_nonnegative(a, "conv", clamp=False)
    out, warn = check_nonnegative(a, "conv", clamp=True)
    assert float(out.min()) == 0.0 and float(out.sum()) == 4.5
    assert "clamped" in warn
    same, none = check_nonnegative(a.clamp_min(0), "conv", clamp=False)
    assert none is None


def test_all_methods_batched_on_a_small_resnet():
    from explainer.attribution import attribute
    from explorer_core.models import LoadedModel

    model = _resnet("resnet18")
    lm = LoadedModel("resnet18", model, torch.device("cpu"), 64, 64, (0.485, 0.456, 0.406),
                     (0.229, 0.224, 0.225), [str(i) for i in range(10)])
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    targets = [1, 2, 3]
    out = {m: attribute(lm, x, "layer4.1", targets, m, batch_size=2)
           for m in ("deeplift", "grad_x_act", "deeplift_smoothgrad")}
    acts = out["deeplift"][0]
    assert acts.shape == (3, 512, 2, 2) and float(acts.min()) >= 0
    for m, (a, attr) in out.items():
        assert torch.allclose(a, acts, rtol=1e-4, atol=1e-3), m  # clean activations for every method
        assert attr.shape == acts.shape
    # grad x act at the last block: logit is linear in the pooled activations
    w = model.fc.weight[torch.tensor(targets)].view(3, 512, 1, 1) / 4
    assert torch.allclose(out["grad_x_act"][1], acts * w, rtol=1e-4, atol=1e-4)
    # smoothgrad differs from plain DeepLift, but correlates with it
    d, s = out["deeplift"][1].flatten(), out["deeplift_smoothgrad"][1].flatten()
    assert not torch.allclose(d, s)
    assert float(torch.corrcoef(torch.stack([d, s]))[0, 1]) > 0.3


# ---------------------------------------------------------------------------------------------
# defect 7: DeepLift on user models with reused modules or functional nonlinearities


class _ReusedReLU(torch.nn.Module):
    """One ``nn.ReLU`` module called three times per forward."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        a = self.relu(self.conv1(x))
        a = self.relu(self.conv2(a))
        a = self.relu(self.conv3(a))
        return self.fc(a.mean(dim=(2, 3)))


class _FunctionalReLU(_ReusedReLU):
    """The same network with ``F.relu`` after conv2 and conv3 (invisible to captum)."""

    def forward(self, x):
        a = self.relu(self.conv1(x))
        a = torch.nn.functional.relu(self.conv2(a))
        a = torch.nn.functional.relu(self.conv3(a))
        return self.fc(a.mean(dim=(2, 3)))


def _toy(cls):
    from explorer_core.models import LoadedModel

    torch.manual_seed(0)
    model = cls().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel("toy", model, torch.device("cpu"), 32, 32, (0.5,) * 3, (0.25,) * 3,
                       [str(i) for i in range(5)])


_X = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
_T = [0, 1, 2, 3, 4, 0, 1, 2]


def _old_path(lm, layer):
    """What the code did before: captum's LayerDeepLift on ``attribution_copy(model)`` without a
    probe (only torchvision blocks were rewritten). Returns (delta, gap) or raises."""
    from captum.attr import LayerDeepLift

    model = attribution_copy(lm.model)
    x = lm.normalize(_X).requires_grad_(True)
    attr, delta = LayerDeepLift(model, dict(model.named_modules())[layer]).attribute(
        x, baselines=lm.white_baseline(x.shape), target=torch.tensor(_T),
        return_convergence_delta=True)
    return delta.detach(), attr.detach().flatten(1).sum(1) - delta.detach()


def test_reused_relu_module_is_given_one_copy_per_call():
    from explainer.attribution import attribution_model, completeness_error, deeplift_completeness
    from explorer_core.hooks import PerCallCopies

    lm = _toy(_ReusedReLU)
    # before: captum 0.9 refuses the reused module (a RuntimeError, a traceback in the CLI/app)
    with pytest.raises(RuntimeError, match="used more than once"):
        _old_path(lm, "conv1")
    prepared = attribution_model(lm)
    assert prepared.unshared == {"relu": 3} and prepared.still_reused == []
    assert prepared.warnings == []
    assert isinstance(dict(prepared.model.named_modules())["relu"], PerCallCopies)
    assert not isinstance(lm.model.relu, PerCallCopies)  # the loaded model is untouched
    assert reused_nonlinearities(prepared.model, lm.normalize(_X[:1])) == []
    with torch.no_grad():
        assert torch.allclose(prepared.model(lm.normalize(_X)), lm.model(lm.normalize(_X)))
    for layer in ("conv1", "conv2"):
        err = completeness_error(*deeplift_completeness(lm, _X, layer, _T))
        assert err < 1e-3, (layer, err)


def test_reused_module_as_the_layer_is_its_last_call():
    from explainer.attribution import attribute, completeness_error

    lm = _toy(_ReusedReLU)
    acts, attr, delta = attribute(lm, _X, "relu", _T, "deeplift", return_delta=True)
    _, ref = lm.logits_and_activations(_X, "relu")  # the hook's last call, as the catalog sees it
    assert torch.allclose(acts, ref, atol=1e-6)
    assert completeness_error(delta, attr.flatten(1).sum(1) - delta) < 1e-3


def test_functional_relu_is_detected_by_completeness_and_warned():
    from explainer.attribution import (
        COMPLETENESS_TOLERANCE,
        attribute,
        attribution_model,
        completeness_error,
        completeness_warning,
        deeplift_completeness,
    )

    lm = _toy(_FunctionalReLU)
    # before: DeepLift ran without complaint and was wrong by a large margin
    old = completeness_error(*_old_path(lm, "conv1"))
    assert old > 0.1, old
    assert attribution_model(lm).unshared == {}  # no module is reused: hooks cannot see F.relu
    err = completeness_error(*deeplift_completeness(lm, _X, "conv1", _T))
    assert err == pytest.approx(old, rel=1e-3) and err > 10 * COMPLETENESS_TOLERANCE
    warn = completeness_warning(err, "conv1", "deeplift")
    assert warn is not None and "grad_x_act" in warn and "F.relu" in warn and "conv1" in warn
    assert completeness_warning(1e-5, "conv1", "deeplift") is None  # float rounding: no warning
    # grad_x_act needs no completeness and is exact for the function: logit = sum over the
    # last layer's (post-ReLU) activations times the pooled weight
    acts, attr = attribute(lm, _X, "conv3", _T, "grad_x_act")
    w = lm.model.fc.weight[torch.tensor(_T)].view(8, 8, 1, 1) / (32 * 32)
    assert torch.allclose(attr, torch.relu(acts) * w, atol=1e-6)


@pytest.mark.parametrize("arch,layers", [("resnet18", ("layer3.1", "layer4.1")),
                                         ("resnet50", ("layer3.5", "layer4.2"))])
def test_torchvision_resnets_stay_complete_through_attribute(arch, layers):
    from explainer.attribution import attribution_model, completeness_error, deeplift_completeness
    from explorer_core.models import LoadedModel

    lm = LoadedModel(arch, _resnet(arch), torch.device("cpu"), 64, 64, (0.485, 0.456, 0.406),
                     (0.229, 0.224, 0.225), [str(i) for i in range(10)])
    prepared = attribution_model(lm)
    assert len(prepared.canonized) == (8 if arch == "resnet18" else 16)
    assert prepared.unshared == {} and prepared.warnings == []
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for layer in layers:
        err = completeness_error(*deeplift_completeness(lm, x, layer, [0, 3, 5, 7]))
        assert err < 1e-3, (layer, err)


def test_completeness_error_is_a_ratio_of_sums():
    from explainer.attribution import completeness_error

    assert completeness_error([0.1, -0.1], [1.0, -3.0]) == pytest.approx(0.05)
    assert completeness_error([], []) is None
    assert completeness_error([0.0], [0.0]) == 0.0


def test_layers_inside_a_residual_block_are_not_cuts_and_relu_aliases_the_block_output():
    from explainer.attribution import (
        attribute,
        completeness_error,
        completeness_layer,
        deeplift_completeness,
        layer_is_cut,
    )
    from explorer_core.models import LoadedModel

    lm = LoadedModel("resnet18", _resnet("resnet18"), torch.device("cpu"), 64, 64,
                     (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), [str(i) for i in range(10)])
    assert layer_is_cut(lm, "layer4.1") and layer_is_cut(lm, "layer4.1.relu")
    assert not layer_is_cut(lm, "layer4.1.bn2")  # the skip connection bypasses it
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    # inside the block, completeness is measured at the block's input, the previous block
    assert completeness_layer(lm, "layer4.1.bn2") == "layer4.0"
    assert completeness_layer(lm, "layer1.0.conv2") == "maxpool"
    assert completeness_layer(lm, "layer4.1") == "layer4.1"
    assert completeness_error(*deeplift_completeness(lm, x, "layer4.1.bn2", [1, 2, 3])) < 1e-3
    # (at the input it would not be: captum's MaxPool rule is not complete)
    assert completeness_error(*deeplift_completeness(lm, x, "conv1", [1, 2, 3])) > 0.05
    # torchvision's reused block.relu: a hook on it sees the block output last; so does DeepLift
    acts, _ = attribute(lm, x, "layer4.1.relu", [1, 2, 3], "deeplift")
    _, seen = lm.logits_and_activations(x, "layer4.1.relu")
    assert torch.allclose(acts, seen, atol=1e-5)


def test_attribute_reports_the_one_progress_type_per_batch():
    from explainer.attribution import attribute
    from explorer_core.models import LoadedModel
    from explorer_core.progress import Progress

    lm = LoadedModel("resnet18", _resnet("resnet18"), torch.device("cpu"), 64, 64,
                     (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), [str(i) for i in range(10)])
    x = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    seen: list[Progress] = []
    attribute(lm, x, "layer4.1", [0, 1, 2, 3, 4], "grad_x_act", batch_size=2,
              progress=seen.append)
    assert seen and all(isinstance(p, Progress) for p in seen)
    assert {p.stage for p in seen} == {"attribution"} and {p.unit for p in seen} == {"images"}
    assert seen[-1].done == seen[-1].total == 5
