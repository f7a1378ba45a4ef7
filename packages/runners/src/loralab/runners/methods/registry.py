"""The method registry: ``--method NAME`` → a :class:`~loralab.runners.methods.base.Method`.

Each method is one module of this package exposing ``METHOD`` (an instance); adding a method is
adding a module and its name to :data:`METHOD_MODULES`. Modules are imported on first use only; a
method's own package (``loralab.lora_ga`` ...) is imported only when that method is set up.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

from loralab.runners.methods.base import COMMON_DEFAULTS, OPTIONS, Method, MethodError

__all__ = [
    "METHODS",
    "METHOD_MODULES",
    "PRETRAINING_METHOD_MODULES",
    "get_method",
    "method_args",
    "methods",
]

METHOD_MODULES: dict[str, str] = {
    "full": "loralab.runners.methods.full",
    "lora": "loralab.runners.methods.lora",
    "lora-ga": "loralab.runners.methods.lora_ga",
    "lora-fa": "loralab.runners.methods.lora_fa",
    "lora-sb": "loralab.runners.methods.lora_sb",
    "lora-xs": "loralab.runners.methods.lora_xs",
    "lora-pro": "loralab.runners.methods.lora_pro",
    "galore": "loralab.runners.methods.galore",
    "golore": "loralab.runners.methods.golore",
}
METHODS: tuple[str, ...] = tuple(METHOD_MODULES)
"""The ``--method`` choices, in the order the docs list them."""

PRETRAINING_METHOD_MODULES: dict[str, str] = {
    "golore-relora": "loralab.runners.methods.golore_relora",
}
"""Methods only C4 pre-training offers (C4's ``--use_peft --golore`` is ``golore-relora``), not
``--method`` choices of the fine-tuning entrypoints (:data:`METHODS`): ``golore-relora`` trains W on
refresh steps only, which DDP cannot average (:attr:`Method.ddp_wrappable`), and the fine-tuning
engines run DDP; C4 all-reduces those gradients itself. :func:`get_method` finds them."""


@cache
def _load(name: str) -> Method:
    return importlib.import_module({**METHOD_MODULES, **PRETRAINING_METHOD_MODULES}[name]).METHOD


def get_method(name: str) -> Method:
    """The method called ``name`` (one of :data:`METHODS`).

    Example:
        >>> get_method("lora").defaults["lora_r"]
        8
    """
    if name not in METHOD_MODULES and name not in PRETRAINING_METHOD_MODULES:
        raise MethodError(f"--method must be one of {', '.join(METHODS)}, got {name!r}")
    return _load(name)


def methods() -> Mapping[str, Method]:
    """Every registered method by name."""
    return {n: get_method(n) for n in METHODS}


class MethodArgs:
    """A plain attribute bag standing in for parsed command-line arguments (see :func:`method_args`)."""

    if TYPE_CHECKING:
        # its attributes are the keyword arguments it is built with, and what callers add (flag_names)
        def __getattr__(self, name: str) -> Any: ...
        def __setattr__(self, name: str, value: Any) -> None: ...

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    def __repr__(self) -> str:
        return f"MethodArgs({', '.join(f'{k}={v!r}' for k, v in sorted(self.__dict__.items()))})"


def method_args(method: str, **overrides: Any) -> MethodArgs:
    """Arguments for ``get_method(method).setup`` without a command line: common defaults, the method's
    option defaults, then ``overrides`` (checked: an option of another method raises).

    Example:
        >>> args = method_args("golore", galore_rank=4, max_steps=100, learning_rate=1e-3)
        >>> args.rand_ratio
        0.0
    """
    from loralab.runners.methods.base import resolve_method_options

    unknown = set(overrides) - set(OPTIONS) - set(COMMON_DEFAULTS)
    if unknown:
        raise MethodError(f"unknown method argument(s): {', '.join(sorted(unknown))}")
    args = MethodArgs(**{**COMMON_DEFAULTS, **{k: None for k in OPTIONS}, **overrides})
    return resolve_method_options(get_method(method), args)
