"""DeepSpeed configs (ZeRO-2, ZeRO-3, ZeRO-3 with CPU offload) and the filling of their "auto" values;
accelerate's FSDP2 plugin read from ``accelerate launch``'s environment (:func:`accelerate_fsdp`).

The built-in configs are defined here once; ``packages/runners/configs/deepspeed/*.json`` are the
same dicts written to disk (a test keeps them equal). ``--deepspeed zero2`` (or a JSON path) gets its
``"auto"`` values from the command line: micro-batch, accumulation, global batch, clipping, bf16, and
the bucket sizes from the model's hidden size (the values transformers' integration uses).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEEPSPEED_CONFIGS",
    "FSDPLaunch",
    "accelerate_fsdp",
    "fill_deepspeed_config",
    "fsdp_flag",
    "load_deepspeed_config",
    "zero_stage",
]

_COMMON: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": False},
    # the optimizer is the method's own (client) optimizer, not one of DeepSpeed's
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 1000000,
    "wall_clock_breakdown": False,
}

_ZERO3: dict[str, Any] = {
    "stage": 3,
    "overlap_comm": True,
    "contiguous_gradients": True,
    "sub_group_size": 1000000000,
    "reduce_bucket_size": "auto",
    "stage3_prefetch_bucket_size": "auto",
    "stage3_param_persistence_threshold": "auto",
    "stage3_max_live_parameters": 1000000000,
    "stage3_max_reuse_distance": 1000000000,
    "stage3_gather_16bit_weights_on_model_save": True,
}
"""ZeRO-3 as the transformers / accelerate examples configure it (``zero3``; ``zero3_offload`` adds CPU
offload of the optimizer state and the parameters)."""

DEEPSPEED_CONFIGS: dict[str, dict[str, Any]] = {
    "zero2": {
        **_COMMON,
        "zero_optimization": {
            "stage": 2,
            "allgather_partitions": True,
            "allgather_bucket_size": 200000000,
            "overlap_comm": True,
            "reduce_scatter": True,
            "reduce_bucket_size": "auto",
            "contiguous_gradients": True,
        },
    },
    "zero3": {**_COMMON, "zero_optimization": _ZERO3},
    "zero3_offload": {
        **_COMMON,
        "zero_optimization": {
            **_ZERO3,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "offload_param": {"device": "cpu", "pin_memory": True},
        },
    },
}
"""Built-in DeepSpeed configs by ``--deepspeed`` name."""


def load_deepspeed_config(spec: str | dict[str, Any]) -> dict[str, Any]:
    """A built-in name (``zero2``, ``zero3``, ``zero3_offload``), a JSON path, or a dict (copied)."""
    if isinstance(spec, dict):
        return copy.deepcopy(spec)
    if spec in DEEPSPEED_CONFIGS:
        return copy.deepcopy(DEEPSPEED_CONFIGS[spec])
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"--deepspeed {spec!r} is neither a built-in config ({', '.join(DEEPSPEED_CONFIGS)}) nor a JSON file"
        )
    return json.loads(path.read_text())


def zero_stage(config: Mapping[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def zero_offload(config: Mapping[str, Any]) -> dict[str, str]:
    """``{section: device}`` for the ``zero_optimization`` offload sections of a DeepSpeed config that
    offload (``offload_optimizer`` / ``offload_param`` with a device other than ``none``).

    Example:
        >>> zero_offload({"zero_optimization": {"offload_param": {"device": "cpu"}}})
        {'offload_param': 'cpu'}
    """
    zero = config.get("zero_optimization") or {}
    devices = {
        key: str((zero.get(key) or {}).get("device", "none")).lower()
        for key in ("offload_optimizer", "offload_param")
    }
    return {key: device for key, device in devices.items() if device != "none"}


def check_elastic_checkpoint(config: Mapping[str, Any], flag: str) -> None:
    """Refuse ``zero_optimization.elastic_checkpoint: true`` before anything trains: no checkpoint of
    such a run could be resumed.

    ZeRO-3 raises ``NotImplementedError`` at the first save. ZeRO-1/2 save, but their elastic load
    needs the step counter in the optimizer's param groups (DeepSpeed's own fused optimizers keep it
    there) and re-partitions the state as element-wise tensors: every optimizer the runners pass keeps
    its step per parameter (torch AdamW and SGD, DeepSpeed's CPU Adam, the methods' optimizers), so the
    resume fails (measured on 2 CPU ranks: ``AssertionError`` for LoRA-FA and LoRA-Pro,
    ``KeyError: 'param0.step'`` for GoLore's owner-rank state).
    """
    zero = config.get("zero_optimization") or {}
    if zero.get("elastic_checkpoint") is True and zero_stage(config) >= 1:
        raise ValueError(
            f"{flag}: zero_optimization.elastic_checkpoint true cannot be resumed with the runners' "
            "optimizers (ZeRO-3 refuses to save it; ZeRO-1/2 elastic loading needs DeepSpeed's own "
            "optimizer); remove the key (DeepSpeed's default, rigid checkpoints, resume exactly)"
        )


def fill_deepspeed_config(
    config: dict[str, Any],
    *,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    max_grad_norm: float,
    bf16: bool,
    hidden_size: int | None = None,
) -> dict[str, Any]:
    """Replace every ``"auto"`` of ``config`` (in place; returned) with the run's values.

    Bucket sizes follow transformers' DeepSpeed integration: ``reduce_bucket_size = h²``,
    ``stage3_prefetch_bucket_size = 0.9·h²``, ``stage3_param_persistence_threshold = 10·h``
    (``h`` = hidden size; DeepSpeed's own defaults when unknown).
    """
    values = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "gradient_clipping": max_grad_norm,
    }
    for k, v in values.items():
        if config.get(k) == "auto":
            config[k] = v
    if config.get("bf16", {}).get("enabled") == "auto":
        config["bf16"]["enabled"] = bf16
    if config.get("fp16", {}).get("enabled") == "auto":
        config["fp16"]["enabled"] = False
    zero = config.get("zero_optimization", {})
    h = hidden_size
    buckets = {
        "reduce_bucket_size": h * h if h else 500_000_000,
        "stage3_prefetch_bucket_size": int(0.9 * h * h) if h else 50_000_000,
        "stage3_param_persistence_threshold": 10 * h if h else 100_000,
    }
    for k, v in buckets.items():
        if zero.get(k) == "auto":
            zero[k] = v
    left = [k for k, v in _walk(config) if v == "auto"]
    if left:
        raise ValueError(
            f"--deepspeed config has 'auto' values the runner cannot fill: {', '.join(left)}; set them"
        )
    return config


def _walk(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _walk(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


# --------------------------------------------------------------------------------------------- FSDP2
ACCELERATE_FSDP_YAML = (
    "accelerate launch with an FSDP config (packages/runners/configs/accelerate/fsdp2.yaml)"
)
"""How messages name an ``accelerate launch`` whose config has ``distributed_type: FSDP``."""


@dataclass(frozen=True)
class FSDPLaunch:
    """The FSDP2 settings of an ``accelerate launch --config_file fsdp2.yaml`` run, as accelerate's
    ``FullyShardedDataParallelPlugin`` read them from the launcher's environment.

    ``reshard_after_forward``: ``fsdp_reshard_after_forward`` (true: full shard, the gathered weights are
    freed after each block's forward and gathered again for its backward). ``wrap_classes``:
    ``fsdp_transformer_layer_cls_to_wrap`` (``None``: the model's ``_no_split_modules``, as accelerate
    does). ``mixed_precision``: the YAML's ``mixed_precision``. ``offload_params``:
    ``fsdp_offload_params`` (FSDP2's ``CPUOffloadPolicy``: the shards, their gradients and the optimizer
    step on the CPU). ``cpu_ram_efficient_loading``: ``fsdp_cpu_ram_efficient_loading`` (rank 0 loads
    the weights, the others build the model on the meta device and receive their shards from it).
    """

    reshard_after_forward: bool = True
    wrap_classes: tuple[str, ...] | None = None
    mixed_precision: str = "no"
    offload_params: bool = False
    cpu_ram_efficient_loading: bool = False


FSDP_MODES: dict[str, bool] = {"full_shard": True, "shard_grad_op": False}
"""``--fsdp`` values -> FSDP2's ``reshard_after_forward``. ``full_shard``: each block's gathered weights
are freed after its forward and gathered again for its backward (two all-gathers per block and step,
the least memory). ``shard_grad_op``: kept from forward to backward (one all-gather, ZeRO-2-like
memory: the gathered weights of every block live until its backward). The names are the Trainer's
and FSDP1's ``ShardingStrategy``; the arithmetic is the same, only when weights are gathered differs."""


FSDP_OFFLOAD = "offload"
"""The ``--fsdp`` option after the mode (the Trainer's syntax, ``--fsdp "full_shard offload"``): FSDP2's
``CPUOffloadPolicy``, the sharded parameters, their gradients and the optimizer step on the CPU, each
block's weights copied to the accelerator for its forward and backward."""


def check_fsdp_mode(mode: str) -> bool:
    """``reshard_after_forward`` for an ``--fsdp`` value (a mode, optionally followed by
    :data:`FSDP_OFFLOAD`); any other value raises naming the flag and the values it takes.

    Example:
        >>> check_fsdp_mode("shard_grad_op"), check_fsdp_mode("full_shard offload")
        (False, True)
    """
    words = mode.split()
    if not words or words[0] not in FSDP_MODES or any(w != FSDP_OFFLOAD for w in words[1:]):
        raise ValueError(
            f"--fsdp supports {' or '.join(repr(m) for m in FSDP_MODES)} (FSDP2), optionally followed "
            f'by {FSDP_OFFLOAD!r} (CPU offload of the shards, e.g. --fsdp "full_shard offload"), got '
            f"{mode!r}"
        )
    return FSDP_MODES[words[0]]


def fsdp_offload(mode: str | None) -> bool:
    """Whether an ``--fsdp`` value asks for CPU offload (:data:`FSDP_OFFLOAD`).

    Example:
        >>> fsdp_offload("full_shard offload"), fsdp_offload("full_shard"), fsdp_offload(None)
        (True, False, False)
    """
    return mode is not None and FSDP_OFFLOAD in mode.split()


def fsdp_flag(mode: str | None = "full_shard") -> str:
    """How messages name the FSDP2 request of this process: ``--fsdp <mode>`` or the accelerate YAML."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return ACCELERATE_FSDP_YAML
    return f"--fsdp {mode or 'full_shard'}"


def accelerate_fsdp() -> FSDPLaunch | None:
    """The FSDP2 settings when ``accelerate launch`` started this process with an FSDP config, else ``None``.

    accelerate's own ``Accelerator`` turns FSDP on only on GPUs (and other accelerators; on a CPU its
    state stays ``MULTI_CPU``/``NO`` and the model would silently train as DDP or alone), and its FSDP2
    ``prepare`` swaps the optimizer's parameters after sharding. The fine-tuning entrypoints instead
    shard with these settings before the method's optimizer is built (:class:`loralab.runners.loop.
    fsdp2_engine.FSDP2Engine`), on GPUs and CPUs alike. Options that engine cannot honour are refused here,
    each naming its YAML key.

    Example:
        >>> import os
        >>> os.environ.pop("ACCELERATE_USE_FSDP", None) and None
        >>> accelerate_fsdp() is None
        True
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(
            f"{ACCELERATE_FSDP_YAML}: only FSDP2 is supported, set fsdp_version: 2, got fsdp_version {version}"
        )
    plugin = FullyShardedDataParallelPlugin()
    refused = {
        "fsdp_activation_checkpointing": bool(plugin.activation_checkpointing),
    }
    for key, on in refused.items():
        if on:
            hint = " (use --gradient_checkpointing true)" if "activation" in key else ""
            raise ValueError(
                f"{ACCELERATE_FSDP_YAML}: {key} is not supported{hint}, got {key}: true"
            )
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "NO_WRAP").upper()
    if policy != "TRANSFORMER_BASED_WRAP":
        raise ValueError(
            f"{ACCELERATE_FSDP_YAML}: fsdp_auto_wrap_policy must be TRANSFORMER_BASED_WRAP (one group per "
            f"transformer block), got fsdp_auto_wrap_policy {policy}"
        )
    state_dict = str(plugin.state_dict_type).split(".")[-1]
    if state_dict != "SHARDED_STATE_DICT":
        # checkpoints are always torch.distributed.checkpoint shards; final/ always the gathered weights
        raise ValueError(
            f"{ACCELERATE_FSDP_YAML}: fsdp_state_dict_type must be SHARDED_STATE_DICT (checkpoints are "
            f"written sharded, final/ whole), got fsdp_state_dict_type {state_dict}"
        )
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mixed not in ("no", "bf16"):
        raise ValueError(
            f"{ACCELERATE_FSDP_YAML}: mixed_precision must be 'no' or 'bf16', got {mixed!r}"
        )
    names = plugin.transformer_cls_names_to_wrap
    return FSDPLaunch(
        reshard_after_forward=bool(plugin.reshard_after_forward),
        wrap_classes=tuple(n.strip() for n in names if n.strip()) if names else None,
        mixed_precision=mixed,
        offload_params=type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy",
        cpu_ram_efficient_loading=bool(plugin.cpu_ram_efficient_loading),
    )
