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
