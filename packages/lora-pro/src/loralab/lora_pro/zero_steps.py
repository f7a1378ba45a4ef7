"""LoRA-Pro under DeepSpeed ZeRO (stages 1, 2 and 3): both modes on the flat fp32 partitions DeepSpeed
hands the optimizer (:mod:`loralab.core.zero_views` finds each layer's factors in them). Efficient mode
gathers the LoRA-sized factors and gradients and runs AdamW element-wise on the partition; full mode
keeps each layer's m×n Adam state on one owner rank.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from loralab.core.adamw import adamw_direction, moment_dtype
from loralab.core.linalg import accumulation_dtype
from loralab.core.lora_layers import LoraPair, LoraPairError
from loralab.core.sharding import local_tensor
from loralab.core.zero_views import ZeroPartition, flat_partition, is_zero3_param, zero_partition
from loralab.lora_pro.adjust import lora_gradients, lora_pro_gradients, optimal_equivalent_gradient
from loralab.lora_pro.full_mode import _factor_dtype
from loralab.lora_pro.optimizer_base import LoraProOptimizerBase, _all_finite

__all__ = ["ZeroSteps"]


class ZeroSteps(LoraProOptimizerBase):
    """A step of a param group DeepSpeed ZeRO replaced by this rank's flat partition (see the module
    docstring)."""

    def _zero_step(self, group: dict[str, Any]) -> None:
        """One step of a group whose parameters DeepSpeed ZeRO (stage 1, 2 or 3) replaced by this
        rank's flat fp32 partition (:mod:`loralab.core.zero_views` finds the layers in it).

        The partition's master weights and gradient are all-gathered (LoRA-sized: one all-gather
        each), every layer is adjusted on its whole ``A, B, g_A, g_B`` (every rank computes the same
        r×r solves), and this rank's elements of the adjusted gradients replace the partition's
        gradient; AdamW then runs element-wise on the partition, exactly as efficient mode does on
        whole tensors. Trainable parameters that are not LoRA factors keep their gradient.
        """
        gi, originals = self._originals.of(group)
        where = f"LoraProAdamW param group {gi}"
        flat = flat_partition(group, where)
        if flat.grad is None:
            return
        zp = zero_partition(originals, flat, where)
        bad_local = self.check_finite and not _all_finite([flat.grad])
        if not zp.all_agree(not bad_local):
            raise FloatingPointError(
                f"{where}: non-finite gradients (NaN/Inf) in the DeepSpeed partition of "
                f"{'this rank' if bad_local else 'another rank'}"
            )
        buckets: dict[tuple, list[LoraPair]] = defaultdict(list)
        for pair in self._pairs:
            in_a, in_b = pair.A in zp, pair.B in zp
            if in_a != in_b:
                # ZeRO-3 splits a large group into sub-groups stepped one at a time
                raise LoraPairError(
                    f"layer {pair.name!r}: lora_A and lora_B are in different DeepSpeed ZeRO "
                    "partitions (ZeRO-3 sub-groups): raise zero_optimization.sub_group_size above "
                    "the number of trainable parameters"
                )
            if in_a:
                key = (tuple(zp.piece(pair.A).shape), tuple(zp.piece(pair.B).shape))
                buckets[key].append(pair)
        if not buckets:
            self._plain_step(group, [flat])
            return
        lora = [t for bucket in buckets.values() for pair in bucket for t in (pair.A, pair.B)]
        W = zp.wholes(flat, lora)
        G = zp.wholes(flat.grad, lora)
        if group["mode"] == "full":
            self._zero_full(group, zp, [p for b in buckets.values() for p in b], W, G)
            return
        adjusted: list[tuple[list[LoraPair], Tensor, Tensor]] = []
        for bucket in buckets.values():
            A = torch.stack([W[id(p.A)] for p in bucket])
            B = torch.stack([W[id(p.B)] for p in bucket])
            g_A = torch.stack([G[id(p.A)] for p in bucket])
            g_B = torch.stack([G[id(p.B)] for p in bucket])
            if self.check_finite and not _all_finite([g_A, g_B]):
                raise FloatingPointError(
                    f"LoraProAdamW: non-finite gradients (NaN/Inf) in LoRA layer(s) {[p.name for p in bucket]}"
                )
            s = torch.tensor([p.scaling for p in bucket], dtype=accumulation_dtype(A.dtype))
            try:
                gA, gB = lora_pro_gradients(
                    A,
                    B,
                    g_A,
                    g_B,
                    s,
                    x_mode=group["x_mode"],
                    ridge=group["ridge"],
                    jitter=group.get("jitter", 0.0),
                )
            except torch.linalg.LinAlgError:
                self._raise_non_finite_zero(bucket, W)
                raise
            if self.check_finite and not _all_finite([gA, gB]):
                self._raise_non_finite_zero(bucket, W)
            adjusted.append((bucket, gA, gB))
        for bucket, gA, gB in adjusted:  # every bucket checked: now change the gradient
            for k, pair in enumerate(bucket):
                zp.write_(flat.grad, pair.A, gA[k].to(flat.grad.dtype))
                zp.write_(flat.grad, pair.B, gB[k].to(flat.grad.dtype))
        # element-wise AdamW on this rank's partition: identical to efficient mode on whole tensors
        self._plain_step(group, [flat])

    def _zero_full(
        self,
        group: dict[str, Any],
        zp: ZeroPartition,
        pairs: list[LoraPair],
        W: dict[int, Tensor],
        G: dict[int, Tensor],
    ) -> None:
        """Full mode on a DeepSpeed ZeRO partition: each layer's m×n Adam state on one owner rank.

        Layer ``k`` of the partition is owned by rank ``k mod world``, which keeps its m×n moments
        (in the partition's state, under ``"param<i>.full_exp_avg"`` etc., ``i`` the index of B in
        the param group) and computes its step from the whole, all-gathered ``A, B, g_A, g_B`` exactly
        as in one process; the new factors reach every rank in one LoRA-sized all-reduce, and each
        rank writes its elements into its partition. The m×n state is split over the ranks, as ZeRO
        splits every other optimizer state; nothing m×n is communicated. Trainable parameters that
        are not LoRA factors get AdamW element-wise on the partition.
        """
        flat = zp.flat
        lr, wd = group["lr"], group["weight_decay"]
        state = self.state[flat]
        sizes = [(W[id(p.A)].numel(), W[id(p.B)].numel()) for p in pairs]
        new = torch.zeros(sum(a + b for a, b in sizes), dtype=flat.dtype, device=flat.device)
        bad: list[str] = []
        offset = 0
        for k, (pair, (na, nb)) in enumerate(zip(pairs, sizes)):
            here = slice(offset, offset + na + nb)
            offset += na + nb
            if k % zp.world != zp.rank:
                continue
            key = f"param{zp.piece(pair.B).index}."
            A, B = W[id(pair.A)][None], W[id(pair.B)][None]
            gA, gB = G[id(pair.A)][None], G[id(pair.B)][None]
            if self.check_finite and not _all_finite([gA, gB, A, B]):
                bad.append(pair.name)
                continue
            dt = accumulation_dtype(A.dtype)
            Ad, Bd = A.to(dt), B.to(dt)
            sd = torch.tensor([pair.scaling], dtype=dt)
            ridge, jitter = group["ridge"], group.get("jitter", 0.0)
            gt = optimal_equivalent_gradient(Ad, Bd, gA, gB, sd, ridge=ridge, jitter=jitter)
            if key + "step" not in state:
                state[key + "step"] = torch.tensor(0.0, dtype=torch.float32)
                for name in ("full_exp_avg", "full_exp_avg_sq"):
                    state[key + name] = torch.zeros(
                        gt.shape[1:], dtype=moment_dtype(flat), device=flat.device
                    )
            state[key + "step"] += 1
            (N,) = adamw_direction(
                [gt[0]],
                [state[key + "full_exp_avg"]],
                [state[key + "full_exp_avg_sq"]],
                step=int(state[key + "step"].item()),
                betas=tuple(group["betas"]),
                eps=group["eps"],
            )
            nA, nB = lora_gradients(Ad, Bd, N.to(gt.dtype)[None], sd)
            fd = _factor_dtype(Ad)  # LoRA-sized: in float64, as _full_bucket
            dA, dB = lora_pro_gradients(
                *(t.to(fd) for t in (Ad, Bd, nA, nB, sd)),
                x_mode=group["x_mode"],
                ridge=ridge,
                jitter=jitter,
            )
            if self.check_finite and not _all_finite([dA, dB]):
                bad.append(pair.name)
                continue
            a, b = A[0].clone(), B[0].clone()
            if wd:
                f = (
                    math.sqrt(1 - lr * wd)
                    if group["weight_decay_mode"] == "effective"
                    else 1 - lr * wd
                )
                a.mul_(f)
                b.mul_(f)
            a.add_(dA[0].to(a.dtype), alpha=-lr)
            b.add_(dB[0].to(b.dtype), alpha=-lr)
            new[here] = torch.cat([a.reshape(-1), b.reshape(-1)])
            # free this layer's m×n g̃ and direction before the next layer builds its own
            del gt, N
        if not zp.all_agree(not bad):  # every rank raises together, before any parameter changes
            raise FloatingPointError(
                f"LoraProAdamW: non-finite gradients, factors or adjusted directions (NaN/Inf) in "
                f"LoRA layer(s) {bad or 'of another rank'} (mode='full' under DeepSpeed ZeRO)"
            )
        zp.all_reduce_sum_(new)  # each layer's values come from its owner only
        # element-wise AdamW for the group's other parameters (its LoRA elements are overwritten)
        self._plain_step(group, [flat])
        offset = 0
        for pair, (na, nb) in zip(pairs, sizes):
            zp.write_(flat, pair.A, new[offset : offset + na].view(W[id(pair.A)].shape))
            zp.write_(flat, pair.B, new[offset + na : offset + na + nb].view(W[id(pair.B)].shape))
            offset += na + nb
            if wd and group["weight_decay_mode"] == "effective":
                w = self._base_weight(pair)  # frozen: replicated (ZeRO-1/2) or partitioned (ZeRO-3)
                assert w is not None  # checked at construction
                local = w.ds_tensor if is_zero3_param(w) else local_tensor(w)  # type: ignore[attr-defined]
                local.mul_(1 - lr * wd)

    @staticmethod
    def _raise_non_finite_zero(bucket: list[LoraPair], W: dict[int, Tensor]) -> None:
        bad = [
            p.name
            for p in bucket
            if not all(bool(torch.isfinite(W[id(t)]).all()) for t in (p.A, p.B))
        ]
        if bad:
            raise FloatingPointError(
                f"LoraProAdamW: non-finite LoRA factors (NaN/Inf parameters) in layer(s) {bad}"
            )
        raise FloatingPointError(
            f"LoraProAdamW: the LoRA-Pro adjustment produced NaN/Inf for layer(s) {[p.name for p in bucket]}; "
            "try ridge > 0 or float32 factors"
        )
