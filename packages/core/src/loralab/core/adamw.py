"""The AdamW update as a functional core, shared by every loralab optimizer.

LoRA-FA, LoRA-Pro and GaLore/GoLore all run AdamW on a *transformed* gradient (corrected, projected,
adjusted). They differ in the transformation, not in AdamW, so the update lives here once, on lists
of tensors (``torch._foreach_*`` when possible), in the style of ``torch.optim.adamw``'s functional
core. Two conventions exist in the wild and both are needed for parity with the peers:

- ``style="torch"`` (``torch.optim.AdamW``): ``p ← p(1 − lr·λ)``, then
  ``p ← p − (lr / bc₁) · m / (√v / √bc₂ + ε)``;
- ``style="hf"`` (transformers' legacy ``AdamW``, PEFT's LoRA-FA, galore-torch):
  ``p ← p − lr·(√bc₂ / bc₁) · m / (√v + ε)``, then ``p ← p − lr·λ·p``.

Here bcᵢ = 1 − βᵢᵗ with t the 1-based step (bias correction is right from the first step).

Example:
    >>> import torch
    >>> p, g = torch.zeros(3), torch.ones(3)
    >>> m, v = torch.zeros(3), torch.zeros(3)
    >>> adamw_update_([p], [g], [m], [v], step=1, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    >>> p
    tensor([-0.1000, -0.1000, -0.1000])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "AdamWStyle",
    "adamw_direction",
    "adamw_step_",
    "adamw_update_",
    "check_adamw_hparams",
    "fused_adamw_",
    "fused_adamw_available",
    "moment_dtype",
]

AdamWStyle = Literal["torch", "hf"]


def moment_dtype(like: Tensor | torch.dtype) -> torch.dtype:
    """The dtype an optimizer keeps its state (moments, projectors) in for a parameter or dtype
    ``like``: float32 for half precision (Adam's squared gradients underflow in bf16 / fp16), else
    ``like``'s own.

    Example:
        >>> moment_dtype(torch.zeros(2, dtype=torch.bfloat16)), moment_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    dtype = like if isinstance(like, torch.dtype) else like.dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_adamw_hparams(lr: float, betas: Sequence[float], eps: float, weight_decay: float) -> None:
    """Validate AdamW hyper-parameters as ``torch.optim.AdamW`` does, with the argument named."""
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: lr must be >= 0, got {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: eps must be >= 0, got {eps}")
    if len(betas) != 2 or not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid betas: each must be in [0, 1), got {betas}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay: must be >= 0, got {weight_decay}")


def _update_moments_(
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    beta1: float,
    beta2: float,
) -> None:
    # a cast only where the dtypes differ: .to() is one dispatch per tensor even when it is a no-op
    grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    torch._foreach_lerp_(list(exp_avgs), grads, 1 - beta1)
    torch._foreach_mul_(list(exp_avg_sqs), beta2)
    torch._foreach_addcmul_(list(exp_avg_sqs), grads, grads, 1 - beta2)


def _torch_denom(exp_avg_sqs: Sequence[Tensor], bc2: float, eps: float) -> list[Tensor]:
    """``√v / √bc₂ + ε``, torch.optim.AdamW's denominator."""
    denom = list(torch._foreach_sqrt(list(exp_avg_sqs)))
    torch._foreach_div_(denom, math.sqrt(bc2))
    torch._foreach_add_(denom, eps)
    return denom


def adamw_direction(
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    step: int,
    betas: tuple[float, float],
    eps: float,
    style: AdamWStyle = "torch",
    correct_bias: bool = True,
) -> list[Tensor]:
    """Update the moments in place and return the Adam directions ``N`` (the update is ``−lr·N``).

    Used by optimizers that must transform the direction before applying it (GaLore projects it back
    to the full space; LoRA-Pro's full mode projects it onto the LoRA factors).
    ``correct_bias=False`` drops the bias corrections (bc₁ = bc₂ = 1: ``N = m / (√v + ε)`` in both
    styles), transformers' ``AdamW(correct_bias=False)`` as in BERT's TF code.
    """
    if step < 1:
        raise ValueError(f"step is 1-based, got {step}")
    beta1, beta2 = betas
    _update_moments_(grads, exp_avgs, exp_avg_sqs, beta1, beta2)
    bc1 = 1 - beta1**step if correct_bias else 1.0
    bc2 = 1 - beta2**step if correct_bias else 1.0
    if style == "torch":
        denom = _torch_denom(exp_avg_sqs, bc2, eps)
        out = list(torch._foreach_div(list(exp_avgs), denom))
        torch._foreach_div_(out, bc1)
    elif style == "hf":
        denom = list(torch._foreach_sqrt(list(exp_avg_sqs)))
        torch._foreach_add_(denom, eps)
        out = list(torch._foreach_div(list(exp_avgs), denom))
        torch._foreach_mul_(out, math.sqrt(bc2) / bc1)
    else:
        raise ValueError(f"style must be 'torch' or 'hf', got {style!r}")
    return out


def adamw_update_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    style: AdamWStyle = "torch",
) -> None:
    """One AdamW step for a list of parameters sharing ``step`` and hyper-parameters (in place).

    The moments keep their own dtype (keep them fp32 for bf16 parameters); the update is computed in
    the moments' dtype and cast to each parameter's dtype.
    """
    if not params:
        return
    directions = adamw_direction(
        grads, exp_avgs, exp_avg_sqs, step=step, betas=betas, eps=eps, style=style
    )
    params = list(params)
    if style == "torch" and weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    if all(d.dtype == p.dtype for d, p in zip(directions, params)):
        torch._foreach_add_(params, directions, alpha=-lr)
    else:
        for p, d in zip(params, directions):
            p.add_(d.to(p.dtype), alpha=-lr)
    if style == "hf" and weight_decay:
        torch._foreach_mul_(
            params, 1 - lr * weight_decay
        )  # applied after the step, as transformers did


_FUSED_CPU: bool | None = None


def fused_adamw_available(device: torch.device | str = "cpu") -> bool:
    """Whether :func:`adamw_step_` runs torch's fused AdamW kernel for tensors on ``device``.

    True on CPU with torch ≥ 2.4 (tried once on a one-element tensor). False elsewhere: on CUDA the
    fused kernel wants its step counters on the GPU, while loralab keeps them on the CPU as
    ``torch.optim`` does by default, so CUDA runs the ``torch._foreach_*`` arithmetic.
    """
    return torch.device(device).type == "cpu" and _fused_cpu_available()


def _fused_cpu_available() -> bool:
    global _FUSED_CPU
    if _FUSED_CPU is None:
        p, g, m, v = (torch.zeros(1) for _ in range(4))
        try:
            torch._fused_adamw_(
                [p], [g], [m], [v], [], [torch.ones(())], lr=0.0, beta1=0.9, beta2=0.999,
                weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
            )  # fmt: skip
            _FUSED_CPU = True
        except (AttributeError, NotImplementedError, RuntimeError):
            _FUSED_CPU = False
    return _FUSED_CPU


def _fusable(tensors: Sequence[Tensor], steps: Sequence[Tensor]) -> bool:
    dtype = tensors[0].dtype
    return (
        dtype in (torch.float32, torch.float64)
        and all(
            t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() and not t.is_sparse
            for t in tensors
        )
        and all(s.device.type == "cpu" and s.dtype == torch.float32 for s in steps)
        and _fused_cpu_available()
    )


def adamw_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """``torch.optim.AdamW``'s step (style ``"torch"``) with per-parameter step counters (in place).

    ``steps`` holds each parameter's 1-based step as a float32 tensor, already incremented for this
    step (``torch.optim`` keeps ``state["step"]`` this way). On CPU tensors of one dtype (float32 or
    float64, contiguous) this runs torch's fused AdamW kernel, one pass over each parameter, the
    same kernel as ``torch.optim.AdamW(fused=True)``; elsewhere (CUDA, mixed dtypes such as bf16
    parameters with float32 moments) it runs the ``torch._foreach_*`` arithmetic of
    ``torch.optim.AdamW(foreach=True)``, or :func:`adamw_update_` when dtypes differ.

    Example:
        >>> p, g, m, v = torch.zeros(3), torch.ones(3), torch.zeros(3), torch.zeros(3)
        >>> adamw_step_([p], [g], [m], [v], [torch.tensor(1.0)], lr=0.1, betas=(0.9, 0.999),
        ...             eps=1e-8, weight_decay=0.0)
        >>> p
        tensor([-0.1000, -0.1000, -0.1000])
    """
    params, grads, exp_avgs, exp_avg_sqs = (list(t) for t in (params, grads, exp_avgs, exp_avg_sqs))
    if not params:
        return
    if not len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(steps):
        raise ValueError("adamw_step_: params, grads, moments and steps must have equal lengths")
    step_values = [int(s) for s in steps]
    if min(step_values) < 1:
        raise ValueError(
            f"adamw_step_: steps are 1-based and already advanced for this step, got {min(step_values)}"
        )
    if _fusable(params + grads + exp_avgs + exp_avg_sqs, steps):
        fused_adamw_(
            params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, betas=betas, eps=eps,
            weight_decay=weight_decay,
        )  # fmt: skip
        return
    by_step: dict[int, list[int]] = {}
    for j, st in enumerate(step_values):
        by_step.setdefault(st, []).append(j)
    for step, idx in by_step.items():
        ps, gs = [params[j] for j in idx], [grads[j] for j in idx]
        ms, vs = [exp_avgs[j] for j in idx], [exp_avg_sqs[j] for j in idx]
        if all(p.dtype == g.dtype == m.dtype == v.dtype for p, g, m, v in zip(ps, gs, ms, vs)):
            _adamw_foreach_(
                ps, gs, ms, vs, step=step, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
            )
        else:
            adamw_update_(
                ps, gs, ms, vs, step=step, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
            )


def fused_adamw_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """:func:`adamw_step_` on torch's fused kernel without checking its preconditions.

    For hot loops whose caller guarantees them: :func:`fused_adamw_available` for the device, all
    tensors on it, contiguous, of one float32/float64 dtype, float32 step counters on the CPU.
    """
    torch._fused_adamw_(
        params, grads, exp_avgs, exp_avg_sqs, [], list(steps), lr=lr, beta1=betas[0],
        beta2=betas[1], weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
    )  # fmt: skip


def _adamw_foreach_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """AdamW in the order ``torch.optim.AdamW(foreach=True)`` computes it, on same-dtype lists.

    The same maths as :func:`adamw_update_` (style ``"torch"``), but the step size ``lr/bc₁`` goes
    into one ``addcdiv_``, so the direction ``m/denom`` is never materialised (one tensor pass and
    one allocation fewer per parameter).
    """
    beta1, beta2 = betas
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    _update_moments_(grads, exp_avgs, exp_avg_sqs, beta1, beta2)
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    torch._foreach_addcdiv_(params, exp_avgs, _torch_denom(exp_avg_sqs, bc2, eps), -lr / bc1)
