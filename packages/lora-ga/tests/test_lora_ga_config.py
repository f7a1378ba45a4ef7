"""LoraGAConfig: fields changed after construction are honoured (or refused), never silently ignored."""

from __future__ import annotations

import pytest
import torch

from loralab.core.testing import make_lm_batches, tiny_llama
from loralab.lora_ga import LoraGAConfig, get_lora_ga_model


def _cfg(**kw):
    return LoraGAConfig(r=2, lora_alpha=4, target_modules=["q_proj"], iters=1, **kw)


def _q_layer(pm):
    return pm.base_model.model.model.layers[0].self_attn.q_proj


def test_dtype_set_after_construction_is_used_for_the_factors():
    cfg = _cfg()
    cfg.dtype = "bf16"
    pm = get_lora_ga_model(tiny_llama(), cfg, make_lm_batches(1), progress=False)
    assert _q_layer(pm).lora_A["default"].weight.dtype == torch.bfloat16
    assert cfg.lora_ga_config.dtype == "bf16"  # the sub-config (what a save writes) follows


def test_sub_config_edit_peft_style_counts_and_equals_the_field():
    batches = make_lm_batches(1)
    edited = _cfg()
    edited.lora_ga_config.direction = "A2rBr"
    direct = _cfg(direction="A2rBr")
    a = _q_layer(get_lora_ga_model(tiny_llama(), edited, batches, progress=False))
    b = _q_layer(get_lora_ga_model(tiny_llama(), direct, batches, progress=False))
    assert edited.direction == "A2rBr"
    torch.testing.assert_close(a.lora_A["default"].weight, b.lora_A["default"].weight)
    torch.testing.assert_close(a.lora_B["default"].weight, b.lora_B["default"].weight)


def test_aliases_set_after_construction_are_normalised():
    cfg = _cfg()
    cfg.scale = "weightS"
    cfg.dtype = "bfloat16"
    st = cfg.lora_ga_settings()
    assert (st.scale, st.dtype) == ("weight_svd", "bf16")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("dtype", "int8", "LoraGAConfig.dtype must be one of"),
        ("direction", "up", "LoraGAConfig.direction must be one of"),
        ("stable_gamma", 0, "LoraGAConfig.stable_gamma must be a positive number"),
        ("iters", 0, "LoraGAConfig.iters must be a positive int"),
    ],
)
def test_invalid_values_set_after_construction_are_refused_before_estimating(field, value, match):
    cfg = _cfg()
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=match):
        get_lora_ga_model(tiny_llama(), cfg, make_lm_batches(1), progress=False)


def test_conflicting_edits_on_both_sides_are_refused_naming_the_field():
    cfg = _cfg()
    cfg.dtype = "bf16"
    cfg.lora_ga_config.dtype = "fp16"
    with pytest.raises(
        ValueError,
        match=r"LoraGAConfig.dtype = 'bf16' but LoraGAConfig.lora_ga_config.dtype = 'fp16'",
    ):
        cfg.lora_ga_settings()


def test_use_dora_set_after_construction_is_refused():
    cfg = _cfg()
    cfg.use_dora = True
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        get_lora_ga_model(tiny_llama(), cfg, make_lm_batches(1), progress=False)


def test_saved_config_holds_the_current_settings(tmp_path):
    cfg = _cfg()
    cfg.lora_ga_config.scale = "unit"
    with pytest.warns(UserWarning, match="raw LoRA-GA checkpoint"):
        cfg.save_pretrained(str(tmp_path))
    loaded = LoraGAConfig.from_pretrained(str(tmp_path))
    assert loaded.scale == "unit" and loaded.lora_ga_config.scale == "unit"
