"""LoraProAdamW.load_state_dict refuses a state of another model, LoRA rank or mode."""

from __future__ import annotations

import peft
import pytest

from loralab.core.testing import make_lm_batches, tiny_llama
from loralab.lora_pro import LoraProAdamW


def _trained(r=4, mode="efficient", hidden_size=64):
    model = peft.get_peft_model(
        tiny_llama(0, hidden_size=hidden_size),
        peft.LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    opt = LoraProAdamW(model, lr=1e-3, mode=mode)
    batch = make_lm_batches(1, batch_size=2, seq_len=8)[0]
    model(**batch).loss.backward()
    opt.step()
    return opt


def test_own_state_loads():
    opt = _trained()
    _trained().load_state_dict(opt.state_dict())


def test_state_of_another_rank_is_refused_naming_shapes():
    saved = _trained(r=8).state_dict()
    with pytest.raises(
        ValueError,
        match=r"parameter 0 of param group 0 \(shape \(4, 64\)\): saved state 'exp_avg' has shape \(8, 64\), this optimizer expects \(4, 64\)",
    ):
        _trained(r=4).load_state_dict(saved)


def test_state_of_another_model_is_refused():
    saved = _trained(hidden_size=32).state_dict()
    with pytest.raises(
        ValueError,
        match=r"saved state 'exp_avg' has shape \(4, 32\), this optimizer expects \(4, 64\)",
    ):
        _trained(hidden_size=64).load_state_dict(saved)


def test_state_of_another_mode_is_refused_not_adopted():
    saved = _trained(mode="full").state_dict()
    opt = _trained(mode="efficient")
    with pytest.raises(ValueError, match=r"mode 'full' → 'efficient'"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["mode"] == "efficient"
