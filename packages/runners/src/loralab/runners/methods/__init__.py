"""One method registry for every loralab runner: ``--method full | lora | lora-ga | lora-fa | lora-sb |
lora-xs | lora-pro | galore | golore``.

``get_method(name).setup(model, args, train_batches)`` returns ``MethodSetup(model, optimizer,
scheduler, callbacks)``; entrypoints call ``setup_method(get_method(name), model, args, ...)``, which
first refuses an option of another method in ``args`` (as ``method_args`` and
``resolve_method_options`` do). Methods whose package is not installed raise ``ImportError`` with the
``pip install`` line only when used.

Example:
    >>> from loralab.runners.methods import get_method, method_args
    >>> from loralab.core.testing import tiny_llama
    >>> setup = get_method("lora").setup(tiny_llama(), method_args("lora", lora_r=4))
    >>> setup.model.peft_config["default"].r
    4
"""

from loralab.runners.methods.base import (
    COMMON_DEFAULTS,
    Callback,
    FinalDirectory,
    Method,
    MethodError,
    MethodSetup,
    Option,
)
from loralab.runners.methods.cli import add_method_arguments
from loralab.runners.methods.registry import (
    METHODS,
    OPTIONS,
    MethodArgs,
    get_method,
    method_args,
    methods,
    resolve_method_options,
    setup_method,
)

__all__ = [
    "COMMON_DEFAULTS",
    "METHODS",
    "OPTIONS",
    "Callback",
    "FinalDirectory",
    "Method",
    "MethodArgs",
    "MethodError",
    "MethodSetup",
    "Option",
    "add_method_arguments",
    "get_method",
    "method_args",
    "methods",
    "resolve_method_options",
    "setup_method",
]
