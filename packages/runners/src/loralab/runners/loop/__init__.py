"""The one training loop of loralab's runners: a step over an engine, one metrics schema, one checkpoint format.

- :mod:`.engine`: :class:`Engine` (what a back end answers), :class:`AccelerateEngine` (one process,
  DDP, DeepSpeed ZeRO through accelerate), :class:`TorchEngine` (one process / plain DDP). FSDP2
  (``fully_shard``) is one more subclass.
- :mod:`.trainer`: :func:`train_step` (accumulate, hook, clip, step, schedule) and :func:`run_loop`
  (steps, logging, evaluation, checkpoints, exact resume), :class:`Callback`, :class:`LoopConfig`.
- :mod:`.batches`: :class:`BatchSource` (``next_batches`` / ``state_dict`` / ``load_state_dict``),
  :class:`EpochBatches` (map-style datasets), :class:`ListBatches`.
- :mod:`.metrics`: :class:`MetricsLog`, the ``metrics.jsonl`` schema (``kind`` = train / eval / summary).
- :mod:`.checkpoint`: output-directory rules, run identity, atomic checkpoints, resume checks.
- :mod:`.finetune`: the fine-tuning recipes' shared body (:func:`finetune`).

Example:
    >>> import torch
    >>> from loralab.runners.loop import LoopConfig, ListBatches, TorchEngine, run_loop
    >>> model = torch.nn.Linear(2, 1)
    >>> engine = TorchEngine(device="cpu")
    >>> model, opt = engine.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> batches = ListBatches([{"x": torch.ones(4, 2), "y": torch.zeros(4, 1)}] * 2)
    >>> loss = lambda m, b: ((m(b["x"]) - b["y"]) ** 2).mean()
    >>> run_loop(engine, model, opt, None, batches, LoopConfig(max_steps=2), loss_fn=loss).step
    2
"""

from loralab.runners.loop.batches import (
    BatchSource,
    DataExhausted,
    EpochBatches,
    EpochSampler,
    ListBatches,
    to_device,
)
from loralab.runners.loop.checkpoint import (
    CheckpointError,
    OutputDirError,
    RunIdentity,
    check_identity,
    find_checkpoint,
    list_checkpoints,
    load_method_state,
    prepare_output_dir,
    remove_run_artifacts,
    remove_temporary,
    run_identity,
    save_checkpoint,
    validate_checkpoint,
)
from loralab.runners.loop.engine import (
    AccelerateEngine,
    DeepSpeedEngine,
    Engine,
    TorchEngine,
    engine_line,
)
from loralab.runners.loop.fsdp2_engine import FSDP2Engine
from loralab.runners.loop.metrics import KINDS, MetricsLog
from loralab.runners.loop.trainer import (
    CRASH_ENV,
    Callback,
    LoopConfig,
    LoopResult,
    StepOutput,
    default_loss,
    run_loop,
    seed_step,
    train_step,
)

__all__ = [
    "CRASH_ENV",
    "KINDS",
    "AccelerateEngine",
    "BatchSource",
    "Callback",
    "CheckpointError",
    "DataExhausted",
    "DeepSpeedEngine",
    "Engine",
    "EpochBatches",
    "EpochSampler",
    "FSDP2Engine",
    "ListBatches",
    "LoopConfig",
    "LoopResult",
    "MetricsLog",
    "OutputDirError",
    "RunIdentity",
    "StepOutput",
    "TorchEngine",
    "check_identity",
    "default_loss",
    "engine_line",
    "find_checkpoint",
    "list_checkpoints",
    "load_method_state",
    "prepare_output_dir",
    "remove_run_artifacts",
    "remove_temporary",
    "run_identity",
    "run_loop",
    "save_checkpoint",
    "seed_step",
    "to_device",
    "train_step",
    "validate_checkpoint",
]
