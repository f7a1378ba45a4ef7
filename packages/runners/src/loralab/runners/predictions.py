"""``eval_predictions.jsonl``-style files: one JSON object per evaluated example, written by the main process.

Every recipe writes the rows of its final evaluation (GLUE: ``idx``, ``label``, ``logits``; GSM8K and
WinoGrande: their own fields, with ``idx``) so that a reload of ``final/`` can be checked against them.

Example:
    >>> import tempfile, json
    >>> from pathlib import Path
    >>> p = write_predictions(Path(tempfile.mkdtemp()) / "eval_predictions.jsonl", [{"idx": 0, "logits": [0.5]}])
    >>> read_predictions(p)[0]["idx"]
    0
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["read_predictions", "write_predictions"]


def write_predictions(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as JSON lines to ``path`` (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return path


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a predictions file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
