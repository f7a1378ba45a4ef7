"""The gradient projector of GaLore / GoLore as pure functions on tensors.

A projector maps an (m, n) gradient ``G`` to a low-rank representation and back:

- ``side="left"``:  ``P`` is (m, r) with orthonormal columns; ``R = Pᵀ G`` (r, n); back: ``P R``.
- ``side="right"``: ``Q`` is (r, n) with orthonormal rows;    ``R = G Qᵀ`` (m, r); back: ``R Q``.
- ``side="full"``:  both; ``R = Pᵀ G Qᵀ`` (r, r); back: ``P R Q``.

Projection followed by back-projection is the orthogonal projection of ``G`` onto the subspace
(GaLore, arXiv 2403.03507, Eq. 4; GoLore, arXiv 2410.11289, Alg. 1). The layouts (``P`` (m, r) and
``Q`` (r, n)) are galore-torch's, so projector tensors are interchangeable with its ``ortho_matrix``.

Two ways to choose the subspace:

- ``"svd"`` (GaLore): the top-``r`` singular vectors of the current stochastic gradient;
- ``"random"`` (GoLore): a matrix drawn uniformly from the Stiefel manifold, independent of the
  gradient. With small batches the gradient is noise-dominated late in training and its top singular
  space is a noise space; a random subspace is unbiased in expectation
  (E[P Pᵀ] = (r/m) I), which is what GoLore's convergence proof needs (Thm. 5).

Which side ``proj_type`` picks (as galore-torch): ``std`` projects the *smaller* dimension
(right when m >= n, else left), so the optimizer state is (m, r) or (r, n); ``reverse_std`` the
opposite; ``left``/``right``/``full`` as named.

Row shards (FSDP2's ``fully_shard``: each rank holds a block ``G_k`` of the rows of ``G``): no rank
needs the whole ``G`` to project it. Each rank keeps its rows ``P_k`` of ``P`` and a column block of
``Q`` (r, n) (all-gathered whole where a step needs it: ``r·n`` numbers, against the ``m·n`` of a
weight), and :func:`project_shard` / :func:`transition_shard` use ``G·Qᵀ = [G_k·Qᵀ]_k``
(row-sharded result), ``Pᵀ·G = Σ_k P_kᵀ·G_k`` and ``Q_old·Q_newᵀ = Σ_k Q_old,k·Q_new,kᵀ``. A left
projection's ``Pᵀ·G`` is reduce-scattered by columns: each rank receives, and keeps its moments
for, its column block ``[Pᵀ·G]_{:, J_k}`` (the columns split as ``torch.chunk`` splits rows,
:func:`loralab.core.sharding.cols_of`), which Adam's elementwise maths and the change of basis
``C·R`` (C acts from the left, so columns never mix) respect; :func:`project_back_shard`
all-gathers the (r, n) direction and returns the rank's rows ``P_k·N``. For
``"full"`` the (r, r) ``Pᵀ·G·Qᵀ`` is all-reduced and kept whole on every rank: its change of basis
``C·R·D`` mixes columns (and rows), and r×r is r/n of a left projection's state.
:func:`project_back` of a rank's row blocks is the rank's rows of the update (``R_k·Q``, ``P_k·R·Q``).
Only a projector refresh by SVD needs the whole gradient (gathered by the optimizer, one matrix at a
time); :func:`shard_projector` then keeps the rank's rows of ``P`` and columns of ``Q``.

Example:
    >>> import torch
    >>> from loralab.golore.projector import new_projector, project, project_back, projector_side
    >>> g = torch.randn(32, 16, dtype=torch.float64)
    >>> side = projector_side(g.shape, "std")
    >>> mats = new_projector(g, 4, side, "svd")
    >>> low = project(g, mats, side)
    >>> low.shape
    torch.Size([32, 4])
    >>> project_back(low, mats, side).shape
    torch.Size([32, 16])
"""

from __future__ import annotations

from typing import Literal, cast

import torch
from torch import Tensor

from loralab.core.linalg import stiefel_sample, truncated_svd
from loralab.core.sharding import (
    cols_of,
    gather_columns,
    is_sharded,
    rows_of,
    sum_columns_over_shards,
    sum_over_shards_,
)

__all__ = [
    "PROJECTIONS",
    "PROJ_TYPES",
    "ProjType",
    "Projection",
    "Side",
    "effective_rank",
    "new_projector",
    "project",
    "project_back",
    "project_back_shard",
    "project_shard",
    "projector_side",
    "reproject_first_moment",
    "reproject_second_moment",
    "shard_projector",
    "transition_matrices",
    "transition_shard",
]

ProjType = Literal["std", "reverse_std", "left", "right", "full"]
Projection = Literal["svd", "random"]
Side = Literal["left", "right", "full"]
PROJ_TYPES: tuple[str, ...] = ("std", "reverse_std", "left", "right", "full")
PROJECTIONS: tuple[str, ...] = ("svd", "random")

Mats = tuple[Tensor, ...]
"""``(P,)`` for left, ``(Q,)`` for right, ``(P, Q)`` for full."""


def projector_side(shape: tuple[int, ...] | torch.Size, proj_type: str) -> Side:
    """Which side a ``proj_type`` projects for a gradient of ``shape`` (m, n), as galore-torch decides."""
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
    m, n = shape[-2], shape[-1]
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return cast(Side, proj_type)  # checked against PROJ_TYPES: one of "left", "right", "full"


def effective_rank(shape: tuple[int, ...] | torch.Size, rank: int, side: Side) -> int:
    """``rank`` clipped to the matrix's smaller dimension, on every side: an (m, n) gradient has at
    most ``min(m, n)`` singular vectors (galore-torch's ``U[:, :rank]`` / ``Vh[:rank]`` of the thin
    SVD clip the same way, silently), and a random projector keeps the SVD's shape so that GoLore's
    switch from SVD to random projectors leaves the moments' shape alone. ``side`` is kept for the
    callers' symmetry (it does not change the result).

    Example:
        >>> effective_rank((2, 150), 3, "right")  # 2 singular vectors at most
        2
    """
    m, n = shape[-2], shape[-1]
    return min(rank, m, n)


def new_projector(
    grad: Tensor,
    rank: int,
    side: Side,
    projection: Projection,
    *,
    generator: torch.Generator | None = None,
    svd_method: Literal["auto", "full", "randomized"] = "full",
    dtype: torch.dtype | None = None,
) -> Mats:
    """A fresh projector for ``grad`` (m, n).

    ``"svd"``: top-``rank`` singular vectors of ``grad`` (``truncated_svd`` in float32/float64; the
    randomized method is much faster for r ≪ min(m, n) at equal subspace quality, see the benchmark).
    ``"random"``: an exact uniform Stiefel sample (QR of a Gaussian with the sign fix, see
    :func:`loralab.core.linalg.stiefel_sample`) drawn from ``generator``; ``grad`` only gives the shape.
    The result is cast to ``dtype`` (default: ``grad``'s dtype, as galore-torch does).
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if grad.dim() != 2:
        raise ValueError(f"a projector needs a 2-D gradient, got shape {tuple(grad.shape)}")
    m, n = grad.shape
    r = effective_rank(grad.shape, rank, side)
    out_dtype = dtype or grad.dtype
    left: Tensor | None
    right: Tensor | None
    if projection == "svd":
        if not torch.isfinite(grad).all():
            raise FloatingPointError(
                f"GaLore projector: the gradient of shape {tuple(grad.shape)} has NaN/Inf values; cannot compute its SVD"
            )
        U, _, Vh = truncated_svd(grad, r, method=svd_method, generator=generator)
        left, right = U, Vh
    else:
        left = (
            stiefel_sample(m, r, generator=generator, dtype=torch.float64)
            if side in ("left", "full")
            else None
        )
        right = (
            stiefel_sample(n, r, generator=generator, dtype=torch.float64).T
            if side in ("right", "full")
            else None
        )

    def out(t: Tensor | None) -> Tensor:
        # side decides which factors exist, and only those are read below
        return cast(Tensor, t).to(device=grad.device, dtype=out_dtype).contiguous()

    if side == "left":
        return (out(left),)
    if side == "right":
        return (out(right),)
    return (out(left), out(right))


def project(grad: Tensor, mats: Mats, side: Side) -> Tensor:
    """The low-rank representation of ``grad``: ``PᵀG`` (left), ``GQᵀ`` (right), ``PᵀGQᵀ`` (full)."""
    g = grad.to(mats[0].dtype)
    if side == "left":
        return mats[0].T @ g
    if side == "right":
        return g @ mats[0].T
    return mats[0].T @ g @ mats[1].T


def project_back(low: Tensor, mats: Mats, side: Side) -> Tensor:
    """The full-space matrix of a low-rank representation: ``P R`` (left), ``R Q`` (right), ``P R Q``."""
    r = low.to(mats[0].dtype)
    if side == "left":
        return mats[0] @ r
    if side == "right":
        return r @ mats[0]
    return mats[0] @ r @ mats[1]


def transition_matrices(old: Mats, new: Mats, side: Side) -> Mats:
    """The change-of-basis between two projectors of one side.

    left: ``C = P_newᵀ P_old`` (r, r) acting as ``C R``; right: ``D = Q_old Q_newᵀ`` acting as ``R D``;
    full: both. ``project(project_back(R, old), new) == C R D`` without forming an (m, n) matrix.
    """
    if side == "left":
        return (new[0].T @ old[0],)
    if side == "right":
        return (old[0] @ new[0].T,)
    return (new[0].T @ old[0], old[1] @ new[1].T)


def _apply(trans: Mats, x: Tensor, side: Side) -> Tensor:
    if side == "left":
        return trans[0] @ x
    if side == "right":
        return x @ trans[0]
    return trans[0] @ x @ trans[1]


def reproject_first_moment(moment: Tensor, trans: Mats, side: Side) -> Tensor:
    """The first moment (or a momentum buffer) expressed in the new subspace.

    The moment ``M`` is a low-rank representation of the full-space average ``P M``; after a subspace
    change the optimizer must carry ``P_newᵀ (P_old M)`` (GoLore Alg. 1 applies this to momentum; the
    paper's ReLoRA-style code does it with ``exp_avg @ B0 @ B_newᵀ``). Neither reference's optimizer
    path keeps it: galore-torch never touches the moments (issue #54) and GoLore's ``golore_adamw``
    rebinds a local name, so the stored state stays in the old basis. Here the result is a new tensor;
    callers ``copy_`` it into the state.
    """
    return _apply(trans, moment, side)


def reproject_second_moment(exp_avg_sq: Tensor, trans: Mats, side: Side) -> Tensor:
    """The second moment carried into the new basis, treating its entries as independent variances.

    If the low-rank gradient entries ``x`` have (diagonal) second moments ``v``, the entries of
    ``C x`` have second moments ``(C ∘ C) v`` (Hadamard square of the transition), which is
    non-negative, exact for independent coordinates, and reduces to ``v`` when the subspace does not
    change. This is the ``second_moment="project"`` policy; ``"keep"`` leaves ``v`` as it is (what
    GoLore's ReLoRA path does, its projection of ``exp_avg_sq`` is commented out).
    """
    sq = tuple(t * t for t in trans)
    return _apply(sq, exp_avg_sq, side).clamp_min_(0)


def shard_projector(mats: Mats, side: Side, like: Tensor) -> Mats:
    """The part of a whole projector that this rank keeps for the row-sharded matrix ``like``: its rows
    of ``P`` (left, full) and its column block of ``Q`` (right, full; :func:`cols_of`, the blocks a left
    projection's moments are kept in), so no rank keeps more of a projector than its share. ``mats``
    itself when ``like`` is not sharded.

    Example:
        >>> import torch
        >>> p = torch.linalg.qr(torch.randn(6, 2))[0]
        >>> shard_projector((p,), "left", torch.zeros(6, 4))[0] is p  # one process: the whole P
        True
    """
    if not is_sharded(like):
        return mats
    kept = []
    if side != "right":
        kept.append(mats[0][rows_of(like)].contiguous())
    if side != "left":
        kept.append(mats[-1][:, cols_of(like, like.shape[1])].contiguous())
    return tuple(kept)


def _whole_q(mats: Mats, side: Side, like: Tensor, whole_q: Tensor | None) -> Mats:
    """``mats`` as :func:`shard_projector` keeps them, with ``Q`` (right, full) whole: ``whole_q``
    when the caller gathered it already (:func:`loralab.core.sharding.gather_columns_packed`, many
    matrices in one all-gather), else all-gathered here from the ranks' column blocks (call on every
    rank); ``mats`` itself for a left projection or when ``like`` is not sharded."""
    if side == "left" or not is_sharded(like):
        return mats
    q = gather_columns(mats[-1], like, like.shape[1]) if whole_q is None else whole_q
    return (*mats[:-1], q)


def project_shard(
    grad_rows: Tensor, mats: Mats, side: Side, like: Tensor, whole_q: Tensor | None = None
) -> Tensor:
    """:func:`project` of this rank's row block of the gradient of ``like``, ``mats`` as
    :func:`shard_projector` keeps them; :func:`project` when ``like`` is not sharded (call on every rank).

    - right: ``G_k·Qᵀ``, this rank's rows of the (m, r) result (``Q`` all-gathered from its
      column blocks, ``r·n`` numbers, unless the caller passes it whole as ``whole_q``);
    - left: this rank's column block (:func:`loralab.core.sharding.cols_of`) of ``Σ_k P_kᵀ·G_k``, the
      (r, n) partial products reduce-scattered by columns;
    - full: ``Σ_k P_kᵀ·G_k·Qᵀ``, the (r, r) partial products all-reduced, whole on every rank (``Q``
      all-gathered as for a right projection).

    Example:
        >>> import torch
        >>> g, q = torch.randn(6, 4), torch.linalg.qr(torch.randn(4, 2))[0].T
        >>> torch.equal(project_shard(g, (q,), "right", g), project(g, (q,), "right"))
        True
    """
    low = project(grad_rows, _whole_q(mats, side, like, whole_q), side)
    if side == "left":
        return sum_columns_over_shards(low, like)
    if side == "full":
        sum_over_shards_(low, like)
    return low


def project_back_shard(
    low: Tensor, mats: Mats, side: Side, like: Tensor, whole_q: Tensor | None = None
) -> Tensor:
    """:func:`project_back` of what :func:`project_shard` gave this rank (or a direction of the same
    layout): this rank's rows of the full-space update (call on every rank). Left: the (r, n) ``N``
    is all-gathered from the ranks' column blocks, then ``P_k·N``; right ``R_k·Q`` and full
    ``P_k·R·Q`` with ``Q`` all-gathered from its column blocks. :func:`project_back` when ``like`` is
    not sharded.

    Example:
        >>> import torch
        >>> p = torch.linalg.qr(torch.randn(6, 2))[0]
        >>> low = torch.randn(2, 4)
        >>> torch.equal(project_back_shard(low, (p,), "left", torch.zeros(6, 4)), p @ low)
        True
    """
    if side == "left":
        low = gather_columns(low, like, like.shape[1])
    return project_back(low, _whole_q(mats, side, like, whole_q), side)


def transition_shard(old: Mats, new: Mats, side: Side, like: Tensor) -> Mats:
    """:func:`transition_matrices` of projectors kept as :func:`shard_projector` does:
    ``C = P_newᵀ·P_old = Σ_k P_new,kᵀ·P_old,k`` over the row blocks and ``D = Q_old·Q_newᵀ =
    Σ_k Q_old,k·Q_new,kᵀ`` over the column blocks, each an (r, r) all-reduce (call on every rank).
    Each matrix is whole on every rank, so the moments' blocks re-project locally: a right
    projection's row block ``R_k·D``, a left one's column block ``C·R_{:, J_k} = (C·R)_{:, J_k}``
    (and ``(C∘C)·v_{:, J_k}``).

    Example:
        >>> import torch
        >>> old, new = (torch.linalg.qr(torch.randn(6, 2))[0] for _ in range(2))
        >>> g = torch.zeros(6, 4)
        >>> torch.equal(transition_shard((old,), (new,), "left", g)[0], new.T @ old)
        True
    """
    trans = transition_matrices(old, new, side)
    for t in trans:
        sum_over_shards_(t, like)
    return trans
