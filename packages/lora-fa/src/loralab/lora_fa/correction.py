"""LoRA-FA's closed-form correction of B's gradient, as pure functions on tensors.

With A frozen, one LoRA step moves the weight by ``ΔW = s·ΔB·A`` (``s`` the layer's scaling, A of
shape (r, in), B of shape (out, r)). LoRA-FA (Zhang et al., 2023, arXiv 2308.03303, §3 / Eq. 6 of the
LoRA-FA+ follow-up that PEFT implements) picks the B-gradient ``g̃_B`` whose induced update best matches
full fine-tuning's gradient ``G`` (out, in)::

    g̃_B = argmin_X ‖ s·X·A − G ‖_F = (1/s)·G·Aᵀ(A·Aᵀ)⁻¹

and since the LoRA gradient is ``g_B = s·G·Aᵀ`` (chain rule through ``W0 + s·B·A``) this needs only
what backward already produced::

    g̃_B = (1/s²) · g_B · (A·Aᵀ)⁻¹.

``(A·Aᵀ)⁻¹`` is r×r and A is frozen, so it is computed once per layer (in float64, with PEFT's small
ridge and pseudo-inverse semantics) and reused at every step. Layers of equal shape are corrected in
one batched ``bmm``.

Example:
    >>> import torch
    >>> gen = torch.Generator().manual_seed(0)
    >>> A, g_B = torch.randn(4, 32, generator=gen), torch.randn(16, 4, generator=gen)
    >>> M = correction_matrix(A, scaling=2.0)
    >>> torch.allclose(g_B @ M, g_B @ torch.linalg.inv(A @ A.T) / 4, atol=1e-4)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from loralab.core.linalg import ridge_inverse

__all__ = ["DEFAULT_RIDGE", "correct_grads", "correction_matrix", "optimal_b_gradient"]

DEFAULT_RIDGE = 1e-8
"""PEFT's ``delta``: ``pinv(A·Aᵀ + 1e-8·I)`` (absolute, not scaled by A's magnitude)."""


def correction_matrix(
    A: Tensor, scaling: float, *, ridge: float = DEFAULT_RIDGE, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``M = (1/s²)·(A·Aᵀ + ridge·I)⁺`` for one (r, in) or a stack (L, r, in) of frozen A's.

    Args:
        A: the down projection(s), shape (r, in) or (L, r, in).
        scaling: the layer's ``s`` (α/r, α/√r with rsLoRA), a float or a (L,) tensor for a stack.
        ridge: absolute ridge added to ``A·Aᵀ`` (PEFT uses 1e-8); the inverse is a pseudo-inverse on
            the numerical null space, so a rank-deficient A does not blow up.
        dtype: dtype of the returned matrix (computed in float64 first).

    Returns:
        (r, r) or (L, r, r): right-multiply B's gradient by it.
    """
    if A.dim() not in (2, 3):
        raise ValueError(f"A must be (r, in) or (L, r, in), got shape {tuple(A.shape)}")
    A64 = A.detach().to(torch.float64)
    gram = A64 @ A64.transpose(-1, -2)
    inv = ridge_inverse(gram, ridge=ridge, relative=False)
    s = torch.as_tensor(scaling, dtype=torch.float64, device=A.device)
    if s.dim() == 1:
        s = s.view(-1, 1, 1)
    return (inv / (s * s)).to(dtype)


def correct_grads(
    grads: Sequence[Tensor],
    matrices: Tensor | Sequence[Tensor],
    *,
    out_dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """``g̃_B = g_B · M`` for a list of B gradients of equal shape (out, r), batched in one ``bmm``.

    ``matrices`` is a (L, r, r) stack from :func:`correction_matrix` (or a list of (r, r)). The product
    is computed in ``matrices``' dtype (float32 for half-precision B's) and returned in ``out_dtype``
    (default: that dtype).
    """
    if not grads:
        return []
    M = matrices if isinstance(matrices, Tensor) else torch.stack(list(matrices))
    if M.dim() == 2:
        M = M.unsqueeze(0)
    if M.shape[0] != len(grads):
        raise ValueError(f"got {len(grads)} gradients but {M.shape[0]} correction matrices")
    G = torch.stack([g.to(M.dtype) for g in grads])
    out = torch.bmm(G, M)
    if out_dtype is not None and out_dtype != out.dtype:
        out = out.to(out_dtype)
    return list(out.unbind(0))


def optimal_b_gradient(full_grad: Tensor, A: Tensor, scaling: float) -> Tensor:
    """The least-squares optimum ``argmin_X ‖s·X·A − G‖_F`` directly from the full gradient ``G``.

    A dense reference (``torch.linalg.lstsq`` on ``(s·A)ᵀ Xᵀ = Gᵀ``), used by the tests to check that
    :func:`correction_matrix` applied to the LoRA gradient ``s·G·Aᵀ`` gives the same matrix.
    """
    sol = torch.linalg.lstsq((scaling * A).transpose(-1, -2), full_grad.transpose(-1, -2)).solution
    return sol.transpose(-1, -2)
