"""Adaptable layers as modules: which kind a layer is, its weight parameter, and finding or
swapping a sub-module by qualified name (the bottom of core: :mod:`.targets` and :mod:`.quant`
build on it).

Example:
    >>> from torch import nn
    >>> from loralab.core.modules import layer_kind
    >>> layer_kind(nn.Linear(4, 2)), layer_kind(nn.ReLU())
    ('linear', None)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, cast

from torch import nn

__all__ = [
    "LayerKind",
    "TargetNotFoundError",
    "get_module",
    "layer_kind",
    "modules_replaced",
    "replace_module",
    "weight_parameter",
]

LayerKind = Literal["linear", "conv1d", "linear4bit", "linear8bit"]


class TargetNotFoundError(ValueError):
    """Raised when a target specification matches no adaptable layer (or names a non-adaptable one)."""


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of an adaptable layer, or ``None`` if loralab cannot adapt ``module``.

    Checked by class name for bitsandbytes and transformers' Conv1D, so neither needs importing.
    """
    cls_names = {c.__name__ for c in type(module).__mro__}
    if "Linear4bit" in cls_names:
        return "linear4bit"
    if "Linear8bitLt" in cls_names:
        return "linear8bit"
    if "Conv1D" in cls_names and hasattr(module, "nf"):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The sub-module at qualified ``name`` (``""`` is the model itself), with a clear error."""
    try:
        return model.get_submodule(name) if name else model
    except AttributeError as e:
        raise TargetNotFoundError(f"model has no sub-module named {name!r}") from e


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at qualified ``name`` inside ``model`` and return the module it replaced."""
    if not name:
        raise ValueError("replace_module needs a sub-module name, got '' (the model itself)")
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name)
    old = getattr(parent, child, None)
    if old is None:
        raise TargetNotFoundError(f"model has no sub-module named {name!r}")
    setattr(parent, child, new)
    return old


def weight_parameter(module: nn.Module) -> nn.Parameter:
    """The layer's ``weight`` Parameter (any adaptable kind)."""
    # nn.Module.__getattr__ is typed ``Tensor | Module``; every adaptable kind (see layer_kind, which
    # matches bitsandbytes and Conv1D by class name) stores its weight as a Parameter.
    return cast(nn.Parameter, module.weight)


@contextmanager
def modules_replaced(
    model: nn.Module, choose: Callable[[nn.Module], nn.Module | None]
) -> Iterator[None]:
    """Temporarily put ``choose(module)`` in place of every outermost sub-module for which it is not
    ``None`` (sub-modules of a replaced one are not visited); everything is put back on exit.

    For writing a wrapped model's inner model with its own ``save_pretrained`` (PEFT's LoRA layers ->
    their base layers, ``modules_to_save`` wrappers -> one copy).

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
        >>> with modules_replaced(m, lambda mod: mod[0] if type(mod) is nn.Sequential and mod is not m else None):
        ...     type(m[0]).__name__
        'Linear'
        >>> type(m[0]).__name__
        'Sequential'
    """
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    done: list[str] = []
    try:
        for name, mod in list(model.named_modules()):
            if not name or any(name.startswith(d + ".") for d in done):
                continue
            inner = choose(mod)
            if inner is None:
                continue
            done.append(name)
            parent_name, _, attr = name.rpartition(".")
            parent = get_module(model, parent_name)
            swaps.append((parent, attr, mod))
            setattr(parent, attr, inner)
        yield
    finally:
        for parent, attr, mod in reversed(swaps):
            setattr(parent, attr, mod)
