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

from typing import Literal, cast

from torch import nn

__all__ = [
    "LayerKind",
    "TargetNotFoundError",
    "get_module",
    "layer_kind",
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
