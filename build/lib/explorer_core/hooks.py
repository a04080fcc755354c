"""Temporary hooks and the model rewrite DeepLift needs.

* :class:`RemovableHandleList` / :func:`forward_hooks` - the one way this project registers
  temporary hooks (zennit's pattern): as a context manager that removes every hook on exit, also
  when the block raises.
* :func:`prepare_for_attribution` / :func:`attribution_copy` - a deep copy of a model where every
  nonlinearity *use* has its own, non-inplace module. captum's DeepLift stores a module's
  input/output on the module itself, so a module called twice per forward (torchvision
  ``BasicBlock``/``Bottleneck`` reuse ``self.relu``) silently gets the wrong multipliers; inplace
  activations (timm ``BatchNormAct2d`` uses ``ReLU6(inplace=True)``) overwrite the tensors captum
  hooks. Known architectures are rewritten by a :class:`Canonizer` (registry
  :data:`CANONIZERS`); any other nonlinearity module called ``k > 1`` times per forward (found by a
  counting hook on a probe input) is replaced by :class:`PerCallCopies`, which gives each call, in
  forward order, its own copy. ``ReLU6`` is registered with captum's DeepLift rescale rule (it is
  an elementwise monotone function like ``ReLU``). Functional calls (``F.relu``) cannot be seen
  by hooks: the completeness check in :mod:`explainer.attribution` finds those.
* :func:`shifted_layer` - a context manager replacing a layer's output by ``relu(a + t * w)``.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "ACTIVATIONS",
    "CANONIZERS",
    "AttributionModel",
    "Canonizer",
    "PerCallCopies",
    "RemovableHandleList",
    "TorchvisionResNetCanonizer",
    "attribution_copy",
    "forward_hooks",
    "nonlinearity_calls",
    "prepare_for_attribution",
    "reused_nonlinearities",
    "shifted_layer",
]

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.Hardtanh, nn.SiLU, nn.Hardswish,
               nn.Hardsigmoid, nn.SELU, nn.CELU, nn.Mish)

ForwardHook = Callable[[nn.Module, Any, Any], Any]


# --------------------------------------------------------------------------------------------
# temporary hooks


class RemovableHandleList:
    """Handles of temporary hooks. :meth:`remove` removes them all; used as a context manager
    (``with RemovableHandleList() as handles: handles.append(m.register_forward_hook(h))``) it
    removes them on exit, also when the block raises (zennit ``core.RemovableHandleList``)."""

    def __init__(self, handles: Iterable[RemovableHandle] = ()) -> None:
        self._handles = list(handles)

    def append(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def __len__(self) -> int:
        return len(self._handles)

    def __iter__(self) -> Iterator[RemovableHandle]:
        return iter(list(self._handles))

    def remove(self) -> None:
        """Remove every hook (each once; the list is empty afterwards)."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> RemovableHandleList:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@contextlib.contextmanager
def forward_hooks(pairs: Iterable[tuple[nn.Module, ForwardHook]]
                  ) -> Iterator[RemovableHandleList]:
    """Register ``hook`` as a forward hook of ``module`` for every ``(module, hook)`` pair for the
    duration of the block; all of them are removed on exit, whatever happens (also when a
    registration or the block raises). Yields the handles."""
    with RemovableHandleList() as handles:
        for module, hook in pairs:
            handles.append(module.register_forward_hook(hook))
        yield handles


# --------------------------------------------------------------------------------------------
# canonizers: per-architecture rewrites that give each nonlinearity use its own module


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


class Canonizer:
    """A rewrite of one architecture's modules (in place, on a copy) so that every nonlinearity
    is called once per forward, with the same function and the same module names (new modules
    may be added). zennit's ``ResNetBottleneckCanonizer`` is the model."""

    name = "canonizer"

    def applies(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def apply(self, module: nn.Module) -> dict[str, str]:
        """Rewrite ``module`` in place. Returns aliases ``{child: child}`` (names relative to
        ``module``): a child no longer called whose output, as seen by hooks on the original
        model, is now produced by another child."""
        raise NotImplementedError


class TorchvisionResNetCanonizer(Canonizer):
    """torchvision ``BasicBlock`` / ``Bottleneck`` call ``self.relu`` two (three) times: they
    get ``relu_1`` (``relu_2``) and ``relu_out`` modules and a forward that uses each once;
    ``self.relu`` is kept (unused) so state dicts and module names stay the same. A hook on the
    original ``relu`` sees the block output last, so ``relu`` is an alias of ``relu_out``."""

    name = "torchvision-resnet"

    def applies(self, module: nn.Module) -> bool:
        from torchvision.models.resnet import BasicBlock, Bottleneck

        return (type(module) in (BasicBlock, Bottleneck)
                and isinstance(getattr(module, "relu", None), nn.ReLU))

    def apply(self, module: nn.Module) -> dict[str, str]:
        from torchvision.models.resnet import Bottleneck

        module.relu_1 = nn.ReLU(inplace=False)
        module.relu_out = nn.ReLU(inplace=False)
        if isinstance(module, Bottleneck):
            module.relu_2 = nn.ReLU(inplace=False)
            module.forward = types.MethodType(_bottleneck_forward, module)  # type: ignore[method-assign]
        else:
            module.forward = types.MethodType(_basic_forward, module)  # type: ignore[method-assign]
        return {"relu": "relu_out"}


CANONIZERS: list[Canonizer] = [TorchvisionResNetCanonizer()]
"""Known architectures' rewrites, tried on every module of a model prepared for attribution.
Append a :class:`Canonizer` to support another architecture by rewriting it."""


# --------------------------------------------------------------------------------------------
# generic unsharing: one copy of a reused module per call


class PerCallCopies(nn.Module):
    """Stands in for a nonlinearity module that the model calls ``k`` times per forward: the
    ``i``-th call of a forward (in forward order) runs its own copy ``copies[i]``, so captum's
    DeepLift sees ``k`` modules called once each.

    Valid only while the model calls it the same ``k`` times, in the same order, in every
    forward: :func:`prepare_for_attribution` checks that on its probe input. The call counter is
    reset by a forward pre-hook on the model's root (:meth:`reset`).
    """

    def __init__(self, module: nn.Module, calls: int) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(module) for _ in range(calls))
        self.calls = 0

    def reset(self) -> None:
        self.calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        i = self.calls % len(self.copies)  # more calls than probed: the completeness check tells
        self.calls += 1
        return self.copies[i](*args, **kwargs)


def _register_relu6_with_captum() -> None:
    from captum.attr._core import deep_lift

    table = deep_lift.SUPPORTED_NON_LINEAR
    if nn.ReLU6 not in table:
        table[nn.ReLU6] = deep_lift.nonlinear  # rescale rule: delta_out / delta_in, elementwise


def _nonlinear_types() -> tuple[type, ...]:
    """Module types whose reuse breaks captum's DeepLift: activations and every type captum
    gives a DeepLift rule (ReLU, Sigmoid, MaxPool, Softmax, ...)."""
    from captum.attr._core import deep_lift

    return tuple({*ACTIVATIONS, *deep_lift.SUPPORTED_NON_LINEAR})


def nonlinearity_calls(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """How often each nonlinearity module is called in one forward of ``example``
    ``(B, 3, H, W)``, by module name (modules not called are left out)."""
    counts: dict[str, int] = {}

    def counter(name: str) -> ForwardHook:
        def hook(_m: nn.Module, _i: object, _o: object) -> None:
            counts[name] = counts.get(name, 0) + 1
        return hook

    kinds = _nonlinear_types()
    pairs = [(mod, counter(name)) for name, mod in model.named_modules()
             if type(mod) in kinds or isinstance(mod, ACTIVATIONS)]
    with forward_hooks(pairs), torch.no_grad():
        model(example)
    return counts


def reused_nonlinearities(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of nonlinearity modules called more than once in one forward of ``example``
    (those make captum's DeepLift wrong); empty when the model is safe."""
    return sorted(n for n, c in nonlinearity_calls(model, example).items() if c > 1)


@dataclass
class AttributionModel:
    """A model prepared for DeepLift by :func:`prepare_for_attribution`.

    Attributes
    ----------
    model : nn.Module
        The eval-mode copy; same function and module names as the original.
    canonized : list of str
        Modules rewritten by a :class:`Canonizer` (``"layer1.0 (torchvision-resnet)"``).
    unshared : dict of str to int
        Nonlinearity modules the model called ``k > 1`` times, replaced by
        :class:`PerCallCopies` with ``k`` copies.
    still_reused : list of str
        Nonlinearity modules still called more than once after the rewrite (should be empty).
    warnings : list of str
        What could not be made safe, in words.
    aliases : dict of str to str
        Layer names of the original whose output the copy computes in another module
        (``layer4.1.relu`` -> ``layer4.1.relu_out``); see :meth:`layer`.
    layer_cuts : dict of str to bool
        Per layer name, whether every path from input to output passes through it (filled by
        :func:`explainer.attribution.layer_is_cut`).
    call_order : list of str
        Module names in the order their forward completes (filled on first use by
        :func:`explainer.attribution.completeness_layer`).
    """

    model: nn.Module
    canonized: list[str] = field(default_factory=list)
    unshared: dict[str, int] = field(default_factory=dict)
    still_reused: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    layer_cuts: dict[str, bool] = field(default_factory=dict)
    call_order: list[str] = field(default_factory=list)

    def layer(self, name: str) -> nn.Module:
        """The copy's module whose output is what a hook on the original's layer ``name`` sees
        (for a module called several times: its last call)."""
        module = dict(self.model.named_modules())[self.aliases.get(name, name)]
        if isinstance(module, PerCallCopies):
            module = module.copies[-1]
        return module


def _parents_of(root: nn.Module, child: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(mod, attr) for mod in root.modules() for attr, sub in mod._modules.items()
            if sub is child]


def _unshare(clone: nn.Module, counts: dict[str, int]) -> dict[str, int]:
    """Replace every nonlinearity module called ``k > 1`` times (``counts`` from
    :func:`nonlinearity_calls`) by a :class:`PerCallCopies`."""
    modules = dict(clone.named_modules())
    wrappers: list[PerCallCopies] = []
    done: dict[str, int] = {}
    for name, k in counts.items():
        if k <= 1 or name == "":
            continue
        wrapper = PerCallCopies(modules[name], k)
        for parent, attr in _parents_of(clone, modules[name]):
            setattr(parent, attr, wrapper)
        wrappers.append(wrapper)
        done[name] = k
    if wrappers:
        def reset(_m: nn.Module, _i: object) -> None:
            for w in wrappers:
                w.reset()
        clone.register_forward_pre_hook(reset)  # permanent: part of the rewritten copy
    return done


def prepare_for_attribution(model: nn.Module, example: torch.Tensor | None = None
                            ) -> AttributionModel:
    """A deep copy of ``model`` fit for DeepLift: no inplace activation, no reused module.

    Known architectures are rewritten by :data:`CANONIZERS`; every activation module with an
    ``inplace`` flag is made non-inplace. With a probe input ``example`` ``(B, 3, H, W)`` (on the
    model's device), a counting hook then finds nonlinearity modules still called more than once
    per forward; each is given one copy per call (:class:`PerCallCopies`), and the count is
    checked again: every copy must now be called once, and the copy's output must equal the
    original's. The original model is not changed; the copy's module names include the
    original's, so a layer name (``layer4.2``, ``bn2``) addresses the same layer.
    """
    _register_relu6_with_captum()
    clone = copy.deepcopy(model)
    out = AttributionModel(clone)
    for name, mod in list(clone.named_modules()):
        for canonizer in CANONIZERS:
            if canonizer.applies(mod):
                aliases = canonizer.apply(mod)
                prefix = f"{name}." if name else ""
                out.aliases.update({prefix + k: prefix + v for k, v in aliases.items()})
                out.canonized.append(f"{name} ({canonizer.name})")
                break
    for mod in clone.modules():
        if isinstance(mod, ACTIVATIONS) and getattr(mod, "inplace", False):
            mod.inplace = False
    clone.eval()
    if example is None:
        return out
    counts = nonlinearity_calls(clone, example)
    out.unshared = _unshare(clone, counts)
    if not (out.unshared or out.canonized):
        return out  # nothing rewritten: the counts above show no reuse
    if out.unshared:
        out.still_reused = reused_nonlinearities(clone, example)
    if out.still_reused:
        out.warnings.append(
            "nonlinearity modules called more than once per forward even after the rewrite: "
            + ", ".join(out.still_reused) + "; DeepLift attributions are wrong for this model; "
            "use method grad_x_act")
    with torch.no_grad():
        same = torch.allclose(clone(example), model(example), rtol=1e-4, atol=1e-5)
    if not same:  # e.g. the call order changes between forwards: the per-call copies are unsafe
        out.warnings.append(
            "the rewrite for DeepLift (" + ", ".join([*out.canonized, *out.unshared])
            + ") changed the model's output; DeepLift attributions cannot be trusted for this "
            "model; use method grad_x_act")
    return out


def attribution_copy(model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
    """The model of :func:`prepare_for_attribution` (``example``: an optional probe input
    ``(B, 3, H, W)``; without it only known architectures are rewritten)."""
    return prepare_for_attribution(model, example).model


# --------------------------------------------------------------------------------------------
# the hyperplane shift


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

    with forward_hooks([(module, hook)]):
        yield state
