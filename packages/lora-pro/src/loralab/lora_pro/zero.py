"""DeepSpeed ZeRO-1/2: LoRA-Pro's step on all-gathered per-layer gradients.

Under ZeRO stage 1/2, DeepSpeed replaces each param group's parameters by one flat fp32 partition and
hands the optimizer only that rank's slice of the averaged gradient. LoRA-Pro's adjustment of a layer
needs the *whole* ``g_A`` and ``g_B`` of that layer together (Theorem 2.1 couples them through ``X``), so
running an element-wise optimizer on the partition silently trains plain LoRA (the official code's
issue #9). Here, inside the optimizer step:

1. all-gather the gradient partitions (and the fp32 master weights) of the group: LoRA-sized, cheap;
2. cut every LoRA layer's ``(A, B, g_A, g_B)`` out of the flat buffers with DeepSpeed's own offsets and
   adjust all layers of one shape in one batched call (every rank computes the same r×r solves);
3. copy this rank's slice of the adjusted flat gradient back into the partition's gradient and run
   the element-wise AdamW on the partition, exactly as in efficient mode.

Because efficient mode's AdamW is element-wise, the result equals the single-process step on the same
averaged gradient. Full mode keeps m×n Adam states per layer that do not partition element-wise along
LoRA's flat layout: it raises a clear error here (use DDP, or efficient mode). ZeRO-3 partitions the
parameters themselves: refused with a clear error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["ZeroBinding", "find_zero_optimizer"]


def find_zero_optimizer(engine_or_optimizer: Any) -> Any:
    """The DeepSpeed ZeRO stage 1/2 optimizer wrapping ours, from an engine or the ZeRO optimizer itself."""
    zero = getattr(engine_or_optimizer, "optimizer", None)
    for candidate in (engine_or_optimizer, zero):
        name = type(candidate).__name__
        if name == "DeepSpeedZeroOptimizer_Stage3":
            raise NotImplementedError(
                "LoraProAdamW does not support DeepSpeed ZeRO-3 (parameters are partitioned, so a layer's A and B are "
                "never whole on one rank). Use ZeRO stage 0/1/2 (LoRA parameters are small) or DDP."
            )
        if hasattr(candidate, "single_partition_of_fp32_groups") and hasattr(
            candidate, "round_robin_bit16_offsets"
        ):
            return candidate
    raise TypeError(
        f"attach_deepspeed expects the DeepSpeed engine returned by deepspeed.initialize (ZeRO stage 1/2) or its "
        f"ZeRO optimizer, got {type(engine_or_optimizer).__name__}"
    )


class ZeroBinding:
    """Where a DeepSpeed ZeRO-1/2 optimizer keeps each parameter of ours in its flat buffers."""

    def __init__(self, zero: Any) -> None:
        self.zero = zero
        self.offsets: list[dict[int, int]] = [
            {id(p): int(off) for p, off in zip(params, offsets)}
            for params, offsets in zip(
                zero.round_robin_bit16_groups, zero.round_robin_bit16_offsets
            )
        ]

    def group_of(self, partition: Tensor) -> int:
        for i, t in enumerate(self.zero.single_partition_of_fp32_groups):
            if t is partition:
                return i
        raise RuntimeError(
            "LoraProAdamW: a param group holds a flat tensor that the attached DeepSpeed optimizer does not own"
        )

    def gather(self, i: int, partition: Tensor) -> Tensor:
        """All partitions of group ``i`` concatenated: the full flat buffer (padding included)."""
        import torch.distributed as dist

        group = self.zero.real_dp_process_group[i]
        world = dist.get_world_size(group=group)
        if world == 1:
            return partition.clone()
        parts = [torch.empty_like(partition) for _ in range(world)]
        dist.all_gather(parts, partition.contiguous(), group=group)
        return torch.cat(parts)

    def rank_slice(self, i: int, partition: Tensor) -> slice:
        import torch.distributed as dist

        rank = dist.get_rank(group=self.zero.real_dp_process_group[i])
        n = partition.numel()
        return slice(rank * n, (rank + 1) * n)
