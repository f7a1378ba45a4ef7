"""The equivalent-gradient maths against dense float64 references (tolerances stated per test)."""

import pytest
import torch

from loralab.lora_pro import (
    equivalent_gradient,
    lora_gradients,
    lora_pro_gradients,
    optimal_equivalent_gradient,
    solve_x,
)

M, N, R = 12, 10, 3
S = 2.0
TOL = 1e-9  # float64 throughout


def _factors(seed, m=M, n=N, r=R, zero_b=False):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    B = (
        torch.zeros(m, r, dtype=torch.float64)
        if zero_b
        else torch.randn(m, r, generator=g, dtype=torch.float64)
    )
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    return A, B, G


def _lstsq_residual(A, B, G, s):
    """min over (gA, gB) of ‖s(B gA + gB A) − G‖ by a generic least-squares solve on vec()."""
    m = B.shape[0]
    n = A.shape[1]
    # vec (row-major): B gA -> kron(B, I_n) vec(gA); gB A -> kron(I_m, Aᵀ) vec(gB)
    K = s * torch.cat(
        [
            torch.kron(B, torch.eye(n, dtype=B.dtype)),
            torch.kron(torch.eye(m, dtype=B.dtype), A.T.contiguous()),
        ],
        dim=1,
    )
    sol = torch.linalg.lstsq(K, G.reshape(-1, 1), driver="gelsd").solution
    return (K @ sol - G.reshape(-1, 1)).norm(), (K @ sol).reshape(m, n)


@pytest.mark.parametrize("x_mode", ["sylvester", "zero", "symmetry"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equivalent_gradient_is_least_squares_optimum(seed, x_mode):
    A, B, G = _factors(seed)
    g_A, g_B = lora_gradients(A, B, G, S)
    gA, gB = lora_pro_gradients(A, B, g_A, g_B, S, x_mode=x_mode)
    gt = equivalent_gradient(A, B, gA, gB, S)
    best, best_gt = _lstsq_residual(A, B, G, S)
    assert abs((gt - G).norm() - best) < 1e-9 * G.norm()
    torch.testing.assert_close(gt, best_gt, atol=1e-9, rtol=0)
    # closed form P_B G + (I − P_B) G P_A, independent of X
    PB = B @ torch.linalg.inv(B.T @ B) @ B.T
    PA = A.T @ torch.linalg.inv(A @ A.T) @ A
    torch.testing.assert_close(
        gt, PB @ G + (torch.eye(M, dtype=G.dtype) - PB) @ G @ PA, atol=TOL, rtol=0
    )
    torch.testing.assert_close(optimal_equivalent_gradient(A, B, g_A, g_B, S), gt, atol=TOL, rtol=0)


@pytest.mark.parametrize("rows", [slice(0, 6), slice(6, 12), slice(11, 12), slice(12, 12)])
def test_optimal_equivalent_gradient_rows_are_the_dense_rows(rows):
    # one rank's rows of a row-sharded layer (FSDP2 full mode), an empty last shard included
    A, B, G = _factors(4)
    g_A, g_B = lora_gradients(A, B, G, S)
    PB = B @ torch.linalg.inv(B.T @ B) @ B.T
    PA = A.T @ torch.linalg.inv(A @ A.T) @ A
    dense = PB @ G + (torch.eye(M, dtype=G.dtype) - PB) @ G @ PA
    got = optimal_equivalent_gradient(A[None], B[None], g_A[None], g_B[None], S, rows=rows)
    assert got.shape == (1, rows.stop - rows.start, N)
    torch.testing.assert_close(got[0], dense[rows], atol=TOL, rtol=0)


@pytest.mark.parametrize("seed", [0, 3])
def test_sylvester_x_solves_the_equation_and_minimises_the_change(seed):
    A, B, G = _factors(seed)
    g_A, g_B = lora_gradients(A, B, G, S)
    X = solve_x(A, B, g_A, g_B, S)
    BtB, AAt = B.T @ B, A @ A.T
    rhs = -(1 / S**2) * torch.linalg.inv(BtB) @ g_A @ A.T
    torch.testing.assert_close(BtB @ X + X @ AAt, rhs, atol=1e-10, rtol=0)
    gA, gB = lora_pro_gradients(A, B, g_A, g_B, S)
    # stationarity of ‖gᴬ − g_A‖² + ‖gᴮ − g_B‖² over X (Theorem 2.3): (gᴬ − g_A)Aᵀ − Bᵀ(gᴮ − g_B) = 0
    torch.testing.assert_close(
        (gA - g_A) @ A.T - B.T @ (gB - g_B), torch.zeros(R, R, dtype=A.dtype), atol=1e-9, rtol=0
    )
    # and every other X gives a larger change
    base = (gA - g_A).norm() ** 2 + (gB - g_B).norm() ** 2
    for k in range(5):
        D = torch.randn(R, R, generator=torch.Generator().manual_seed(k), dtype=A.dtype) * 1e-2
        other = (gA + D @ A - g_A).norm() ** 2 + (gB - B @ D - g_B).norm() ** 2
        assert other > base


def test_symmetry_mode_is_the_official_closed_form():
    A, B, G = _factors(4)
    g_A, g_B = lora_gradients(A, B, G, S)
    X = solve_x(A, B, g_A, g_B, S, x_mode="symmetry")
    ref = -0.5 / S**2 * torch.linalg.inv(B.T @ B) @ B.T @ g_B @ (A @ A.T)
    torch.testing.assert_close(X, ref, atol=TOL, rtol=0)
    assert torch.equal(solve_x(A, B, g_A, g_B, S, x_mode="zero"), torch.zeros(R, R, dtype=A.dtype))


def test_theorem_formulas_match_a_literal_float64_transcription():
    A, B, G = _factors(5)
    g_A, g_B = lora_gradients(A, B, G, S)
    BtB_inv, AAt_inv = torch.linalg.inv(B.T @ B), torch.linalg.inv(A @ A.T)
    X = solve_x(A, B, g_A, g_B, S)
    ref_A = (1 / S**2) * BtB_inv @ g_A + X @ A
    ref_B = (1 / S**2) * (torch.eye(M, dtype=A.dtype) - B @ BtB_inv @ B.T) @ g_B @ AAt_inv - B @ X
    gA, gB = lora_pro_gradients(A, B, g_A, g_B, S)
    torch.testing.assert_close(gA, ref_A, atol=TOL, rtol=0)
    torch.testing.assert_close(gB, ref_B, atol=TOL, rtol=0)


def test_b_zero_gives_the_minimum_norm_solution():
    A, B, G = _factors(6, zero_b=True)
    g_A, g_B = lora_gradients(A, B, G, S)
    for x_mode in ("sylvester", "zero", "symmetry"):
        gA, gB = lora_pro_gradients(A, B, g_A, g_B, S, x_mode=x_mode)
        assert torch.isfinite(gA).all() and torch.isfinite(gB).all()
        assert gA.abs().max() == 0
        torch.testing.assert_close(gB, g_B @ torch.linalg.inv(A @ A.T) / S**2, atol=TOL, rtol=0)
    # the minimum-norm least-squares solution of the generic problem
    m, r, n = M, R, N
    K = S * torch.cat(
        [
            torch.kron(B, torch.eye(n, dtype=B.dtype)),
            torch.kron(torch.eye(m, dtype=B.dtype), A.T.contiguous()),
        ],
        dim=1,
    )
    sol = torch.linalg.pinv(K) @ G.reshape(-1, 1)
    torch.testing.assert_close(gA.reshape(-1), sol[: r * n, 0], atol=1e-9, rtol=0)
    torch.testing.assert_close(gB.reshape(-1), sol[r * n :, 0], atol=1e-9, rtol=0)


def test_rank_deficient_b_still_least_squares_optimal():
    A, B, G = _factors(7)
    B[:, 1] = 0.0  # one direction of B not yet learnt
    g_A, g_B = lora_gradients(A, B, G, S)
    gA, gB = lora_pro_gradients(A, B, g_A, g_B, S)
    best, _ = _lstsq_residual(A, B, G, S)
    assert abs((equivalent_gradient(A, B, gA, gB, S) - G).norm() - best) < 1e-8 * G.norm()


def test_batched_equals_per_layer_and_per_layer_scaling():
    layers = [_factors(10 + i) for i in range(4)]
    scal = torch.tensor([2.0, 0.5, 1.0, 4.0], dtype=torch.float64)
    A = torch.stack([a for a, _, _ in layers])
    B = torch.stack([b for _, b, _ in layers])
    gAs, gBs = zip(*(lora_gradients(a, b, g, s) for (a, b, g), s in zip(layers, scal.tolist())))
    gA, gB = lora_pro_gradients(A, B, torch.stack(gAs), torch.stack(gBs), scal)
    for i, ((a, b, _), s) in enumerate(zip(layers, scal.tolist())):
        ga, gb = lora_pro_gradients(a, b, gAs[i], gBs[i], s)
        torch.testing.assert_close(gA[i], ga, atol=1e-12, rtol=0)
        torch.testing.assert_close(gB[i], gb, atol=1e-12, rtol=0)


def test_float32_and_bf16_inputs_compute_in_float32():
    A, B, G = _factors(8)
    g_A, g_B = lora_gradients(A, B, G, S)
    ref = lora_pro_gradients(A, B, g_A, g_B, S)
    got = lora_pro_gradients(A.float(), B.float(), g_A.float(), g_B.float(), S)
    assert got[0].dtype == torch.float32
    for r, g in zip(ref, got):
        assert (g.double() - r).norm() / r.norm() < 1e-4
    got16 = lora_pro_gradients(*(t.bfloat16() for t in (A, B, g_A, g_B)), S)
    assert got16[0].dtype == torch.float32 and all(torch.isfinite(t).all() for t in got16)


def test_ridge_damps_towards_the_pseudo_inverse():
    A, B, G = _factors(9)
    g_A, g_B = lora_gradients(A, B, G, S)
    exact = lora_pro_gradients(A, B, g_A, g_B, S)
    tiny = lora_pro_gradients(A, B, g_A, g_B, S, ridge=1e-12)
    torch.testing.assert_close(tiny[0], exact[0], atol=1e-8, rtol=1e-8)


def test_errors_name_the_problem():
    A, B, G = _factors(0)
    g_A, g_B = lora_gradients(A, B, G, S)
    with pytest.raises(ValueError, match="rank mismatch"):
        lora_pro_gradients(A[:2], B, g_A[:2], g_B, S)
    with pytest.raises(ValueError, match="gradient shapes"):
        lora_pro_gradients(A, B, g_A.T, g_B, S)
    with pytest.raises(ValueError, match="x_mode"):
        lora_pro_gradients(A, B, g_A, g_B, S, x_mode="nope")
    with pytest.raises(ValueError, match="non-zero"):
        lora_pro_gradients(A, B, g_A, g_B, 0.0)
    with pytest.raises(ValueError, match="ridge"):
        lora_pro_gradients(A, B, g_A, g_B, S, ridge=-1.0)


# A few steps after B = 0, B is small with nearly dependent columns: κ(B) ≈ 1e3 was measured on a
# 3-step GLUE run in full mode. With float32 inputs, the Grams and r×r work in float64 keep the error
# at the float32 inputs' own level, ~u·κ(B), instead of ~u·κ(B)² from a float32 Gram and eigh
# (its smallest eigenvalue, which (BᵀB)⁻¹ follows, is only known to u·λ_max).
U32 = 2.0**-24  # float32 unit round-off
KAPPA = 1e3


def _ill_conditioned(seed, m=48, n=40, r=4):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
    sigma = torch.tensor([1e-3, 5e-4, 1e-5, 1e-3 / KAPPA], dtype=torch.float64)
    B = (U * sigma) @ V.T
    A = torch.randn(r, n, generator=g, dtype=torch.float64) / n**0.5
    G = torch.randn(m, n, generator=g, dtype=torch.float64) * 1e-3
    return A, B, S * B.T @ G, S * G @ A.T


def _rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_inputs_with_an_ill_conditioned_b_lose_u_kappa_not_u_kappa_squared(seed):
    f32 = [t.float() for t in _ill_conditioned(seed)]
    exact = [t.double() for t in f32]  # the same (float32) inputs, in float64
    assert torch.linalg.cond(exact[1]).item() == pytest.approx(KAPPA, rel=1e-3)
    bound = 10 * U32 * KAPPA  # 6e-4; u·κ² = 6e-2
    # measured (seed 0): g̃ 6.7e-6, gᴬ 2.5e-5, gᴮ 8.1e-6; with float32 Grams: 2.2e-2, 5.6e-2, 2.6e-3
    gt = optimal_equivalent_gradient(*f32, S)
    assert gt.dtype == torch.float32
    assert _rel(gt, optimal_equivalent_gradient(*exact, S)) < bound
    gA, gB = lora_pro_gradients(*f32, S)
    wA, wB = lora_pro_gradients(*exact, S)
    assert gA.dtype == gB.dtype == torch.float32
    assert _rel(gA, wA) < bound
    assert _rel(gB, wB) < bound
    X = solve_x(*f32, S)
    assert X.dtype == torch.float32
    assert _rel(X, solve_x(*exact, S)) < bound
