"""LoRA pair discovery reads A, B and the per-layer scaling from PEFT's layers."""

import pytest
import torch

from loralab.core.lora_layers import LoraPairError, find_lora_pairs, lora_param_roles
from loralab.core.testing import tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def test_pairs_shapes_and_scaling_patterns():
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"down_proj": 16},
    )
    model = peft.get_peft_model(tiny_llama(), cfg)
    pairs = find_lora_pairs(model)
    assert [p.name.rsplit(".", 1)[-1] for p in pairs] == ["q_proj", "down_proj"] * 2
    q, down = pairs[0], pairs[1]
    assert (q.A.shape, q.B.shape, q.rank, q.scaling) == ((4, 64), (64, 4), 4, 2.0)
    assert (down.A.shape, down.B.shape, down.rank, down.scaling) == ((2, 128), (64, 2), 2, 8.0)
    # W_eff = W0 + s·B·A: check against the layer's forward
    with torch.no_grad():
        q.B.normal_()
    x = torch.randn(3, 64)
    base = q.module.base_layer
    torch.testing.assert_close(
        q.module(x), base(x) + q.scaling * x @ (q.B @ q.A).T, rtol=1e-5, atol=1e-5
    )


def test_rslora_and_conv1d():
    model = peft.get_peft_model(
        tiny_gpt2(),
        peft.LoraConfig(
            r=4, lora_alpha=8, use_rslora=True, target_modules=["c_attn"], fan_in_fan_out=True
        ),
    )
    pairs = find_lora_pairs(model)
    assert len(pairs) == 2 and pairs[0].scaling == pytest.approx(8 / 4**0.5)
    assert pairs[0].A.shape == (4, 64) and pairs[0].B.shape == (192, 4)


def test_adapter_selection_and_roles():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    assert {p.adapter for p in find_lora_pairs(model)} == {"default"}  # the active adapter
    other = find_lora_pairs(model, "other")
    assert [p.rank for p in other] == [2, 2] and all(p.name.endswith("v_proj") for p in other)
    roles = lora_param_roles(other)
    assert roles[id(other[0].A)] == ("A", other[0]) and roles[id(other[1].B)] == ("B", other[1])
    with pytest.raises(
        LoraPairError,
        match=r"no LoRA layer has adapter 'nope'; adapters found: \['default', 'other'\]",
    ):
        find_lora_pairs(model, "nope")


def test_no_lora_layers():
    with pytest.raises(LoraPairError, match="has no PEFT LoRA layers"):
        find_lora_pairs(tiny_llama())


def test_embedding_pairs_are_opt_in():
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(tiny_llama(), cfg)
    assert all("embed_tokens" not in p.name for p in find_lora_pairs(model))  # default: Linear only
    pairs = find_lora_pairs(model, embeddings=True)
    emb = [p for p in pairs if p.name.endswith("embed_tokens")]
    assert len(pairs) == 3 and len(emb) == 1
    e = emb[0]
    assert e.A is e.module.lora_embedding_A["default"]
    assert e.B is e.module.lora_embedding_B["default"]
    assert (e.A.shape, e.B.shape, e.scaling) == ((4, 260), (64, 4), 2.0)
    # the embedding is a Linear on one-hot inputs: W_eff = W0 + s·B·A in the (out, in) view
    ids = torch.tensor([[3, 7, 259]])
    onehot = torch.nn.functional.one_hot(ids, 260).to(torch.float32)
    expected = onehot @ (e.module.base_layer.weight.T + e.scaling * e.B @ e.A).T
    torch.testing.assert_close(e.module(ids), expected, rtol=1e-5, atol=1e-5)


def test_only_embedding_lora_layers_error_says_so():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["embed_tokens"]))
    with pytest.raises(
        LoraPairError,
        match=r"only LoRA layers are embeddings \(\['base_model.model.model.embed_tokens'\]\), "
        "which this method does not support",
    ):
        find_lora_pairs(model)
    assert len(find_lora_pairs(model, embeddings=True)) == 1
