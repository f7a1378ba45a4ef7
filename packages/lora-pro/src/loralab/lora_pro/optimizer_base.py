"""What every path of :class:`~loralab.lora_pro.optimizer.LoraProAdamW` shares: step counters, Adam
moments, plain AdamW (on whole tensors or FSDP2 row shards), the stacking of a bucket of layers and
the NaN / Inf checks that name the layer.

The modes build on it: :mod:`loralab.lora_pro.efficient_mode` (LoRA-sized Adam states on the adjusted
gradients), :mod:`loralab.lora_pro.full_mode` (m×n Adam states on the optimal equivalent gradient) and
:mod:`loralab.lora_pro.zero_steps` (both modes on DeepSpeed ZeRO partitions).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor

from loralab.core.adamw import adamw_step_, moment_dtype
from loralab.core.lora_layers import LoraPair
from loralab.core.sharding import all_ranks_agree, local_tensor, whole, whole_packed
from loralab.core.zero_views import GroupOriginals

__all__ = ["LoraProOptimizerBase"]


def _all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every entry is finite: one reduction per tensor, the exact element-wise test only when
    the sums are not finite (which finite tensors can also give, by overflow)."""
    tensors = list(tensors)
    total = sum(
        t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32) for t in tensors
    )
    # callers pass at least one tensor, so the sum is a Tensor, never sum()'s start value 0
    return bool(torch.isfinite(cast(Tensor, total))) or all(
        bool(torch.isfinite(t).all()) for t in tensors
    )


def _grad(t: Tensor) -> Tensor:
    # ``t.grad`` of a tensor the step selected for having one (the checker sees ``Tensor | None``)
    return cast(Tensor, t.grad)


class LoraProOptimizerBase(torch.optim.Optimizer):
    """The state and checks every LoRA-Pro step uses (see the module docstring); the optimizer is
    :class:`~loralab.lora_pro.optimizer.LoraProAdamW`, which sets these attributes."""

    check_finite: bool
    _names: dict[int, str]  # id(parameter) -> name, for errors
    _pairs: list[LoraPair]  # the LoRA layers trained, in module order
    _originals: GroupOriginals  # each group's parameters, found again in a ZeRO partition
    # efficient mode on the CPU: stacking buffers per layer shape (EfficientModeSteps._stacking_buffers)
    _workspace: dict[tuple[Any, ...], tuple[Tensor, Tensor]]
    # efficient mode: per bucket of equal-shape layers, stacked Adam state (EfficientModeSteps._stacked_state)
    _stacked: dict[
        tuple[int, ...],
        tuple[list[Tensor], Tensor, tuple[list[Tensor], list[Tensor], list[Tensor]]],
    ]

    @staticmethod
    def _base_weight(pair: LoraPair) -> Tensor | None:
        base = getattr(pair.module, "base_layer", None) if pair.module is not None else None
        return getattr(base, "weight", None)

    def _next_step(self, p: Tensor) -> int:
        return int(self._next_steps([p])[0].item())

    def _next_steps(self, params: list[Tensor]) -> list[Tensor]:
        """Advance the step counters of ``params`` (one ``_foreach_add_``) and return them.

        float32 tensors on the CPU, as ``torch.optim`` keeps ``state["step"]``.
        """
        counters = []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
            counters.append(state["step"])
        torch._foreach_add_(counters, 1.0)
        return counters

    def _moments(self, p: Tensor, shape: torch.Size, prefix: str = "") -> tuple[Tensor, Tensor]:
        state = self.state[p]
        if prefix + "exp_avg" not in state:
            state[prefix + "exp_avg"] = torch.zeros(shape, dtype=moment_dtype(p), device=p.device)
            state[prefix + "exp_avg_sq"] = torch.zeros(
                shape, dtype=moment_dtype(p), device=p.device
            )
        return state[prefix + "exp_avg"], state[prefix + "exp_avg_sq"]

    def _adam_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(
            lr=group["lr"],
            betas=tuple(group["betas"]),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )

    def _plain_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        for p in params:
            if _grad(p).is_sparse:
                raise RuntimeError("LoraProAdamW does not support sparse gradients")
        self._adamw(group, params, [_grad(p) for p in params])

    def _adamw(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        steps: list[Tensor] | None = None,
    ) -> None:
        """One AdamW step of ``params`` along ``grads`` (:func:`loralab.core.adamw_step_`: torch's
        fused kernel on CPU, ``torch._foreach_*`` elsewhere); ``steps`` are the advanced counters.

        Sharded (FSDP2) parameters step on their local rows, with moments of those rows (the
        gradients are local rows too: the caller's, or the parameters' own local shards)."""
        if steps is None:
            steps = self._next_steps(params)
        locals_ = [local_tensor(p) for p in params]
        ms, vs = zip(*(self._moments(p, lp.shape) for p, lp in zip(params, locals_)))
        grads = [local_tensor(g) for g in grads]
        adamw_step_(locals_, grads, ms, vs, steps, **self._adam_kwargs(group))

    def _whole_factors(self, pairs: list[LoraPair]) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """``(A, g_A, B, g_B)`` of each pair, whole: under FSDP2 gathered from their row shards by
        one all-gather for all of them (:func:`~loralab.core.sharding.whole_packed`; a collective),
        else the tensors themselves."""
        wholes = whole_packed(
            [t for p in pairs for t in (p.A.detach(), _grad(p.A), p.B.detach(), _grad(p.B))]
        )
        return [
            (wholes[i], wholes[i + 1], wholes[i + 2], wholes[i + 3])
            for i in range(0, len(wholes), 4)
        ]

    def _stack(self, bucket: list[LoraPair]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        # whole factors and gradients (gathered when FSDP2 shards them: they are LoRA-sized)
        A, gA, B, gB = (torch.stack(ts) for ts in zip(*self._whole_factors(bucket)))
        s = torch.tensor([p.scaling for p in bucket], dtype=torch.float64)
        # non-finite gradients are caught together with the adjusted ones, in _check_out
        return A, B, gA, gB, s

    def _check_out(self, bucket: list[LoraPair], *tensors: Tensor, sharded: bool = False) -> None:
        """Raise if ``tensors`` hold NaN/Inf; ``sharded``: they are this rank's rows of the bucket's
        layers, so the ranks agree first (all raise together, or none)."""
        if not self.check_finite:
            return
        ok = _all_finite(tensors)
        if sharded:
            ok = all_ranks_agree(ok, [bucket[0].B])
        if ok:
            return
        self._raise_non_finite_inputs(bucket)
        raise FloatingPointError(
            f"LoraProAdamW: the LoRA-Pro adjustment produced NaN/Inf for layer(s) {[p.name for p in bucket]}; "
            "try ridge > 0 or float32 factors"
        )

    @staticmethod
    def _raise_non_finite_inputs(bucket: list[LoraPair]) -> None:
        """Raise ``FloatingPointError`` naming the layers whose gradients, or else factors, are NaN/Inf."""
        # whole tensors: every rank reaches here together (the adjusted outputs it checked are whole)
        bad = [
            p.name
            for p in bucket
            if any(
                t.grad is not None and not torch.isfinite(whole(t.grad)).all() for t in (p.A, p.B)
            )
        ]
        if bad:
            raise FloatingPointError(
                f"LoraProAdamW: non-finite gradients (NaN/Inf) in LoRA layer(s) {bad}"
            )
        bad = [
            p.name for p in bucket if not all(torch.isfinite(whole(t)).all() for t in (p.A, p.B))
        ]
        if bad:
            raise FloatingPointError(
                f"LoraProAdamW: non-finite LoRA factors (NaN/Inf parameters) in layer(s) {bad}: the model "
                "is already broken (a step taken with check_finite=False, or a bad checkpoint?)"
            )
