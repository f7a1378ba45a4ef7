"""The projection algebra on DeepSpeed ZeRO's element ranges: how the AdamW / SGD forms of GaLore /
GoLore step a weight matrix that ZeRO splits over ranks (every matrix under ZeRO-3, a matrix at a
partition boundary under ZeRO-1/2).

No matrix moves whole between projector refreshes: each rank projects the rows its elements touch,
only low-rank numbers are reduced or gathered (one collective per phase for all split matrices of a
partition), and each rank keeps the moments of its own rows or column block and a column block of
``Q``. At a refresh the gradient is gathered to the matrix's owner rank for the SVD and the new
projector broadcast.

:class:`ZeroSplitSteps` adds this path to :class:`~loralab.golore.subspace.SubspaceOptimizerBase`;
:class:`loralab.golore.sharded_steps.ShardedSteps` chooses it per matrix of a ZeRO partition.
"""

from __future__ import annotations

import itertools
from typing import Any, cast

import torch
from torch import Tensor

from loralab.core import sharding
from loralab.core.adamw import moment_dtype
from loralab.core.zero_views import ZeroPartition
from loralab.golore.projector import Side, effective_rank, projector_side
from loralab.golore.subspace import (
    SubspaceOptimizerBase,
    _count_steps,
    _projection_kind,
    _read_steps,
)

__all__ = ["ZeroSplitSteps"]

# (side, rank r, {state key: shape on this rank}) of a split matrix: ZeroSplitSteps._split_layout
Layout = tuple[Side, int, dict[str, tuple[int, ...]]]


class ZeroSplitSteps(SubspaceOptimizerBase):
    """The step of the weight matrices a DeepSpeed ZeRO partition splits over ranks, by the
    projection algebra on each rank's elements (see the module docstring)."""

    def _apply_delta_(self, local: Tensor, delta: Tensor, group: dict[str, Any]) -> None:
        """``local ← a·local + delta`` (the form's element-wise decay around the update, as
        :meth:`_update` applies it) for this rank's elements of a matrix whose update ``delta`` its
        owner computed weight-free (:attr:`_affine_in_weight` forms) or the split step computed
        (:attr:`_steps_split_elements`)."""
        self._decay_([local], group, after=False)
        local.add_(delta)
        self._decay_([local], group, after=True)

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

    def _split_layout(self, zp: ZeroPartition, pc: Any, group: dict[str, Any]) -> Layout:
        """``(side, r, {state key: shape on this rank})`` of a matrix that
        :meth:`_step_split_matrices` steps. Every rank keeps a column block of ``Q`` (r, n) (right,
        two-sided; :func:`~loralab.core.sharding.block_of` over the world, holder or not); a rank
        holding part of the matrix keeps ``P``'s rows it touches (left, two-sided) and the moments:
        of those rows for a right projection (``R = G·Qᵀ`` row by row), (r, r) for a two-sided one.
        A left projection's moments are a column block of ``R = Pᵀ·G`` on every rank. So no rank
        keeps more of a projector than its share. Moments: the form's :attr:`_moment_keys`."""
        n = pc.shape[1]
        side = projector_side(pc.shape, group["proj_type"])
        r = effective_rank(pc.shape, group["rank"], side)
        rows = zp.row_span(pc.param)
        m_k = rows.stop - rows.start
        cols = sharding.block_of(n, zp.world, zp.rank)
        n_k = cols.stop - cols.start
        out: dict[str, tuple[int, ...]] = {}
        if side != "right" and m_k:
            out["proj_left"] = (m_k, r)
        if side != "left":
            out["proj_right"] = (r, n_k)
        if side == "right" and m_k:
            out.update(dict.fromkeys(self._moment_keys, (m_k, r)))
        elif side == "full" and m_k:
            out.update(dict.fromkeys(self._moment_keys, (r, r)))
        elif side == "left" and n_k:
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
        sum over the ranks to ``G``. The projected gradients (:meth:`_project_split`) go through
        the form's update on each rank's part (:meth:`_low_rank_directions`), and the directions
        back to each rank's elements (:meth:`_add_split_updates`). Every collective takes all split
        matrices of the group at once.

        A refresh draws the projector on the matrix's owner (the whole gradient gathered there for
        an SVD; a random one from the seed) and broadcasts it; the moments move into the new basis
        with ``C = P_newᵀ·P_old`` summed over each row's one rank, or ``Q_old·Q_newᵀ`` summed over
        the column blocks (:meth:`_refresh_split`). ``refresh_now``: the matrices (by index) to
        refresh out of turn (:meth:`_check_owned_state`). The result equals one process's up to the
        order of the sums."""
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

        # Q whole for the right and two-sided projections: every rank keeps a column block, one
        # all-gather brings all of them back (r·n numbers per matrix; used again for the update)
        with_q = [k for k, (side, _r, _l) in enumerate(layouts) if side != "left"]
        qs = self._whole_split_qs(
            zp,
            [pieces[k] for k in with_q],
            [subs[k] for k in with_q],
            [layouts[k][1] for k in with_q],
        )
        q_whole = dict(zip(with_q, qs))
        lows = self._project_split(zp, pieces, subs, layouts, local_grads, q_whole)

        # the form's update on this rank's part of each R (step counts advance on every rank alike)
        counts = _count_steps(subs)
        todo = [k for k, low in enumerate(lows) if low is not None and low.numel()]
        found = self._low_rank_directions(
            group,
            [cast(Tensor, lows[k]) for k in todo],
            [subs[k] for k in todo],
            [counts[k] for k in todo],
        )
        self._add_split_updates(zp, pieces, subs, layouts, dict(zip(todo, found)), q_whole, group)
        for pc, sub in zip(pieces, subs):
            for key, value in sub.items():
                state[f"param{pc.index}.{key}"] = value

    def _project_split(
        self,
        zp: ZeroPartition,
        pieces: list[Any],
        subs: list[dict[str, Any]],
        layouts: list[Layout],
        local_grads: list[Tensor],
        q_whole: dict[int, Tensor],
    ) -> list[Tensor | None]:
        """This rank's part of each projected gradient ``R`` (a collective, every split matrix at
        once): a right projection's rows ``G_k·Qᵀ`` (m_k, r) computed row by row, the rows a rank
        boundary splits all-reduced (``r`` numbers each; the rows' moments live on the ranks that
        touch them, a split row on both, computed alike); a left projection's column block of
        ``Pᵀ·G = Σ_k P_kᵀ·G_k`` (r, n_k), reduce-scattered by column blocks (``r·n`` numbers instead
        of ``m·n``); a two-sided one's (r, r) ``Σ_k P_kᵀ·G_k·Qᵀ``, all-reduced, on the ranks that
        hold part of the matrix. ``None`` where this rank has no part. ``local_grads`` (this rank's
        elements of each gradient) is emptied once the partial products are formed: SGD's decayed
        copies are not kept through the collectives."""
        flat = zp.flat
        lows: list[Tensor | None] = [None] * len(pieces)
        shared: list[tuple[int, int]] = []  # (piece, row) of the right projections' split rows
        left, blocks = _left_packing(zp, pieces, layouts)
        slot = {k: j for j, k in enumerate(left)}  # each left matrix's place in the packed buffers
        send = flat.new_zeros(blocks.size * zp.world) if left else None
        # two-sided: the (r, r) partial products P_kᵀ·G_k·Qᵀ of every such matrix, one all-reduce
        full = [k for k, (side, _r, _l) in enumerate(layouts) if side == "full"]
        offsets = list(itertools.accumulate((layouts[k][1] ** 2 for k in full), initial=0))
        at = dict(zip(full, offsets))
        squares = flat.new_zeros(offsets[-1])
        for k, (pc, sub, (side, r, _l)) in enumerate(zip(pieces, subs, layouts)):
            if not zp.holds(pc.param):
                if side == "right":
                    shared += [(k, row) for row in zp.shared_rows(pc.param)]
                continue
            block = zp.row_block(local_grads[k], pc.param)
            if side == "full":
                p_rows, q = sub["proj_left"], q_whole[k]
                squares[at[k] : at[k] + r * r] = (p_rows.T @ block.to(q.dtype) @ q.T).reshape(-1)
            elif side == "right":
                shared += [(k, row) for row in zp.shared_rows(pc.param)]
                lows[k] = block.to(q_whole[k].dtype) @ q_whole[k].T
            else:
                p_rows = sub["proj_left"]
                blocks.put_all(cast(Tensor, send), slot[k], p_rows.T @ block.to(p_rows.dtype))
        local_grads.clear()
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
        return lows

    def _add_split_updates(
        self,
        zp: ZeroPartition,
        pieces: list[Any],
        subs: list[dict[str, Any]],
        layouts: list[Layout],
        dirs: dict[int, Tensor],
        q_whole: dict[int, Tensor],
        group: dict[str, Any],
    ) -> None:
        """Each split matrix's update on this rank's elements from the directions ``dirs`` (by
        piece; this rank's part, as :meth:`_project_split` gave it): a left projection's ``N``
        all-gathered from the column blocks (a collective, every left matrix at once), then
        ``D = −lr·scale·(P_k·N)``, ``(N_k·Q)`` or ``(P_k·N·Q)`` on the rows this rank touches, added
        to its elements with the form's decay (:meth:`_apply_delta_`)."""
        flat = zp.flat
        left, blocks = _left_packing(zp, pieces, layouts)
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
            if not zp.holds(pc.param):
                continue
            if side == "right":
                block = dirs[k].to(q_whole[k].dtype) @ q_whole[k]
            elif side == "full":
                p_rows, q = sub["proj_left"], q_whole[k]
                block = p_rows @ dirs[k].to(q.dtype) @ q
            else:
                block = sub["proj_left"] @ whole_n[k].to(sub["proj_left"].dtype)
            delta = zp.from_row_block(block, pc.param) * (-group["lr"] * group["scale"])
            self._apply_delta_(zp.local(flat, pc.param), delta.to(flat.dtype), group)

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
        dtype = moment_dtype(flat)
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
        cols = sharding.block_of(n, zp.world, zp.rank)
        # P (left, full) by this rank's rows, Q (right, full) by its column block
        p_new = mats[0][rows].contiguous() if side != "right" else None
        q_new = mats[-1][:, cols].contiguous() if side != "left" else None
        p_old, q_old = sub.get("proj_left"), sub.get("proj_right")
        del mats
        if group["reproject_moments"] and step > 0:
            trans: tuple[Tensor, ...] = ()
            if p_new is not None:
                # C = P_newᵀ·P_old over all rows: each row counted on the one rank holding its start
                first = zp.first_rows(pc.param)
                here = slice(first.start - rows.start, first.stop - rows.start)
                c = p_new.new_zeros(r, r)
                if p_old is not None and first.stop > first.start:
                    c += p_new[here].T @ p_old[here]
                trans = (zp.all_reduce_sum_(c),)
            if q_new is not None:
                # D = Q_old·Q_newᵀ = Σ over the column blocks
                d = q_new.new_zeros(r, r)
                if q_old is not None:
                    d += q_old @ q_new.T
                trans += (zp.all_reduce_sum_(d),)
            self._reproject_moments(sub, trans, side, group)  # the moments this rank keeps
        if p_new is not None and rows.stop > rows.start:
            sub["proj_left"] = p_new
        if q_new is not None:
            sub["proj_right"] = q_new

    def _whole_split_qs(
        self, zp: ZeroPartition, pieces: list[Any], subs: list[dict[str, Any]], rs: list[int]
    ) -> list[Tensor]:
        """The whole ``Q`` (r, n) of each right or two-sided split matrix, from the column blocks the
        ranks keep (:meth:`_split_layout`): one all-gather for all of them (a collective)."""
        if not pieces:
            return []
        blocks = sharding.ColumnBlocks([pc.shape[1] for pc in pieces], rs, zp.world)
        send = zp.flat.new_zeros(blocks.size, dtype=subs[0]["proj_right"].dtype)
        for j, sub in enumerate(subs):
            blocks.put(send, j, sub["proj_right"])
        every = zp.all_gather_flat(send)
        return [blocks.whole(every, j) for j in range(len(pieces))]


def _left_packing(
    zp: ZeroPartition, pieces: list[Any], layouts: list[Layout]
) -> tuple[list[int], sharding.ColumnBlocks]:
    """The left projections among ``pieces`` (by index) and how their (r, n_k) blocks pack by
    column blocks over the ranks: the one layout the projection's reduce-scatter and the update's
    all-gather share."""
    left = [k for k, (side, _r, _l) in enumerate(layouts) if side == "left"]
    blocks = sharding.ColumnBlocks(
        [pieces[k].shape[1] for k in left], [layouts[k][1] for k in left], zp.world
    )
    return left, blocks


def _failed_elsewhere(where: str) -> FloatingPointError:
    """The error the other ranks raise when an owner rank could not compute a projector."""
    return FloatingPointError(
        f"{where}: a projector could not be computed on another rank (a non-finite gradient; that "
        "rank's error names the parameter and step). Lower the learning rate, clip gradients or "
        "check the data."
    )
