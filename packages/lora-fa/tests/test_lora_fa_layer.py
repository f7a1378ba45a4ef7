"""The memory-saving LoRA-FA layer computes exactly PEFT LoRA with A frozen (float64), with dropout too.

Tolerances: float64 comparisons use rtol=1e-10, atol=1e-12 (only the summation order of the same
matmuls differs); float32 (NF4, checkpointing) use rtol=1e-5, atol=1e-6.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from loralab.core.lora_layers import LoraPairError, find_lora_pairs
from loralab.core.testing import make_lm_batches, run_torchrun, save_tiny, tiny_gpt2, tiny_llama
from loralab.lora_fa import layer as lorafa_layer
from loralab.lora_fa import memory as lorafa_memory
from loralab.lora_fa.layer import (
    LoraFAVariant,
    apply_lorafa_layers,
    frozen_down_projection,
    lorafa_dropout_mask,
    remove_lorafa_layers,
)

RANK = 4
SEQ = 16
F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=1e-5, atol=1e-6)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_lora(
    base: torch.nn.Module, *, seed: int = 0, b_scale: float = 0.1, **config
) -> peft.PeftModel:
    """``get_peft_model(base, LoraConfig(**config))`` with B drawn N(0, b_scale²) so the adapter path is live."""
    config.setdefault("r", RANK)
    config.setdefault("lora_alpha", 8)
    model = peft.get_peft_model(base, peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(
                    torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * b_scale
                )
    return model


def freeze_A(model: torch.nn.Module) -> torch.nn.Module:
    """PEFT's own LoRA-FA setting: the same LoRA model with every lora_A frozen."""
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)
    return model


class SeedSequence:
    """Deterministic dropout seeds: patched into ``layer._draw_seed`` so masks are known in tests."""

    def __init__(self, start: int = 1000):
        self.next = start

    def __call__(self) -> int:
        self.next += 1
        return self.next


class MaskDropout(torch.nn.Module):
    """Reference dropout: multiplies by ``lorafa_dropout_mask`` drawn from a shared seed sequence."""

    def __init__(self, p: float, seeds: SeedSequence):
        super().__init__()
        self.p, self.seeds = p, seeds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * lorafa_layer.lorafa_dropout_mask(
            x.shape, x.dtype, x.device, self.p, self.seeds()
        )


def use_mask_dropout(model: torch.nn.Module, seeds: SeedSequence) -> torch.nn.Module:
    """Replace every PEFT ``nn.Dropout`` in ``lora_dropout`` by :class:`MaskDropout` (same call order as ours)."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for key, d in list(dropouts.items()):
                if isinstance(d, torch.nn.Dropout):
                    dropouts[key] = MaskDropout(d.p, seeds)
    return model


@pytest.fixture
def patch_seeds(monkeypatch):
    """Makes ``layer._draw_seed`` draw from a fresh :class:`SeedSequence` (returned)."""

    def _patch(start: int = 1000) -> SeedSequence:
        seeds = SeedSequence(start)
        monkeypatch.setattr(lorafa_layer, "_draw_seed", seeds)
        return seeds

    return _patch


def run_step(
    model: torch.nn.Module, batch: dict, *, embeds: bool = True
) -> dict[str, torch.Tensor]:
    """Forward + backward; returns logits, loss, the input-embedding gradient and every parameter gradient."""
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(embeds)
    out = model(inputs_embeds=emb, attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()
    res = {"loss": out.loss.detach(), "logits": out.logits.detach()}
    if embeds:
        res["x.grad"] = emb.grad
    for name, p in model.named_parameters():
        if p.requires_grad:
            res[name] = p.grad
    return res


def assert_same(got: dict, want: dict, tol: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert want[k] is not None and got[k] is not None, k
        torch.testing.assert_close(got[k], want[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def llama64(**kw) -> torch.nn.Module:
    return tiny_llama(**kw).double()


# ---------------------------------------------------------------------------- the autograd function


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_frozen_down_projection_matches_dense_float64(p):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    A = torch.randn(RANK, 8, generator=g, dtype=torch.float64)
    h = frozen_down_projection(x, A, p=p, seed=7)
    mask = lorafa_dropout_mask(x.shape, x.dtype, x.device, p, 7) if p else torch.ones_like(x)
    x_ref = x.detach().clone().requires_grad_()
    h_ref = (x_ref * mask) @ A.t()
    torch.testing.assert_close(h, h_ref, **F64)
    gh = torch.randn(h.shape, generator=g, dtype=torch.float64)
    h.backward(gh)
    h_ref.backward(gh)
    torch.testing.assert_close(x.grad, x_ref.grad, **F64)
    assert torch.autograd.gradcheck(
        lambda t: frozen_down_projection(t, A, p=p, seed=7), (x.detach().requires_grad_(),)
    )


def test_dropout_mask_is_deterministic_and_has_rate_p():
    m = lorafa_dropout_mask(
        torch.Size([200, 100]), torch.float32, torch.device("cpu"), 0.25, seed=3
    )
    assert torch.equal(m, lorafa_dropout_mask(m.shape, m.dtype, m.device, 0.25, seed=3))
    assert not torch.equal(m, lorafa_dropout_mask(m.shape, m.dtype, m.device, 0.25, seed=4))
    assert m.unique().tolist() == [0.0, pytest.approx(1 / 0.75)]
    assert abs((m == 0).float().mean().item() - 0.25) < 0.01


def test_frozen_down_projection_errors():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="lora_A requires grad"):
        frozen_down_projection(x, torch.randn(RANK, 8, requires_grad=True))
    with pytest.raises(ValueError, match=r"dropout p must be in \[0, 1\), got 1.0"):
        frozen_down_projection(x, torch.randn(RANK, 8), p=1.0)


def test_backward_saves_only_the_r_dim_product():
    # one LoRA layer: ours keeps H = drop(X)·Aᵀ (tokens × r) and nothing else; the base weight is frozen
    base = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False))
    model = freeze_A(peft_lora(base, target_modules=["0"], lora_dropout=0.1))
    apply_lorafa_layers(model)
    model.train()
    x = torch.randn(2, SEQ, 64, requires_grad=True)
    with lorafa_memory.saved_tensor_bytes(model) as stats:
        y = model(x)
    y.sum().backward()
    assert stats.nbytes == 2 * SEQ * RANK * 4
    assert list(stats.by_kind) == [((2 * SEQ, RANK), "torch.float32")]


# ---------------------------------------------------------------------------- whole models, float64


@pytest.mark.parametrize("trainable_base", [False, True])
def test_llama_matches_peft_with_frozen_A_float64(trainable_base):
    # x's gradient goes through every frozen base weight; with trainable_base the norms (non-LoRA
    # parameters upstream of the adapters) are trained too, so their gradients check the base path
    ref = freeze_A(peft_lora(llama64(), target_modules=LLAMA_TARGETS, lora_dropout=0.0))
    if trainable_base:
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.requires_grad_(True)
    ours = copy.deepcopy(ref)
    names = apply_lorafa_layers(ours)
    assert len(names) == 2 * len(LLAMA_TARGETS)
    batch = make_lm_batches(1, seq_len=SEQ)[0]
    ref.train(), ours.train()
    got, want = run_step(ours, batch), run_step(ref, batch)
    assert sum("lora_B" in k for k in want) == len(names)
    assert_same(got, want, F64)


def test_llama_dropout_matches_peft_with_the_same_masks_float64(patch_seeds):
    # PEFT's nn.Dropout replaced by a multiplier drawn from the same seed sequence as ours: the two
    # models then see identical masks, so outputs and all gradients must agree
    ref = freeze_A(peft_lora(llama64(), target_modules=LLAMA_TARGETS, lora_dropout=0.2))
    ours = copy.deepcopy(ref)
    apply_lorafa_layers(ours)
    use_mask_dropout(ref, SeedSequence(1000))
    patch_seeds(1000)
    batch = make_lm_batches(1, seq_len=SEQ)[0]
    ref.train(), ours.train()
    got, want = run_step(ours, batch), run_step(ref, batch)
    assert_same(got, want, F64)
    # and dropout is really on: without it, B's gradients differ
    plain = run_step(copy.deepcopy(ref).eval(), batch)
    key = next(k for k in want if "lora_B" in k)
    assert not torch.allclose(plain[key], want[key])


def test_eval_mode_has_no_dropout():
    ref = peft_lora(llama64(), target_modules=["q_proj", "v_proj"], lora_dropout=0.5)
    ours = copy.deepcopy(ref)
    apply_lorafa_layers(ours)
    ref.eval(), ours.eval()
    ids = make_lm_batches(1, seq_len=SEQ)[0]["input_ids"]
    torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, **F64)


def test_gpt2_conv1d_matches_peft_with_frozen_A_float64():
    # GPT-2's own dropouts off: only the adapters' path differs between the two models
    ref = freeze_A(
        peft_lora(
            tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).double(),
            target_modules=["c_attn", "c_proj", "c_fc"],
            fan_in_fan_out=True,
        )
    )
    ours = copy.deepcopy(ref)
    assert len(apply_lorafa_layers(ours)) == 2 * 4
    batch = make_lm_batches(1, seq_len=SEQ)[0]
    ref.train(), ours.train()
    assert_same(run_step(ours, batch), run_step(ref, batch), F64)


# ---------------------------------------------------------------------------- PEFT plumbing


def test_state_dict_merge_and_remove_round_trip():
    model = peft_lora(tiny_llama(), target_modules=["q_proj", "down_proj"], lora_dropout=0.1)
    keys = set(model.state_dict())
    ref = copy.deepcopy(model)
    apply_lorafa_layers(model)
    assert apply_lorafa_layers(model) == [p.name for p in find_lora_pairs(model)]  # idempotent
    assert set(model.state_dict()) == keys
    assert not any(p.A.requires_grad for p in find_lora_pairs(model))
    assert all(p.B.requires_grad for p in find_lora_pairs(model))
    ids = make_lm_batches(1, seq_len=SEQ)[0]["input_ids"]
    model.eval(), ref.eval()
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, ref(input_ids=ids).logits, **F32)
    restored = remove_lorafa_layers(model)
    assert len(restored) == 4
    layer = find_lora_pairs(model)[0].module
    assert (
        type(layer.lora_A["default"]) is torch.nn.Linear and layer.lora_dropout["default"].p == 0.1
    )
    assert remove_lorafa_layers(model) == []


def test_a_stays_frozen_through_peft_adapter_switching():
    # PEFT re-enables requires_grad on adapter weights in set_adapter / after disable_adapter();
    # A must stay frozen (it is registered in PEFT's frozen_peft_weight_names)
    model = peft_lora(tiny_llama(), target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    apply_lorafa_layers(model)
    ids = make_lm_batches(1, seq_len=SEQ)[0]["input_ids"]
    with model.disable_adapter():
        model(input_ids=ids)
    model.set_adapter("default")
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert not any(p.A.requires_grad for p in find_lora_pairs(model))
    assert all(p.B.requires_grad and p.B.grad is not None for p in find_lora_pairs(model))
    remove_lorafa_layers(model)
    model.set_adapter("default")  # back to plain LoRA: PEFT may train A again
    assert all(p.A.requires_grad for p in find_lora_pairs(model))


def test_one_of_two_adapters_and_mixed_batch_inference():
    # only the named adapter is converted; PEFT's mixed-batch forward (adapter_names=...) still works
    ref = peft_lora(llama64(), target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    ref.add_adapter(
        "other", peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    )
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B.other" in name:
                p.normal_(0, 0.1)
    ours = copy.deepcopy(ref)
    names = apply_lorafa_layers(ours, adapter_name="other")
    assert len(names) == 4
    layer = find_lora_pairs(ours, "other")[0].module
    assert isinstance(layer.lora_variant["other"], LoraFAVariant)
    assert "default" not in layer.lora_variant and layer.lora_A["default"].weight.requires_grad
    assert type(layer.lora_A["other"]) is torch.nn.Linear  # PEFT's own modules, not swapped
    assert isinstance(layer.lora_dropout["other"], torch.nn.Dropout)
    ids = make_lm_batches(1, batch_size=2, seq_len=SEQ)[0]["input_ids"]
    ref.eval(), ours.eval()
    mixed = ["default", "other"]
    torch.testing.assert_close(
        ours(input_ids=ids, adapter_names=mixed).logits,
        ref(input_ids=ids, adapter_names=mixed).logits,
        **F64,
    )


def test_errors_name_the_layer():
    with pytest.raises(LoraPairError, match="no PEFT LoRA layers"):
        apply_lorafa_layers(tiny_llama())
    dora = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=RANK, target_modules=["q_proj"], use_dora=True)
    )
    with pytest.raises(ValueError, match=r"layer '.*layers\.0\.self_attn\.q_proj'.*LoRA variant"):
        apply_lorafa_layers(dora)
    conv = peft.get_peft_model(
        torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), peft.LoraConfig(r=RANK, target_modules=["0"])
    )
    with pytest.raises(
        ValueError,
        match=r"layer '.*0': lora_A\['default'\] is Conv2d; .* supports bias-free nn.Linear",
    ):
        apply_lorafa_layers(conv)
    model = peft_lora(tiny_llama(), target_modules=["q_proj"])
    apply_lorafa_layers(model)
    layer = find_lora_pairs(model)[0].module
    assert isinstance(layer.lora_variant["default"], LoraFAVariant)
    down = layer.lora_A["default"]
    down.weight.requires_grad_(True)
    with pytest.raises(
        RuntimeError, match=r"LoRA-FA layer '.*layers\.0\.self_attn\.q_proj': lora_A requires grad"
    ):
        model(input_ids=make_lm_batches(1)[0]["input_ids"])


def test_bf16_autocast_gradients_keep_input_dtype():
    model = peft_lora(tiny_llama(), target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    apply_lorafa_layers(model)
    model.train()
    batch = make_lm_batches(1, seq_len=SEQ)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
        loss = model(inputs_embeds=emb, labels=batch["labels"]).loss
    loss.backward()
    assert emb.grad.dtype == torch.float32 and torch.isfinite(emb.grad).all()
    assert all(
        p.B.grad is not None and p.B.grad.dtype == torch.float32 for p in find_lora_pairs(model)
    )


# ---------------------------------------------------------------------------- checkpointing and NF4


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_with_dropout_gives_the_same_gradients(use_reentrant):
    # masks are regenerated from seeds; with checkpointing the recomputed forward must use the same ones
    ref = peft_lora(tiny_llama(), target_modules=LLAMA_TARGETS, lora_dropout=0.2)
    apply_lorafa_layers(ref)
    ckpt = copy.deepcopy(ref)
    ckpt.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
    )
    batch = make_lm_batches(1, seq_len=SEQ)[0]
    ref.train(), ckpt.train()
    torch.manual_seed(0)
    want = run_step(ref, batch)  # inputs_embeds require grad, as reentrant checkpointing needs
    torch.manual_seed(0)
    got = run_step(ckpt, batch)
    assert_same(got, want, F32)


@pytest.fixture(scope="module")
def nf4_path(tmp_path_factory):
    return save_tiny(tiny_llama(), tmp_path_factory.mktemp("tiny_llama"), tokenizer=False)


def load_nf4(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=q, device_map="cpu", dtype=torch.float32
    )


def nf4_pair(path, patch_seeds, dropout: float = 0.2):
    """PEFT LoRA (A frozen, reference masks) and ours on two loads of the same NF4 model, same LoRA weights."""
    ref = freeze_A(peft_lora(load_nf4(path), target_modules=LLAMA_TARGETS, lora_dropout=dropout))
    ours = peft_lora(load_nf4(path), target_modules=LLAMA_TARGETS, lora_dropout=dropout)
    lora = {n: p for n, p in ref.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.copy_(lora[n])
    apply_lorafa_layers(ours)
    use_mask_dropout(ref, SeedSequence(1000))
    patch_seeds(1000)
    return ref.train(), ours.train()


def test_nf4_qlora_matches_peft_with_frozen_A(nf4_path, patch_seeds):
    import bitsandbytes as bnb

    ref, ours = nf4_pair(nf4_path, patch_seeds)
    assert isinstance(
        ours.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit
    )
    batch = make_lm_batches(1, seq_len=SEQ)[0]
    assert_same(run_step(ours, batch), run_step(ref, batch), F32)


def test_nf4_with_the_lorafa_optimizer_trains_like_peft_lorafa(nf4_path, patch_seeds):
    # bullet 4: quantized base + memory-saving layer + our optimizer == the same optimizer on PEFT's layers
    from loralab.lora_fa import create_lorafa_optimizer

    ref, ours = nf4_pair(nf4_path, patch_seeds)
    A0 = {p.name: p.A.detach().clone() for p in find_lora_pairs(ours)}
    opts = [create_lorafa_optimizer(m, r=RANK, lora_alpha=8, lr=1e-2) for m in (ref, ours)]
    for batch in make_lm_batches(3, seq_len=SEQ, seed=1):
        for model, opt in zip((ref, ours), opts):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    want = {p.name: p.B for p in find_lora_pairs(ref)}
    for pair in find_lora_pairs(ours):
        assert torch.equal(pair.A, A0[pair.name]), pair.name
        torch.testing.assert_close(pair.B, want[pair.name], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- DeepSpeed


@pytest.mark.multiprocess
@pytest.mark.slow
def test_deepspeed_zero3_trains_like_peft_layers(tmp_path):
    # 2 CPU ranks (torchrun + deepspeed.initialize, gloo), create_lorafa_optimizer as client optimizer;
    # ZeRO-3 partitions A, which our autograd function keeps for backward: B must equal the run on
    # PEFT's own layers with the same dropout masks, on every rank
    pytest.importorskip("deepspeed")
    from pathlib import Path

    prefix = tmp_path / "out"
    run_torchrun(Path(__file__).with_name("lora_fa_layer_ds_worker.py"), prefix, timeout=600)
    stage = 3
    for rank in (0, 1):
        out = torch.load(f"{prefix}.{rank}.pt", weights_only=True)
        peft_run, ours = out[f"zero{stage}/peft"], out[f"zero{stage}/ours"]
        assert not isinstance(peft_run, str), peft_run
        assert not isinstance(ours, str), ours
        assert peft_run.keys() == ours.keys() and len(ours) == 4
        for name in ours:
            torch.testing.assert_close(
                ours[name],
                peft_run[name],
                rtol=1e-6,
                atol=1e-7,
                msg=lambda m, n=name, st=stage: f"zero{st} {n}: {m}",
            )
