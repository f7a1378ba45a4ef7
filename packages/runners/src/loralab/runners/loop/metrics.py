"""One metrics schema for every recipe (GLUE, MetaMath, WinoGrande, C4, compare): ``metrics.jsonl``.

One JSON object per line, each with a ``kind`` and the optimizer ``step`` it belongs to:

- ``{"kind": "train", "step", "loss", "learning_rate", "time_s", ...}``: the mean training loss over the
  optimizer steps since the previous ``train`` record (all ranks), the learning rate after the step,
  and ``time_s``, the training wall time since the run started (setup included, evaluation and
  checkpointing excluded). Optional: ``epoch``, ``grad_norm``, ``tokens_seen``, ``tokens_per_s``, ...
- ``{"kind": "eval", "step", "time_s", "eval_<metric>": ...}``: every evaluation; metric names get the
  ``eval_`` prefix (``eval_accuracy``, ``eval_loss``).
- ``{"kind": "summary", "step", "status", "train_runtime_s", "eval_<metric>": ...}``: once, at the end,
  with the final evaluation. ``status`` is ``"ok"`` or why the run stopped.

Recipes add their own keys to these records (``method`` in compare, ``peak_mem_mb`` in C4), never new
kinds. On resume from step N the file keeps the records up to N (a killed run may have logged past its
last checkpoint; those steps are redone).

Example:
    >>> import tempfile, json
    >>> log = MetricsLog(Path(tempfile.mkdtemp()) / "metrics.jsonl")
    >>> log.train(1, loss=0.5, learning_rate=1e-3, time_s=0.1)  # returns the record it wrote
    {'kind': 'train', 'step': 1, 'loss': 0.5, 'learning_rate': 0.001, 'time_s': 0.1}
    >>> json.loads(log.path.read_text())["kind"]
    'train'
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["KINDS", "MetricsLog"]

KINDS = ("train", "eval", "summary")


class MetricsLog:
    """Appends schema records to ``path`` (on the main process only; ``enabled=False`` elsewhere) and
    forwards numeric values to ``tracker(values, step)`` when given."""

    def __init__(
        self,
        path: str | Path,
        *,
        enabled: bool = True,
        tracker: Callable[[dict[str, float], int], None] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.tracker = tracker
        self.extra = dict(extra or {})

    def restart(self, step: int | None) -> None:
        """A fresh file (``step=None``), or keep only the records up to the resumed ``step``."""
        if not self.enabled or not self.path.exists():
            return
        if step is None:
            self.path.unlink()
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip()
            and json.loads(line).get("step", 0) <= step
            and json.loads(line).get("kind") != "summary"
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, kind: str, step: int, values: Mapping[str, Any]) -> dict[str, Any]:
        if kind not in KINDS:
            raise ValueError(f"metrics kind must be one of {', '.join(KINDS)}, got {kind!r}")
        record = {"kind": kind, "step": step, **self.extra, **values}
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as fh:
                fh.write(json.dumps(record, default=_jsonable) + "\n")
            if self.tracker is not None:
                prefix = "" if kind == "eval" else f"{kind}/"
                nums = {
                    f"{prefix}{k}": float(v)
                    for k, v in values.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
                self.tracker(nums, step)
        return record

    def train(self, step: int, **values: Any) -> dict[str, Any]:
        return self.write("train", step, values)

    def eval(self, step: int, metrics: Mapping[str, Any], **values: Any) -> dict[str, Any]:
        return self.write("eval", step, {**values, **prefixed(metrics)})

    def summary(self, step: int, metrics: Mapping[str, Any], **values: Any) -> dict[str, Any]:
        return self.write("summary", step, {**values, **prefixed(metrics)})


def prefixed(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``{"accuracy": x}`` → ``{"eval_accuracy": x}`` (names already starting with ``eval_`` kept)."""
    return {(k if k.startswith("eval_") else f"eval_{k}"): v for k, v in metrics.items()}


def _jsonable(x: Any) -> Any:
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)
