"""GaLoreAdamW / GoLoreAdamW / GaLoreSGD against dense float64 references, and their fixes."""

import copy
import io
import math

import pytest
import torch

from loralab.golore import GaLoreAdamW, GaLoreSGD, GoLoreAdamW, GoLoreSGD, resolve_rand_step

M, N, RANK, GAP, STEPS = 10, 6, 2, 3, 9
LR, BETAS, EPS, WD, SCALE = 0.05, (0.9, 0.999), 1e-8, 0.01, 0.5
ATOL = 1e-12  # float64


def _grads(steps=STEPS, shape=(M, N), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, dtype=torch.float64, generator=gen) for _ in range(steps)]


def _dense_galore_adamw(w0, grads, *, proj_type_side, reproject, second="keep", style="hf"):
    """Textbook GaLore AdamW, float64, one parameter: SVD projector every GAP steps (Alg. 2 of 2403.03507)."""
    w = w0.clone()
    m = v = P = None
    for t, g in enumerate(grads):
        if t % GAP == 0:
            U, _, Vh = torch.linalg.svd(g, full_matrices=False)
            newP = U[:, :RANK] if proj_type_side == "left" else Vh[:RANK].T  # store as (dim, r)
            if P is not None and reproject:
                C = newP.T @ P
                if proj_type_side == "left":
                    m = C @ m
                    v = (C * C) @ v if second == "project" else v
                else:
                    m = m @ C.T
                    v = v @ (C * C).T if second == "project" else v
            P = newP
        low = P.T @ g if proj_type_side == "left" else g @ P
        if m is None:
            m, v = torch.zeros_like(low), torch.zeros_like(low)
        m = BETAS[0] * m + (1 - BETAS[0]) * low
        v = BETAS[1] * v + (1 - BETAS[1]) * low * low
        k = t + 1
        bc1, bc2 = 1 - BETAS[0] ** k, 1 - BETAS[1] ** k
        if style == "hf":
            n_low = m / (v.sqrt() + EPS) * (math.sqrt(bc2) / bc1)
        else:
            n_low = (m / bc1) / (v.sqrt() / math.sqrt(bc2) + EPS)
        full = (P @ n_low if proj_type_side == "left" else n_low @ P.T) * SCALE
        if style == "torch":
            w = w * (1 - LR * WD)
        w = w - LR * full
        if style == "hf":
            w = w - LR * WD * w
    return w, m, v


def _run_ours(cls, w0, grads, **kw):
    w = torch.nn.Parameter(w0.clone())
    opt = cls(
        [{"params": [w], "rank": RANK}],
        lr=LR,
        betas=BETAS,
        eps=EPS,
        weight_decay=WD,
        update_proj_gap=GAP,
        scale=SCALE,
        svd_method="full",
        **kw,
    )
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w.detach(), opt


@pytest.mark.parametrize(
    "proj_type,side", [("std", "right"), ("left", "left"), ("reverse_std", "left")]
)
@pytest.mark.parametrize("reproject", [True, False])
@pytest.mark.parametrize("style", ["hf", "torch"])
def test_adamw_matches_dense_reference(proj_type, side, reproject, style):
    w0 = torch.randn(M, N, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    grads = _grads()
    w, opt = _run_ours(
        GaLoreAdamW, w0, grads, proj_type=proj_type, reproject_moments=reproject, adamw_style=style
    )
    w_ref, m_ref, _v_ref = _dense_galore_adamw(
        w0, grads, proj_type_side=side, reproject=reproject, style=style
    )
    torch.testing.assert_close(w, w_ref, atol=ATOL, rtol=0)
    # the moments themselves are sign-dependent on the SVD; compare their full-space images
    st = opt.state[opt.param_groups[0]["params"][0]]
    P = st["proj_left"] if side == "left" else st["proj_right"].T
    full = (P @ st["exp_avg"]) if side == "left" else st["exp_avg"] @ P.T
    U, _, Vh = torch.linalg.svd(grads[-1 - (STEPS - 1) % GAP], full_matrices=False)
    P_ref = U[:, :RANK] if side == "left" else Vh[:RANK].T
    full_ref = (P_ref @ m_ref) if side == "left" else m_ref @ P_ref.T
    torch.testing.assert_close(full, full_ref, atol=1e-10, rtol=0)


def test_second_moment_projection_policy_matches_dense_reference():
    w0 = torch.randn(M, N, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    grads = _grads()
    w, _ = _run_ours(GaLoreAdamW, w0, grads, proj_type="left", second_moment="project")
    w_ref, _, _ = _dense_galore_adamw(
        w0, grads, proj_type_side="left", reproject=True, second="project"
    )
    torch.testing.assert_close(w, w_ref, atol=ATOL, rtol=0)


def test_reprojected_update_does_not_depend_on_svd_signs(monkeypatch):
    """Stale moments (galore-torch) change meaning when LAPACK flips a singular vector's sign — which a
    1e-9 perturbation of the gradient can do. Re-projected moments make the update sign-invariant."""
    import loralab.golore.subspace as optmod  # where _draw_projector looks new_projector up

    w0 = torch.randn(M, N, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    grads = _grads()
    real = optmod.new_projector

    def flipped(*args, **kwargs):
        mats = real(*args, **kwargs)
        return tuple(-m for m in mats)

    results = {}
    for reproject in (True, False):
        w_a, _ = _run_ours(GaLoreAdamW, w0, grads, proj_type="left", reproject_moments=reproject)
        monkeypatch.setattr(
            optmod,
            "new_projector",
            lambda *a, _c=[0], **k: (
                _c.__setitem__(0, _c[0] + 1),
                flipped(*a, **k) if _c[0] % 2 else real(*a, **k),
            )[1],
        )
        w_b, _ = _run_ours(GaLoreAdamW, w0, grads, proj_type="left", reproject_moments=reproject)
        monkeypatch.setattr(optmod, "new_projector", real)
        results[reproject] = (w_a - w_b).abs().max().item()
    assert results[True] < 1e-12
    assert results[False] > 1e-4


def test_sgd_momentum_matches_dense_reference():
    mu = 0.9
    w0 = torch.randn(M, N, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    grads = _grads()
    w = torch.nn.Parameter(w0.clone())
    opt = GaLoreSGD(
        [{"params": [w], "rank": RANK}],
        lr=LR,
        momentum=mu,
        update_proj_gap=GAP,
        scale=SCALE,
        proj_type="right",
        svd_method="full",
    )
    for g in grads:
        w.grad = g.clone()
        opt.step()
    # dense: momentum in the right subspace, re-projected on refresh
    wr, buf, Q = w0.clone(), None, None
    for t, g in enumerate(grads):
        if t % GAP == 0:
            newQ = torch.linalg.svd(g, full_matrices=False)[2][:RANK]
            if buf is not None:
                buf = buf @ Q @ newQ.T
            Q = newQ
        low = g @ Q.T
        buf = low.clone() if buf is None else mu * buf + low
        wr = wr - LR * SCALE * buf @ Q
    torch.testing.assert_close(w.detach(), wr, atol=ATOL, rtol=0)


def test_plain_groups_and_non_2d_params_are_plain_adamw():
    gen = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(
        torch.randn(5, 4, 3, dtype=torch.float64, generator=gen)
    )  # 3-D in a rank group
    b = torch.nn.Parameter(torch.randn(7, dtype=torch.float64, generator=gen))
    m2 = torch.nn.Parameter(
        torch.randn(6, 5, dtype=torch.float64, generator=gen)
    )  # 2-D in a plain group
    ours = GaLoreAdamW(
        [{"params": [w], "rank": 2}, {"params": [b, m2]}],
        lr=LR,
        eps=EPS,
        weight_decay=WD,
        adamw_style="torch",
    )
    ref_params = [torch.nn.Parameter(t.detach().clone()) for t in (w, b, m2)]
    ref = torch.optim.AdamW(ref_params, lr=LR, eps=EPS, weight_decay=WD)
    for _ in range(4):
        for p, q in zip((w, b, m2), ref_params):
            g = torch.randn(p.shape, dtype=torch.float64, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip((w, b, m2), ref_params):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=0)
    assert "proj_left" not in ours.state[w] and "proj_right" not in ours.state[w]


def test_plain_sgd_group_matches_torch_sgd():
    gen = torch.Generator().manual_seed(2)
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64, generator=gen))
    q = torch.nn.Parameter(p.detach().clone())
    ours = GaLoreSGD([p], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    for _ in range(4):
        g = torch.randn(4, 3, dtype=torch.float64, generator=gen)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p, q, atol=1e-12, rtol=0)


def test_rand_ratio_switches_svd_to_random_at_the_papers_step():
    assert resolve_rand_step(dict(rand_ratio=0.8, total_steps=100)) == 80
    assert resolve_rand_step(dict(rand_ratio=0.0)) == 0
    assert resolve_rand_step(dict(rand_ratio=1.0, total_steps=10)) == 10
    assert resolve_rand_step(dict(rand_step=5, rand_ratio=0.1, total_steps=100)) == 5
    assert resolve_rand_step(dict(projection="random")) == 0
    w0 = torch.randn(M, N, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    grads = _grads(steps=8)
    w = torch.nn.Parameter(w0.clone())
    opt = GoLoreAdamW(
        [{"params": [w], "rank": RANK}],
        lr=LR,
        update_proj_gap=2,
        rand_ratio=0.5,
        total_steps=8,
        proj_type="left",
        svd_method="full",
    )
    captured = []
    for g in grads:
        w.grad = g.clone()
        opt.step()
        captured.append(opt.state[w]["proj_left"].clone())
    for t in (0, 2):  # refreshed at steps 0 and 2: SVD of that gradient
        U = torch.linalg.svd(grads[t], full_matrices=False)[0][:, :RANK]
        torch.testing.assert_close(captured[t] @ captured[t].T, U @ U.T, atol=1e-10, rtol=0)
    for t in (4, 6):  # from step 4 = 0.5 * 8: random, not the SVD subspace
        U = torch.linalg.svd(grads[t], full_matrices=False)[0][:, :RANK]
        assert (captured[t] @ captured[t].T - U @ U.T).abs().max() > 0.1
        torch.testing.assert_close(
            captured[t].T @ captured[t], torch.eye(RANK, dtype=torch.float64), atol=1e-12, rtol=0
        )


def test_golore_sgd_uses_random_projectors_from_the_start_by_default():
    w = torch.nn.Parameter(torch.randn(M, N, dtype=torch.float64))
    opt = GoLoreSGD(
        [{"params": [w], "rank": RANK}], lr=LR, momentum=0.9, proj_type="left", svd_method="full"
    )
    g = _grads(steps=1)[0]
    w.grad = g
    opt.step()
    U = torch.linalg.svd(g, full_matrices=False)[0][:, :RANK]
    P = opt.state[w]["proj_left"]
    assert (P @ P.T - U @ U.T).abs().max() > 0.1


@pytest.mark.parametrize("cls", [GaLoreAdamW, GoLoreAdamW, GaLoreSGD])
def test_state_dict_loads_weights_only_and_resume_is_exact(
    cls, llama, lm_batches, split_groups, train
):
    kw = dict(rank=4, update_proj_gap=2, proj_type="std")
    extra = {"momentum": 0.9} if cls is GaLoreSGD else {}
    ref_model = copy.deepcopy(llama)
    ref_opt = cls(split_groups(ref_model, **kw), lr=1e-3, **extra)
    train(ref_model, ref_opt, lm_batches)

    model = copy.deepcopy(llama)
    opt = cls(split_groups(model, **kw), lr=1e-3, **extra)
    train(model, opt, lm_batches[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = copy.deepcopy(llama)
    model2.load_state_dict(ckpt["model"])
    opt2 = cls(split_groups(model2, **kw), lr=1e-3, **extra)
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, lm_batches[3:])
    for a, b in zip(ref_model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_low_precision_params_keep_float32_state_across_load(
    llama, lm_batches, split_groups, train
):
    model = llama.to(torch.bfloat16)
    opt = GaLoreAdamW(split_groups(model, rank=4, update_proj_gap=2), lr=1e-3)
    train(model, opt, lm_batches[:2])
    p = opt.param_groups[1]["params"][0]
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    opt2 = GaLoreAdamW(split_groups(model, rank=4, update_proj_gap=2), lr=1e-3)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[p]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0), "rank must be a positive int"),
        (dict(rank=2, update_proj_gap=0), "update_proj_gap"),
        (dict(rank=2, scale=-1.0), "scale"),
        (dict(rank=2, proj_type="diag"), "proj_type"),
        (dict(rank=2, projection="qr"), "projection"),
        (dict(rank=2, rand_ratio=0.5), "needs total_steps"),
        (dict(rank=2, rand_ratio=1.5, total_steps=10), "rand_ratio must be in"),
        (dict(rank=2, second_moment="zero"), "second_moment"),
        (dict(rank=2, svd_method="lanczos"), "svd_method"),
        (dict(lr=-1.0), "learning rate"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(adamw_style="keras"), "adamw_style"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, match):
    w = torch.nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=match) as e:
        GaLoreAdamW([w], **kwargs)
    assert "param group 0" in str(e.value)


def test_sgd_constructor_errors():
    w = torch.nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="momentum"):
        GaLoreSGD([w], momentum=-0.1)
    with pytest.raises(ValueError, match="nesterov"):
        GaLoreSGD([w], nesterov=True)


def test_non_finite_gradient_is_reported_at_refresh():
    w = torch.nn.Parameter(torch.zeros(4, 3))
    opt = GaLoreAdamW([{"params": [w], "rank": 2}])
    w.grad = torch.full((4, 3), float("nan"))
    with pytest.raises(FloatingPointError, match=r"param group 0.*shape \(4, 3\)"):
        opt.step()


def test_sparse_gradient_is_rejected():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = GaLoreAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_closure_is_evaluated_with_grad():
    w = torch.nn.Parameter(torch.ones(4, 3))
    opt = GaLoreAdamW([{"params": [w], "rank": 2}], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 12.0
    assert not torch.equal(w.detach(), torch.ones(4, 3))
