"""Layer-wise stepping: update each parameter from its gradient hook and free the gradient at once.

GaLore's paper (Sec. 4.3) saves memory by never holding all gradients: each weight is updated as soon
as its gradient is ready. transformers' ``galore_*_layerwise`` optimizers do this with one optimizer
per parameter and reject gradient accumulation and DDP. Here one optimizer keeps its param groups,
state and ``state_dict`` (a scheduler works as usual), and every parameter steps after it has
received ``accumulation_steps`` gradients, so gradient accumulation works: on the intermediate
micro-batches the gradient accumulates in ``.grad`` as usual, on the last one the parameter is
updated inside backward and its gradient freed.

Under FSDP2 (``fully_shard``) it works across ranks: FSDP2 runs a sharded parameter's
post-accumulate-grad hooks after its reduce-scatter, with this rank's rows of the averaged gradient,
so each parameter steps its row shard there (the row-shard algebra's collectives, or an owner rank's
whole-tensor step for the 8-bit / Adafactor forms, run inside the hooks, in the same order on every
rank). GaLore's own per-layer mode is single-GPU only.

Limits: gradient clipping by global norm is impossible (the norm is not known until backward ends);
under DDP (or any multi-process run whose parameters are not FSDP2 shards) it is refused: the hook
fires before the bucketed all-reduce has written the averaged gradient; ``optimizer.step()`` after
backward is then a no-op (no gradients left).

Example:
    >>> import torch
    >>> from loralab.golore import GaLoreAdamW
    >>> from loralab.golore.layerwise import register_layerwise_step
    >>> lin = torch.nn.Linear(8, 16)
    >>> opt = GaLoreAdamW([{"params": [lin.weight], "rank": 2}, {"params": [lin.bias]}], lr=1e-2)
    >>> handle = register_layerwise_step(opt, accumulation_steps=1)
    >>> lin(torch.randn(4, 8)).sum().backward()  # the parameters are updated here
    >>> lin.weight.grad is None
    True
    >>> handle.remove()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from loralab.core import sharding
from loralab.core.distributed import world_size
from loralab.golore.optimizer import SubspaceOptimizer

__all__ = ["LayerwiseStepHandle", "register_layerwise_step"]


class LayerwiseStepHandle:
    """Returned by :func:`register_layerwise_step`; ``remove()`` detaches the hooks."""

    def __init__(self, optimizer: SubspaceOptimizer, accumulation_steps: int) -> None:
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.counts: dict[int, int] = {}
        self._handles: list[Any] = []

    def _hook(self, p: Tensor) -> None:
        k = self.counts.get(id(p), 0) + 1
        self.counts[id(p)] = k
        if k % self.accumulation_steps == 0:
            self.optimizer.step_parameter(p)
            p.grad = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def register_layerwise_step(
    optimizer: SubspaceOptimizer, *, accumulation_steps: int = 1
) -> LayerwiseStepHandle:
    """Step every parameter of ``optimizer`` from its post-accumulate-grad hook.

    Args:
        optimizer: a :class:`~loralab.golore.optimizer.SubspaceOptimizer` (GaLore/GoLore AdamW/SGD).
        accumulation_steps: micro-batches per optimizer step; a parameter steps on every
            ``accumulation_steps``-th gradient it receives. Scale the loss by
            ``1/accumulation_steps`` as usual.

    Raises:
        TypeError: ``optimizer`` cannot step one parameter at a time.
        RuntimeError: called in a multi-process run whose parameters are not all FSDP2 shards (DDP).
    """
    if not isinstance(optimizer, SubspaceOptimizer):
        raise TypeError(
            f"layer-wise stepping needs a loralab.golore optimizer (GaLoreAdamW, GoLoreAdamW, ...), got {type(optimizer).__name__}"
        )
    if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be a positive int, got {accumulation_steps!r}")
    trained = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    unsharded = [tuple(p.shape) for p in trained if not sharding.is_sharded(p)]
    if world_size() > 1 and unsharded:
        raise RuntimeError(
            "layer-wise stepping across processes needs every trained parameter sharded by FSDP2 "
            f"(fully_shard), whose hooks see the averaged gradient; {len(unsharded)} are not (shapes "
            f"{unsharded[:3]}; world size {world_size()}): under DDP the gradient hook fires before the "
            "all-reduce has averaged the gradient. Use fully_shard, or a normal optimizer.step()"
        )
    handle = LayerwiseStepHandle(optimizer, accumulation_steps)
    for p in trained:
        handle._handles.append(p.register_post_accumulate_grad_hook(torch.no_grad()(handle._hook)))
    return handle
