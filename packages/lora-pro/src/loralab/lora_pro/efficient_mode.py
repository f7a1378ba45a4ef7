"""LoRA-Pro's efficient mode (the official code's ``step_efficient``): AdamW with LoRA-sized states on
the adjusted gradients (Theorem 2.1), every layer of one shape adjusted in one batched call and stepped
on stacked Adam state.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from loralab.core.adamw import fused_adamw_, fused_adamw_available
from loralab.core.linalg import accumulation_dtype
from loralab.core.lora_layers import LoraPair
from loralab.core.sharding import local_tensor, rows_of
from loralab.lora_pro.adjust import lora_pro_gradients_buckets
from loralab.lora_pro.optimizer_base import LoraProOptimizerBase

__all__ = ["EfficientModeSteps"]


class EfficientModeSteps(LoraProOptimizerBase):
    """Efficient mode's adjustment and stacked AdamW (see the module docstring)."""

    def _efficient_adjust(
        self, group: dict[str, Any], buckets: list[list[LoraPair]]
    ) -> list[tuple[list[LoraPair], Tensor, Tensor]]:
        """LoRA-Pro's adjusted gradients ``(bucket, gᴬ, gᴮ)`` of every bucket, checked for NaN/Inf."""
        # Each factor is stacked next to its gradient, [A; g_A] and [B | g_B], in the accumulation dtype:
        # one copy of every tensor, and the adjustment becomes four batched products per shape; the r×r
        # work of all shapes that share a rank, dtype and device runs as one batch (see
        # lora_pro_gradients_buckets).
        stacks: dict[tuple, list[tuple[list[LoraPair], Tensor, Tensor, Tensor]]] = defaultdict(list)
        for bucket in buckets:
            r, n = bucket[0].A.shape
            m = bucket[0].B.shape[0]
            dt = accumulation_dtype(bucket[0].A.dtype)
            kw: dict[str, Any] = dict(dtype=dt, device=bucket[0].A.device)
            # the bucket's A, g_A, B, g_B whole: under FSDP2 from one all-gather per bucket (four
            # collectives per layer cost more than the adjustment; one for every bucket at once would
            # hold every layer's whole factors besides the stacked copies), else the tensors themselves
            layers = self._whole_factors(bucket)  # (A, g_A, B, g_B) of each layer
            if (
                kw["device"].type == "cpu"
            ):  # one copy of each tensor, per-layer copies are cheap here
                A_gA, B_gB = self._stacking_buffers(len(bucket), r, n, m, dt)
                for i, (A_i, gA_i, B_i, gB_i) in enumerate(layers):
                    torch.cat([A_i, gA_i], dim=0, out=A_gA[i])
                    torch.cat([B_i, gB_i], dim=1, out=B_gB[i])
            else:  # accelerators: a few batched copy kernels rather than two launches per layer
                As, gAs, Bs, gBs = zip(*layers)
                A_gA = torch.cat([torch.stack(As), torch.stack(gAs)], dim=1).to(dt)
                B_gB = torch.cat([torch.stack(Bs), torch.stack(gBs)], dim=2).to(dt)
            s = torch.tensor([p.scaling for p in bucket], **kw)
            stacks[(r, dt, A_gA.device)].append((bucket, A_gA, B_gB, s))
        done = []
        for items in stacks.values():
            try:
                outs = lora_pro_gradients_buckets(
                    [it[1] for it in items],
                    [it[2] for it in items],
                    [it[3] for it in items],
                    x_mode=group["x_mode"],
                    ridge=group["ridge"],
                    jitter=group.get("jitter", 0.0),
                )
            except torch.linalg.LinAlgError:
                # the r×r eigendecompositions fail on NaN/Inf factors: say which layer, not LAPACK's code
                for bucket, *_ in items:
                    self._raise_non_finite_inputs(bucket)
                raise
            for (bucket, _, _, _), (gA, gB) in zip(items, outs):
                # Checking the outputs suffices: each is a product with the stacked inputs, gᴬ = [X | S]·[A; g_A]
                # and gᴮ = [B | g_B]·[−(Y + X); T], and IEEE products carry NaN/Inf through (0·NaN = NaN),
                # so a non-finite factor or gradient leaves a non-finite output; _check_out then names the
                # layer. Every shape is checked before any parameter or state changes.
                self._check_out(bucket, gA, gB)
                done.append((bucket, gA, gB))
        return done

    def _stacking_buffers(
        self, layers: int, r: int, n: int, m: int, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """CPU buffers for ``[A; g_A]`` (layers, 2r, n) and ``[B | g_B]`` (layers, m, 2r), kept between steps.

        A fresh multi-MB CPU tensor is fresh memory from the operating system, and the first write to
        each of its pages faults: allocating these every step made the stacking copy about twice as slow.
        One pair per layer shape is kept (grown when a step has more layers of that shape);
        :attr:`workspace_bytes` reports their size. CUDA's caching allocator already reuses memory,
        so nothing is kept there.
        """
        key = (r, n, m, dtype)
        bufs = self._workspace.get(key)
        if bufs is None or bufs[0].shape[0] < layers:
            bufs = (
                torch.empty((layers, 2 * r, n), dtype=dtype),
                torch.empty((layers, m, 2 * r), dtype=dtype),
            )
            self._workspace[key] = bufs
        return bufs[0][:layers], bufs[1][:layers]

    @property
    def workspace_bytes(self) -> int:
        """Bytes of the stacking buffers efficient mode keeps between steps on CPU (2× the LoRA
        parameters of the layers it adjusts; 0 on CUDA and before the first step)."""
        return sum(t.numel() * t.element_size() for bufs in self._workspace.values() for t in bufs)

    def _efficient_update(
        self, group: dict[str, Any], bucket: list[LoraPair], gA: Tensor, gB: Tensor
    ) -> None:
        # FSDP2: this rank's rows of the (whole) adjusted gradients, for its rows of A and B
        rows_A, rows_B = rows_of(bucket[0].A), rows_of(bucket[0].B)
        if rows_A != slice(0, gA.shape[1]):
            gA = gA[:, rows_A].contiguous()
        if rows_B != slice(0, gB.shape[1]):
            gB = gB[:, rows_B].contiguous()
        moments, step_buf, views = self._stacked_state(bucket, gA.dtype)
        step_buf.add_(1)
        params = [local_tensor(t) for pair in bucket for t in (pair.A, pair.B)]
        if (
            fused_adamw_available(gA.device)
            and gA.dtype == bucket[0].A.dtype
            and all(p.is_contiguous() for p in params)
        ):
            # torch's fused AdamW kernel (CPU), one pass over each factor (the element-wise ops on the
            # stacked buffers below make eight); per-parameter step counters, so layers that sat out a
            # step need no special case. Its other preconditions hold by construction: the adjusted
            # gradients and the moments are slices of contiguous stacks in the factors' dtype.
            grads = [g for pair_grads in zip(gA.unbind(0), gB.unbind(0)) for g in pair_grads]
            fused_adamw_(params, grads, *views, **self._adam_kwargs(group))
            return
        steps = [int(v) for v in step_buf.tolist()]
        if all(st == steps[0] for st in steps):
            self._stacked_adamw(group, bucket, gA, gB, moments, steps[0])
        else:  # layers that skipped steps: per parameter (the state tensors are views, still theirs)
            grads = [g for i in range(len(bucket)) for g in (gA[i], gB[i])]
            keys = [t for pair in bucket for t in (pair.A, pair.B)]
            self._adamw(group, keys, grads, views[2])

    def _stacked_state(
        self, bucket: list[LoraPair], dtype: torch.dtype
    ) -> tuple[list[Tensor], Tensor, tuple[list[Tensor], list[Tensor], list[Tensor]]]:
        """The bucket's Adam state as stacked buffers: ``[m_A, v_A, m_B, v_B]``, the step counters, and
        the per-parameter views ``(exp_avgs, exp_avg_sqs, steps)`` (ordered A, B of layer 0, ...).

        ``state[p]["exp_avg"]``, ``["exp_avg_sq"]`` and ``["step"]`` of every factor stay per-parameter
        tensors (so ``state_dict`` and resume are unchanged) but are views into these buffers, so that
        AdamW runs as a few element-wise operations over the whole bucket instead of one kernel per
        parameter and operation. Rebuilt (copying the current state in) whenever a state tensor is no
        longer the view handed out, e.g. after ``load_state_dict``. Step counters are ordered A, B of
        layer 0, A, B of layer 1, ...
        """
        key = tuple(id(p.A) for p in bucket)
        cached = self._stacked.get(key)
        if cached is not None:
            bufs, step_buf, views = cached
            if all(
                state.get("exp_avg") is vm
                and state.get("exp_avg_sq") is vv
                and state.get("step") is vs
                for state, vm, vv, vs in zip(
                    (self.state[t] for pair in bucket for t in (pair.A, pair.B)), *views
                )
            ):
                return bufs, step_buf, views
        device = bucket[0].A.device
        L = len(bucket)
        bufs = [  # of this rank's rows when FSDP2 shards the factors
            torch.zeros((L, *local_tensor(p).shape), dtype=dtype, device=device)
            for p in (bucket[0].A, bucket[0].A, bucket[0].B, bucket[0].B)
        ]
        # float32 on the CPU, as torch.optim keeps (and _next_step creates) the step counters
        step_buf = torch.zeros(2 * L, dtype=torch.float32)
        views = ([], [], [])  # typed by the cached unpacking above
        for i, pair in enumerate(bucket):
            for j, (p, vm, vv) in enumerate(
                ((pair.A, bufs[0][i], bufs[1][i]), (pair.B, bufs[2][i], bufs[3][i]))
            ):
                vs = step_buf[2 * i + j]
                state = self.state[p]
                if "exp_avg" in state:
                    vm.copy_(state["exp_avg"])
                    vv.copy_(state["exp_avg_sq"])
                if "step" in state:
                    vs.copy_(state["step"])
                state["exp_avg"], state["exp_avg_sq"], state["step"] = vm, vv, vs
                for lst, v in zip(views, (vm, vv, vs)):
                    lst.append(v)
        # a layer that moved to another bucket (its shape group changed between steps) leaves its old
        # buffers behind: drop every cached bucket that shares a layer with this one
        for other in [k for k in self._stacked if not set(k).isdisjoint(key)]:
            del self._stacked[other]
        self._stacked[key] = (bufs, step_buf, views)
        return bufs, step_buf, views

    def _stacked_adamw(
        self,
        group: dict[str, Any],
        bucket: list[LoraPair],
        gA: Tensor,
        gB: Tensor,
        moments: list[Tensor],
        step: int,
    ) -> None:
        """AdamW on the stacked adjusted gradients of a bucket (all its factors at the same ``step``).

        The path for CUDA (a few large element-wise kernels instead of one launch per parameter) and
        for CPU without torch's fused kernel or with half-precision factors. ``torch.optim.AdamW``'s rule; for half-precision factors with float32 moments, the arithmetic of
        :func:`loralab.core.adamw.adamw_update_` (the direction rounded once to the factor's dtype).
        """
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        bc1 = 1 - beta1**step
        bc2 = 1 - beta2**step
        mA, vA, mB, vB = moments
        for params, g, m, v in (
            ([local_tensor(p.A) for p in bucket], gA, mA, vA),
            ([local_tensor(p.B) for p in bucket], gB, mB, vB),
        ):
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = torch.sqrt(v, out=g)  # the adjusted gradient is spent: reuse its memory
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            if all(p.dtype == m.dtype for p in params):
                # (lr/bc₁)·m/(√v/√bc₂ + ε) = (lr·√bc₂/bc₁)·m/(√v + ε·√bc₂): one pass over v fewer
                denom.add_(eps * math.sqrt(bc2))
                step_size = lr * math.sqrt(bc2) / bc1
                torch._foreach_addcdiv_(
                    params, list(m.unbind(0)), list(denom.unbind(0)), -step_size
                )
            else:  # half-precision factors: the direction in float32, rounded once, as core does
                denom.div_(math.sqrt(bc2)).add_(eps)
                direction = torch.div(m, denom, out=denom).div_(bc1)
                for p, d in zip(params, direction):
                    p.add_(d.to(p.dtype), alpha=-lr)
