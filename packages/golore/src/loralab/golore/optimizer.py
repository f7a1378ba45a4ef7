"""GaLore and GoLore as real ``torch.optim.Optimizer``s (AdamW and momentum-SGD subspace optimizers).

Every 2-D parameter of a param group that carries a ``rank`` gets a projector; its optimizer state
lives in the projected (low-rank) space and the update is projected back and scaled by ``scale``
(GaLore, arXiv 2403.03507, Alg. 2; GoLore, arXiv 2410.11289, Alg. 1). Every ``update_proj_gap``
steps the projector is refreshed, from the SVD of the current gradient (GaLore) or drawn uniformly
from the Stiefel manifold (GoLore), the latter from step ``rand_step`` on (``rand_ratio`` of
``total_steps``). Parameters that are not 2-D, and groups without ``rank``, get plain AdamW / SGD in
the same optimizer.

What differs from the references, on purpose (tested):

- **first-moment re-projection**: when the subspace changes, ``exp_avg`` (or the momentum buffer) is
  carried into the new basis, ``M ← P_newᵀ P_old M`` (``reproject_moments=True``). galore-torch never
  does it and GoLore's ``golore_adamw`` loses its re-assignment. ``reproject_moments=False`` gives
  galore-torch's behaviour (used by the parity test).
- **second moment** (``second_moment``): ``"keep"`` (default, as GoLore's ReLoRA path) leaves
  ``exp_avg_sq`` as it is; ``"project"`` carries it as independent variances, ``(C∘C) v``. Zeroing it
  is not offered: with the bias correction already at ~1, a zero ``v`` makes the next steps several
  times too large.
- **random projector**: exact Haar sample (QR of a Gaussian with the sign fix), drawn from a
  per-parameter generator seeded by ``(seed, group, index, step)``, so a resumed run draws the same
  matrices. The reference's polar factor ``Z (ZᵀZ)^{-1/2}`` built on the long side is
  ill-conditioned for right projections.
- **state**: tensors only (``step``, moments, ``proj_left``/``proj_right``) → ``state_dict()`` loads
  with ``torch.load(weights_only=True)`` and resume is exact. galore-torch stores a Python projector
  object.
- **layer-wise stepping**: :meth:`step_parameter` steps one parameter, used by
  :func:`loralab.golore.layerwise.register_layerwise_step` from gradient hooks.
- **FSDP2** (``fully_shard``, parameters row-sharded ``DTensor``\\s): :class:`GaLoreAdamW`,
  :class:`GaLoreSGD` and their GoLore forms step each rank's rows with the projection algebra on row
  shards (:func:`loralab.golore.projector.project_shard`), never gathering a weight: a right
  projection keeps the rank's rows of the (m, r) state; a left one reduce-scatters the (r, n)
  ``Σ_k P_kᵀ·G_k`` by columns, keeps the rank's column block of the (r, n) moments (columns split as
  ``torch.chunk`` splits rows, :func:`loralab.core.sharding.cols_of`), and all-gathers the (r, n)
  direction to form its rows ``P_k·N`` of the update; ``"full"``'s (r, r) state is whole on every
  rank (small, and its change of basis mixes columns). Projectors: the rank's rows of ``P`` and its
  column block of ``Q`` (all-gathered whole for the step: ``r·n`` numbers). An SVD refresh gathers
  the gradient of one matrix at a time (:func:`loralab.core.sharding.gather_rows`), the projector is
  broadcast from the first rank so replicas agree bit for bit, and every rank keeps its share. The result equals one process's up
  to the order of the sums. The 8-bit and Adafactor forms, whose states need whole tensors, step
  each sharded parameter whole on an owner rank instead.

Where the code is: this module holds the optimizers and the choice of path per param group; the
machinery they share (validation, refresh, projection, the update, FSDP2 row shards) is in
:mod:`loralab.golore.subspace`, the DeepSpeed ZeRO partitions and FSDP2 owner ranks in
:mod:`loralab.golore.sharded_steps`, the matrices ZeRO splits over ranks in
:mod:`loralab.golore.zero_split`.

Example:
    >>> import torch
    >>> from loralab.golore import GaLoreAdamW
    >>> w = torch.nn.Parameter(torch.randn(16, 8)); b = torch.nn.Parameter(torch.zeros(16))
    >>> opt = GaLoreAdamW([{"params": [w], "rank": 2}, {"params": [b]}], lr=1e-2, update_proj_gap=10)
    >>> (w.sum() + b.sum()).backward(); opt.step()
    >>> opt.state[w]["exp_avg"].shape  # (m, r): right projection since m >= n
    torch.Size([16, 2])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from loralab.core import sharding
from loralab.core.adamw import adamw_direction, check_adamw_hparams, moment_dtype
from loralab.golore.sharded_steps import ShardedSteps

__all__ = ["GaLoreAdamW", "GaLoreSGD", "GoLoreAdamW", "GoLoreSGD", "SubspaceOptimizer"]


class SubspaceOptimizer(ShardedSteps):
    """The base of the GaLore / GoLore optimizers: chooses, per param group, how it steps (one
    process or FSDP2 row shards: :class:`~loralab.golore.subspace.SubspaceOptimizerBase`; a DeepSpeed
    ZeRO partition or FSDP2 owner ranks: :class:`~loralab.golore.sharded_steps.ShardedSteps`).

    Subclasses define ``_validate_base``, ``_moment_keys`` and ``_low_rank_directions`` (or
    ``_update``, for forms with other state) and the flags that say which sharded paths they take.
    """

    # one signature for torch.optim.Optimizer.step's two overloads (closure None / given)
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimization step for every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (run with grad enabled).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for k, group in enumerate(self.param_groups):
            gi = self._group_index(group, k)
            originals = self._flattened_originals(group)
            if originals is not None:
                self._step_zero_partition(group, gi, originals)
                continue
            if not self._steps_row_shards and any(sharding.is_sharded(p) for p in group["params"]):
                self._step_fsdp_owners(group, gi)
                continue
            items = self._gather(group, gi)
            if items:
                self._update(group, items)
        return loss

    @torch.no_grad()
    def step_parameter(self, param: Tensor) -> None:
        """Step one parameter (its group's hyper-parameters); used by layer-wise stepping hooks."""
        for k, group in enumerate(self.param_groups):
            if any(p is param for p in group["params"]):
                gi = self._group_index(group, k)
                if not self._steps_row_shards and sharding.is_sharded(param):
                    self._step_fsdp_owners(group, gi, [param])
                    return
                items = self._gather(group, gi, [param])
                if items:
                    self._update(group, items)
                return
        raise KeyError(
            f"{type(self).__name__}.step_parameter: the parameter (shape {tuple(param.shape)}) is not in any param group"
        )


class GaLoreAdamW(SubspaceOptimizer):
    """AdamW in a low-rank gradient subspace (GaLore, arXiv 2403.03507; GoLore, arXiv 2410.11289).

    Param groups carry the projector settings as keys (galore-torch's shape): ``rank`` (``None`` →
    plain AdamW for that group), ``update_proj_gap``, ``scale``, ``proj_type``
    (std/reverse_std/left/right/full), ``projection`` (``"svd"`` or ``"random"``), ``rand_step`` or
    ``rand_ratio`` + ``total_steps`` (switch SVD → random, see :func:`resolve_rand_step`),
    ``reproject_moments``, ``second_moment`` (``"keep"``/``"project"``), ``svd_method``
    (``"full"``/``"randomized"``/``"auto"``, see :func:`loralab.core.linalg.truncated_svd`), ``seed``.
    Keyword arguments of the constructor are the defaults for every group.

    Args:
        params: parameters or param-group dicts.
        lr, betas, eps, weight_decay: AdamW hyper-parameters (eps 1e-6 as galore-torch).
        correct_bias: ``False`` drops Adam's bias corrections (transformers' / galore-torch's
            ``AdamW(correct_bias=False)``; a per-group key like the others).
        no_deprecation_warning: accepted for galore-torch's signature. galore-torch warns (unless
            ``True``) that its copy of transformers' AdamW is deprecated; this class is not, so it
            never warns and the flag has nothing to silence either way.
        adamw_style: ``"hf"`` (galore-torch's transformers-style AdamW: weight decay after the step,
            ``√bc₂/bc₁`` folded into the step size) or ``"torch"`` (``torch.optim.AdamW``).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(8, 16)
        >>> opt = GaLoreAdamW([{"params": [lin.weight], "rank": 4, "update_proj_gap": 50}, {"params": [lin.bias]}], lr=1e-3)
    """

    _moment_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = False,
        *,
        adamw_style: str = "hf",
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
        if not isinstance(no_deprecation_warning, bool):
            raise ValueError(
                f"{type(self).__name__}: no_deprecation_warning must be a bool, got {no_deprecation_warning!r}"
            )
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            adamw_style=adamw_style,
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
        try:
            check_adamw_hparams(
                group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"]
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        if group["adamw_style"] not in ("hf", "torch"):
            raise ValueError(
                f"{where}: adamw_style must be 'hf' or 'torch', got {group['adamw_style']!r}"
            )
        if not isinstance(group.get("correct_bias", True), bool):
            raise ValueError(f"{where}: correct_bias must be a bool, got {group['correct_bias']!r}")

    def _decay_(self, params: list[Tensor], group: dict[str, Any], *, after: bool) -> None:
        # torch.optim.AdamW decays before the step; galore-torch / transformers' AdamW ("hf") after
        lr, wd, style = group["lr"], group["weight_decay"], group["adamw_style"]
        if wd and not after and style == "torch":
            torch._foreach_mul_(params, 1 - lr * wd)
        if wd and after and style == "hf":
            torch._foreach_add_(params, params, alpha=-lr * wd)

    def _low_rank_directions(
        self,
        group: dict[str, Any],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        steps: list[int],
    ) -> list[Tensor]:
        # Adam's moments of the projected gradient (float32 for bf16/fp16), one foreach pass per step
        # count (a resumed or re-built state may mix them)
        for g, state in zip(grads, states):
            if "exp_avg" not in state:
                dt = moment_dtype(g)
                state["exp_avg"] = torch.zeros_like(
                    g, dtype=dt, memory_format=torch.preserve_format
                )
                state["exp_avg_sq"] = torch.zeros_like(
                    g, dtype=dt, memory_format=torch.preserve_format
                )
        by_step: dict[int, list[int]] = {}
        for k, step in enumerate(steps):
            by_step.setdefault(step, []).append(k)
        out: list[Tensor] = list(grads)
        for step, ks in by_step.items():
            dirs = adamw_direction(
                [grads[k] for k in ks],
                [states[k]["exp_avg"] for k in ks],
                [states[k]["exp_avg_sq"] for k in ks],
                step=step,
                betas=tuple(group["betas"]),
                eps=group["eps"],
                style=group["adamw_style"],
                correct_bias=group.get("correct_bias", True),
            )
            for k, d in zip(ks, dirs):
                out[k] = d
        return out

    _affine_in_weight = True
    _steps_split_elements = True


class GoLoreAdamW(GaLoreAdamW):
    """GaLore AdamW whose projector refreshes draw random Stiefel matrices from ``rand_step`` on.

    GoLore (He et al., arXiv 2410.11289): with small-batch gradients GaLore's SVD subspace becomes a
    noise subspace late in training and GaLore stalls (their Fig. 1); random projections sampled
    uniformly from the Stiefel manifold are unbiased and converge. ``rand_ratio`` follows the paper's
    code: the *fraction of steps that use SVD* (``0.8``: SVD for the first 80 % of ``total_steps``,
    random after; the default ``0.0`` is random from the first step).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(8, 16)
        >>> opt = GoLoreAdamW([{"params": [lin.weight], "rank": 4}], lr=1e-3, rand_ratio=0.8, total_steps=1000)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = False,
        *,
        rand_ratio: float = 0.0,
        total_steps: int | None = None,
        rand_step: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            correct_bias,
            no_deprecation_warning,
            rand_ratio=rand_ratio,
            total_steps=total_steps,
            rand_step=rand_step,
            **kwargs,
        )


class GaLoreSGD(SubspaceOptimizer):
    """Momentum SGD in a low-rank gradient subspace (the "MSGD" subspace optimizer of GoLore's paper).

    Same param-group keys as :class:`GaLoreAdamW`; the momentum buffer lives in the projected space and
    is re-projected on a subspace change (``reproject_moments``). Semantics of ``torch.optim.SGD``:
    ``buf ← μ·buf + (1 − dampening)·g`` (the first step sets ``buf = g``), Nesterov optional, weight
    decay added to the full-space gradient before projection (L2, as torch's SGD).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(8, 16)
        >>> opt = GaLoreSGD([{"params": [lin.weight], "rank": 4}], lr=1e-2, momentum=0.9)
    """

    _moment_keys = ("momentum_buffer",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
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
        svd_method: str = "auto",
        seed: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            projection=projection,
            rand_step=rand_step,
            rand_ratio=rand_ratio,
            total_steps=total_steps,
            reproject_moments=reproject_moments,
            second_moment="keep",
            svd_method=svd_method,
            seed=seed,
        )
        super().__init__(params, defaults)

    def _validate_base(self, group: dict[str, Any], where: str) -> None:
        if not group["lr"] >= 0:
            raise ValueError(f"{where}: lr must be >= 0, got {group['lr']}")
        if not group["momentum"] >= 0:
            raise ValueError(f"{where}: momentum must be >= 0, got {group['momentum']}")
        if not group["weight_decay"] >= 0:
            raise ValueError(f"{where}: weight_decay must be >= 0, got {group['weight_decay']}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"{where}: nesterov needs momentum > 0 and dampening = 0, got momentum={group['momentum']}, dampening={group['dampening']}"
            )

    def _preprocess_grad(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
        if group["weight_decay"]:
            return grad.add(p, alpha=group["weight_decay"])
        return grad

    _steps_split_elements = True

    def _low_rank_directions(
        self,
        group: dict[str, Any],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        steps: list[int],
    ) -> list[Tensor]:
        # torch.optim.SGD's momentum (dampening, Nesterov) on the projected gradient
        mu, damp = group["momentum"], group["dampening"]
        out = []
        for g, state in zip(grads, states):
            g = g.to(moment_dtype(g))
            if mu != 0:
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.clone()
                else:
                    state["momentum_buffer"].mul_(mu).add_(g, alpha=1 - damp)
                buf = state["momentum_buffer"]
                out.append(g.add(buf, alpha=mu) if group["nesterov"] else buf)
            else:
                out.append(g)
        return out


class GoLoreSGD(GaLoreSGD):
    """Momentum SGD with GoLore's random projectors from ``rand_step`` on (see :class:`GoLoreAdamW`).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(8, 16)
        >>> opt = GoLoreSGD([{"params": [lin.weight], "rank": 4}], lr=1e-2, momentum=0.9)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        rand_ratio: float = 0.0,
        total_steps: int | None = None,
        rand_step: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
            rand_ratio=rand_ratio,
            total_steps=total_steps,
            rand_step=rand_step,
            **kwargs,
        )
