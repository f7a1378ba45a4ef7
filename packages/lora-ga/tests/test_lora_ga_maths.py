"""LoRA-GA maths (arXiv 2407.05000 §3) against dense float64 references, and the config's validation."""

import math

import peft
import pytest
import torch

from loralab.lora_ga import (
    LoraGAConfig,
    LoraGARankError,
    lora_ga_factors,
    lora_scaling,
    offset_weight,
)
from loralab.lora_ga.maths import canonical_signs, gradient_svd

M, N, RANK = 48, 40, 4
ALPHA = 8.0
TOL64 = 1e-10  # float64 end to end
TOL32 = 1e-5  # float32 SVD vs float64 SVD (well-separated spectrum)


def _grad(m=M, n=N, seed=0, dtype=torch.float64):
    """A gradient with a well separated spectrum (singular vectors are then well defined)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    S = 2.0 ** -torch.arange(k, dtype=torch.float64) * 10.0
    return (U * S @ V.T).to(dtype)


def _ref_svd(G):
    """Exact float64 SVD, with the sign rule the implementation documents (largest |U[:, k]| entry > 0)."""
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    for k in range(U.shape[1]):
        if U[U[:, k].abs().argmax(), k] < 0:
            U[:, k] *= -1
            Vh[k] *= -1
    return U, S, Vh


def test_lora_scaling():
    assert lora_scaling(8, 16) == 2.0
    assert lora_scaling(16, 16, use_rslora=True) == 4.0  # alpha / sqrt(r)


@pytest.mark.parametrize("scale", ["stable", "gd", "unit", "weight_svd"])
def test_arb2r_matches_float64_reference(scale):
    G = _grad()
    W = _grad(seed=1) + 0.1
    s = lora_scaling(RANK, ALPHA)
    A, B = lora_ga_factors(
        G, RANK, scaling=s, scale=scale, stable_gamma=16, weight=W, svd_method="full"
    )
    U, _, Vh = _ref_svd(G)
    A_ref, B_ref = Vh[:RANK], U[:, RANK : 2 * RANK]  # paper: A = V[:, :r]^T, B = U[:, r:2r]
    if scale == "stable":  # Eq. 12 as coded by the reference: m^(1/4) / sqrt(gamma), m = out
        f = M**0.25 / math.sqrt(16)
        A_ref, B_ref = A_ref * f, B_ref * f
    elif scale == "gd":
        A_ref, B_ref = A_ref / s, B_ref / s
    elif scale == "weight_svd":  # reference "weightS": mean of sqrt(top-r singular values of W / s)
        Sw = torch.linalg.svdvals(W.double())[:RANK]
        f = torch.sqrt(Sw / s).mean()
        A_ref, B_ref = A_ref * f, B_ref * f
    assert A.dtype == torch.float64 and A.shape == (RANK, N) and B.shape == (M, RANK)
    torch.testing.assert_close(A, A_ref, atol=TOL64, rtol=0)
    torch.testing.assert_close(B, B_ref, atol=TOL64, rtol=0)


def test_float32_and_randomized_svd_match_float64():
    """fp32 gradient (the reference's dtype) and the randomized sketch (q = 4r) give the exact factors to fp32 tolerance."""
    G = _grad(m=256, n=192)
    U, _, Vh = _ref_svd(G)
    A, B = lora_ga_factors(G.float(), RANK, scaling=1.0, scale="unit")  # auto -> randomized here
    assert A.dtype == torch.float32
    torch.testing.assert_close(A.double(), Vh[:RANK], atol=TOL32, rtol=0)
    torch.testing.assert_close(B.double(), U[:, RANK : 2 * RANK], atol=TOL32, rtol=0)


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_randomized_svd_is_the_reference_sketch_with_a_fixed_seed(shape):
    """``gradient_svd(G, 2r, seed=s)`` is, bit for bit, what the reference and PEFT compute
    (``torch.svd_lowrank(G, q=4r, niter=4)``) when the global RNG is seeded with ``s``: the same
    algorithm, its randomness drawn from a generator instead of the global RNG. So where our and PEFT's
    factors differ (the benchmark's smallest |cos|, 0.51 on a random 97M Llama), the two draws differ,
    not the methods: a flat spectrum (0.7 % between σ₁₆ and σ₁₇ there) leaves singular vectors r+1..2r
    ill-determined for any sketch of 4r columns and 4 power iterations (both implementations gave the
    same spread over 12 seeds)."""
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    for seed in (0, 5):
        U, S, Vh = gradient_svd(G, 2 * 4, seed=seed)
        torch.manual_seed(seed)
        Up, Sp, Vp = torch.svd_lowrank(G, q=4 * 4, niter=4)
        assert torch.equal(S, Sp[:8])
        assert torch.equal(U.abs(), Up[:, :8].abs()) and torch.equal(Vh.abs(), Vp[:, :8].T.abs())


@pytest.mark.parametrize("direction", ["A2rBr", "ArBr", "random"])
def test_other_directions(direction):
    G = _grad()
    A, B = lora_ga_factors(
        G, RANK, scaling=1.0, direction=direction, scale="unit", svd_method="full", seed=3
    )
    U, _, Vh = _ref_svd(G)
    if direction == "A2rBr":
        torch.testing.assert_close(A, Vh[RANK : 2 * RANK], atol=TOL64, rtol=0)
        torch.testing.assert_close(B, U[:, :RANK], atol=TOL64, rtol=0)
    elif direction == "ArBr":  # reference: A = V[:, 1:2r:2]^T, B = U[:, 0:2r:2]
        torch.testing.assert_close(A, Vh[1 : 2 * RANK : 2], atol=TOL64, rtol=0)
        torch.testing.assert_close(B, U[:, 0 : 2 * RANK : 2], atol=TOL64, rtol=0)
    else:  # a split of the top-2r indices into two disjoint halves
        ia = [int((Vh[: 2 * RANK] @ a).abs().argmax()) for a in A]
        ib = [int((U[:, : 2 * RANK].T @ b).abs().argmax()) for b in B.T]
        assert sorted(ia + ib) == list(range(2 * RANK))
        torch.testing.assert_close(A, Vh[ia], atol=TOL64, rtol=0)
        torch.testing.assert_close(B, U[:, ib], atol=TOL64, rtol=0)


def test_first_step_is_best_rank_2r_approximation():
    """Paper Eq. 9-10: with orthonormal ArB2r factors, B Bᵀ G + G Aᵀ A is G's best rank-2r approximation."""
    G = _grad()
    A, B = lora_ga_factors(G, RANK, scaling=1.0, scale="unit", svd_method="full")
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    best = U[:, : 2 * RANK] * S[: 2 * RANK] @ Vh[: 2 * RANK]
    torch.testing.assert_close(B @ B.T @ G + G @ A.T @ A, best, atol=1e-10, rtol=0)


def test_canonical_signs_keep_the_product_and_are_deterministic():
    G = _grad()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    flip = torch.tensor([(-1.0) ** k for k in range(S.numel())], dtype=G.dtype)
    U1, V1 = canonical_signs(U, Vh)
    U2, V2 = canonical_signs(U * flip, Vh * flip[:, None])
    torch.testing.assert_close(U1, U2)
    torch.testing.assert_close(V1, V2)
    torch.testing.assert_close(U1 * S @ V1, G, atol=1e-12, rtol=0)
    # the randomized SVD is seeded: the same factors on every call (every rank)
    a = gradient_svd(G.float(), 8)
    b = gradient_svd(G.float(), 8)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_offset_weight(dtype):
    """Eq. 13: W0 - s B A, accumulated in fp32 (fp64 stays fp64) and cast back once."""
    W = _grad(seed=2).to(dtype)
    A, B = lora_ga_factors(_grad().float(), RANK, scaling=2.0)
    out = offset_weight(W, A, B, 2.0)
    assert out.dtype == dtype
    ref = W.double() - 2.0 * B.double() @ A.double()
    tol = {
        torch.float32: 1e-6,
        torch.bfloat16: 2**-8 * ref.abs().max().item(),
        torch.float64: 1e-7,
    }[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)
    if dtype == torch.bfloat16:  # a single rounding: exactly the fp32 result cast to bf16
        assert torch.equal(out, (W.float() - 2.0 * B @ A).to(torch.bfloat16))


def test_rank_error_names_the_layer():
    with pytest.raises(LoraGARankError, match=r"'model.layers.0.q_proj'.*2r = 42.*r <= 20"):
        lora_ga_factors(_grad(), 21, scaling=1.0, name="model.layers.0.q_proj")
    lora_ga_factors(_grad(), 20, scaling=1.0, svd_method="full")  # 2r == min(m, n) is fine


def test_bad_gradients_and_options():
    with pytest.raises(ValueError, match="non-finite"):
        g = _grad()
        g[0, 0] = float("nan")
        lora_ga_factors(g, RANK, scaling=1.0, name="x")
    with pytest.raises(ValueError, match=r"x: the gradient must be an \(out, in\) matrix"):
        lora_ga_factors(torch.zeros(3, 4, 5), 1, scaling=1.0, name="x")
    with pytest.raises(ValueError, match="direction must be one of"):
        lora_ga_factors(_grad(), RANK, scaling=1.0, direction="BrAr")
    with pytest.raises(ValueError, match="scale must be one of"):
        lora_ga_factors(_grad(), RANK, scaling=1.0, scale="huge")
    with pytest.raises(ValueError, match="weight_svd' needs the base weight"):
        lora_ga_factors(_grad(), RANK, scaling=1.0, scale="weight_svd")
    with pytest.raises(ValueError, match="r must be a positive int"):
        lora_ga_factors(_grad(), 0, scaling=1.0)


def test_config_defaults_and_subclass():
    cfg = LoraGAConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj"])
    assert isinstance(cfg, peft.LoraConfig)
    assert (cfg.bsz, cfg.iters, cfg.max_length, cfg.direction, cfg.scale, cfg.stable_gamma, cfg.dtype) == (
        2, 64, 1024, "ArB2r", "stable", 16, "fp32",
    )  # fmt: skip
    assert cfg.init_lora_weights == "lora_ga" and cfg.torch_dtype == torch.float32
    assert LoraGAConfig(scale="weightS").scale == "weight_svd"  # the reference's name
    assert LoraGAConfig(dtype="bfloat16").torch_dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bsz": 0}, "bsz must be a positive int"),
        ({"iters": 2.5}, "iters must be a positive int"),
        ({"direction": "x"}, "direction must be one of"),
        ({"scale": "x"}, "scale must be one of"),
        ({"stable_gamma": 0}, "stable_gamma must be a positive number"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"use_dora": True}, "use_dora=True is not supported"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraGAConfig(r=RANK, **kwargs)


def test_config_save_load_round_trip(tmp_path):
    cfg = LoraGAConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["q_proj"], iters=3, scale="gd", direction="A2rBr",
        stable_gamma=4, dtype="bf16", use_rslora=True,
    )  # fmt: skip
    cfg.save_pretrained(tmp_path)
    loaded = LoraGAConfig.from_pretrained(tmp_path)
    assert type(loaded) is LoraGAConfig and type(loaded.lora_ga_config) is type(cfg.lora_ga_config)
    assert loaded.to_dict() == cfg.to_dict()
