"""Rank / world helpers and reductions that work the same under torchrun, accelerate and DeepSpeed.

All of them are no-ops in a single process, so method code calls them unconditionally.

Example:
    >>> import torch
    >>> from loralab.core.distributed import all_reduce_mean_, world_size
    >>> t = torch.ones(3)
    >>> all_reduce_mean_(t)  # single process: unchanged
    tensor([1., 1., 1.])
    >>> world_size()
    1
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "all_reduce_mean_",
    "all_reduce_mean_dict_",
    "broadcast_",
    "collective_device",
    "end_process_group",
    "gathered_parameters",
    "gathered_zero3_model",
    "is_distributed",
    "is_main_process",
    "rank",
    "unwrap_model",
    "world_size",
]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank() == 0


# The pause after destroy_process_group. Measured (2 gloo ranks under torchrun, the group pinned as
# below, 20 all-reduces then the end; a 2-core machine running 4 launches at once): destroy alone
# aborted 41 of 64 launches, a barrier then destroy 5 of 14, barrier, destroy and this pause 0 of 67
# (tests/end_process_group_worker.py).
_END_PAUSE_S = 0.1


def end_process_group() -> None:
    """End the default process group of a finished run, on every rank: a barrier (every rank done
    with its collectives), ``destroy_process_group()``, then a pause of 0.1 s with the GIL released.
    Nothing to do without a group.

    Why more than ``destroy_process_group()``: after a collective returns, gloo's worker thread still
    drops its reference to the collective's tensors, which needs the GIL; if the interpreter is
    already finalizing then, Python ends that thread and the process aborts (SIGABRT, "terminate
    called without an active exception") after the run had finished: pytorch/pytorch#190489.
    ``destroy_process_group`` joins those threads only when nothing else holds the group, but
    ``torch.distributed.nn.functional`` and DeepSpeed's communication backend keep it as a default
    argument when they are imported after it exists (transformers and accelerate import both), so
    the threads outlive it; the pause lets them finish while the interpreter is alive.

    Call it after the run's last collective and only when every rank got there: after an error,
    another rank may still wait inside a collective and the barrier would hang.

    Example:
        >>> end_process_group()  # one process: nothing to do
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    time.sleep(_END_PAUSE_S)


# the device type each backend's collectives take tensors on. gloo also reduces CUDA tensors, but
# not in every collective (gather / scatter are CPU-only): CPU for all of them
_BACKEND_DEVICE = {"gloo": "cpu", "mpi": "cpu", "nccl": "cuda", "xccl": "xpu", "hccl": "hpu"}


def _backend_device_type(device_type: str, backend: str) -> str:
    """The device type a collective of ``backend`` (``dist.get_backend()``'s string: ``"nccl"``,
    ``"gloo"``, or a per-device one such as ``"cpu:gloo,cuda:nccl"``) takes a tensor of
    ``device_type`` on: its own when the backend serves it, else the backend's (the first one named)."""
    served: list[str] = []
    for part in str(backend).lower().split(","):
        dev, _, name = part.strip().rpartition(":")
        served.append(dev or _BACKEND_DEVICE.get(name, device_type))
    return device_type if device_type in served else served[0]


def collective_device(device: torch.device, group: Any = None) -> torch.device:
    """Where a collective over ``group`` (default: the world) can take a tensor that lives on
    ``device``: ``device`` itself, or the backend's device — the current accelerator for NCCL when the
    tensor is on the CPU (DeepSpeed's optimizer offload keeps the partitions there), the CPU for
    gloo when it is on an accelerator. The caller copies there and back.

    Example:
        >>> import torch
        >>> collective_device(torch.device("cpu"))  # one process: wherever the tensor is
        device(type='cpu')
    """
    if not (dist.is_available() and dist.is_initialized()):
        return device
    kind = _backend_device_type(device.type, dist.get_backend(group))
    if kind == device.type:
        return device
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, torch.accelerator.current_device_index())


def _reduce_device(t: Tensor) -> Tensor:
    where = collective_device(t.device)
    return t if where == t.device else t.to(where)


def all_reduce_mean_(tensor: Tensor) -> Tensor:
    """Average ``tensor`` in place across all ranks and return it (a no-op in one process)."""
    if not is_distributed():
        return tensor
    buf = _reduce_device(tensor)
    # SUM then divide: ReduceOp.AVG is NCCL-only.
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf.div_(dist.get_world_size())
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def all_reduce_mean_dict_(tensors: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """Average every tensor of a name → tensor mapping in place, in a deterministic (sorted) order."""
    for name in sorted(tensors):
        all_reduce_mean_(tensors[name])
    return tensors


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s value (a no-op in one process)."""
    if not is_distributed():
        return tensor
    buf = _reduce_device(tensor)
    dist.broadcast(buf, src=src)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def _is_zero3_param(p: Tensor) -> bool:
    return hasattr(p, "ds_id") and hasattr(p, "ds_status")


# set on the parameters gathered_zero3_model holds whole: gathered_parameters leaves them to it
_WHOLE = "_loralab_zero3_whole"


def _is_partitioned_now(p: Tensor) -> bool:
    # a ZeRO-3 parameter holding only its partition (not inside a GatheredParameters block or a
    # forward that fetched it): DeepSpeed refuses to gather one twice (overlapping contexts)
    status = getattr(p, "ds_status", None)  # a deepspeed ZeroParamStatus
    return _is_zero3_param(p) and getattr(status, "name", "") == "NOT_AVAILABLE"


def _is_zero3_partitioned(model: nn.Module) -> bool:
    # partitioned now: a model an outer GatheredParameters block made whole is a plain model here
    return any(_is_partitioned_now(p) for p in model.parameters())


def _refuse_zero3_engine(model: nn.Module, what: str) -> None:
    """Raise ``TypeError`` for a ZeRO-3 model whose modules ``deepspeed.initialize`` has hooked (its
    engine fetches and releases the parameters itself and partitions their gradients)."""
    zero3 = any(_is_zero3_param(p) for p in model.parameters())
    if zero3 and any(hasattr(m, "ds_id") for m in model.modules()):
        raise TypeError(
            f"the {what} got a model whose modules deepspeed.initialize has hooked (ZeRO-3: its engine "
            f"gathers the parameters and partitions the gradients itself): run the {what} on the model "
            "before deepspeed.initialize (partitioned by deepspeed.zero.Init or a ZeRO-3 from_pretrained "
            "is fine)"
        )


@contextmanager
def gathered_parameters(
    params: Iterable[Tensor], modifier_rank: int | None = None
) -> Iterator[None]:
    """Make DeepSpeed ZeRO-3 partitioned parameters whole inside the block (a no-op otherwise).

    With ``modifier_rank`` set, changes made on that rank are broadcast to every rank on exit, as in
    ``deepspeed.zero.GatheredParameters``. Inside :func:`gathered_zero3_model` the model's parameters
    are whole already and left to it (DeepSpeed refuses overlapping blocks); it keeps the changes.
    """
    params = [p for p in params if _is_zero3_param(p) and not getattr(p, _WHOLE, False)]
    if not params:
        yield
        return
    import deepspeed  # only reached when parameters are ZeRO-3 partitioned, so deepspeed is present

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


@contextmanager
def gathered_zero3_model(model: nn.Module, what: str = "estimate") -> Iterator[None]:
    """Make a DeepSpeed ZeRO-3 partitioned model whole on every rank inside the block (a no-op otherwise).

    For a model partitioned by ``deepspeed.zero.Init`` (or transformers' ZeRO-3 loading) *before*
    ``deepspeed.initialize``: no engine hook fetches its parameters, so a forward needs them gathered.
    Every currently partitioned parameter is all-gathered (the whole model on every rank, once) and
    partitioned again on exit from rank 0's values (``GatheredParameters(modifier_rank=0)``: one
    broadcast), so what a consumer writes into the model inside the block (an init's factors,
    identical on every rank) is kept; parameters already gathered by an outer block are left to it. A
    collective: call it on every rank. A module hooked by ``deepspeed.initialize`` (its engine fetches
    and releases parameters itself and partitions their gradients) raises ``TypeError``: ``what``
    names the operation in the message.

    Example:
        >>> from loralab.core.testing import tiny_llama
        >>> with gathered_zero3_model(tiny_llama()):  # not partitioned: nothing to do
        ...     pass
    """
    _refuse_zero3_engine(model, what)
    zero3 = [p for p in model.parameters() if _is_zero3_param(p)]
    params = [p for p in zero3 if _is_partitioned_now(p)]
    if not params:
        yield
        return
    with gathered_parameters(params, modifier_rank=0):
        for p in params:
            setattr(p, _WHOLE, True)
        try:
            yield
        finally:
            for p in params:
                delattr(p, _WHOLE)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeed engine / torch.compile wrappers to reach the user's module."""
    seen = 0
    while seen < 8:
        seen += 1
        if (
            hasattr(model, "module")
            and isinstance(model.module, nn.Module)
            and type(model).__name__
            in (
                "DistributedDataParallel",
                "DataParallel",
                "DeepSpeedEngine",
            )
        ):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            break
    return model
