"""Whole-matrix views of parameters and gradients inside DeepSpeed ZeRO's flat partitions.

:mod:`loralab.core.sharding` gives an optimizer, per parameter, the whole ``(out, in)`` matrix and
gradient under one process, DDP and FSDP2, where the optimizer keeps the model's own parameters.
DeepSpeed ZeRO instead replaces the parameters of each param group by *one flat fp32 partition*
(this rank's share of the group's master weights) and hands the optimizer that partition and its
slice of the averaged gradient; the layer structure is gone. This module finds, for the original
parameters the optimizer was built with, where each one lies in that partition, so that the method
code can still read whole matrices and write its update back:

- **ZeRO-1/2** (``DeepSpeedZeroOptimizer``): the group's parameters are concatenated (in DeepSpeed's
  order, padded to a multiple of the world size) into one flat buffer, and rank ``k`` holds the
  ``k``-th equal slice of it. A parameter lies in that buffer at its storage offset (the model's
  parameters are views of DeepSpeed's 16-bit copy of it), so a parameter may be split between two
  neighbouring ranks, or lie on one rank only.
- **ZeRO-3** (``DeepSpeedZeroOptimizer_Stage3``): *every* parameter is split: rank ``k`` holds
  elements ``[k·c, (k+1)·c)`` of its flattened values, ``c = ⌈numel / world⌉`` (zero padding on the
  last rank), and a sub-group's partition concatenates these pieces in parameter order. DeepSpeed
  names the sub-group a partition belongs to (``ds_id = "<first>_<last>"`` of its parameters' ids).

Both come down to one description (:class:`Piece`): for each original parameter, the range of its
flattened elements each rank holds and where that range starts in the rank's partition.
:class:`ZeroPartition` then gives

- :meth:`ZeroPartition.wholes`: the whole matrices of every parameter of the partition from one
  all-gather of a tensor laid out like it (the master weights, the gradient). Meant for LoRA
  factors (small); for weight matrices use :meth:`ZeroPartition.gather_to` (one matrix on one owner
  rank) or the local pieces;
- :meth:`ZeroPartition.local`: this rank's elements of a parameter, a 1-D view of the partition (or
  of its gradient), for element-wise updates;
- :meth:`ZeroPartition.write_`: copy this rank's elements of a whole value into a partition-shaped
  tensor (no communication).

The layout is read from the parameters themselves (no DeepSpeed object is needed, so an optimizer
works under ``deepspeed.initialize``, accelerate's DeepSpeed plugin and the runners alike), and
checked: a layout that does not add up (a data-parallel group smaller than the world, parameters
swapped to NVMe) raises instead of guessing. Every communicating call is a collective over the
partition's process group: call it on every rank, in the same order.

DeepSpeed's CPU offload (``offload_optimizer`` / ``offload_param`` on ``cpu``) keeps the partitions,
and so the optimizer step, on the CPU; the collectives then run on the process group's device
(:func:`loralab.core.distributed.collective_device`: the accelerator for NCCL) and their results
come back to the partition's device.

Example:
    >>> import torch
    >>> from loralab.core.zero_views import is_zero_partition, zero_partition
    >>> w = torch.nn.Parameter(torch.ones(2, 3))
    >>> is_zero_partition([w], {id(w)})  # the optimizer's own parameters: nothing replaced
    False
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from loralab.core.distributed import collective_device

__all__ = [
    "GroupOriginals",
    "Piece",
    "ZeroLayoutError",
    "ZeroPartition",
    "flat_partition",
    "full_shape",
    "is_zero3_param",
    "is_zero_partition",
    "zero_partition",
]


class ZeroLayoutError(RuntimeError):
    """The flat partition DeepSpeed handed the optimizer does not match the parameters it was built
    with (an unsupported ZeRO setting); the message says which and what to use."""


def is_zero3_param(p: Tensor) -> bool:
    """Whether ``p`` is a parameter that DeepSpeed ZeRO-3 partitioned (it carries ``ds_id`` and
    ``ds_tensor``: its own data is empty outside a ``GatheredParameters`` block)."""
    return hasattr(p, "ds_id") and hasattr(p, "ds_tensor")


def full_shape(p: Tensor) -> torch.Size:
    """The shape of the whole parameter: ``ds_shape`` for a ZeRO-3-partitioned one (whose own shape
    is empty), else ``p.shape``.

    Example:
        >>> import torch
        >>> full_shape(torch.zeros(2, 3))
        torch.Size([2, 3])
    """
    return torch.Size(p.ds_shape) if is_zero3_param(p) else p.shape  # type: ignore[attr-defined]


class GroupOriginals:
    """Each param group's parameters as the optimizer was built with them, found again by group.

    DeepSpeed ZeRO-1/2 steps one group at a time through a one-element ``param_groups`` list, so a
    group's position in the list is not its index; the group dict itself is the same object.
    ``torch.optim.Optimizer.load_state_dict`` rebuilds the dicts: call :meth:`carry_over` after it.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> originals = GroupOriginals()
        >>> originals.record(opt.param_groups[0], 0)
        >>> originals.of(opt.param_groups[0])[0]
        0
    """

    def __init__(self) -> None:
        self._by_group: dict[int, tuple[int, list[Tensor]]] = {}

    def record(self, group: dict[str, Any], index: int) -> None:
        """Remember ``group``'s current parameters as group number ``index``."""
        self._by_group[id(group)] = (index, list(group["params"]))

    def of(self, group: dict[str, Any]) -> tuple[int, list[Tensor]]:
        """``(index, parameters)`` recorded for ``group``; ``KeyError`` if it was never recorded."""
        found = self._by_group.get(id(group))
        if found is None:
            raise KeyError(
                "a param group the optimizer was not built with (added after DeepSpeed wrapped it?)"
            )
        return found

    def carry_over(self, old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> None:
        """Move the records of the groups ``old`` to the groups ``new`` that replaced them, in order."""
        infos = [self._by_group.get(id(g)) for g in old]
        self._by_group = {id(g): info for g, info in zip(new, infos) if info is not None}


def is_zero_partition(params: Sequence[Tensor], own: set[int]) -> bool:
    """Whether a param group's ``params`` were replaced behind the optimizer's back (DeepSpeed ZeRO
    puts its flat partition there: none of them is among ``own``, the ids the optimizer was built
    with). ZeRO-3 empties the list between steps: an empty list is not a partition."""
    return bool(params) and any(id(p) not in own for p in params)


@dataclass(frozen=True)
class Piece:
    """Where one original parameter lies in the flat partitions of every rank.

    ``spans[k] = (lo, hi, at)``: rank ``k`` holds elements ``[lo, hi)`` of ``param.view(-1)``, starting
    at offset ``at`` of its partition (``lo == hi`` when it holds none).
    """

    param: Tensor
    index: int
    shape: torch.Size
    spans: tuple[tuple[int, int, int], ...]

    @property
    def numel(self) -> int:
        return self.shape.numel()


class ZeroPartition:
    """The original parameters of one param group inside the flat partition ``flat`` of this rank.

    Built by :func:`zero_partition`. ``pieces`` lists the parameters that have elements anywhere in
    the partitions (ZeRO-3: those of ``flat``'s sub-group; ZeRO-1/2: all of the group's), in order.

    Example:
        >>> # inside an optimizer's step, for a group DeepSpeed replaced by its flat partition:
        >>> # zp = zero_partition(originals, group["params"][0])
        >>> # A, B = zp.wholes(zp.flat)[id(A0)], ...  # whole master weights (one all-gather)
    """

    def __init__(
        self, flat: Tensor, pieces: list[Piece], stage: int, rank: int, world: int, group: Any
    ) -> None:
        self.flat = flat
        self.pieces = pieces
        self.stage = stage
        self.rank = rank
        self.world = world
        self.group = group
        self._by_id = {id(pc.param): pc for pc in pieces}
        # where this group's collectives take tensors (offloaded CPU partitions under NCCL: the GPU)
        self.comm_device = collective_device(flat.device, group) if world > 1 else flat.device

    def piece(self, p: Tensor) -> Piece:
        """The :class:`Piece` of an original parameter; ``KeyError`` naming its shape if it is not
        in this partition."""
        pc = self._by_id.get(id(p))
        if pc is None:
            raise KeyError(
                f"a parameter of shape {tuple(p.shape)} is not in this DeepSpeed ZeRO partition"
            )
        return pc

    def __contains__(self, p: Tensor) -> bool:
        return id(p) in self._by_id

    def holds(self, p: Tensor) -> bool:
        """Whether this rank holds any element of ``p``."""
        lo, hi, _ = self.piece(p).spans[self.rank]
        return hi > lo

    def local(self, like_flat: Tensor, p: Tensor) -> Tensor:
        """This rank's elements of ``p`` in ``like_flat`` (a tensor laid out like the partition: the
        partition itself, its gradient, an element-wise state): a 1-D view, possibly empty."""
        lo, hi, at = self.piece(p).spans[self.rank]
        return like_flat.view(-1)[at : at + hi - lo]

    def local_range(self, p: Tensor) -> tuple[int, int]:
        """The elements ``[lo, hi)`` of ``p.view(-1)`` (row-major) that this rank holds."""
        lo, hi, _ = self.piece(p).spans[self.rank]
        return lo, hi

    @torch.no_grad()
    def write_(self, like_flat: Tensor, p: Tensor, value: Tensor) -> None:
        """Copy this rank's elements of the whole ``value`` (shaped like ``p``) into ``like_flat``
        (no communication: every rank holds the same whole ``value``, or at least its own part)."""
        pc = self.piece(p)
        if value.shape != pc.shape:
            raise ValueError(
                f"write_: value has shape {tuple(value.shape)}, the parameter {tuple(pc.shape)}"
            )
        lo, hi, at = pc.spans[self.rank]
        if hi > lo:
            like_flat.view(-1)[at : at + hi - lo].copy_(value.reshape(-1)[lo:hi])

    def row_span(self, p: Tensor) -> slice:
        """The rows of the matrix ``p`` that this rank's elements touch (row-major; the first and the
        last may hold only some of their elements here), empty when it holds none.

        Example:
            >>> import torch
            >>> buf = torch.arange(6.0)
            >>> w = buf.view(2, 3)  # one process: the partition holds all of w
            >>> zero_partition([w], buf.clone()).row_span(w)
            slice(0, 2, None)
            >>> # a (4, 3) matrix split after its 5th element: rank 0 touches rows 0-1, rank 1 rows 1-3
        """
        pc = self.piece(p)
        lo, hi, _ = pc.spans[self.rank]
        if hi <= lo:
            return slice(0, 0)
        n = pc.shape[1]
        return slice(lo // n, (hi - 1) // n + 1)

    def first_rows(self, p: Tensor) -> slice:
        """The rows of the matrix ``p`` whose first element this rank holds: each row belongs to
        exactly one rank this way (sums over rows count a row split between two ranks once)."""
        pc = self.piece(p)
        lo, hi, _ = pc.spans[self.rank]
        n = pc.shape[1]
        if hi <= lo:
            return slice(0, 0)
        return slice(-(-lo // n), -(-hi // n))

    def shared_rows(self, p: Tensor) -> list[int]:
        """The rows of the matrix ``p`` whose elements lie on more than one rank (a rank boundary falls
        inside them), in order; the same list on every rank."""
        pc = self.piece(p)
        n = pc.shape[1]
        rows: set[int] = set()
        for lo, hi, _ in pc.spans:
            if hi > lo:
                if lo % n:
                    rows.add(lo // n)
                if hi % n:
                    rows.add((hi - 1) // n)
        return sorted(rows)

    def row_block(self, elements: Tensor, p: Tensor) -> Tensor:
        """This rank's ``elements`` of the matrix ``p`` (1-D, as :meth:`local` gives them) placed in
        the rows they touch (:meth:`row_span`), zeros where other ranks hold the elements: a
        ``(rows, n)`` matrix. Summed over the ranks (row by row) these blocks are the whole matrix,
        so a product with a projector's rows, ``P_kᵀ·G_k`` or ``G_k·Q``, sums over the ranks to the
        whole product. ``ValueError`` when ``elements`` is not this rank's number of elements.

        Example:
            >>> import torch
            >>> buf = torch.arange(6.0)
            >>> w = buf.view(2, 3)
            >>> zp = zero_partition([w], buf.clone())
            >>> zp.row_block(zp.local(zp.flat, w), w)
            tensor([[0., 1., 2.],
                    [3., 4., 5.]])
        """
        pc = self.piece(p)
        lo, hi, _ = pc.spans[self.rank]
        if elements.numel() != hi - lo:
            raise ValueError(
                f"row_block: got {elements.numel()} elements, this rank holds {hi - lo} of the parameter"
            )
        rows = self.row_span(p)
        n = pc.shape[1]
        block = elements.new_zeros(rows.stop - rows.start, n)
        if hi > lo:
            start = lo - rows.start * n
            block.view(-1)[start : start + hi - lo] = elements.reshape(-1)
        return block

    def from_row_block(self, block: Tensor, p: Tensor) -> Tensor:
        """This rank's elements (1-D, as :meth:`local` lays them out) of a value given on the rows of
        :meth:`row_span` (the reverse of :meth:`row_block`)."""
        pc = self.piece(p)
        lo, hi, _ = pc.spans[self.rank]
        rows = self.row_span(p)
        n = pc.shape[1]
        if block.shape != (rows.stop - rows.start, n):
            raise ValueError(
                f"from_row_block: block has shape {tuple(block.shape)}, this rank's rows of the "
                f"parameter {(rows.stop - rows.start, n)}"
            )
        start = lo - rows.start * n
        return block.reshape(-1)[start : start + hi - lo]

    def broadcast_(self, tensor: Tensor, src: int) -> Tensor:
        """Overwrite ``tensor`` on every rank with rank ``src``'s (of the partition's group)."""
        if self.world == 1:
            return tensor
        buf = tensor.to(self.comm_device)
        dist.broadcast(
            buf, src=dist.get_global_rank(self.group, src) if self.group else src, group=self.group
        )
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor

    def reduce_scatter_sum(self, tensor: Tensor) -> Tensor:
        """The ``world`` equal blocks of the 1-D ``tensor`` summed over the ranks, block ``k`` to rank
        ``k`` (a reduce-scatter: each rank receives only its block)."""
        if self.world == 1:
            return tensor
        if tensor.dim() != 1 or tensor.numel() % self.world:
            raise ValueError(
                f"reduce_scatter_sum: needs a 1-D tensor of a multiple of {self.world} elements, "
                f"got shape {tuple(tensor.shape)}"
            )
        send = tensor.to(self.comm_device)
        out = send.new_empty(tensor.numel() // self.world)
        dist.reduce_scatter_tensor(out, send, op=dist.ReduceOp.SUM, group=self.group)
        return out.to(tensor.device)

    def all_gather_flat(self, block: Tensor) -> Tensor:
        """Every rank's 1-D ``block`` (all of one size) concatenated in rank order (an all-gather)."""
        if self.world == 1:
            return block
        send = block.contiguous().view(-1).to(self.comm_device)
        out = send.new_empty(send.numel() * self.world)
        dist.all_gather_into_tensor(out, send, group=self.group)
        return out.to(block.device)

    def all_agree(self, ok: bool) -> bool:
        """``ok`` and-ed over the ranks of the partition (a check made on local elements, such as
        finite gradients, must take the same branch on every rank)."""
        if self.world == 1:
            return ok
        flag = torch.tensor(1.0 if ok else 0.0, device=self.comm_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item() == 1.0)

    def all_reduce_sum_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` in place over the ranks of the partition and return it (values that each
        rank computed for its own matrices, zeros elsewhere, become every rank's)."""
        if self.world == 1:
            return tensor
        buf = tensor.to(self.comm_device)
        dist.all_reduce(buf, group=self.group)
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor

    def _all_gather(self, local: Tensor) -> list[Tensor]:
        local = local.detach().contiguous().view(-1)
        if self.world == 1:
            return [local]
        send = local.to(self.comm_device)
        parts = [torch.empty_like(send) for _ in range(self.world)]
        dist.all_gather(parts, send, group=self.group)
        return [part.to(local.device) for part in parts]

    def _assemble(self, parts: Sequence[Tensor], pc: Piece) -> Tensor:
        chunks = [parts[k][at : at + hi - lo] for k, (lo, hi, at) in enumerate(pc.spans) if hi > lo]
        return torch.cat(chunks).view(pc.shape)

    def wholes(
        self, like_flat: Tensor, params: Iterable[Tensor] | None = None
    ) -> dict[int, Tensor]:
        """``{id(p): whole p}`` from one all-gather of ``like_flat`` (laid out like the partition),
        for ``params`` (default: every parameter of the partition). For small parameters (LoRA
        factors): every rank then holds all of them."""
        parts = self._all_gather(like_flat)
        chosen = self.pieces if params is None else [self.piece(p) for p in params]
        return {id(pc.param): self._assemble(parts, pc) for pc in chosen}

    def sole_holder(self, p: Tensor) -> int | None:
        """The rank that holds every element of ``p`` (``None`` when it is split). Under ZeRO-1/2 most
        parameters lie on one rank; a ZeRO-3 parameter is split over all of them."""
        holders = [k for k, (lo, hi, _) in enumerate(self.piece(p).spans) if hi > lo]
        return holders[0] if len(holders) == 1 else None

    def gather_to(self, like_flat: Tensor, p: Tensor, owner: int) -> Tensor | None:
        """The whole ``p`` from ``like_flat`` on rank ``owner`` only (``None`` elsewhere): one
        gather, as much traffic as the matrix itself, for weight matrices that one rank updates; no
        communication when the owner holds all of ``p`` (:meth:`sole_holder`)."""
        return self.gather_elements_to(self.local(like_flat, p), p, owner)

    def gather_elements_to(self, elements: Tensor, p: Tensor, owner: int) -> Tensor | None:
        """:meth:`gather_to` of every rank's ``elements`` of ``p`` (1-D, as :meth:`local` lays them
        out: a value computed from them, such as a gradient with a weight-decay term added).
        ``ValueError`` when ``elements`` is not this rank's number of elements.

        Example:
            >>> import torch
            >>> buf = torch.arange(6.0)
            >>> w = buf.view(2, 3)
            >>> zp = zero_partition([w], buf.clone())
            >>> zp.gather_elements_to(zp.local(zp.flat, w) * 2, w, owner=0)
            tensor([[ 0.,  2.,  4.],
                    [ 6.,  8., 10.]])
        """
        pc = self.piece(p)
        lo, hi, _ = pc.spans[self.rank]
        if elements.numel() != hi - lo:
            raise ValueError(
                f"gather_elements_to: got {elements.numel()} elements, this rank holds {hi - lo} of the parameter"
            )
        if self.world == 1 or self.sole_holder(p) == owner:
            if self.rank != owner:
                return None
            return elements.reshape(-1).clone().view(pc.shape)
        width = max(hi - lo for lo, hi, _ in pc.spans)
        send = elements.new_zeros(width, device=self.comm_device)
        send[: hi - lo] = elements.reshape(-1)
        gathered = (
            [torch.empty_like(send) for _ in range(self.world)] if self.rank == owner else None
        )
        dist.gather(
            send,
            gathered,
            dst=dist.get_global_rank(self.group, owner) if self.group else owner,
            group=self.group,
        )
        if gathered is None:
            return None
        chunks = [gathered[k][: h - lo_] for k, (lo_, h, _) in enumerate(pc.spans) if h > lo_]
        return torch.cat(chunks).view(pc.shape).to(elements.device)

    def scatter_from_(self, like_flat: Tensor, p: Tensor, value: Tensor | None, owner: int) -> None:
        """Write the whole ``value`` that rank ``owner`` holds (``None`` elsewhere) into every rank's
        elements of ``p`` in ``like_flat``: one scatter, the reverse of :meth:`gather_to`."""
        lo, hi, at = self.piece(p).spans[self.rank]
        if hi > lo:
            mine = self.scatter(p, value, owner, like_flat.dtype)
            like_flat.view(-1)[at : at + hi - lo].copy_(mine)
        else:
            self.scatter(p, value, owner, like_flat.dtype)  # a collective: every rank takes part

    def scatter(self, p: Tensor, value: Tensor | None, owner: int, dtype: torch.dtype) -> Tensor:
        """This rank's elements of the whole ``value`` that rank ``owner`` holds (``None`` elsewhere),
        1-D in ``dtype`` (possibly empty): one scatter; no communication when the owner holds all of
        ``p`` (:meth:`sole_holder`)."""
        pc = self.piece(p)
        lo, hi, _ = pc.spans[self.rank]
        if self.world == 1 or self.sole_holder(p) == owner:
            if self.rank != owner:
                return torch.empty(0, dtype=dtype, device=self.flat.device)
            assert value is not None
            return value.reshape(-1).to(dtype)
        width = max(hi_ - lo_ for lo_, hi_, _ in pc.spans)
        recv = torch.empty(width, dtype=dtype, device=self.comm_device)
        chunks = None
        if self.rank == owner:
            assert value is not None
            flat_v = value.reshape(-1).to(device=self.comm_device, dtype=dtype)
            chunks = []
            for lo_, h, _ in pc.spans:
                c = recv.new_zeros(width)
                c[: h - lo_] = flat_v[lo_:h]
                chunks.append(c)
        src = dist.get_global_rank(self.group, owner) if self.group else owner
        dist.scatter(recv, chunks, src=src, group=self.group)
        return recv[: hi - lo].to(self.flat.device)


def _dp_group(params: Sequence[Tensor]) -> Any:
    return getattr(params[0], "ds_process_group", None)


def _rank_world(group: Any) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def flat_partition(group: dict[str, Any], where: str) -> Tensor:
    """The one flat partition DeepSpeed ZeRO put in place of a param group's parameters.

    Raises ``RuntimeError`` (prefixed by ``where``) when the group holds anything else.

    Example:
        >>> import torch
        >>> flat = torch.zeros(6)
        >>> flat_partition({"params": [flat]}, "group 0") is flat
        True
    """
    if len(group["params"]) != 1:
        raise RuntimeError(
            f"{where}: expected one flat DeepSpeed ZeRO partition, got {len(group['params'])} "
            "tensors in place of the parameters it was built with"
        )
    return group["params"][0]


def zero_partition(originals: Sequence[Tensor], flat: Tensor, where: str = "") -> ZeroPartition:
    """Where the ``originals`` of a param group (the parameters the optimizer was built with, in
    order) lie in ``flat``, the partition DeepSpeed ZeRO put in that group's ``params``.

    Raises :class:`ZeroLayoutError` (prefixed by ``where``) when the layout cannot be read: the
    parameters are not views of one flat buffer (ZeRO-1/2), the partition names parameters the group
    does not have (ZeRO-3), or the sizes do not add up (a data-parallel group smaller than the world).
    """
    where = f"{where}: " if where else ""
    if flat.dim() != 1:
        raise ZeroLayoutError(
            f"{where}expected DeepSpeed ZeRO's 1-D flat partition in the param group, got a tensor "
            f"of shape {tuple(flat.shape)}"
        )
    if any(is_zero3_param(p) for p in originals):
        return _stage3(originals, flat, where)
    return _stage12(originals, flat, where)


def _stage3(originals: Sequence[Tensor], flat: Tensor, where: str) -> ZeroPartition:
    ids = [getattr(p, "ds_id", None) for p in originals]
    name = getattr(flat, "ds_id", None)
    if not isinstance(name, str) or "_" not in name or None in ids:
        raise ZeroLayoutError(
            f"{where}a DeepSpeed ZeRO-3 partition without the sub-group name DeepSpeed gives it "
            f"(ds_id = '<first>_<last>', got {name!r}), or parameters not partitioned by ZeRO-3: this "
            "DeepSpeed version lays out its partitions differently; use ZeRO stage 1/2 or FSDP2"
        )
    first, last = (int(s) for s in name.split("_", 1))
    try:
        start, stop = ids.index(first), ids.index(last) + 1
    except ValueError:
        raise ZeroLayoutError(
            f"{where}the DeepSpeed ZeRO-3 partition {name!r} covers parameters this param group was "
            "not built with (another optimizer's group?)"
        ) from None
    chunk = list(originals[start:stop])
    _refuse_nvme(chunk, where)
    group = _dp_group(chunk)
    rank, world = _rank_world(group)
    pieces, at = [], 0
    for j, p in enumerate(chunk):
        n = int(p.ds_numel)  # type: ignore[attr-defined]
        c = int(p.ds_tensor.ds_numel)  # type: ignore[attr-defined]
        if c * world < n:
            raise ZeroLayoutError(
                f"{where}a ZeRO-3 parameter of {n} elements has a partition of {c} on each of {world} "
                "ranks: not DeepSpeed's even split"
            )
        spans = tuple((min(k * c, n), min((k + 1) * c, n), at) for k in range(world))
        pieces.append(Piece(p, start + j, torch.Size(p.ds_shape), spans))  # type: ignore[attr-defined]
        at += c
    if at != flat.numel():
        raise ZeroLayoutError(
            f"{where}the ZeRO-3 partition {name!r} has {flat.numel()} elements, its parameters' "
            f"partitions {at} (partitions swapped to NVMe are not supported)"
        )
    return ZeroPartition(flat, pieces, 3, rank, world, group)


def _refuse_nvme(chunk: Sequence[Tensor], where: str) -> None:
    # offload_param on NVMe swaps the parameters' partitions out between uses, and DeepSpeed's swapper
    # moves optimizer state as partition-shaped element-wise tensors (a projected or low-rank state
    # is neither). CPU offload (final_location "not-nvme") keeps everything resident: supported
    location = {getattr(getattr(p.ds_tensor, "final_location", None), "value", None) for p in chunk}  # type: ignore[attr-defined]
    if "nvme" in location:
        raise ZeroLayoutError(
            f"{where}DeepSpeed ZeRO-3 parameter offload to NVMe (zero_optimization.offload_param.device "
            "nvme) is not supported by this optimizer: offload to the CPU (device: cpu) instead"
        )


def _stage12(originals: Sequence[Tensor], flat: Tensor, where: str) -> ZeroPartition:
    if not originals:
        raise ZeroLayoutError(f"{where}a flat partition in a param group that had no parameters")
    storage = originals[0].untyped_storage()
    if any(p.untyped_storage().data_ptr() != storage.data_ptr() for p in originals):
        raise ZeroLayoutError(
            f"{where}the parameters of the param group are not views of one flat buffer, so their "
            "place in the DeepSpeed ZeRO-1/2 partition is unknown (parameter offload or another "
            "wrapper?); use DeepSpeed ZeRO with its default settings, DDP or FSDP2"
        )
    rank, world = _rank_world(None)
    size = flat.numel()
    total = storage.nbytes() // originals[0].element_size()
    if total != world * size:
        raise ZeroLayoutError(
            f"{where}the flat buffer ({total} elements) is not world_size ({world}) x the partition "
            f"({size}): ZeRO with a data-parallel group smaller than the world (model or expert "
            "parallelism) is not supported"
        )
    pieces = []
    for i, p in enumerate(originals):
        off, n = int(p.storage_offset()), p.numel()
        spans: list[tuple[int, int, int]] = []
        for k in range(world):
            lo, hi = max(off, k * size), min(off + n, (k + 1) * size)
            spans.append((lo - off, hi - off, lo - k * size) if hi > lo else (0, 0, 0))
        pieces.append(Piece(p, i, p.shape, tuple(spans)))
    return ZeroPartition(flat, pieces, 2, rank, world, None)
