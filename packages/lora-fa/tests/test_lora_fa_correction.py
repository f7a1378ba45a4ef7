"""The LoRA-FA correction against a float64 dense reference.

LoRA-FA's B-gradient is the minimiser of ‖s·g̃_B·A − G‖_F (G the full-weight gradient); the LoRA
gradient is g_B = s·G·Aᵀ, so g̃_B = (1/s²)·g_B·(A·Aᵀ)⁻¹ must equal the least-squares optimum.
"""

import pytest
import torch

from loralab.lora_fa import correct_grads, correction_matrix, optimal_b_gradient

RANK = 4
IN, OUT = 24, 16
TOL64 = 1e-10  # float64 relative tolerance
TOL32 = 1e-5  # float32 correction matrix vs float64 reference


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scaling", [2.0, 0.5, 16 / RANK**0.5])
def test_correction_is_the_least_squares_minimiser(scaling):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(RANK, IN, generator=g, dtype=torch.float64)
    G = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    g_B = scaling * G @ A.T  # chain rule through W0 + s·B·A
    ours = g_B @ correction_matrix(A, scaling, ridge=0.0, dtype=torch.float64)
    ref = optimal_b_gradient(G, A, scaling)
    assert _rel(ours, ref) < TOL64
    # optimality: the residual is orthogonal to the row space of A (normal equations) ...
    resid = scaling * ours @ A - G
    assert (resid @ A.T).abs().max().item() < 1e-10 * G.norm().item()
    # ... and no perturbation does better
    obj = (scaling * ours @ A - G).norm()
    for _ in range(5):
        X = ours + 1e-3 * torch.randn(OUT, RANK, generator=g, dtype=torch.float64)
        assert (scaling * X @ A - G).norm() > obj


def test_float32_matrix_with_peft_ridge_matches_float64_reference():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(RANK, IN, generator=g) / IN**0.5  # kaiming-like magnitude
    g_B = torch.randn(OUT, RANK, generator=g)
    s = 2.0
    M32 = correction_matrix(A, s)  # float32, ridge 1e-8 (PEFT's delta)
    assert M32.dtype == torch.float32
    A64 = A.double()
    ref = g_B.double() @ torch.linalg.inv(A64 @ A64.T) / s**2
    assert _rel(g_B @ M32, ref) < TOL32


def test_rank_deficient_A_uses_pseudo_inverse():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(RANK, IN, generator=g, dtype=torch.float64)
    A[-1] = A[0]  # rank r-1
    M = correction_matrix(A, 1.0, ridge=0.0, dtype=torch.float64)
    assert torch.isfinite(M).all()
    ref = torch.linalg.pinv(A @ A.T, hermitian=True)
    assert _rel(M, ref) < 1e-8
    # still the (minimum-norm) least-squares optimum
    G = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    ours = (G @ A.T) @ M
    assert _rel(ours @ A, optimal_b_gradient(G, A, 1.0) @ A) < 1e-8


def test_batched_stack_with_per_layer_scaling_equals_one_by_one():
    g = torch.Generator().manual_seed(3)
    As = torch.randn(5, RANK, IN, generator=g)
    scalings = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0])
    grads = [torch.randn(OUT, RANK, generator=g) for _ in range(5)]
    stack = correction_matrix(As, scalings)
    assert stack.shape == (5, RANK, RANK)
    batched = correct_grads(grads, stack)
    for i in range(5):
        single = grads[i] @ correction_matrix(As[i], float(scalings[i]))
        torch.testing.assert_close(batched[i], single, rtol=1e-6, atol=1e-7)


def test_half_precision_grads_corrected_in_float32():
    g = torch.Generator().manual_seed(4)
    A = torch.randn(RANK, IN, generator=g)
    g_B = torch.randn(OUT, RANK, generator=g).bfloat16()
    M = correction_matrix(A, 2.0)
    (out,) = correct_grads([g_B], M)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, g_B.float() @ M)
    (cast,) = correct_grads([g_B], M, out_dtype=torch.bfloat16)
    assert cast.dtype == torch.bfloat16


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"A must be \(r, in\) or \(L, r, in\), got shape \(5,\)"):
        correction_matrix(torch.randn(5), 1.0)
    with pytest.raises(ValueError, match="got 2 gradients but 1 correction matrices"):
        correct_grads([torch.randn(3, 2), torch.randn(3, 2)], torch.eye(2).unsqueeze(0))
    assert correct_grads([], torch.eye(2)) == []


@pytest.mark.parametrize(
    "name",
    [
        "loralab.lora_fa",
        "loralab.lora_fa.compat",
        "loralab.lora_fa.correction",
        "loralab.lora_fa.optimizer",
    ],
)
def test_docstring_examples_run(name):
    import doctest
    import importlib

    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.attempted > 0 and result.failed == 0, result
