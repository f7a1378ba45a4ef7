"""How GaLore / GoLore step parameters an engine splits in ways the row-shard algebra does not cover.

- DeepSpeed ZeRO-1/2/3 replaces a param group's parameters by this rank's flat fp32 partition
  (:mod:`loralab.core.zero_views` finds each parameter in it): a matrix one rank holds whole steps
  there; a matrix split over ranks steps by the projection algebra on each rank's elements
  (AdamW / SGD forms: :mod:`loralab.golore.zero_split`) or on one owner rank (8-bit, Adafactor);
  vectors element-wise.
- FSDP2 with the forms whose state needs whole tensors (8-bit, Adafactor): each sharded parameter
  steps whole on one owner rank.

:class:`ShardedSteps` adds these paths to :class:`~loralab.golore.zero_split.ZeroSplitSteps`;
:class:`loralab.golore.optimizer.SubspaceOptimizer` chooses the path of each param group.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor

from loralab.core import sharding
from loralab.core.zero_views import ZeroPartition, is_zero_partition, zero_partition
from loralab.golore.zero_split import ZeroSplitSteps, _failed_elsewhere

__all__ = ["ShardedSteps"]


class ShardedSteps(ZeroSplitSteps):
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
