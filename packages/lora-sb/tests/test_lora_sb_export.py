"""LoRA-SB portability: the plain-LoRA export loads exactly in bare PEFT; the native adapter fails loudly there.

Tolerance: the exported ``B' = B·R`` is formed in float64 and stored in float32, so bare PEFT's
``s·B'·(A·x)`` and LoRA-SB's ``s·B·(R·(A·x))`` differ by float32 rounding only; logits are compared
at ``atol = 1e-5`` (ATOL, the package's round-trip tolerance), delta weights at 1e-6 relative.
"""

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from loralab.core.testing import (
    make_classification_batches,
    make_lm_batches,
    tiny_gpt2,
    tiny_llama,
    tiny_roberta,
)
from loralab.lora_sb import (
    LORA_SB_PEFT_TYPE,
    LoraSBConfig,
    convert_lora_sb_checkpoint,
    get_lora_sb_model,
    load_lora_sb_adapter,
    load_lora_sb_model,
    lora_sb_layers,
    save_lora_sb_as_lora,
)

RANK = 4
LR = 2e-4
ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _train(model, batches, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


def _load_bare(base, path):
    """Bare PEFT load; returns the model and the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, path)
    return model, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def trained_llama():
    # rsLoRA and alpha != r so that the exported scaling is really exercised (s = 12/√4 = 6)
    cfg = LoraSBConfig(
        r=RANK, lora_alpha=12, use_rslora=True, target_modules=TARGETS, lora_dropout=0.1
    )
    model = get_lora_sb_model(tiny_llama(), cfg, make_lm_batches(2, seed=3), lr=LR, progress=False)
    return _train(model, make_lm_batches(3, seed=7))


def test_export_loads_in_bare_peft_with_the_same_logits(trained_llama, tmp_path):
    model = trained_llama
    x = make_lm_batches(1, seed=11)[0]
    with torch.no_grad():
        live = model(**x).logits
    config = save_lora_sb_as_lora(model, tmp_path)
    assert type(config) is LoraConfig
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == RANK and saved["lora_alpha"] == 12
    assert saved["use_rslora"] is True
    assert not {"lora_sb", "sb_init", "init_seed", "svd_niter"} & set(saved)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert not any("lora_R" in k for k in tensors)
    plain, caught = _load_bare(tiny_llama(), tmp_path)
    assert not [w for w in caught if "nexpected" in w or "issing" in w], caught
    assert not lora_sb_layers(plain)
    with torch.no_grad():
        assert torch.allclose(plain(**x).logits, live, atol=ATOL)
    # layer by layer, bare PEFT's s·B'·A is LoRA-SB's s·B·R·A
    inner = plain.base_model.model
    for name, layer in lora_sb_layers(model).items():
        want = layer.get_delta_weight("default").double()
        got = inner.get_submodule(name).get_delta_weight("default").double()
        assert (got - want).norm() <= 1e-6 * want.norm(), name
        B, R = layer.lora_B["default"].weight.double(), layer.lora_R["default"].weight.double()
        key = f"base_model.model.{name}.lora_B.weight"
        assert torch.allclose(tensors[key].double(), B @ R, rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        assert torch.allclose(plain.merge_and_unload()(**x).logits, live, atol=ATOL)


def test_export_carries_modules_to_save(tmp_path):
    # task_type SEQ_CLS puts RoBERTa's classifier in modules_to_save; it trains and must travel
    data = make_classification_batches(2, seed=3)
    cfg = LoraSBConfig(r=RANK, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = _train(get_lora_sb_model(tiny_roberta(), cfg, data, lr=LR, progress=False), data)
    with torch.no_grad():
        live = model(**data[0]).logits
        fresh = tiny_roberta()(**data[0]).logits
    assert not torch.allclose(live, fresh, atol=1e-3)  # the head and R moved
    save_lora_sb_as_lora(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "classifier" in saved["modules_to_save"] and saved["task_type"] == "SEQ_CLS"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert any(".classifier." in k for k in tensors)
    plain, _ = _load_bare(tiny_roberta(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(plain(**data[0]).logits, live, atol=ATOL)


def test_export_of_gpt2_conv1d(tmp_path):
    batches = make_lm_batches(2, seed=3)
    model = get_lora_sb_model(
        tiny_gpt2(),
        LoraSBConfig(r=RANK, target_modules=["c_attn", "c_proj"]),
        batches,
        lr=LR,
        progress=False,
    )
    model = _train(model, make_lm_batches(2, seed=7))
    x = make_lm_batches(1, seed=11)[0]
    with torch.no_grad():
        live = model(**x).logits
    assert save_lora_sb_as_lora(model, tmp_path).fan_in_fan_out is True
    plain, _ = _load_bare(tiny_gpt2(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(plain(**x).logits, live, atol=ATOL)


def test_export_one_adapter_of_several(trained_llama, tmp_path):
    # a second LoRA-SB adapter loaded beside the first: exporting it gives that adapter's model
    trained_llama.save_pretrained(tmp_path / "native")
    host = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["k_proj"]))
    load_lora_sb_adapter(host, tmp_path / "native", "sb")
    host.set_adapter("sb")
    save_lora_sb_as_lora(host, tmp_path / "plain", adapter_name="sb")
    x = make_lm_batches(1, seed=11)[0]
    plain, _ = _load_bare(tiny_llama(), tmp_path / "plain")
    with torch.no_grad():
        assert torch.allclose(plain(**x).logits, trained_llama(**x).logits, atol=ATOL)


def test_export_errors(trained_llama, tmp_path):
    with pytest.raises(TypeError, match="model must be a PeftModel, got LlamaForCausalLM"):
        save_lora_sb_as_lora(tiny_llama(), tmp_path)
    plain = get_peft_model(tiny_llama(), LoraConfig(r=RANK, target_modules=["q_proj"]))
    with pytest.raises(
        ValueError, match="'default' is not a LoRA-SB adapter \\(config: LoraConfig\\)"
    ):
        save_lora_sb_as_lora(plain, tmp_path)
    with pytest.raises(ValueError, match="not a LoRA-SB adapter \\(config: NoneType\\)"):
        save_lora_sb_as_lora(trained_llama, tmp_path, adapter_name="other")
    trained_llama.merge_adapter()
    try:
        with pytest.raises(ValueError, match=r"is merged into the base weights.*unmerge it"):
            save_lora_sb_as_lora(trained_llama, tmp_path)
    finally:
        trained_llama.unmerge_adapter()
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_native_adapter_fails_loudly_in_bare_peft(trained_llama, tmp_path):
    trained_llama.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == LORA_SB_PEFT_TYPE == "LORA_SB" and saved["lora_sb"] is True
    assert "load_lora_sb_model" in saved["loralab_note"]
    # every PEFT route that reads the file's peft_type refuses it (it is no PeftType)
    with pytest.raises(KeyError, match="LORA_SB"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(KeyError, match="LORA_SB"):
        PeftConfig.from_pretrained(tmp_path)
    with pytest.raises(KeyError, match="LORA_SB"):
        LoraConfig.from_pretrained(tmp_path)
    with pytest.raises(KeyError, match="LORA_SB"):
        tiny_llama().load_adapter(str(tmp_path))  # transformers' PEFT integration
    # ours still reads it, exactly; the live config keeps PEFT's type
    x = make_lm_batches(1, seed=11)[0]
    loaded = load_lora_sb_model(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].peft_type == "LORA"
    with torch.no_grad():
        assert torch.allclose(loaded(**x).logits, trained_llama(**x).logits, atol=ATOL)


def test_adapters_saved_before_the_marker_still_load(trained_llama, tmp_path):
    # older LoRA-SB checkpoints say peft_type LORA (with lora_sb: true); our loader reads them too
    trained_llama.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved["peft_type"] = "LORA"
    del saved["loralab_note"]
    path.write_text(json.dumps(saved))
    x = make_lm_batches(1, seed=11)[0]
    with torch.no_grad():
        got = load_lora_sb_model(tiny_llama(), tmp_path)(**x).logits
        assert torch.allclose(got, trained_llama(**x).logits, atol=ATOL)
    with pytest.raises(ValueError, match="not a LoRA-SB config \\(peft_type='BOFT'"):
        LoraSBConfig.from_peft_type(**{**saved, "peft_type": "BOFT"})


def test_saved_checkpoint_converts_without_the_model(trained_llama, tmp_path):
    # file to file (e.g. a finished run's final/): the same plain adapter as the in-memory export
    trained_llama.save_pretrained(tmp_path / "native")
    config = convert_lora_sb_checkpoint(tmp_path / "native", tmp_path / "plain")
    save_lora_sb_as_lora(trained_llama, tmp_path / "direct")
    assert config.to_dict() == LoraConfig.from_pretrained(tmp_path / "direct").to_dict()
    converted = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    direct = load_file(tmp_path / "direct" / "adapter_model.safetensors")
    assert converted.keys() == direct.keys()
    assert all(torch.equal(converted[k], direct[k]) for k in direct)
    x = make_lm_batches(1, seed=11)[0]
    plain, _ = _load_bare(tiny_llama(), tmp_path / "plain")
    with torch.no_grad():
        assert torch.allclose(plain(**x).logits, trained_llama(**x).logits, atol=ATOL)


def test_convert_errors(tmp_path):
    with pytest.raises(ValueError, match=r"Can't find 'adapter_config\.json'"):
        convert_lora_sb_checkpoint(tmp_path / "nowhere", tmp_path / "out")
    plain = get_peft_model(tiny_llama(), LoraConfig(r=RANK, target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path / "lora")
    with pytest.raises(
        ValueError, match="not a LoRA-SB config \\(peft_type='LORA', lora_sb=None\\)"
    ):
        convert_lora_sb_checkpoint(tmp_path / "lora", tmp_path / "out")
    sb = get_peft_model(
        tiny_llama(), LoraSBConfig(r=RANK, target_modules=["q_proj"], sb_init="random")
    )
    sb.save_pretrained(tmp_path / "sb")
    (tmp_path / "sb" / "adapter_model.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"no adapter_model\.safetensors or adapter_model\.bin"
    ):
        convert_lora_sb_checkpoint(tmp_path / "sb", tmp_path / "out")
    assert not (tmp_path / "out").exists()
