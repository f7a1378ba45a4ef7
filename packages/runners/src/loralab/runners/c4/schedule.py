"""Learning-rate schedules of the GaLore / GoLore / ReLoRA C4 scripts, as ``LambdaLR`` multipliers.

- ``cosine``: linear warm-up to 1, then cosine down to ``min_lr_ratio`` at ``num_training_steps``.
- ``linear``: linear warm-up, then linear decay to 0 (transformers' schedule).
- ``cosine_restarts`` (ReLoRA's "jagged" cosine, arXiv 2307.05695 §3): the same cosine envelope, but
  every ``cycle_length`` steps the rate drops to 0 and warms up again over ``restart_warmup_steps``
  to the envelope's value at the end of that warm-up, so each projector / LoRA reset starts gently.
- ``constant``: warm-up, then 1.

Example:
    >>> from loralab.runners.c4.schedule import lr_multiplier
    >>> round(lr_multiplier(50, "cosine", num_training_steps=100, warmup_steps=10, min_lr_ratio=0.1), 4)
    0.6281
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["get_scheduler", "lr_multiplier"]


def _cosine(progress: float, min_lr_ratio: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_multiplier(
    step: int,
    kind: str,
    *,
    num_training_steps: int,
    warmup_steps: int,
    min_lr_ratio: float = 0.1,
    cycle_length: int | None = None,
    restart_warmup_steps: int | None = None,
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, (num_training_steps - step) / max(1, num_training_steps - warmup_steps))
    progress = (step - warmup_steps) / max(1, num_training_steps - warmup_steps)
    if kind == "cosine":
        return _cosine(progress, min_lr_ratio)
    if kind == "cosine_restarts":
        assert cycle_length is not None and restart_warmup_steps is not None
        in_cycle = step % cycle_length
        if step >= cycle_length and in_cycle < restart_warmup_steps:
            # warm up again to the envelope's value at the end of this restart's warm-up
            end = step - in_cycle + restart_warmup_steps
            target = _cosine(
                (end - warmup_steps) / max(1, num_training_steps - warmup_steps), min_lr_ratio
            )
            return in_cycle / max(1, restart_warmup_steps) * target
        return _cosine(progress, min_lr_ratio)
    raise ValueError(
        f"--scheduler must be cosine | linear | cosine_restarts | constant, got {kind!r}"
    )


def get_scheduler(
    optimizer: Optimizer,
    kind: str,
    *,
    num_training_steps: int,
    warmup_steps: int,
    min_lr_ratio: float = 0.1,
    cycle_length: int | None = None,
    restart_warmup_steps: int | None = None,
) -> LambdaLR:
    """A ``LambdaLR`` following :func:`lr_multiplier`; checks the restart settings for ``cosine_restarts``."""
    if kind == "cosine_restarts":
        if cycle_length is None or cycle_length <= 0:
            raise ValueError(
                f"--scheduler cosine_restarts needs a positive --cycle_length, got {cycle_length}"
            )
        if restart_warmup_steps is None:
            restart_warmup_steps = max(1, cycle_length // 10)
        if not 0 < restart_warmup_steps < cycle_length:
            raise ValueError(
                f"--restart_warmup_steps must be in (0, --cycle_length={cycle_length}), got {restart_warmup_steps}"
            )
        if warmup_steps > cycle_length:
            raise ValueError(
                f"--warmup_steps {warmup_steps} is longer than --cycle_length {cycle_length}: the first restart would cut the warm-up"
            )
    lam = partial(
        lr_multiplier,
        kind=kind,
        num_training_steps=num_training_steps,
        warmup_steps=warmup_steps,
        min_lr_ratio=min_lr_ratio,
        cycle_length=cycle_length,
        restart_warmup_steps=restart_warmup_steps,
    )
    lr_multiplier(
        0,
        kind,
        num_training_steps=num_training_steps,
        warmup_steps=0,
        min_lr_ratio=min_lr_ratio,
        cycle_length=cycle_length,
        restart_warmup_steps=restart_warmup_steps,
    )  # validates kind
    return LambdaLR(optimizer, lam)
