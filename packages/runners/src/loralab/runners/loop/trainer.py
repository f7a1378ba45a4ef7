"""The training loop: read it top to bottom.

:func:`train_step` is one optimizer step (every micro-batch's forward and backward, the method's hook,
clipping, the optimizer and the scheduler) over an :class:`~loralab.runners.loop.engine.Engine`.
:func:`run_loop` repeats it until ``max_steps``, with the metrics schema of
:mod:`loralab.runners.loop.metrics`, evaluations, and checkpoints in the format of
:mod:`loralab.runners.loop.checkpoint`.

Exact resume: the RNG is re-seeded from ``(seed, step, rank)`` before every optimizer step (dropout
masks do not depend on what ran before) and the data source's position is in the checkpoint, so a run
resumed from step N continues exactly as the uninterrupted run did.

Example:
    >>> import torch
    >>> from loralab.runners.loop import LoopConfig, ListBatches, TorchEngine, run_loop
    >>> model = torch.nn.Linear(2, 1)
    >>> loss_fn = lambda m, b: ((m(b["x"]) - b["y"]) ** 2).mean()
    >>> batches = [{"x": torch.ones(4, 2), "y": torch.zeros(4, 1)}] * 3
    >>> engine = TorchEngine(device="cpu")
    >>> model, opt = engine.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> result = run_loop(engine, model, opt, None, ListBatches(batches), LoopConfig(max_steps=3), loss_fn=loss_fn)
    >>> result.step, result.status
    (3, 'ok')
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loralab.runners.loop.batches import BatchSource, DataExhausted
from loralab.runners.loop.checkpoint import RunIdentity, load_method_state, save_checkpoint
from loralab.runners.loop.engine import Engine
from loralab.runners.loop.metrics import MetricsLog

__all__ = [
    "CRASH_ENV",
    "Callback",
    "LoopConfig",
    "LoopResult",
    "StepOutput",
    "default_loss",
    "run_loop",
    "seed_step",
    "train_step",
]

logger = logging.getLogger(__name__)

CRASH_ENV = "LORALAB_RUNNERS_CRASH_AFTER_CHECKPOINT"
"""Test hook: when set to N, the process exits abruptly (``os._exit(17)``) right after checkpoint N."""

LossFn = Callable[[nn.Module, Any], torch.Tensor]
Evaluate = Callable[[nn.Module], Mapping[str, float]]


class Callback:
    """Hooks around the loop's steps; every hook is optional (a no-op here). Methods hand the loop their
    callbacks (LoRA-SB, GoLore's projector switch); recipes may add their own (C4's ReLoRA merge)."""

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Once, after the model and optimizer are prepared and any checkpoint is loaded."""

    def on_step_begin(self, step: int, model: nn.Module) -> None:
        """Before the first micro-batch of optimizer step ``step + 1``."""

    def before_optimizer_step(self, step: int, model: nn.Module, optimizer: Any) -> None:
        """After every micro-batch's backward, before clipping (e.g. an explicit gradient all-reduce)."""

    def on_step_end(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After each optimizer step, with the 1-based global step."""

    def on_save(self, output_dir: str, model: nn.Module) -> None:
        """On the main process after the final model is saved in ``output_dir``."""


@dataclass
class LoopConfig:
    """How long and how often: the loop's settings (recipes fill them from their flags)."""

    max_steps: int
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 0.0  # 0 disables clipping
    seed: int = 42
    logging_steps: int = 1  # a "train" record every N steps (mean loss of the N steps)
    eval_steps: int = 0  # evaluate every N steps (0: only at the end)
    eval_at_start: bool = False  # an "eval" record at step 0 (compare's curves start there)
    save_steps: int = 0  # checkpoint every N steps (0: none); needs output_dir and identity
    save_total_limit: int | None = None
    output_dir: str | None = None
    stop_on_nonfinite: bool = False  # True: stop with status "diverged: ..."; False: raise
    progress: bool = False
    description: str = "training"
    method: str = ""  # named in error messages
    clock_start: float = (
        0.0  # time_s at step 0 (compare counts the method's setup as training time)
    )


@dataclass
class StepOutput:
    loss: float  # this rank's mean micro-batch loss
    grad_norm: float | None


@dataclass
class LoopResult:
    step: int
    status: str
    metrics: dict[str, float]
    train_loss: float
    step_times: list[float] = field(default_factory=list)
    train_time_s: float = 0.0


def default_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """``model(**batch).loss`` (transformers models with ``labels`` in the batch)."""
    return model(**batch).loss


def seed_step(seed: int, step: int, rank: int) -> None:
    """Dropout masks become a function of ``(seed, step, rank)`` only: exact resume whatever ran before."""
    torch.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def train_step(
    engine: Engine,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    micro_batches: Sequence[Any],
    *,
    step: int,
    loss_fn: LossFn = default_loss,
    max_grad_norm: float = 0.0,
    callbacks: Sequence[Callback] = (),
    method: str = "",
) -> StepOutput:
    """One optimizer step: accumulate every micro-batch's gradient, hook, clip, step, schedule.

    Raises:
        FloatingPointError: a micro-batch's loss is not finite (names the step).
    """
    n = len(micro_batches)
    losses = []
    for i, batch in enumerate(micro_batches):
        with engine.accumulate(model, last=i == n - 1):
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite training loss {loss.item()} at step {step + 1}"
                    + (f" (method {method})" if method else "")
                    + "; lower --learning_rate?"
                )
            engine.backward(loss, n)
        losses.append(loss.detach().float().item())
    for cb in callbacks:
        cb.before_optimizer_step(step, model, optimizer)
    grad_norm = None
    if max_grad_norm > 0 and not engine.clips_itself:
        grad_norm = engine.clip_grad_norm_(model, max_grad_norm)
    engine.step(optimizer)
    if scheduler is not None and not engine.steps_scheduler:
        scheduler.step()
    return StepOutput(loss=sum(losses) / n, grad_norm=grad_norm)


def _evaluate(model: nn.Module, evaluate: Evaluate) -> dict[str, float]:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        metrics = dict(evaluate(model))
    model.train(was_training)
    return metrics


def run_loop(
    engine: Engine,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data: BatchSource,
    config: LoopConfig,
    *,
    loss_fn: LossFn = default_loss,
    evaluate: Evaluate | None = None,
    metrics: MetricsLog | None = None,
    callbacks: Sequence[Callback] = (),
    identity: RunIdentity | None = None,
    resume: tuple[Path, Mapping[str, Any]] | None = None,
    method_state: Callable[[], Mapping[str, torch.Tensor]] | None = None,
    load_method_state_fn: Callable[[Mapping[str, torch.Tensor]], None] | None = None,
    train_extras: Callable[[], Mapping[str, Any]] | None = None,
) -> LoopResult:
    """Train ``model`` (already prepared by ``engine``) for ``config.max_steps`` optimizer steps.

    ``resume``: ``(checkpoint, trainer_state)`` from :func:`~loralab.runners.loop.checkpoint.find_checkpoint`
    (the engine state, data position and method state are restored here). ``method_state()`` returns
    tensors the method keeps outside the model (saved with each checkpoint; ``load_method_state_fn``
    restores them). ``train_extras()`` adds keys to every ``train`` record.
    """
    metrics = metrics or MetricsLog(os.devnull, enabled=False)
    step = 0
    if resume is not None:
        ckpt, state = resume
        engine.load_state(model, optimizer, ckpt)
        positions = state["data"]  # one per rank (streaming sources differ per rank)
        if len(positions) != engine.world_size:
            raise ValueError(
                f"{ckpt} was written by {len(positions)} processes, this run has {engine.world_size}: "
                "resume with the same number of processes"
            )
        data.load_state_dict(positions[engine.rank])
        if load_method_state_fn is not None:
            load_method_state_fn(load_method_state(ckpt))
        step = int(state["step"])
        logger.info("resumed from %s at step %d (data %s)", ckpt, step, state["data"])
    metrics.restart(step if resume is not None else None)
    for cb in callbacks:
        cb.on_train_begin(model, optimizer)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=config.max_steps,
        initial=step,
        disable=not (config.progress and engine.is_main),
        desc=config.description,
    )
    clock = config.clock_start  # training time: evaluation and checkpointing excluded
    last: dict[str, float] = {}
    step_times: list[float] = []
    window: list[float] = []
    train_loss = math.nan
    status = "ok"

    def do_eval(evaluate: Evaluate) -> dict[str, float]:
        m = _evaluate(model, evaluate)
        metrics.eval(step, m, time_s=clock)
        if engine.is_main:
            logger.info("step %d eval: %s", step, m)
        return m

    if evaluate is not None and config.eval_at_start and step == 0:
        last = do_eval(evaluate)
    model.train()
    while step < config.max_steps:
        t0 = time.perf_counter()
        seed_step(config.seed, step, engine.rank)
        for cb in callbacks:
            cb.on_step_begin(step, model)
        try:
            micro = data.next_batches(config.gradient_accumulation_steps)
        except DataExhausted as exc:
            status = f"data exhausted at step {step}: {exc}"
            logger.warning("training data ran out at step %d (%s); stopping", step, exc)
            break
        try:
            out = train_step(
                engine,
                model,
                optimizer,
                scheduler,
                micro,
                step=step,
                loss_fn=loss_fn,
                max_grad_norm=config.max_grad_norm,
                callbacks=callbacks,
                method=config.method,
            )
        except FloatingPointError as exc:
            if not config.stop_on_nonfinite:
                raise
            status = f"diverged: {exc}"
            break
        step += 1
        for cb in callbacks:
            cb.on_step_end(step, model, optimizer)
        dt = time.perf_counter() - t0
        step_times.append(dt)
        clock += dt
        bar.update(1)
        window.append(out.loss)
        if step % config.logging_steps == 0 or step == config.max_steps:
            train_loss = engine.reduce_mean(sum(window) / len(window))
            window = []
            record: dict[str, Any] = {
                "loss": train_loss,
                "learning_rate": optimizer.param_groups[0]["lr"],
                "time_s": clock,
            }
            if out.grad_norm is not None:
                record["grad_norm"] = out.grad_norm
            if hasattr(data, "fractional_epoch"):
                record["epoch"] = data.fractional_epoch
            if train_extras is not None:
                record.update(train_extras())
            metrics.train(step, **record)
            bar.set_postfix(loss=f"{train_loss:.4f}")
        if config.save_steps and step % config.save_steps == 0 and step < config.max_steps:
            if config.output_dir is None or identity is None:
                raise ValueError("LoopConfig.save_steps needs output_dir and a run identity")
            save_checkpoint(
                config.output_dir,
                step,
                engine=engine,
                model=model,
                optimizer=optimizer,
                trainer_state={
                    "step": step,
                    "data": engine.gather_object([data.state_dict()]),
                    "max_steps": config.max_steps,
                },
                identity=identity,
                method_state=method_state() if method_state is not None else None,
                keep=config.save_total_limit,
            )
            if os.environ.get(CRASH_ENV) == str(step):
                os._exit(17)  # simulate a killed job: no cleanup, no final save
        if (
            evaluate is not None
            and config.eval_steps
            and step % config.eval_steps == 0
            and step < config.max_steps
        ):
            last = do_eval(evaluate)
    bar.close()
    if evaluate is not None and status == "ok":
        last = do_eval(evaluate)
    return LoopResult(
        step=step,
        status=status,
        metrics=last,
        train_loss=train_loss,
        step_times=step_times,
        train_time_s=clock,
    )
