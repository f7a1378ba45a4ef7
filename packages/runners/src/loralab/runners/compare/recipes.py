"""Recommended hyper-parameters per method for ``loralab compare`` (each one overridable).

Every method gets the same data, batches, seed, step budget and schedule; what differs is what the
method's paper recommends for fine-tuning. Learning rates differ because the methods' parameterizations
differ (full fine-tuning moves every weight; LoRA moves a rank-r product scaled by ``alpha / r``;
LoRA-SB trains only an r x r matrix between fixed factors), so one shared learning rate would favour
whichever method it happens to suit.

Where the values come from:

* ``full``: AdamW at the BERT/RoBERTa fine-tuning rate scaled to a short run (GLUE practice uses
  1e-5 to 5e-5 over thousands of steps).
* ``lora``: r = 8, alpha = 16 (LoRA-GA/LoRA-Pro papers' baselines), a 10x larger rate than full
  fine-tuning, the usual LoRA practice.
* ``lora-ga``: the *same* learning rate as LoRA (the LoRA-GA paper compares at equal rates), ``stable``
  scale with gamma 16 and direction ``ArB2r`` (paper defaults), gradient averaged over ``ga_iters``
  training batches (paper: 64 x 2 samples; 8 batches here, the same number of samples on this task).
* ``lora-fa``: the LoRA rate (LoRA-FA's optimizer projects B's update onto the span of frozen A).
* ``lora-sb``: alpha = r (s = 1) and a higher rate, as in the LoRA-SB reference scripts: only r x r
  entries train; A, B, R from the first-step update approximated on ``sb_num_batches`` batches. The
  paper compares LoRA-SB at a *higher* rank than LoRA and still trains far fewer parameters: r = 64
  here trains 64² = 4,096 entries per layer, fewer than LoRA r = 8's 6,144 on a 384 x 384 layer.
* ``lora-xs``: LoRA-SB's architecture, rank, alpha and rate (r = 64, s = 1, 2e-3) with LoRA-XS's init
  (frozen B = U_r·Σ_r, A = V_rᵀ from the pretrained weight's SVD, R = 0): the same 4,096 trainable
  entries per layer, so the difference to ``lora-sb`` is the initialisation alone (LoRA-SB's claim).
* ``lora-pro``: the LoRA rate, ``efficient`` mode with the Sylvester choice of X (paper defaults).
* ``galore`` / ``golore``: rank 8 (matching LoRA's rank), scale 4 (GaLore's GLUE recipe), at the full
  fine-tuning rate since the update is full-space; ``update_proj_gap`` 25 because the run is short
  (the papers use 200 over 10k+ C4 steps). GoLore's ``rand_ratio`` (the GoLore code's convention: the
  fraction of steps that use SVD projectors before random ones) is 0.5 rather than the C4 runs' 0.8,
  so that a 150-step run has enough random-projection steps for the difference to show.

These values were checked on the default task (MiniLM, the shipped sentiment set) to train stably;
they were not tuned per method to win. Override any of them with ``--set METHOD.KEY=VALUE``
(``--set lora.learning_rate=1e-3``) or for every method with ``--set KEY=VALUE``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from loralab.runners.methods.registry import METHODS

__all__ = ["COMMON", "METHOD_ORDER", "RECIPES", "parse_overrides", "recipe_for"]

METHOD_ORDER: tuple[str, ...] = METHODS
"""Every method ``loralab compare`` runs by default, in table and legend order: the registry's
:data:`~loralab.runners.methods.registry.METHODS` (a new method is compared once it is registered)."""

COMMON: dict[str, Any] = dict(
    lr_scheduler_type="linear",
    warmup_ratio=0.0,
    warmup_steps=0,
    weight_decay=0.0,
)
"""Schedule shared by every method (linear decay to 0 over the step budget, no warm-up)."""

_LORA = dict(
    lora_r=8, lora_alpha=16.0, lora_dropout=0.0, use_rslora=False, target_modules="all-linear"
)

RECIPES: dict[str, dict[str, Any]] = {
    "full": dict(learning_rate=5e-5),
    "lora": dict(_LORA, learning_rate=5e-4),
    "lora-ga": dict(
        _LORA,
        learning_rate=5e-4,
        ga_iters=8,
        ga_scale="stable",
        ga_stable_gamma=16.0,
        ga_direction="ArB2r",
    ),
    "lora-fa": dict(_LORA, learning_rate=5e-4),
    "lora-sb": dict(_LORA, lora_r=64, lora_alpha=64.0, learning_rate=2e-3, sb_num_batches=8),
    "lora-xs": dict(_LORA, lora_r=64, lora_alpha=64.0, learning_rate=2e-3, xs_init="weight_svd"),
    "lora-pro": dict(_LORA, learning_rate=5e-4, pro_mode="efficient", pro_x_mode="sylvester"),
    "galore": dict(
        learning_rate=5e-5,
        galore_rank=8,
        update_proj_gap=25,
        galore_scale=4.0,
        target_modules="all-linear",
    ),
    "golore": dict(
        learning_rate=5e-5,
        galore_rank=8,
        update_proj_gap=25,
        galore_scale=4.0,
        rand_ratio=0.5,
        target_modules="all-linear",
    ),
}
"""Per-method hyper-parameters (registry option names and ``learning_rate``); see the module docstring."""


def _convert(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_overrides(items: Iterable[str], methods: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Parse ``--set`` items (``KEY=VALUE`` for every method, ``METHOD.KEY=VALUE`` for one).

    Example:
        >>> parse_overrides(["lora.learning_rate=1e-3", "lora_r=4"], ["lora", "full"])
        {'lora': {'lora_r': 4, 'learning_rate': 0.001}, 'full': {}}
    """
    from loralab.runners.methods import OPTIONS, get_method

    methods = list(methods)
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    scoped: list[tuple[str, str, Any]] = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE or METHOD.KEY=VALUE")
        key, value = item.split("=", 1)
        if "." in key:
            method, key = key.split(".", 1)
            if method not in RECIPES:
                raise ValueError(
                    f"--set {item!r}: unknown method {method!r} (choose from {', '.join(RECIPES)})"
                )
            scoped.append((method, key, _convert(value)))
        else:
            for m in methods:
                # a global option only goes where it applies (``lora_r`` is not given to ``full``)
                if key not in OPTIONS or key in get_method(m).defaults:
                    out[m][key] = _convert(value)
    # method-scoped values win over global ones, whatever the order they were given in
    for method, key, value in scoped:
        if method in out:
            out[method][key] = value
    return out


def recipe_for(method: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The hyper-parameters ``method`` runs with: :data:`COMMON`, its :data:`RECIPES` entry, then
    ``overrides`` (from :func:`parse_overrides`; an option that does not apply to ``method`` is then
    rejected by the registry, naming the flag).

    Example:
        >>> recipe_for("lora")["learning_rate"]
        0.0005
    """
    if method not in RECIPES:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(RECIPES)}")
    return {**COMMON, **copy.deepcopy(RECIPES[method]), **dict(overrides or {})}
