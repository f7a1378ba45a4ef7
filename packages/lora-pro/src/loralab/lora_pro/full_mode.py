"""LoRA-Pro's full mode (the paper's Algorithm 1, the official ``step_full``): Adam on the optimal
equivalent gradient ``g̃`` with m×n states per layer, its direction ``N`` brought back to the factors
by the same adjustment applied to ``(s·BᵀN, s·N·Aᵀ)``. Under FSDP2 by the projection algebra on B's
row shards: no m×n matrix is gathered or built whole.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, cast

import torch
from torch import Tensor

from loralab.core.adamw import adamw_direction
from loralab.core.linalg import accumulation_dtype
from loralab.core.lora_layers import LoraPair
from loralab.core.sharding import gather_rows, local_tensor, rows_of, sum_over_shards_
from loralab.lora_pro.adjust import lora_gradients, lora_pro_gradients, optimal_equivalent_gradient
from loralab.lora_pro.optimizer_base import LoraProOptimizerBase

__all__ = ["FullModeSteps"]


def _factor_dtype(like: Tensor) -> torch.dtype:
    """Full mode maps the Adam direction back to the factors in float64 (LoRA-sized work; MPS has
    none): the factor update ``(1/s²)(BᵀB)⁻¹·s·BᵀN`` computed with a float32 inverse is off by about
    ``u·κ(B)²`` along B's large singular directions, which is what moves ``W`` (κ(B) ≈ 10³ a few steps
    after ``B = 0``: 5e-2 relative on a GLUE run; see :mod:`loralab.lora_pro.adjust`, "Precision")."""
    return torch.float32 if like.device.type == "mps" else torch.float64


class FullModeSteps(LoraProOptimizerBase):
    """Full mode's step of a bucket of equal-shape layers (see the module docstring)."""

    def _full_bucket(
        self,
        group: dict[str, Any],
        bucket: list[LoraPair],
        stacked: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    ) -> None:
        A, B, g_A, g_B, s = stacked
        dt = accumulation_dtype(A.dtype)
        A, B, sd = A.to(dt), B.to(dt), s.to(dt)
        # Under FSDP2 the m×n moments hold the rows of B's shard only: g̃ is built for those rows only
        # (never whole), Adam runs on them (element-wise), and the direction N goes back to the
        # factors by the projection algebra on row shards, s·BᵀN = Σₖ s·Bₖᵀ·Nₖ (an r×n all-reduce)
        # and s·N·Aᵀ by rows (an m×r gather).
        rows = rows_of(bucket[0].B)
        gt = optimal_equivalent_gradient(
            A, B, g_A, g_B, sd, ridge=group["ridge"], jitter=group.get("jitter", 0.0), rows=rows
        )
        self._check_out(bucket, gt, sharded=True)
        B_rows = B[:, rows]
        m, n = gt.shape[-2], A.shape[-1]
        steps = []
        for pair in bucket:
            steps.append(self._next_step(pair.B))
            self._next_step(pair.A)
        by_step: dict[int, list[int]] = defaultdict(list)
        for i, st in enumerate(steps):
            by_step[st].append(i)
        directions: list[Tensor | None] = [None] * len(bucket)
        for step, idx in by_step.items():
            ms, vs = zip(
                *(self._moments(bucket[i].B, torch.Size((m, n)), prefix="full_") for i in idx)
            )
            out = adamw_direction(
                [gt[i] for i in idx],
                list(ms),
                list(vs),
                step=step,
                betas=tuple(group["betas"]),
                eps=group["eps"],
            )
            for i, d in zip(idx, out):
                directions[i] = d
        # every slot was filled: by_step's index lists partition range(len(bucket))
        N = torch.stack(cast(list[Tensor], directions)).to(gt.dtype)
        # Bring the Adam direction back to the factors: the (gᴬ, gᴮ) whose equivalent gradient is closest
        # to N (Theorem 2.1 applied to N instead of G; official step_full).
        nA, nB = lora_gradients(A, B_rows, N, sd)
        nA = sum_over_shards_(nA.contiguous(), bucket[0].B)
        nB = gather_rows(bucket[0].B, nB.transpose(0, 1)).transpose(0, 1)
        # LoRA-sized: in float64 (see _factor_dtype)
        fd = _factor_dtype(A)
        dA, dB = lora_pro_gradients(
            A.to(fd),
            B.to(fd),
            nA.to(fd),
            nB.to(fd),
            sd.to(fd),
            x_mode=group["x_mode"],
            ridge=group["ridge"],
            jitter=group.get("jitter", 0.0),
        )
        self._check_out(bucket, dA, dB)
        lr, wd = group["lr"], group["weight_decay"]
        rows_A = rows_of(bucket[0].A)
        for i, pair in enumerate(bucket):
            a, b = (
                local_tensor(pair.A),
                local_tensor(pair.B),
            )  # this rank's rows (all of them unsharded)
            if wd:
                if group["weight_decay_mode"] == "effective":
                    # decays W0 + s·B·A as a whole (official full mode): √ on each factor, full on W0
                    f = math.sqrt(1 - lr * wd)
                    a.mul_(f)
                    b.mul_(f)
                    w = self._base_weight(pair)
                    assert w is not None  # checked at construction
                    local_tensor(w).mul_(1 - lr * wd)
                else:
                    a.mul_(1 - lr * wd)
                    b.mul_(1 - lr * wd)
            a.add_(dA[i][rows_A].to(a.dtype), alpha=-lr)
            b.add_(dB[i][rows].to(b.dtype), alpha=-lr)
