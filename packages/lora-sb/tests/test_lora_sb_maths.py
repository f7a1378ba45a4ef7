"""The LoRA-SB formulas against dense float64 references."""

import pytest
import torch
from peft import get_peft_model

from loralab.core import estimate_gradients
from loralab.lora_sb import (
    LoraSBConfig,
    equivalent_gradient,
    r_gradient,
    sb_factors,
    update_approximation,
)

TOL = 1e-10
RANK = 4
LR = 1e-3


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_update_approximation_is_adams_first_step_and_never_nan():
    g = torch.tensor([[1.5, -2.0], [0.0, 3e-12]], dtype=torch.float64)
    d = update_approximation(g, lr=0.1)
    assert torch.equal(d, torch.tensor([[-0.1, 0.1], [0.0, -0.1]], dtype=torch.float64))
    # Adam's first step with bias correction: m̂ = g, v̂ = g², step = -lr g/(|g| + eps) -> -lr sign(g)
    m, v = g, g * g
    adam = -0.1 * m / (v.sqrt() + 1e-30)
    assert torch.allclose(d[g != 0], adam[g != 0], atol=1e-12)
    # ... and torch.optim.Adam's actual first step (eps far below |g|)
    w = torch.zeros_like(g, requires_grad=True)
    w.grad = g.clone()
    torch.optim.Adam([w], lr=0.1, eps=1e-300).step()
    assert torch.allclose(w.detach()[g != 0], d[g != 0], atol=1e-12)
    assert torch.isfinite(update_approximation(torch.zeros(3, 3), 1.0)).all()
    assert torch.equal(update_approximation(g, 0.5, "gradient"), -0.5 * g)


def test_update_approximation_validates_lr():
    with pytest.raises(ValueError, match="lr must be a positive number"):
        update_approximation(torch.ones(2, 2), 0.0)
    with pytest.raises(ValueError, match="kind must be"):
        update_approximation(torch.ones(2, 2), 1.0, "adam")


@pytest.mark.parametrize("scaling", [0.25, 1.0, 8.0])
def test_factors_give_the_rank_r_truncation_whatever_the_scaling(scaling):
    delta = update_approximation(torch.randn(20, 14, generator=_gen(), dtype=torch.float64), LR)
    B, R, A = sb_factors(delta, RANK, scaling, method="full")
    U, S, Vh = torch.linalg.svd(delta)
    truncation = U[:, :RANK] @ torch.diag(S[:RANK]) @ Vh[:RANK]
    assert torch.allclose(scaling * B @ R @ A, truncation, atol=TOL)
    assert torch.allclose(B.T @ B, torch.eye(RANK, dtype=torch.float64), atol=TOL)
    assert torch.allclose(A @ A.T, torch.eye(RANK, dtype=torch.float64), atol=TOL)


def test_randomized_factors_are_near_optimal_on_a_sign_matrix():
    # Sign matrices have flat spectra (REFERENCES.md): oversampling keeps the randomized SVD optimal.
    delta = update_approximation(torch.randn(96, 80, generator=_gen(3)), LR)
    B, R, A = sb_factors(
        delta, RANK, 1.0, method="randomized", oversample=10, niter=10, generator=_gen()
    )
    S = torch.linalg.svdvals(delta.double())
    best = S[RANK:].square().sum().sqrt()
    err = torch.linalg.norm(delta.double() - (B @ R @ A).double())
    assert err <= best * (1 + 1e-3)


def test_r_gradient_and_equivalent_gradient_match_autograd_and_projection(
    mlp_factory, regression_data
):
    """g_R = s Bᵀ G Aᵀ (autograd through the PEFT layer vs the dense gradient of W), g̃ = s² P_B G P_A."""
    alpha = 8
    base = mlp_factory()
    batches = regression_data(1)
    cfg = LoraSBConfig(r=RANK, lora_alpha=alpha, target_modules=["fc1", "fc2"], sb_init="random")
    model = get_peft_model(base, cfg)
    layer = model.base_model.model.fc1
    # move R off zero so the dense W differs from W0
    with torch.no_grad():
        layer.lora_R["default"].weight.copy_(
            torch.randn(RANK, RANK, generator=_gen(5), dtype=torch.float64)
        )
    s = layer.scaling["default"]
    assert s == alpha / RANK
    loss = model(**batches[0])["loss"]
    loss.backward()
    g_r = layer.lora_R["default"].weight.grad
    # dense float64 reference: merge, then the gradient of the merged weight
    dense = mlp_factory()
    with torch.no_grad():
        dense.fc1.weight.add_(layer.get_delta_weight("default"))
        dense.fc2.weight.add_(model.base_model.model.fc2.get_delta_weight("default"))
    # the core estimator agrees with a plain float64 backward (it accumulates float64 as float64)
    G_est = estimate_gradients(dense, batches, ["fc1"], progress=False)["fc1"]
    dense(**batches[0])["loss"].backward()
    G = dense.fc1.weight.grad
    assert torch.allclose(G_est.double(), G, atol=1e-6)
    B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    assert torch.allclose(g_r, r_gradient(G, B, A, s), atol=TOL)
    g_tilde = equivalent_gradient(G, B, A, s)
    projection = (B @ B.T) @ G @ (A.T @ A)
    assert torch.allclose(g_tilde, s * s * projection, atol=TOL)
    # one SGD step on R moves W by exactly -lr * g̃
    with torch.no_grad():
        before = layer.get_delta_weight("default").clone()
        layer.lora_R["default"].weight.sub_(0.1 * g_r)
        assert torch.allclose(layer.get_delta_weight("default") - before, -0.1 * g_tilde, atol=TOL)
