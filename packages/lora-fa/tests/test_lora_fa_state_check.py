"""LoraFAAdamW.load_state_dict refuses a state of another model or LoRA rank."""

from __future__ import annotations

import peft
import pytest

from loralab.core.testing import make_lm_batches, tiny_llama
from loralab.lora_fa import LoraFAAdamW, LoraFAOptimizer


def _trained(r=4, hidden_size=64):
    model = peft.get_peft_model(
        tiny_llama(0, hidden_size=hidden_size),
        peft.LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    for n, p in model.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)
    opt = LoraFAAdamW(model, lr=1e-3)
    batch = make_lm_batches(1, batch_size=2, seq_len=8)[0]
    model(**batch).loss.backward()
    opt.step()
    return opt


def test_own_state_loads():
    _trained().load_state_dict(_trained().state_dict())


def test_state_of_another_rank_is_refused_naming_shapes():
    saved = _trained(r=8).state_dict()
    with pytest.raises(
        ValueError,
        match=r"parameter 0 of param group 0 \(shape \(64, 4\)\): saved state 'exp_avg' has shape \(64, 8\), this optimizer expects \(64, 4\)",
    ):
        _trained(r=4).load_state_dict(saved)


def test_state_of_another_model_is_refused():
    saved = _trained(hidden_size=32).state_dict()
    with pytest.raises(ValueError, match=r"has shape \(32, 4\), this optimizer expects \(64, 4\)"):
        _trained(hidden_size=64).load_state_dict(saved)


def test_compat_name_is_the_same_class():
    assert LoraFAOptimizer is LoraFAAdamW
