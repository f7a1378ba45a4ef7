"""Many projected matrices of one shape in a few kernels: GaLore's per-matrix products, batched.

A GaLore step projects each weight's gradient (``PᵀG`` or ``GQᵀ``) and adds each back-projected
update (``P·N`` or ``N·Q``): two matrix products per weight. On a GPU a small model's products take
microseconds each while their launches and the Python around them do not: llama_60m's optimizer step
launched ~320 kernels and took 3.7× AdamW's foreach step on an H200 (``benchmarks/c4_step_profile.py``).
The matrices of one shape (every layer's ``q_proj``, every ``up_proj``, ...) go through one ``bmm``
here and the updates are added with one ``_foreach_add_``.

Which path a matrix takes depends on its size only — never on how many matrices share the call — so
a ZeRO owner rank that steps one matrix at a time computes it as one process does:

- :func:`batchable` matrices (at most ``BATCH_ELEMENTS / 2`` elements) always go through ``bmm``, in
  chunks of at most ``BATCH_ELEMENTS`` stacked elements (the (k, m, n) temporaries are bounded);
- larger ones, where a launch is negligible next to the product, take one product each, the update
  added in place by ``addmm_`` (no (m, n) temporary).

Example:
    >>> import torch
    >>> gen = torch.Generator().manual_seed(0)
    >>> q = torch.linalg.qr(torch.randn(8, 3, generator=gen))[0].T  # (r, n): right side
    >>> grads = [torch.randn(5, 8, generator=gen) for _ in range(4)]
    >>> lows = project_batch(grads, [q] * 4, "right")
    >>> torch.allclose(lows[2], grads[2] @ q.T, atol=1e-6)  # bmm and mm round differently
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["BATCH_ELEMENTS", "add_back_batch_", "batchable", "chunks", "project_batch"]

BATCH_ELEMENTS = 1 << 24
"""Stacked elements of one batched call at most (64 MiB of float32 per temporary)."""


def batchable(matrix: Tensor, side: str | None) -> bool:
    """Whether a (m, n) matrix projected on ``side`` takes the batched path (left/right, small)."""
    return side in ("left", "right") and matrix.dim() == 2 and 2 * matrix.numel() <= BATCH_ELEMENTS


def chunks(count: int, numel: int) -> Iterator[slice]:
    """Slices of ``count`` matrices of ``numel`` elements, each at most ``BATCH_ELEMENTS`` stacked."""
    size = max(1, BATCH_ELEMENTS // max(numel, 1))
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def project_batch(grads: Sequence[Tensor], mats: Sequence[Tensor], side: str) -> list[Tensor]:
    """``[PᵀG]`` (left, ``mats`` the (m, r) ``P``) or ``[GQᵀ]`` (right, the (r, n) ``Q``), one ``bmm``.

    The results are views of one (k, ·, ·) tensor."""
    g, m = torch.stack(list(grads)), torch.stack(list(mats))
    low = torch.bmm(m.mT, g) if side == "left" else torch.bmm(g, m.mT)
    return list(low.unbind(0))


def add_back_batch_(
    params: Sequence[Tensor],
    lows: Sequence[Tensor],
    mats: Sequence[Tensor],
    side: str,
    alpha: float,
) -> None:
    """``p += alpha · P·N`` (left) or ``alpha · N·Q`` (right) for every ``p``: one ``bmm``, one
    ``_foreach_add_``."""
    low, m = torch.stack(list(lows)), torch.stack(list(mats))
    full = torch.bmm(m, low) if side == "left" else torch.bmm(low, m)
    torch._foreach_add_(list(params), list(full.unbind(0)), alpha=alpha)
