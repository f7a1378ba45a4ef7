"""The functional AdamW core against torch.optim.AdamW ("torch" style) and galore-torch ("hf" style)."""

import pytest
import torch

from loralab.core import adamw as adamw_module
from loralab.core.adamw import adamw_direction, adamw_step_, adamw_update_, check_adamw_hparams

STEPS = 5
SHAPES = [(6, 4), (5,), (3, 3)]


def _problem(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=dtype) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


def _run_ours(params, grads, style, **hp):
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    v = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for t, gs in enumerate(grads, start=1):
        adamw_update_(params, gs, m, v, step=t, style=style, **hp)
    return params


def _run_peer(opt_cls, params, grads, **kw):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = opt_cls(ps, **kw)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps]


HP = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def test_torch_style_matches_torch_optim_adamw():
    params, grads = _problem()
    ours = _run_ours(params, grads, "torch", **HP)
    ref = _run_peer(torch.optim.AdamW, params, grads, foreach=False, **HP)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_hf_style_matches_galore_torch_adamw():
    galore = pytest.importorskip("galore_torch")
    params, grads = _problem(seed=1)
    ours = _run_ours(params, grads, "hf", **HP)
    ref = _run_peer(galore.GaLoreAdamW, params, grads, no_deprecation_warning=True, **HP)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_float64_reference_formula():
    # p ← p(1 − lr·λ) − lr·m̂/(√v̂ + ε), with m̂ = m/(1−β1ᵗ), v̂ = v/(1−β2ᵗ), in float64
    params, grads = _problem(dtype=torch.float64, seed=2)
    lr, (b1, b2), eps, wd = HP["lr"], HP["betas"], HP["eps"], HP["weight_decay"]
    ref = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in ref]
    v = [torch.zeros_like(p) for p in ref]
    for t, gs in enumerate(grads, start=1):
        for i, g in enumerate(gs):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            mhat, vhat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            ref[i] = ref[i] * (1 - lr * wd) - lr * mhat / (vhat.sqrt() + eps)
    ours = [p.clone() for p in params]
    mm = [torch.zeros_like(p) for p in ours]
    vv = [torch.zeros_like(p) for p in ours]
    for t, gs in enumerate(grads, start=1):
        adamw_update_(ours, gs, mm, vv, step=t, **HP)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_bf16_params_fp32_moments():
    params, grads = _problem()
    p16 = [p.to(torch.bfloat16) for p in params]
    m = [torch.zeros_like(p, dtype=torch.float32) for p in p16]
    v = [torch.zeros_like(p, dtype=torch.float32) for p in p16]
    adamw_update_(p16, [g.to(torch.bfloat16) for g in grads[0]], m, v, step=1, **HP)
    assert all(p.dtype == torch.bfloat16 for p in p16) and all(
        x.dtype == torch.float32 for x in m + v
    )
    ref = _run_ours(params, grads[:1], "torch", **HP)
    for a, b in zip(p16, ref):
        torch.testing.assert_close(
            a.float(), b, rtol=2e-2, atol=2e-2
        )  # bf16 has 8 bits of mantissa


def test_direction_is_the_update_without_decay():
    params, grads = _problem(seed=3)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    d = adamw_direction(grads[0], m, v, step=1, betas=HP["betas"], eps=HP["eps"])
    # at step 1 the bias-corrected direction is g/(|g| + ε) = sign(g) up to ε
    for di, g in zip(d, grads[0]):
        torch.testing.assert_close(di, torch.sign(g), rtol=1e-5, atol=1e-5)
    adamw_update_([], [], [], [], step=1, **HP)  # no parameters: nothing to do


def test_errors():
    with pytest.raises(ValueError, match="step is 1-based"):
        adamw_direction(
            [torch.ones(1)], [torch.zeros(1)], [torch.zeros(1)], step=0, betas=(0.9, 0.9), eps=1e-8
        )
    with pytest.raises(ValueError, match="style must be"):
        adamw_direction(
            [torch.ones(1)],
            [torch.zeros(1)],
            [torch.zeros(1)],
            step=1,
            betas=(0.9, 0.9),
            eps=1e-8,
            style="jax",
        )
    for kw, msg in [
        (dict(lr=-1.0), "learning rate"),
        (dict(eps=-1.0), "epsilon"),
        (dict(betas=(1.0, 0.9)), "betas"),
        (dict(weight_decay=-0.1), "weight_decay"),
    ]:
        args = {**dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), **kw}
        with pytest.raises(ValueError, match=msg):
            check_adamw_hparams(**args)


def _run_step_(params, grads, moment_dtype=None, sit_out=(), **hp):
    """adamw_step_ with per-parameter step counters; parameter i skips the steps listed in sit_out[i]."""
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p, dtype=moment_dtype or p.dtype) for p in params]
    v = [torch.zeros_like(p, dtype=moment_dtype or p.dtype) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    for t, gs in enumerate(grads, start=1):
        idx = [i for i in range(len(params)) if t not in dict(sit_out).get(i, ())]
        for i in idx:
            steps[i] += 1
        adamw_step_(
            [params[i] for i in idx],
            [gs[i] for i in idx],
            [m[i] for i in idx],
            [v[i] for i in idx],
            [steps[i] for i in idx],
            **hp,
        )
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_step_matches_torch_optim_adamw(monkeypatch, dtype, fused):
    """Both kernels of adamw_step_ (torch's fused CPU kernel, the foreach arithmetic) follow
    torch.optim.AdamW, including a parameter that sits out a step and so runs one step behind."""
    if not fused:
        monkeypatch.setattr(adamw_module, "_FUSED_CPU", False)
    elif not adamw_module.fused_adamw_available():
        pytest.skip("this torch has no fused AdamW kernel for CPU")
    params, grads = _problem(dtype=dtype, seed=4)
    ours = _run_step_(params, grads, sit_out=[(1, (2,))], **HP)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(ps, foreach=False, **HP)
    for t, gs in enumerate(grads, start=1):
        for i, (p, g) in enumerate(zip(ps, gs)):
            p.grad = None if (i == 1 and t == 2) else g.clone()
        opt.step()
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-15)
    for a, b in zip(ours, ps):
        torch.testing.assert_close(a, b.detach(), **tol)


def test_step_with_half_precision_params_keeps_float32_moments():
    params, grads = _problem()
    p16 = [p.to(torch.bfloat16) for p in params]
    out = _run_step_(
        p16, [[g.to(torch.bfloat16) for g in gs] for gs in grads[:1]], torch.float32, **HP
    )
    ref = _run_ours(params, grads[:1], "torch", **HP)
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2)


def test_step_errors_and_empty():
    adamw_step_([], [], [], [], [], **HP)
    with pytest.raises(ValueError, match="equal lengths"):
        adamw_step_(
            [torch.zeros(1)], [torch.zeros(1)], [torch.zeros(1)], [torch.zeros(1)], [], **HP
        )


def test_step_counters_are_one_based():
    p, g, m, v = (torch.zeros(2) for _ in range(4))
    with pytest.raises(ValueError, match="1-based"):
        adamw_step_([p], [g], [m], [v], [torch.tensor(0.0)], **HP)
    assert torch.equal(p, torch.zeros(2))


def test_fused_kernel_only_on_cpu_and_unchecked_call_equals_checked():
    from loralab.core.adamw import fused_adamw_, fused_adamw_available

    assert not fused_adamw_available("cuda")  # its step counters would have to live on the GPU
    if not fused_adamw_available("cpu"):
        pytest.skip("this torch has no fused AdamW kernel for CPU")
    params, grads = _problem(seed=5)
    a, b = [p.clone() for p in params], [p.clone() for p in params]
    state = [[torch.zeros_like(p) for p in params] for _ in range(4)]
    steps = [torch.tensor(1.0) for _ in params]
    adamw_step_(a, grads[0], state[0], state[1], steps, **HP)
    fused_adamw_(b, grads[0], state[2], state[3], steps, **HP)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
