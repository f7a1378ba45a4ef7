"""Saving: the trained adapter as a plain rank-2r PEFT LoRA on the original base model (α for rsLoRA),
parity with PEFT's initial-weight conversion, and the offset model's save / load round trip."""

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import layer as peft_lora
from peft.tuners.lora.layer import LoraLayer
from safetensors.torch import load_file

from loralab.core.testing import make_lm_batches, tiny_llama
from loralab.lora_ga import (
    LoraGAConfig,
    get_lora_ga_model,
    load_lora_ga_model,
    save_lora_ga_adapter,
    save_lora_ga_model,
)

RANK = 4
ALPHA = 8
STEPS = 3
LR = 0.05


def _trained(use_rslora=False, **kw):
    batches = make_lm_batches(3)
    cfg = LoraGAConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=["q_proj", "v_proj"],
        iters=2,
        use_rslora=use_rslora,
        **kw,
    )
    model = get_lora_ga_model(tiny_llama(), cfg, batches[:2], progress=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    torch.manual_seed(0)
    for b in batches[:STEPS]:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), batches


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _scalings(model):
    return {n: m.scaling["default"] for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_export_loads_on_the_original_base(tmp_path, use_rslora):
    model, batches = _trained(use_rslora, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 4})
    save_lora_ga_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    factor = 2**0.5 if use_rslora else 2
    assert cfg["r"] == 2 * RANK and cfg["lora_alpha"] == pytest.approx(ALPHA * factor)
    assert cfg["rank_pattern"] == {"v_proj": 4} and cfg["alpha_pattern"]["v_proj"] == pytest.approx(
        4 * factor
    )
    assert cfg["init_lora_weights"] is True and cfg["lora_ga_config"] is None and "bsz" not in cfg
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)  # the original, un-offset model
    # every layer keeps its scaling s (so s·B'·A' = s·(B·A − B0·A0))
    assert _scalings(loaded) == pytest.approx(_scalings(model))
    ref = _logits(model, batches[2])
    out = _logits(loaded, batches[2])
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()
    # it is not the plain adapter on the original base (the offset matters)
    wrong = _logits(
        get_peft_model(
            tiny_llama(), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj"])
        ),
        batches[2],
    )
    assert (wrong - ref).abs().max() > 1e-3


@pytest.mark.parametrize("use_rslora", [False, True])
def test_export_equals_peft_initial_weight_conversion(tmp_path, use_rslora):
    """Same tensors and config as PEFT's save_pretrained(path_initial_model_for_weight_conversion=...)
    (which needs the initial adapter saved to disk before training; we keep A0, B0 in memory)."""
    batches = make_lm_batches(3)
    cfg = LoraGAConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=["q_proj", "v_proj"],
        iters=2,
        use_rslora=use_rslora,
    )
    model = get_lora_ga_model(tiny_llama(), cfg, batches[:2], progress=False)
    model.save_pretrained(tmp_path / "init")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for b in batches[:STEPS]:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(
        tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init")
    )
    save_lora_ga_adapter(model, tmp_path / "ours")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(ours)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=0, rtol=0)
    ct = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    co = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (co["r"], co["lora_alpha"]) == pytest.approx((ct["r"], ct["lora_alpha"]))


def test_offset_model_round_trip(tmp_path):
    model, batches = _trained()
    save_lora_ga_model(model, tmp_path)
    assert (tmp_path / "base" / "config.json").is_file() and (
        tmp_path / "adapter" / "lora_ga_init.safetensors"
    ).is_file()
    loaded = load_lora_ga_model(tmp_path, is_trainable=True)
    ref = _logits(model, batches[2])
    torch.testing.assert_close(_logits(loaded, batches[2]), ref, atol=0, rtol=0)
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_A" in n)
    # the base checkpoint is the offset model (not the original), and export still works after loading
    base_w = load_file(next((tmp_path / "base").glob("*.safetensors")))[
        "model.layers.0.self_attn.q_proj.weight"
    ]
    torch.testing.assert_close(
        base_w, model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    )
    save_lora_ga_adapter(model, tmp_path / "before")
    save_lora_ga_adapter(loaded, tmp_path / "after")
    before, after = (
        load_file(tmp_path / "before" / "adapter_model.safetensors"),
        load_file(tmp_path / "after" / "adapter_model.safetensors"),
    )
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=0, rtol=0)


def test_quantized_offset_model_round_trip(tmp_path):
    """An NF4 model: the offset base is saved quantized (W0' re-quantized, NF4 settings) and loads back."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loralab.core.quant import load_float_model_for_estimation, quant_config_of
    from loralab.core.testing import save_tiny

    path = save_tiny(tiny_llama(), tmp_path / "ckpt", tokenizer=False)
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    qmodel = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=q, device_map="cpu", dtype=torch.float32
    )
    batches = make_lm_batches(2)
    cfg = LoraGAConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], iters=2)
    model = get_lora_ga_model(
        qmodel, cfg, batches, estimation_model=load_float_model_for_estimation(path), progress=False
    )
    spec = quant_config_of(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer)
    save_lora_ga_model(model, tmp_path / "saved")
    # (forward after saving: on AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights for its CPU kernel at
    # the first eval forward, with bf16 absmax; saving undoes that only approximately)
    ref = _logits(model, batches[0])
    loaded = load_lora_ga_model(tmp_path / "saved", device_map="cpu")
    assert (
        quant_config_of(loaded.get_base_model().model.layers[0].self_attn.q_proj.base_layer) == spec
    )
    torch.testing.assert_close(_logits(loaded, batches[0]), ref, atol=1e-5, rtol=1e-5)


def test_saving_a_raw_lora_ga_checkpoint_warns(tmp_path):
    """peft's save_pretrained keeps init_lora_weights="lora_ga": PEFT then silently skips the init when
    loading, which is right on the offset model (e.g. resuming) but wrong on the original one. loralab
    changes nothing in PEFT's loading, so the warning comes when such a checkpoint is written."""
    model, _ = _trained()
    with pytest.warns(UserWarning, match="only fit the offset base weights"):
        model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's own loading path: nothing from loralab
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations
        warnings.filterwarnings(
            "ignore", message="Unexpected keyword arguments"
        )  # PEFT: LoRA-GA fields
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert type(loaded.base_model.model.model.layers[0].self_attn.q_proj) is peft_lora.Linear


def test_save_errors(tmp_path):
    plain = get_peft_model(tiny_llama(), LoraConfig(r=RANK, target_modules=["q_proj"]))
    with pytest.raises(
        ValueError,
        match=r"has no LoRA-GA initial factors.*path_initial_model_for_weight_conversion",
    ):
        save_lora_ga_adapter(plain, tmp_path)
    with pytest.raises(TypeError, match="expects the PeftModel"):
        save_lora_ga_adapter(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        save_lora_ga_adapter(plain, tmp_path, adapter_name="other")
    with pytest.raises(FileNotFoundError, match="not a save_lora_ga_model directory"):
        load_lora_ga_model(tmp_path)


def test_init_factors_travel_to_a_model_built_without_estimation(tmp_path):
    # a training checkpoint holds the state dict; the initial factors come with get/set_lora_ga_init_factors
    from loralab.lora_ga import get_lora_ga_init_factors, set_lora_ga_init_factors

    model, _batches = _trained()
    factors = get_lora_ga_init_factors(model)
    assert len(factors) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A0, B0)
    fresh = get_peft_model(
        tiny_llama(), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"])
    )
    fresh.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="LoRA-GA initial factors do not match the model: missing"):
        set_lora_ga_init_factors(fresh, {k: v for k, v in factors.items() if "layers.0." not in k})
    set_lora_ga_init_factors(fresh, factors)
    # the export from the restored model, with a full state dict passed (as under ZeRO-3), is the same
    save_lora_ga_adapter(model, tmp_path / "a")
    save_lora_ga_adapter(fresh.eval(), tmp_path / "b", state_dict=fresh.state_dict())
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh2 = get_peft_model(tiny_llama(), LoraConfig(r=RANK, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="has no LoRA-GA initial factors"):
        get_lora_ga_init_factors(fresh2)
