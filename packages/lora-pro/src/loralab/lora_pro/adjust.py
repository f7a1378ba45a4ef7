"""LoRA-Pro's gradient adjustment as pure, batched functions on tensors (arXiv 2407.18242, §2).

Notation (PEFT's layout): a LoRA layer computes ``W = W0 + s·B·A`` with ``B`` (m, r), ``A`` (r, n) and
scaling ``s``. With ``G`` = ∂L/∂W (m, n), the LoRA gradients are ``g_A = s·BᵀG`` and ``g_B = s·G·Aᵀ``.
One step of (any) gradient method on A, B with directions ``gᴬ``, ``gᴮ`` moves W, to first order,
along the *equivalent gradient* (paper, Eq. 3)::

    g̃ = s·B·gᴬ + s·gᴮ·A

LoRA-Pro picks ``gᴬ``, ``gᴮ`` so that ``g̃`` is the closest such matrix to ``G`` (paper, Theorem 2.1)::

    gᴬ = (1/s²)(BᵀB)⁻¹ g_A + X·A
    gᴮ = (1/s²)[I − B(BᵀB)⁻¹Bᵀ] g_B (AAᵀ)⁻¹ − B·X

for any r×r ``X`` (``X`` cancels in ``g̃``). Theorem 2.3 picks the ``X`` that keeps ``(gᴬ, gᴮ)`` closest
to the raw ``(g_A, g_B)``: the solution of the Sylvester equation (Eq. 9)::

    BᵀB·X + X·AAᵀ = −(1/s²)(BᵀB)⁻¹ g_A Aᵀ

``x_mode="zero"`` takes ``X = 0`` and ``x_mode="symmetry"`` the closed form of the official code
(``X = −(1/(2s²))(BᵀB)⁻¹ Bᵀ g_B AAᵀ``, ``peta/optim.py``; note it is not invariant to the rescaling
``A → cA, B → B/c`` that leaves W unchanged, unlike the other two modes). ``x_mode="sylvester_swapped"``
solves ``AAᵀ·X + X·BᵀB`` = the same right-hand side: what ``lora-pro-adamw``'s default efficient
solver (``"vec"``, a row-major vec with the column-major Kronecker identity) computes. Any ``X`` keeps
``g̃`` optimal (it cancels); only the split of the update between A and B differs.

Singular Gram matrices. At LoRA's initialisation ``B = 0``: ``BᵀB`` is singular and ``(BᵀB)⁻¹`` does
not exist. We use the Moore–Penrose pseudo-inverse (eigenvalues at round-off level dropped, see
:func:`loralab.core.ridge_inverse`), optionally with a *relative* ridge. This is not a heuristic: with
pseudo-inverses the formulas above give the **minimum-norm least-squares** solution, which for
``B = 0`` is ``gᴬ = 0``, ``gᴮ = (1/s²) g_B (AAᵀ)⁻¹`` — exactly the first-step rule of the official
code, obtained here without a special case (and right also for an init with ``B ≠ 0``).

Precision. The Gram matrices and all the r×r algebra (eigendecompositions, inverses, the Sylvester
solve) run in float64, from float64 copies of ``A`` and ``B`` (LoRA-sized). A few steps after
``B = 0`` the columns of ``B`` are nearly dependent (κ(B) ≈ 10³ measured on a 3-step GLUE run): a Gram
formed and decomposed in float32 has its smallest eigenvalue, which ``(BᵀB)⁻¹`` follows, wrong by
about ``u·κ(B)²`` relative (u = 6e-8: 5e-2 there; the runs' factors then differed by as much from the
exact float64 run, and a 2-rank DeepSpeed run from one process by 4.4e-2). With float32 inputs the
remaining error of ``gᴬ``, ``gᴮ``, ``X`` and ``g̃`` is of the order of ``u·κ(B)`` (tested). The
products with (m|n)-sized data stay in float32; :func:`optimal_equivalent_gradient` does all but its
two m×n products in float64, since ``B·[(BᵀB)⁻¹g_A]`` with the inverse applied in float32 is off by
``u·κ(B)²`` again (along B's large singular directions, which is what moves ``W``). For the same
reason ``B·gᴬ`` from :func:`lora_pro_gradients` on float32 inputs keeps an error up to ``u·κ(B)²``
(3e-3 measured at κ = 10³, 3e-2 before): full mode hands it float64 factors.

Every function accepts leading batch dimensions (all layers of one shape in one call) and computes
in float32 (float64 stays float64) on the inputs' device, the r×r part in float64 (see above).

Example:
    >>> import torch
    >>> A, B = torch.randn(4, 12), torch.randn(10, 4)
    >>> G = torch.randn(10, 12)
    >>> gA, gB = lora_pro_gradients(A, B, 2.0 * B.T @ G, 2.0 * G @ A.T, 2.0)
    >>> gA.shape, gB.shape
    (torch.Size([4, 12]), torch.Size([10, 4]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from loralab.core.linalg import (
    accumulation_dtype,
    ridge_inverse_from_eigh,
    solve_sylvester_from_eigh,
)

__all__ = [
    "X_MODES",
    "XMode",
    "equivalent_gradient",
    "lora_gradients",
    "lora_pro_gradients",
    "lora_pro_gradients_buckets",
    "lora_pro_gradients_stacked",
    "optimal_equivalent_gradient",
    "solve_x",
]

XMode = Literal["sylvester", "zero", "symmetry", "sylvester_swapped"]
X_MODES: tuple[str, ...] = ("sylvester", "zero", "symmetry", "sylvester_swapped")


def _scale(scaling: float | Tensor, like: Tensor) -> Tensor:
    s = torch.as_tensor(scaling, dtype=like.dtype, device=like.device)
    if s.dim() > 0:  # one scaling per layer of the batch
        s = s.reshape(*s.shape, 1, 1)
    if not torch.all(s != 0):
        raise ValueError("LoRA scaling must be non-zero (lora_alpha = 0 makes the adapter a no-op)")
    return s


def _check_factors(A: Tensor, B: Tensor, g_A: Tensor, g_B: Tensor) -> None:
    if A.dim() < 2 or B.dim() < 2:
        raise ValueError(
            f"A and B must be matrices (r, n) and (m, r), got shapes {tuple(A.shape)} and {tuple(B.shape)}"
        )
    if A.shape[-2] != B.shape[-1]:
        raise ValueError(
            f"rank mismatch: A is {tuple(A.shape)} (r, n) but B is {tuple(B.shape)} (m, r)"
        )
    if g_A.shape != A.shape or g_B.shape != B.shape:
        raise ValueError(
            f"gradient shapes must match the factors: g_A {tuple(g_A.shape)} vs A {tuple(A.shape)}, g_B {tuple(g_B.shape)} vs B {tuple(B.shape)}"
        )


def equivalent_gradient(
    A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, scaling: float | Tensor
) -> Tensor:
    """``g̃ = s·B·gᴬ + s·gᴮ·A`` (paper, Eq. 3): the full-weight direction a LoRA step follows."""
    s = _scale(scaling, A)
    return s * (B @ gA + gB @ A)


def lora_gradients(
    A: Tensor, B: Tensor, G: Tensor, scaling: float | Tensor
) -> tuple[Tensor, Tensor]:
    """The LoRA gradients of a full-weight gradient ``G``: ``(g_A, g_B) = (s·BᵀG, s·G·Aᵀ)``.

    Full mode uses it to bring the Adam direction (an m×n matrix) back to the factors.
    """
    s = _scale(scaling, G)
    return s * (B.mT @ G), s * (G @ A.mT)


def _gram_dtype(device: torch.device) -> torch.dtype:
    # float64 for the Grams and the r×r algebra (module docstring, "Precision"); MPS has no float64
    return torch.float32 if device.type == "mps" else torch.float64


def _eigh_grams(
    A: Tensor, B: Tensor, jitter: float = 0.0
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """``(BᵀB, its eigenvalues, eigenvectors)`` and the same for ``AAᵀ``: one batched ``eigh`` call,
    Grams formed and decomposed in float64 (see the module docstring, "Precision")."""
    gd = _gram_dtype(A.device)
    A, B = A.to(gd), B.to(gd)
    return _eigh_pair(B.mT @ B, A @ A.mT, jitter)


def _check_jitter(jitter: float) -> None:
    if not jitter >= 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")


def _eigh_pair(
    BtB: Tensor, AAt: Tensor, jitter: float = 0.0
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    # One eigendecomposition per Gram matrix serves both its pseudo-inverse and the Sylvester solve
    # (core's ridge_inverse_from_eigh and solve_sylvester_from_eigh; symmetrised first, as core does), and
    # both Grams of every layer of the batch go through a single batched call. ``jitter`` > 0 replaces
    # both Grams by Gram + jitter·I everywhere (inverses, projector, Sylvester): lora-pro-adamw's
    # regularisation (absolute 1e-6 in its efficient mode, 1e-8 in its full mode).
    gd = _gram_dtype(BtB.device)
    BtB, AAt = BtB.to(gd), AAt.to(gd)
    if jitter:
        eye = torch.eye(BtB.shape[-1], dtype=BtB.dtype, device=BtB.device)
        BtB, AAt = BtB + jitter * eye, AAt + jitter * eye
    grams = torch.stack([BtB, AAt])
    evals, evecs = torch.linalg.eigh(0.5 * (grams + grams.mT))
    return (BtB, evals[0], evecs[0]), (AAt, evals[1], evecs[1])


def solve_x(
    A: Tensor,
    B: Tensor,
    g_A: Tensor,
    g_B: Tensor,
    scaling: float | Tensor,
    *,
    x_mode: XMode = "sylvester",
    ridge: float = 0.0,
    jitter: float = 0.0,
) -> Tensor:
    """The r×r matrix ``X`` of Theorem 2.1 chosen by ``x_mode`` (see the module docstring)."""
    if x_mode not in X_MODES:
        raise ValueError(f"x_mode must be one of {X_MODES}, got {x_mode!r}")
    _check_jitter(jitter)
    dt = accumulation_dtype(A.dtype)
    A, B, g_A, g_B = (t.to(dt) for t in (A, B, g_A, g_B))
    eb, ea = _eigh_grams(A, B, jitter)
    s = _scale(scaling, eb[0])
    BtB_inv_s2 = ridge_inverse_from_eigh(*eb, ridge) / s**2
    gd = eb[0].dtype
    return _x_from_eighs((g_A @ A.mT).to(gd), BtB_inv_s2, (B.mT @ g_B).to(gd), eb, ea, x_mode).to(
        dt
    )


def _x_from_eighs(gAAt, BtB_inv_s2, Btg_B, eb, ea, x_mode) -> Tensor:
    # gAAt = g_A Aᵀ, BtB_inv_s2 = (1/s²)(BᵀB)⁻¹ and Btg_B = Bᵀg_B are r×r: everything here is r×r
    BtB, AAt = eb[0], ea[0]
    if x_mode == "zero":
        return torch.zeros_like(BtB)
    if x_mode == "symmetry":
        # the official code's closed form (peta/optim.py, X_mode="symmetry")
        return -0.5 * (BtB_inv_s2 @ Btg_B @ AAt)
    # Theorem 2.3 / Eq. 9: BᵀB X + X AAᵀ = −(1/s²)(BᵀB)⁻¹ g_A Aᵀ, solved for all layers at once on the
    # eigenbases of the two symmetric PSD Gram matrices (r×r, cheap), never via SciPy or the CPU.
    rhs = -(BtB_inv_s2 @ gAAt)
    if x_mode == "sylvester_swapped":
        # AAᵀ X + X BᵀB = rhs: lora-pro-adamw's "vec" solver (see the module docstring)
        return solve_sylvester_from_eigh(ea[2], ea[1], eb[2], eb[1], rhs)
    return solve_sylvester_from_eigh(eb[2], eb[1], ea[2], ea[1], rhs)


def lora_pro_gradients(
    A: Tensor,
    B: Tensor,
    g_A: Tensor,
    g_B: Tensor,
    scaling: float | Tensor,
    *,
    x_mode: XMode = "sylvester",
    ridge: float = 0.0,
    jitter: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """LoRA-Pro's adjusted gradients ``(gᴬ, gᴮ)`` (Theorem 2.1 with ``X`` from ``x_mode``).

    Args:
        A: (..., r, n) down projection(s).
        B: (..., m, r) up projection(s).
        g_A: (..., r, n) gradient w.r.t. A (``s·BᵀG``).
        g_B: (..., m, r) gradient w.r.t. B (``s·G·Aᵀ``).
        scaling: ``s``; a float, or a tensor of shape ``(...)`` with one value per batched layer.
        x_mode: ``"sylvester"`` (Theorem 2.3, default), ``"zero"``, ``"symmetry"`` or
            ``"sylvester_swapped"`` (lora-pro-adamw's "vec" solver).
        ridge: relative ridge for ``(BᵀB)⁻¹`` and ``(AAᵀ)⁻¹`` (``0`` = pseudo-inverse, the exact
            minimum-norm least-squares solution).
        jitter: absolute ``jitter·I`` added to ``BᵀB`` and ``AAᵀ`` before everything (``0`` = none;
            lora-pro-adamw uses 1e-6 in efficient mode, 1e-8 in full mode).

    Returns:
        ``(gᴬ, gᴮ)`` in the accumulation dtype (float32, or float64 for float64 inputs).

    Example:
        >>> A, B = torch.randn(2, 4, 12), torch.zeros(2, 10, 4)   # two layers, fresh LoRA init
        >>> gA, gB = lora_pro_gradients(A, B, torch.zeros(2, 4, 12), torch.randn(2, 10, 4), 2.0)
        >>> bool(gA.abs().max() == 0)
        True
    """
    _check_factors(A, B, g_A, g_B)
    if x_mode not in X_MODES:
        raise ValueError(f"x_mode must be one of {X_MODES}, got {x_mode!r}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    _check_jitter(jitter)
    dt = accumulation_dtype(A.dtype)
    A_gA = torch.cat([A.to(dt), g_A.to(dt)], dim=-2)
    B_gB = torch.cat([B.to(dt), g_B.to(dt)], dim=-1)
    return lora_pro_gradients_stacked(
        A_gA, B_gB, scaling, x_mode=x_mode, ridge=ridge, jitter=jitter
    )


def lora_pro_gradients_stacked(
    A_gA: Tensor,
    B_gB: Tensor,
    scaling: float | Tensor,
    *,
    x_mode: XMode = "sylvester",
    ridge: float = 0.0,
    jitter: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """:func:`lora_pro_gradients` on ``A_gA = [A; g_A]`` (..., 2r, n) and ``B_gB = [B | g_B]`` (..., m, 2r).

    The optimizer's fast path: with each factor stored next to its gradient, the whole adjustment is
    four batched products over (m|n)×r data (two Gram-like products in, two products out, each with a
    2r-wide side) plus r×r work, instead of eight products and two element-wise passes. Same maths;
    inputs must already be in the accumulation dtype (float32 or float64).
    """
    r = A_gA.shape[-2] // 2
    batch = A_gA.shape[:-2]
    s = torch.as_tensor(scaling, dtype=A_gA.dtype, device=A_gA.device).expand(batch).reshape(-1)
    ((gA, gB),) = lora_pro_gradients_buckets(
        [A_gA.reshape(-1, 2 * r, A_gA.shape[-1])],
        [B_gB.reshape(-1, B_gB.shape[-2], B_gB.shape[-1])],
        [s],
        x_mode=x_mode,
        ridge=ridge,
        jitter=jitter,
    )
    return gA.reshape(*batch, *gA.shape[-2:]), gB.reshape(*batch, *gB.shape[-2:])


def lora_pro_gradients_buckets(
    A_gAs: Sequence[Tensor],
    B_gBs: Sequence[Tensor],
    scalings: Sequence[Tensor],
    *,
    x_mode: XMode = "sylvester",
    ridge: float = 0.0,
    jitter: float = 0.0,
) -> list[tuple[Tensor, Tensor]]:
    """:func:`lora_pro_gradients_stacked` for several stacks of layers of one rank at once.

    Each stack ``k`` holds the layers of one shape: ``A_gAs[k]`` (L_k, 2r, n_k), ``B_gBs[k]``
    (L_k, m_k, 2r), ``scalings[k]`` (L_k,). The products that touch (m|n)×r data run per stack; all
    the r×r work (Gram eigendecompositions, pseudo-inverses, the Sylvester solve) runs once, batched
    over every layer of every stack. Returns ``[(gᴬ, gᴮ)]`` per stack.
    """
    if not A_gAs or not (len(A_gAs) == len(B_gBs) == len(scalings)):
        raise ValueError("need one A_gA, B_gB and scaling tensor per stack, and at least one stack")
    r = A_gAs[0].shape[-2] // 2
    for A_gA, B_gB in zip(A_gAs, B_gBs):
        if (
            A_gA.dim() != 3
            or B_gB.dim() != 3
            or A_gA.shape[-2] != 2 * r
            or B_gB.shape[-1] != 2 * r
            or A_gA.shape[0] != B_gB.shape[0]
        ):
            raise ValueError(
                f"every stack must be A_gA (L, 2r, n) and B_gB (L, m, 2r) with one rank r = {r}, got "
                f"{tuple(A_gA.shape)} and {tuple(B_gB.shape)}"
            )
    # AAᵀ, g_A Aᵀ, BᵀB and Bᵀg_B: the four r×r products that read A, g_A, B, g_B; the Grams from
    # float64 copies of A and B (module docstring, "Precision"), the other two in the inputs' dtype
    dt, gd = A_gAs[0].dtype, _gram_dtype(A_gAs[0].device)
    A64s = [A_gA[:, :r].to(gd) for A_gA in A_gAs]
    B64s = [B_gB[..., :r].to(gd) for B_gB in B_gBs]
    AAt = _cat([a @ a.mT for a in A64s])
    BtB = _cat([b.mT @ b for b in B64s])
    del A64s, B64s
    gAAt = _cat([A_gA[:, r:] @ A_gA[:, :r].mT for A_gA in A_gAs]).to(gd)
    Btg_B = _cat([B_gB[..., :r].mT @ B_gB[..., r:] for B_gB in B_gBs]).to(gd)
    s2 = _scale(_cat(list(scalings)), AAt) ** 2
    eb, ea = _eigh_pair(BtB, AAt, jitter)
    BtB_inv = ridge_inverse_from_eigh(*eb, ridge)
    AAt_inv = ridge_inverse_from_eigh(*ea, ridge)
    # The 1/s² and every product that can be are folded into r×r matrices (the m×m projector is never
    # formed):
    #   gᴬ = [(1/s²)(BᵀB)⁻¹] g_A + X·A                      = [X | (1/s²)(BᵀB)⁻¹] · [A; g_A]
    #   gᴮ = (1/s²)[I − B(BᵀB)⁻¹Bᵀ] g_B (AAᵀ)⁻¹ − B·X
    #      = g_B [(1/s²)(AAᵀ)⁻¹] − B·[Y + X]                = [B | g_B] · [−(Y + X); (1/s²)(AAᵀ)⁻¹]
    #   Y = (1/s²)(BᵀB)⁻¹ (Bᵀg_B) (AAᵀ)⁻¹
    BtB_inv_s2 = BtB_inv / s2
    AAt_inv_s2 = AAt_inv / s2
    Y = BtB_inv_s2 @ Btg_B @ AAt_inv
    if x_mode == "zero":
        coef_A, YX = BtB_inv_s2, Y
    else:
        X = _x_from_eighs(gAAt, BtB_inv_s2, Btg_B, eb, ea, x_mode)
        coef_A, YX = torch.cat([X, BtB_inv_s2], dim=-1), Y + X
    # the r×r coefficients back in the inputs' dtype for the (m|n)×r products
    coef_A = coef_A.to(dt)
    coef_B = torch.cat([-YX, AAt_inv_s2], dim=-2).to(dt)
    sizes = [t.shape[0] for t in A_gAs]
    out = []
    for A_gA, B_gB, cA, cB in zip(A_gAs, B_gBs, coef_A.split(sizes), coef_B.split(sizes)):
        gA = cA @ (A_gA[:, r:] if x_mode == "zero" else A_gA)
        out.append((gA, B_gB @ cB))
    return out


def _cat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def optimal_equivalent_gradient(
    A: Tensor,
    B: Tensor,
    g_A: Tensor,
    g_B: Tensor,
    scaling: float | Tensor,
    *,
    ridge: float = 0.0,
    jitter: float = 0.0,
    rows: slice | None = None,
) -> Tensor:
    """The optimal ``g̃`` (m, n) directly: ``(1/s)[B(BᵀB)⁻¹g_A + (I − P_B) g_B (AAᵀ)⁻¹ A]``.

    Equals ``P_B·G + (I − P_B)·G·P_A`` (projections onto B's columns and A's rows) and does not depend
    on ``X``. Full mode runs Adam on it (paper, Algorithm 1). ``rows`` (a slice of the m rows) gives
    ``g̃[..., rows, :]`` only, built from the same rows of ``B`` and ``g_B`` (the r×r products still
    use them whole): a rank of a row-sharded layer never builds the whole m×n matrix.

    Example:
        >>> import torch
        >>> gen = torch.Generator().manual_seed(0)
        >>> A, B, gA, gB = (torch.randn(*s, generator=gen) for s in ((2, 5), (4, 2), (2, 5), (4, 2)))
        >>> full = optimal_equivalent_gradient(A, B, gA, gB, 2.0)
        >>> rows = optimal_equivalent_gradient(A, B, gA, gB, 2.0, rows=slice(1, 3))
        >>> torch.allclose(rows, full[1:3], atol=1e-6)
        True
    """
    _check_factors(A, B, g_A, g_B)
    _check_jitter(jitter)
    # the LoRA-sized and r×r work in float64, only the two m×n products in float32 (float64 stays
    # float64): with the inverses rounded to float32 first, B·(BᵀB)⁻¹g_A would carry an error of
    # u·κ(B)² relative (module docstring, "Precision"); this way u·κ(B)
    dt, gd = accumulation_dtype(A.dtype), _gram_dtype(A.device)
    A, B, g_A, g_B = (t.to(gd) for t in (A, B, g_A, g_B))
    s = _scale(scaling, A)
    eb, ea = _eigh_grams(A, B, jitter)
    BtB_inv, AAt_inv = ridge_inverse_from_eigh(*eb, ridge), ridge_inverse_from_eigh(*ea, ridge)
    M = g_B @ AAt_inv  # m×r
    K = BtB_inv @ (B.mT @ M)  # r×r, from the whole B and M
    if rows is not None:
        B, M = B[..., rows, :], M[..., rows, :]
    M = M - B @ K
    Z = BtB_inv @ g_A  # r×n
    return B.to(dt) @ (Z / s).to(dt) + (M / s).to(dt) @ A.to(dt)
