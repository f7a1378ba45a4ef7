"""Low-rank linear algebra against float64 references."""

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from loralab.core.linalg import (
    accumulation_dtype,
    ridge_inverse,
    ridge_solve,
    solve_sylvester_psd,
    stiefel_sample,
    truncated_svd,
)

M, N, RANK = 48, 32, 6


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _low_rank_plus_noise(m=M, n=N, r=RANK, noise=1e-3, seed=0):
    g = _gen(seed)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    s = torch.linspace(10, 1, r, dtype=torch.float64)
    return (u * s) @ v.T + noise * torch.randn(m, n, generator=g, dtype=torch.float64)


def _subspace_cos(a, b):
    # smallest cosine of the principal angles between the column spaces of a and b (orthonormal)
    return torch.linalg.svdvals(a.T @ b).min().item()


@pytest.mark.parametrize("method", ["full", "randomized"])
@pytest.mark.parametrize("transpose", [False, True])
def test_truncated_svd_vs_float64(method, transpose):
    a64 = _low_rank_plus_noise()
    if transpose:
        a64 = a64.T
    U64, S64, Vh64 = torch.linalg.svd(a64, full_matrices=False)
    U, S, Vh = truncated_svd(a64.float(), RANK, method=method, generator=_gen(1))
    assert (
        U.shape == (a64.shape[0], RANK) and S.shape == (RANK,) and Vh.shape == (RANK, a64.shape[1])
    )
    assert U.dtype == torch.float32
    torch.testing.assert_close(S.double(), S64[:RANK], rtol=1e-4, atol=1e-5)
    assert _subspace_cos(U.double(), U64[:, :RANK]) > 1 - 1e-5
    assert _subspace_cos(Vh.T.double(), Vh64[:RANK].T) > 1 - 1e-5
    # orthonormal factors and a best rank-r approximation (Eckart–Young) to float32 precision
    torch.testing.assert_close(U.T @ U, torch.eye(RANK), atol=1e-5, rtol=0)
    best = (U64[:, :RANK] * S64[:RANK]) @ Vh64[:RANK]
    torch.testing.assert_close(((U * S) @ Vh).double(), best, atol=1e-4, rtol=1e-4)


def test_truncated_svd_float64_stays_float64_and_batched_full():
    a = torch.randn(3, 10, 7, dtype=torch.float64, generator=_gen())
    U, S, Vh = truncated_svd(a, 2, method="full")
    assert S.dtype == torch.float64 and S.shape == (3, 2)
    torch.testing.assert_close(S, torch.linalg.svdvals(a)[:, :2])
    assert U.shape == (3, 10, 2) and Vh.shape == (3, 2, 7)
    torch.testing.assert_close(U.transpose(-1, -2) @ a @ Vh.transpose(-1, -2), torch.diag_embed(S))
    assert (
        accumulation_dtype(torch.bfloat16) == torch.float32
        and accumulation_dtype(torch.float64) == torch.float64
    )


def test_truncated_svd_bf16_input_accumulates_in_fp32():
    a = _low_rank_plus_noise().to(torch.bfloat16)
    _, S, _ = truncated_svd(a, RANK, method="full")
    assert S.dtype == torch.float32
    torch.testing.assert_close(
        S.double(), torch.linalg.svdvals(a.double())[:RANK], rtol=1e-5, atol=1e-5
    )


def test_randomized_deterministic_with_generator_and_leaves_global_rng():
    a = torch.randn(200, 100, generator=_gen())
    state = torch.get_rng_state()
    r1 = truncated_svd(a, 4, method="randomized", generator=_gen(5))
    r2 = truncated_svd(a, 4, method="randomized", generator=_gen(5))
    assert torch.equal(state, torch.get_rng_state())  # the sketch used the generator only
    for x, y in zip(r1, r2):
        assert torch.equal(x, y)


def test_randomized_oversampling_on_flat_spectrum():
    # sign matrices have flat spectra (LoRA-SB's case): with oversampling the randomized result is
    # within 1% of the optimal rank-r error in Frobenius norm
    d = torch.sign(torch.randn(96, 64, generator=_gen(3)))
    U, S, Vh = truncated_svd(d, 8, method="randomized", oversample=10, niter=10, generator=_gen(4))
    best = torch.linalg.svdvals(d.double())[8:].square().sum().sqrt()
    err = (d.double() - ((U * S) @ Vh).double()).norm()
    assert err <= best * 1.01


def test_truncated_svd_errors():
    a = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, min\(m, n\)\] = \[1, 4\]"):
        truncated_svd(a, 5)
    with pytest.raises(ValueError, match="rank must be"):
        truncated_svd(a, 0)
    with pytest.raises(ValueError, match="method must be"):
        truncated_svd(a, 2, method="lanczos")
    with pytest.raises(ValueError, match="non-finite"):
        truncated_svd(torch.full((4, 4), float("nan")), 1)
    with pytest.raises(TypeError, match="floating-point"):
        truncated_svd(torch.ones(4, 4, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        truncated_svd(torch.ones(4), 1)
    with pytest.raises(ValueError, match="oversample and niter"):
        truncated_svd(a, 1, oversample=-1)


def test_stiefel_orthonormal_and_deterministic():
    q = stiefel_sample(20, 5, generator=_gen(0), dtype=torch.float64)
    torch.testing.assert_close(q.T @ q, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(q, stiefel_sample(20, 5, generator=_gen(0), dtype=torch.float64))
    qb = stiefel_sample(8, 3, generator=_gen(1), batch=(4,))
    assert qb.shape == (4, 8, 3)
    torch.testing.assert_close(
        qb.transpose(-1, -2) @ qb, torch.eye(3).expand(4, 3, 3), atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match="1 <= k <= n"):
        stiefel_sample(3, 4)


def test_stiefel_rotation_invariance_statistically():
    # Haar measure: Q and R·Q have the same law for any fixed orthogonal R. Without the sign fix,
    # Householder QR makes Q[0, 0] one-signed (its mean would be far from 0), which these catch.
    n, k, samples = 6, 2, 4000
    qs = stiefel_sample(n, k, generator=_gen(7), dtype=torch.float64, batch=(samples,))
    rot = torch.linalg.qr(torch.randn(n, n, generator=_gen(8), dtype=torch.float64))[0]
    rq = rot @ qs
    # 1. each entry of a uniform unit vector in R^n has mean 0 and variance 1/n
    sd = (1 / n) ** 0.5 / samples**0.5
    assert qs[:, 0, 0].mean().abs() < 5 * sd
    assert qs.diagonal(dim1=-2, dim2=-1).mean().abs() < 5 * sd
    torch.testing.assert_close(
        qs.square().mean(0), torch.full((n, k), 1 / n, dtype=torch.float64), atol=0.01, rtol=0
    )
    # 2. E[Q Qᵀ] = (k/n) I
    torch.testing.assert_close(
        (qs @ qs.transpose(-1, -2)).mean(0),
        torch.eye(n, dtype=torch.float64) * k / n,
        atol=0.02,
        rtol=0,
    )
    # 3. Q[0, 0] and (R Q)[0, 0] have the same distribution (two-sample Kolmogorov–Smirnov)
    p = scipy.stats.ks_2samp(qs[:, 0, 0].numpy(), rq[:, 0, 0].numpy()).pvalue
    assert p > 1e-3
    # and the sign-less QR does fail check 1 (the test would catch a missing sign fix)
    raw = torch.linalg.qr(torch.randn(samples, n, k, generator=_gen(9), dtype=torch.float64))[0]
    assert raw.diagonal(dim1=-2, dim2=-1).mean().abs() > 20 * sd


def _psd(r, rank=None, seed=0, scale=1.0):
    g = _gen(seed)
    a = torch.randn(r, rank or r, generator=g, dtype=torch.float64)
    return scale * a @ a.T


def test_ridge_inverse_vs_float64():
    m = _psd(5, seed=1)
    torch.testing.assert_close(ridge_inverse(m), torch.linalg.inv(m), rtol=1e-8, atol=1e-10)
    lam = 0.1 * m.diagonal().mean()
    torch.testing.assert_close(
        ridge_inverse(m, 0.1),
        torch.linalg.inv(m + lam * torch.eye(5, dtype=torch.float64)),
        rtol=1e-8,
        atol=1e-10,
    )
    torch.testing.assert_close(
        ridge_inverse(m, 0.1, relative=False),
        torch.linalg.inv(m + 0.1 * torch.eye(5, dtype=torch.float64)),
        rtol=1e-8,
        atol=1e-10,
    )
    # singular (rank 2 of 5) with no ridge: the Moore–Penrose pseudo-inverse; all zeros: zeros
    s = _psd(5, rank=2, seed=2)
    torch.testing.assert_close(
        ridge_inverse(s), torch.linalg.pinv(s, hermitian=True), rtol=1e-6, atol=1e-8
    )
    assert torch.equal(ridge_inverse(torch.zeros(3, 3)), torch.zeros(3, 3))
    # float32 input, batched
    b = torch.stack([_psd(4, seed=i) for i in range(3)]).float()
    torch.testing.assert_close(
        ridge_inverse(b).double(), torch.linalg.inv(b.double()), rtol=1e-3, atol=1e-4
    )


def test_ridge_solve_sides():
    m = _psd(4, seed=3)
    rhs = torch.randn(4, 6, generator=_gen(4), dtype=torch.float64)
    torch.testing.assert_close(ridge_solve(m, rhs), torch.linalg.solve(m, rhs))
    torch.testing.assert_close(ridge_solve(m, rhs.T, side="right"), torch.linalg.solve(m, rhs).T)
    with pytest.raises(ValueError, match="side must be"):
        ridge_solve(m, rhs, side="top")
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        ridge_inverse(m, -1.0)
    with pytest.raises(ValueError, match="square"):
        ridge_inverse(torch.ones(3, 4))


def test_sylvester_vs_scipy():
    a, b = _psd(4, seed=5), _psd(3, seed=6)
    c = torch.randn(4, 3, generator=_gen(7), dtype=torch.float64)
    x = solve_sylvester_psd(a, b, c)
    ref = scipy.linalg.solve_sylvester(a.numpy(), b.numpy(), c.numpy())
    np.testing.assert_allclose(x.numpy(), ref, rtol=1e-8, atol=1e-10)
    # float32 batched
    xs = solve_sylvester_psd(
        torch.stack([a, a]).float(), torch.stack([b, b]).float(), torch.stack([c, 2 * c]).float()
    )
    np.testing.assert_allclose(xs[1].double().numpy(), 2 * ref, rtol=1e-3, atol=1e-4)


def test_sylvester_singular_is_minimum_norm():
    # LoRA's B = 0 at init makes BᵀB singular; with C in the solvable range the solution is exact,
    # and among all solutions the one returned has minimum norm (zero on the null directions)
    a = _psd(4, rank=2, seed=8)
    b = torch.zeros(3, 3, dtype=torch.float64)
    c = a @ torch.randn(4, 3, generator=_gen(9), dtype=torch.float64)
    x = solve_sylvester_psd(a, b, c)
    torch.testing.assert_close(a @ x + x @ b, c, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(x, torch.linalg.pinv(a, hermitian=True) @ c, atol=1e-9, rtol=1e-9)


def test_sylvester_errors():
    a = torch.eye(3)
    with pytest.raises(ValueError, match="C must be"):
        solve_sylvester_psd(a, a, torch.ones(2, 3))
    with pytest.raises(ValueError, match="square"):
        solve_sylvester_psd(torch.ones(3, 2), a, torch.ones(3, 3))


def test_from_eigh_variants_equal_the_decomposing_ones():
    """ridge_inverse_from_eigh / solve_sylvester_from_eigh (one eigh reused, as LoRA-Pro does) give
    exactly what ridge_inverse / solve_sylvester_psd give, singular Grams included."""
    from loralab.core.linalg import ridge_inverse_from_eigh, solve_sylvester_from_eigh

    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
    a = x @ x.mT  # rank 2 of 4: singular
    y = torch.randn(3, 5, 9, generator=g, dtype=torch.float64)
    b = y @ y.mT
    c = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    al, p = torch.linalg.eigh(0.5 * (a + a.mT))
    be, q = torch.linalg.eigh(0.5 * (b + b.mT))
    for ridge in (0.0, 0.1):
        assert torch.equal(ridge_inverse_from_eigh(a, al, p, ridge), ridge_inverse(a, ridge))
    assert torch.equal(solve_sylvester_from_eigh(p, al, q, be, c), solve_sylvester_psd(a, b, c))
    with pytest.raises(ValueError, match="one eigh"):
        ridge_inverse_from_eigh(a, al, q)
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        ridge_inverse_from_eigh(a, al, p, -1.0)
    with pytest.raises(ValueError, match="C must be"):
        solve_sylvester_from_eigh(p, al, q, be, c.mT)
