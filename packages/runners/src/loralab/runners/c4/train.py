"""The C4 pre-training recipe over :mod:`loralab.runners.loop`: read it top to bottom.

:func:`run` checks the flags against the model's shapes (before anything loads) and the checkpoint
it resumes (before the model builds), builds the model and the method's optimizer through the
registry (``--optimizer`` → ``full`` / ``galore`` / ``golore``, ``--use_peft --golore`` →
``golore-relora``), hands them to the loop's engine (one process, DDP, an explicit all-reduce for
``golore-relora``, DeepSpeed, or FSDP2 under ``--fsdp full_shard``, which shards the model before
the optimizer is built) and runs :func:`~loralab.runners.loop.run_loop` over the data streams
of :mod:`.batches`. The loop logs the ``metrics.jsonl`` schema (``kind`` train / eval / summary; C4
adds tokens, throughput and memory to each train record), evaluates, and writes atomic checkpoints
holding the run identity; this recipe adds the final checkpoint, ``run_summary.json`` and the plain
``final_model/``.

GoLore's ReLoRA path: its callback collects ``W``'s full gradient on refresh steps and calls
``merge_and_reinit`` once the step's gradients are averaged, before clipping, so clipping applies to
the gradients the optimizer steps on (the reference clips before the merge, ``W``'s gradient
included). With ``--quantize`` its frozen ``W`` is stored with bitsandbytes (the method quantizes
the float model it is given), the checkpoints hold ``W``'s codes and scales, and ``final_model/``
is the float ``W_eff = deq(W) − s·A·B``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from loralab.runners.c4.args import C4Args
from loralab.runners.c4.batches import C4Batches, eval_batches, make_streams
from loralab.runners.c4.engine import (
    build_engine,
    deepspeed_bf16,
    init_distributed,
    setup_logging,
)
from loralab.runners.c4.model import build_model, check_method_shapes, count_parameters
from loralab.runners.c4.schedule import get_scheduler
from loralab.runners.c4.stats import StepStats, evaluate, peak_memory_mb
from loralab.runners.loop import (
    LoopConfig,
    MetricsLog,
    RunIdentity,
    check_identity,
    engine_line,
    find_checkpoint,
    list_checkpoints,
    remove_temporary,
    run_identity,
    run_loop,
    save_checkpoint,
)
from loralab.runners.methods import FinalDirectory, get_method, setup_method

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter
    from transformers import PreTrainedModel

__all__ = ["RESUME_KEYS", "run"]

logger = logging.getLogger("loralab.runners.c4")

RESUME_KEYS = (
    "model_config", "vocab_size", "tokenizer", "dtype", "dataset", "dataset_config", "train_data",
    "tokenized_dir", "text_field", "max_length", "packing", "shuffle_seed", "shuffle_buffer",
    "batch_size", "num_training_steps", "max_train_tokens", "lr", "scheduler", "warmup_steps",
    "min_lr_ratio", "cycle_length", "restart_warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
    "adam_eps", "momentum", "grad_clipping", "optimizer", "rank", "update_proj_gap", "galore_scale",
    "proj_type", "rand_ratio", "use_peft", "golore", "quantize", "use_double_quant", "seed",
    "deepspeed_config", "fsdp",
)  # fmt: skip
"""The settings a resume must keep (with the global batch and the number of data streams): a resume
whose values differ is refused, naming each flag ``old -> new``."""


def _resolved(value: Any) -> Any:
    """A path or glob that exists, absolute (``./data`` and ``/abs/data`` are one setting)."""
    if isinstance(value, str) and (os.path.exists(value) or glob.glob(value)):
        return str(Path(value).resolve())
    return value


def _tensorboard_tracker(writer: SummaryWriter) -> Callable[[dict[str, float], int], None]:
    """A :class:`MetricsLog` tracker writing every value as a TensorBoard scalar."""

    def track(values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            writer.add_scalar(k, v, step)

    return track


def run(args: C4Args) -> dict[str, Any]:
    """Train as configured by ``args``; returns the run summary (also written to ``run_summary.json``)."""
    from transformers import AutoTokenizer

    env = init_distributed(args)
    setup_logging(env)
    out_dir = Path(args.output_dir)
    accum = args.gradient_accumulation_for(env.world)
    num_streams = args.data_streams or env.world
    if num_streams % env.world != 0:
        raise ValueError(
            f"--data_streams {num_streams} must be a multiple of the number of processes {env.world}"
        )
    total_steps = args.num_training_steps_from_tokens(env.world)
    stop_at = min(total_steps, args.stop_at_step or total_steps)

    # 1. checks that need no weights: the method's shapes, then the checkpoint to resume
    method = get_method(args.method_name())
    margs = args.registry_args(total_steps)
    check_method_shapes(args.model_config, method, margs)
    settings = {k: _resolved(getattr(args, k)) for k in RESUME_KEYS}
    settings.update(global_batch_size=args.global_batch_size(env.world), data_streams=num_streams)
    identity = RunIdentity.new(run_identity(settings))
    resume = None
    if args.resume_from_checkpoint is not None or (args.autoresume and list_checkpoints(out_dir)):
        if env.rank == 0:
            remove_temporary(out_dir)  # a save a killed job left half-written
        resume = find_checkpoint(args.resume_from_checkpoint or "latest", out_dir, None)
        check_identity(resume[0], resume[1]["run"]["settings"], identity.settings)
    if env.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "run_config.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    logger.info(
        "C4 pre-training: world %d, micro-batch %d, accumulation %d, global batch %d x %d tokens, %d steps",
        env.world, args.batch_size, accum, args.global_batch_size(env.world), args.max_length, total_steps,
    )  # fmt: skip

    # 2. model, method (optimizer, callbacks), engine
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, model_max_length=args.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vocab = (
        math.ceil(len(tokenizer) / 64) * 64
        if args.vocab_size == "auto"
        else (int(args.vocab_size) if args.vocab_size is not None else None)
    )
    model = build_model(args.model_config, seed=args.seed, vocab_size=vocab)
    # build_model makes a LlamaForCausalLM
    vocab = cast("PreTrainedModel", model).config.vocab_size
    if len(tokenizer) > vocab:
        logger.warning(
            "tokenizer has %d tokens, the model %d: ids are checked per batch",
            len(tokenizer),
            vocab,
        )
    if args.activation_checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable
        (
            getattr(model, "activation_checkpointing_enable", None)
            or cast("PreTrainedModel", model).gradient_checkpointing_enable
        )()
    n_params, _ = count_parameters(model)
    # the engine first: FSDP2 shards the model inside method.setup, before the optimizer is built
    engine = build_engine(args, env, method, accum)
    print(engine_line(engine), flush=True)  # every rank: engine, stage, rank / world size
    # DeepSpeed's own bf16 (AdamW / SGD only: the subspace methods cast the model at ZeRO stage 0)
    dtype = (
        torch.bfloat16 if args.dtype == "bfloat16" and not deepspeed_bf16(args) else torch.float32
    )
    setup = setup_method(
        method,
        model.to(device=env.device, dtype=dtype),
        margs,
        scheduler=lambda opt: get_scheduler(
            opt,
            args.scheduler,
            num_training_steps=total_steps,
            warmup_steps=args.warmup_steps,
            min_lr_ratio=args.min_lr_ratio or 0.0,
            cycle_length=args.cycle_length or args.update_proj_gap,
            restart_warmup_steps=args.restart_warmup_steps,
        ),
        shard=engine.shard,
    )
    _, n_trainable = count_parameters(setup.model)
    logger.info(
        "model %s: %.2fM parameters, %.2fM trainable",
        args.model_config,
        n_params / 1e6,
        n_trainable / 1e6,
    )
    model, optimizer = engine.prepare(setup.model, setup.optimizer, setup.scheduler)

    # 3. data, metrics, the loop
    streams = make_streams(args, tokenizer, env.rank, env.world, num_streams)
    batches = C4Batches(
        streams, batch_size=args.batch_size, max_length=args.max_length, pad_id=pad_id, vocab=vocab,
        num_streams=num_streams, rank=env.rank, world=env.world, device=env.device,
    )  # fmt: skip
    held_out = eval_batches(args, tokenizer, env.rank, env.world)
    stats = StepStats(batches, env.device, setup.callbacks)
    tb = None
    if args.report_to == "tensorboard" and engine.is_main:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out_dir / "tensorboard"))
    metrics = MetricsLog(
        out_dir / "metrics.jsonl",
        enabled=engine.is_main,
        tracker=_tensorboard_tracker(tb) if tb is not None else None,
    )

    def eval_fn(m: nn.Module) -> dict[str, float]:
        loss, n_tok = evaluate(m, held_out, env.device, synced_forwards=engine.gathers_in_forward)
        logger.info(
            "eval loss %.4f, perplexity %.2f (%d tokens)", loss, math.exp(min(loss, 50.0)), n_tok
        )
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n_tok}

    base = engine.unwrap(model)
    config = LoopConfig(
        max_steps=stop_at, gradient_accumulation_steps=accum, max_grad_norm=args.grad_clipping,
        seed=args.seed, logging_steps=args.logging_steps, eval_steps=args.eval_every,
        save_steps=args.save_every, save_total_limit=args.keep_checkpoints, output_dir=str(out_dir),
        progress=True, description="update steps", method=args.method_name(),
    )  # fmt: skip
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    result = run_loop(
        engine, model, optimizer, setup.scheduler, batches, config,
        evaluate=eval_fn, metrics=metrics, callbacks=[stats, *setup.callbacks], identity=identity,
        resume=resume, method_state=lambda: method.checkpoint_state(base),
        load_method_state_fn=lambda state: method.load_checkpoint_state(base, state),
        train_extras=stats.extras,
    )  # fmt: skip

    # 4. the last checkpoint (also when the data ran out), the final evaluation, summary, final model
    step, exhausted = result.step, result.status.startswith("data exhausted")
    if step > 0 and (result.status == "ok" or exhausted):
        save_checkpoint(
            out_dir, step, engine=engine, model=model, optimizer=optimizer, identity=identity,
            # the loop's format: one data position per rank
            trainer_state={
                "step": step, "data": engine.gather_object([batches.state_dict()]), "max_steps": stop_at,
            },
            method_state=method.checkpoint_state(base), keep=args.keep_checkpoints,
        )  # fmt: skip
    final = result.metrics
    if not final:  # the loop evaluates at the end of an "ok" run only
        model.eval()
        final = eval_fn(model)
        model.train()
        metrics.eval(step, final, time_s=result.train_time_s)
    finished = step >= total_steps
    mem, mem_kind = peak_memory_mb(env.device)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    summary = {
        "model_config": args.model_config,
        # the results table's optimizer column: adamw, adamw+relora, adamw+relora+4bit-dq, ...
        "optimizer": args.optimizer
        + ("+relora" if args.use_peft else "")
        + (f"+{args.quantize}" if args.quantize else "")
        + ("-dq" if args.use_double_quant else ""),
        "step": step,
        "total_steps": total_steps,
        "finished": finished,
        "status": result.status,
        "data_exhausted": exhausted,
        "world_size": env.world,
        "global_batch_size": args.global_batch_size(env.world),
        "max_length": args.max_length,
        "tokens_seen": batches.tokens_seen,
        "final_eval_loss": final["loss"],
        "final_eval_ppl": final["ppl"],
        "tokens_per_s": mean(stats.tokens_per_s),
        "tokens_per_cpu_s": mean(stats.tokens_per_cpu_s),
        "peak_mem_mb": mem,
        "mem_kind": mem_kind,
        "params": n_params,
        "trainable_params": n_trainable,
        "n_projector_resets": sum(getattr(cb, "n_resets", 0) for cb in setup.callbacks),
        "deepspeed": args.deepspeed_config is not None,
        "engine": engine.name,
        "device": str(env.device),
    }
    metrics.summary(step, final, status=result.status, train_runtime_s=result.train_time_s)
    # FSDP2: the whole weights gathered onto rank 0 (every rank takes part); None when unsharded
    whole = engine.full_state_dict(model) if finished else None
    if env.rank == 0:
        (out_dir / "run_summary.json").write_text(json.dumps(summary, indent=2))
        if finished:
            # a plain LlamaForCausalLM directory (golore-relora: W - s·A·B merged into the weights)
            method.save_final(base, FinalDirectory(out_dir / "final_model", whole))
            tokenizer.save_pretrained(out_dir / "final_model")
        if args.plot:
            from loralab.runners.c4.report import plot_run

            plot_run(out_dir)
    if tb is not None:
        tb.close()
    engine.barrier()
    return summary
