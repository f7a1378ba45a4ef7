"""The seed ReLoRA-style API: ReLoRaModel, merge_and_reinit, the seed README loop, HF Trainer."""

import copy
import types

import pytest
import torch

from loralab.core.testing import make_lm_batches, tiny_llama
from loralab.golore import GaLoreAdamW, ReLoRaCallback, ReLoRaLinear, ReLoRaModel, merge_and_reinit

RANK, GAP, SCALE = 4, 3, 0.5


def _wrap(model, **kw):
    args = dict(
        r=RANK,
        lora_dropout=0,
        target_modules=["attn", "mlp"],
        scale=SCALE,
        keep_original_weights=True,
        lora_only=False,
        quantize=None,
        use_double_quant=False,
    )
    args.update(kw)
    return ReLoRaModel(model, **args)


def test_seed_readme_loop_runs_with_only_the_import_changed():
    """The GoLore README's snippet, verbatim apart from the import; optimizer wrapped as accelerate does.

    (The snippet decides ``reset_relora`` per micro-batch, so it only works without gradient
    accumulation, as in its GLUE script; ReLoRaCallback handles accumulation, tested below.)"""
    args = types.SimpleNamespace(
        rank=RANK,
        scale=SCALE,
        quantize=None,
        use_double_quant=False,
        gradient_accumulation_steps=1,
        update_proj_gap=2,
        max_train_steps=8,
        rand_ratio=0.5,
    )
    need_linear_weight = True
    model = tiny_llama()
    model = ReLoRaModel(
        model,
        r=args.rank,
        lora_dropout=0,
        target_modules=["attn", "attention", "mlp"],
        scale=args.scale,
        keep_original_weights=True,
        lora_only=not need_linear_weight,
        quantize=args.quantize,
        use_double_quant=args.use_double_quant,
    )
    optimizer = types.SimpleNamespace(optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    train_dataloader = make_lm_batches(8)
    completed_steps, n_lora_restarts, used = 0, 0, []
    before = {
        n: m.effective_weight().clone()
        for n, m in model.named_modules()
        if isinstance(m, ReLoRaLinear)
    }
    for step, batch in enumerate(train_dataloader):
        if isinstance(model, ReLoRaModel):
            reset_relora = (
                step % args.gradient_accumulation_steps == 0 or step == len(train_dataloader) - 1
            ) and completed_steps % args.update_proj_gap == 0
            model._config.forward_type = reset_relora
        loss = model(**batch).loss / args.gradient_accumulation_steps
        loss.backward()
        if (step + 1) % args.gradient_accumulation_steps != 0:
            continue
        if isinstance(model, ReLoRaModel):
            if reset_relora:
                use_rand = (completed_steps / args.max_train_steps) >= args.rand_ratio
                n_lora_restarts += 1
                used.append(use_rand)
                model.merge_and_reinit(optimizer.optimizer, use_rand)
        optimizer.optimizer.step()
        optimizer.optimizer.zero_grad()
        completed_steps += 1
    assert n_lora_restarts == 4 and used == [False, False, True, True]
    after = {
        n: m.effective_weight() for n, m in model.named_modules() if isinstance(m, ReLoRaLinear)
    }
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert torch.isfinite(loss)


def test_relora_path_equals_galore_optimizer_path():
    """W_eff = W − s·A·B trained by torch AdamW with merges every GAP steps is GaLoreAdamW with moment
    re-projection, scale s and eps/s (the factor's gradient is −s times the projected gradient)."""
    base = tiny_llama().double()
    m1 = _wrap(copy.deepcopy(base))
    factors = [m.trained_factor for m in m1.modules() if isinstance(m, ReLoRaLinear)]
    fid = {id(p) for p in factors}
    rest = [p for p in m1.parameters() if p.requires_grad and id(p) not in fid]
    opt1 = torch.optim.AdamW(
        [dict(params=factors, eps=SCALE * 1e-8), dict(params=rest)],
        lr=1e-3,
        eps=1e-8,
        weight_decay=0,
    )
    m2 = copy.deepcopy(base)
    proj = [p for n, p in m2.named_parameters() if n.endswith("proj.weight")]
    pid = {id(p) for p in proj}
    groups = [
        dict(params=[p for p in m2.parameters() if id(p) not in pid]),
        dict(params=proj, rank=RANK, update_proj_gap=GAP, scale=SCALE, svd_method="full"),
    ]
    opt2 = GaLoreAdamW(groups, lr=1e-3, eps=1e-8, adamw_style="torch")
    m1.train()
    m2.train()
    for step, b in enumerate(make_lm_batches(7)):
        reset = step % GAP == 0
        m1._config.forward_type = reset
        m1(**b).loss.backward()
        if reset:
            m1.merge_and_reinit(opt1, False)
        opt1.step()
        opt1.zero_grad()
        m2(**b).loss.backward()
        opt2.step()
        opt2.zero_grad()
    wrapped = dict(m1.wrapped_model.named_modules())
    for name, mod in m2.named_modules():
        if name.endswith("proj"):
            torch.testing.assert_close(
                wrapped[name].effective_weight(), mod.weight, atol=1e-12, rtol=0
            )
    torch.testing.assert_close(
        m1.wrapped_model.lm_head.weight, m2.lm_head.weight, atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("rand", [False, True])
def test_merge_keeps_the_function_and_sets_projector_and_gradient(rand):
    model = _wrap(tiny_llama().double())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    batch = make_lm_batches(1)[0]
    model._config.forward_type = True
    model(**batch).loss.backward()
    layer = model.wrapped_model.model.layers[
        0
    ].mlp.down_proj  # (64, 128): out < in → left projector A
    assert not layer.proj_type
    with torch.no_grad():
        layer.lora_B.weight.normal_()  # a non-zero adapter to merge
    w_eff = layer.effective_weight().clone()
    grad_w = layer.weight.grad.clone()
    model.merge_and_reinit(opt, rand)
    torch.testing.assert_close(layer.effective_weight(), w_eff, atol=1e-12, rtol=0)
    A = layer.lora_A.weight
    torch.testing.assert_close(A.T @ A, torch.eye(RANK, dtype=torch.float64), atol=1e-12, rtol=0)
    if not rand:
        U = torch.linalg.svd(grad_w, full_matrices=False)[0][:, :RANK]
        torch.testing.assert_close(A @ A.T, U @ U.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.lora_B.weight.grad, -SCALE * A.T @ grad_w, atol=1e-12, rtol=0)
    assert (
        layer.weight.grad is None
        and not layer.weight.requires_grad
        and layer.lora_B.weight.requires_grad
    )
    assert model._config.forward_type is False


def test_merge_carries_momentum_of_any_torch_optimizer():
    model = _wrap(tiny_llama().double())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    batches = make_lm_batches(3)
    for k, b in enumerate(batches):
        model._config.forward_type = k != 1
        model(**b).loss.backward()
        if k != 1:
            layer = model.wrapped_model.model.layers[
                0
            ].self_attn.q_proj  # square: right projector B
            old_B = layer.lora_B.weight.clone()
            buf_old = opt.state[layer.lora_A.weight].get("momentum_buffer")
            buf_old = None if buf_old is None else buf_old.clone()
            model.merge_and_reinit(opt, use_rand=True)
            if buf_old is not None:
                new_B = layer.lora_B.weight
                torch.testing.assert_close(
                    opt.state[layer.lora_A.weight]["momentum_buffer"],
                    buf_old @ old_B @ new_B.T,
                    atol=1e-12,
                    rtol=0,
                )
        opt.step()
        opt.zero_grad()
    assert buf_old is not None


def test_errors_are_clear():
    with pytest.raises(ValueError, match="quantize must be one of"):
        _wrap(tiny_llama(), quantize="int4")
    with pytest.raises(ValueError, match="keep_original_weights must be False"):
        _wrap(tiny_llama(), lora_only=True)
    with pytest.raises(ValueError, match="r must be a positive int"):
        _wrap(tiny_llama(), r=0)
    with pytest.raises(Exception, match="matched no linear layer"):
        _wrap(tiny_llama(), target_modules=["conv"])
    model = _wrap(tiny_llama())
    model(**make_lm_batches(1)[0]).loss.backward()  # forward_type False: W has no gradient
    with pytest.raises(RuntimeError, match="forward_type = True"):
        model.merge_and_reinit(None, False)


def test_lora_only_and_passthrough_attributes():
    model = _wrap(tiny_llama(), lora_only=True, keep_original_weights=False)
    assert model.config.hidden_size == 64  # looked up on the wrapped model
    assert merge_and_reinit(model, None, False) == 14  # skipped with a warning, no crash
    out = model(**make_lm_batches(1)[0])
    assert torch.isfinite(out.loss)


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = _wrap(tiny_llama())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ReLoRaLinear):
                m.lora_A.weight.normal_()
                m.lora_B.weight.normal_()
    model.save_pretrained(tmp_path)
    loaded = ReLoRaModel.from_pretrained(tmp_path)
    batch = make_lm_batches(1)[0]
    model.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


def test_hf_trainer_with_callback_and_with_galore_optimizer(tmp_path):
    """ReLoRA path driven by ReLoRaCallback (with gradient accumulation), and GaLoreAdamW as Trainer's optimizer."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    rows = [{k: v[i] for k, v in b.items()} for b in make_lm_batches(8) for i in range(2)]
    ds = Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows])
    targs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    model = _wrap(tiny_llama())
    cb = ReLoRaCallback(update_proj_gap=2, rand_ratio=0.5)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(gradient_accumulation_steps=2, **targs),
        train_dataset=ds,
        callbacks=[cb],
    )
    out = trainer.train()
    assert cb.n_resets == 2 and torch.isfinite(torch.tensor(out.training_loss))

    from loralab.golore import create_galore_optimizer

    model2 = tiny_llama()
    opt = create_galore_optimizer(model2, 1e-3, rank=4, update_proj_gap=2)
    before = model2.model.layers[0].self_attn.q_proj.weight.clone()
    Trainer(
        model=model2, args=TrainingArguments(**targs), train_dataset=ds, optimizers=(opt, None)
    ).train()
    p = model2.model.layers[0].self_attn.q_proj.weight
    assert "proj_right" in opt.state[p] and not torch.equal(before, p)
