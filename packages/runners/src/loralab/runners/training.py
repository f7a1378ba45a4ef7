"""The one training loop every fine-tuning entrypoint uses.

:func:`train` takes parsed :class:`~loralab.runners.arguments.TrainArgs`, a loaded model, a tokenized
training set with its collator and an ``evaluate`` callable, and does the rest: accelerate (python,
``torchrun``, ``accelerate launch``, ``deepspeed``), the method registry, checkpoints that resume
exactly, metrics JSONL, tqdm, trackers, bf16, gradient accumulation and checkpointing.

Exact resume: a checkpoint (``output_dir/checkpoint-N``) holds every weight, the optimizer, the
scheduler and the position in the data (``trainer_state.json``). Data order is a seeded permutation
per epoch, and the RNG is re-seeded from ``(seed, step, rank)`` before every optimizer step, so dropout
masks do not depend on what ran before: a run resumed from step N continues exactly as the
uninterrupted run did.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

if TYPE_CHECKING:
    from torch.utils.data import Dataset
    from transformers import PreTrainedModel

from loralab.runners.arguments import TrainArgs
from loralab.runners.launch import fill_deepspeed_config, load_deepspeed_config, zero_stage
from loralab.runners.methods import MethodError, get_method

__all__ = [
    "CRASH_ENV",
    "EpochSampler",
    "TrainResult",
    "build_accelerator",
    "find_checkpoint",
    "launch_info",
    "train",
]

logger = logging.getLogger(__name__)

CRASH_ENV = "LORALAB_RUNNERS_CRASH_AFTER_CHECKPOINT"
"""Test hook: when set to N, the process exits abruptly (``os._exit``) right after saving checkpoint N."""

Evaluate = Callable[[Any, nn.Module], dict[str, float]]


class EpochSampler(Sampler[int]):
    """A seeded permutation of ``range(n)`` per epoch (``set_epoch``), independent of the global RNG."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


@dataclass
class TrainResult:
    global_step: int
    metrics: dict[str, float]
    train_loss: float
    output_dir: str


def build_accelerator(args: TrainArgs, hidden_size: int | None = None) -> Any:
    """An ``accelerate.Accelerator`` for the run: DeepSpeed from ``--deepspeed`` or the launcher's env."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DeepSpeedPlugin

    # accelerate keeps one process-wide state and refuses a second Accelerator with other settings (bf16,
    # DeepSpeed): a run started in a process that already ran one (a notebook, tests) starts from a clean
    # state. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._shared_state.clear()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = (
        bool(args.deepspeed)
        or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    )
    kw: dict[str, Any] = dict(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision="bf16" if args.bf16 else "no",
        # accelerate's cpu=True turns DeepSpeed off; without CUDA, DeepSpeed runs on its CPU accelerator (gloo)
        cpu=not torch.cuda.is_available() and not deepspeed,
    )
    if deepspeed and not torch.cuda.is_available():
        # accelerate only picks a CPU backend under cpu=True; name gloo so DeepSpeed's process group forms
        from accelerate.utils import InitProcessGroupKwargs

        kw["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    if args.report_to != "none":
        kw.update(log_with=args.report_to, project_dir=args.output_dir)
    if args.deepspeed:
        config = fill_deepspeed_config(
            load_deepspeed_config(args.deepspeed),
            micro_batch_size=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            world_size=world,
            max_grad_norm=args.max_grad_norm,
            bf16=args.bf16,
            hidden_size=hidden_size,
        )
        kw["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=config)
    acc = Accelerator(**kw)
    plugin = acc.state.deepspeed_plugin
    if plugin is not None and not args.deepspeed:
        # launched by `accelerate launch` with a DeepSpeed YAML: fill the JSON's "auto" values too
        fill_deepspeed_config(
            plugin.deepspeed_config,
            micro_batch_size=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            world_size=acc.num_processes,
            max_grad_norm=args.max_grad_norm,
            bf16=args.bf16,
            hidden_size=hidden_size,
        )
    return acc


def launch_info(acc: Any) -> dict[str, Any]:
    """How the run was launched (written to ``output_dir/launch.json``): processes, backend, precision and
    the DeepSpeed config with its "auto" values filled."""
    plugin = acc.state.deepspeed_plugin
    return {
        "distributed_type": str(acc.distributed_type).split(".")[-1],
        "num_processes": acc.num_processes,
        "backend": getattr(acc.state, "backend", None),
        "device": str(acc.device),
        "mixed_precision": acc.mixed_precision,
        "deepspeed_config": plugin.deepspeed_config if plugin is not None else None,
    }


def find_checkpoint(spec: str, output_dir: str) -> Path:
    """``spec`` as a checkpoint directory, or the newest ``checkpoint-N`` of ``output_dir`` for 'latest'."""
    if spec == "latest":
        found = sorted(_checkpoints(Path(output_dir)), key=lambda p: int(p.name.split("-")[1]))
        if not found:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: no checkpoint-N directory in {output_dir}"
            )
        return found[-1]
    path = Path(spec)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {spec}: not a checkpoint (no trainer_state.json)"
        )
    return path


def _checkpoints(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    return [
        p
        for p in output_dir.iterdir()
        if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "trainer_state.json").is_file()
    ]


def _seed_step(seed: int, step: int, rank: int) -> None:
    # dropout masks become a function of (seed, step, rank) only: exact resume whatever consumed RNG before
    torch.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


class _Metrics:
    """``metrics.jsonl`` on the main process, plus the tracker when one is configured."""

    def __init__(self, acc: Any, args: TrainArgs) -> None:
        self.acc, self.args = acc, args
        self.path = Path(args.output_dir) / "metrics.jsonl"

    def restart(self, step: int | None) -> None:
        """A fresh file (``step=None``), or keep only the records up to the resumed ``step`` (a killed run
        may have logged past its last checkpoint; those steps are about to be redone)."""
        if not self.path.exists():
            return
        if step is None:
            self.path.unlink()
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any], step: int) -> None:
        if not self.acc.is_main_process:
            return
        record = {"step": step, **record}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.args.report_to != "none":
            self.acc.log(
                {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                step=step,
            )


def _move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _init_batches(
    args: TrainArgs, dataset: Sequence[Any], collate: Callable[[list[Any]], Any], acc: Any
) -> list[dict[str, Any]]:
    """Batches for gradient-based inits: this rank's share of the epoch-0 order (core all-reduces)."""
    order = list(EpochSampler(len(dataset), args.seed))[acc.process_index :: acc.num_processes]
    bs = args.per_device_train_batch_size
    return [
        _move(collate([dataset[i] for i in order[j : j + bs]]), acc.device)
        for j in range(0, len(order) - bs + 1, bs)
    ]


def train(
    args: TrainArgs,
    model: nn.Module,
    train_dataset: Sequence[Any],
    collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
    evaluate: Evaluate | None = None,
    *,
    tokenizer: Any = None,
    accelerator: Any = None,
) -> TrainResult:
    """Fine-tune ``model`` with ``--method`` on ``train_dataset`` and evaluate; returns the final metrics.

    ``evaluate(accelerator, model)`` runs on every process and returns metrics (prefixless names,
    logged as ``eval_<name>``). It is called every ``--eval_steps`` and at the end.
    """
    method = get_method(args.method)
    method.check_available()
    if args.deepspeed and not method.zero_partitioning:
        # before any process group forms: --deepspeed names the config, its ZeRO stage is known already
        _check_zero(method, zero_stage(load_deepspeed_config(args.deepspeed)))
    acc = accelerator or build_accelerator(
        args, getattr(getattr(model, "config", None), "hidden_size", None)
    )
    out = Path(args.output_dir)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(args.to_json())
        (out / "launch.json").write_text(
            json.dumps(launch_info(acc), indent=2, sort_keys=True, default=str)
        )
    acc.wait_for_everyone()
    logger.info("config:\n%s", args.to_json())
    if acc.is_main_process:
        print(f"[loralab.runners] config:\n{args.to_json()}", flush=True)

    if acc.state.deepspeed_plugin is not None and not method.zero_partitioning:
        _check_zero(method, zero_stage(acc.state.deepspeed_plugin.deepspeed_config))
    if len(train_dataset) < args.per_device_train_batch_size * acc.num_processes:
        raise ValueError(
            f"the training set has {len(train_dataset)} examples, fewer than one global batch "
            f"({args.per_device_train_batch_size} x {acc.num_processes} processes)"
        )
    batches_per_epoch = len(train_dataset) // (args.per_device_train_batch_size * acc.num_processes)
    steps_per_epoch = max(1, batches_per_epoch // args.gradient_accumulation_steps)
    if args.max_steps < 1:
        args.max_steps = max(1, math.ceil(args.num_train_epochs * steps_per_epoch))
    args.progress = not args.disable_tqdm and acc.is_local_main_process

    resume = (
        find_checkpoint(args.resume_from_checkpoint, args.output_dir)
        if args.resume_from_checkpoint
        else None
    )
    torch.manual_seed(args.seed)
    if args.gradient_checkpointing:
        # --gradient_checkpointing needs a transformers model (AttributeError otherwise, as before)
        hf_model = cast("PreTrainedModel", model)
        hf_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        if hasattr(model, "config"):
            hf_model.config.use_cache = False
    init_batches = None
    if method.needs_batches and resume is None:
        model.to(acc.device)
        init_batches = _init_batches(args, train_dataset, collate_fn, acc)
    setup = method.setup(model, args, init_batches, resume=resume is not None)
    model, optimizer, scheduler = setup.model, setup.optimizer, setup.scheduler

    sampler = EpochSampler(len(train_dataset), args.seed)
    loader: DataLoader[Any] = DataLoader(
        cast("Dataset[Any]", train_dataset),  # a Sequence is a map-style dataset
        batch_size=args.per_device_train_batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        drop_last=True,
    )
    # the scheduler is stepped by hand once per optimizer step (accelerate would step it once per process)
    model, optimizer, loader = acc.prepare(model, optimizer, loader)
    if scheduler is not None:
        acc.register_for_checkpointing(scheduler)
    if args.report_to != "none":
        acc.init_trackers(
            args.run_name or out.name,
            config={
                k: v for k, v in args.to_dict().items() if isinstance(v, (int, float, str, bool))
            },
        )

    step, epoch, batch_in_epoch = 0, 0, 0
    if resume is not None:
        acc.load_state(str(resume))
        state = json.loads((resume / "trainer_state.json").read_text())
        step, epoch, batch_in_epoch = state["global_step"], state["epoch"], state["batch_in_epoch"]
        logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)", resume, step, epoch, batch_in_epoch
        )
    for cb in setup.callbacks:
        cb.on_train_begin(model, optimizer)

    metrics_log = _Metrics(acc, args)
    if acc.is_main_process:
        metrics_log.restart(step if resume is not None else None)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=args.max_steps,
        initial=step,
        disable=not args.progress,
        desc=f"{method.name} training",
    )
    metrics: dict[str, float] = {}
    running, running_n, last_loss = 0.0, 0, float("nan")
    t0 = time.time()
    model.train()
    while step < args.max_steps:
        sampler.set_epoch(epoch)
        loader.set_epoch(epoch) if hasattr(loader, "set_epoch") else None
        it = acc.skip_first_batches(loader, batch_in_epoch) if batch_in_epoch else loader
        for batch in it:
            if batch_in_epoch % args.gradient_accumulation_steps == 0:
                _seed_step(args.seed, step, acc.process_index)
            with acc.accumulate(model):
                loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite training loss {loss.item()} at step {step + 1} (method {method.name}); lower --learning_rate?"
                    )
                acc.backward(loss)
                if (
                    acc.sync_gradients
                    and args.max_grad_norm > 0
                    and acc.state.deepspeed_plugin is None
                ):
                    acc.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batch_in_epoch += 1
            running += loss.detach().float().item()
            running_n += 1
            if not acc.sync_gradients:
                continue
            if scheduler is not None:
                scheduler.step()
            step += 1
            bar.update(1)
            for cb in setup.callbacks:
                cb.on_step_end(step, model, optimizer)
            if step % args.logging_steps == 0 or step == args.max_steps:
                mean = acc.reduce(
                    torch.tensor(running / max(running_n, 1), device=acc.device), reduction="mean"
                ).item()
                last_loss = mean
                lr = optimizer.param_groups[0]["lr"]
                metrics_log.log(
                    {
                        "loss": mean,
                        "learning_rate": lr,
                        "epoch": epoch + batch_in_epoch / max(len(loader), 1),
                    },
                    step,
                )
                bar.set_postfix(loss=f"{mean:.4f}")
                running, running_n = 0.0, 0
            if args.save_steps and step % args.save_steps == 0 and step < args.max_steps:
                _save_checkpoint(acc, args, step, epoch, batch_in_epoch)
            if (
                evaluate is not None
                and args.eval_steps
                and step % args.eval_steps == 0
                and step < args.max_steps
            ):
                metrics = _evaluate(acc, model, evaluate, metrics_log, step)
            if step >= args.max_steps:
                break
        else:
            epoch += 1
            batch_in_epoch = 0
            continue
        break
    bar.close()
    if evaluate is not None:
        metrics = _evaluate(acc, model, evaluate, metrics_log, step)
    metrics_log.log(
        {
            "train_runtime_s": time.time() - t0,
            "final": True,
            **{f"eval_{k}": v for k, v in metrics.items()},
        },
        step,
    )
    if args.save_final_model:
        _save_final(acc, args, model, tokenizer, setup.callbacks)
    acc.wait_for_everyone()
    if args.report_to != "none":
        acc.end_training()
    return TrainResult(global_step=step, metrics=metrics, train_loss=last_loss, output_dir=str(out))


def _check_zero(method: Any, stage: int) -> None:
    if stage >= 1:
        raise MethodError(
            f"--method {method.name} needs each weight's matrix in its optimizer, but DeepSpeed ZeRO-{stage} flattens and "
            "shards them: run it without --deepspeed (DDP via torchrun / accelerate launch)"
        )


def _evaluate(
    acc: Any, model: nn.Module, evaluate: Evaluate, log: _Metrics, step: int
) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        metrics = evaluate(acc, model)
    model.train()
    log.log({f"eval_{k}": v for k, v in metrics.items()}, step)
    if acc.is_main_process:
        print(f"[loralab.runners] step {step} eval: {json.dumps(metrics)}", flush=True)
    return metrics


def _save_checkpoint(acc: Any, args: TrainArgs, step: int, epoch: int, batch_in_epoch: int) -> None:
    path = Path(args.output_dir) / f"checkpoint-{step}"
    acc.save_state(str(path))
    if acc.is_main_process:
        state = {
            "global_step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "max_steps": args.max_steps,
        }
        (path / "trainer_state.json").write_text(json.dumps(state))
        if args.save_total_limit:
            old = sorted(
                _checkpoints(Path(args.output_dir)), key=lambda p: int(p.name.split("-")[1])
            )
            for p in old[: max(0, len(old) - args.save_total_limit)]:
                shutil.rmtree(p, ignore_errors=True)
    acc.wait_for_everyone()
    if os.environ.get(CRASH_ENV) == str(step):
        # simulate a killed job: no cleanup, no final save
        os._exit(17)


def _save_final(
    acc: Any, args: TrainArgs, model: nn.Module, tokenizer: Any, callbacks: list[Any]
) -> None:
    path = Path(args.output_dir) / "final"
    state_dict = acc.get_state_dict(model)
    unwrapped = acc.unwrap_model(model)
    if acc.is_main_process:
        unwrapped.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        for cb in callbacks:
            cb.on_save(str(path), unwrapped)
