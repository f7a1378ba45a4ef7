"""What every GaLore / GoLore optimizer shares: param-group validation, projector refresh, moment
re-projection, projection and the update, for parameters one process holds whole and for FSDP2's row
shards (the projection algebra on rows, :func:`loralab.golore.projector.project_shard`).

The optimizers themselves are in :mod:`loralab.golore.optimizer`; the steps of parameters an engine
splits otherwise in :mod:`loralab.golore.zero_split` (a matrix DeepSpeed ZeRO splits over ranks) and
:mod:`loralab.golore.sharded_steps` (ZeRO partitions, FSDP2 owner ranks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from loralab.core import sharding
from loralab.core.adamw import moment_dtype
from loralab.core.zero_views import full_shape
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
    transition_shard,
)

# (tensor to update: this rank's rows under FSDP2, low-rank or plain gradient, state, side or None
# for a parameter not projected, the parameter as the optimizer holds it: a DTensor under FSDP2)
Item = tuple[Tensor, Tensor, dict[str, Any], Side | None, Tensor]

__all__ = ["SubspaceOptimizerBase", "resolve_rand_step"]

SECOND_MOMENT_POLICIES = ("keep", "project")
SVD_METHODS = ("auto", "full", "randomized")


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


class SubspaceOptimizerBase(Optimizer):
    """Param-group validation, projector refresh, moment re-projection, projection and the update
    of parameters held whole or as FSDP2 row shards. The steps pass :data:`Item` tuples
    ``(param, low_rank_grad, state, side_or_None, like)`` (``like``: the parameter as the optimizer
    holds it, passed to :meth:`_full_update`). The class attributes say which sharded paths a form
    can take (:class:`~loralab.golore.sharded_steps.ShardedSteps`)."""

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
            # under FSDP2 each rank keeps the state of its rows only (m_k of the m rows), and its
            # column block (n_k of the n columns) of a left projection's (r, n) moments and of Q
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
                out["proj_right"] = (r, n_k)
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
        try:
            return new_projector(
                source,
                group["rank"],
                side,
                _projection_kind(group, step),
                generator=gen,
                svd_method=group["svd_method"],
                dtype=moment_dtype(source),
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
        the others one at a time with the row-shard algebra (:func:`project_shard`), the sharded
        right / two-sided ones with ``Q`` gathered for all of them at once (:meth:`_whole_qs`)."""
        out = list(items)
        batches: dict[tuple[Any, ...], list[tuple[int, Tensor]]] = {}  # key: (index, projector)
        wholes = self._whole_qs(enumerate(items))
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
                low = project_shard(grad, mats, side, like, wholes.get(k))
                out[k] = (target, low, state, side, like)
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
        whole_q: Tensor | None = None,
    ) -> Tensor:
        """The full-space update of ``p`` (this rank's rows) for a low-rank ``direction``; ``like``:
        the parameter as the optimizer holds it (an FSDP2 ``DTensor``: a left projection's direction is
        a column block, all-gathered here), ``p`` when not given; ``whole_q``: a sharded right /
        two-sided projection's ``Q`` already gathered (:meth:`_whole_qs`), else gathered here."""
        if side is None:
            return direction
        # side is set only for parameters projected (so given a projector) in this step
        mats = cast(tuple[Tensor, ...], self._projector_mats(state, side))
        back = project_back_shard(direction, mats, side, p if like is None else like, whole_q)
        return back * group["scale"]

    def _whole_qs(self, items: Iterable[tuple[int, Item]]) -> dict[int, Tensor]:
        """``{k: Q whole}`` for the FSDP2-sharded right / two-sided projections among the numbered
        ``items``, from the column blocks each rank keeps: one all-gather per device mesh (and dtype)
        for all of them (:func:`~loralab.core.sharding.gather_columns_packed`; a collective, in item
        order), not one per matrix. The whole ``Q`` matrices live for one step's projection or
        update."""
        by_mesh: dict[Any, list[tuple[int, Tensor, Tensor]]] = {}
        for k, (_target, _grad, state, side, like) in items:
            if side in ("right", "full") and sharding.is_sharded(like):
                q = cast(tuple[Tensor, ...], self._projector_mats(state, side))[-1]
                key = (cast(Any, like).device_mesh, q.dtype, q.device)
                by_mesh.setdefault(key, []).append((k, q, like))
        wholes: dict[int, Tensor] = {}
        for entries in by_mesh.values():
            ks, qs, likes = zip(*entries)
            gathered = sharding.gather_columns_packed(qs, likes[0], [x.shape[1] for x in likes])
            wholes.update(zip(ks, gathered))
        return wholes

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
        wholes = self._whole_qs((k, item) for k, (item, _d) in enumerate(pairs))
        for k, ((p, _g, state, side, like), d) in enumerate(pairs):
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
            full = self._full_update(p, d, state, side, group, like, wholes.get(k))
            p.add_(full if full.dtype == p.dtype else full.to(p.dtype), alpha=alpha)
        if plain[0]:
            torch._foreach_add_(plain[0], plain[1], alpha=alpha)
        for (side, shape, *_), rows in batches.items():
            for part in batching.chunks(len(rows), shape[0] * shape[1]):
                ps, ds, ms = zip(*rows[part])
                batching.add_back_batch_(ps, ds, ms, side, scaled)

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


def _projection_kind(group: dict[str, Any], step: int) -> Projection:
    """Which projector a refresh at ``step`` draws: random from the group's ``rand_step`` on, else SVD."""
    rand_step = resolve_rand_step(group)
    return "random" if rand_step is not None and step >= rand_step else "svd"


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
