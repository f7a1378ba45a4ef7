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
  rank (small, and its change of basis mixes columns). Projectors: the rank's rows of ``P``, the whole
  (r, n) ``Q``. An SVD refresh gathers the gradient of one matrix at a time
  (:func:`loralab.core.sharding.gather_rows`) and every rank keeps its rows of ``P`` (``Q`` whole),
  broadcast from the first rank so replicas agree bit for bit. The result equals one process's up
  to the order of the sums. The 8-bit and Adafactor forms refuse FSDP2.

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

import itertools
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from loralab.core import sharding
from loralab.core.adamw import adamw_direction, check_adamw_hparams
from loralab.core.zero_views import ZeroPartition, full_shape, is_zero_partition, zero_partition
from loralab.golore import batching
from loralab.golore.projector import (
    PROJ_TYPES,
    PROJECTIONS,
    Projection,
    Side,
    effective_rank,
    new_projector,
    project_back_shard,
    project_shard,
    projector_side,
    reproject_first_moment,
    reproject_second_moment,
    shard_projector,
    transition_matrices,
    transition_shard,
)

# (tensor to update: this rank's rows under FSDP2, low-rank or plain gradient, state, side or None
# for a parameter not projected, the parameter as the optimizer holds it: a DTensor under FSDP2)
Item = tuple[Tensor, Tensor, dict[str, Any], Side | None, Tensor]

__all__ = ["GaLoreAdamW", "GaLoreSGD", "GoLoreAdamW", "GoLoreSGD", "SubspaceOptimizer"]

logger = logging.getLogger(__name__)

SECOND_MOMENT_POLICIES = ("keep", "project")
SVD_METHODS = ("auto", "full", "randomized")

_SUBSPACE_KEYS: dict[str, Any] = dict(
    rank=None,
    update_proj_gap=200,
    scale=0.25,
    proj_type="std",
    projection="svd",
    rand_step=None,
    rand_ratio=None,
    total_steps=None,
    reproject_moments=True,
    second_moment="keep",
    svd_method="auto",
    seed=0,
)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def resolve_rand_step(group: dict[str, Any]) -> int | None:
    """The optimizer step (0-based) from which projector refreshes draw random matrices, or ``None``.

    Convention of the GoLore paper and code (``use_rand = step / total >= rand_ratio``):
    ``rand_ratio`` is the fraction of training that uses SVD projectors; ``rand_ratio=0.8`` is SVD
    for the first 80 % of ``total_steps`` and random for the last 20 %, ``0.0`` random from the
    start, ``1.0`` never random (GaLore). An explicit ``rand_step`` wins over ``rand_ratio``.
    """
    if group.get("projection") == "random":
        return 0
    if group.get("rand_step") is not None:
        return int(group["rand_step"])
    ratio = group.get("rand_ratio")
    if ratio is None:
        return None
    if ratio == 0:
        return 0
    return math.ceil(ratio * group["total_steps"])


def _validate_subspace_group(group: dict[str, Any], where: str) -> None:
    rank = group["rank"]
    if rank is None:
        return
    if not _is_int(rank) or rank < 1:
        raise ValueError(
            f"{where}: rank must be a positive int (or None for no projection), got {rank!r}"
        )
    gap = group["update_proj_gap"]
    if not _is_int(gap) or gap < 1:
        raise ValueError(f"{where}: update_proj_gap must be a positive int, got {gap!r}")
    scale = group["scale"]
    if (
        not isinstance(scale, (int, float))
        or isinstance(scale, bool)
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise ValueError(f"{where}: scale must be a positive finite number, got {scale!r}")
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(
            f"{where}: proj_type must be one of {PROJ_TYPES}, got {group['proj_type']!r}"
        )
    if group["projection"] not in PROJECTIONS:
        raise ValueError(
            f"{where}: projection must be one of {PROJECTIONS}, got {group['projection']!r}"
        )
    if group["rand_step"] is not None and (
        not _is_int(group["rand_step"]) or group["rand_step"] < 0
    ):
        raise ValueError(
            f"{where}: rand_step must be an int >= 0 or None, got {group['rand_step']!r}"
        )
    ratio = group["rand_ratio"]
    if ratio is not None:
        if (
            not isinstance(ratio, (int, float))
            or isinstance(ratio, bool)
            or not 0.0 <= ratio <= 1.0
        ):
            raise ValueError(
                f"{where}: rand_ratio must be in [0, 1] (fraction of steps that use SVD projectors), got {ratio!r}"
            )
        if ratio > 0 and group["rand_step"] is None:
            total = group["total_steps"]
            if not _is_int(total) or total < 1:
                raise ValueError(
                    f"{where}: rand_ratio={ratio} needs total_steps (a positive int, the planned number of optimizer steps) "
                    f"to know when to switch to random projections, got total_steps={total!r}; or pass rand_step"
                )
    if group["second_moment"] not in SECOND_MOMENT_POLICIES:
        raise ValueError(
            f"{where}: second_moment must be one of {SECOND_MOMENT_POLICIES}, got {group['second_moment']!r}"
        )
    if group["svd_method"] not in SVD_METHODS:
        raise ValueError(
            f"{where}: svd_method must be one of {SVD_METHODS}, got {group['svd_method']!r}"
        )
    if not _is_int(group["seed"]):
        raise ValueError(f"{where}: seed must be an int, got {group['seed']!r}")


class SubspaceOptimizer(Optimizer):
    """Shared machinery: param-group validation, projector refresh and moment re-projection.

    Subclasses define ``_base_defaults``/``_validate_base`` and ``_update(group, items)`` where
    ``items`` are ``(param, low_rank_grad, state, side_or_None, like)`` tuples (``like``: the
    parameter as the optimizer holds it, passed to :meth:`_full_update`).
    """

    _moment_keys: tuple[str, ...] = ()
    # whether _update works on each rank's rows of an FSDP2-sharded parameter (elementwise maths only)
    # (the others step each FSDP2-sharded parameter whole on an owner rank: _step_fsdp_owners)
    _steps_row_shards: bool = True
    # whether a step is w <- a·w + D with D independent of w (a weight-free update, then
    # _apply_delta_): under ZeRO the owner rank then needs the gradient whole, never the weight
    _affine_in_weight: bool = False
    # whether a matrix DeepSpeed ZeRO splits over ranks can step by the projection algebra on each
    # rank's elements (_step_split_matrices): the update is the back-projection of a low-rank
    # direction (_low_rank_directions) plus element-wise terms (_preprocess_grad, _apply_delta_)
    _steps_split_elements: bool = False

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"{type(self).__name__} param group {len(self.param_groups) - 1}"
        self._validate_base(group, where)
        _validate_subspace_group(group, where)
        # Remember each group's index and, for groups with matrices to project, its parameters:
        # DeepSpeed ZeRO-1/2 later replaces them by one flat fp32 partition and steps one group at a
        # time through a one-element param_groups list (so the enumerate index is not the group's).
        # full_shape: a model built under deepspeed.zero.Init holds empty ZeRO-3 parameters
        has_matrices = group["rank"] is not None and any(
            len(full_shape(p)) == 2 for p in group["params"]
        )
        self.__dict__.setdefault("_group_info", {})[id(group)] = (
            len(self.param_groups) - 1,
            list(group["params"]) if has_matrices else None,
        )

    def _validate_base(
        self, group: dict[str, Any], where: str
    ) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but state tensors keep their saved dtype.

        torch casts every floating state tensor to its parameter's dtype; our moments and projectors
        are float32 for bf16/fp16 parameters, and a round trip through bf16 would lose precision
        (and exact resume). A state saved for other shapes, another ``rank`` or ``proj_type`` is
        refused (:func:`loralab.core.optim_state.check_state_dict`), naming the parameter.
        """
        from loralab.core.optim_state import check_state_dict

        def expected(p: Tensor, group: Any) -> dict[str, tuple[int, ...]]:
            # a projected matrix keeps (r, n) / (m, r) / (r, r) moments and (m, r) / (r, n) projectors
            # under FSDP2 each rank keeps the state of its rows only (m_k of the m rows), and of its
            # column block of a left projection's (r, n) moments (n_k of the n columns)
            # (the forms that step a sharded parameter whole on its owner keep whole-tensor state)
            moments = ("exp_avg", "exp_avg_sq", "momentum_buffer")
            by_rows = self._steps_row_shards
            if group["rank"] is None or p.dim() != 2:
                shape = sharding.local_tensor(p).shape if by_rows else p.shape
                return dict.fromkeys(moments, tuple(shape))
            n = p.shape[1]
            rows = sharding.rows_of(p) if by_rows else slice(0, p.shape[0])
            m_k = rows.stop - rows.start
            side = projector_side(p.shape, group["proj_type"])
            r = effective_rank(p.shape, group["rank"], side)
            cols = sharding.cols_of(p, n) if by_rows else slice(0, n)
            n_k = cols.stop - cols.start
            low = {"left": (r, n_k), "right": (m_k, r), "full": (r, r)}[side]
            out: dict[str, tuple[int, ...]] = dict.fromkeys(moments, low)
            if side in ("left", "full"):
                out["proj_left"] = (m_k, r)
            if side in ("right", "full"):
                out["proj_right"] = (r, n)
            return out

        check_state_dict(self, state_dict, expected, settings=("rank", "proj_type"))
        # torch rebuilds the param-group dicts: carry our per-group bookkeeping over, in order
        infos = [self.__dict__.get("_group_info", {}).get(id(g)) for g in self.param_groups]
        super().load_state_dict(state_dict)
        self._group_info = {
            id(g): info for g, info in zip(self.param_groups, infos) if info is not None
        }
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        ours = [p for g in self.param_groups for p in g["params"]]
        for sid, p in zip(saved_ids, ours):
            for key, value in state_dict["state"].get(sid, {}).items():
                # every state tensor, not only the floating ones: torch casts all of them to the
                # parameter's dtype, which turned the 8-bit forms' uint8 moments into float32 codes
                if key != "step" and isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)

    # ---------------------------------------------------------------- projector
    def _param_seed(
        self, group_index: int, param_index: int, group: dict[str, Any], step: int
    ) -> int:
        # Deterministic per (seed, group, parameter, step): resume draws the same random projector.
        return (
            int(group["seed"]) * 1_000_003 + group_index * 10_007 + param_index
        ) * 1_000_033 + step

    def _projector_mats(self, state: dict[str, Any], side: Side) -> tuple[Tensor, ...] | None:
        if side == "left":
            return (state["proj_left"],) if "proj_left" in state else None
        if side == "right":
            return (state["proj_right"],) if "proj_right" in state else None
        if "proj_left" in state and "proj_right" in state:
            return (state["proj_left"], state["proj_right"])
        return None

    def _store_mats(self, state: dict[str, Any], side: Side, mats: tuple[Tensor, ...]) -> None:
        if side == "left":
            state["proj_left"] = mats[0]
        elif side == "right":
            state["proj_right"] = mats[0]
        else:
            state["proj_left"], state["proj_right"] = mats

    def _refresh(
        self,
        p: Tensor,
        grad: Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        gi: int,
        pi: int,
        side: Side,
        step: int,
    ) -> None:
        """A new projector for ``p`` from ``grad`` (this rank's rows of the gradient when ``p`` is
        FSDP2-sharded), the moments carried into its basis, stored as this rank keeps it."""
        if _projection_kind(group, step) == "svd":
            # the only whole matrix a sharded step builds: one gradient at a time, freed on return
            source = sharding.gather_rows(p, grad)
        else:
            # a random projector reads only the shape, dtype and device: no gather, no (m, n) memory
            source = grad.new_empty(()).expand(tuple(p.shape))
        new = self._draw_projector(source, group, gi, pi, side, step)
        del source
        for mat in new:  # replicas of one projector must agree bit for bit (seeded draws too)
            sharding.broadcast_from_first_(mat, p)
        new = shard_projector(new, side, p)
        old = self._projector_mats(state, side)
        if old is not None and group["reproject_moments"]:
            self._reproject_moments(state, transition_shard(old, new, side, p), side, group)
        self._store_mats(state, side, new)

    def _draw_projector(
        self, source: Tensor, group: dict[str, Any], gi: int, pi: int, side: Side, step: int
    ) -> tuple[Tensor, ...]:
        """The whole new projector of parameter ``pi`` of group ``gi`` at ``step``: from the whole
        gradient ``source`` (SVD) or, for a random one, from its shape alone (seeded per parameter
        and step, so every rank and a resumed run draw the same)."""
        gen = torch.Generator().manual_seed(self._param_seed(gi, pi, group, step))
        dtype = torch.float32 if source.dtype in (torch.bfloat16, torch.float16) else source.dtype
        try:
            return new_projector(
                source,
                group["rank"],
                side,
                _projection_kind(group, step),
                generator=gen,
                svd_method=group["svd_method"],
                dtype=dtype,
            )
        except FloatingPointError as e:
            raise FloatingPointError(
                f"{type(self).__name__}: parameter {pi} of param group {gi} (shape {tuple(source.shape)}) at step {step}: {e}"
            ) from e

    def _reproject_moments(
        self, state: dict[str, Any], trans: tuple[Tensor, ...], side: Side, group: dict[str, Any]
    ) -> None:
        """Carry the low-rank moments into the new basis (subclasses with other state layouts override)."""
        for key in self._moment_keys:
            if key == "exp_avg_sq":
                if group["second_moment"] == "project" and key in state:
                    state[key].copy_(reproject_second_moment(state[key], trans, side))
            elif key in state:
                # copy_ into the stored tensor: re-binding a local name (GoLore's golore_adamw)
                # silently leaves the state in the old basis.
                state[key].copy_(reproject_first_moment(state[key], trans, side))

    # ---------------------------------------------------------------- stepping
    def _group_index(self, group: dict[str, Any], default: int) -> int:
        info = self.__dict__.get("_group_info", {}).get(id(group))
        return default if info is None else info[0]

    def _flattened_originals(self, group: dict[str, Any]) -> list[Tensor] | None:
        """The group's original matrices when DeepSpeed ZeRO replaced them by a flat partition, else None."""
        info = self.__dict__.get("_group_info", {}).get(id(group))
        if info is None or info[1] is None:
            return None
        # ZeRO-3 empties the lists of the groups it is not stepping: nothing to do for those
        if not is_zero_partition(group["params"], {id(p) for p in info[1]}):
            return None
        return info[1]

    def _prepare_item(
        self,
        p: Tensor,
        grad: Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        gi: int,
        pi: int,
        *,
        project: bool = True,
        step: int | None = None,
    ) -> Item:
        """``(tensor to update, low-rank or plain gradient, state, side, p)`` for one parameter.

        Under FSDP2 the tensor to update and the gradient are this rank's rows (plain tensors sharing
        the ``DTensor``'s storage), so the state and the elementwise maths cover the shard only; the
        projection of a matrix uses the row-shard algebra (:func:`project_shard`, and
        :func:`project_back_shard` given ``p``, the sharded parameter, in :meth:`_full_update`).
        ``project=False`` leaves the gradient whole (:meth:`_project_items` projects many at once);
        ``step``: the state's step count when the caller has read it."""
        if grad.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients (param group {gi}, shape {tuple(p.shape)})"
            )
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
        if step is None:
            step = int(state["step"].item())
        target = sharding.local_tensor(p)
        grad = self._preprocess_grad(target, sharding.local_tensor(grad), group)
        side: Side | None = None
        if group["rank"] is not None and p.dim() == 2:
            side = projector_side(p.shape, group["proj_type"])
            if step % group["update_proj_gap"] == 0 or self._projector_mats(state, side) is None:
                self._refresh(p, grad, state, group, gi, pi, side, step)
        item = (target, grad, state, side, p)
        return self._project_items([item])[0] if project else item

    def _project_items(self, items: list[Item]) -> list[Item]:
        """Project the gradients of ``items`` (from :meth:`_prepare_item` with ``project=False``).

        Small unsharded matrices of one shape go through one ``bmm`` (:mod:`loralab.golore.batching`;
        the path depends on the matrix's size only, so one item or many give the same numbers);
        the others one at a time with the row-shard algebra (:func:`project_shard`)."""
        out = list(items)
        batches: dict[tuple[Any, ...], list[tuple[int, Tensor]]] = {}  # key: (index, projector)
        for k, (target, grad, state, side, like) in enumerate(items):
            if side is None:
                continue
            # _prepare_item refreshed when there was none: every projected item has a projector
            mats = cast(tuple[Tensor, ...], self._projector_mats(state, side))
            if (
                batching.batchable(grad, side)
                and not sharding.is_dtensor(like)
                and grad.dtype == mats[0].dtype
            ):
                key = (side, tuple(grad.shape), tuple(mats[0].shape), grad.dtype, grad.device)
                batches.setdefault(key, []).append((k, mats[0]))
            else:
                out[k] = (target, project_shard(grad, mats, side, like), state, side, like)
        for (side, shape, *_), rows in batches.items():
            for part in batching.chunks(len(rows), shape[0] * shape[1]):
                chunk, mats_ = zip(*rows[part])
                lows = batching.project_batch([items[k][1] for k in chunk], mats_, side)
                for k, low in zip(chunk, lows):
                    target, _grad, state, _side, like = items[k]
                    out[k] = (target, low, state, side, like)
        return out

    def _gather(
        self, group: dict[str, Any], gi: int, params: Iterable[Tensor] | None = None
    ) -> list[Item]:
        index = {id(p): i for i, p in enumerate(group["params"])}
        todo = [p for p in (group["params"] if params is None else params) if p.grad is not None]
        states = [self.state[p] for p in todo]
        for state in states:
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
        # every step count in one read: a read per parameter is a dispatch each, which showed in
        # GPU profiles of small models
        steps = _read_steps([s["step"] for s in states]) if states else []
        items = [
            self._prepare_item(
                p,
                cast(Tensor, p.grad),
                state,
                group,
                gi,
                index[id(p)],
                project=False,
                step=int(step),
            )
            for p, state, step in zip(todo, states, steps)
        ]
        return self._project_items(items)

    def _step_zero_partition(self, group: dict[str, Any], gi: int, originals: list[Tensor]) -> None:
        """One step of a group whose parameters DeepSpeed ZeRO (stage 1, 2 or 3) replaced by this
        rank's flat fp32 partition (:mod:`loralab.core.zero_views` finds each parameter in it).

        - A weight matrix to project that one rank holds whole (most matrices under ZeRO-1/2) is
          updated on that rank, with no communication. (AdamW, :attr:`_affine_in_weight`, computes
          the weight-free update ``D`` of ``w ← a·w + D`` and applies it with the decay.)
        - A matrix split over ranks (every matrix under ZeRO-3) steps, in the AdamW and SGD forms,
          by the projection algebra on each rank's elements (:meth:`_step_split_matrices`): only
          low-rank numbers move between projector refreshes, and each rank keeps the state of its
          own rows or columns. The 8-bit and Adafactor forms, whose states need whole tensors, give
          it one **owner rank** (the least loaded by elements, the same on every rank): its gradient
          and master weight are gathered there (one matrix at a time, never all-gathered), the owner
          runs the ordinary update with the state it alone keeps, and the new values are scattered.
        - Vectors step element-wise on this rank's elements (the 8-bit and Adafactor forms: on an
          owner too).

        Every state lives in the partition's state under ``"param{i}.<key>"`` (tensors only, so
        DeepSpeed's checkpoints keep it), so the optimizer state is split over the ranks as ZeRO
        splits any other. A projector an owner cannot compute (a non-finite gradient) is raised on
        every rank. The result equals one process's up to the order of the sums; random projectors
        are seeded per parameter as in one process.
        """
        where = f"{type(self).__name__} param group {gi}"
        if len(group["params"]) != 1 or group["params"][0].dim() != 1:
            raise RuntimeError(
                f"{where}: had 2-D weights to project but now holds {[tuple(p.shape) for p in group['params']][:3]}; "
                "expected DeepSpeed ZeRO's single flat partition. Another wrapper replaced the parameters: "
                "use DDP, FSDP2 or DeepSpeed ZeRO."
            )
        flat = group["params"][0]
        if flat.grad is None:
            return
        grad = flat.grad
        zp = zero_partition(originals, flat, where)
        state = self.state[flat]
        # the element-wise forms step vectors on each rank's elements; 8-bit block-wise states and
        # Adafactor's RMS need every tensor whole: all of theirs go to an owner
        owners = _owners(zp, group, every=not self._steps_row_shards)

        def substate(prefix: str) -> dict[str, Any]:
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

        def keep(prefix: str, sub: dict[str, Any]) -> None:
            for k, v in sub.items():
                state[prefix + k] = v

        split = [pc for pc in zp.pieces if self._steps_split(zp, pc, group)]
        refresh_now = self._check_owned_state(zp, state, owners, gi, where, split, group)
        if split:
            self._step_split_matrices(zp, state, split, owners, group, gi, refresh_now)
        # the owner's weight-free update: the decay is applied by every rank to its elements
        weight_free = {**group, "weight_decay": 0.0}
        done = {id(pc.param) for pc in split}

        # an owner's failed projector (a non-finite gradient) is raised on every rank after the loop:
        # raised on the owner alone, it would leave the others waiting in the next collective
        failed: list[FloatingPointError] = []
        for pc in zp.pieces:
            prefix = f"param{pc.index}."
            owner = owners.get(id(pc.param))
            if id(pc.param) in done:
                continue
            if owner is None:  # a vector: element-wise on this rank's elements, in place
                if not zp.holds(pc.param):
                    continue
                sub = substate(prefix)
                local, local_grad = zp.local(flat, pc.param), zp.local(grad, pc.param)
                self._update(
                    group, [self._prepare_item(local, local_grad, sub, group, gi, pc.index)]
                )
                keep(prefix, sub)
                continue
            if self._affine_in_weight:
                whole_grad = zp.gather_to(grad, pc.param, owner)
                delta = None
                if whole_grad is not None:  # the owner: D, the update of a zero weight
                    sub = substate(prefix)
                    delta = torch.zeros(pc.shape, dtype=flat.dtype, device=flat.device)
                    try:
                        item = self._prepare_item(delta, whole_grad, sub, weight_free, gi, pc.index)
                        self._update(weight_free, [item])
                        del item
                    except FloatingPointError as e:
                        failed.append(e)
                        delta.zero_()
                    keep(prefix, sub)
                    del whole_grad
                mine = zp.scatter(pc.param, delta, owner, flat.dtype)
                del delta
                if mine.numel():
                    self._apply_delta_(zp.local(flat, pc.param), mine, group)
                continue
            weight = zp.gather_to(flat, pc.param, owner)
            whole_grad = zp.gather_to(grad, pc.param, owner)
            if weight is not None and whole_grad is not None:  # the owner
                sub = substate(prefix)
                try:
                    item = self._prepare_item(weight, whole_grad, sub, group, gi, pc.index)
                    self._update(group, [item])
                    del item
                except FloatingPointError as e:
                    failed.append(e)
                keep(prefix, sub)
                del whole_grad
            zp.scatter_from_(flat, pc.param, weight, owner)
            # free the owner's whole matrix now: bound until the next gather returned, it would make
            # two whole matrices at once on the owner of consecutive parameters
            del weight
        if not zp.all_agree(not failed):
            raise failed[0] if failed else _failed_elsewhere(where)

    def _steps_split(self, zp: ZeroPartition, pc: Any, group: dict[str, Any]) -> bool:
        """Whether the ZeRO piece ``pc`` steps by :meth:`_step_split_matrices`: a matrix to project,
        split over ranks, in a form whose update is a back-projected low-rank direction plus
        element-wise terms (AdamW, SGD)."""
        return (
            self._steps_split_elements
            and zp.world > 1
            and group["rank"] is not None
            and len(pc.shape) == 2
            and pc.numel > 0
            and zp.sole_holder(pc.param) is None
        )

    def _split_layout(
        self, zp: ZeroPartition, pc: Any, group: dict[str, Any]
    ) -> tuple[Side, int, dict[str, tuple[int, ...]]]:
        """``(side, r, {state key: shape on this rank})`` of a matrix that
        :meth:`_step_split_matrices` steps: a right projection keeps the whole ``Q`` (r, n) and the
        moments of the rows this rank touches (``R = G·Qᵀ`` row by row); a left one the same rows of
        ``P`` and the moments of a column block of ``R = Pᵀ·G`` (:func:`block_of` over the world,
        on every rank, holder or not); a two-sided one ``P``'s rows, the whole ``Q`` and the (r, r)
        moments, on each rank holding part of the matrix. Moments: the form's
        :attr:`_moment_keys`."""
        n = pc.shape[1]
        side = projector_side(pc.shape, group["proj_type"])
        r = effective_rank(pc.shape, group["rank"], side)
        rows = zp.row_span(pc.param)
        m_k = rows.stop - rows.start
        out: dict[str, tuple[int, ...]] = {}
        if side == "right" and m_k:
            out = {"proj_right": (r, n), **dict.fromkeys(self._moment_keys, (m_k, r))}
        elif side == "full" and m_k:
            out = {"proj_left": (m_k, r), "proj_right": (r, n)}
            out.update(dict.fromkeys(self._moment_keys, (r, r)))
        elif side == "left":
            cols = sharding.block_of(n, zp.world, zp.rank)
            n_k = cols.stop - cols.start
            if m_k:
                out["proj_left"] = (m_k, r)
            if n_k:
                out.update(dict.fromkeys(self._moment_keys, (r, n_k)))
        return side, r, out

    def _step_split_matrices(
        self,
        zp: ZeroPartition,
        state: dict[str, Any],
        pieces: list[Any],
        owners: dict[int, int],
        group: dict[str, Any],
        gi: int,
        refresh_now: set[int],
    ) -> None:
        """One step of the matrices of a ZeRO partition that are split over ranks, by the
        projection algebra on each rank's elements: no matrix is gathered or scattered whole, except
        the gradient to its owner at an SVD refresh.

        Each rank places its elements of the gradient ``G`` in the rows they touch
        (:meth:`~loralab.core.zero_views.ZeroPartition.row_block`, zeros elsewhere); these blocks
        sum over the ranks to ``G``. A right projection ``R = G·Qᵀ`` (m, r) is then computed row by
        row with no communication but the rows a rank boundary splits (their partial products
        all-reduced, ``r`` numbers each); the rows' Adam moments live on the ranks that touch them
        (a split row on both, computed alike). A left projection ``R = Pᵀ·G = Σ_k P_kᵀ·G_k`` (r, n)
        is reduce-scattered by column blocks, Adam runs on each rank's block, and the direction
        ``N`` is all-gathered back (``r·n`` numbers each way instead of ``m·n``). Each rank then adds
        ``D = −lr·scale·(P_k·N)`` or ``(N_k·Q)`` on its own elements and decays them
        (:meth:`_apply_delta_`). Every collective takes all split matrices of the group at once.

        A refresh draws the projector on the matrix's owner (the whole gradient gathered there for
        an SVD; a random one from the seed) and broadcasts it; the moments move into the new basis
        with ``C = P_newᵀ·P_old`` summed over each row's one rank, or ``Q_old·Q_newᵀ`` locally.
        ``refresh_now``: the matrices (by index) to refresh out of turn (:meth:`_check_owned_state`).
        The result equals one process's up to the order of the sums."""
        flat = zp.flat
        grad = cast(Tensor, flat.grad)
        # this rank's elements of each gradient, with the form's element-wise terms (SGD's coupled
        # weight decay) as one process adds them before projecting
        local_grads = [
            self._preprocess_grad(zp.local(flat, pc.param), zp.local(grad, pc.param), group)
            for pc in pieces
        ]
        subs = []
        for pc in pieces:
            prefix = f"param{pc.index}."
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if "step" not in sub:
                sub["step"] = torch.tensor(0.0)
            subs.append(sub)
        layouts = [self._split_layout(zp, pc, group) for pc in pieces]
        steps = _read_steps([sub["step"] for sub in subs])
        for k, (pc, sub, (side, r, _)) in enumerate(zip(pieces, subs, layouts)):
            if steps[k] % group["update_proj_gap"] == 0 or pc.index in refresh_now:
                owner = owners[id(pc.param)]
                self._refresh_split(
                    zp, pc, local_grads[k], sub, side, r, owner, group, gi, steps[k]
                )

        # the projected gradients: this rank's rows (right) or column block (left) of R
        lows: list[Tensor | None] = [None] * len(pieces)
        shared: list[tuple[int, int]] = []  # (piece, row) of the right projections' split rows
        left = [k for k, (side, _r, _l) in enumerate(layouts) if side == "left"]
        slot = {k: j for j, k in enumerate(left)}  # each left matrix's place in the packed buffers
        blocks = _ColumnBlocks(
            [pieces[k].shape[1] for k in left], [layouts[k][1] for k in left], zp.world
        )
        send = flat.new_zeros(blocks.size * zp.world) if left else None
        # two-sided: the (r, r) partial products P_kᵀ·G_k·Qᵀ of every such matrix, one all-reduce
        full = [k for k, (side, _r, _l) in enumerate(layouts) if side == "full"]
        offsets = list(itertools.accumulate((layouts[k][1] ** 2 for k in full), initial=0))
        at = dict(zip(full, offsets))
        squares = flat.new_zeros(offsets[-1])
        for k, (pc, sub, (side, r, _l)) in enumerate(zip(pieces, subs, layouts)):
            if side == "full":
                if zp.holds(pc.param):
                    p_rows, q = sub["proj_left"], sub["proj_right"]
                    block = zp.row_block(local_grads[k], pc.param).to(q.dtype)
                    squares[at[k] : at[k] + r * r] = (p_rows.T @ block @ q.T).reshape(-1)
            elif side == "right":
                shared += [(k, row) for row in zp.shared_rows(pc.param)]
                if zp.holds(pc.param):
                    q = sub["proj_right"]
                    lows[k] = zp.row_block(local_grads[k], pc.param).to(q.dtype) @ q.T
            elif zp.holds(pc.param):
                p_rows = sub["proj_left"]
                blocks.put_all(
                    cast(Tensor, send),
                    slot[k],
                    p_rows.T @ zp.row_block(local_grads[k], pc.param).to(p_rows.dtype),
                )
        del local_grads
        if shared:
            width = max(layouts[k][1] for k, _row in shared)
            buf = flat.new_zeros(len(shared), width)
            for j, (k, row) in enumerate(shared):
                rows = zp.row_span(pieces[k].param)
                if rows.start <= row < rows.stop:
                    low = cast(Tensor, lows[k])
                    buf[j, : low.shape[1]] = low[row - rows.start]
            zp.all_reduce_sum_(buf)
            for j, (k, row) in enumerate(shared):
                rows = zp.row_span(pieces[k].param)
                if rows.start <= row < rows.stop:
                    low = cast(Tensor, lows[k])
                    low[row - rows.start] = buf[j, : low.shape[1]]
        if left:
            mine = zp.reduce_scatter_sum(cast(Tensor, send))
            for j, k in enumerate(left):
                lows[k] = blocks.take(mine, j, zp.rank)
        if full:
            zp.all_reduce_sum_(squares)
            for k in full:
                if zp.holds(pieces[k].param):
                    r = layouts[k][1]
                    lows[k] = squares[at[k] : at[k] + r * r].view(r, r).clone()

        # the form's update on this rank's part of each R (step counts advance on every rank alike)
        counts = _count_steps(subs)
        todo = [k for k, low in enumerate(lows) if low is not None and low.numel()]
        found = self._low_rank_directions(
            group,
            [cast(Tensor, lows[k]) for k in todo],
            [subs[k] for k in todo],
            [counts[k] for k in todo],
        )
        dirs = dict(zip(todo, found))

        # back to each rank's elements: N of a left projection all-gathered from the column blocks
        whole_n: dict[int, Tensor] = {}
        if left:
            send = flat.new_zeros(blocks.size)
            for j, k in enumerate(left):
                if k in dirs:
                    blocks.put(send, j, dirs[k])
            every = zp.all_gather_flat(send)
            for j, k in enumerate(left):
                if zp.holds(pieces[k].param):
                    whole_n[k] = blocks.whole(every, j)
        for k, (pc, sub, (side, _r, _l)) in enumerate(zip(pieces, subs, layouts)):
            if zp.holds(pc.param):
                if side == "right":
                    block = dirs[k].to(sub["proj_right"].dtype) @ sub["proj_right"]
                elif side == "full":
                    p_rows, q = sub["proj_left"], sub["proj_right"]
                    block = p_rows @ dirs[k].to(q.dtype) @ q
                else:
                    block = sub["proj_left"] @ whole_n[k].to(sub["proj_left"].dtype)
                delta = zp.from_row_block(block, pc.param) * (-group["lr"] * group["scale"])
                self._apply_delta_(zp.local(flat, pc.param), delta.to(flat.dtype), group)
            for key, value in sub.items():
                state[f"param{pc.index}.{key}"] = value

    def _refresh_split(
        self,
        zp: ZeroPartition,
        pc: Any,
        local_grad: Tensor,
        sub: dict[str, Any],
        side: Side,
        r: int,
        owner: int,
        group: dict[str, Any],
        gi: int,
        step: int,
    ) -> None:
        """A new projector for a matrix :meth:`_step_split_matrices` steps (a collective: every
        rank, every such matrix, in order) from this rank's elements ``local_grad`` of its
        gradient: drawn on ``owner``, broadcast, kept as :meth:`_split_layout` says, the moments
        carried into its basis."""
        flat = zp.flat
        svd = _projection_kind(group, step) == "svd"
        whole = zp.gather_elements_to(local_grad, pc.param, owner) if svd else None
        m, n = pc.shape
        dtype = torch.float32 if flat.dtype in (torch.bfloat16, torch.float16) else flat.dtype
        shapes = {"left": [(m, r)], "right": [(r, n)], "full": [(m, r), (r, n)]}[side]
        mats = [torch.empty(shape, dtype=dtype, device=flat.device) for shape in shapes]
        failed = None
        if zp.rank == owner:
            source = whole if whole is not None else flat.new_empty(()).expand(m, n)
            try:
                drawn = self._draw_projector(source, group, gi, pc.index, side, step)
                for mat, value in zip(mats, drawn):
                    mat.copy_(value)
            except FloatingPointError as e:
                failed = e
        del whole
        if not zp.all_agree(failed is None):  # every rank raises, none waits for the broadcast
            raise failed or _failed_elsewhere(
                f"{type(self).__name__} param group {gi}, parameter {pc.index} at step {step}"
            )
        for mat in mats:
            zp.broadcast_(mat, owner)
        rows = zp.row_span(pc.param)
        # P (left, full) by this rank's rows; Q (right, full) whole
        new = tuple(
            mat[rows].contiguous() if j == 0 and side != "right" else mat
            for j, mat in enumerate(mats)
        )
        old = self._projector_mats(sub, side)
        if group["reproject_moments"] and step > 0:
            trans: tuple[Tensor, ...] = ()
            if side != "right":
                # C = P_newᵀ·P_old over all rows: each row counted on the one rank holding its start
                first = zp.first_rows(pc.param)
                here = slice(first.start - rows.start, first.stop - rows.start)
                c = new[0].new_zeros(r, r)
                if old is not None and first.stop > first.start:
                    c += new[0][here].T @ old[0][here]
                trans = (zp.all_reduce_sum_(c),)
            if side != "left" and old is not None:  # D = Q_old·Q_newᵀ: Q is whole on a holder
                trans += transition_matrices((old[-1],), (new[-1],), "right")
            if len(trans) == len(new):  # a two-sided one's non-holders keep no moments
                self._reproject_moments(sub, trans, side, group)
        if rows.stop > rows.start:
            self._store_mats(sub, side, new)

    def _step_fsdp_owners(
        self, group: dict[str, Any], gi: int, params: Iterable[Tensor] | None = None
    ) -> None:
        """One step of a group with FSDP2-sharded parameters for the forms whose update needs whole
        tensors (8-bit block-wise states, Adafactor's factored moments and RMS: ``_steps_row_shards``
        false), the same numbers as one process.

        Every sharded parameter has one **owner rank** (the least loaded by elements, in parameter
        order: the same on every rank). Its weight and gradient are all-gathered (one parameter at a
        time), the owner runs the ordinary update on the whole tensor with the state it alone keeps
        (plain tensors: save each rank's ``state_dict``, as the runners do, not a
        ``torch.distributed.checkpoint`` of the optimizer), and broadcasts the new values, of which
        every rank keeps its rows. Collectives over the parameter's mesh: every rank steps the same
        parameters in the same order. Unsharded parameters step as usual.
        """
        index = {id(p): i for i, p in enumerate(group["params"])}
        owners = self._fsdp_owners(group)
        plain = []
        # an owner's failed projector (a non-finite gradient) is raised on every rank after the loop
        failed: list[FloatingPointError] = []
        stepped: list[Tensor] = []
        for p in group["params"] if params is None else params:
            if p.grad is None:
                continue
            if not sharding.is_sharded(p):
                plain.append(p)
                continue
            mesh = cast(Any, p).device_mesh
            owner = owners[id(p)]
            weight = sharding.whole(p.detach())
            whole_grad = sharding.whole(p.grad)
            if mesh.get_local_rank() == owner:
                try:
                    item = self._prepare_item(
                        weight, whole_grad, self.state[p], group, gi, index[id(p)]
                    )
                    self._update(group, [item])
                    del item
                except FloatingPointError as e:
                    failed.append(e)
            del whole_grad
            torch.distributed.broadcast(weight, group=mesh.get_group(), group_src=owner)
            sharding.write_rows_(p, weight)
            stepped.append(p)
            del weight
        if not sharding.all_ranks_agree(not failed, stepped):
            raise (
                failed[0]
                if failed
                else _failed_elsewhere(f"{type(self).__name__} param group {gi}")
            )
        if plain:
            items = self._gather(group, gi, plain)
            if items:
                self._update(group, items)

    def _fsdp_owners(self, group: dict[str, Any]) -> dict[int, int]:
        """``{id(p): mesh rank}`` for the group's sharded parameters (see :meth:`_step_fsdp_owners`)."""
        by_world: dict[int, list[tuple[int, int, int | None]]] = {}
        for p in group["params"]:
            if sharding.is_sharded(p):
                world = cast(Any, p).device_mesh.size()
                by_world.setdefault(world, []).append((id(p), p.numel(), None))
        owners: dict[int, int] = {}
        for world, items in by_world.items():
            owners.update(_least_loaded_owners(items, world))
        return owners

    def _check_owned_state(
        self,
        zp: ZeroPartition,
        state: dict[str, Any],
        owners: dict[int, int],
        gi: int,
        where: str,
        split: list[Any],
        group: dict[str, Any],
    ) -> set[int]:
        """Refuse, on every rank, a partition state laid out for another assignment: one holding the
        low-rank state of matrices another rank updates now, or, for the matrices split over ranks
        (:meth:`_step_split_matrices`), state of other shapes than this rank keeps (a checkpoint of
        another owner assignment or of loralab-golore before 2026-12-05, which kept a split matrix's
        state whole on its owner). Stepping on would silently restart those matrices' moments and
        projectors. Checked at each partition's first step of this optimizer object, on every rank at
        once (a collective; DeepSpeed loads a checkpoint into a new engine's optimizer before its
        first step, writing into the state in place).

        Returns the indices of the split matrices whose projector some rank holding part of them
        lacks (a fresh state, or one saved before its first refresh): refreshed out of turn. Only a
        partition's first step can find one (every holder keeps its projector from then on), so
        the collective that finds them runs once, here, not in every step."""
        checked = self.__dict__.setdefault("_owned_state_checked", set())
        # per partition: ZeRO-3 steps a group in sub-groups (sub_group_size), one partition each
        partition = (gi, zp.pieces[0].index if zp.pieces else -1)
        if partition in checked:
            return set()
        split_ids = {id(pc.param) for pc in split}
        foreign = [
            pc.index
            for pc in zp.pieces
            if id(pc.param) not in split_ids
            and owners.get(id(pc.param), zp.rank) != zp.rank
            and any(k.startswith(f"param{pc.index}.") for k in state)
        ]
        for pc in split:
            expected = self._split_layout(zp, pc, group)[2]
            prefix = f"param{pc.index}."
            for key, value in state.items():
                if key.startswith(prefix) and key[len(prefix) :] != "step":
                    shape = tuple(value.shape) if isinstance(value, Tensor) else None
                    if expected.get(key[len(prefix) :]) != shape:
                        foreign.append(pc.index)
                        break
        if not zp.all_agree(not foreign):
            raise RuntimeError(
                f"{where}: the optimizer state loaded on a rank holds the low-rank state of matrices "
                f"in another layout than this rank keeps ({'parameters ' + str(foreign[:5]) if foreign else 'on another rank'}): "
                "the checkpoint was saved with another owner assignment (an older loralab-golore or "
                "another DeepSpeed layout). Resume with the version and world size that saved it."
            )
        checked.add(partition)
        if not split:
            return set()
        lacking = []
        for pc in split:
            expected = self._split_layout(zp, pc, group)[2]
            prefix = f"param{pc.index}."
            lacking.append(any(k.startswith("proj") and prefix + k not in state for k in expected))
        flags = zp.all_reduce_sum_(
            torch.tensor(lacking, dtype=torch.float32, device=zp.flat.device)
        )
        return {pc.index for pc, n in zip(split, flags.tolist()) if n}

    def _apply_delta_(self, local: Tensor, delta: Tensor, group: dict[str, Any]) -> None:
        """``local ← a·local + delta`` (the form's element-wise decay around the update, as
        :meth:`_update` applies it) for this rank's elements of a matrix whose update ``delta`` its
        owner computed weight-free (:attr:`_affine_in_weight` forms) or the split step computed
        (:attr:`_steps_split_elements`)."""
        self._decay_([local], group, after=False)
        local.add_(delta)
        self._decay_([local], group, after=True)

    def _decay_(self, params: list[Tensor], group: dict[str, Any], *, after: bool) -> None:
        """The form's decoupled weight decay of ``params``, before (``after=False``) or after the
        update; none by default (SGD's decay is coupled: :meth:`_preprocess_grad`)."""

    def _preprocess_grad(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
        return grad

    def _full_update(
        self,
        p: Tensor,
        direction: Tensor,
        state: dict[str, Any],
        side: Side | None,
        group: dict[str, Any],
        like: Tensor | None = None,
    ) -> Tensor:
        """The full-space update of ``p`` (this rank's rows) for a low-rank ``direction``; ``like``:
        the parameter as the optimizer holds it (an FSDP2 ``DTensor``: a left projection's direction is
        a column block, all-gathered here), ``p`` when not given."""
        if side is None:
            return direction
        # side is set only for parameters projected (so given a projector) in this step
        mats = cast(tuple[Tensor, ...], self._projector_mats(state, side))
        return (
            project_back_shard(direction, mats, side, p if like is None else like) * group["scale"]
        )

    def _add_updates_(
        self, group: dict[str, Any], pairs: list[tuple[Item, Tensor]], alpha: float
    ) -> None:
        """``p += alpha · (full-space update of d)`` (:meth:`_full_update`) for each ``(item, d)``.

        Few kernels per step, no (m, n) temporary per matrix: small unsharded matrices of one shape
        take one ``bmm`` and one ``_foreach_add_`` (:mod:`loralab.golore.batching`), larger ones one
        ``addmm_`` each with the scale folded into ``alpha``, unprojected tensors one
        ``_foreach_add_``. Sharded rows (FSDP2), a dtype change and the two-sided projection take
        :meth:`_full_update`.
        """
        scaled = alpha * group["scale"]
        plain: tuple[list[Tensor], list[Tensor]] = ([], [])
        batches: dict[tuple[Any, ...], list[tuple[Tensor, Tensor, Tensor]]] = {}
        for (p, _g, state, side, like), d in pairs:
            if side is None and d.dtype == p.dtype:
                plain[0].append(p)
                plain[1].append(d)
                continue
            if side is not None and not sharding.is_dtensor(like):
                mats = cast(tuple[Tensor, ...], self._projector_mats(state, side))
                if p.dtype == mats[0].dtype == d.dtype and side != "full":
                    if batching.batchable(p, side):
                        key = (side, tuple(p.shape), tuple(mats[0].shape), p.dtype, p.device)
                        batches.setdefault(key, []).append((p, d, mats[0]))
                    elif side == "left":  # P·N
                        p.addmm_(mats[0], d, alpha=scaled)
                    else:  # N·Q
                        p.addmm_(d, mats[0], alpha=scaled)
                    continue
            full = self._full_update(p, d, state, side, group, like)
            p.add_(full if full.dtype == p.dtype else full.to(p.dtype), alpha=alpha)
        if plain[0]:
            torch._foreach_add_(plain[0], plain[1], alpha=alpha)
        for (side, shape, *_), rows in batches.items():
            for part in batching.chunks(len(rows), shape[0] * shape[1]):
                ps, ds, ms = zip(*rows[part])
                batching.add_back_batch_(ps, ds, ms, side, scaled)

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

    def _update(self, group: dict[str, Any], items: list[Item]) -> None:
        """One step of ``items`` (:meth:`_prepare_item`): the step counts advance, the form's
        directions (:meth:`_low_rank_directions`), ``p ← p − lr·(back-projected direction)`` with the
        form's decay around it (:meth:`_decay_`). Forms with other state (8-bit, Adafactor) override it."""
        states = [item[2] for item in items]
        dirs = self._low_rank_directions(
            group, [item[1] for item in items], states, _count_steps(states)
        )
        params = [item[0] for item in items]
        self._decay_(params, group, after=False)
        self._add_updates_(group, list(zip(items, dirs)), -group["lr"])
        self._decay_(params, group, after=True)

    def _low_rank_directions(
        self,
        group: dict[str, Any],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        steps: list[int],
    ) -> list[Tensor]:  # pragma: no cover - overridden by the _steps_split_elements forms
        """The directions ``d`` of the (low-rank or plain) gradients ``grads`` (the update is
        ``−lr·d`` back-projected and scaled), their ``states`` updated in place; ``steps``: each
        state's step count, already advanced for this step."""
        raise NotImplementedError


class _ColumnBlocks:
    """The packing of several (r_j, n_j) matrices into one flat buffer per rank, by column blocks
    (:func:`~loralab.core.sharding.block_of` of each matrix's columns over ``world`` ranks): rank
    ``k``'s region holds block ``k`` of every matrix, transposed (columns contiguous) and padded to
    ``⌈n_j / world⌉`` columns, so one reduce-scatter sums every matrix and hands each rank its
    blocks, and one all-gather brings every matrix back whole."""

    def __init__(self, ns: list[int], rs: list[int], world: int) -> None:
        self.ns, self.rs, self.world = ns, rs, world
        self.chunks = [-(-n // world) for n in ns]
        self.offsets = [0]
        for c, r in zip(self.chunks, rs):
            self.offsets.append(self.offsets[-1] + c * r)
        self.size = self.offsets[-1]  # one rank's region

    def _view(self, region: Tensor, j: int) -> Tensor:
        lo = self.offsets[j]
        return region[lo : lo + self.chunks[j] * self.rs[j]].view(self.chunks[j], self.rs[j])

    def put(self, region: Tensor, j: int, block: Tensor) -> None:
        """Write a rank's (r, n_k) column block of matrix ``j`` into that rank's ``region``."""
        self._view(region, j)[: block.shape[1]] = block.T

    def put_all(self, buf: Tensor, j: int, value: Tensor) -> None:
        """Write every rank's block of the whole (r, n) ``value`` of matrix ``j`` into ``buf`` (all
        ``world`` regions, in rank order)."""
        for k in range(self.world):
            cols = sharding.block_of(self.ns[j], self.world, k)
            region = buf[k * self.size : (k + 1) * self.size]
            self.put(region, j, value[:, cols])

    def take(self, region: Tensor, j: int, rank: int) -> Tensor:
        """The (r, n_k) block of matrix ``j`` that rank ``rank`` keeps, from its ``region``."""
        cols = sharding.block_of(self.ns[j], self.world, rank)
        return self._view(region, j)[: cols.stop - cols.start].T.contiguous()

    def whole(self, buf: Tensor, j: int) -> Tensor:
        """Matrix ``j`` whole (r, n) from every rank's region (an all-gathered ``buf``)."""
        parts = [
            self.take(buf[k * self.size : (k + 1) * self.size], j, k) for k in range(self.world)
        ]
        return torch.cat(parts, dim=1)


def _failed_elsewhere(where: str) -> FloatingPointError:
    """The error the other ranks raise when an owner rank could not compute a projector."""
    return FloatingPointError(
        f"{where}: a projector could not be computed on another rank (a non-finite gradient; that "
        "rank's error names the parameter and step). Lower the learning rate, clip gradients or "
        "check the data."
    )


def _projection_kind(group: dict[str, Any], step: int) -> Projection:
    """Which projector a refresh at ``step`` draws: random from the group's ``rand_step`` on, else SVD."""
    rand_step = resolve_rand_step(group)
    return "random" if rand_step is not None and step >= rand_step else "svd"


def _owners(zp: ZeroPartition, group: dict[str, Any], every: bool) -> dict[int, int]:
    """The rank that updates each projected matrix of a ZeRO partition (each parameter when
    ``every``): the rank that holds all of its elements when one does (no communication), else the
    least loaded one (:func:`_least_loaded_owners`)."""
    chosen = [pc for pc in zp.pieces if every or (group["rank"] is not None and len(pc.shape) == 2)]
    items = [(id(pc.param), pc.numel, zp.sole_holder(pc.param)) for pc in chosen]
    return _least_loaded_owners(items, zp.world)


def _least_loaded_owners(items: list[tuple[int, int, int | None]], world: int) -> dict[int, int]:
    """``{key: rank}`` for ``(key, elements, fixed rank or None)`` items: the fixed ones keep their rank
    (and count towards its load), the others go, in order, to the least loaded rank by elements so far
    (ties: the lowest rank). Deterministic: every rank computes the same."""
    load = [0] * world
    owners: dict[int, int] = {}
    for key, numel, fixed in items:
        if fixed is not None:
            owners[key] = fixed
            load[fixed] += numel
    for key, numel, fixed in items:
        if fixed is None:
            k = min(range(world), key=lambda r: (load[r], r))
            owners[key] = k
            load[k] += numel
    return owners


def _count_steps(states: list[dict[str, Any]]) -> list[int]:
    """Add one to each state's ``"step"`` and return the new counts, in one operation each (not one
    per parameter)."""
    if not states:
        return []
    steps = [st["step"] for st in states]
    torch._foreach_add_(steps, 1.0)
    return _read_steps(steps)


def _read_steps(steps: list[Tensor]) -> list[int]:
    """The values of 0-d step tensors: one read when they share a device and dtype (the usual CPU
    scalars), else one per tensor (an engine may have moved a loaded state)."""
    first = steps[0]
    if all(t.device == first.device and t.dtype == first.dtype for t in steps):
        return [int(v) for v in torch.stack(steps).tolist()]
    return [int(t.item()) for t in steps]


def _moment_dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype


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
                dt = _moment_dtype(g)
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
            g = g.to(_moment_dtype(g))
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
