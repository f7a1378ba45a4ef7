"""Output directories, run identity and checkpoints: one format for every recipe.

**Output directory.** :func:`prepare_output_dir` runs before the model loads: a non-empty
``output_dir`` is refused unless ``--overwrite_output_dir`` (the previous run's checkpoints, metrics,
predictions and ``final/`` are then removed first) or ``--resume_from_checkpoint`` is given.

**Run identity.** A run is its training-relevant settings (:func:`run_identity`: every setting except
those that only change logging, evaluation or where files go; paths compared resolved) plus a random
``run_id`` written to ``output_dir/run_config.json`` when the run starts. Each checkpoint stores both.

**Checkpoint** ``checkpoint-N/``: written into ``.checkpoint-N.tmp`` and renamed into place once every
rank has written its part, so a ``checkpoint-N`` directory is complete by construction; a killed save
leaves only the temporary directory, which is skipped and removed on resume. It holds the engine's
state (weights, optimizer, scheduler, RNG; layout per engine), ``method_state.safetensors`` (what a
method keeps outside the model, e.g. LoRA-GA's initial factors) and ``trainer_state.json``: the step,
the data position, the run identity and the size of every file (so a file truncated later, by a full
disk or a partial copy, is named on resume instead of failing deep inside ``torch.load``).

**Resume.** ``latest`` is the newest checkpoint of *this* run (its ``run_id``); a checkpoint whose
settings differ from the command line's is refused, naming each flag ``old -> new``.

Example:
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "run"
    >>> prepare_output_dir(out, overwrite=False, resume=None)  # a new directory: fine
    >>> out.mkdir(); (out / "metrics.jsonl").write_text("{}\\n")  # a previous run's files
    3
    >>> prepare_output_dir(out, overwrite=False, resume=None)
    Traceback (most recent call last):
    ...
    loralab.runners.loop.checkpoint.OutputDirError: --output_dir ... is not empty (metrics.jsonl): pass --overwrite_output_dir to replace the previous run, or --resume_from_checkpoint latest to continue it
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_RE",
    "RUN_ARTIFACTS",
    "CheckpointError",
    "OutputDirError",
    "RunIdentity",
    "check_identity",
    "find_checkpoint",
    "list_checkpoints",
    "prepare_output_dir",
    "read_trainer_state",
    "remove_run_artifacts",
    "run_identity",
    "save_checkpoint",
    "validate_checkpoint",
]

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
METHOD_STATE = "method_state.safetensors"
FORMAT = 2
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
RUN_ARTIFACTS = (
    "run_config.json",
    "launch.json",
    "metrics.jsonl",
    "final",
    "merged",
    "eval_predictions.jsonl",
    "gsm8k_predictions.jsonl",
    "winogrande_predictions.jsonl",
    "run_summary.json",
)
"""What a run writes at the top of ``output_dir`` (besides ``checkpoint-N``): removed by
``--overwrite_output_dir``. Other files are left alone."""


class OutputDirError(FileExistsError):
    """``--output_dir`` holds a previous run and neither overwrite nor resume was asked for."""


class CheckpointError(FileNotFoundError):
    """A checkpoint is missing, incomplete, torn, or belongs to other settings; the message says which."""


# --------------------------------------------------------------------------------------------- output dir
def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def prepare_output_dir(out: str | Path, *, overwrite: bool, resume: str | None) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite`` or ``resume`` (read-only: call it on every rank
    before the model loads; :func:`remove_run_artifacts` does the removal once the processes are up).

    Raises:
        OutputDirError: ``out`` exists, is not empty, and neither flag is given.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--output_dir {out} is a file, not a directory")
    found = _entries(out)
    if found and not overwrite and not resume:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise OutputDirError(
            f"--output_dir {out} is not empty ({shown}): pass --overwrite_output_dir to replace the "
            "previous run, or --resume_from_checkpoint latest to continue it"
        )
    if overwrite and resume:
        raise OutputDirError(
            "--overwrite_output_dir and --resume_from_checkpoint contradict each other: the overwrite "
            "would delete the checkpoints the resume reads; pass one"
        )


def remove_run_artifacts(out: str | Path) -> list[str]:
    """Delete a previous run's checkpoints (complete and temporary) and :data:`RUN_ARTIFACTS` from ``out``
    (main process only); returns the names removed."""
    out = Path(out)
    removed = []
    for name in _entries(out):
        p = out / name
        if (
            name in RUN_ARTIFACTS
            or CHECKPOINT_RE.fullmatch(name)
            or re.fullmatch(r"\.checkpoint-\d+\.tmp", name)
        ):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(name)
    if removed:
        logger.warning("--overwrite_output_dir: removed %s from %s", ", ".join(removed), out)
    return removed


# --------------------------------------------------------------------------------------------- identity
@dataclass
class RunIdentity:
    """What makes a checkpoint belong to a run: a ``run_id`` and the training-relevant ``settings``."""

    run_id: str
    settings: dict[str, Any]

    @staticmethod
    def new(settings: Mapping[str, Any]) -> RunIdentity:
        return RunIdentity(uuid.uuid4().hex, dict(settings))

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "settings": self.settings}


def _normalize(value: Any) -> Any:
    """Paths that exist compare resolved (``data/x.json`` = ``/abs/data/x.json``); the rest unchanged."""
    if isinstance(value, str) and value and (os.sep in value or os.path.exists(value)):
        if os.path.exists(value):
            return str(Path(value).resolve())
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    return value


def run_identity(settings: Mapping[str, Any], exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The training-relevant settings: ``settings`` without ``exclude``, JSON values, paths resolved."""
    skip = set(exclude)
    out = {}
    for k, v in sorted(settings.items()):
        if k in skip:
            continue
        v = _normalize(v)
        out[k] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
    return json.loads(json.dumps(out, default=str))


def check_identity(checkpoint: Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse to resume when a training-relevant setting changed, naming every flag ``old -> new``.

    Raises:
        CheckpointError: some setting differs.
    """
    keys = sorted(set(saved) | set(current))
    changed = [
        f"--{k}: {saved.get(k)!r} -> {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]
    if changed:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: its run was trained with other settings "
            f"({'; '.join(changed)}). Resume with the checkpoint's values, or start a new run "
            "(--overwrite_output_dir, or another --output_dir)"
        )


# --------------------------------------------------------------------------------------------- layout
def list_checkpoints(out: str | Path) -> list[Path]:
    """``checkpoint-N`` directories of ``out`` (renamed into place, i.e. written completely), oldest first."""
    out = Path(out)
    found = [p for p in out.iterdir() if CHECKPOINT_RE.fullmatch(p.name)] if out.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """``trainer_state.json`` of ``ckpt``; raises :class:`CheckpointError` naming the file when it is
    missing, empty or not JSON."""
    path = ckpt / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(f"{ckpt} is not a checkpoint: {TRAINER_STATE} is missing")
    text = path.read_text()
    if not text.strip():
        raise CheckpointError(f"{path} is empty (torn checkpoint)")
    try:
        state = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}): torn checkpoint") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {state.get('format')!r}, this version reads format {FORMAT} "
            "(checkpoints of older loralab versions cannot be resumed)"
        )
    return state


def validate_checkpoint(ckpt: Path) -> dict[str, Any]:
    """The trainer state of ``ckpt`` after checking every file it lists is there with its saved size.

    Raises:
        CheckpointError: naming the first missing, empty or truncated file.
    """
    state = read_trainer_state(ckpt)
    for rel, size in sorted(state.get("files", {}).items()):
        f = ckpt / rel
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (the checkpoint listed it, {size} bytes)")
        got = f.stat().st_size
        if got != size:
            raise CheckpointError(f"{f} is truncated: {got} of {size} bytes")
    return state


def _older_complete(ckpt: Path) -> str:
    older = [p for p in list_checkpoints(ckpt.parent) if _step(p) < _step(ckpt)]
    for p in reversed(older):
        try:
            validate_checkpoint(p)
        except CheckpointError:
            continue
        return (
            f"; the newest complete older checkpoint is {p} (pass it to --resume_from_checkpoint)"
        )
    return "; no older complete checkpoint exists in that directory"


def _step(p: Path) -> int:
    m = CHECKPOINT_RE.fullmatch(p.name)
    return int(m.group(1)) if m else -1


def find_checkpoint(spec: str, out: str | Path, run_id: str | None) -> tuple[Path, dict[str, Any]]:
    """Resolve ``--resume_from_checkpoint`` (a directory, or ``latest``) and validate it.

    ``latest`` = the newest ``checkpoint-N`` of ``out`` whose run id is ``run_id`` (the one in
    ``out/run_config.json``); checkpoints of another run are ignored with a warning.

    Raises:
        CheckpointError: nothing to resume, or the checkpoint is torn (names the file and the newest
            complete older checkpoint, if any).
    """
    out = Path(out)
    if spec == "latest":
        candidates = []
        for p in list_checkpoints(out):
            try:
                rid = json.loads((p / TRAINER_STATE).read_text()).get("run", {}).get("run_id")
            except (OSError, json.JSONDecodeError):
                rid = run_id  # torn: reported by validate_checkpoint below if it is the newest
            if run_id is not None and rid != run_id:
                logger.warning("%s belongs to another run (run_id %s): not resumed", p, rid)
                continue
            candidates.append(p)
        if not candidates:
            raise CheckpointError(
                f"--resume_from_checkpoint latest: no checkpoint-N directory of this run in {out}"
            )
        ckpt = candidates[-1]
    else:
        ckpt = Path(spec)
        if not ckpt.is_dir():
            raise CheckpointError(
                f"--resume_from_checkpoint {spec}: not a checkpoint (no such directory)"
            )
    try:
        state = validate_checkpoint(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(
            f"--resume_from_checkpoint {spec}: {exc}{_older_complete(ckpt)}"
        ) from None
    return ckpt, state


# --------------------------------------------------------------------------------------------- save
def save_checkpoint(
    out: str | Path,
    step: int,
    *,
    engine: Any,
    model: Any,
    optimizer: Any,
    trainer_state: Mapping[str, Any],
    identity: RunIdentity,
    method_state: Mapping[str, torch.Tensor] | None = None,
    keep: int | None = None,
    after_save: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``checkpoint-{step}`` atomically (every rank calls; see the module docstring).

    ``trainer_state``: the loop's position (``step``; ``data``: every rank's data-source position, in rank
    order); ``keep``: delete all but the newest ``keep`` checkpoints afterwards.
    """
    out = Path(out)
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if engine.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    engine.barrier()
    engine.save_state(model, optimizer, tmp)
    if engine.is_main and method_state:
        from safetensors.torch import save_file

        save_file(
            {k: v.detach().cpu().contiguous() for k, v in method_state.items()},
            str(tmp / METHOD_STATE),
        )
    engine.barrier()
    if engine.is_main:
        files = {
            str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        state = {
            "format": FORMAT,
            **trainer_state,
            "world_size": engine.world_size,
            "engine": engine.name,
            "run": identity.to_dict(),
            "files": files,
        }
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1, default=str))
        if final.exists():  # a step redone after a resume from an older checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:
            for old in list_checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    engine.barrier()
    logger.info("saved %s", final)
    if after_save is not None:
        after_save(final)
    return final


def load_method_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The ``method_state.safetensors`` of ``ckpt`` (empty when the method keeps nothing outside the model)."""
    path = ckpt / METHOD_STATE
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    return load_file(str(path))


def remove_temporary(out: str | Path) -> None:
    """Remove ``.checkpoint-N.tmp`` directories a killed save left (main process, on resume)."""
    for p in Path(out).glob(".checkpoint-*.tmp"):
        logger.warning("removing the incomplete checkpoint %s (its save was interrupted)", p)
        shutil.rmtree(p, ignore_errors=True)
