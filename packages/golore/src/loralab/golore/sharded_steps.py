"""How GaLore / GoLore step parameters an engine splits in ways the row-shard algebra does not cover.

- DeepSpeed ZeRO-1/2/3 replaces a param group's parameters by this rank's flat fp32 partition
  (:mod:`loralab.core.zero_views` finds each parameter in it): a matrix one rank holds whole steps
  there; a matrix split over ranks steps by the projection algebra on each rank's elements
  (AdamW / SGD forms) or on one owner rank (8-bit, Adafactor); vectors element-wise.
- FSDP2 with the forms whose state needs whole tensors (8-bit, Adafactor): each sharded parameter
  steps whole on one owner rank.

:class:`ShardedSteps` adds these paths to :class:`~loralab.golore.subspace.SubspaceOptimizerBase`;
:class:`loralab.golore.optimizer.SubspaceOptimizer` chooses the path of each param group.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor

from loralab.core import sharding
from loralab.core.adamw import moment_dtype
from loralab.core.zero_views import ZeroPartition, is_zero_partition, zero_partition
from loralab.golore.projector import Side, effective_rank, projector_side
from loralab.golore.subspace import (
    SubspaceOptimizerBase,
    _count_steps,
    _projection_kind,
    _read_steps,
)

__all__ = ["ShardedSteps"]


class ShardedSteps(SubspaceOptimizerBase):
    """The ZeRO-partition and FSDP2-owner steps of a subspace optimizer (see the module docstring)."""

    def _flattened_originals(self, group: dict[str, Any]) -> list[Tensor] | None:
        """The group's original matrices when DeepSpeed ZeRO replaced them by a flat partition, else None."""
        info = self.__dict__.get("_group_info", {}).get(id(group))
        if info is None or info[1] is None:
            return None
        # ZeRO-3 empties the lists of the groups it is not stepping: nothing to do for those
        if not is_zero_partition(group["params"], {id(p) for p in info[1]}):
            return None
        return info[1]

    def _apply_delta_(self, local: Tensor, delta: Tensor, group: dict[str, Any]) -> None:
        """``local ← a·local + delta`` (the form's element-wise decay around the update, as
        :meth:`_update` applies it) for this rank's elements of a matrix whose update ``delta`` its
        owner computed weight-free (:attr:`_affine_in_weight` forms) or the split step computed
        (:attr:`_steps_split_elements`)."""
        self._decay_([local], group, after=False)
        local.add_(delta)
        self._decay_([local], group, after=True)

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
                    ok = self._update_on_owner(
                        delta, whole_grad, sub, weight_free, gi, pc.index, failed
                    )
                    if not ok:
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
                self._update_on_owner(weight, whole_grad, sub, group, gi, pc.index, failed)
                keep(prefix, sub)
                del whole_grad
            zp.scatter_from_(flat, pc.param, weight, owner)
            # free the owner's whole matrix now: bound until the next gather returned, it would make
            # two whole matrices at once on the owner of consecutive parameters
            del weight
        if not zp.all_agree(not failed):
            raise failed[0] if failed else _failed_elsewhere(where)

    def _update_on_owner(
        self,
        target: Tensor,
        grad: Tensor,
        sub: dict[str, Any],
        group: dict[str, Any],
        gi: int,
        index: int,
        failed: list[FloatingPointError],
    ) -> bool:
        """The ordinary update of one whole matrix on its owner rank. A projector that cannot be
        computed (a non-finite gradient) is appended to ``failed`` and False returned: the caller
        raises it on every rank after its loop, where raising here would leave the other ranks
        waiting in the next collective."""
        try:
            self._update(group, [self._prepare_item(target, grad, sub, group, gi, index)])
        except FloatingPointError as e:
            failed.append(e)
            return False
        return True

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
        sum over the ranks to ``G``. A right projection ``R = G·Qᵀ`` (m, r) is then computed row by
        row, ``Q`` all-gathered from the column blocks the ranks keep (``r·n`` numbers), with no
        other communication but the rows a rank boundary splits (their partial products
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

        # the projected gradients: this rank's rows (right) or column block (left) of R
        lows: list[Tensor | None] = [None] * len(pieces)
        shared: list[tuple[int, int]] = []  # (piece, row) of the right projections' split rows
        left = [k for k, (side, _r, _l) in enumerate(layouts) if side == "left"]
        slot = {k: j for j, k in enumerate(left)}  # each left matrix's place in the packed buffers
        blocks = sharding.ColumnBlocks(
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
                    p_rows, q = sub["proj_left"], q_whole[k]
                    block = zp.row_block(local_grads[k], pc.param).to(q.dtype)
                    squares[at[k] : at[k] + r * r] = (p_rows.T @ block @ q.T).reshape(-1)
            elif side == "right":
                shared += [(k, row) for row in zp.shared_rows(pc.param)]
                if zp.holds(pc.param):
                    q = q_whole[k]
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
                    block = dirs[k].to(q_whole[k].dtype) @ q_whole[k]
                elif side == "full":
                    p_rows, q = sub["proj_left"], q_whole[k]
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
                state = self.state[p]
                self._update_on_owner(weight, whole_grad, state, group, gi, index[id(p)], failed)
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
        another owner assignment or of an earlier loralab-golore, which kept a split matrix's state
        whole on its owner, or later a right projection's ``Q`` whole on each holder). Stepping on would silently restart those matrices' moments and
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
        layouts = [self._split_layout(zp, pc, group)[2] for pc in split]
        for pc, expected in zip(split, layouts):
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
        lacking = [
            any(k.startswith("proj") and f"param{pc.index}.{k}" not in state for k in expected)
            for pc, expected in zip(split, layouts)
        ]
        flags = zp.all_reduce_sum_(
            torch.tensor(lacking, dtype=torch.float32, device=zp.flat.device)
        )
        return {pc.index for pc, n in zip(split, flags.tolist()) if n}


def _failed_elsewhere(where: str) -> FloatingPointError:
    """The error the other ranks raise when an owner rank could not compute a projector."""
    return FloatingPointError(
        f"{where}: a projector could not be computed on another rank (a non-finite gradient; that "
        "rank's error names the parameter and step). Lower the learning rate, clip gradients or "
        "check the data."
    )


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
