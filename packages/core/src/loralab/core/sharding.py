"""Whole-matrix views of parameters and gradients that an engine may shard (one place for engine glue).

An optimizer that transforms a layer's gradient as a matrix (LoRA-FA's ``g_B·(A·Aᵀ)⁻¹``, LoRA-Pro's
adjustment) needs the layer's ``(out, in)`` matrices whole, while the engine may hold only a slice of
them on each rank. These helpers give, per parameter, the whole parameter and gradient, the rows this
rank holds, and a way to write a whole update back to the local slice, so that method code is written
once for every engine:

- one process and DDP: parameters and gradients are plain, whole tensors (DDP averaged the
  gradients); every helper is the identity (no copy, no communication);
- FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are ``DTensor``\\s sharded on dim 0
  (``Shard(0)``) over a 1-D device mesh, and after backward their gradients are ``DTensor``\\s of the same
  layout holding the data-parallel mean. :func:`whole` all-gathers them (meant for the small LoRA
  factors; full weight matrices should use the projection algebra on row shards: :func:`rows_of`,
  :func:`sum_over_shards_`, :func:`gather_rows`, :func:`sum_columns_over_shards`,
  :func:`gather_columns`). A ``Replicate()`` layout is whole on every rank.

Row shards follow ``torch.chunk`` as ``DTensor``'s ``Shard(0)`` does: rank ``k`` holds rows
``[k·c, min((k+1)·c, m))`` with ``c = ⌈m / world⌉`` (empty on the last ranks when ``m < world``,
:func:`block_of`). A small matrix derived from a row-sharded parameter (an (r, n) ``Pᵀ·G``) can be
kept by column blocks over the same mesh (:func:`cols_of`), split by the same rule.
Layouts other than one mesh dimension with ``Shard(0)`` or ``Replicate()`` (HSDP's 2-D meshes, tensor
parallelism's ``Shard(1)``) raise ``NotImplementedError`` naming the placement.

Every function that communicates (:func:`whole`, :func:`whole_grad`, :func:`sum_over_shards_`,
:func:`sum_columns_over_shards`, :func:`gather_rows`, :func:`gather_columns`,
:func:`broadcast_from_first_`, :func:`all_ranks_agree`) is a collective over the parameter's mesh:
call it on every rank, in the same order.

Example:
    >>> import torch
    >>> from loralab.core.sharding import local_tensor, rows_of, whole, write_rows_
    >>> p = torch.nn.Parameter(torch.zeros(4, 3))  # one process: nothing is sharded
    >>> whole(p) is p, rows_of(p)
    (True, slice(0, 4, None))
    >>> write_rows_(p, torch.ones(4, 3))
    >>> float(local_tensor(p).sum())
    12.0
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "ColumnBlocks",
    "all_ranks_agree",
    "block_of",
    "broadcast_from_first_",
    "cols_of",
    "gather_columns",
    "gather_columns_packed",
    "gather_rows",
    "is_dtensor",
    "is_sharded",
    "local_rows",
    "local_tensor",
    "refresh_fsdp_trainable",
    "rows_of",
    "sum_columns_over_shards",
    "sum_over_shards_",
    "whole",
    "whole_grad",
    "whole_packed",
    "write_rows_",
]


@functools.cache  # called per parameter per optimizer step: the import lookup showed in profiles
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def _is_dtensor(t: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def _layout(t: Tensor) -> str:
    """``"shard0"`` or ``"replicate"`` for a supported ``DTensor``; raises for other layouts."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(t.placements)  # type: ignore[attr-defined]
    if len(placements) == 1:
        (pl,) = placements
        if isinstance(pl, Replicate):
            return "replicate"
        if type(pl) is Shard and pl.dim == 0:
            return "shard0"
    raise NotImplementedError(
        f"loralab.core.sharding supports DTensors on a 1-D device mesh with placement Shard(0) (FSDP2's "
        f"fully_shard) or Replicate(), got placements {placements} on mesh "
        f"{tuple(t.device_mesh.shape)}"  # type: ignore[attr-defined]
    )


def is_dtensor(t: Tensor | None) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter or gradient an FSDP2 model holds), whatever its
    layout; :func:`is_sharded` says whether it is split over several ranks.

    Example:
        >>> import torch
        >>> is_dtensor(torch.zeros(2)), is_dtensor(None)
        (False, False)
    """
    return t is not None and _is_dtensor(t)


def is_sharded(t: Tensor | None) -> bool:
    """Whether ``t`` is a ``DTensor`` split over several ranks (FSDP2), i.e. not whole on this rank."""
    return (
        t is not None and _is_dtensor(t) and _layout(t) == "shard0" and t.device_mesh.size() > 1  # type: ignore[attr-defined]
    )


def local_tensor(t: Tensor) -> Tensor:
    """This rank's part of ``t`` as a plain tensor sharing its storage (in-place changes write to
    ``t``); ``t`` itself when it is not a ``DTensor``."""
    if _is_dtensor(t):
        _layout(t)
        return t.to_local()  # type: ignore[attr-defined]
    return t


def whole(t: Tensor) -> Tensor:
    """The whole tensor as a plain tensor: all-gathered from the shards of a sharded ``DTensor``, else
    ``t`` itself (detached when it is a parameter under ``no_grad``, as the caller sees it)."""
    if _is_dtensor(t):
        _layout(t)
        return t.full_tensor()  # type: ignore[attr-defined]
    return t


def whole_packed(tensors: Sequence[Tensor]) -> list[Tensor]:
    """:func:`whole` of many tensors with one all-gather per process group and dtype, not one each
    (a collective when any is sharded: call on every rank with the same tensors in the same order).
    The row shards (2-D, ``Shard(0)``) of each (mesh, dtype, device) travel in one buffer, packed as
    the column blocks of their transposes (:class:`ColumnBlocks`); the others come back as
    :func:`whole` gives them (the gathered ones detached: for optimizers, which step under
    ``no_grad``). For many small tensors such as LoRA factors and their gradients, where a
    collective's fixed cost dominates.

    Example:
        >>> import torch
        >>> a, b = torch.ones(2, 3), torch.zeros(4, 1)
        >>> [t is u for t, u in zip(whole_packed([a, b]), (a, b))]  # nothing sharded: the tensors
        [True, True]
    """
    out = list(tensors)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        if not is_sharded(t):
            out[i] = whole(t)
            continue
        _layout(t)
        if t.dim() != 2:
            raise ValueError(
                f"whole_packed gathers 2-D row shards, got a sharded tensor of shape {tuple(t.shape)}"
            )
        key = (t.device_mesh, t.dtype, t.device)  # type: ignore[attr-defined]
        groups.setdefault(key, []).append(i)
    for idx in groups.values():
        # rows of (m, n) = columns of its transpose (n, m): ColumnBlocks' layout, which stores each
        # block transposed, i.e. the local rows as they are
        blocks = [local_tensor(tensors[i]).detach().T for i in idx]
        ns = [tensors[i].shape[0] for i in idx]
        packing, every = _all_gather_column_blocks(blocks, tensors[idx[0]], ns, "whole_packed")
        for j, i in enumerate(idx):
            out[i] = packing.whole_transposed(every, j)
    return out


def whole_grad(p: Tensor) -> Tensor | None:
    """The whole gradient of ``p`` (see :func:`whole`), ``None`` when it has none."""
    return None if p.grad is None else whole(p.grad)


def block_of(size: int, world: int, rank: int) -> slice:
    """The block of ``size`` indices that rank ``rank`` of ``world`` holds when ``torch.chunk`` splits
    them (``DTensor``'s ``Shard`` rule): ``[k·c, min((k+1)·c, size))`` with ``c = ⌈size / world⌉``,
    empty on the last ranks when the blocks run out.

    Example:
        >>> [block_of(5, 2, k) for k in range(2)]
        [slice(0, 3, None), slice(3, 5, None)]
        >>> block_of(1, 2, 1)  # fewer indices than ranks: the last rank holds none
        slice(1, 1, None)
    """
    if size < 0 or world < 1 or not 0 <= rank < world:
        raise ValueError(
            f"block_of needs size >= 0 and 0 <= rank < world, got size={size}, world={world}, rank={rank}"
        )
    chunk = -(-size // world)
    start = min(rank * chunk, size)
    return slice(start, min(start + chunk, size))


def _world_rank(t: Tensor) -> tuple[int, int]:
    mesh = t.device_mesh  # type: ignore[attr-defined]
    return mesh.size(), mesh.get_local_rank()


def cols_of(like: Tensor, n: int) -> slice:
    """The block of the ``n`` columns of a matrix derived from ``like`` that this rank keeps: the
    :func:`block_of` rule over ``like``'s mesh when ``like`` is sharded, all ``n`` columns otherwise.

    Example:
        >>> import torch
        >>> cols_of(torch.zeros(4, 3), 7)  # one process: every column
        slice(0, 7, None)
    """
    if not is_sharded(like):
        return slice(0, n)
    world, rank = _world_rank(like)
    return block_of(n, world, rank)


def rows_of(t: Tensor) -> slice:
    """The rows (dim 0) of the whole tensor that this rank holds: all of them unless ``t`` is sharded."""
    m = t.shape[0]
    if not is_sharded(t):
        return slice(0, m)
    world, rank = _world_rank(t)
    rows = block_of(m, world, rank)
    local = t.to_local().shape[0]  # type: ignore[attr-defined]
    if rows.stop - rows.start != local:  # a layout that does not follow torch.chunk: never guess
        raise NotImplementedError(
            f"a Shard(0) DTensor of {m} rows holds {local} rows on mesh rank {rank} of {world}, not "
            f"torch.chunk's {rows.stop - rows.start}: uneven custom sharding is not supported"
        )
    return rows


def local_rows(t: Tensor, value: Tensor) -> Tensor:
    """The rows of ``value`` (shaped like the whole ``t``) that this rank holds for ``t`` (a view)."""
    if value.shape[0] != t.shape[0]:
        raise ValueError(
            f"local_rows: value has {value.shape[0]} rows, the whole tensor {t.shape[0]}: got "
            f"shapes {tuple(value.shape)} and {tuple(t.shape)}"
        )
    return value[rows_of(t)]


@torch.no_grad()
def write_rows_(p: Tensor, value: Tensor) -> None:
    """Copy the whole ``value`` into ``p``: this rank's rows into its local shard (no communication;
    every rank computes the same whole ``value``, or at least its own rows of it)."""
    local_tensor(p).copy_(local_rows(p, value))


def _group(t: Tensor) -> Any:
    return t.device_mesh.get_group()  # type: ignore[attr-defined]


def sum_over_shards_(value: Tensor, like: Tensor) -> Tensor:
    """Sum ``value`` in place over the ranks that share ``like``'s shards (an all-reduce; the identity
    when ``like`` is not sharded). The projection algebra on row shards: ``Bᵀ·N = Σ_k B_kᵀ·N_k``."""
    if is_sharded(like):
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=_group(like))
    return value


def _check_2d(value: Tensor, what: str) -> None:
    if value.dim() != 2:
        raise ValueError(f"{what} needs a 2-D matrix, got shape {tuple(value.shape)}")


class ColumnBlocks:
    """The packing of several (r_j, n_j) matrices into one flat buffer per rank, by column blocks
    (:func:`block_of` of each matrix's columns over ``world`` ranks): rank ``k``'s region holds block
    ``k`` of every matrix, transposed (columns contiguous) and padded to ``⌈n_j / world⌉`` columns, so
    one reduce-scatter sums every matrix and hands each rank its blocks, and one all-gather brings
    every matrix back whole (:func:`gather_columns_packed`; the ZeRO steps of ``loralab.golore``).

    Example:
        >>> import torch
        >>> blocks = ColumnBlocks([5, 2], [3, 1], world=2)  # a (3, 5) and a (1, 2) matrix
        >>> a, b = torch.arange(15.0).view(3, 5), torch.tensor([[7.0, 8.0]])
        >>> buf = torch.zeros(2 * blocks.size)  # both ranks' regions, in rank order
        >>> blocks.put_all(buf, 0, a); blocks.put_all(buf, 1, b)
        >>> torch.equal(blocks.whole(buf, 0), a), torch.equal(blocks.take(buf[blocks.size :], 1, 1), b[:, 1:])
        (True, True)
    """

    def __init__(self, ns: list[int], rs: list[int], world: int) -> None:
        if len(ns) != len(rs) or world < 1 or min([*ns, *rs], default=0) < 0:
            raise ValueError(
                f"ColumnBlocks needs one width n and one height r per matrix (n, r >= 0) and world "
                f">= 1, got ns={ns}, rs={rs}, world={world}"
            )
        self.ns, self.rs, self.world = ns, rs, world
        self.chunks = [-(-n // world) for n in ns]
        self.offsets = [0]
        for c, r in zip(self.chunks, rs):
            self.offsets.append(self.offsets[-1] + c * r)
        self.size = self.offsets[-1]  # one rank's region

    def _view(self, region: Tensor, j: int) -> Tensor:
        lo = self.offsets[j]
        return region[lo : lo + self.chunks[j] * self.rs[j]].view(self.chunks[j], self.rs[j])

    def _region(self, buf: Tensor, k: int) -> Tensor:
        return buf[k * self.size : (k + 1) * self.size]

    def _stored(self, region: Tensor, j: int, rank: int) -> Tensor:
        """Rank ``rank``'s block of matrix ``j`` as its ``region`` stores it: (n_k, r), transposed."""
        cols = block_of(self.ns[j], self.world, rank)
        return self._view(region, j)[: cols.stop - cols.start]

    def put(self, region: Tensor, j: int, block: Tensor) -> None:
        """Write a rank's (r, n_k) column block of matrix ``j`` into that rank's ``region``."""
        self._view(region, j)[: block.shape[1]] = block.T

    def put_all(self, buf: Tensor, j: int, value: Tensor) -> None:
        """Write every rank's block of the whole (r, n) ``value`` of matrix ``j`` into ``buf`` (all
        ``world`` regions, in rank order)."""
        for k in range(self.world):
            self.put(self._region(buf, k), j, value[:, block_of(self.ns[j], self.world, k)])

    def take(self, region: Tensor, j: int, rank: int) -> Tensor:
        """The (r, n_k) block of matrix ``j`` that rank ``rank`` keeps, from its ``region``."""
        return self._stored(region, j, rank).T.contiguous()

    def whole(self, buf: Tensor, j: int) -> Tensor:
        """Matrix ``j`` whole (r, n) from every rank's region (an all-gathered ``buf``)."""
        blocks = [self._stored(self._region(buf, k), j, k).T for k in range(self.world)]
        return torch.cat(blocks, dim=1)

    def whole_transposed(self, buf: Tensor, j: int) -> Tensor:
        """``whole(buf, j).T`` (n, r) contiguous, in one copy: each region stores its block
        transposed, so the regions' rows stack to the transpose (for row shards, packed as the
        column blocks of their transposes: :func:`whole_packed`)."""
        return torch.cat([self._stored(self._region(buf, k), j, k) for k in range(self.world)])


def sum_columns_over_shards(value: Tensor, like: Tensor) -> Tensor:
    """This rank's column block (:func:`cols_of`) of ``value`` (r, n) summed over the ranks that share
    ``like``'s shards: a reduce-scatter by columns, so each rank receives (and keeps) only its block;
    ``value`` itself when ``like`` is not sharded. ``Pᵀ·G = Σ_k P_kᵀ·G_k`` kept by columns.

    Example:
        >>> import torch
        >>> v = torch.ones(2, 5)
        >>> sum_columns_over_shards(v, torch.zeros(4, 5)) is v  # not sharded: nothing to do
        True
    """
    _check_2d(value, "sum_columns_over_shards")
    if not is_sharded(like):
        return value
    world, rank = _world_rank(like)
    packing = ColumnBlocks([value.shape[1]], [value.shape[0]], world)
    send = value.new_zeros(world * packing.size)  # every rank's column block, in rank order
    packing.put_all(send, 0, value)
    mine = value.new_empty(packing.size)
    dist.reduce_scatter_tensor(mine, send, op=dist.ReduceOp.SUM, group=_group(like))
    return packing.take(mine, 0, rank)


def gather_columns(block: Tensor, like: Tensor, n: int) -> Tensor:
    """The whole (r, n) matrix from every rank's column block (:func:`cols_of`; an all-gather);
    ``block`` itself when ``like`` is not sharded.

    Example:
        >>> import torch
        >>> b = torch.ones(2, 5)
        >>> gather_columns(b, torch.zeros(4, 5), 5) is b  # not sharded: nothing to do
        True
    """
    _check_2d(block, "gather_columns")
    if not is_sharded(like):
        return block
    return _gather_column_blocks([block], like, [n], "gather_columns")[0]


def gather_columns_packed(
    blocks: Sequence[Tensor], like: Tensor, ns: Sequence[int]
) -> list[Tensor]:
    """:func:`gather_columns` of many matrices at once: each rank's (r_j, n_j,k) column blocks of the
    (r_j, n_j) matrices, all sharded like ``like`` (its process group) and of one dtype and device,
    whole on every rank from one all-gather (:class:`ColumnBlocks`); ``blocks`` themselves when
    ``like`` is not sharded.

    Example:
        >>> import torch
        >>> b = [torch.ones(2, 5), torch.zeros(1, 3)]
        >>> gather_columns_packed(b, torch.zeros(4, 5), [5, 3])[1] is b[1]  # not sharded
        True
    """
    if not is_sharded(like):
        return list(blocks)
    return _gather_column_blocks(blocks, like, ns, "gather_columns_packed")


def _gather_column_blocks(
    blocks: Sequence[Tensor], like: Tensor, ns: Sequence[int], what: str
) -> list[Tensor]:
    """The all-gather behind :func:`gather_columns` / :func:`gather_columns_packed` (``like`` sharded),
    each block checked against this rank's share of its columns."""
    if not blocks:
        return []
    packing, every = _all_gather_column_blocks(blocks, like, ns, what)
    return [packing.whole(every, j) for j in range(len(blocks))]


def _all_gather_column_blocks(
    blocks: Sequence[Tensor], like: Tensor, ns: Sequence[int], what: str
) -> tuple[ColumnBlocks, Tensor]:
    """Every rank's packed column blocks (:class:`ColumnBlocks`) from one all-gather over ``like``'s
    group, each block checked against this rank's share of its columns: ``(packing, buffer)``."""
    kinds = {(b.dtype, b.device) for b in blocks}
    if len(kinds) > 1:  # one buffer: a block of another dtype would be cast on the way
        raise ValueError(
            f"{what}: blocks of one call must share dtype and device, got {sorted(map(str, kinds))}"
        )
    world, rank = _world_rank(like)
    for b, n in zip(blocks, ns):
        _check_2d(b, what)
        share = block_of(n, world, rank)
        if b.shape[1] != share.stop - share.start:
            raise ValueError(
                f"{what}: this rank's block has {b.shape[1]} columns, its share of {n} "
                f"is {share.stop - share.start}: got shape {tuple(b.shape)}"
            )
    packing = ColumnBlocks(list(ns), [b.shape[0] for b in blocks], world)
    send = blocks[0].new_zeros(packing.size)
    for j, b in enumerate(blocks):
        packing.put(send, j, b)
    every = send.new_empty(world * packing.size)
    dist.all_gather_into_tensor(every, send, group=_group(like))
    return packing, every


def gather_rows(like: Tensor, rows: Tensor) -> Tensor:
    """The whole matrix from this rank's ``rows`` (laid out as ``like``'s local shard; ``rows`` itself
    when ``like`` is not sharded). For small results such as ``N·Aᵀ`` (m×r) of a row-sharded ``N``."""
    if not is_sharded(like):
        return rows
    from torch.distributed.tensor import DTensor

    shape = (like.shape[0], *rows.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    d = DTensor.from_local(
        rows.contiguous(),
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=torch.Size(shape),
        stride=stride,
    )
    return d.full_tensor()


def broadcast_from_first_(value: Tensor, like: Tensor) -> Tensor:
    """Overwrite ``value`` in place with the first rank's ``value`` over ``like``'s mesh (a broadcast;
    the identity when ``like`` is not sharded).

    For a small result that every rank computes from the same whole input (a projector from the SVD of
    a gathered gradient): the ranks then hold bit-identical copies, whatever the linear-algebra
    library does with threads, so replicated state derived from it never drifts apart.

    Example:
        >>> import torch
        >>> q = torch.ones(2, 3)
        >>> broadcast_from_first_(q, torch.zeros(4, 3)) is q  # not sharded: nothing to do
        True
    """
    if is_sharded(like):
        buf = value if value.is_contiguous() else value.contiguous()
        dist.broadcast(buf, group=_group(like), group_src=0)
        if buf is not value:
            value.copy_(buf)
    return value


def refresh_fsdp_trainable(model: nn.Module) -> None:
    """Make FSDP2 re-read which of ``model``'s parameters require grad (a no-op without FSDP2).

    FSDP2 reads the trainable parameters of each of its groups once, at its lazy init (the first
    forward), to fix the dtypes of the gradient reduction (``MixedPrecisionPolicy``): a group with no
    trainable parameter then reduces in the gradient's own dtype and keeps it (bfloat16 gradients on
    float32 parameters under ``param_dtype=bfloat16``). Gradient estimation turns ``requires_grad``
    on for frozen weights and off again, so it calls this after each change. FSDP2 has no public call
    for it: this uses its group's ``_init_mp_dtypes`` (checked on torch 2.13), and raises if that is gone.

    Example:
        >>> import torch
        >>> refresh_fsdp_trainable(torch.nn.Linear(2, 2))  # no FSDP2: nothing to do
    """
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if get_state is None:
            continue
        groups = getattr(get_state(), "_fsdp_param_groups", None)
        if groups is None or any(not hasattr(g, "_init_mp_dtypes") for g in groups):
            raise RuntimeError(
                f"this torch {torch.__version__} changed FSDP2's internals that loralab uses to update "
                "the trainable parameters after requires_grad changes (FSDPParamGroup._init_mp_dtypes)"
            )
        for group in groups:
            group._init_mp_dtypes()


def all_ranks_agree(ok: bool, tensors: Iterable[Tensor]) -> bool:
    """``ok`` and-ed over every rank when any of ``tensors`` is sharded, else ``ok`` (no communication).

    A check made on local shards (finite gradients) can fail on one rank only; all ranks must then take
    the same branch (raise together), or the others would wait forever in the next collective.
    """
    sharded = next((t for t in tensors if is_sharded(t)), None)
    if sharded is None:
        return ok
    flag = torch.tensor(1.0 if ok else 0.0, device=local_tensor(sharded).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=_group(sharded))
    return bool(flag.item() == 1.0)
