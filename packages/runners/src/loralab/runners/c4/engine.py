"""Where a C4 run executes: the process group, logging, and the loop engine (plain / DDP / DeepSpeed /
FSDP2).

Example:
    >>> import torch
    >>> from loralab.runners.c4.engine import Env
    >>> Env(0, 1, 0, torch.device("cpu")).world
    1
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import torch
import torch.distributed as dist

from loralab.runners.c4.args import C4Args
from loralab.runners.launch import (
    check_elastic_checkpoint,
    check_fsdp_mode,
    fsdp_offload,
    zero_stage,
)
from loralab.runners.loop import DeepSpeedEngine, Engine, FSDP2Engine, TorchEngine
from loralab.runners.methods import Method, get_method

__all__ = [
    "Env",
    "build_engine",
    "deepspeed_bf16",
    "deepspeed_config",
    "init_distributed",
    "setup_logging",
]

logger = logging.getLogger("loralab.runners.c4")


@dataclasses.dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    device: torch.device


def init_distributed(args: C4Args) -> Env:
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


def setup_logging(env: Env) -> None:
    level = logging.INFO if env.rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logger.setLevel(level)


def deepspeed_config(args: C4Args, env: Env, accum: int) -> dict[str, Any]:
    """``--deepspeed_config`` with its ``"auto"`` values filled from the flags; conflicts refused by name."""
    path = Path(
        cast(str, args.deepspeed_config)
    )  # build_engine calls this under --deepspeed_config
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
    stage = zero_stage(cfg)
    method = get_method(args.method_name())
    what = "--use_peft --golore" if args.use_peft else f"--optimizer {args.optimizer}"
    ds_bf16 = deepspeed_bf16(args)
    explicit_bf16 = cfg.get("bf16", {}).get("enabled", "auto")
    for key in ("bf16", "fp16"):
        # no bf16 section reads as "auto": --dtype decides (DeepSpeed's default, off, would train a
        # --dtype bfloat16 run in float32)
        section = cfg.setdefault(key, {"enabled": "auto"}) if key == "bf16" else cfg.get(key)
        if section is not None and section.get("enabled") == "auto":
            section["enabled"] = ds_bf16 if key == "bf16" else False
    if cfg.get("fp16", {}).get("enabled"):
        raise ValueError(
            f"--deepspeed_config {path}: fp16 is not supported by this runner; use --dtype bfloat16"
        )
    if stage != 0 and not method.zero_partitioning:
        raise ValueError(
            f"{what} needs whole 2-D weights in the optimizer, but ZeRO stage {stage} hands it flat 1-D partitions (the projection "
            "would silently become plain AdamW). Use ZeRO stage 0 in --deepspeed_config, or plain DDP (torchrun)."
        )
    check_elastic_checkpoint(cfg, f"--deepspeed_config {path}")
    # offload: deepspeed.initialize refuses a client optimizer under offload_optimizer unless
    # zero_force_ds_cpu_optimizer is false; every C4 optimizer is one (AdamW included: torch's AdamW
    # then steps the CPU partitions), set here; NVMe and an explicit true are refused
    method.check_offload(
        SimpleNamespace(optim=args.optim()),
        f"--deepspeed_config {path}",
        cfg,
        what,
        cpu_adam_for_adamw=False,
    )
    if stage == 0 and method.name != "full" and explicit_bf16 is True:
        raise ValueError(
            f"{what} under DeepSpeed ZeRO stage 0: disable bf16 in --deepspeed_config (its bf16 optimizer "
            "flattens the weights at stage 0, and the projection needs whole 2-D weights); --dtype bfloat16 "
            "casts the model itself at stage 0, and ZeRO stage 1-3 runs DeepSpeed's bf16"
        )
    if explicit_bf16 != "auto" and bool(explicit_bf16) != ds_bf16:
        # an explicit bf16 section that disagrees with --dtype would train in another precision than
        # the run's summary says
        raise ValueError(
            f"--deepspeed_config {path}: bf16.enabled={str(explicit_bf16).lower()} disagrees with --dtype "
            f"{args.dtype} ({what} at ZeRO stage {stage} runs DeepSpeed's bf16 "
            f'{"on" if ds_bf16 else "off"}); set it to "auto"'
        )
    if stage != 0 and method.name != "full":
        # GaLore / GoLore's optimizers are client optimizers DeepSpeed does not know (an explicit false
        # in the config is kept: DeepSpeed then refuses, naming the key)
        cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def deepspeed_bf16(args: C4Args) -> bool:
    """Whether ``--dtype bfloat16`` is DeepSpeed's own bf16 (float32 master weights, a bfloat16 model
    for forward and backward) rather than the model cast to bfloat16 by the runner.

    DeepSpeed's bf16: plain AdamW / SGD at every stage; GaLore / GoLore at ZeRO stage 1-3, whose
    whole-matrix views (``loralab.core.zero_views``) read the float32 master partitions as they read
    float32 ones (tested against one process in ``test_runners_bf16_sharded.py``). The runner casts the
    model: the subspace methods at stage 0 (DeepSpeed's bf16 optimizer would flatten the weights) and
    the ReLoRA path.
    """
    if args.deepspeed_config is None or args.dtype != "bfloat16":
        return False
    method = get_method(args.method_name())
    if method.name == "full":
        return True
    return method.zero_partitioning and _zero_stage(Path(args.deepspeed_config)) >= 1


def _zero_stage(path: Path) -> int:
    if not path.is_file():
        raise FileNotFoundError(f"--deepspeed_config {path} does not exist")
    return zero_stage(json.loads(path.read_text()))


def build_engine(args: C4Args, env: Env, method: Method, accum: int) -> Engine:
    """DeepSpeed under ``--deepspeed_config``; FSDP2 under ``--fsdp full_shard`` or ``shard_grad_op`` (one group per
    decoder layer; ``--dtype bfloat16`` casts the model itself, so the shards are bfloat16); else DDP, or
    (methods DDP cannot average) an explicit gradient all-reduce; one process needs neither."""
    if args.deepspeed_config is not None:
        return DeepSpeedEngine(deepspeed_config(args, env, accum), device=env.device)
    if args.fsdp is not None:
        return FSDP2Engine(
            device=env.device,
            reshard_after_forward=check_fsdp_mode(args.fsdp),
            offload=fsdp_offload(args.fsdp),
        )
    # the only buffers (rotary inv_freq) are identical on every rank: no per-forward broadcast
    # (torch 2.13 renamed broadcast_buffers to forward_sync_buffers)
    import inspect

    sync = (
        "forward_sync_buffers"
        if "forward_sync_buffers"
        in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
        else "broadcast_buffers"
    )
    return TorchEngine(device=env.device, ddp=method.ddp_wrappable, **{sync: False})
