"""Engines: how one optimizer step runs on the processes of a launch.

The loop (:mod:`loralab.runners.loop.trainer`) never calls DDP, DeepSpeed or accelerate directly; it calls an
:class:`Engine`. Each engine answers the same handful of questions, so a new back end (FSDP2's
``torch.distributed.fsdp.fully_shard``) is one more subclass:

- where the process is (``rank``, ``world_size``, ``device``, ``is_main``);
- ``prepare(model, optimizer)``: wrap both (DDP, a DeepSpeed engine, ...);
- ``accumulate(model, last=...)``: the context of one micro-batch (no gradient all-reduce until ``last``);
- ``backward(loss, accumulation)``: the micro-batch's share of the step's gradient;
- ``clip_grad_norm_``, ``step(optimizer)`` (step + zero_grad);
- ``reduce_mean``, ``gather_object``, ``barrier``;
- ``save_state(directory)`` / ``load_state(directory)``: weights, optimizer, scheduler and RNG of every
  rank, in the engine's own layout (the loop adds the run identity and data position around it);
- ``full_state_dict(model)`` / ``unwrap(model)``: what the method's exporter writes to ``final/``.

Engines here: :class:`AccelerateEngine` (one process, ``torchrun`` DDP, ``accelerate launch`` and
``deepspeed`` / ``--deepspeed`` ZeRO, all through ``accelerate.Accelerator``: what the fine-tuning
recipes use), :class:`TorchEngine` (one process or plain ``torch.distributed`` DDP, no accelerate; or an
explicit gradient all-reduce with ``ddp=False``), :class:`DeepSpeedEngine` (``deepspeed.initialize``
directly: C4 pre-training under the ``deepspeed`` launcher) and
:class:`~loralab.runners.loop.fsdp2_engine.FSDP2Engine` (``--fsdp full_shard``:
``torch.distributed.fsdp.fully_shard`` under ``torchrun``; its own module).

An engine that replaces the parameters (FSDP2's ``DTensor`` shards) does so in :meth:`Engine.shard`,
which the recipe calls on the method's model *before* the optimizer is built, so that the optimizer
holds the parameters that train.

Example:
    >>> import torch
    >>> engine = TorchEngine(device="cpu")
    >>> model = torch.nn.Linear(2, 1)
    >>> model, opt = engine.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> engine.world_size, engine.is_main
    (1, True)
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loralab.core.quant import (
    load_state_dict_with_quantized_,
    quantized_layer_names,
)

logger = logging.getLogger(__name__)

__all__ = [
    "AccelerateEngine",
    "DeepSpeedEngine",
    "Engine",
    "ProcessGroupEngine",
    "TorchEngine",
    "engine_line",
]


class Engine(ABC):
    """One back end of the training loop (see the module docstring)."""

    name: str = "engine"
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    scheduler: Any = None
    """The learning-rate scheduler saved and restored with the engine's state (set by :meth:`prepare`)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def clips_itself(self) -> bool:
        """Whether the back end clips gradients on its own (DeepSpeed's ``gradient_clipping``)."""
        return False

    @property
    def steps_scheduler(self) -> bool:
        """Whether the back end steps the scheduler given to :meth:`prepare` itself (DeepSpeed does)."""
        return False

    @property
    def gathers_in_forward(self) -> bool:
        """Whether every forward gathers sharded parameters (ZeRO-3, FSDP): all ranks must then run the
        same number of forwards (generation pads the shorter shards)."""
        return False

    def shard(self, model: nn.Module) -> nn.Module:
        """Shard ``model``'s parameters before its optimizer is built (FSDP2); default: unchanged."""
        return model

    @abstractmethod
    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap ``model`` and ``optimizer`` for this back end; ``scheduler`` is checkpointed with them."""

    @abstractmethod
    def accumulate(self, model: nn.Module, *, last: bool) -> contextlib.AbstractContextManager:
        """Context of one micro-batch; gradients are synchronized across ranks only when ``last``."""

    @abstractmethod
    def backward(self, loss: torch.Tensor, accumulation: int) -> None:
        """Add ``loss / accumulation``'s gradient (the step's gradient is the mean over micro-batches)."""

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> float | None:
        """Clip the gradients of ``model`` to ``max_norm`` (global norm); returns the norm before clipping."""
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return None
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()`` then ``zero_grad(set_to_none=True)``."""
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @abstractmethod
    def reduce_mean(self, value: float) -> float:
        """Mean of ``value`` over ranks."""

    @abstractmethod
    def gather_object(self, items: list[Any]) -> list[Any]:
        """Every rank's ``items`` concatenated in rank order (on every rank)."""

    @abstractmethod
    def barrier(self) -> None:
        """Wait for every rank."""

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The model without DDP / DeepSpeed wrappers."""
        return getattr(model, "module", model)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Whole (unsharded) state dict on the main process; ``None`` where the unwrapped model already
        holds every weight (no sharding). Call on every rank (ZeRO-3 gathers)."""
        return None

    @abstractmethod
    def save_state(self, model: nn.Module, optimizer: Any, directory: Path) -> None:
        """Write weights, optimizer, scheduler and RNG of this rank into ``directory`` (every rank calls)."""

    @abstractmethod
    def load_state(self, model: nn.Module, optimizer: Any, directory: Path) -> None:
        """Restore what :meth:`save_state` wrote."""

    def label(self) -> str:
        """The engine and its stage in words, for the line every rank prints (:func:`engine_line`)."""
        return self.name

    def describe(self) -> dict[str, Any]:
        """How the run was launched (written to ``output_dir/launch.json``)."""
        return {
            "engine": self.name,
            "num_processes": self.world_size,
            "device": str(self.device),
        }

    def log_to_tracker(self, values: dict[str, float], step: int) -> None:
        """Forward scalars to the experiment tracker, if the engine has one (none by default)."""
        return None

    def end(self) -> None:
        """Close trackers (end of training; nothing to close by default)."""
        return None


# --------------------------------------------------------------------------------------------- accelerate
class AccelerateEngine(Engine):
    """``accelerate.Accelerator`` as the back end: one process, DDP, or DeepSpeed ZeRO (accelerate's plugin).

    Build it with :func:`loralab.runners.loop.finetune.build_accelerator` (fills the DeepSpeed config's "auto"
    values from the flags) or pass any ``Accelerator``.
    """

    name = "accelerate"

    def __init__(self, accelerator: Any) -> None:
        self.acc = accelerator
        self.rank = accelerator.process_index
        self.world_size = accelerator.num_processes
        self.device = accelerator.device

    @property
    def deepspeed(self) -> bool:
        return self.acc.state.deepspeed_plugin is not None

    @property
    def clips_itself(self) -> bool:
        return self.deepspeed

    @property
    def gathers_in_forward(self):
        from loralab.runners.launch import zero_stage

        plugin = self.acc.state.deepspeed_plugin
        return plugin is not None and zero_stage(plugin.deepspeed_config) == 3

    def prepare(self, model, optimizer, scheduler=None):
        model, optimizer = self.acc.prepare(model, optimizer)
        # the scheduler is stepped by the loop once per optimizer step (accelerate would step it once
        # per process); registered so save_state/load_state carry it
        self.scheduler = scheduler
        if scheduler is not None:
            self.acc.register_for_checkpointing(scheduler)
        return model, optimizer

    def accumulate(self, model, *, last):
        # accelerate counts micro-batches itself (gradient_accumulation_steps): its count and ``last``
        # agree because the loop runs exactly that many micro-batches per step
        return self.acc.accumulate(model)

    def backward(self, loss, accumulation):
        if accumulation != self.acc.gradient_accumulation_steps:
            raise ValueError(
                f"accumulation {accumulation} != the Accelerator's gradient_accumulation_steps "
                f"{self.acc.gradient_accumulation_steps}"
            )
        self.acc.backward(loss)  # divides by the accumulation steps (DeepSpeed scales internally)

    def clip_grad_norm_(self, model, max_norm):
        if self.deepspeed:
            return None  # DeepSpeed clips inside its step (config "gradient_clipping")
        norm = self.acc.clip_grad_norm_(model.parameters(), max_norm)
        return float(norm) if norm is not None else None

    def step(self, optimizer):
        optimizer.step()  # accelerate's wrapper; a no-op under DeepSpeed (its backward stepped)
        optimizer.zero_grad(set_to_none=True)

    def reduce_mean(self, value):
        t = torch.tensor(float(value), device=self.device)
        return float(self.acc.reduce(t, reduction="mean").item())

    def gather_object(self, items):
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))

    def barrier(self):
        self.acc.wait_for_everyone()

    def unwrap(self, model):
        return self.acc.unwrap_model(model)

    def full_state_dict(self, model):
        return self.acc.get_state_dict(model)

    def save_state(self, model, optimizer, directory):
        self.acc.save_state(str(directory))

    def load_state(self, model, optimizer, directory):
        inner = self.unwrap(model)
        if not quantized_layer_names(inner):
            self.acc.load_state(str(directory))
            return
        # bitsandbytes layers: torch refuses their statistics as unexpected keys, and a non-strict load
        # keeps stale ones; accelerate restores the rest (optimizer, scheduler, RNG), then the weights
        # are loaded again, strictly, with the quantized layers rebuilt from their saved statistics
        self.acc.load_state(str(directory), strict=False)
        load_state_dict_with_quantized_(inner, _saved_model_state(directory))

    def label(self):
        from loralab.runners.launch import zero_stage

        if self.deepspeed:
            config = self.acc.state.deepspeed_plugin.deepspeed_config
            return f"accelerate + DeepSpeed ZeRO-{zero_stage(config)}{_offload_words(config)}"
        return f"accelerate ({str(self.acc.distributed_type).split('.')[-1]})"

    def describe(self):
        plugin = self.acc.state.deepspeed_plugin
        return {
            "engine": self.name,
            "distributed_type": str(self.acc.distributed_type).split(".")[-1],
            "num_processes": self.world_size,
            "backend": getattr(self.acc.state, "backend", None),
            "device": str(self.device),
            "mixed_precision": self.acc.mixed_precision,
            "deepspeed_config": plugin.deepspeed_config if plugin is not None else None,
        }

    def log_to_tracker(self, values, step):
        if self.acc.trackers:
            self.acc.log(values, step=step)

    def end(self):
        # the trackers only: accelerate's end_training would also destroy the process group, which
        # the entrypoint ends itself once the run returned (loralab.core.distributed.end_process_group)
        for tracker in self.acc.trackers:
            tracker.finish()


# ---------------------------------------------------------------------------------- torch.distributed
class ProcessGroupEngine(Engine):
    """Collectives over ``torch.distributed``'s default process group (the plain-torch and DeepSpeed
    engines; identity in one process)."""

    def reduce_mean(self, value):
        if self.world_size == 1:
            return float(value)
        import torch.distributed as dist

        t = torch.tensor(float(value), dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world_size

    def gather_object(self, items):
        if self.world_size == 1:
            return list(items)
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, list(items))
        return [x for part in out for x in part]

    def barrier(self):
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


# --------------------------------------------------------------------------------------------- plain torch
class TorchEngine(ProcessGroupEngine):
    """One process, or ``torch.distributed`` DDP when a process group with several ranks is up.

    ``device``: where the model trains (default: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU).
    ``ddp=False``: no DDP wrapper; the weights are broadcast from rank 0 and every gradient is averaged
    by one explicit all-reduce after the last micro-batch of a step (before the callbacks'
    ``before_optimizer_step``). For models whose set of trainable parameters changes during training:
    DDP registers its hooks once, at wrap time (GoLore's ReLoRA path trains ``W`` on refresh steps only).
    ``ddp_kwargs`` go to ``DistributedDataParallel``. Checkpoints hold ``model.pt``, ``optimizer.pt``,
    ``scheduler.pt`` (main process) and ``rng_state_rank{r}.pt`` (every rank).
    """

    name = "torch"

    def __init__(
        self, device: str | torch.device | None = None, *, ddp: bool = True, **ddp_kwargs: Any
    ) -> None:
        import torch.distributed as dist

        self._dist = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self._dist else 0
        self.world_size = dist.get_world_size() if self._dist else 1
        if device is None:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.ddp = ddp
        self.ddp_kwargs = ddp_kwargs
        self._model: nn.Module | None = None

    def label(self):
        kind = (
            "one process" if self.world_size == 1 else "DDP" if self.ddp else "gradient all-reduce"
        )
        return f"torch ({kind})"

    def prepare(self, model, optimizer, scheduler=None):
        model = model.to(self.device)
        self.scheduler = scheduler
        if self.world_size > 1 and self.ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids, **self.ddp_kwargs)
        elif self.world_size > 1:
            import torch.distributed as dist

            for p in model.parameters():  # start from rank 0's weights, as DDP would
                dist.broadcast(p.data, src=0)
        self._model = model
        return model, optimizer

    def accumulate(self, model, *, last):
        if self.world_size > 1 and not last and hasattr(model, "no_sync"):
            return model.no_sync()
        if self.world_size > 1 and last and not self.ddp:
            return _all_reduce_after(model)
        return contextlib.nullcontext()

    def backward(self, loss, accumulation):
        (loss / accumulation).backward()

    def save_state(self, model, optimizer, directory):
        if self.is_main:
            torch.save(self.unwrap(model).state_dict(), directory / "model.pt")
            torch.save(optimizer.state_dict(), directory / "optimizer.pt")
            if self.scheduler is not None:
                torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
        torch.save(_rng_state(), directory / f"rng_state_rank{self.rank}.pt")

    def load_state(self, model, optimizer, directory):
        load = dict(map_location="cpu", weights_only=True)
        load_state_dict_with_quantized_(
            self.unwrap(model), torch.load(directory / "model.pt", **load)
        )
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", **load))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", **load))
        _set_rng_state(torch.load(directory / f"rng_state_rank{self.rank}.pt", weights_only=False))


def _saved_model_state(directory: Path) -> dict[str, torch.Tensor]:
    """The model weights ``Accelerator.save_state`` wrote into ``directory`` (one model)."""
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{directory}: no model.safetensors or pytorch_model.bin (the checkpoint is not accelerate's)"
    )


@contextlib.contextmanager
def _all_reduce_after(model: nn.Module):
    """Average every existing gradient over ranks once the block ran, in one flat buffer (same parameter
    order on every rank)."""
    yield
    import torch.distributed as dist

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


# --------------------------------------------------------------------------------------------- deepspeed
class DeepSpeedEngine(ProcessGroupEngine):
    """``deepspeed.initialize`` as the back end (the ``deepspeed`` launcher, ZeRO 0-3), without accelerate.

    ``config``: the DeepSpeed config dict (batch sizes, accumulation and ``gradient_clipping`` filled in).
    DeepSpeed scales the loss by the accumulation, clips, and steps the scheduler given to
    :meth:`prepare` at each optimizer step (:attr:`steps_scheduler`). Checkpoints hold DeepSpeed's own
    layout under ``deepspeed/`` and ``rng_state_rank{r}.pt``. The process group must be up
    (``deepspeed.init_distributed``). Under ZeRO-3 every forward gathers the partitioned weights
    (:attr:`gathers_in_forward`) and :meth:`full_state_dict` gathers them onto the main process.
    """

    name = "deepspeed"

    def __init__(self, config: dict[str, Any], device: str | torch.device | None = None) -> None:
        import torch.distributed as dist

        self.config = config
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        if device is None:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._last = True
        self._ds: Any = None

    @property
    def clips_itself(self) -> bool:
        return True

    @property
    def steps_scheduler(self) -> bool:
        return True

    @property
    def zero3(self) -> bool:
        from loralab.runners.launch import zero_stage

        return zero_stage(self.config) == 3

    @property
    def gathers_in_forward(self) -> bool:
        return self.zero3

    def prepare(self, model, optimizer, scheduler=None):
        import deepspeed

        self.scheduler = scheduler
        self._ds, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config
        )
        return self._ds, optimizer

    def accumulate(self, model, *, last):
        self._last = last
        return contextlib.nullcontext()

    def backward(self, loss, accumulation):
        self._ds.backward(loss)  # scaled by 1 / gradient_accumulation_steps inside
        if not self._last:
            self._ds.step()  # a micro-step: DeepSpeed only counts it (no optimizer step)

    def clip_grad_norm_(self, model, max_norm):
        return None  # DeepSpeed clips inside its step (config "gradient_clipping")

    def step(self, optimizer):
        self._ds.step()  # the accumulation boundary: optimizer step, scheduler step, zero_grad

    def full_state_dict(self, model):
        if not self.zero3:
            return None
        # every rank takes part in the gathers; the whole weights in their training dtype on rank 0
        # (DeepSpeed names it "16bit", it gathers whatever dtype the parameters have)
        sd = self._ds._zero3_consolidated_16bit_state_dict()
        return sd if self.is_main else None

    def save_state(self, model, optimizer, directory):
        self._ds.save_checkpoint(str(directory), tag="deepspeed")
        torch.save(_rng_state(), directory / f"rng_state_rank{self.rank}.pt")

    def load_state(self, model, optimizer, directory):
        self._ds.load_checkpoint(str(directory), tag="deepspeed")
        _set_rng_state(torch.load(directory / f"rng_state_rank{self.rank}.pt", weights_only=False))

    def label(self):
        from loralab.runners.launch import zero_stage

        masters = (
            ", bf16 (fp32 masters)" if self.config.get("bf16", {}).get("enabled") is True else ""
        )
        return f"deepspeed ZeRO-{zero_stage(self.config)}{masters}{_offload_words(self.config)}"

    def describe(self):
        return {**super().describe(), "deepspeed_config": self.config}


# ------------------------------------------------------------------------------------------ start line
def engine_line(engine: Engine) -> str:
    """The line every rank prints at start: its rank, the world size, the engine and its stage (ZeRO
    stage, FSDP2 reshard policy, DDP or one process: :meth:`Engine.label`) and the device.

    Example:
        >>> engine_line(TorchEngine(device="cpu"))
        '[loralab.runners] rank 0/1: engine torch (one process) on cpu'
    """
    return f"[loralab.runners] rank {engine.rank}/{engine.world_size}: engine {engine.label()} on {engine.device}"


def _offload_words(config: dict[str, Any]) -> str:
    """``", optimizer offloaded to cpu, parameters offloaded to cpu"`` (or ``""``) for an engine line."""
    from loralab.runners.launch import zero_offload

    names = {"offload_optimizer": "optimizer", "offload_param": "parameters"}
    return "".join(
        f", {names[key]} offloaded to {dev}" for key, dev in zero_offload(config).items()
    )


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
