"""Target discovery, (out, in) weight views and module surgery."""

import pytest
import torch
from torch import nn

from loralab.core.targets import (
    TargetNotFoundError,
    find_all_linear_modules,
    find_targets,
    get_module,
    layer_kind,
    replace_module,
    to_storage_layout,
    weight_matrix,
)
from loralab.core.testing import tiny_gpt2, tiny_llama, tiny_roberta, tiny_t5

LLAMA_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_all_linear_llama_excludes_head():
    model = tiny_llama()
    targets = find_targets(model)
    assert len(targets) == 2 * 7
    assert "lm_head" not in targets
    assert list(targets) == [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"
    ]
    assert find_all_linear_modules(model) == LLAMA_LINEAR
    with_head = find_targets(model, include_heads=True)
    assert "lm_head" in with_head and with_head["lm_head"].kind == "linear"


def test_heads_of_classifiers_and_t5_excluded():
    roberta = find_targets(tiny_roberta())
    assert not any(n.startswith("classifier") for n in roberta)
    assert find_all_linear_modules(tiny_roberta()) == ["dense", "key", "query", "value"]
    t5 = find_targets(tiny_t5())
    assert (
        "lm_head" not in t5
        and any(n.startswith("decoder.") for n in t5)
        and any(n.startswith("encoder.") for n in t5)
    )


def test_listed_name_matching_a_head_is_reported_not_silently_dropped(caplog):
    model = tiny_roberta()
    with caplog.at_level("WARNING", logger="loralab.core.targets"):
        targets = find_targets(model, ["dense"])
    assert not any(n.startswith("classifier") for n in targets)
    assert "classifier.dense" in caplog.text and "include_heads=True" in caplog.text
    assert "classifier.dense" in find_targets(model, ["dense"], include_heads=True)
    caplog.clear()
    with caplog.at_level("WARNING", logger="loralab.core.targets"):
        find_targets(model)  # "all-linear" leaves heads out by definition (as PEFT): no warning
    assert "head" not in caplog.text
    with caplog.at_level("WARNING", logger="loralab.core.targets"):
        find_targets(model, ["dense"], exclude_modules=["classifier.dense"])  # excluded on purpose
    assert "head" not in caplog.text


def test_gpt2_conv1d_weight_is_transposed_view():
    model = tiny_gpt2()
    targets = find_targets(model, ["c_attn"])
    t = targets["transformer.h.0.attn.c_attn"]
    assert (
        t.kind == "conv1d"
        and t.shape == (3 * 64, 64)
        and (t.out_features, t.in_features) == (192, 64)
    )
    w = t.weight_matrix()
    assert w.shape == t.shape and w.data_ptr() == t.weight.data_ptr()  # a view, no copy
    x = torch.randn(3, 64)
    torch.testing.assert_close(t.module(x), x @ w.T + t.module.bias)
    assert to_storage_layout(t.module, w).shape == t.weight.shape
    t.module.weight.grad = torch.ones_like(t.weight)
    assert t.gradient_matrix().shape == t.shape
    t.module.weight.grad = None


def test_linear_view_and_kinds():
    lin = nn.Linear(5, 3)
    assert layer_kind(lin) == "linear" and weight_matrix(lin) is lin.weight
    assert layer_kind(nn.Embedding(4, 4)) is None
    with pytest.raises(TypeError, match="not an adaptable layer"):
        weight_matrix(nn.LayerNorm(3))


def test_linear4bit_is_a_target_with_dequantized_view():
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential()
    model.add_module(
        "proj", bnb.nn.Linear4bit(64, 32, quant_type="nf4", compute_dtype=torch.float32).to("cpu")
    )
    model.add_module("int8", bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False).to("cpu"))
    targets = find_targets(model)
    assert {n: t.kind for n, t in targets.items()} == {"proj": "linear4bit", "int8": "linear8bit"}
    assert targets["proj"].is_quantized and targets["proj"].shape == (32, 64)
    w = targets["proj"].weight_matrix()
    assert w.shape == (32, 64) and w.dtype == torch.float32


def test_regex_list_and_exclude():
    model = tiny_llama()
    regex = find_targets(model, r".*layers\.1\.self_attn\.(q|v)_proj")
    assert list(regex) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    listed = find_targets(
        model, ["q_proj", "mlp.up_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]
    )
    assert list(listed) == [
        "model.layers.0.mlp.up_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.up_proj",
    ]
    # suffix matching is by dotted component, not substring
    assert not any(n.endswith("proj") and n.endswith("_proj") is False for n in listed)
    with pytest.raises(TargetNotFoundError):
        find_targets(model, ["roj"])


def test_not_found_lists_candidates():
    with pytest.raises(
        TargetNotFoundError,
        match=r"matched no adaptable layer of LlamaForCausalLM; candidate layer names: down_proj, gate_proj",
    ):
        find_targets(tiny_llama(), ["query"])
    with pytest.raises(TargetNotFoundError, match="candidate layer names"):
        find_targets(tiny_llama(), "all-linear", exclude_modules=LLAMA_LINEAR)
    with pytest.raises(TargetNotFoundError, match="target_modules is None"):
        find_targets(tiny_llama(), None)


def test_non_adaptable_match_is_an_error():
    with pytest.raises(
        TargetNotFoundError,
        match=r"cannot adapt: model\.layers\.0\.input_layernorm \(LlamaRMSNorm\)",
    ):
        find_targets(tiny_llama(), ["q_proj", "input_layernorm"])


def test_peft_wrapped_model_skips_base_layers():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    targets = find_targets(model, ["q_proj"])
    # the wrapper stands for its base layer under its own name; its insides are not targets
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    assert next(iter(targets)) == name and len(targets) == 2
    assert targets[name].module is model.get_submodule(name).base_layer
    everything = find_targets(model)
    assert len(everything) == 14 and not any("lora_" in n or "base_layer" in n for n in everything)


def test_get_and_replace_module():
    model = tiny_llama()
    old = get_module(model, "model.layers.0.mlp.up_proj")
    assert get_module(model, "") is model
    new = nn.Linear(64, 128, bias=False)
    assert replace_module(model, "model.layers.0.mlp.up_proj", new) is old
    assert model.model.layers[0].mlp.up_proj is new
    batch = {"input_ids": torch.randint(4, 100, (1, 8))}
    assert model(**batch).logits.shape == (1, 8, model.config.vocab_size)
    with pytest.raises(TargetNotFoundError, match=r"no sub-module named 'model\.nope'"):
        get_module(model, "model.nope")
    with pytest.raises(TargetNotFoundError, match="no sub-module named"):
        replace_module(model, "model.layers.0.mlp.nope", new)
    with pytest.raises(ValueError, match="needs a sub-module name"):
        replace_module(model, "", new)
