"""A comparison small enough for tests and a first try on a laptop: the tiny random model, a few
steps on a few examples, one thread, no progress bars.

Example:
    >>> from loralab.runners.compare.testing import smoke_config
    >>> cfg = smoke_config("/tmp/cmp", methods=["lora"], steps=3)
    >>> cfg.model, cfg.steps, cfg.max_train_samples
    ('tiny', 3, 8)
"""

from __future__ import annotations

from typing import Any

from loralab.runners.compare import CompareConfig

__all__ = ["SMOKE", "smoke_config"]

SMOKE: dict[str, Any] = dict(
    model="tiny",
    steps=2,
    batch_size=2,
    eval_every=0,
    max_length=16,
    max_train_samples=8,
    max_eval_samples=8,
    threads=1,
    progress=False,
)
""":class:`CompareConfig` settings of a smoke comparison (seconds per method on 2 CPU cores)."""


def smoke_config(output_dir: str, **overrides: Any) -> CompareConfig:
    """A :class:`CompareConfig` with :data:`SMOKE`'s settings, ``output_dir`` and ``overrides``."""
    return CompareConfig(**{**SMOKE, "output_dir": str(output_dir), **overrides})
