"""Temporary hooks (zennit's pattern): every hook the project registers is removed on exit,
also when the block raises; :func:`forward_hooks` is the one helper for it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explorer_core.hooks import RemovableHandleList, forward_hooks, shifted_layer
from explorer_core.models import LoadedModel, capture_layer


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_forward_hooks_run_inside_and_are_removed_after_an_exception() -> None:
    net = _net()
    seen: list[tuple[int, ...]] = []
    with pytest.raises(ValueError, match="inside"):
        with forward_hooks([(net[1], lambda _m, _i, o: seen.append(tuple(o.shape))),
                            (net[3], lambda _m, _i, o: seen.append(tuple(o.shape)))]) as handles:
            assert len(handles) == 2 and _hook_count(net) == 2
            net(torch.rand(2, 3, 8, 8))
            raise ValueError("inside the block")
    assert seen == [(2, 4, 8, 8), (2, 4, 8, 8)]
    assert _hook_count(net) == 0
    net(torch.rand(1, 3, 8, 8))
    assert len(seen) == 2  # nothing fires any more


def test_forward_hooks_remove_the_registered_ones_when_a_registration_fails() -> None:
    net = _net()

    def pairs():  # the second registration raises (a generator that fails half-way)
        yield net[1], lambda *_: None
        raise RuntimeError("cannot hook this")

    with pytest.raises(RuntimeError, match="cannot hook"):
        with forward_hooks(pairs()):
            pass
    assert _hook_count(net) == 0


def test_removable_handle_list_as_context_manager() -> None:
    net = _net()
    with pytest.raises(KeyError):
        with RemovableHandleList() as handles:
            handles.append(net[0].register_forward_hook(lambda *_: None))
            handles.append(net[2].register_forward_pre_hook(lambda *_: None))
            assert _hook_count(net) == 2
            raise KeyError("x")
    assert _hook_count(net) == 0 and len(handles) == 0
    handles.remove()  # removing twice is harmless


def test_capture_layer_and_shifted_layer_clean_up_after_exceptions() -> None:
    net = _net()
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ZeroDivisionError):
        with capture_layer(net, net[3]) as store:
            net(x)
            assert store["out"].shape == (2, 4, 8, 8)
            raise ZeroDivisionError("inside")
    with pytest.raises(ZeroDivisionError):
        with shifted_layer(net[3], torch.ones(4), 2.0):
            shifted = net(x)
            raise ZeroDivisionError("inside")
    assert _hook_count(net) == 0
    assert not torch.allclose(shifted, net(x))  # the shift acted inside, and is gone now


def test_model_probes_leave_no_hook() -> None:
    net = _net()
    lm = LoadedModel("toy", net, torch.device("cpu"), 8, 8, (0.5,) * 3, (0.25,) * 3,
                     ["a", "b", "c"])
    names = [l.name for l in lm.candidate_layers()]
    assert names == ["0", "1", "2", "3"]
    logits, acts = lm.logits_and_activations(torch.rand(2, 3, 8, 8), "3")
    assert logits.shape == (2, 3) and acts.shape == (2, 4, 8, 8)
    assert _hook_count(net) == 0


def test_catalog_embedder_removes_its_hook_when_the_forward_fails() -> None:
    # catalog v2: the build's forward (one pass, hooks on every catalog layer) lives in
    # data_index.embed.Embedder (it was data_index.catalog._Embedder, one layer)
    from data_index.crops import CropGrid
    from data_index.embed import Embedder

    net = _net()
    lm = LoadedModel("toy", net, torch.device("cpu"), 8, 8, (0.5,) * 3, (0.25,) * 3,
                     ["a", "b", "c"])
    emb = Embedder(lm, ["1", "3"], "cell", CropGrid.default(8), 1)

    def boom(_a: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("reduce failed")

    with pytest.raises(RuntimeError, match="reduce failed"):
        emb._forward(torch.rand(1, 3, 8, 8), boom)
    assert _hook_count(net) == 0
    logits, pooled = emb._forward(torch.rand(1, 3, 8, 8), lambda a: a.mean(dim=(2, 3)))
    assert logits.shape == (1, 3) and [p.shape for p in pooled] == [(1, 4), (1, 4)]
    assert _hook_count(net) == 0
