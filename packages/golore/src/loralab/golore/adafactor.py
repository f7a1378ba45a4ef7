"""GaLore / GoLore Adafactor: galore-torch's ``GaLoreAdafactor`` on the shared subspace machinery.

Adafactor (Shazeer & Stern, arXiv 1804.04235) keeps a factored second moment: for an (m, n)
gradient the row and column means of the squared gradient, ``R`` (m) and ``C`` (n), and estimates
``V̂ = R Cᵀ / mean(R)`` (Alg. 4). In GaLore (arXiv 2403.03507, Sec. 5.3 "GaLore with Adafactor") the
factored state lives on the projected gradient (``(m, r)`` or ``(r, n)``), and the update is projected
back and scaled by ``scale``. The maths and defaults are transformers' / galore-torch's Adafactor
(``lr=None``, ``eps=(1e-30, 1e-3)``, ``clip_threshold=1.0``, ``decay_rate=-0.8``, ``beta1=None``,
``scale_parameter=True``, ``relative_step=True``, ``warmup_init=False``):

- ``β₂ₜ = 1 − t^decay_rate``; ``R ← β₂ₜ R + (1−β₂ₜ) mean_cols(g² + ε₁)``, same for ``C`` (Eq. in Alg. 4);
- ``u = g / √V̂``, clipped to RMS ≤ ``clip_threshold`` (Sec. 6), times the step size
  ``ρₜ = min(1e-2, 1/√t)`` (``relative_step``; ``1e-6·t`` with ``warmup_init``) or ``lr``,
  times ``max(ε₂, RMS(W))`` (``scale_parameter``, Sec. 8);
- optional first moment ``m ← β₁ m + (1−β₁) u`` (``beta1``), weight decay ``W ← W − λ·ρ·W``.

Differences from galore-torch, on purpose: moments are re-projected on a subspace change
(``reproject_moments``; ``False`` is galore-torch's behaviour): the first moment as GaLoreAdamW's, the
factored second moment by re-projecting ``V̂`` with ``second_moment="project"`` (then re-factoring
into row/column means) and kept as is by default; parameters that are not 2-D in a group with
``rank`` are not projected (galore-torch crashes on them); state is tensors only.

Example:
    >>> import torch
    >>> from loralab.golore import GaLoreAdafactor
    >>> w = torch.nn.Parameter(torch.randn(64, 32)); b = torch.nn.Parameter(torch.zeros(64))
    >>> opt = GaLoreAdafactor([{"params": [w], "rank": 4, "update_proj_gap": 200, "scale": 0.25,
    ...                         "proj_type": "std"}, {"params": [b]}])
    >>> (w.sum() + b.sum()).backward(); opt.step()
    >>> tuple(opt.state[w]["exp_avg_sq_row"].shape), tuple(opt.state[w]["exp_avg_sq_col"].shape)
    ((64,), (4,))
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from loralab.golore.optimizer import SubspaceOptimizer
from loralab.golore.projector import Side, reproject_first_moment, reproject_second_moment
from loralab.golore.subspace import Item

__all__ = ["GaLoreAdafactor", "GoLoreAdafactor"]


def _rms(t: Tensor) -> Tensor:
    return t.norm(2) / (t.numel() ** 0.5)


def _approx_sq_grad_rsqrt(row: Tensor, col: Tensor) -> Tensor:
    """``1/√V̂`` with ``V̂ = R Cᵀ / mean(R)`` (Adafactor Alg. 4), in transformers' operation order."""
    r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    c_factor = col.unsqueeze(-2).rsqrt()
    return torch.mul(r_factor, c_factor)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class GaLoreAdafactor(SubspaceOptimizer):
    """Adafactor in a low-rank gradient subspace (galore-torch's ``GaLoreAdafactor``, same arguments).

    Param groups carry the projector keys of :class:`~loralab.golore.GaLoreAdamW` (``rank``,
    ``update_proj_gap``, ``scale``, ``proj_type``, ``projection``, ``rand_step`` / ``rand_ratio`` +
    ``total_steps``, ``reproject_moments``, ``second_moment``, ``svd_method``, ``seed``); groups
    without ``rank`` run plain Adafactor.

    Args:
        params: parameters or param-group dicts.
        lr: external learning rate; must be None with ``relative_step=True`` (the default).
        eps: ``(ε₁, ε₂)``: added to the squared gradient, and the floor of the parameter RMS.
        clip_threshold: update RMS clipping threshold ``d``.
        decay_rate: exponent of ``β₂ₜ = 1 − t^decay_rate`` (must be <= 0).
        beta1: first-moment coefficient, or None (no first moment, the default).
        weight_decay: ``W ← W − λ·ρₜ·W`` before the update.
        scale_parameter: multiply the step size by ``max(ε₂, RMS(W))``.
        relative_step: time-dependent step size ``min(1e-2, 1/√t)`` instead of ``lr``.
        warmup_init: ``min(1e-6·t, 1/√t)`` (needs ``relative_step``).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(32, 64)
        >>> opt = GaLoreAdafactor([{"params": [lin.weight], "rank": 4}], lr=1e-3, relative_step=False,
        ...                       scale_parameter=False)
    """

    _moment_keys = ("exp_avg",)
    # factored second moments (row / column means) and the RMS of the update and of the parameter
    # are whole-matrix reductions: under FSDP2 each sharded parameter steps whole on an owner rank
    _steps_row_shards = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        projection: str = "svd",
        rand_step: int | None = None,
        rand_ratio: float | None = None,
        total_steps: int | None = None,
        reproject_moments: bool = True,
        second_moment: str = "keep",
        svd_method: str = "auto",
        seed: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr,
            eps=tuple(eps) if isinstance(eps, (tuple, list)) else eps,
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            beta1=beta1,
            weight_decay=weight_decay,
            scale_parameter=scale_parameter,
            relative_step=relative_step,
            warmup_init=warmup_init,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            projection=projection,
            rand_step=rand_step,
            rand_ratio=rand_ratio,
            total_steps=total_steps,
            reproject_moments=reproject_moments,
            second_moment=second_moment,
            svd_method=svd_method,
            seed=seed,
        )
        super().__init__(params, defaults)

    def _validate_base(self, group: dict[str, Any], where: str) -> None:
        lr, rel = group["lr"], group["relative_step"]
        for key in ("scale_parameter", "relative_step", "warmup_init"):
            if not isinstance(group[key], bool):
                raise ValueError(f"{where}: {key} must be a bool, got {group[key]!r}")
        if lr is not None and rel:
            raise ValueError(
                f"{where}: cannot combine a manual lr ({lr!r}) with relative_step=True (pass lr=None, or "
                "relative_step=False)"
            )
        if lr is None and not rel:
            raise ValueError(
                f"{where}: relative_step=False needs an external lr (a float >= 0), got lr=None"
            )
        if lr is not None and (not _is_real(lr) or lr < 0):
            raise ValueError(f"{where}: lr must be a float >= 0 or None, got {lr!r}")
        if group["warmup_init"] and not rel:
            raise ValueError(f"{where}: warmup_init=True requires relative_step=True")
        eps = group["eps"]
        if not (
            isinstance(eps, tuple) and len(eps) == 2 and all(_is_real(e) and e >= 0 for e in eps)
        ):
            raise ValueError(
                f"{where}: eps must be a pair (eps1, eps2) of floats >= 0, got {eps!r}"
            )
        if not _is_real(group["clip_threshold"]) or group["clip_threshold"] <= 0:
            raise ValueError(
                f"{where}: clip_threshold must be a float > 0, got {group['clip_threshold']!r}"
            )
        if not _is_real(group["decay_rate"]) or group["decay_rate"] > 0:
            raise ValueError(
                f"{where}: decay_rate must be a float <= 0 (beta2_t = 1 - t^decay_rate), got {group['decay_rate']!r}"
            )
        b1 = group["beta1"]
        if b1 is not None and (not _is_real(b1) or not 0.0 <= b1 < 1.0):
            raise ValueError(f"{where}: beta1 must be None or in [0, 1), got {b1!r}")
        if not _is_real(group["weight_decay"]) or group["weight_decay"] < 0:
            raise ValueError(
                f"{where}: weight_decay must be a float >= 0, got {group['weight_decay']!r}"
            )

    @staticmethod
    def _step_size(group: dict[str, Any], step: int, rms: Tensor) -> Tensor | float:
        """``ρₜ · max(ε₂, RMS(W))`` (Adafactor Sec. 8; transformers' ``_get_lr``)."""
        rel = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            rel = min(min_step, 1.0 / math.sqrt(step))
        param_scale: Tensor | float = 1.0
        if group["scale_parameter"]:
            param_scale = torch.clamp(rms, min=group["eps"][1])
        return param_scale * rel

    def _reproject_moments(
        self, state: dict[str, Any], trans: tuple[Tensor, ...], side: Side, group: dict[str, Any]
    ) -> None:
        if "exp_avg" in state:
            state["exp_avg"].copy_(reproject_first_moment(state["exp_avg"], trans, side))
        if group["second_moment"] != "project":
            return
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            # the factored estimate V̂ = R Cᵀ / mean(R), carried as independent variances, re-factored
            v = row.unsqueeze(-1) * col.unsqueeze(-2) / row.mean(dim=-1, keepdim=True).unsqueeze(-1)
            v = reproject_second_moment(v, trans, side)
            row.copy_(v.mean(dim=-1))
            col.copy_(v.mean(dim=-2))
        elif "exp_avg_sq" in state:
            state["exp_avg_sq"].copy_(reproject_second_moment(state["exp_avg_sq"], trans, side))

    def _update(self, group: dict[str, Any], items: list[Item]) -> None:
        eps1, _ = group["eps"]
        for p, g, state, side, _like in items:  # never FSDP2-sharded (refused)
            if g.dtype in (torch.float16, torch.bfloat16):
                g = g.float()
            factored = g.dim() >= 2
            if "RMS" not in state:
                if group["beta1"] is not None:
                    state["exp_avg"] = torch.zeros_like(g)
                if factored:
                    state["exp_avg_sq_row"] = torch.zeros(
                        g.shape[:-1], dtype=g.dtype, device=g.device
                    )
                    state["exp_avg_sq_col"] = torch.zeros(
                        g.shape[:-2] + g.shape[-1:], dtype=g.dtype, device=g.device
                    )
                else:
                    state["exp_avg_sq"] = torch.zeros_like(g)
            p32 = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
            state["step"] += 1
            step = int(state["step"].item())
            state["RMS"] = _rms(p32).detach()
            lr = self._step_size(group, step, state["RMS"])
            beta2t = 1.0 - math.pow(step, group["decay_rate"])
            sq = g * g + eps1
            if factored:
                row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
                col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
                update = _approx_sq_grad_rsqrt(row, col).mul_(g)
            else:
                v = state["exp_avg_sq"]
                v.mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
                update = v.rsqrt().mul_(g)
            update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
            update.mul_(lr)
            if group["beta1"] is not None:
                m = state["exp_avg"]
                m.mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
                update = m
            full = self._full_update(p, update, state, side, group)
            if group["weight_decay"]:
                p32.add_(p32 * (-group["weight_decay"] * lr))
            p32.add_(-full.to(p32.dtype))
            if p32 is not p:
                p.copy_(p32)


class GoLoreAdafactor(GaLoreAdafactor):
    """:class:`GaLoreAdafactor` whose projector refreshes draw random Stiefel matrices from ``rand_step`` on.

    GoLore (He et al., arXiv 2410.11289), as :class:`~loralab.golore.GoLoreAdamW`: ``rand_ratio``
    is the fraction of ``total_steps`` that uses SVD projectors (default 0.0: random from the start).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(32, 64)
        >>> opt = GoLoreAdafactor([{"params": [lin.weight], "rank": 4}], rand_ratio=0.8, total_steps=1000)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        rand_ratio: float = 0.0,
        total_steps: int | None = None,
        rand_step: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params, lr, eps, clip_threshold, decay_rate, beta1, weight_decay, scale_parameter,
            relative_step, warmup_init, rand_ratio=rand_ratio, total_steps=total_steps,
            rand_step=rand_step, **kwargs,
        )  # fmt: skip
