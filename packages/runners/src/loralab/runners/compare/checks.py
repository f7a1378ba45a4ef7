"""``loralab compare``'s own pre-flight checks (before any method process starts): ``--set`` items
(:func:`check_overrides`), the sweep flags (:func:`check_compare_sweep`), and :func:`check_compare`,
which runs them with :mod:`loralab.runners.preflight`'s checks of the device, model, data files,
output directory and ranks. Each failure is a :class:`~loralab.runners.preflight.PreflightError`.

Example:
    >>> from loralab.runners.compare.checks import check_overrides
    >>> check_overrides(["lora.learning_rat=1e-3"], ["lora"])
    Traceback (most recent call last):
    ...
    loralab.runners.preflight.PreflightError: --set lora.learning_rat=1e-3: unknown key 'learning_rat' (did you mean 'learning_rate'?); keys: ...
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from typing import Any

from loralab.runners.preflight import (
    PreflightError,
    RankRequest,
    check_data_file,
    check_device,
    check_model_path,
    check_output_dir_writable,
    check_ranks,
    rank_request,
)

__all__ = [
    "COMPARE_FIXED_KEYS",
    "DEFAULT_LR_FACTORS",
    "check_compare",
    "check_compare_sweep",
    "check_overrides",
]


COMPARE_FIXED_KEYS: dict[str, str] = {
    "max_steps": "--steps",
    "seed": "--seed",
    "task_type": "the task (compare classifies)",
    "modules_to_save": "the model's classification head",
    "progress": "--no_progress",
}
"""Hyper-parameters ``loralab compare`` sets itself for every method: ``--set`` refuses them."""


def _settable_types() -> dict[str, Any]:
    """``--set`` key → the type its value must have (an Option's type, or its common default's)."""
    from loralab.runners.methods import COMMON_DEFAULTS, OPTIONS
    from loralab.runners.methods.base import _bool

    out: dict[str, Any] = {}
    for name, default in COMMON_DEFAULTS.items():
        if name not in COMPARE_FIXED_KEYS:
            out[name] = type(default)
    for name, opt in OPTIONS.items():
        out[name] = bool if opt.type is _bool else opt.type
    return out


def _takes(method: str, key: str) -> bool:
    from loralab.runners.methods import MethodError, get_method

    try:
        return key in get_method(method).defaults
    except MethodError:  # an unknown method is named by compare's own check
        return True


def _all_methods() -> list[str]:
    from loralab.runners.methods import METHODS

    return list(METHODS)


def _type_ok(value: Any, expected: Any) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is bool:  # 0 / 1 were always taken as false / true
        return isinstance(value, bool) or value in (0, 1)
    return True  # str options take any text (the registry checks their choices)


def check_overrides(items: Iterable[str], methods: Sequence[str]) -> None:
    """Refuse ``--set`` items with an unknown key (suggesting the closest one), a key compare sets
    itself, or a value of the wrong type; run before any method process starts.

    A method-scoped item must name a method being compared and one of its options (``--set
    full.lora_r=4`` is refused: ``lora_r`` is not an option of ``full``); an unscoped method option
    goes to the compared methods it applies to and is refused when it applies to none of them.

    Example:
        >>> check_overrides(["lora.learning_rate=abc"], ["lora"])
        Traceback (most recent call last):
        ...
        loralab.runners.preflight.PreflightError: --set lora.learning_rate=abc: learning_rate must be a float (a number like 1e-3), got 'abc'
    """
    from loralab.runners.compare.recipes import _convert
    from loralab.runners.methods import OPTIONS

    types = _settable_types()
    for item in items:
        if "=" not in item:
            raise PreflightError(f"--set {item!r}: expected KEY=VALUE or METHOD.KEY=VALUE")
        key, text = item.split("=", 1)
        scope, key = key.split(".", 1) if "." in key else (None, key)
        if scope is not None and scope not in methods:
            raise PreflightError(
                f"--set {item}: {scope} is not among --methods ({', '.join(methods)}); add it to "
                "--methods or drop the item"
            )
        if key in COMPARE_FIXED_KEYS:
            raise PreflightError(
                f"--set {item}: {key} is set by loralab compare for every method; use "
                f"{COMPARE_FIXED_KEYS[key]} instead"
            )
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PreflightError(
                f"--set {item}: unknown key {key!r}{hint}; keys: {', '.join(sorted(types))}"
            )
        if key in OPTIONS:
            takers = [m for m in (methods if scope is None else [scope]) if _takes(m, key)]
            if not takers:
                applies = [m for m in _all_methods() if _takes(m, key)]
                whom = scope if scope is not None else "any of --methods " + ", ".join(methods)
                raise PreflightError(
                    f"--set {item}: {key} is not an option of {whom} (it applies to: "
                    f"{', '.join(applies)}); remove it"
                )
        value, expected = _convert(text), types[key]
        if value is None or _type_ok(value, expected):
            continue
        what = {
            float: "a float (a number like 1e-3)",
            int: "an int (a whole number like 8)",
            bool: "a bool (true or false)",
        }[expected]
        raise PreflightError(f"--set {item}: {key} must be {what}, got {text!r}")


DEFAULT_LR_FACTORS: tuple[float, ...] = (0.25, 1.0, 4.0)
"""``loralab compare --sweep``'s grid: multipliers of each recipe's learning rate (a 16× range)."""


def check_compare_sweep(config: Any) -> tuple[float, ...]:
    """``loralab compare``'s ``--sweep``, ``--lr_factors``, ``--seeds`` and ``--heldout_fraction``;
    returns the factors each method trains at (``(1.0,)`` without ``--sweep``).

    Raises:
        PreflightError: ``--lr_factors`` without ``--sweep``, empty, non-positive, not finite or
            repeated; ``--seeds`` < 1; ``--heldout_fraction`` outside [0, 1), or 0 with ``--sweep``
            (the sweep chooses on the held-out split).
    """

    factors = config.lr_factors
    if factors is not None and not config.sweep:
        raise PreflightError(
            f"--lr_factors {' '.join(map(str, factors))} is only used with --sweep; add --sweep, "
            "or drop --lr_factors (and use --set learning_rate=... for one rate)"
        )
    if config.sweep:
        factors = DEFAULT_LR_FACTORS if factors is None else tuple(float(f) for f in factors)
        if not factors:
            raise PreflightError(
                "--lr_factors: give at least one factor (e.g. --lr_factors 0.25 1 4), or omit the "
                f"flag for the default grid {' '.join(f'{f:g}' for f in DEFAULT_LR_FACTORS)}"
            )
        bad = [f for f in factors if not math.isfinite(f) or f <= 0]
        if bad:
            raise PreflightError(
                f"--lr_factors must be positive finite multipliers of each recipe's learning "
                f"rate, got {' '.join(f'{f:g}' for f in bad)}"
            )
        if len(set(factors)) != len(factors):
            raise PreflightError(
                f"--lr_factors lists a factor twice: {' '.join(f'{f:g}' for f in factors)}"
            )
    else:
        factors = (1.0,)
    if not isinstance(config.seeds, int) or config.seeds < 1:
        raise PreflightError(f"--seeds must be an integer >= 1, got {config.seeds!r}")
    fraction = config.heldout_fraction
    if not 0.0 <= fraction < 1.0:
        raise PreflightError(f"--heldout_fraction must be in [0, 1), got {fraction}")
    if config.sweep and fraction == 0.0:
        raise PreflightError(
            "--sweep chooses each method's rate on the held-out part of the training data: "
            "--heldout_fraction must be > 0, got 0"
        )
    return tuple(factors)


def check_compare(config: Any) -> tuple[str, str]:
    """Everything ``loralab compare`` can check before any method process starts; returns the resolved
    ``(model path or hub id, label)`` (``tiny`` is written under ``--output_dir`` once it is checked).
    """
    from loralab.runners.compare.recipes import parse_overrides, recipe_for
    from loralab.runners.compare.task import resolve_model
    from loralab.runners.methods import MethodError, method_args

    check_compare_sweep(config)
    check_overrides(config.set, config.methods)
    check_output_dir_writable(config.output_dir)
    check_device(config.device)
    for flag in ("train_file", "validation_file"):
        if getattr(config, flag):
            check_data_file(getattr(config, flag), f"--{flag}")
    if config.model not in ("auto", "tiny", "minilm"):
        check_model_path(config.model, "--model")
    model_path, label = resolve_model(config.model, config.output_dir)
    overrides = parse_overrides(config.set, config.methods)
    requests = []
    for method in config.methods:
        try:
            args = method_args(
                method,
                **recipe_for(method, overrides[method]),
                max_steps=config.steps,
                seed=config.seed,
                task_type="SEQ_CLS",
                progress=False,
            )
        except (MethodError, TypeError):
            continue  # reported in the method's row, as before (e.g. an option of another method)
        req = rank_request(method, args)
        if req is not None:
            keys = {s.split("=", 1)[0] for s in config.set}
            given = f"{method}.{req.option}" in keys or req.option in keys
            how = f"--set {method}.{req.option}={req.value}" if given else "the recipe's"
            requests.append(
                RankRequest(
                    **{
                        **req.__dict__,
                        "flag": f"{req.option}={req.value} for {method} ({how})",
                    }
                )
            )
    from loralab.runners.glue import HEAD_NAMES

    check_ranks(
        model_path, requests, auto_class="AutoModelForSequenceClassification", heads=HEAD_NAMES
    )
    return model_path, label
