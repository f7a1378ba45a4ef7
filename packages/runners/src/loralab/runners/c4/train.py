"""The C4 pre-training loop: single process, torchrun (DDP) or DeepSpeed; full / GaLore / GoLore / ReLoRA path.

Read it top to bottom: :func:`run` sets up the process group, tokenizer, model, optimizer and data
streams, restores a checkpoint if asked, and then runs update steps until ``num_training_steps``.

One update step on rank ``r`` of ``W`` with ``A`` micro-batches: micro-batch ``a`` is global
micro-batch ``m = a·W + r`` and reads from data stream ``m mod S`` (see :mod:`.data`); its loss is
``mean(token losses)/A`` and gradients are averaged over ranks, so the step's gradient is the mean
over all ``A·W`` micro-batches, whatever ``W`` is. Gradient averaging is DDP's for full / GaLore /
GoLore, DeepSpeed's under ``--deepspeed_config``, and an explicit all-reduce for the ReLoRA path
(``--use_peft --golore``): DDP registers its hooks once, on the parameters that require a gradient
at wrap time, while the ReLoRA path switches ``W`` on only on projector-refresh steps.

ReLoRA path (the seed's loop): on steps ``step % update_proj_gap == 0`` the model collects the full
gradient of every wrapped ``W`` (``_config.forward_type = True``), and after the backward
``merge_and_reinit(optimizer, use_rand)`` folds the adapter into ``W`` and draws the new projector
(SVD, or random Stiefel once ``step / num_training_steps >= rand_ratio``). Gradient clipping is
applied after the merge, to the gradients the optimizer actually steps on (the reference clips
before, including ``W``'s full gradient).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from loralab.core.distributed import all_reduce_mean_, broadcast_, is_main_process, unwrap_model
from loralab.runners.c4.args import C4Args
from loralab.runners.c4.data import (
    DataExhaustedError,
    HubSource,
    LocalSource,
    SequenceStream,
    TokenizedSource,
    collate,
    eval_sequence_count,
    find_shards,
)
from loralab.runners.c4.model import build_model, count_parameters
from loralab.runners.c4.schedule import get_scheduler

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from loralab.golore import ReLoRaModel

__all__ = ["run"]

logger = logging.getLogger("loralab.runners.c4")

COMPLETE = "COMPLETE"
# settings that must not change across a resume, or the continued run is not the same run
RESUME_KEYS = (
    "model_config",
    "vocab_size",
    "tokenizer",
    "max_length",
    "packing",
    "batch_size",
    "optimizer",
    "use_peft",
    "rank",
    "update_proj_gap",
    "galore_scale",
    "proj_type",
    "rand_ratio",
    "num_training_steps",
    "seed",
    "shuffle_seed",
    "train_data",
    "tokenized_dir",
    "dtype",
)


# ---------------------------------------------------------------------------------------------
# process group and device
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    device: torch.device


def _init_distributed(args: C4Args) -> Env:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    if args.deepspeed_config is not None:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    elif world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return Env(rank, world, local_rank, device)


def _setup_logging(env: Env) -> None:
    level = logging.INFO if env.rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logger.setLevel(level)


# ---------------------------------------------------------------------------------------------
# model and optimizer
# ---------------------------------------------------------------------------------------------
def _resolve_vocab(args: C4Args, tokenizer: Any) -> int | None:
    if args.vocab_size is None:
        return None
    if args.vocab_size == "auto":
        return int(math.ceil(len(tokenizer) / 64) * 64)
    return int(args.vocab_size)


def _wrap_relora(model: nn.Module, args: C4Args) -> ReLoRaModel:
    try:
        from loralab.golore import ReLoRaModel
    except ImportError as e:  # pragma: no cover - golore is a declared extra
        raise ImportError(
            '--use_peft --golore needs loralab-golore: pip install "loralab-runners[golore]"'
        ) from e
    return ReLoRaModel(
        model,
        r=args.rank,
        lora_dropout=0.0,
        target_modules=["attn", "attention", "mlp"],
        scale=args.galore_scale,
        keep_original_weights=True,
        lora_only=False,
        seed=args.seed,
    )


def _build_optimizer(model: nn.Module, args: C4Args, total_steps: int) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kind = args.optimizer
    if kind in ("adamw", "adam"):
        eps = 1e-8 if args.adam_eps is None else args.adam_eps
        return torch.optim.AdamW(
            params,
            lr=args.lr,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=eps,
            weight_decay=args.weight_decay,
        )
    if kind == "sgd":
        return torch.optim.SGD(
            params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    try:
        from loralab.golore import create_galore_optimizer, create_golore_optimizer
    except ImportError as e:  # pragma: no cover
        raise ImportError(
            f'--optimizer {kind} needs loralab-golore: pip install "loralab-runners[golore]"'
        ) from e
    common: dict[str, Any] = dict(
        rank=args.rank,
        update_proj_gap=args.update_proj_gap,
        scale=args.galore_scale,
        proj_type=args.proj_type,
        weight_decay=args.weight_decay,
        targets="all-linear",
        seed=args.seed,
    )
    if kind.endswith("adamw"):
        common.update(optimizer="adamw", betas=(args.adam_beta1, args.adam_beta2))
        if args.adam_eps is not None:
            common["eps"] = args.adam_eps
    else:
        common.update(optimizer="sgd", momentum=args.momentum)
    if kind.startswith("galore"):
        return create_galore_optimizer(model, args.lr, **common)
    return create_golore_optimizer(
        model, args.lr, rand_ratio=args.rand_ratio, total_steps=total_steps, **common
    )


def _deepspeed_config(args: C4Args, env: Env, accum: int) -> dict[str, Any]:
    path = Path(cast(str, args.deepspeed_config))  # only called when --deepspeed_config is set
    if not path.is_file():
        raise FileNotFoundError(f"--deepspeed_config {path} does not exist")
    cfg = json.loads(path.read_text())
    if "optimizer" in cfg or "scheduler" in cfg:
        raise ValueError(
            f"--deepspeed_config {path}: remove its 'optimizer'/'scheduler' sections; --optimizer and --scheduler choose them"
        )
    fill = {
        "train_batch_size": args.batch_size * env.world * accum,
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": args.grad_clipping,
    }
    for key, value in fill.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
        elif cfg[key] != value:
            raise ValueError(
                f'--deepspeed_config {path}: {key}={cfg[key]} disagrees with the command line ({value}); set it to "auto"'
            )
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    ds_bf16 = args.dtype == "bfloat16" and not (args.is_subspace() or args.use_peft)
    for key in ("bf16", "fp16"):
        section = cfg.setdefault(key, {"enabled": False}) if key == "bf16" else cfg.get(key)
        if section is not None and section.get("enabled") == "auto":
            section["enabled"] = ds_bf16 if key == "bf16" else False
    if cfg.get("fp16", {}).get("enabled"):
        raise ValueError(
            f"--deepspeed_config {path}: fp16 is not supported by this runner; use --dtype bfloat16"
        )
    if args.is_subspace() or args.use_peft:
        what = f"--optimizer {args.optimizer}" if args.is_subspace() else "--use_peft --golore"
        if stage != 0:
            raise ValueError(
                f"{what} needs whole 2-D weights in the optimizer, but ZeRO stage {stage} hands it flat 1-D partitions (the projection "
                "would silently become plain AdamW). Use ZeRO stage 0 in --deepspeed_config, or plain DDP (torchrun)."
            )
        if cfg.get("bf16", {}).get("enabled"):
            raise ValueError(
                f"{what} under DeepSpeed: disable bf16 in --deepspeed_config (its bf16 optimizer flattens the weights); "
                "--dtype bfloat16 casts the model itself"
            )
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def _train_source(args: C4Args) -> Any:
    if args.tokenized_dir is not None:
        return TokenizedSource(args.tokenized_dir, "train")
    if args.train_data is not None:
        return LocalSource(
            find_shards(args.train_data, "train"),
            text_field=args.text_field,
            shuffle_seed=args.shuffle_seed,
        )
    return HubSource(
        args.dataset,
        args.dataset_config,
        "train",
        text_field=args.text_field,
        shuffle_seed=args.shuffle_seed,
        shuffle_buffer=args.shuffle_buffer,
    )


def _eval_source(args: C4Args) -> Any:
    if args.eval_data is not None:
        return LocalSource(
            find_shards(args.eval_data, "validation"), text_field=args.text_field, shuffle_seed=None
        )
    if args.tokenized_dir is not None:
        source = (
            TokenizedSource(args.tokenized_dir, "validation")
            if _has_split(args.tokenized_dir, "validation")
            else None
        )
        if source is not None:
            return source
    if args.train_data is not None:
        try:
            return LocalSource(
                find_shards(args.train_data, "validation"),
                text_field=args.text_field,
                shuffle_seed=None,
            )
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no validation shards next to --train_data {args.train_data}: pass --eval_data"
            ) from None
    if args.tokenized_dir is not None:
        raise FileNotFoundError(
            f"--tokenized_dir {args.tokenized_dir} has no validation split: pass --eval_data or pretokenize one"
        )
    return HubSource(
        args.dataset,
        args.dataset_config,
        "validation",
        text_field=args.text_field,
        shuffle_seed=None,
    )


def _has_split(directory: str, split: str) -> bool:
    meta = Path(directory) / "tokens_meta.json"
    return meta.is_file() and split in json.loads(meta.read_text()).get("splits", {})


def _make_streams(args: C4Args, tokenizer: Any, env: Env, num_streams: int) -> dict[int, Any]:
    source = _train_source(args)
    streams: dict[int, Any] = {}
    for s in range(num_streams):
        if s % env.world != env.rank:
            continue
        if isinstance(source, TokenizedSource):
            if source.max_length != args.max_length:
                raise ValueError(
                    f"--tokenized_dir holds {source.max_length}-token sequences but --max_length is {args.max_length}"
                )
            streams[s] = source.stream(s, num_streams)
        else:
            streams[s] = SequenceStream(
                source,
                tokenizer,
                args.max_length,
                packing=args.packing,
                stream=s,
                num_streams=num_streams,
            )
    return streams


def _eval_batches(args: C4Args, tokenizer: Any, env: Env) -> list[dict[str, torch.Tensor]]:
    """The same held-out sequences every evaluation; sequence ``j`` is evaluated on rank ``j mod W``."""
    source = _eval_source(args)
    n = eval_sequence_count(args.eval_tokens, args.max_length)
    if isinstance(source, TokenizedSource):
        seqs = [source.sequence(j) for j in range(min(n, len(source)))]
    else:
        stream = SequenceStream(source, tokenizer, args.max_length, packing=args.packing)
        seqs = []
        try:
            while len(seqs) < n:
                seqs.extend(stream.next_sequences(1))
        except DataExhaustedError:
            pass
    if not seqs:
        raise ValueError("the evaluation data gave no sequence")
    mine = seqs[env.rank :: env.world]
    return [
        collate(mine[i : i + args.batch_size], args.max_length, tokenizer.pad_token_id or 0)
        for i in range(0, len(mine), args.batch_size)
    ]


def _check_ids(batch: dict[str, torch.Tensor], vocab: int) -> None:
    top = int(batch["input_ids"].max())
    if top >= vocab:
        raise ValueError(
            f"token id {top} >= the model's vocab_size {vocab}: the tokenizer does not fit --model_config; pass --vocab_size auto or a matching --tokenizer"
        )


# ---------------------------------------------------------------------------------------------
# evaluation, memory, metrics
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device
) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over all ranks' held-out batches, and the token count."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        labels = batch["labels"].to(device)
        out = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        )
        logits = out.logits[:, :-1].float()
        target = labels[:, 1:]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)),
            target.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total[0] += loss.double().cpu()
        total[1] += (target != -100).sum().cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1].clamp_min(1)), int(total[1])


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak allocated GPU memory, or the process's peak RSS on CPU (MiB), and which one it is."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"


class Metrics:
    """``metrics.jsonl`` (rank 0) and optional TensorBoard; on resume, lines past the resumed step are dropped."""

    def __init__(
        self, output_dir: Path, resume_step: int, enabled: bool, tensorboard: bool
    ) -> None:
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            keep = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in keep) if resume_step > 0 else "")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record.get('type', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def _rng_state(model: nn.Module) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    gen = getattr(model, "_generator", None)
    if isinstance(gen, torch.Generator):
        state["relora"] = gen.get_state()
    return state


def _set_rng_state(model: nn.Module, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    gen = getattr(model, "_generator", None)
    if "relora" in state and isinstance(gen, torch.Generator):
        gen.set_state(state["relora"])


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (``checkpoint-N`` with a ``COMPLETE`` marker), oldest first."""
    found = [
        p
        for p in output_dir.glob("checkpoint-*")
        if (p / COMPLETE).exists() and p.name.split("-")[-1].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _save_checkpoint(
    ckpt: Path,
    *,
    env: Env,
    args: C4Args,
    model: nn.Module,
    engine: Any,
    optimizer: Any,
    scheduler: Any,
    streams: dict[int, Any],
    state: dict[str, Any],
) -> None:
    if env.rank == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    base = unwrap_model(model)
    if engine is not None:
        engine.save_checkpoint(str(ckpt), tag="deepspeed")
    elif env.rank == 0:
        torch.save(base.state_dict(), ckpt / "model_state.pt")
        torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
        torch.save(scheduler.state_dict(), ckpt / "scheduler.pt")
    torch.save(
        {str(s): st.state_dict() for s, st in streams.items()},
        ckpt / f"data_state_rank{env.rank}.pt",
    )
    torch.save(_rng_state(base), ckpt / f"rng_state_rank{env.rank}.pt")
    if env.rank == 0:
        (ckpt / "trainer_state.json").write_text(
            json.dumps(
                {**state, "world_size": env.world, "config": dataclasses.asdict(args)}, indent=2
            )
        )
    if dist.is_initialized():
        dist.barrier()
    if env.rank == 0:
        (ckpt / COMPLETE).write_text("ok\n")
        if args.keep_checkpoints is not None:
            for old in list_checkpoints(Path(args.output_dir))[: -args.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", ckpt)


def _resume_path(args: C4Args) -> Path | None:
    if args.resume_from_checkpoint is not None:
        path = Path(args.resume_from_checkpoint)
        if not (path / COMPLETE).exists():
            raise FileNotFoundError(
                f"--resume_from_checkpoint {path} is not a complete checkpoint (no {COMPLETE} marker)"
            )
        return path
    if args.autoresume:
        found = list_checkpoints(Path(args.output_dir))
        return found[-1] if found else None
    return None


def _load_checkpoint(
    ckpt: Path,
    *,
    env: Env,
    args: C4Args,
    model: nn.Module,
    engine: Any,
    optimizer: Any,
    scheduler: Any,
    streams: dict[int, Any],
) -> dict[str, Any]:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    old = state["config"]
    changed = [
        f"--{k}: {old.get(k)!r} -> {getattr(args, k)!r}"
        for k in RESUME_KEYS
        if old.get(k) != getattr(args, k)
    ]
    if state["global_batch_size"] != args.global_batch_size(env.world):
        changed.append(
            f"global batch: {state['global_batch_size']} -> {args.global_batch_size(env.world)}"
        )
    if state["data_streams"] != (args.data_streams or env.world):
        changed.append(
            f"--data_streams: {state['data_streams']} -> {args.data_streams or env.world}"
        )
    if changed:
        raise ValueError(
            f"cannot resume from {ckpt}: settings differ from the checkpoint's ({'; '.join(changed)})"
        )
    base = unwrap_model(model)
    if engine is not None:
        engine.load_checkpoint(str(ckpt), tag="deepspeed")
    else:
        base.load_state_dict(
            torch.load(ckpt / "model_state.pt", map_location="cpu", weights_only=True)
        )
        optimizer.load_state_dict(
            torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        )
        scheduler.load_state_dict(
            torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True)
        )
    data_file = ckpt / f"data_state_rank{env.rank}.pt"
    if not data_file.exists():
        raise FileNotFoundError(
            f"{data_file} is missing: resume with the same number of processes ({state['world_size']})"
        )
    data = torch.load(data_file, weights_only=True)
    for s, stream in streams.items():
        stream.load_state_dict(data[str(s)])
    _set_rng_state(base, torch.load(ckpt / f"rng_state_rank{env.rank}.pt", weights_only=False))
    logger.info("resumed from %s at step %d", ckpt, state["step"])
    return state


def _sync_gradients(params: list[nn.Parameter]) -> None:
    """Average every existing gradient over ranks, in one flat buffer (same order on every rank)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_mean_(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def run(args: C4Args) -> dict[str, Any]:
    """Train as configured by ``args``; returns the run summary (also written to ``run_summary.json``)."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    env = _init_distributed(args)
    _setup_logging(env)
    out_dir = Path(args.output_dir)
    if env.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    accum = args.gradient_accumulation_for(env.world)
    num_streams = args.data_streams or env.world
    if num_streams % env.world != 0:
        raise ValueError(
            f"--data_streams {num_streams} must be a multiple of the number of processes {env.world}"
        )
    total_steps = args.num_training_steps_from_tokens(env.world)
    logger.info(
        "C4 pre-training: world %d, micro-batch %d, accumulation %d, global batch %d sequences x %d tokens, %d steps",
        env.world,
        args.batch_size,
        accum,
        args.global_batch_size(env.world),
        args.max_length,
        total_steps,
    )
    if env.rank == 0:
        logger.info("config: %s", json.dumps(dataclasses.asdict(args), sort_keys=True))
        (out_dir / "run_config.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, model_max_length=args.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vocab = _resolve_vocab(args, tokenizer)
    model = build_model(args.model_config, seed=args.seed, vocab_size=vocab)
    # build_model makes a LlamaForCausalLM
    vocab = cast("PreTrainedModel", model).config.vocab_size
    if len(tokenizer) > vocab:
        logger.warning(
            "tokenizer has %d tokens but the model %d (ids >= %d must never occur; checked per batch)",
            len(tokenizer),
            vocab,
            vocab,
        )
    if args.activation_checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable (deprecated) to activation_checkpointing_enable
        (
            getattr(model, "activation_checkpointing_enable", None)
            or cast("PreTrainedModel", model).gradient_checkpointing_enable
        )()
    n_params, _ = count_parameters(model)
    relora = _wrap_relora(model, args) if args.use_peft else None
    if relora is not None:
        model = relora
    ds_handles_bf16 = args.deepspeed_config is not None and not (
        args.is_subspace() or args.use_peft
    )
    dtype = torch.bfloat16 if args.dtype == "bfloat16" and not ds_handles_bf16 else torch.float32
    model = model.to(device=env.device, dtype=dtype)
    model.train()
    _, n_trainable = count_parameters(model)
    logger.info(
        "model %s: %.2fM parameters, %.2fM trainable",
        args.model_config,
        n_params / 1e6,
        n_trainable / 1e6,
    )

    optimizer = _build_optimizer(model, args, total_steps)
    cycle = args.cycle_length or args.update_proj_gap
    scheduler = get_scheduler(
        optimizer,
        args.scheduler,
        num_training_steps=total_steps,
        warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio,
        cycle_length=cycle,
        restart_warmup_steps=args.restart_warmup_steps,
    )

    engine = None
    ddp = None
    train_model: nn.Module = model
    if args.deepspeed_config is not None:
        import deepspeed

        cfg = _deepspeed_config(args, env, accum)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=cfg
        )
        train_model = engine
    elif env.world > 1 and relora is None:
        # the only buffers (rotary inv_freq) are identical on every rank: no per-forward broadcast
        # (torch 2.13 renamed broadcast_buffers to forward_sync_buffers)
        sync_kw: dict[str, Any] = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers"
            in inspect.signature(nn.parallel.DistributedDataParallel).parameters
            else {"broadcast_buffers": False}
        )
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None, **sync_kw
        )
        train_model = ddp
    elif env.world > 1:
        # the explicit-all-reduce path starts from rank 0's weights, as DDP would
        for p in model.parameters():
            broadcast_(p.data)
    params = [p for p in model.parameters()]

    streams = _make_streams(args, tokenizer, env, num_streams)
    step, tokens_seen, n_resets = 0, 0, 0
    ckpt = _resume_path(args)
    if ckpt is not None:
        st = _load_checkpoint(
            ckpt,
            env=env,
            args=args,
            model=model,
            engine=engine,
            optimizer=optimizer,
            scheduler=scheduler,
            streams=streams,
        )
        step, tokens_seen, n_resets = st["step"], st["tokens_seen"], st.get("n_resets", 0)
    metrics = Metrics(
        out_dir, step, enabled=is_main_process(), tensorboard=args.report_to == "tensorboard"
    )
    eval_batches = _eval_batches(args, tokenizer, env)

    def trainer_state() -> dict[str, Any]:
        return {
            "step": step,
            "tokens_seen": tokens_seen,
            "n_resets": n_resets,
            "global_batch_size": args.global_batch_size(env.world),
            "data_streams": num_streams,
            "accumulation": accum,
        }

    def do_eval() -> dict[str, Any]:
        loss, n_tok = evaluate(
            train_model if engine is not None else model, eval_batches, env.device
        )
        rec = {
            "type": "eval",
            "step": step,
            "eval_loss": loss,
            "eval_ppl": math.exp(min(loss, 50.0)),
            "eval_tokens": n_tok,
        }
        metrics.log(rec)
        logger.info(
            "step %d: eval loss %.4f, perplexity %.2f (%d tokens)",
            step,
            loss,
            rec["eval_ppl"],
            n_tok,
        )
        return rec

    def save_checkpoint() -> None:
        _save_checkpoint(
            out_dir / f"checkpoint-{step}",
            env=env,
            args=args,
            model=model,
            engine=engine,
            optimizer=optimizer,
            scheduler=scheduler,
            streams=streams,
            state=trainer_state(),
        )

    stop_at = min(total_steps, args.stop_at_step) if args.stop_at_step is not None else total_steps
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="update steps",
        disable=env.rank != 0,
        dynamic_ncols=True,
    )
    throughput: list[float] = []
    cpu_throughput: list[float] = []  # tokens per CPU-second of this process (rank 0)
    last_eval: dict[str, Any] | None = None
    exhausted = False
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    while step < stop_at:
        t0 = time.perf_counter()
        c0 = time.process_time()  # CPU seconds of this process: a fair clock on a shared machine
        reset = relora is not None and step % args.update_proj_gap == 0
        if reset and relora is not None:  # reset implies relora
            relora._config.forward_type = True
        losses, step_tokens = [], 0
        try:
            for a in range(accum):
                micro = a * env.world + env.rank
                batch = collate(
                    streams[micro % num_streams].next_sequences(args.batch_size),
                    args.max_length,
                    pad_id,
                )
                _check_ids(batch, vocab)
                step_tokens += int(batch["attention_mask"].sum())
                batch = {k: v.to(env.device) for k, v in batch.items()}
                if engine is not None:
                    loss = engine(**batch).loss
                    engine.backward(loss)
                    if a < accum - 1:
                        engine.step()
                else:
                    ctx = (
                        ddp.no_sync()
                        if ddp is not None and a < accum - 1
                        else contextlib.nullcontext()
                    )
                    with ctx:
                        loss = train_model(**batch).loss
                        (loss / accum).backward()
                losses.append(loss.detach().float())
        except DataExhaustedError as e:
            logger.warning("training data ran out at step %d (%s); stopping", step, e)
            exhausted = True
            break
        step_loss = torch.stack(losses).mean().cpu()
        all_reduce_mean_(step_loss)
        if not torch.isfinite(step_loss):
            raise FloatingPointError(
                f"non-finite training loss {float(step_loss)} at update step {step}: lower --lr or enable --grad_clipping"
            )
        if relora is not None and engine is None and env.world > 1:
            _sync_gradients(params)
        if reset and relora is not None:  # reset implies relora
            use_rand = step / total_steps >= args.rand_ratio
            relora.merge_and_reinit(optimizer, use_rand)
            n_resets += 1
        grad_norm = None
        if engine is not None:
            engine.step()
            gn = engine.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else None
        else:
            if args.grad_clipping > 0:
                grad_norm = float(
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in params if p.grad is not None], args.grad_clipping
                    )
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        dt = time.perf_counter() - t0
        dc = time.process_time() - c0
        tok = torch.tensor(float(step_tokens))
        if dist.is_initialized() and env.world > 1:
            dist.all_reduce(tok)
        tokens_seen += int(tok)
        tps = float(tok) / dt
        if step > 1:
            throughput.append(tps)
            cpu_throughput.append(float(tok) / max(dc, 1e-9))
        lr = optimizer.param_groups[0]["lr"]
        mem, mem_kind = peak_memory_mb(env.device)
        if step % args.logging_steps == 0 or step == stop_at:
            rec = {
                "type": "train",
                "step": step,
                "loss": float(step_loss),
                "lr": lr,
                "tokens_seen": tokens_seen,
                "tokens_per_s": tps,
                "step_time_s": dt,
                "step_cpu_s": dc,
                "peak_mem_mb": mem,
                "mem_kind": mem_kind,
            }
            if grad_norm is not None:
                rec["grad_norm"] = grad_norm
            if reset:
                rec["projector_reset"] = True
            metrics.log(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{float(step_loss):.4f}", lr=f"{lr:.2e}")
        if step % args.eval_every == 0 or step == total_steps:
            last_eval = do_eval()
        if step % args.save_every == 0 or step == stop_at:
            save_checkpoint()
    bar.close()
    if exhausted and step > 0:
        save_checkpoint()
    finished = step >= total_steps
    if last_eval is None or last_eval["step"] != step:
        last_eval = do_eval()
    mem, mem_kind = peak_memory_mb(env.device)
    summary = {
        "model_config": args.model_config,
        "optimizer": args.optimizer + ("+relora" if args.use_peft else ""),
        "step": step,
        "total_steps": total_steps,
        "finished": finished,
        "data_exhausted": exhausted,
        "world_size": env.world,
        "global_batch_size": args.global_batch_size(env.world),
        "max_length": args.max_length,
        "tokens_seen": tokens_seen,
        "final_eval_loss": last_eval["eval_loss"],
        "final_eval_ppl": last_eval["eval_ppl"],
        "tokens_per_s": (sum(throughput) / len(throughput)) if throughput else None,
        "tokens_per_cpu_s": (sum(cpu_throughput) / len(cpu_throughput)) if cpu_throughput else None,
        "peak_mem_mb": mem,
        "mem_kind": mem_kind,
        "params": n_params,
        "trainable_params": n_trainable,
        "n_projector_resets": n_resets,
        "deepspeed": args.deepspeed_config is not None,
        "device": str(env.device),
    }
    if env.rank == 0:
        (out_dir / "run_summary.json").write_text(json.dumps(summary, indent=2))
        if finished:
            _save_final_model(model, tokenizer, out_dir / "final_model")
        if args.plot:
            from loralab.runners.c4.report import plot_run

            plot_run(out_dir)
    metrics.close()
    if dist.is_initialized():
        dist.barrier()
    return summary


def _save_final_model(model: nn.Module, tokenizer: Any, path: Path) -> None:
    """A plain ``LlamaForCausalLM`` directory (the ReLoRA path's adapters merged into the weights)."""
    base = unwrap_model(model)
    inner = getattr(base, "wrapped_model", None)
    if inner is not None:  # ReLoRaModel: W_eff = W - s·A·B into a fresh plain model
        from transformers import LlamaForCausalLM

        from loralab.golore import ReLoRaLinear

        plain = LlamaForCausalLM(inner.config).to(next(inner.parameters()).dtype)
        state = {}
        for name, mod in inner.named_modules():
            if isinstance(mod, ReLoRaLinear):
                state[f"{name}.weight"] = mod.effective_weight().detach()
                if mod.bias is not None:
                    state[f"{name}.bias"] = mod.bias.detach()
        for name, p in inner.named_parameters():
            if ".lora_" not in name and name not in state:
                state[name] = p.detach()
        plain.load_state_dict(state, strict=True)
        base = plain
    # a LlamaForCausalLM: the run's own model, or the merged plain copy above
    cast("PreTrainedModel", base).save_pretrained(path)
    tokenizer.save_pretrained(path)
