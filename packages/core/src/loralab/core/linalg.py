"""Low-rank linear algebra shared by every method.

Everything here works on the tensors' own device, accumulates in at least float32, and accepts
batched inputs (leading dimensions) where that makes sense, so that methods can solve all layers of
one shape in a single call instead of looping in Python or round-tripping to NumPy/SciPy.

Example:
    >>> import torch
    >>> from loralab.core.linalg import truncated_svd, stiefel_sample
    >>> g = torch.randn(64, 32)
    >>> U, S, Vh = truncated_svd(g, 8)
    >>> U.shape, S.shape, Vh.shape
    (torch.Size([64, 8]), torch.Size([8]), torch.Size([8, 32]))
    >>> Q = stiefel_sample(64, 8, generator=torch.Generator().manual_seed(0))
    >>> torch.allclose(Q.T @ Q, torch.eye(8), atol=1e-5)
    True
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "SVDResult",
    "accumulation_dtype",
    "ridge_inverse",
    "ridge_inverse_from_eigh",
    "ridge_solve",
    "solve_sylvester_from_eigh",
    "solve_sylvester_psd",
    "stiefel_sample",
    "truncated_svd",
]

SVDMethod = Literal["auto", "full", "randomized"]


class SVDResult(NamedTuple):
    """Thin SVD factors: ``M ≈ U @ diag(S) @ Vh`` with ``U`` (m, k), ``S`` (k,), ``Vh`` (k, n)."""

    U: Tensor
    S: Tensor
    Vh: Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to do linear algebra in: float64 stays float64, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_matrix(name: str, m: Tensor, min_dim: int = 2) -> None:
    if not isinstance(m, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(m).__name__}")
    if m.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimensions, got shape {tuple(m.shape)}"
        )
    if not m.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {m.dtype}")


def truncated_svd(
    matrix: Tensor,
    rank: int,
    *,
    method: SVDMethod = "auto",
    oversample: int = 10,
    niter: int = 4,
    generator: torch.Generator | None = None,
) -> SVDResult:
    """Top-``rank`` singular triplets of ``matrix`` (m, n), computed in float32 (float64 stays float64).

    Args:
        matrix: the (m, n) matrix; leading batch dimensions are allowed with ``method="full"``.
        rank: how many singular triplets to return, ``1 <= rank <= min(m, n)``.
        method: ``"full"`` uses ``torch.linalg.svd`` (exact); ``"randomized"`` uses a randomized range
            finder with ``oversample`` extra columns and ``niter`` power iterations (Halko et al., 2011),
            much faster when ``rank << min(m, n)``; ``"auto"`` picks randomized when
            ``rank + oversample < min(m, n) / 2``, else full.
        oversample: extra columns of the randomized sketch. Oversampling matters: sign matrices and
            noise-dominated gradients have flat spectra, where a sketch of exactly ``rank`` columns
            lands far from the best rank-``rank`` approximation.
        niter: power iterations of the randomized method.
        generator: RNG for the randomized sketch, so results never depend on (or touch) the global RNG.

    Returns:
        ``SVDResult(U, S, Vh)`` with U (m, rank), S (rank,) descending, Vh (rank, n), in the
        accumulation dtype and on ``matrix``'s device.

    Example:
        >>> U, S, Vh = truncated_svd(torch.randn(20, 10), 3, method="full")
        >>> S.shape
        torch.Size([3])
    """
    _check_matrix("matrix", matrix)
    m, n = matrix.shape[-2:]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or rank > min(m, n):
        raise ValueError(
            f"rank must be an int in [1, min(m, n)] = [1, {min(m, n)}] for a {m}x{n} matrix, got {rank!r}"
        )
    if method not in ("auto", "full", "randomized"):
        raise ValueError(f"method must be 'auto', 'full' or 'randomized', got {method!r}")
    if oversample < 0 or niter < 0:
        raise ValueError(
            f"oversample and niter must be >= 0, got oversample={oversample}, niter={niter}"
        )
    a = matrix.to(accumulation_dtype(matrix.dtype))
    if not torch.isfinite(a).all():
        raise ValueError("truncated_svd: the matrix has non-finite values (NaN or Inf)")
    q = min(rank + oversample, m, n)
    if method == "auto":
        method = "randomized" if (a.dim() == 2 and 2 * q < min(m, n)) else "full"
    if method == "full" or q == min(m, n):
        U, S, Vh = torch.linalg.svd(a, full_matrices=False)
        return SVDResult(
            U[..., :rank].contiguous(), S[..., :rank].contiguous(), Vh[..., :rank, :].contiguous()
        )
    if a.dim() != 2:
        raise ValueError(f"method='randomized' takes one 2-D matrix, got shape {tuple(a.shape)}")
    # Randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.4): sketch the column space with
    # a Gaussian test matrix, sharpen it with power iterations (re-orthonormalised each time for
    # stability), then take an exact SVD of the small projected matrix.
    transpose = m < n
    if transpose:
        a = a.T
    omega = torch.randn(a.shape[1], q, generator=generator, dtype=a.dtype, device="cpu").to(
        a.device
    )
    y, _ = torch.linalg.qr(a @ omega)
    for _ in range(niter):
        z, _ = torch.linalg.qr(a.T @ y)
        y, _ = torch.linalg.qr(a @ z)
    b = y.T @ a
    ub, S, Vh = torch.linalg.svd(b, full_matrices=False)
    U = y @ ub
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    if transpose:
        U, Vh = Vh.T, U.T
    return SVDResult(U.contiguous(), S.contiguous(), Vh.contiguous())


def stiefel_sample(
    n: int,
    k: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    batch: tuple[int, ...] = (),
) -> Tensor:
    """A matrix drawn uniformly (Haar measure) from the Stiefel manifold {Q ∈ R^{n×k}: QᵀQ = I}.

    QR of an n×k standard Gaussian, with the signs of R's diagonal moved into Q: without that sign
    fix, Householder QR returns a Q whose distribution is not rotation invariant (Mezzadri 2007).
    Sampling is done in float64 on the CPU with ``generator``, so results are identical on every
    device and never touch the global RNG.

    Example:
        >>> Q = stiefel_sample(10, 4, generator=torch.Generator().manual_seed(0))
        >>> Q.shape
        torch.Size([10, 4])
    """
    if not (isinstance(n, int) and isinstance(k, int)) or k < 1 or n < k:
        raise ValueError(f"stiefel_sample needs integers 1 <= k <= n, got n={n!r}, k={k!r}")
    gauss = torch.randn(*batch, n, k, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    q = q * signs.unsqueeze(-2)
    return q.to(dtype=dtype, device=device)


def ridge_inverse(gram: Tensor, ridge: float = 0.0, *, relative: bool = True) -> Tensor:
    """``(M + λI)⁻¹`` for a batch of symmetric positive semi-definite matrices ``M`` (..., r, r).

    With ``relative=True`` the ridge is scaled by the mean diagonal of ``M`` (so it is unit-free);
    ``ridge=0`` gives the exact inverse (or the pseudo-inverse when ``M`` is singular). Computed in
    float32/float64 through an eigendecomposition, which handles singular and near-singular ``M``
    without raising, as happens with LoRA's ``B = 0`` at initialisation.

    Example:
        >>> a = torch.randn(4, 16)
        >>> torch.allclose(ridge_inverse(a @ a.T) @ (a @ a.T), torch.eye(4), atol=1e-4)
        True
    """
    _check_matrix("gram", gram)
    if gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must be square, got shape {tuple(gram.shape)}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    dt = accumulation_dtype(gram.dtype)
    m = gram.to(dt)
    evals, evecs = torch.linalg.eigh(0.5 * (m + m.transpose(-1, -2)))
    return ridge_inverse_from_eigh(m, evals, evecs, ridge, relative=relative)


def ridge_inverse_from_eigh(
    gram: Tensor, evals: Tensor, evecs: Tensor, ridge: float = 0.0, *, relative: bool = True
) -> Tensor:
    """:func:`ridge_inverse` of ``gram`` given its eigendecomposition ``gram = V diag(λ) Vᵀ``.

    For callers that already decomposed ``gram`` for something else (LoRA-Pro reuses one ``eigh``
    for the pseudo-inverse and the Sylvester solve). ``gram`` is only read for the relative ridge.

    Example:
        >>> a = torch.randn(4, 16); g = a @ a.T
        >>> lam, v = torch.linalg.eigh(g)
        >>> torch.allclose(ridge_inverse_from_eigh(g, lam, v), ridge_inverse(g), atol=1e-5)
        True
    """
    if (
        evecs.shape[-2:] != (evals.shape[-1], evals.shape[-1])
        or evals.shape[:-1] != evecs.shape[:-2]
    ):
        raise ValueError(
            f"evals (..., r) and evecs (..., r, r) must come from one eigh, got {tuple(evals.shape)} "
            f"and {tuple(evecs.shape)}"
        )
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    dt = evals.dtype
    lam: float | Tensor = ridge
    if relative and ridge > 0:
        lam = ridge * torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1, keepdim=True).clamp_min(
            torch.finfo(dt).tiny
        )
    shifted = evals + lam
    # Pseudo-inverse semantics for the null space: eigenvalues at round-off level are dropped.
    tol = evals.abs().amax(-1, keepdim=True) * evals.shape[-1] * torch.finfo(dt).eps
    inv = torch.where(shifted.abs() > tol, 1.0 / shifted, torch.zeros_like(shifted))
    return (evecs * inv.unsqueeze(-2)) @ evecs.transpose(-1, -2)


def ridge_solve(
    gram: Tensor,
    rhs: Tensor,
    ridge: float = 0.0,
    *,
    side: Literal["left", "right"] = "left",
    relative: bool = True,
) -> Tensor:
    """Solve ``(M + λI) X = rhs`` (``side="left"``) or ``X (M + λI) = rhs`` (``side="right"``).

    ``M`` is a batch of symmetric PSD (r, r) matrices; see :func:`ridge_inverse` for the ridge.

    Example:
        >>> a = torch.randn(3, 8); g = torch.randn(5, 3)
        >>> x = ridge_solve(a @ a.T, g, side="right")
        >>> torch.allclose(x @ (a @ a.T), g, atol=1e-4)
        True
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    inv = ridge_inverse(gram, ridge, relative=relative)
    r = rhs.to(inv.dtype)
    return inv @ r if side == "left" else r @ inv


def solve_sylvester_psd(a: Tensor, b: Tensor, c: Tensor, *, eps: float = 0.0) -> Tensor:
    """Solve ``A X + X B = C`` for symmetric PSD ``A`` (..., p, p) and ``B`` (..., q, q), batched.

    Diagonalise ``A = P diag(α) Pᵀ`` and ``B = Q diag(β) Qᵀ``; then ``X = P [(Pᵀ C Q) / (αᵢ + βⱼ)] Qᵀ``
    (the Bartels–Stewart solution specialised to symmetric coefficients, which are what LoRA-Pro's
    ``BᵀB`` and ``AAᵀ`` are). Entries whose denominator is at round-off level (both matrices singular
    in those directions) are set to zero, the minimum-norm choice, with ``eps`` as an optional floor.
    Runs in float32 (float64 stays float64) on the inputs' device: one batched call for all layers.

    Example:
        >>> p = torch.randn(4, 4); a = p @ p.T; q = torch.randn(4, 4); b = q @ q.T
        >>> c = torch.randn(4, 4)
        >>> x = solve_sylvester_psd(a, b, c)
        >>> torch.allclose(a @ x + x @ b, c, atol=1e-3)
        True
    """
    for name, t in (("A", a), ("B", b), ("C", c)):
        _check_matrix(name, t)
    if a.shape[-1] != a.shape[-2] or b.shape[-1] != b.shape[-2]:
        raise ValueError(f"A and B must be square, got {tuple(a.shape)} and {tuple(b.shape)}")
    if c.shape[-2:] != (a.shape[-1], b.shape[-1]):
        raise ValueError(f"C must be ({a.shape[-1]}, {b.shape[-1]}), got {tuple(c.shape[-2:])}")
    dt = accumulation_dtype(torch.promote_types(torch.promote_types(a.dtype, b.dtype), c.dtype))
    a, b, c = a.to(dt), b.to(dt), c.to(dt)
    alpha, p = torch.linalg.eigh(0.5 * (a + a.transpose(-1, -2)))
    beta, q = torch.linalg.eigh(0.5 * (b + b.transpose(-1, -2)))
    return solve_sylvester_from_eigh(p, alpha, q, beta, c, eps=eps)


def solve_sylvester_from_eigh(
    p: Tensor, alpha: Tensor, q: Tensor, beta: Tensor, c: Tensor, *, eps: float = 0.0
) -> Tensor:
    """:func:`solve_sylvester_psd` given ``A = P diag(α) Pᵀ`` and ``B = Q diag(β) Qᵀ``.

    For callers that already hold the eigendecompositions (LoRA-Pro reuses them for its
    pseudo-inverses). ``c`` must be in the eigenvectors' dtype.

    Example:
        >>> x = torch.randn(4, 4); a = x @ x.T; y = torch.randn(3, 3); b = y @ y.T
        >>> c = torch.randn(4, 3)
        >>> (al, P), (be, Q) = torch.linalg.eigh(a), torch.linalg.eigh(b)
        >>> torch.allclose(solve_sylvester_from_eigh(P, al, Q, be, c), solve_sylvester_psd(a, b, c))
        True
    """
    if c.shape[-2:] != (alpha.shape[-1], beta.shape[-1]):
        raise ValueError(
            f"C must be ({alpha.shape[-1]}, {beta.shape[-1]}) to match the eigenvalues, got {tuple(c.shape[-2:])}"
        )
    denom = alpha.unsqueeze(-1) + beta.unsqueeze(-2)
    scale = torch.maximum(alpha.abs().amax(-1), beta.abs().amax(-1)).unsqueeze(-1).unsqueeze(-1)
    tol = torch.clamp_min(
        scale * max(alpha.shape[-1], beta.shape[-1]) * torch.finfo(alpha.dtype).eps, eps
    )
    ct = p.transpose(-1, -2) @ c @ q
    ok = denom.abs() > tol
    y = torch.where(ok, ct / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(ct))
    return p @ y @ q.transpose(-1, -2)
