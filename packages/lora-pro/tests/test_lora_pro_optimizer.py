"""LoraProAdamW against dense float64 references; scaling, plain params, weight decay, state, errors."""

import io

import peft
import pytest
import torch

from loralab.core import LoraPairError, find_lora_pairs
from loralab.core.testing import tiny_llama, tiny_roberta
from loralab.lora_pro import LoraProAdamW, create_lora_pro_optimizer

LR = 1e-2
STEPS = 4


@pytest.fixture(params=["fused", "foreach"])
def adamw_kernel(request, monkeypatch):
    """Run a test with both AdamW kernels of efficient mode: torch's fused CPU kernel (the default
    where available) and the element-wise ops on stacked buffers that CUDA uses."""
    from loralab.core import adamw as core_adamw

    if request.param == "fused" and not core_adamw.fused_adamw_available():
        pytest.skip("this torch has no fused AdamW kernel for CPU")
    if request.param == "foreach":
        monkeypatch.setattr(core_adamw, "_FUSED_CPU", False)
    return request.param


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).backward()


def _reference_run(lp, model, batches, mode, x_mode, wd=0.0):
    """Dense float64 re-implementation of both modes on a copy of ``model``."""
    pairs = find_lora_pairs(model)
    lora_ids = {id(t) for p in pairs for t in (p.A, p.B)}
    adam = lp.RefAdam(LR, wd=wd)
    for batch in batches:
        _grads(model, batch)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and id(p) not in lora_ids:
                    d = adam.direction(name, p.grad)
                    p.mul_(1 - LR * wd).add_(d, alpha=-LR)
            for pair in pairs:
                A, B, s = pair.A, pair.B, pair.scaling
                if mode == "efficient":
                    nA, nB = lp.ref_adjust(A, B, A.grad, B.grad, s, x_mode)
                    dA, dB = (
                        adam.direction(pair.name + "A", nA),
                        adam.direction(pair.name + "B", nB),
                    )
                    A.mul_(1 - LR * wd)
                    B.mul_(1 - LR * wd)
                else:
                    BtB_inv = torch.linalg.pinv(B.T @ B, hermitian=True)
                    AAt_inv = torch.linalg.pinv(A @ A.T, hermitian=True)
                    PB = B @ BtB_inv @ B.T
                    # g̃ = (1/s)[B(BᵀB)⁻¹g_A + (I − P_B) g_B (AAᵀ)⁻¹ A]
                    gt = (
                        B @ BtB_inv @ A.grad
                        + (torch.eye(B.shape[0], dtype=B.dtype) - PB) @ B.grad @ AAt_inv @ A
                    ) / s
                    N = adam.direction(pair.name, gt)
                    dA, dB = lp.ref_adjust(A, B, s * B.T @ N, s * N @ A.T, s, x_mode)
                    f = (1 - LR * wd) ** 0.5
                    A.mul_(f)
                    B.mul_(f)
                    pair.module.base_layer.weight.mul_(1 - LR * wd)
                A.add_(dA, alpha=-LR)
                B.add_(dB, alpha=-LR)


def _run(model, batches, **kw):
    opt = LoraProAdamW(model, lr=LR, **kw)
    for batch in batches:
        _grads(model, batch)
        opt.step()
    return opt


@pytest.mark.parametrize("mode", ["efficient", "full"])
@pytest.mark.parametrize("x_mode", ["sylvester", "zero", "symmetry"])
def test_matches_dense_float64_reference(adamw_kernel, lp, mode, x_mode):
    batches = lp.toy_batches(STEPS)
    ours, ref = lp.toy_peft(0), lp.toy_peft(0)
    _run(ours, batches, mode=mode, x_mode=x_mode, weight_decay=0.1)
    _reference_run(lp, ref, batches, mode, x_mode, wd=0.1)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-8, msg=name)


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_fresh_lora_init_b_zero_matches_reference(adamw_kernel, lp, mode):
    batches = lp.toy_batches(3)
    ours, ref = lp.toy_peft(1, b_random=False), lp.toy_peft(1, b_random=False)
    _run(ours, batches, mode=mode)
    _reference_run(lp, ref, batches, mode, "sylvester")
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-9, rtol=1e-7)


def test_non_lora_params_get_plain_torch_adamw(adamw_kernel, lp):
    """The classifier head (modules_to_save) follows torch.optim.AdamW exactly, bias correction from step 1."""
    model = lp.toy_peft(2)
    head = [p for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad]
    assert head
    twin = [p.detach().clone().requires_grad_() for p in head]
    ref = torch.optim.AdamW(twin, lr=LR, weight_decay=0.05)
    opt = LoraProAdamW(model, lr=LR, weight_decay=0.05)
    for batch in lp.toy_batches(3):
        _grads(model, batch)
        for t, p in zip(twin, head):
            t.grad = p.grad.clone()
        opt.step()
        ref.step()
    for t, p in zip(twin, head):
        torch.testing.assert_close(p, t, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (dict(r=4, lora_alpha=8), {"q_proj": 2.0, "v_proj": 2.0}),
        (dict(r=4, lora_alpha=8, use_rslora=True), {"q_proj": 4.0, "v_proj": 4.0}),
        (
            dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 1}),
            {"q_proj": 2.0, "v_proj": 0.5},
        ),
    ],
)
def test_per_layer_scaling_from_peft_config(cfg, expected):
    model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(target_modules=["q_proj", "v_proj"], **cfg)
    )
    opt = create_lora_pro_optimizer(model, 1e-3)
    assert len(opt.lora_pairs) == 4
    for pair in opt.lora_pairs:
        assert pair.scaling == pytest.approx(expected[pair.name.rsplit(".", 1)[-1]])


def test_scaling_used_per_layer_in_the_step(lp):
    """Two layers with different alpha: each step equals the reference with its own s."""
    batches = lp.toy_batches(2)
    kw = dict(alpha_pattern={"lin2": 1})
    ours, ref = lp.toy_peft(3, **kw), lp.toy_peft(3, **kw)
    assert sorted(p.scaling for p in find_lora_pairs(ours)) == [1 / 3, 2.0]
    _run(ours, batches)
    _reference_run(lp, ref, batches, "efficient", "sylvester")
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-8)


def test_effective_weight_decay_in_full_mode_decays_w_eff(lp):
    model = lp.toy_peft(4)
    pair = find_lora_pairs(model)[0]
    w_eff = lambda: pair.module.base_layer.weight + pair.scaling * pair.B @ pair.A  # noqa: E731
    before = w_eff().detach().clone()
    opt = LoraProAdamW(model, lr=0.1, weight_decay=0.5, mode="full")
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(w_eff(), before * (1 - 0.05), atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", ["efficient", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_and_exact_resume(adamw_kernel, lp, tmp_path, mode, dtype):
    batches = lp.toy_batches(6, dtype=dtype)
    model = lp.toy_peft(5, dtype=dtype)
    opt = LoraProAdamW(model, lr=LR, weight_decay=0.01, mode=mode)
    for batch in batches[:3]:
        _grads(model, batch)
        opt.step()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    for batch in batches[3:]:
        _grads(model, batch)
        opt.step()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = lp.toy_peft(99, dtype=dtype)
    resumed.load_state_dict(ckpt["model"])
    opt2 = LoraProAdamW(resumed, lr=LR, weight_decay=0.01, mode=mode)
    opt2.load_state_dict(ckpt["opt"])
    moments = [v for st in opt2.state.values() for k, v in st.items() if k != "step"]
    assert moments and all(
        m.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype) for m in moments
    )
    for batch in batches[3:]:
        _grads(resumed, batch)
        opt2.step()
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_state_is_lora_sized_in_efficient_mode_and_full_sized_in_full_mode(lp):
    for mode, extra in (("efficient", 0), ("full", 1)):
        model = lp.toy_peft(6)
        opt = _run(model, lp.toy_batches(1), mode=mode)
        for pair in opt.lora_pairs:
            st = opt.state[pair.B]
            if mode == "efficient":
                assert st["exp_avg"].shape == pair.B.shape and "full_exp_avg" not in st
            else:
                m, n = pair.B.shape[0], pair.A.shape[1]
                assert st["full_exp_avg"].shape == (m, n) and "exp_avg" not in st
        assert extra in (0, 1)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


def test_cpu_workspace_is_twice_the_lora_parameters_and_reused(lp):
    """Efficient mode keeps its CPU stacking buffers between steps (no fresh pages every step): one
    pair per layer shape, 2× the LoRA parameters, the same memory at every step."""
    model = lp.toy_peft(6)
    opt = LoraProAdamW(model, lr=LR)
    assert opt.workspace_bytes == 0
    lora_bytes = sum(t.numel() * t.element_size() for p in opt.lora_pairs for t in (p.A, p.B))
    ptrs = []
    for batch in lp.toy_batches(3):
        _grads(model, batch)
        opt.step()
        assert opt.workspace_bytes == 2 * lora_bytes
        ptrs.append(sorted(t.data_ptr() for bufs in opt._workspace.values() for t in bufs))
    assert ptrs[0] == ptrs[1] == ptrs[2]


def test_hyperparameters_follow_param_groups_and_schedulers(lp):
    model = lp.toy_peft(7)
    opt = LoraProAdamW(model, lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for batch in lp.toy_batches(3):
        _grads(model, batch)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(LR / 8)
    assert (
        opt.param_groups[0]["mode"] == "efficient" and opt.param_groups[0]["x_mode"] == "sylvester"
    )


def test_closure_is_called(lp):
    model = lp.toy_peft(8)
    opt = LoraProAdamW(model, lr=LR)
    batch = lp.toy_batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = model(**batch)
        loss.backward()
        return loss

    assert torch.isfinite(opt.step(closure))


def test_parameters_plus_pairs_and_param_groups(lp):
    model = lp.toy_peft(9)
    pairs = find_lora_pairs(model)
    lora = [t for p in pairs for t in (p.A, p.B)]
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not t for t in lora)]
    opt = LoraProAdamW([{"params": lora, "lr": 1e-3}, {"params": rest, "lr": 1e-2}], pairs=pairs)
    batch = lp.toy_batches(1)[0]
    _grads(model, batch)
    opt.step()
    assert len(opt.lora_pairs) == 2


def test_constructor_errors(lp):
    model = lp.toy_peft(10)
    with pytest.raises(TypeError, match="pairs"):
        LoraProAdamW(model.parameters())
    with pytest.raises(ValueError, match="learning rate"):
        LoraProAdamW(model, lr=-1.0)
    with pytest.raises(ValueError, match="mode"):
        LoraProAdamW(model, mode="fast")
    with pytest.raises(ValueError, match="x_mode"):
        LoraProAdamW(model, x_mode="nope")
    with pytest.raises(ValueError, match="ridge"):
        LoraProAdamW(model, ridge=-1.0)
    with pytest.raises(ValueError, match="effective"):
        LoraProAdamW(model, weight_decay_mode="effective")
    with pytest.raises(ValueError, match="scaling"):
        LoraProAdamW(model, scaling=0.0)
    pairs = find_lora_pairs(model)
    with pytest.raises(LoraPairError, match="one group"):
        LoraProAdamW([{"params": [pairs[0].A]}, {"params": [pairs[0].B]}], pairs=pairs[:1])
    pairs[0].A.requires_grad_(False)
    with pytest.raises(LoraPairError, match="LoRA-Pro needs both"):
        LoraProAdamW(model)
    with pytest.raises(LoraPairError, match="no PEFT LoRA layers"):
        LoraProAdamW(lp.Toy())


def test_zero3_partitioned_parameters_are_accepted_with_their_whole_shapes(lp):
    """A model built under deepspeed.zero.Init holds empty ZeRO-3 parameters: the optimizer reads
    their whole shapes (ds_shape) to pair the layers; the steps run on DeepSpeed's partitions."""
    model = lp.toy_peft(0, dtype=torch.float32)
    for name, p in model.named_parameters():
        if "lora_" in name:  # what DeepSpeed ZeRO-3 leaves on a partitioned parameter
            p.ds_id, p.ds_tensor, p.ds_shape = hash(name) % 1000, torch.zeros(0), p.shape
            p.data = torch.zeros(0)
    opt = LoraProAdamW(model, lr=LR)
    assert len(opt.lora_pairs) == 2


@pytest.mark.parametrize("x_mode", ["sylvester", "zero", "symmetry"])
@pytest.mark.parametrize("factor", ["A", "B"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("fresh", [False, True], ids=["trained", "B=0"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_non_finite_gradients_are_reported_with_the_layer(lp, x_mode, factor, bad, fresh, dtype):
    """Efficient mode checks only the adjusted gradients (products with the stacked raw gradients):
    one NaN/Inf entry in either factor's gradient, also at B = 0 where (BᵀB)⁺ = 0, must still be
    caught, name its layer, and leave parameters and optimizer state untouched."""
    model = lp.toy_peft(11, dtype=dtype, b_random=not fresh)
    batches = lp.toy_batches(2, dtype=dtype)
    opt = LoraProAdamW(model, lr=LR, x_mode=x_mode)
    _grads(model, batches[0])
    opt.step()
    _grads(model, batches[1])
    pair = opt.lora_pairs[1]
    getattr(pair, factor).grad[0, 1] = bad
    before = [p.detach().clone() for p in model.parameters()]
    state = io.BytesIO()
    torch.save(opt.state_dict(), state)
    with pytest.raises(FloatingPointError, match=r"non-finite gradients .*lin2"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    state.seek(0)
    saved = torch.load(state)["state"]
    for k, v in opt.state_dict()["state"].items():
        assert all(torch.equal(v[key], saved[k][key]) for key in v)


@pytest.mark.parametrize("factor", ["A", "B"])
@pytest.mark.parametrize(
    "mode,x_mode", [("efficient", "sylvester"), ("efficient", "zero"), ("full", "sylvester")]
)
def test_non_finite_factor_is_reported_with_the_layer(lp, factor, mode, x_mode):
    """A NaN parameter (a step taken with check_finite=False, a bad checkpoint) is named, not left to
    LAPACK's "failed to converge"."""
    model = lp.toy_peft(11)
    opt = LoraProAdamW(model, lr=LR, mode=mode, x_mode=x_mode)
    _grads(model, lp.toy_batches(1)[0])
    with torch.no_grad():
        getattr(opt.lora_pairs[0], factor)[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite LoRA factors .*lin1"):
        opt.step()


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_non_finite_gradient_of_a_plain_parameter_is_reported_by_name(lp, mode):
    model = lp.toy_peft(11)
    opt = LoraProAdamW(model, lr=LR, mode=mode)
    _grads(model, lp.toy_batches(1)[0])
    head = next(
        p for n, p in model.named_parameters() if n.endswith("modules_to_save.default.bias")
    )
    head.grad[2] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"modules_to_save\.default\.bias"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert not opt.state  # nothing was initialised either


def test_one_factor_without_gradient_is_an_error(lp):
    model = lp.toy_peft(12)
    opt = LoraProAdamW(model, lr=LR)
    _grads(model, lp.toy_batches(1)[0])
    opt.lora_pairs[0].A.grad = None
    with pytest.raises(RuntimeError, match="has none"):
        opt.step()


@pytest.mark.parametrize("mode", ["efficient", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_200_steps_from_fresh_lora_init_stay_finite(mode, dtype):
    torch.manual_seed(0)
    model = peft.get_peft_model(
        tiny_llama(hidden_size=32, num_hidden_layers=1),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    model.to(dtype)
    assert all(p.B.abs().max() == 0 for p in find_lora_pairs(model))
    opt = LoraProAdamW(model, lr=2e-3, mode=mode)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 100, (2, 8), generator=g)
    losses = []
    for _ in range(200):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]


def test_classification_model_with_head_trains(lp):
    torch.manual_seed(0)
    model = peft.get_peft_model(
        tiny_roberta(), peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    )
    opt = create_lora_pro_optimizer(model, 1e-3)
    head = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert head  # the classifier is trained with plain AdamW in the same optimizer
    ids = torch.randint(4, 100, (4, 8))
    out = model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1]))
    out.loss.backward()
    opt.step()


def test_one_batched_sylvester_solve_per_rank(monkeypatch):
    """All layers of equal rank, whatever their shapes, are solved in one batched call on the parameters'
    device (issue 6, item 3)."""
    import loralab.lora_pro.adjust as adjust

    calls = []
    # BᵀB = P diag(α) Pᵀ, AAᵀ = Q diag(β) Qᵀ (one eigh per Gram, shared with the pseudo-inverses)
    real = adjust.solve_sylvester_from_eigh

    def spy(p, alpha, q, beta, c, **kw):
        calls.append((tuple(p.shape), p.device, q.device, c.device))
        return real(p, alpha, q, beta, c, **kw)

    monkeypatch.setattr(adjust, "solve_sylvester_from_eigh", spy)
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules="all-linear"))
    pairs = find_lora_pairs(model)
    shapes = {(tuple(p.A.shape), tuple(p.B.shape)) for p in pairs}
    assert len(pairs) > len(shapes) > 1  # several layers share a shape, several shapes exist
    opt = LoraProAdamW(model, lr=LR)
    ids = torch.randint(4, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert len(calls) == 1  # one rank: one call
    assert calls[0][0] == (len(pairs), 4, 4)  # every layer, r×r
    device = pairs[0].A.device
    assert all(d == device for _, *devs in calls for d in devs)


def test_finite_check_does_not_mistake_an_overflowing_sum_for_nan(lp):
    opt = LoraProAdamW(lp.toy_peft(11), lr=LR)
    big = torch.full((4,), 3e38)  # finite, but its float32 sum is inf
    opt._check_out(opt.lora_pairs[:1], big, -big)  # no error
    with pytest.raises(FloatingPointError, match="adjustment produced NaN/Inf"):
        opt._check_out(opt.lora_pairs[:1], big, torch.tensor([float("inf")]))


def test_layer_sitting_out_a_step_keeps_its_own_adam_clock(adamw_kernel, lp):
    """Efficient mode stacks the Adam state of equal-shape layers; a layer without gradients for one
    step falls behind by one step and still follows the dense float64 reference exactly."""
    import copy

    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(tiny_llama(), cfg).double()
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    ref = copy.deepcopy(model)
    pairs, ref_pairs = find_lora_pairs(model), find_lora_pairs(ref)
    assert len({(tuple(p.A.shape), tuple(p.B.shape)) for p in pairs}) < len(pairs)
    opt = LoraProAdamW(model, lr=LR)
    adam = lp.RefAdam(LR)
    ids = torch.randint(4, 100, (2, 8), generator=torch.Generator().manual_seed(2))
    for step in range(4):
        for m, prs in ((model, pairs), (ref, ref_pairs)):
            m.zero_grad(set_to_none=True)
            m(input_ids=ids, labels=ids).loss.backward()
            if step == 1:  # the first layer sits this step out
                prs[0].A.grad = prs[0].B.grad = None
        opt.step()
        with torch.no_grad():
            for p in ref_pairs:
                if p.A.grad is None:
                    continue
                nA, nB = lp.ref_adjust(p.A, p.B, p.A.grad, p.B.grad, p.scaling, "sylvester")
                p.A.add_(adam.direction(p.name + "A", nA), alpha=-LR)
                p.B.add_(adam.direction(p.name + "B", nB), alpha=-LR)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-8, msg=name)
    assert opt.state[pairs[0].A]["step"].item() == 3
    assert {opt.state[p.B]["step"].item() for p in pairs[1:]} == {4}
