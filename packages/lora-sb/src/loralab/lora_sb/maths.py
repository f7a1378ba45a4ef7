"""LoRA-SB maths as pure functions on (out, in) tensors, each checked against a dense float64 reference.

Notation (paper arXiv 2411.19557, Sec. 3-4): ``W = W0 + s·B·R·A`` with ``B`` (m×r), ``R`` (r×r),
``A`` (r×n); ``G`` is the full-weight gradient (m×n).

- Update approximation (Eq. 9): ``ΔW̃ = −lr · sign(G)``, the first Adam step of full fine-tuning
  (Adam's first step is ``−lr · m/√v = −lr · sign(g)`` up to ε), or ``−lr · G`` for SGD.
- Init (Eq. 10): ``ΔW̃ ≈ U_r Σ_r V_rᵀ``; ``B = U_r``, ``A = V_rᵀ``, ``R = Σ_r / s``, so that
  ``s·B·R·A = U_r Σ_r V_rᵀ`` whatever ``s`` (and hence ``α``) is.
- Gradients (Eq. 5-6): ``g_R = s·Bᵀ·G·Aᵀ``; updating ``R`` by ``−η·g_R`` moves ``W`` by the
  *equivalent gradient* ``g̃ = s·B·g_R·A = s²·B Bᵀ G AᵀA``, which for orthonormal ``B`` (columns) and
  ``A`` (rows) is ``s²`` times the projection of ``G`` onto the two subspaces (Theorem 3).

Example:
    >>> import torch
    >>> from loralab.lora_sb.maths import update_approximation, sb_factors
    >>> g = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    >>> delta = update_approximation(g, lr=1e-3)
    >>> B, R, A = sb_factors(delta, rank=4, scaling=2.0, method="full")
    >>> B.shape, R.shape, A.shape
    (torch.Size([16, 4]), torch.Size([4, 4]), torch.Size([4, 12]))
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from loralab.core.linalg import truncated_svd

__all__ = ["equivalent_gradient", "r_gradient", "sb_factors", "update_approximation"]


def update_approximation(
    grad: Tensor, lr: float, kind: Literal["sign", "gradient"] = "sign"
) -> Tensor:
    """``ΔW̃``: the first full fine-tuning step from gradient ``grad`` (paper Eq. 9).

    ``kind="sign"`` gives ``−lr·sign(grad)`` (Adam's first step; zero entries stay zero, never NaN),
    ``kind="gradient"`` gives ``−lr·grad`` (SGD). Computed in float32 (float64 stays float64).
    """
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(
            f"lr must be a positive number (the first optimizer step's learning rate), got {lr!r}"
        )
    g = grad.to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
    if kind == "sign":
        return torch.sign(g).mul_(-float(lr))
    if kind == "gradient":
        return g.mul(-float(lr))
    raise ValueError(f"kind must be 'sign' or 'gradient', got {kind!r}")


def sb_factors(
    delta: Tensor,
    rank: int,
    scaling: float,
    *,
    method: Literal["auto", "full", "randomized"] = "auto",
    oversample: int = 10,
    niter: int = 10,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, R, A)`` with ``scaling·B·R·A`` = the rank-``rank`` truncated SVD of ``delta`` (paper Eq. 10).

    ``B = U_r`` (m×r), ``R = diag(Σ_r)/scaling`` (r×r), ``A = V_rᵀ`` (r×n), all in the accumulation
    dtype (float32, or float64 for float64 input). ``generator`` seeds the randomized sketch.
    """
    if scaling == 0:
        raise ValueError("scaling must be non-zero")
    U, S, Vh = truncated_svd(
        delta, rank, method=method, oversample=oversample, niter=niter, generator=generator
    )
    return U, torch.diag(S / scaling), Vh


def r_gradient(G: Tensor, B: Tensor, A: Tensor, scaling: float) -> Tensor:
    """``g_R = s·Bᵀ·G·Aᵀ``: the gradient of the loss w.r.t. ``R`` given the full gradient ``G`` (Eq. 5)."""
    return scaling * (B.T @ G @ A.T)


def equivalent_gradient(G: Tensor, B: Tensor, A: Tensor, scaling: float) -> Tensor:
    """``g̃ = s·B·g_R·A``: the change of ``W`` per unit step on ``R`` (Eq. 6), an (m×n) matrix."""
    return scaling * (B @ r_gradient(G, B, A, scaling) @ A)
