"""LoRA-GA initialisation maths as pure functions on tensors (no PEFT, no model).

Notation (paper, arXiv 2407.05000): a weight ``W0`` is an (m, n) = (out, in) matrix, ``G`` its
averaged gradient, LoRA adds ``s·B·A`` with ``B`` (m, r), ``A`` (r, n) and scaling ``s = α/r``
(``α/√r`` with rsLoRA).

- §3.2, Eq. 9-10: the first LoRA step changes ``W`` by ``−η s² (B Bᵀ G + G Aᵀ A)`` to first order;
  choosing ``A = Vh[:r]`` and ``B = U[:, r:2r]`` from ``G = U S Vh`` makes that change the best
  rank-2r approximation of full fine-tuning's ``−η G`` (up to the scale ``s²``).
- §3.3, Eq. 12 (stable scale): ``A`` and ``B`` both multiplied by ``m^{1/4}/√γ`` keep the adapter
  output's scale independent of the width (the paper writes ``γ``; the reference code divides by
  ``√γ``, see Outsider565/LoRA-GA issue #12: we follow the code, as does PEFT).
- §3.3, Eq. 13: ``W0 ← W0 − s·B·A`` so the step-0 output equals the base model's.

Example:
    >>> import torch
    >>> from loralab.lora_ga.maths import lora_ga_factors, offset_weight
    >>> G = torch.randn(32, 24)
    >>> A, B = lora_ga_factors(G, 4, scaling=2.0)
    >>> A.shape, B.shape
    (torch.Size([4, 24]), torch.Size([32, 4]))
    >>> W = torch.randn(32, 24)
    >>> torch.allclose(offset_weight(W, A, B, 2.0) + 2.0 * B @ A, W, atol=1e-5)
    True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from loralab.core.linalg import SVDMethod, truncated_svd

__all__ = [
    "LoraGARankError",
    "canonical_signs",
    "gradient_svd",
    "lora_ga_factors",
    "lora_scaling",
    "offset_weight",
    "peft_lora_ga_factors",
]


class LoraGARankError(ValueError):
    """The LoRA rank needs more singular vectors (2r) than the layer's gradient has (min(m, n))."""


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """LoRA's scaling ``s``: ``α/r``, or ``α/√r`` with rank-stabilised LoRA (as PEFT computes it)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def canonical_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip singular-vector pairs so the largest-magnitude entry of each ``U[:, k]`` is positive.

    ``U S Vh`` is unchanged, but the LoRA-GA factors ``B = U[:, r:2r]``, ``A = Vh[:r]`` pair vectors of
    *different* singular triplets, so ``B·A`` depends on each vector's arbitrary sign: fixing it makes
    the init independent of the SVD backend (and identical on every rank).
    """
    idx = U.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(U, 0, idx)).squeeze(0)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs.unsqueeze(-1)


def gradient_svd(
    grad: Tensor, k: int, *, niter: int = 4, seed: int = 0, method: SVDMethod = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` singular triplets of ``grad`` in float32 (float64 stays float64), canonical signs.

    Randomized with ``4r = 2k`` sketch columns and ``niter`` power iterations like the reference's
    ``torch.svd_lowrank(G, q=min(4r, min(m, n)), niter=4)``, but with a fixed seed (every rank and
    every run gets the same factors) and exact SVD when the sketch would not be smaller than the matrix.
    """
    gen = torch.Generator().manual_seed(seed)
    U, S, Vh = truncated_svd(grad, k, method=method, oversample=k, niter=niter, generator=gen)
    U, Vh = canonical_signs(U, Vh)
    return U, S, Vh


def lora_ga_factors(
    grad: Tensor,
    r: int,
    *,
    scaling: float,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16,
    weight: Tensor | None = None,
    seed: int = 0,
    name: str = "layer",
    svd_method: SVDMethod = "auto",
) -> tuple[Tensor, Tensor]:
    """LoRA-GA's ``(A, B)`` for one layer from its averaged gradient ``grad`` (m, n) = (out, in).

    Args:
        grad: the (out, in) gradient (any float dtype; computed in float32, float64 stays float64).
        r: LoRA rank; needs ``2r <= min(m, n)`` (the init uses 2r singular vectors).
        scaling: the layer's LoRA scaling ``s`` (:func:`lora_scaling`).
        direction: ``"ArB2r"`` (paper), ``"A2rBr"``, ``"ArBr"`` or ``"random"`` (see :class:`LoraGAConfig`).
        scale: ``"stable"`` (paper), ``"gd"``, ``"unit"`` or ``"weight_svd"`` (needs ``weight``).
        stable_gamma: γ of the stable scale.
        weight: the (out, in) base weight, for ``scale="weight_svd"`` only.
        seed: seed of the randomized SVD sketch and of the ``"random"`` direction.
        name: the layer's name, used in error messages.

    Returns:
        ``A`` (r, n) and ``B`` (m, r) in float32 (float64 if ``grad`` is float64).

    Raises:
        LoraGARankError: ``2r > min(m, n)``.
    """
    if grad.dim() != 2:
        raise ValueError(
            f"{name}: the gradient must be an (out, in) matrix, got shape {tuple(grad.shape)}"
        )
    m, n = grad.shape
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"{name}: r must be a positive int, got {r!r}")
    if 2 * r > min(m, n):
        raise LoraGARankError(
            f"layer {name!r} ({m}x{n}): LoRA-GA needs 2r = {2 * r} singular vectors but the gradient has only "
            f"min(m, n) = {min(m, n)}; use r <= {min(m, n) // 2} for this layer (rank_pattern) or exclude it"
        )
    if not torch.isfinite(grad).all():
        raise ValueError(f"{name}: the gradient has non-finite values (NaN/Inf)")
    U, _, Vh = gradient_svd(grad, 2 * r, seed=seed, method=svd_method)
    if direction == "ArB2r":
        A, B = Vh[:r], U[:, r : 2 * r]
    elif direction == "A2rBr":
        A, B = Vh[r : 2 * r], U[:, :r]
    elif direction == "ArBr":
        A, B = Vh[1 : 2 * r : 2], U[:, 0 : 2 * r : 2]
    elif direction == "random":
        perm = torch.randperm(2 * r, generator=torch.Generator().manual_seed(seed))
        A, B = Vh[perm[:r]], U[:, perm[r:]]
    else:
        raise ValueError(f"direction must be one of ArB2r, ArBr, A2rBr, random, got {direction!r}")
    if scale == "stable":
        # Eq. 12 as coded by the reference and PEFT: m^{1/4}/sqrt(gamma), m = out_features
        factor = m**0.25 / math.sqrt(stable_gamma)
        A, B = A * factor, B * factor
    elif scale == "gd":
        A, B = A / scaling, B / scaling
    elif scale == "weight_svd":
        if weight is None:
            raise ValueError(f"{name}: scale='weight_svd' needs the base weight")
        Sw = gradient_svd(
            weight.to(grad.dtype if grad.dtype == torch.float64 else torch.float32),
            r,
            seed=seed,
            method=svd_method,
        )[1]
        avg = torch.sqrt(Sw / scaling).mean()
        A, B = A * avg, B * avg
    elif scale != "unit":
        raise ValueError(f"scale must be one of stable, gd, unit, weight_svd, got {scale!r}")
    return A.contiguous(), B.contiguous()


PEFT_SCALES = ("stable", "weight_svd", "gd_scale", "unit")
"""``peft.LoraGAConfig.scale`` values."""


def peft_lora_ga_factors(
    grad: Tensor,
    r: int,
    *,
    scaling: float,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16,
    weight: Tensor | None = None,
    seed: int = 0,
    name: str = "layer",
    svd_method: SVDMethod = "auto",
) -> tuple[Tensor, Tensor]:
    """``(A, B)`` by *PEFT's* definition of LoRA-GA (``init_lora_weights="lora_ga"``, PEFT >= 0.19).

    PEFT differs from the paper / reference (:func:`lora_ga_factors`): ``B`` carries the singular values
    of its own columns, and the stable factor multiplies ``B`` only. With ``G = U S Vh``:

    - directions (same index sets as the reference, S folded into B): ``ArB2r``: ``A = Vh[:r]``,
      ``B = U[:, r:2r]·diag(S[r:2r])``; ``A2rBr``: ``A = Vh[r:2r]``, ``B = U[:, :r]·diag(S[:r])``;
      ``ArBr``: ``A = Vh[1:2r:2]``, ``B = U[:, 0:2r:2]·diag(S[0:2r:2])``; ``random``: one random set of
      ``r`` of the top ``2r`` indices for *both* A and B (here drawn from ``seed``, PEFT uses the global
      generator);
    - scales: ``stable``: ``B ·= m^{1/4}/√γ``; ``weight_svd``: ``B ·= σ₁(W)/S_B[0]`` (when
      ``S_B[0] > 0``; σ₁ exact here, PEFT estimates it with a rank-r randomized SVD); ``gd_scale``: A and B divided by ``s``; ``unit``: nothing.

    Singular-vector signs are canonical (:func:`canonical_signs`); PEFT's come from its random sketch,
    so the two agree up to the sign of each row of A / column of B.

    Raises:
        LoraGARankError: ``2r > min(m, n)``.
        ValueError: an unknown direction or scale, ``weight_svd`` without ``weight``.
    """
    if grad.dim() != 2:
        raise ValueError(
            f"{name}: the gradient must be an (out, in) matrix, got shape {tuple(grad.shape)}"
        )
    m, n = grad.shape
    if 2 * r > min(m, n):
        raise LoraGARankError(
            f"layer {name!r} ({m}x{n}): LoRA-GA needs 2r = {2 * r} singular vectors but the gradient has only "
            f"min(m, n) = {min(m, n)}; use r <= {min(m, n) // 2} for this layer (rank_pattern) or exclude it"
        )
    if not torch.isfinite(grad).all():
        raise ValueError(f"{name}: the gradient has non-finite values (NaN/Inf)")
    U, S, Vh = gradient_svd(grad, 2 * r, seed=seed, method=svd_method)
    if direction == "ArB2r":
        a_idx, b_idx = torch.arange(r), torch.arange(r, 2 * r)
    elif direction == "A2rBr":
        a_idx, b_idx = torch.arange(r, 2 * r), torch.arange(r)
    elif direction == "ArBr":
        a_idx, b_idx = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    elif direction == "random":
        perm = torch.randperm(2 * r, generator=torch.Generator().manual_seed(seed))[:r]
        a_idx = b_idx = perm
    else:
        raise ValueError(f"direction must be one of ArB2r, ArBr, A2rBr, random, got {direction!r}")
    S_B = S[b_idx]
    A, B = Vh[a_idx], U[:, b_idx] * S_B
    if scale == "stable":
        B = B * (m**0.25 / math.sqrt(stable_gamma))
    elif scale == "weight_svd":
        if weight is None:
            raise ValueError(f"{name}: scale='weight_svd' needs the base weight")
        w = weight.to(grad.dtype if grad.dtype == torch.float64 else torch.float32)
        # the weight's top singular value, exactly (singular values only): PEFT's svd_lowrank(W, q=r)
        # sketch is off by ~1% on the flat spectra of freshly initialised weights
        sigma1 = torch.linalg.svdvals(w)[0]
        if S_B[0] > 0:
            B = B * (sigma1 / S_B[0])
    elif scale == "gd_scale":
        A, B = A / scaling, B / scaling
    elif scale != "unit":
        raise ValueError(f"scale must be one of {PEFT_SCALES}, got {scale!r}")
    return A.contiguous(), B.contiguous()


def offset_weight(weight: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """``W0 − s·B·A`` (paper Eq. 13) computed in float32 (float64 stays float64), cast back to ``weight``'s dtype.

    Pass the ``A`` and ``B`` *as stored* in the adapter (after any dtype cast), so that the step-0
    output ``(W0 − s·B·A) x + s·B·(A x)`` equals ``W0 x`` up to the rounding of the result.
    """
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    out = weight.to(acc) - scaling * (
        B.to(device=weight.device, dtype=acc) @ A.to(device=weight.device, dtype=acc)
    )
    return out.to(weight.dtype)
