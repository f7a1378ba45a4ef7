"""LoraFAAdamW: float64 reference of the whole update, pairing by module, caching, batching, state, errors."""

import io
import math

import peft
import pytest
import torch

import loralab.lora_fa.optimizer as optimizer_module
from loralab.core import LoraPairError, find_lora_pairs
from loralab.core.testing import as_zero12_partition, make_lm_batches, tiny_llama
from loralab.lora_fa import LoraFAAdamW, LoraFAError, create_lorafa_optimizer

RANK, ALPHA = 4, 16
STEPS = 4
LR, WD, EPS, BETAS = 1e-2, 0.1, 1e-6, (0.9, 0.999)
TOL = 2e-5  # fp32 optimizer vs float64 reference, relative Frobenius


def _model(use_rslora=False, seed=0):
    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"v_proj": 3},
        use_rslora=use_rslora,
    )
    torch.manual_seed(seed)  # PEFT draws A from the global generator
    model = peft.get_peft_model(tiny_llama(seed), config)
    # a non-LoRA trainable parameter: gets plain AdamW inside the same optimizer
    model.base_model.model.model.norm.weight.requires_grad_(True)
    return model


def _expected_scaling(name, use_rslora):
    r, alpha = (2, 3) if "v_proj" in name else (RANK, ALPHA)
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_float64_reference_with_patterns_rslora_and_plain_params(use_rslora):
    model = _model(use_rslora)
    opt = create_lorafa_optimizer(model, RANK, ALPHA, LR, weight_decay=WD)
    pairs = {p.name: p for p in find_lora_pairs(model)}
    for name, pair in pairs.items():
        assert pair.scaling == pytest.approx(_expected_scaling(name, use_rslora))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert not any("lora_A" in n for n in trainable)
    b_of = {id(pair.B): pair for pair in pairs.values()}
    ref = {n: p.detach().double().clone() for n, p in trainable.items()}
    m = {n: torch.zeros_like(v) for n, v in ref.items()}
    v = {n: torch.zeros_like(x) for n, x in ref.items()}
    for t, batch in enumerate(make_lm_batches(STEPS, seed=1), start=1):
        model(**batch).loss.backward()
        for n, p in trainable.items():
            g = p.grad.double()
            pair = b_of.get(id(p))
            if pair is not None:  # LoRA-FA: (1/s²) g_B (A Aᵀ + 1e-8 I)⁻¹, s from the config by hand
                A = pair.A.detach().double()
                s = _expected_scaling(pair.name, use_rslora)
                g = (
                    g
                    @ torch.linalg.inv(A @ A.T + 1e-8 * torch.eye(A.shape[0], dtype=A.dtype))
                    / s**2
                )
            m[n] = BETAS[0] * m[n] + (1 - BETAS[0]) * g
            v[n] = BETAS[1] * v[n] + (1 - BETAS[1]) * g * g
            step_size = (
                LR * math.sqrt(1 - BETAS[1] ** t) / (1 - BETAS[0] ** t)
            )  # transformers' AdamW
            ref[n] = ref[n] - step_size * m[n] / (v[n].sqrt() + EPS)
            ref[n] = ref[n] - LR * WD * ref[n]  # decoupled, after the step
        opt.step()
        opt.zero_grad()
        # the reference follows its own float64 trajectory, fed with our gradients
        for n, p in trainable.items():
            assert _rel(p.detach(), ref[n]) < TOL, (n, t)
    assert any("norm" in n for n in trainable)


def test_torch_style_matches_torch_adamw_on_plain_params():
    model = _model()
    opt = create_lorafa_optimizer(model, RANK, ALPHA, LR, weight_decay=WD, style="torch", eps=1e-8)
    norm = model.base_model.model.model.norm.weight
    twin = torch.nn.Parameter(norm.detach().clone())
    torch_opt = torch.optim.AdamW([twin], lr=LR, weight_decay=WD, eps=1e-8)
    for batch in make_lm_batches(3, seed=2):
        model(**batch).loss.backward()
        twin.grad = norm.grad.clone()
        opt.step()
        torch_opt.step()
        opt.zero_grad()
    torch.testing.assert_close(norm.detach(), twin.detach(), rtol=1e-6, atol=1e-7)


def test_pairing_is_by_module_not_by_parameter_order():
    batches = make_lm_batches(3, seed=3)
    results = []
    for shuffle in (False, True):
        model = _model()
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        if (
            shuffle
        ):  # B's in reverse order, the plain parameter first: name/order pairing would break
            params = params[::-1]
        opt = LoraFAAdamW(params, lr=LR, pairs=find_lora_pairs(model))
        for batch in batches:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        results.append(
            {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
        )
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], rtol=0, atol=0)


def test_correction_matrix_computed_once_per_layer_and_refreshed_when_A_changes(monkeypatch):
    calls = []
    real = optimizer_module.correction_matrix
    monkeypatch.setattr(
        optimizer_module,
        "correction_matrix",
        lambda A, *a, **k: calls.append(A) or real(A, *a, **k),
    )
    model = _model()
    opt = create_lorafa_optimizer(model, RANK, ALPHA, LR)
    batches = make_lm_batches(3, seed=4)
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    pairs = find_lora_pairs(model)
    assert len(calls) == len(pairs) == 4
    with torch.no_grad():
        pairs[0].A.mul_(
            2.0
        )  # in-place change of a frozen A bumps its version → recomputed, only that one
    model(**batches[0]).loss.backward()
    opt.step()
    assert len(calls) == 5 and calls[-1] is pairs[0].A
    opt.refresh()
    model(**batches[1]).loss.backward()
    opt.step()
    assert len(calls) == 9


def test_layers_of_equal_shape_are_corrected_in_one_batch(monkeypatch):
    buckets = []
    real = optimizer_module.correct_grads
    monkeypatch.setattr(
        optimizer_module,
        "correct_grads",
        lambda grads, M, **k: buckets.append(len(grads)) or real(grads, M, **k),
    )
    model = _model()
    opt = create_lorafa_optimizer(model, RANK, ALPHA, LR)
    model(**make_lm_batches(1)[0]).loss.backward()
    opt.step()
    # q_proj B's are (64, 4), v_proj B's (32, 2): two stacked bmm's over the two decoder layers
    assert sorted(buckets) == [2, 2]


def test_state_is_per_parameter_tensors_and_round_trips_with_weights_only():
    batches = make_lm_batches(4, seed=5)
    model = _model()
    opt = create_lorafa_optimizer(model, RANK, ALPHA, LR, weight_decay=WD)
    for batch in batches[:2]:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    sd = opt.state_dict()
    assert all(isinstance(k, int) for k in sd["state"])
    assert all(isinstance(t, torch.Tensor) for s in sd["state"].values() for t in s.values())
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    # a second model with the same weights, loading the saved state (cast to float64 first: load must
    # put every moment back into its parameter's dtype and device)
    model2 = _model()
    model2.load_state_dict(model.state_dict())
    opt2 = create_lorafa_optimizer(model2, RANK, ALPHA, LR, weight_decay=WD)
    for s in loaded["state"].values():
        for k in ("exp_avg", "exp_avg_sq"):
            s[k] = s[k].double()
    opt2.load_state_dict(loaded)
    for p in opt2.param_groups[0]["params"]:
        st = opt2.state[p]
        assert st["exp_avg"].dtype == p.dtype and st["exp_avg"].device == p.device
    for m, o in ((model, opt), (model2, opt2)):
        for batch in batches[2:]:
            m(**batch).loss.backward()
            o.step()
            o.zero_grad()
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_correct_in_backward_equals_correction_in_step():
    batches = make_lm_batches(3, seed=6)
    out = []
    for in_backward in (False, True):
        model = _model()
        opt = create_lorafa_optimizer(model, RANK, ALPHA, LR, correct_in_backward=in_backward)
        for i, batch in enumerate(batches):
            if (
                i == 1
            ):  # an A changed after construction (e.g. loaded from a checkpoint) is followed by both paths
                with torch.no_grad():
                    find_lora_pairs(model)[0].A.mul_(2.0)
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        out.append([p.detach().clone() for p in model.parameters()])
        opt.remove_hooks()
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_bf16_parameters_keep_float32_moments():
    model = _model().to(torch.bfloat16)
    opt = create_lorafa_optimizer(model, RANK, ALPHA, LR)
    model(**make_lm_batches(1)[0]).loss.backward()
    opt.step()
    for p in opt.param_groups[0]["params"]:
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert torch.isfinite(p).all()


# ----------------------------------------------------------------------------- errors


def test_error_trainable_A():
    model = _model()
    with pytest.raises(
        LoraFAError,
        match=r"layer '.*q_proj': lora_A\['default'\] is trainable, but LoRA-FA keeps A frozen",
    ):
        LoraFAAdamW(model, lr=LR)


def test_error_A_receives_gradient():
    model = _model()
    opt = create_lorafa_optimizer(model, RANK, ALPHA, LR)
    pair = find_lora_pairs(model)[1]
    pair.A.grad = torch.ones_like(pair.A)
    with pytest.raises(
        RuntimeError, match=rf"layer '{pair.name}': lora_A\['default'\] received a gradient"
    ):
        opt.step()


def test_error_A_among_the_parameters():
    model = _model()
    pairs = find_lora_pairs(model)
    for p in pairs:
        p.A.requires_grad_(False)
    with pytest.raises(
        LoraFAError, match=r"lora_A\['default'\] is in the optimizer, but LoRA-FA keeps A frozen"
    ):
        LoraFAAdamW(list(model.parameters()), lr=LR, pairs=pairs)


def test_error_parameters_without_pairs_and_model_without_lora():
    model = _model()
    with pytest.raises(TypeError, match="pairs A and B by module: pass the PeftModel itself"):
        LoraFAAdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    with pytest.raises(LoraPairError, match="has no PEFT LoRA layers"):
        create_lorafa_optimizer(tiny_llama(), RANK, ALPHA, LR)


def test_error_non_finite_gradient_names_the_layer_and_leaves_parameters():
    model = _model()
    opt = create_lorafa_optimizer(model, RANK, ALPHA, LR)
    model(**make_lm_batches(1)[0]).loss.backward()
    pair = find_lora_pairs(model)[2]
    pair.B.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=rf"non-finite gradient in \['{pair.name}'\]"):
        opt.step()
    for a, p in zip(before, model.parameters()):
        assert torch.equal(a, p)


def test_error_flat_partitions_of_unknown_layout_instead_of_silent_plain_lora():
    from loralab.core.zero_views import ZeroLayoutError

    model = _model()
    opt = create_lorafa_optimizer(model, RANK, ALPHA, LR)
    flat = torch.nn.Parameter(torch.zeros(10))
    flat.grad = torch.ones(10)
    opt.param_groups[0]["params"] = [flat]  # a flat tensor whose layout is not DeepSpeed ZeRO's
    with pytest.raises(ZeroLayoutError, match="not views of one flat buffer"):
        opt.step()
    assert torch.equal(flat, torch.zeros(10))


def test_error_rslora_mismatch_and_hyperparameters():
    model = _model(use_rslora=False)
    with pytest.raises(ValueError, match=r"use_rslora=True was passed .* \['default'\]"):
        create_lorafa_optimizer(model, RANK, ALPHA, LR, use_rslora=True)
    with pytest.raises(ValueError, match="Invalid learning rate: lr must be >= 0, got -1"):
        create_lorafa_optimizer(model, RANK, ALPHA, -1)
    with pytest.raises(ValueError, match="style must be one of"):
        create_lorafa_optimizer(model, RANK, ALPHA, LR, style="adam")
    with pytest.raises(ValueError, match="ridge must be >= 0, got -1"):
        create_lorafa_optimizer(model, RANK, ALPHA, LR, ridge=-1.0)


def test_error_scaling_zero():
    model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=RANK, lora_alpha=0, target_modules=["q_proj"])
    )
    with pytest.raises(LoraFAError, match="has scaling 0"):
        create_lorafa_optimizer(model, RANK, 0, LR)


def test_qlora_nf4_base(tmp_path):
    """bitsandbytes NF4 base through PEFT's QLoRA path (CPU): pairs found on the 4-bit LoRA layers,
    A untouched, B updated by exactly the corrected AdamW step (float64 reference, one step)."""
    import bitsandbytes as bnb
    import transformers

    from loralab.core.testing import save_tiny

    path = save_tiny(tiny_llama(0), tmp_path / "tiny", tokenizer=False)
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quant, device_map="cpu", dtype=torch.float32
    )
    torch.manual_seed(0)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"])
    )
    pairs = find_lora_pairs(model)
    assert len(pairs) == 4 and all(
        isinstance(p.module.base_layer, bnb.nn.Linear4bit) for p in pairs
    )
    opt = create_lorafa_optimizer(model, RANK, ALPHA, LR, weight_decay=WD)
    batches = make_lm_batches(2, seed=8)
    model(**batches[0]).loss.backward()
    opt.step()
    opt.zero_grad()
    model(**batches[1]).loss.backward()
    A0 = [p.A.detach().clone() for p in pairs]
    before = {
        id(p.B): (p.B.detach().double().clone(), p.B.grad.double().clone(), opt.state[p.B])
        for p in pairs
    }
    expected = {}
    for pair in pairs:
        B, g, st = before[id(pair.B)]
        A = pair.A.detach().double()
        g = (
            g
            @ torch.linalg.inv(A @ A.T + 1e-8 * torch.eye(RANK, dtype=A.dtype))
            / (ALPHA / RANK) ** 2
        )
        m = BETAS[0] * st["exp_avg"].double() + (1 - BETAS[0]) * g
        v = BETAS[1] * st["exp_avg_sq"].double() + (1 - BETAS[1]) * g * g
        x = B - LR * math.sqrt(1 - BETAS[1] ** 2) / (1 - BETAS[0] ** 2) * m / (v.sqrt() + EPS)
        expected[id(pair.B)] = x - LR * WD * x
    opt.step()
    for pair, a0 in zip(pairs, A0):
        assert torch.equal(pair.A, a0)
        assert _rel(pair.B.detach(), expected[id(pair.B)]) < TOL
        assert pair.B.abs().max() > 0


def test_with_the_memory_saving_layer_same_training_as_without():
    from loralab.lora_fa import apply_lorafa_layers

    batches = make_lm_batches(3, seed=9)
    out = []
    for swap in (False, True):
        model = _model()
        if swap:
            assert len(apply_lorafa_layers(model)) == 4
        opt = create_lorafa_optimizer(model, RANK, ALPHA, LR, weight_decay=WD)
        model.train()
        for batch in batches:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        out.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
    for n in out[0]:
        torch.testing.assert_close(out[1][n], out[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_only_the_active_adapter_is_paired_and_trained():
    model = _model()
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"]))
    model.set_adapter("other")
    opt = create_lorafa_optimizer(model, 2, 6, LR)
    assert {p.adapter for p in opt.pairs} == {"other"} and len(opt.pairs) == 2
    assert all(p.scaling == 3.0 for p in opt.pairs)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    model(**make_lm_batches(1)[0]).loss.backward()
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if ".default." in n)
    assert all(p.B.abs().max() > 0 for p in opt.pairs)


@pytest.mark.parametrize("in_backward", [False, True])
def test_zero12_partition_in_one_process_equals_the_plain_step(in_backward):
    """The ZeRO path (each B found in the flat partition, its gradient corrected whole, AdamW on the
    partition) against the plain path, 3 steps, float64; the real engines (2 ranks, ZeRO-1/2/3)
    run in test_lora_fa_distributed.py."""
    batches = make_lm_batches(3, batch_size=2, seq_len=8, seed=3)
    out = []
    for zero in (False, True):
        model = _model().double()
        opt = create_lorafa_optimizer(
            model, RANK, ALPHA, LR, weight_decay=WD, correct_in_backward=in_backward
        )
        if zero:
            trainable = [p for p in model.parameters() if p.requires_grad]
            hand_gradient, copy_back = as_zero12_partition(opt, trainable)
        for b in batches:
            model(**b).loss.backward()
            if zero:
                hand_gradient()
            opt.step()
            opt.zero_grad()
            if zero:
                copy_back()
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    plain, zero = out
    for n in plain:
        torch.testing.assert_close(zero[n], plain[n], rtol=1e-12, atol=1e-12, msg=n)
