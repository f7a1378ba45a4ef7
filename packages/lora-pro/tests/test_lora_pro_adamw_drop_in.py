"""``loralab.lora_pro.LoRAProAdamW`` against the installed peer ``lora_pro.LoRAProAdamW`` (PyPI
lora-pro-adamw 0.2.1): same constructor, same parameters after a few steps of its README usage.

Tolerances (relative Frobenius, every trainable parameter, 5 steps):
- efficient mode (both solvers): 1e-5 (measured ≤ 1.2e-6 in float32; the peer computes its Adam
  direction in float32);
- full mode: 3e-3 (measured ≤ 1e-3): the peer rounds the g̃ entering its second moment to bfloat16
  (the first step, before any rounding, agrees to 1e-6).
"""

import inspect

import pytest
import torch
from peft import LoraConfig, get_peft_model

lora_pro_peer = pytest.importorskip("lora_pro")

from loralab.core import LoraPairError  # noqa: E402
from loralab.lora_pro import LoRAProAdamW, LoraProAdamW  # noqa: E402
from loralab.lora_pro.adjust import solve_x  # noqa: E402

STEPS = 5
TOL_EFFICIENT = 1e-5
TOL_FULL = 3e-3
TOL_FIRST_STEP = 1e-6


class Toy(torch.nn.Module):
    """The peer README's model."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(32, 24, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _readme_model(**overrides):
    # The README's LoraConfig, without task_type=FEATURE_EXTRACTION: with it PEFT calls
    # forward(input_ids=...), which the README's Toy does not accept (its example fails as written,
    # with the peer too).
    torch.manual_seed(0)
    cfg = dict(target_modules=["linear"], r=8, lora_alpha=16, lora_dropout=0.0, bias="none")
    cfg.update(overrides)
    return get_peft_model(Toy(), LoraConfig(**cfg))


def _race(make_ours, make_peer, steps=STEPS):
    ours_model, peer_model = _readme_model(), _readme_model()
    ours, peer = make_ours(ours_model), make_peer(peer_model)
    g = torch.Generator().manual_seed(1)
    rels = []
    for _ in range(steps):
        inputs, target = torch.randn(4, 32, generator=g), torch.randn(4, 24, generator=g)
        for model, opt in ((ours_model, ours), (peer_model, peer)):
            loss = torch.nn.functional.mse_loss(model(inputs), target)
            loss.backward()
            opt.step()
            opt.zero_grad()
        rels.append(
            max(
                ((p - q).norm() / q.norm()).item()
                for p, q in zip(ours_model.parameters(), peer_model.parameters())
                if p.requires_grad
            )
        )
    return rels


def test_signature_and_defaults_equal_the_peers():
    ours = inspect.signature(LoRAProAdamW.__init__).parameters
    theirs = inspect.signature(lora_pro_peer.LoRAProAdamW.__init__).parameters
    assert list(ours) == list(theirs)
    assert [(p.kind, p.default) for p in ours.values()] == [
        (p.kind, p.default) for p in theirs.values()
    ]


def test_defaults_map_to_full_mode_with_weight_decay():
    opt = LoRAProAdamW(_readme_model())
    group = opt.param_groups[0]
    assert isinstance(opt, LoraProAdamW) and isinstance(opt, torch.optim.Optimizer)
    assert (group["lr"], group["weight_decay"], tuple(group["betas"]), group["eps"]) == (
        1e-4,
        0.01,
        (0.9, 0.999),
        1e-8,
    )
    assert (group["mode"], group["x_mode"], group["weight_decay_mode"], group["jitter"]) == (
        "full",
        "sylvester",
        "factors",
        1e-8,
    )


def test_readme_full_mode_matches_peer():
    rels = _race(
        lambda m: LoRAProAdamW(m, lr=1e-3, weight_decay=0.0),
        lambda m: lora_pro_peer.LoRAProAdamW(m, lr=1e-3, weight_decay=0.0),
    )
    assert rels[0] < TOL_FIRST_STEP, rels
    assert max(rels) < TOL_FULL, rels


@pytest.mark.parametrize("solver", ["vec", "eig"])
def test_readme_efficient_mode_matches_peer(solver):
    kw = dict(lr=1e-3, weight_decay=0.0, lorapro_mode="efficient", efficient_solver=solver)
    rels = _race(lambda m: LoRAProAdamW(m, **kw), lambda m: lora_pro_peer.LoRAProAdamW(m, **kw))
    assert max(rels) < TOL_EFFICIENT, rels


def test_positional_call_and_defaults_match_peer():
    # (model, lr, weight_decay): the peer's positional order; its defaults for everything else,
    # including full mode and weight decay 0.01 (on the factors and on the plain parameter)
    def build(cls):
        def make(model):
            model.base_model.model.linear.base_layer.weight.requires_grad_(True)  # plain AdamW
            return cls(model, 1e-3, 0.05)

        return make

    rels = _race(build(LoRAProAdamW), build(lora_pro_peer.LoRAProAdamW))
    assert max(rels) < TOL_FULL, rels
    rels = _race(
        lambda m: LoRAProAdamW(m, 1e-3, 0.05, (0.8, 0.99), 1e-6, True, "efficient", "eig"),
        lambda m: lora_pro_peer.LoRAProAdamW(
            m, 1e-3, 0.05, (0.8, 0.99), 1e-6, True, "efficient", "eig"
        ),
    )
    assert max(rels) < TOL_EFFICIENT, rels


def test_vec_solver_is_the_swapped_sylvester_equation():
    # the peer's vec-trick X solves AAᵀ·X + X·BᵀB = C; x_mode="sylvester_swapped" computes the same
    from lora_pro._lorapro import _solve_sylvester_vec

    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 10, generator=g, dtype=torch.float64)
    B = torch.randn(8, 3, generator=g, dtype=torch.float64)
    g_A = torch.randn(3, 10, generator=g, dtype=torch.float64)
    g_B = torch.randn(8, 3, generator=g, dtype=torch.float64)
    s = 2.0
    BtB, AAt = B.T @ B, A @ A.T
    C = -torch.linalg.solve(BtB, g_A) @ A.T / s**2
    X = solve_x(A, B, g_A, g_B, s, x_mode="sylvester_swapped")
    torch.testing.assert_close(X, _solve_sylvester_vec(BtB, AAt, C), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(AAt @ X + X @ BtB, C, rtol=1e-9, atol=1e-12)


def test_case_insensitive_mode_and_solver_as_in_the_peer():
    opt = LoRAProAdamW(_readme_model(), lorapro_mode="Efficient", efficient_solver="EIG")
    group = opt.param_groups[0]
    assert (group["mode"], group["x_mode"], group["jitter"]) == ("efficient", "sylvester", 1e-6)
    opt = LoRAProAdamW(_readme_model(), lorapro_mode="efficient")
    assert opt.param_groups[0]["x_mode"] == "sylvester_swapped"  # the peer's default "vec"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lorapro_mode="fast"), r"lorapro_mode must be 'full' or 'efficient', got 'fast'"),
        (
            dict(lorapro_mode="efficient", efficient_solver="lu"),
            r"efficient_solver must be 'vec' or 'eig', got 'lu'",
        ),
        (dict(find_peft="yes"), r"find_peft must be a bool, got 'yes'"),
    ],
)
def test_unknown_values_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAProAdamW(_readme_model(), **kwargs)


def test_parameters_instead_of_model_refused():
    with pytest.raises(TypeError, match=r"LoRAProAdamW takes the model itself .* got generator"):
        LoRAProAdamW(_readme_model().parameters())


def test_find_peft_false_finds_peft_layers_as_the_peer():
    model = _readme_model()
    assert len(LoRAProAdamW(model, find_peft=False).lora_pairs) == 1
    assert len(lora_pro_peer.LoRAProAdamW(_readme_model(), find_peft=False)._pairs) == 1


def test_model_without_lora_layers_refused():
    with pytest.raises(LoraPairError, match="has no PEFT LoRA layers"):
        LoRAProAdamW(Toy())


def test_negative_jitter_refused():
    with pytest.raises(ValueError, match=r"jitter must be >= 0, got -1"):
        LoraProAdamW(_readme_model(), jitter=-1)


@pytest.mark.parametrize("x_mode", ["sylvester", "sylvester_swapped"])
def test_jitter_against_dense_float64_reference(x_mode):
    # Theorem 2.1 with BᵀB + εI and AAᵀ + εI everywhere (inverses, projector, Sylvester), written
    # out densely (Kronecker solve), as lora-pro-adamw's efficient mode regularises
    from loralab.lora_pro import lora_pro_gradients

    g = torch.Generator().manual_seed(3)
    r, m, n, s, eps = 3, 8, 10, 2.0, 1e-2
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    B = 1e-2 * torch.randn(m, r, generator=g, dtype=torch.float64)  # small B: ε matters
    g_A = torch.randn(r, n, generator=g, dtype=torch.float64)
    g_B = torch.randn(m, r, generator=g, dtype=torch.float64)
    I_r = torch.eye(r, dtype=torch.float64)
    SB, SA = B.T @ B + eps * I_r, A @ A.T + eps * I_r
    C = -torch.linalg.inv(SB) @ g_A @ A.T / s**2
    P, Q = (SB, SA) if x_mode == "sylvester" else (SA, SB)
    # P X + X Q = C  ⇔  (I ⊗ P + Qᵀ ⊗ I) vec(X) = vec(C), column-major vec
    K = torch.kron(I_r, P) + torch.kron(Q.T.contiguous(), I_r)
    X = torch.linalg.solve(K, C.T.reshape(-1)).reshape(r, r).T
    ref_A = torch.linalg.inv(SB) @ g_A / s**2 + X @ A
    proj = torch.eye(m, dtype=torch.float64) - B @ torch.linalg.inv(SB) @ B.T
    ref_B = proj @ g_B @ torch.linalg.inv(SA) / s**2 - B @ X
    gA, gB = lora_pro_gradients(A, B, g_A, g_B, s, x_mode=x_mode, jitter=eps)
    torch.testing.assert_close(gA, ref_A, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gB, ref_B, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match=r"jitter must be >= 0, got -0.1"):
        lora_pro_gradients(A, B, g_A, g_B, s, jitter=-0.1)
