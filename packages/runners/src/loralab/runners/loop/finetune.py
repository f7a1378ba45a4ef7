"""The fine-tuning recipes' shared body (GLUE, MetaMath, WinoGrande): engine, method, data, loop, final/.

A recipe loads its data and model, defines ``evaluate(engine, model)``, and calls :func:`finetune`,
which reads top to bottom:

1. the engine (``accelerate``: one process, ``torchrun``, ``accelerate launch``, ``deepspeed``; FSDP2 under
   ``torchrun`` with ``--fsdp full_shard`` or ``accelerate launch`` with ``configs/accelerate/fsdp2.yaml``),
   checked against the method's sharded engines;
2. the output directory (``--overwrite_output_dir`` removes the previous run) and the run identity
   (a resume must match the checkpoint's settings);
3. the method (``--method``): adapters, optimizer, scheduler, callbacks; gradient-based inits get
   this rank's first training batches;
4. :func:`~loralab.runners.loop.trainer.run_loop`;
5. the ``summary`` record and ``final/`` written by the method's own exporter
   (:meth:`~loralab.runners.methods.base.Method.save_final`), into a temporary directory renamed
   when complete.

:func:`check_output_dir` must run first in a recipe, before its model loads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from loralab.runners.launch import (
    accelerate_fsdp,
    check_fsdp_mode,
    fill_deepspeed_config,
    fsdp_flag,
    fsdp_offload,
    load_deepspeed_config,
    zero_stage,
)
from loralab.runners.loop.batches import EpochBatches
from loralab.runners.loop.checkpoint import (
    RunIdentity,
    check_identity,
    find_checkpoint,
    prepare_output_dir,
    remove_run_artifacts,
    remove_temporary,
    run_identity,
)
from loralab.runners.loop.engine import AccelerateEngine, Engine, engine_line
from loralab.runners.loop.fsdp2_engine import FSDP2Engine, init_fsdp_process_group
from loralab.runners.loop.metrics import MetricsLog
from loralab.runners.loop.trainer import LoopConfig, run_loop
from loralab.runners.methods.base import FinalDirectory
from loralab.runners.quantization import MERGED_DIR, estimation_dtype, merge_and_save

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "TrainResult",
    "build_accelerator",
    "build_engine",
    "check_output_dir",
    "finetune",
    "identity_settings",
    "save_final",
]

logger = logging.getLogger(__name__)

Evaluate = Callable[[Engine, nn.Module], Mapping[str, float]]


@dataclass
class TrainResult:
    global_step: int
    metrics: dict[str, float]
    train_loss: float
    output_dir: str


def check_output_dir(args: Any) -> None:
    """Refuse a non-empty ``--output_dir`` without ``--overwrite_output_dir`` / a resume flag (before the
    model loads; see :func:`loralab.runners.loop.checkpoint.prepare_output_dir`)."""
    prepare_output_dir(
        args.output_dir,
        overwrite=getattr(args, "overwrite_output_dir", False),
        resume=args.resume_from_checkpoint,
    )


def build_accelerator(args: Any, hidden_size: int | None = None) -> Any:
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
    fill = dict(
        micro_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        bf16=args.bf16,
        hidden_size=hidden_size,
    )
    if args.deepspeed:
        config = fill_deepspeed_config(
            load_deepspeed_config(args.deepspeed), world_size=world, **fill
        )
        kw["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=config)
    acc = Accelerator(**kw)
    if getattr(acc.state, "fsdp_plugin", None) is not None:
        # accelerate would shard the model behind the method's optimizer: refuse, never train wrong
        raise ValueError(
            "accelerate launch with an FSDP config reached the Accelerator: the fine-tuning recipes shard "
            "with FSDP2 themselves (fsdp_version: 2, or torchrun with --fsdp full_shard)"
        )
    plugin = acc.state.deepspeed_plugin
    if plugin is not None and not args.deepspeed:
        # launched by `accelerate launch` with a DeepSpeed YAML: fill the JSON's "auto" values too
        fill_deepspeed_config(plugin.deepspeed_config, world_size=acc.num_processes, **fill)
    return acc


def loads_on_meta(args: Any) -> bool:
    """Whether this process builds its model on the meta device instead of loading the weights:
    under accelerate's ``fsdp_cpu_ram_efficient_loading: true`` every rank but the first (rank 0
    loads them, :class:`FSDP2Engine` fills every rank's shards from it, so no other rank ever holds
    the whole model in CPU memory). Starts the process group to know the rank."""
    launch = accelerate_fsdp() if getattr(args, "fsdp", None) else None
    if launch is None or not launch.cpu_ram_efficient_loading:
        return False
    init_fsdp_process_group(offload=launch.offload_params)
    import torch.distributed as dist

    return dist.get_rank() != 0


def engine_before_loading(args: Any) -> Engine | None:
    """The engine, built before the entrypoint loads its model when loading depends on it, else
    ``None`` (:func:`finetune` builds it): ``accelerate launch`` with a DeepSpeed ZeRO-3 YAML whose
    ``zero3_init_flag`` is true. Its Accelerator registers the config with transformers, which then
    builds every weight partitioned (``deepspeed.zero.Init``, each rank its own part) instead of
    whole on every rank. (``--deepspeed zero3`` loads the model whole, then DeepSpeed partitions it.)
    """
    if args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false").lower() != "true":
        return None
    plugin_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not plugin_file or zero_stage(load_deepspeed_config(plugin_file)) != 3:
        return None
    from transformers import AutoConfig

    hidden = getattr(AutoConfig.from_pretrained(args.model_name_or_path), "hidden_size", None)
    engine = build_engine(args, hidden)
    logger.info(
        "ZeRO-3 with zero3_init_flag: the model is loaded partitioned (deepspeed.zero.Init)"
    )
    return engine


def build_engine(args: Any, hidden_size: int | None = None) -> Engine:
    """The fine-tuning recipes' engine: :class:`FSDP2Engine` under ``--fsdp full_shard`` or ``accelerate
    launch`` with an FSDP2 config (the plugin's settings, :func:`loralab.runners.launch.accelerate_fsdp`;
    the arguments' ``validate`` set ``args.fsdp``), else :class:`AccelerateEngine` over
    :func:`build_accelerator`."""
    if getattr(args, "fsdp", None):
        launch = accelerate_fsdp()  # accelerate launch with the FSDP2 YAML: its plugin's settings
        if launch is None:  # torchrun --fsdp full_shard | shard_grad_op
            return FSDP2Engine(
                bf16=bool(args.bf16),
                reshard_after_forward=check_fsdp_mode(args.fsdp),
                offload=fsdp_offload(args.fsdp),
            )
        return FSDP2Engine(
            bf16=bool(args.bf16),
            reshard_after_forward=launch.reshard_after_forward,
            wrap_classes=launch.wrap_classes,
            launcher="accelerate",
            offload=launch.offload_params,
            rank0_loading=launch.cpu_ram_efficient_loading,
        )
    return AccelerateEngine(build_accelerator(args, hidden_size))


def identity_settings(args: Any, world_size: int) -> dict[str, Any]:
    """The run's training-relevant settings: every field of ``args`` whose metadata does not say
    ``identity=False`` (logging, evaluation, output paths), the method options, and the process count."""
    skip = {f.name for f in dataclasses.fields(args) if f.metadata.get("identity", True) is False}
    skip |= {"progress"}
    return run_identity({**args.to_dict(), "num_processes": world_size}, exclude=skip)


def finetune(
    args: Any,
    model: nn.Module,
    train_dataset: Sequence[Any],
    collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
    evaluate: Evaluate | None = None,
    *,
    tokenizer: Any = None,
    engine: Engine | None = None,
) -> TrainResult:
    """Fine-tune ``model`` with ``--method`` on ``train_dataset`` and evaluate (see the module docstring).

    ``evaluate(engine, model)`` runs on every process and returns metrics (logged as ``eval_<name>``),
    every ``--eval_steps`` and at the end.
    """
    try:
        return _finetune(
            args, model, train_dataset, collate_fn, evaluate, tokenizer=tokenizer, engine=engine
        )
    finally:
        # accelerate's DeepSpeed plugin registers its config with transformers process-wide (a weak
        # reference that outlives the run while anything holds the plugin): under ZeRO-3 every later
        # from_pretrained / from_config in the process would build its model partitioned under
        # deepspeed.zero.Init, which a following run (a sweep, a notebook, a second training in one
        # launch, where it hung in the rank check) did not ask for
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def _finetune(
    args: Any,
    model: nn.Module,
    train_dataset: Sequence[Any],
    collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
    evaluate: Evaluate | None,
    *,
    tokenizer: Any,
    engine: Engine | None,
) -> TrainResult:
    from loralab.runners.methods import get_method, setup_method

    # 1. engine
    method = get_method(args.method)
    method.check_available()
    if getattr(args, "fsdp", None):
        method.check_engine("fsdp2", fsdp_flag(args.fsdp))
    if args.deepspeed:
        # before any process group forms: --deepspeed names the config, its ZeRO stage is known already
        ds_config = load_deepspeed_config(args.deepspeed)
        method.check_zero(args, zero_stage(ds_config), f"--deepspeed {args.deepspeed}", ds_config)
    engine = engine or build_engine(
        args, getattr(getattr(model, "config", None), "hidden_size", None)
    )
    if isinstance(engine, AccelerateEngine) and engine.deepspeed:
        stage = zero_stage(engine.acc.state.deepspeed_plugin.deepspeed_config)
        method.check_zero(
            args,
            stage,
            "accelerate's DeepSpeed plugin",
            engine.acc.state.deepspeed_plugin.deepspeed_config,
        )
    if isinstance(engine, FSDP2Engine):
        method.check_engine("fsdp2", fsdp_flag(args.fsdp))
    print(engine_line(engine), flush=True)

    # 2. output directory, data, run identity
    out = Path(args.output_dir)
    data = EpochBatches(
        train_dataset,
        collate_fn,
        args.per_device_train_batch_size,
        args.seed,
        rank=engine.rank,
        world_size=engine.world_size,
        device=engine.device,
    )
    steps_per_epoch = max(1, data.batches_per_epoch // args.gradient_accumulation_steps)
    if args.max_steps < 1:
        args.max_steps = max(1, math.ceil(args.num_train_epochs * steps_per_epoch))
    args.progress = not args.disable_tqdm and engine.is_main
    settings = identity_settings(args, engine.world_size)
    resume = None
    if args.resume_from_checkpoint:
        run_id = _saved_run_id(out)
        ckpt, state = find_checkpoint(args.resume_from_checkpoint, out, run_id)
        check_identity(ckpt, state["run"]["settings"], settings)
        identity = RunIdentity(state["run"]["run_id"], settings)
        resume = (ckpt, state)
    else:
        identity = RunIdentity.new(settings)
    # every rank has checked --output_dir (check_output_dir, before loading) before the main process
    # writes into it: in a launch that runs several trainings the process group already exists, and
    # a fast main process wrote this run's files before a slower rank's check, which then refused them
    engine.barrier()
    if engine.is_main:
        if getattr(args, "overwrite_output_dir", False):
            remove_run_artifacts(out)
        if resume is not None:
            remove_temporary(out)
        out.mkdir(parents=True, exist_ok=True)
        config = {**args.to_dict(), "run_id": identity.run_id}
        (out / "run_config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True, default=str)
        )
        (out / "launch.json").write_text(
            json.dumps(engine.describe(), indent=2, sort_keys=True, default=str)
        )
        print(f"[loralab.runners] config:\n{args.to_json()}", flush=True)
    engine.barrier()

    # 3. method
    torch.manual_seed(args.seed)
    if args.gradient_checkpointing:
        # --gradient_checkpointing needs a transformers model (or a PEFT wrapper forwarding to one)
        hf_model = cast("PreTrainedModel", model)
        hf_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        if hasattr(model, "config"):
            hf_model.config.use_cache = False
    init_batches = None
    if method.needs_batches and resume is None:
        # (under rank-0 loading the engine places the weights as it shards)
        if not getattr(engine, "rank0_loading", False):
            model.to(engine.device)
        init_batches = data.first_batches(_init_batch_count(method, args))
    # an engine that shards the parameters (FSDP2) does so before the method builds its optimizer
    setup = setup_method(
        method, model, args, init_batches, resume=resume is not None, shard=engine.shard
    )
    model, optimizer = engine.prepare(setup.model, setup.optimizer, setup.scheduler)
    if args.report_to != "none" and isinstance(engine, AccelerateEngine):
        engine.acc.init_trackers(
            args.run_name or out.name,
            config={
                k: v for k, v in args.to_dict().items() if isinstance(v, (int, float, str, bool))
            },
        )

    # 4. the loop
    metrics = MetricsLog(
        out / "metrics.jsonl", enabled=engine.is_main, tracker=engine.log_to_tracker
    )
    unwrapped = engine.unwrap(model)
    result = run_loop(
        engine,
        model,
        optimizer,
        setup.scheduler,
        data,
        LoopConfig(
            max_steps=args.max_steps,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            max_grad_norm=args.max_grad_norm,
            seed=args.seed,
            logging_steps=args.logging_steps,
            eval_steps=args.eval_steps,
            save_steps=args.save_steps,
            save_total_limit=args.save_total_limit,
            output_dir=str(out),
            progress=args.progress,
            description=f"{method.name} training",
            method=method.name,
        ),
        evaluate=(lambda m: evaluate(engine, m)) if evaluate is not None else None,
        metrics=metrics,
        callbacks=setup.callbacks,
        identity=identity,
        resume=resume,
        method_state=lambda: method.checkpoint_state(unwrapped),
        load_method_state_fn=lambda state: method.load_checkpoint_state(unwrapped, state),
    )

    # 5. summary and final/
    metrics.summary(
        result.step,
        result.metrics,
        status=result.status,
        train_runtime_s=result.train_time_s,
        train_loss=result.train_loss,
    )
    if args.save_final_model:
        save_final(
            engine,
            method,
            model,
            out / "final",
            tokenizer=tokenizer,
            callbacks=setup.callbacks,
            merged=out / MERGED_DIR if getattr(args, "merge_and_save", False) else None,
            merged_dtype=estimation_dtype(args),
        )
    engine.barrier()
    engine.end()
    return TrainResult(
        global_step=result.step,
        metrics=result.metrics,
        train_loss=result.train_loss,
        output_dir=str(out),
    )


def _init_batch_count(method: Any, args: Any) -> int:
    # LoRA-GA reads --ga_iters batches, LoRA-SB --sb_num_batches; a whole epoch for others that need some
    for name in ("ga_iters", "sb_num_batches"):
        if name in method.defaults and getattr(args, name, None):
            return int(getattr(args, name))
    return 1 << 30


def _saved_run_id(out: Path) -> str | None:
    path = out / "run_config.json"
    try:
        return json.loads(path.read_text()).get("run_id")
    except (OSError, json.JSONDecodeError):
        return None


def save_final(
    engine: Engine,
    method: Any,
    model: nn.Module,
    path: Path,
    *,
    tokenizer: Any = None,
    callbacks: Sequence[Any] = (),
    merged: Path | None = None,
    merged_dtype: torch.dtype = torch.float32,
) -> None:
    """Write ``path`` with the method's exporter (every rank calls: ZeRO-3 gathers the weights first).

    The directory is written as ``.NAME.tmp`` and renamed when complete; a previous ``path`` is replaced.
    ``merged`` (``--merge_and_save``): also write the adapters merged into the (dequantized) base there,
    as a plain ``merged_dtype`` model (:func:`loralab.runners.quantization.merge_and_save`).
    """
    state_dict = engine.full_state_dict(model)
    unwrapped = engine.unwrap(model)
    if engine.is_main:
        tmp = path.with_name(f".{path.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        method.save_final(unwrapped, FinalDirectory(tmp, state_dict, final_path=path))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        for cb in callbacks:
            cb.on_save(str(path), unwrapped)
        if merged is not None:
            merge_and_save(unwrapped, merged, dtype=merged_dtype, tokenizer=tokenizer)
    engine.barrier()
