"""The method registry: ``--method NAME`` → a :class:`~loralab.runners.methods.base.Method`.

Each method is one module of this package exposing ``METHOD`` (an instance); adding a method is
adding a module and its name to :data:`METHOD_MODULES`. Modules are imported on first use only; a
method's own package (``loralab.lora_ga`` ...) is imported only when that method is set up.

What needs every method lives here, not in :mod:`~loralab.runners.methods.base` (which the method
modules import, so it cannot import them): :data:`OPTIONS`, the union of their options, and
:func:`resolve_method_options`, which refuses an option of another method before the method's own
:meth:`~loralab.runners.methods.base.Method.resolve_options`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

from loralab.runners.methods.base import COMMON_DEFAULTS, Method, MethodError, MethodSetup, Option

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "METHODS",
    "METHOD_MODULES",
    "OPTIONS",
    "PRETRAINING_METHOD_MODULES",
    "get_method",
    "method_args",
    "methods",
    "resolve_method_options",
    "setup_method",
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


class _AllOptions(Mapping[str, Option]):
    """Every registered method's options by name, collected from the method modules on first use (so a
    new method is one module: its options come with it)."""

    def __init__(self) -> None:
        self._options: dict[str, Option] | None = None

    def _load(self) -> dict[str, Option]:
        if self._options is None:
            options: dict[str, Option] = {}
            for method in methods().values():
                declared = {o.name: o for o in method.options}
                if set(declared) != set(method.defaults):
                    raise MethodError(
                        f"--method {method.name}: options {sorted(declared)} and defaults "
                        f"{sorted(method.defaults)} must name the same flags"
                    )
                for name, opt in declared.items():
                    if options.setdefault(name, opt) != opt:
                        raise MethodError(
                            f"--{name} is declared differently by two methods ({method.name} and another)"
                        )
            self._options = options
        return self._options

    def __getitem__(self, key: str) -> Option:
        return self._load()[key]

    def __iter__(self) -> Any:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


OPTIONS: Mapping[str, Option] = _AllOptions()
"""Every method option by name: the union of the registered methods' ``options``."""


def resolve_method_options(method: Method, args: Any) -> Any:
    """Check and fill ``args``'s method options for ``method`` (in place; returns ``args``).

    An option of another method that was set (not ``None``) raises :class:`MethodError` naming it and
    the methods it applies to; then :meth:`Method.resolve_options` fills and checks the method's own
    (defaults, choices, ranges, ``optim``, ``max_steps``; ``target_modules`` split into a list).
    """
    _refuse_other_methods_options(method, args)
    return method.resolve_options(args)


def _refuse_other_methods_options(method: Method, args: Any) -> None:
    for name in OPTIONS:
        if name not in method.defaults and getattr(args, name, None) is not None:
            users = [n for n, m in methods().items() if name in m.defaults]
            raise MethodError(
                f"--{name} does not apply to --method {method.name} (it applies to: {', '.join(users) or 'none'}); remove it"
            )


def setup_method(
    method: Method,
    model: nn.Module,
    args: Any,
    train_batches: Iterable[Mapping[str, torch.Tensor]] | None = None,
    **kwargs: Any,
) -> MethodSetup:
    """``method.setup(model, args, train_batches, **kwargs)`` after refusing an option of another
    method in ``args``: the entrypoints' way in, so that the refusal holds for arguments built by
    hand too (``Method.setup`` checks only the method's own options)."""
    _refuse_other_methods_options(method, args)
    return method.setup(model, args, train_batches, **kwargs)


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
    unknown = set(overrides) - set(OPTIONS) - set(COMMON_DEFAULTS)
    if unknown:
        raise MethodError(f"unknown method argument(s): {', '.join(sorted(unknown))}")
    args = MethodArgs(**{**COMMON_DEFAULTS, **{k: None for k in OPTIONS}, **overrides})
    return resolve_method_options(get_method(method), args)
