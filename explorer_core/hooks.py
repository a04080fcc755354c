"""Temporary and permanent model surgery needed by the method.

* :func:`attribution_copy` - a deep copy of a model where every nonlinearity *use* has its own,
  non-inplace module. captum's DeepLift stores a module's input/output on the module itself, so a
  module called twice per forward (torchvision ``BasicBlock``/``Bottleneck`` reuse ``self.relu``)
  silently gets the wrong multipliers; inplace activations (timm ``BatchNormAct2d`` uses
  ``ReLU6(inplace=True)``) overwrite the tensors captum hooks. ``ReLU6`` is registered with captum's
  DeepLift rescale rule (it is an elementwise monotone function like ``ReLU``).
* :func:`shifted_layer` - a context manager replacing a layer's output by ``relu(a + t * w)``.

Hooks are context managers: registered on entry, always removed on exit.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["attribution_copy", "reused_nonlinearities", "shifted_layer", "ACTIVATIONS"]

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.Hardtanh, nn.SiLU, nn.Hardswish,
               nn.Hardsigmoid, nn.SELU, nn.CELU, nn.Mish)


def _register_relu6_with_captum() -> None:
    from captum.attr._core import deep_lift

    table = deep_lift.SUPPORTED_NON_LINEAR
    if nn.ReLU6 not in table:
        table[nn.ReLU6] = deep_lift.nonlinear  # rescale rule: delta_out / delta_in, elementwise


def _basic_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    identity = x
    out = self.relu_1(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    return self.relu_out(out + identity)


def _bottleneck_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    identity = x
    out = self.relu_1(self.bn1(self.conv1(x)))
    out = self.relu_2(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    return self.relu_out(out + identity)


def attribution_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` fit for DeepLift: no inplace activation, no reused ReLU module.

    Known patterns rewritten: torchvision ``BasicBlock`` / ``Bottleneck`` get ``relu_1``
    (``relu_2``) and ``relu_out`` modules and a forward that uses each once; ``self.relu`` is kept
    (unused) so state dicts and module names stay the same. Every activation module with an
    ``inplace`` flag is made non-inplace. The copy's module names equal the original's, so a
    layer name (``layer4.2``, ``bn2``) addresses the same layer. Use
    :func:`reused_nonlinearities` to check a model with unknown patterns.
    """
    _register_relu6_with_captum()
    from torchvision.models.resnet import BasicBlock, Bottleneck

    clone = copy.deepcopy(model)
    for mod in list(clone.modules()):
        if isinstance(mod, (BasicBlock, Bottleneck)) and isinstance(getattr(mod, "relu", None),
                                                                    nn.Module):
            mod.relu_1 = nn.ReLU(inplace=False)
            mod.relu_out = nn.ReLU(inplace=False)
            if isinstance(mod, Bottleneck):
                mod.relu_2 = nn.ReLU(inplace=False)
                mod.forward = types.MethodType(_bottleneck_forward, mod)
            else:
                mod.forward = types.MethodType(_basic_forward, mod)
    for mod in clone.modules():
        if isinstance(mod, ACTIVATIONS) and getattr(mod, "inplace", False):
            mod.inplace = False
    return clone.eval()


def reused_nonlinearities(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of activation modules called more than once in one forward of ``example``
    (those make captum's DeepLift wrong); empty when the model is safe."""
    counts: dict[str, int] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, ACTIVATIONS):
            def hook(_m: nn.Module, _i: object, _o: object, name: str = name) -> None:
                counts[name] = counts.get(name, 0) + 1
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return sorted(n for n, c in counts.items() if c > 1)


@contextlib.contextmanager
def shifted_layer(module: nn.Module, direction: torch.Tensor, offset: float | torch.Tensor
                  ) -> Iterator[dict[str, torch.Tensor | float]]:
    """Within the block, ``module``'s output ``a`` (B, C, h, w) becomes ``relu(a + t * w)``
    at every pixel, ``direction`` = ``w`` of shape (C,). ``t`` is ``offset``: a float, or a
    (B,) tensor of per-image offsets; it can be changed between forwards through the yielded
    dict's ``"offset"`` entry. The hook is removed on exit, also when the block raises."""
    w = direction.reshape(1, -1, 1, 1)
    state: dict[str, torch.Tensor | float] = {"offset": offset}

    def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
        t = state["offset"]
        if isinstance(t, torch.Tensor):
            t = t.to(out.device, out.dtype).reshape(-1, 1, 1, 1)
        return torch.relu(out + t * w.to(out.device, out.dtype))

    handle = module.register_forward_hook(hook)
    try:
        yield state
    finally:
        handle.remove()
