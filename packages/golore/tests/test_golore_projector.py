"""Projector maths against dense float64 references."""

import math

import pytest
import torch

from loralab.golore.projector import (
    new_projector,
    project,
    project_back,
    projector_side,
    reproject_first_moment,
    reproject_second_moment,
    transition_matrices,
)

RANK = 3
ATOL = 1e-10  # float64 throughout
SIDES = ("left", "right", "full")


def _dense_projection(side, mats, m, n):
    """The orthogonal projector onto the subspace as an (mn, mn) operator on vec(G), float64."""
    eye_m, eye_n = torch.eye(m, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    if side == "left":
        pl, pr = mats[0] @ mats[0].T, eye_n
    elif side == "right":
        pl, pr = eye_m, mats[0].T @ mats[0]
    else:
        pl, pr = mats[0] @ mats[0].T, mats[1].T @ mats[1]
    # vec(Pl G Pr) = (Pr^T kron Pl) vec(G) with column-major vec; use row-major: kron(Pl, Pr^T)
    return torch.kron(pl.contiguous(), pr.T.contiguous())


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("projection", ["svd", "random"])
@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_project_then_back_is_orthogonal_projection(side, projection, shape):
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(*shape, generator=gen, dtype=torch.float64)
    mats = new_projector(
        g, RANK, side, projection, generator=torch.Generator().manual_seed(1), svd_method="full"
    )
    back = project_back(project(g, mats, side), mats, side)
    ref = (_dense_projection(side, mats, *shape) @ g.reshape(-1)).reshape(shape)
    torch.testing.assert_close(back, ref, atol=ATOL, rtol=0)
    # idempotent and orthogonal: the residual is orthogonal to the projection
    torch.testing.assert_close(
        project_back(project(back, mats, side), mats, side), back, atol=ATOL, rtol=0
    )
    assert abs((back * (g - back)).sum().item()) < 1e-10
    for mat in mats:
        k = mat.shape[1] if mat.shape[0] > mat.shape[1] else mat.shape[0]
        gram = mat.T @ mat if mat.shape[0] > mat.shape[1] else mat @ mat.T
        torch.testing.assert_close(gram, torch.eye(k, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_svd_projector_keeps_best_rank_r_energy(side):
    g = torch.randn(20, 15, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mats = new_projector(g, RANK, side, "svd", svd_method="full")
    back = project_back(project(g, mats, side), mats, side)
    s = torch.linalg.svdvals(g)
    # one-sided projection onto the top-r singular space captures exactly the top-r energy (Eckart–Young)
    assert math.isclose(back.norm().item() ** 2, (s[:RANK] ** 2).sum().item(), rel_tol=1e-10)


def test_proj_type_sides_match_galore_torch():
    assert projector_side((10, 4), "std") == "right" and projector_side((4, 10), "std") == "left"
    assert (
        projector_side((10, 4), "reverse_std") == "left"
        and projector_side((4, 10), "reverse_std") == "right"
    )
    assert projector_side((4, 4), "std") == "right"
    for t in SIDES:
        assert projector_side((3, 5), t) == t
    with pytest.raises(ValueError, match="proj_type"):
        projector_side((3, 5), "middle")


def test_random_projector_is_rotation_invariant():
    """Haar: for a fixed rotation O, O·Q has the law of Q. Compare a statistic that the reference's
    construction on the wrong side would break: the distribution of the first row's norm and of
    |Q[0, 0]|, for Q and O·Q (fixed seeds), with a two-sample Kolmogorov–Smirnov test."""
    scipy_stats = pytest.importorskip("scipy.stats")
    n, k, draws = 6, 2, 1500
    gen = torch.Generator().manual_seed(123)
    rot, _ = torch.linalg.qr(
        torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    )
    dummy = torch.zeros(n, 5, dtype=torch.float64)
    qs = torch.stack(
        [new_projector(dummy, k, "left", "random", generator=gen)[0] for _ in range(2 * draws)]
    )
    a, b = qs[:draws], rot @ qs[draws:]
    for stat in (lambda q: q[:, 0, 0], lambda q: q[:, 0, :].norm(dim=-1), lambda q: q[:, 3, 1]):
        assert scipy_stats.ks_2samp(stat(a).numpy(), stat(b).numpy()).pvalue > 0.01
    # and the mean projector is (k/n) I: E[Q Qᵀ] for Haar Q
    mean_proj = (qs @ qs.transpose(-1, -2)).mean(0)
    torch.testing.assert_close(
        mean_proj, (k / n) * torch.eye(n, dtype=torch.float64), atol=0.03, rtol=0
    )


def test_random_right_projector_is_exactly_orthonormal_on_the_right_side():
    g = torch.zeros(5, 300, dtype=torch.float64)
    (q,) = new_projector(g, 4, "right", "random", generator=torch.Generator().manual_seed(0))
    assert q.shape == (4, 300)
    torch.testing.assert_close(q @ q.T, torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("side", SIDES)
def test_moment_reprojection_equals_dense_change_of_basis(side):
    gen = torch.Generator().manual_seed(3)
    shape = (9, 8)
    g_old = torch.randn(*shape, dtype=torch.float64, generator=gen)
    g_new = torch.randn(*shape, dtype=torch.float64, generator=gen)
    old = new_projector(g_old, RANK, side, "svd", svd_method="full")
    new = new_projector(g_new, RANK, side, "svd", svd_method="full")
    m_low = project(torch.randn(*shape, dtype=torch.float64, generator=gen), old, side)
    ref = project(project_back(m_low, old, side), new, side)  # P_newᵀ (P_old M), dense
    trans = transition_matrices(old, new, side)
    torch.testing.assert_close(reproject_first_moment(m_low, trans, side), ref, atol=ATOL, rtol=0)
    # identity when the subspace does not change
    same = transition_matrices(old, old, side)
    torch.testing.assert_close(reproject_first_moment(m_low, same, side), m_low, atol=ATOL, rtol=0)
    v = m_low**2
    torch.testing.assert_close(reproject_second_moment(v, same, side), v, atol=ATOL, rtol=0)


def test_second_moment_projection_is_exact_for_independent_coordinates():
    # x with independent coordinates of variances v: Var(C x) = (C∘C) v
    gen = torch.Generator().manual_seed(4)
    c, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=gen))
    v = torch.rand(4, 1, dtype=torch.float64, generator=gen) + 0.1
    x = torch.randn(4, 200_000, dtype=torch.float64, generator=gen) * v.sqrt()
    emp = ((c @ x) ** 2).mean(1, keepdim=True)
    torch.testing.assert_close(reproject_second_moment(v, (c,), "left"), emp, rtol=0.02, atol=0)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="projection"):
        new_projector(torch.ones(3, 3), 1, "left", "qr")
    with pytest.raises(ValueError, match="2-D"):
        new_projector(torch.ones(3), 1, "left", "svd")
    bad = torch.ones(4, 4)
    bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        new_projector(bad, 1, "left", "svd")
