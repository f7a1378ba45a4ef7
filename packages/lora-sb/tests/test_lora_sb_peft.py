"""LoRA-SB as a PEFT adapter: save/load/merge, disable, multiple adapters, dtypes, Conv1D, dropout."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from loralab.core.testing import make_lm_batches, tiny_gpt2, tiny_llama
from loralab.lora_sb import (
    LoraSBConfig,
    get_lora_sb_model,
    initialize_lora_sb_weights,
    load_lora_sb_adapter,
    load_lora_sb_model,
    lora_sb_layers,
)

RANK = 4
LR = 2e-4
TARGETS = ["q_proj", "v_proj", "down_proj"]
ATOL = 1e-5


def _batches(n=2, seed=3):
    return make_lm_batches(n, seed=seed)


def _train_r(model, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for batch in _batches(steps, seed=7):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def trained():
    model = get_lora_sb_model(
        tiny_llama(),
        LoraSBConfig(r=RANK, target_modules=TARGETS, lora_dropout=0.1),
        _batches(),
        lr=LR,
        progress=False,
    )
    _train_r(model)
    return model


def test_save_load_merge_give_the_live_outputs(trained, tmp_path):
    x = _batches(1, seed=11)[0]
    with torch.no_grad():
        live = trained(**x).logits
    trained.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA_SB" and cfg["lora_sb"] is True and cfg["r"] == RANK
    loaded = load_lora_sb_model(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(**x).logits, live, atol=ATOL)
    # PEFT's documented route for custom layers works too
    again = PeftModel.from_pretrained(
        tiny_llama(), tmp_path, config=LoraSBConfig.from_pretrained(tmp_path)
    )
    with torch.no_grad():
        assert torch.allclose(again(**x).logits, live, atol=ATOL)
    merged = loaded.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(**x).logits, live, atol=ATOL)


def test_merge_unmerge_and_disable_adapter(trained):
    x = _batches(1, seed=11)[0]
    base = tiny_llama()
    with torch.no_grad():
        live = trained(**x).logits
        with trained.disable_adapter():
            assert torch.allclose(trained(**x).logits, base(**x).logits, atol=ATOL)
        assert not torch.allclose(live, base(**x).logits, atol=1e-3)
        trained.merge_adapter()
        assert torch.allclose(trained(**x).logits, live, atol=ATOL)
        trained.unmerge_adapter()
        assert torch.allclose(trained(**x).logits, live, atol=ATOL)
        for n, p in trained.base_model.model.named_parameters():
            if ".base_layer." in n:
                assert torch.allclose(
                    p, base.get_parameter(n.replace(".base_layer", "")), atol=1e-6
                )


def test_checkpoint_keys_are_clean_with_base_dtype_factors(tmp_path):
    base = tiny_llama().to(torch.bfloat16)
    # plain get_peft_model (autocast_adapter_dtype=True up-casts live adapters to fp32)...
    model = get_peft_model(base, LoraSBConfig(r=RANK, target_modules=TARGETS))
    initialize_lora_sb_weights(model, _batches(), lr=LR, progress=False)
    layer = next(iter(lora_sb_layers(model).values()))
    assert layer.lora_R["default"].weight.dtype == torch.float32
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    n_layers = len(lora_sb_layers(model))
    assert len(sd) == 3 * n_layers
    for key, value in sd.items():
        assert key.startswith("base_model.model.model.layers.")
        slot = key.rsplit(".", 2)[-2]
        assert (
            slot in ("lora_A", "lora_B", "lora_R")
            and key.endswith(f"{slot}.weight")
            and ".default." not in key
        ), key
        # ...but the checkpoint stores A, B in the base dtype and R in fp32
        assert value.dtype == (torch.float32 if slot == "lora_R" else torch.bfloat16), key
    # get_lora_sb_model keeps A/B in the base dtype live, too
    m2 = get_lora_sb_model(
        tiny_llama().to(torch.bfloat16),
        LoraSBConfig(r=RANK, target_modules=TARGETS),
        _batches(),
        lr=LR,
        progress=False,
    )
    layer2 = next(iter(lora_sb_layers(m2).values()))
    assert layer2.lora_A["default"].weight.dtype == torch.bfloat16
    assert layer2.lora_R["default"].weight.dtype == torch.float32
    x = _batches(1, seed=11)[0]
    loaded = load_lora_sb_model(tiny_llama().to(torch.bfloat16), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, model(**x).logits)


def test_multiple_adapters_and_trainable_counts(tmp_path, capsys):
    model = get_lora_sb_model(
        tiny_llama(),
        LoraSBConfig(r=RANK, target_modules=TARGETS),
        _batches(),
        lr=LR,
        progress=False,
    )
    model.add_adapter("second", LoraSBConfig(r=2, target_modules=["q_proj"], init_seed=5))
    initialize_lora_sb_weights(
        model, _batches(seed=9), lr=10 * LR, adapter_name="second", progress=False
    )
    model.add_adapter(
        "plain", LoraConfig(r=RANK, target_modules=["q_proj"], init_lora_weights=False)
    )
    x = _batches(1, seed=11)[0]
    outs = {}
    for name in ("default", "second", "plain"):
        model.set_adapter(name)
        with torch.no_grad():
            outs[name] = model(**x).logits
    assert not torch.allclose(outs["default"], outs["second"], atol=1e-4)
    model.set_adapter("second")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_R.second." in n for n in trainable)
    assert model.get_nb_trainable_parameters()[0] == 2 * 2**2
    model.print_trainable_parameters()
    assert "trainable params: 8 ||" in capsys.readouterr().out
    model.set_adapter("plain")
    assert all(".plain." in n for n, p in model.named_parameters() if p.requires_grad)
    # save every adapter, reload the two LoRA-SB ones into a fresh model
    model.save_pretrained(tmp_path)
    loaded = load_lora_sb_model(tiny_llama(), tmp_path)
    load_lora_sb_adapter(loaded, tmp_path / "second", "second")
    for name in ("default", "second"):
        loaded.set_adapter(name)
        with torch.no_grad():
            assert torch.allclose(loaded(**x).logits, outs[name], atol=ATOL), name
    # mixed-adapter batches go through the variant too
    xx = {k: torch.cat([v, v]) for k, v in x.items()}
    with torch.no_grad():
        mixed = loaded(**xx, adapter_names=["default"] * 2 + ["second"] * 2).logits
    assert torch.allclose(mixed[:2], outs["default"], atol=ATOL) and torch.allclose(
        mixed[2:], outs["second"], atol=ATOL
    )
    loaded.delete_adapter("second")
    assert all("second" not in n for n, _ in loaded.named_parameters())


def test_lora_sb_config_refuses_a_plain_lora_checkpoint(tmp_path):
    get_peft_model(tiny_llama(), LoraConfig(r=RANK, target_modules=["q_proj"])).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="not a LoRA-SB config"):
        LoraSBConfig.from_pretrained(tmp_path)


def test_dropout_on_the_adapter_input():
    model = get_lora_sb_model(
        tiny_llama(),
        LoraSBConfig(r=RANK, target_modules=TARGETS, lora_dropout=0.5),
        _batches(),
        lr=LR,
        progress=False,
    )
    layer = next(iter(lora_sb_layers(model).values()))
    x = torch.randn(3, layer.in_features)
    layer.train()
    torch.manual_seed(0)
    a = layer(x)
    b = layer(x)
    assert not torch.allclose(a, b)
    layer.eval()
    base = layer.get_base_layer()(x)
    delta = x @ layer.get_delta_weight("default").T
    assert torch.allclose(layer(x), base + delta, atol=1e-6)


def test_gpt2_conv1d_save_load_merge(tmp_path):
    model = get_lora_sb_model(
        tiny_gpt2(),
        LoraSBConfig(r=RANK, target_modules=["c_attn", "c_fc", "c_proj"]),
        _batches(),
        lr=LR,
        progress=False,
    )
    _train_r(model, steps=2)
    x = _batches(1, seed=11)[0]
    with torch.no_grad():
        live = model(**x).logits
    model.save_pretrained(tmp_path)
    loaded = load_lora_sb_model(tiny_gpt2(), tmp_path)
    merged = loaded.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(**x).logits, live, atol=ATOL)
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_sequence_classification_head_trains_and_round_trips(tmp_path):
    # task_type SEQ_CLS puts RoBERTa's classifier in modules_to_save: it trains beside R and is saved
    from loralab.core.testing import make_classification_batches, tiny_roberta

    data = make_classification_batches(2, seed=3)
    cfg = LoraSBConfig(r=RANK, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_lora_sb_model(tiny_roberta(), cfg, data, lr=LR, progress=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        ".lora_R." in n or ".classifier.modules_to_save." in n for n in trainable
    ), trainable
    n_r = sum(p.numel() for n, p in model.named_parameters() if ".lora_R." in n)
    assert n_r == len(lora_sb_layers(model)) * RANK**2 == 4 * RANK**2
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for batch in data:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        live = model(**data[0]).logits
    model.save_pretrained(tmp_path)
    loaded = load_lora_sb_model(tiny_roberta(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(**data[0]).logits, live, atol=ATOL)
        assert torch.allclose(loaded.merge_and_unload()(**data[0]).logits, live, atol=ATOL)


def test_encoder_decoder_t5_init_identity():
    from loralab.core import estimate_gradients
    from loralab.core.testing import make_seq2seq_batches, tiny_t5
    from loralab.lora_sb import update_approximation

    batches = make_seq2seq_batches(2, seed=3)
    targets = ["q", "v", "wo"]
    grads = estimate_gradients(tiny_t5(), batches, targets, progress=False)
    model = get_lora_sb_model(
        tiny_t5(),
        LoraSBConfig(r=RANK, target_modules=targets, svd_method="full"),
        batches,
        lr=LR,
        progress=False,
    )
    layers = lora_sb_layers(model)
    assert set(layers) == set(grads) and any(n.startswith("decoder.") for n in layers)
    for name, layer in layers.items():
        delta = update_approximation(grads[name], LR).double()
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        want = U[:, :RANK] @ torch.diag(S[:RANK]) @ Vh[:RANK]
        assert (layer.get_delta_weight("default").double() - want).norm() <= 1e-4 * want.norm(), (
            name
        )
