"""The seed's API (Outsider565/LoRA-GA ``peft.utils.lora_ga_utils``) on a tiny Llama.

- the README's quick start, verbatim except its two import lines (the runners package holds the
  full version with its data helpers);
- ``LoraGAContext`` + plain ``peft.get_peft_model`` gives exactly the native ``get_lora_ga_model``'s
  A, B and offset W0 (Linear and GPT-2 Conv1D, rsLoRA, quantized NF4);
- ``estimate_gradient`` is core's estimator (plain and ``quant_flag`` offload agree, bias never
  mixed into the weight key, an accelerator shards the DataLoader);
- every error: no gradients, missing / mis-shaped gradient, rank too large, quantized estimate,
  a model not given to the context, saving without the initial checkpoint.
"""

import logging
import os

import peft
import pytest
import torch
from torch.utils.data import DataLoader

from loralab.core.gradients import GradientEstimationError, estimate_gradients
from loralab.core.targets import find_all_linear_modules, get_module
from loralab.core.testing import make_lm_batches, save_tiny, tiny_gpt2, tiny_llama
from loralab.lora_ga import (
    LoraGAConfig,
    LoraGAContext,
    LoraGAInitError,
    LoraGARankError,
    estimate_gradient,
    get_lora_ga_model,
    save_loraga_model_final,
    save_loraga_model_init,
)

RANK = 4
ALPHA = 8
TARGETS = ["q_proj", "v_proj", "down_proj"]
PREFIX = "base_model.model."
STEP0_ATOL = 1e-5  # fp32 logits, offset computed in fp32 (same tolerance as the native tests)
ROUNDTRIP_ATOL = (
    1e-5  # reloaded plain LoRA on the original base vs the trained LoRA-GA model (fp32)
)

QUICK_START = '''
peft_config = LoraGAConfig()
# Estimate gradients
named_grad = estimate_gradient(
    model=model,
    dataloader=dataloader,
    accelerator=accelerator,
    quant_flag=False,
)
# Use the LoraGAContext to attach named gradients to the model
with LoraGAContext(model=model, named_grad=named_grad):
    model = get_peft_model(model=model, peft_config=peft_config)
save_loraga_model_init(model, save_dir=save_dir)

"""
Train your model here using your favorite tool, e.g. PyTorch Lightning, Hugging Face Trainer, Pytorch Custom Training Loop, etc.
"""
train(model)
# Save the final state of the LoRA-GA model
save_loraga_model_final(model, save_dir=save_dir)
# Load the saved model like you would load a LoRA model
model = PeftModel.from_pretrained(model, save_dir)
'''
# The seed's imports were ``from peft import PeftModel, LoraGAConfig, get_peft_model`` and
# ``from peft.utils.lora_ga_utils import estimate_gradient, LoraGAContext, save_loraga_model_init,
# save_loraga_model_final``; only these lines change:
QUICK_START_IMPORTS = """
from peft import PeftModel, get_peft_model
from loralab.lora_ga import LoraGAConfig, estimate_gradient, LoraGAContext, save_loraga_model_init, save_loraga_model_final
"""


def _rows(n, seed):
    """A map-style dataset of single samples (the DataLoader batches them, as in the seed's examples)."""
    b = make_lm_batches(1, batch_size=n, seed=seed)[0]
    return [{k: v[i] for k, v in b.items()} for i in range(n)]


def _lora_state(model):
    """LoRA factors and target base weights of a PeftModel, keyed by base-model module name."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            key = name.removeprefix(PREFIX)
            out[key] = (
                mod.lora_A["default"].weight.detach().clone(),
                mod.lora_B["default"].weight.detach().clone(),
                mod.get_base_layer().weight.detach().clone(),
            )
    return out


def _assert_same_init(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        for x, y, what in zip(a[name], b[name], ("A", "B", "W0")):
            assert torch.equal(x, y), f"{name}: {what} differs"


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def test_quick_start_runs_with_only_the_imports_changed(tmp_path, accelerator):
    batches = make_lm_batches(3, seed=5)

    def train(model):  # the "train your model here" placeholder: a few SGD steps
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model.train()
        for b in batches:
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            trained_logits.append(model(**batches[0]).logits)

    trained_logits = []
    base = tiny_llama()
    with torch.no_grad():
        base_logits = base(**batches[0]).logits
    env = {
        "model": base,
        "dataloader": DataLoader(_rows(8, seed=1), batch_size=2),
        "accelerator": accelerator,
        "save_dir": str(tmp_path),
        "train": train,
    }
    # The README's last line passes the trained PeftModel itself to PeftModel.from_pretrained: PEFT nests
    # a second PeftModel and reports the adapter keys missing (a bug of the seed's README, documented).
    with pytest.warns(UserWarning, match="missing adapter keys"):
        exec(QUICK_START_IMPORTS + QUICK_START, env)  # the README text is the test

    # the seed's defaults: r=8, q_proj/v_proj (PEFT's Llama default), LoRA-GA factors written
    assert not os.path.exists(
        tmp_path / "init_lora_checkpoint"
    )  # removed by the final save, as in the seed
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert (
        type(cfg) is peft.LoraConfig
        and cfg.init_lora_weights is True
        and cfg.lora_ga_config is None
    )
    assert cfg.r == 16 and cfg.lora_alpha == 16  # rank 2r, α doubled: same scaling α/r
    # the saved adapter is a plain LoRA for the ORIGINAL base model: same function as the trained model
    original = tiny_llama()
    with torch.no_grad():
        assert torch.allclose(original(**batches[0]).logits, base_logits)
    reloaded = peft.PeftModel.from_pretrained(original, str(tmp_path)).eval()
    with torch.no_grad():
        got = reloaded(**batches[0]).logits
    assert (got - trained_logits[0]).abs().max() < ROUNDTRIP_ATOL
    assert (got - base_logits).abs().max() > 100 * ROUNDTRIP_ATOL  # training changed the function


@pytest.mark.parametrize("use_rslora", [False, True])
def test_final_save_same_with_or_without_in_memory_init_factors(tmp_path, use_rslora):
    """In-memory initial factors (save_lora_ga_adapter) and PEFT's conversion from the initial
    checkpoint write the same plain rank-2r adapter and config."""
    from safetensors.torch import load_file

    batches = make_lm_batches(2, seed=8)
    model = tiny_llama()
    with LoraGAContext(model, estimate_gradient(model, batches, progress=False)):
        model = peft.get_peft_model(
            model,
            LoraGAConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, use_rslora=use_rslora),
        )
    save_loraga_model_init(model, tmp_path / "a")
    save_loraga_model_init(model, tmp_path / "b")
    with torch.no_grad():  # "training"
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    save_loraga_model_final(model, tmp_path / "a")
    for mod in model.modules():
        mod.__dict__.pop(
            "_lora_ga_init", None
        )  # as for a model re-loaded from the initial checkpoint
    save_loraga_model_final(model, tmp_path / "b")
    a, b = (
        load_file(str(tmp_path / "a" / "adapter_model.safetensors")),
        load_file(str(tmp_path / "b" / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys() and len(a) == 4 * len(TARGETS)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca, cb = (peft.PeftConfig.from_pretrained(str(tmp_path / d)) for d in "ab")
    assert (ca.r, ca.lora_alpha, ca.use_rslora, ca.init_lora_weights) == (
        cb.r,
        cb.lora_alpha,
        cb.use_rslora,
        cb.init_lora_weights,
    )
    assert ca.r == 2 * RANK and ca.lora_alpha == pytest.approx(
        ALPHA * (2**0.5 if use_rslora else 2)
    )
    assert (
        not (tmp_path / "a" / "init_lora_checkpoint").exists()
        and not (tmp_path / "b" / "init_lora_checkpoint").exists()
    )


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("llama", dict(target_modules=TARGETS, task_type="CAUSAL_LM")),  # PeftModelForCausalLM
        (
            "llama",
            dict(
                target_modules=TARGETS, use_rslora=True, direction="A2rBr", scale="gd", dtype="bf16"
            ),
        ),
        ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),  # Conv1D, with bias
    ],
)
def test_context_equals_native_get_lora_ga_model(arch, kwargs):
    build = tiny_llama if arch == "llama" else tiny_gpt2
    batches = make_lm_batches(2, seed=3)
    model = build()
    with torch.no_grad():
        base_logits = model(**batches[0]).logits
    named_grad = estimate_gradient(model, batches, None, progress=False)
    with LoraGAContext(model=model, named_grad=named_grad):
        seed_model = peft.get_peft_model(model, LoraGAConfig(r=RANK, lora_alpha=ALPHA, **kwargs))
    native = get_lora_ga_model(
        build(), LoraGAConfig(r=RANK, lora_alpha=ALPHA, **kwargs), batches, progress=False
    )
    _assert_same_init(_lora_state(seed_model), _lora_state(native))
    assert "named_grad" not in model.__dict__  # detached on exit, as in the seed
    if kwargs.get("dtype") == "bf16":
        assert all(a.dtype == torch.bfloat16 for a, _, _ in _lora_state(seed_model).values())
    else:  # step 0 computes the base function (offset W0)
        with torch.no_grad():
            assert (seed_model(**batches[0]).logits - base_logits).abs().max() < STEP0_ATOL


def test_estimate_gradient_is_cores_estimate_plain_and_offloaded():
    model = tiny_gpt2()  # Conv1D layers with biases
    batches = make_lm_batches(2, seed=4)
    plain = estimate_gradient(model, batches, progress=False)
    core = estimate_gradients(model, batches, progress=False)
    assert plain.keys() == core.keys() and set(find_all_linear_modules(model)) == {
        k.rsplit(".", 1)[-1] for k in plain
    }
    for name, g in plain.items():
        assert g.dtype == torch.float32 and g.device.type == "cpu"
        assert torch.equal(g, core[name])
        mod = get_module(model, name)
        assert g.shape == (mod.nf, mod.weight.shape[0])  # the weight's (out, in), never the bias
    offloaded = estimate_gradient(
        model, batches, quant_flag=True, no_split_module_classes=["GPT2Block"], progress=False
    )
    for name, g in plain.items():
        assert torch.allclose(offloaded[name], g, rtol=1e-4, atol=1e-7), name


def test_estimate_gradient_with_accelerator_prepares_the_dataloader(accelerator):
    model = tiny_llama()
    rows = _rows(6, seed=2)
    loader = DataLoader(rows, batch_size=2)
    with_acc = estimate_gradient(model, loader, accelerator, targets=TARGETS, progress=False)
    prepared = accelerator.prepare_data_loader(DataLoader(rows, batch_size=2))
    again = estimate_gradient(
        model, prepared, accelerator, targets=TARGETS, progress=False
    )  # not prepared twice
    without = estimate_gradient(
        model, DataLoader(rows, batch_size=2), None, targets=TARGETS, progress=False
    )
    assert with_acc.keys() == without.keys() == again.keys()
    for name in without:
        assert torch.equal(with_acc[name], without[name]) and torch.equal(
            again[name], without[name]
        )


def test_context_on_nf4_model_matches_native_and_stays_nf4(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = save_tiny(tiny_llama(), tmp_path / "ckpt", tokenizer=False)
    q = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )

    def load_nf4():
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=q, device_map="cpu", dtype=torch.float32
        )

    batches = make_lm_batches(2, seed=6)
    named_grad = estimate_gradient(
        tiny_llama(), batches, quant_flag=True, progress=False
    )  # the float checkpoint
    quantized = load_nf4()
    with pytest.raises(GradientEstimationError, match="float copy"):
        estimate_gradient(quantized, batches, progress=False)
    with LoraGAContext(quantized, named_grad):
        seed_model = peft.get_peft_model(
            quantized, LoraGAConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS)
        )
    native = get_lora_ga_model(
        load_nf4(),
        LoraGAConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS),
        None,
        gradients=named_grad,
        progress=False,
    )
    a, b = _lora_state(seed_model), _lora_state(native)
    _assert_same_init(a, b)
    for name in a:
        base = get_module(seed_model.base_model.model, name).get_base_layer()
        assert (
            isinstance(base, bnb.nn.Linear4bit) and base.weight.quant_state.quant_type == "nf4"
        ), name


# ---------------------------------------------------------------------------------------------- errors
def _fresh_grads(model):
    return estimate_gradient(model, make_lm_batches(1), None, targets=TARGETS, progress=False)


def _no_lora_layers(model):
    return not any(hasattr(m, "lora_A") for m in model.modules())


@pytest.mark.parametrize("named_grad", [None, {}])
def test_context_without_gradients_raises(named_grad):
    model = tiny_llama()
    with pytest.raises(LoraGAInitError, match="needs named_grad"):
        with LoraGAContext(model, named_grad):
            peft.get_peft_model(model, LoraGAConfig(r=RANK, target_modules=TARGETS))
    assert _no_lora_layers(model)
    # outside any context: loralab raises instead of PEFT's silent fallback to the default init
    with pytest.raises(LoraGAInitError, match="without gradients"):
        peft.get_peft_model(model, LoraGAConfig(r=RANK, target_modules=TARGETS))


def test_missing_target_raises_and_restores_the_model():
    model = tiny_llama()
    batch = make_lm_batches(1, seed=9)[0]
    with torch.no_grad():
        before = model(**batch).logits
    grads = _fresh_grads(model)
    del grads["model.layers.1.self_attn.v_proj"]
    with pytest.raises(
        LoraGAInitError, match=r"no gradient for target layer 'model\.layers\.1\.self_attn\.v_proj'"
    ):
        with LoraGAContext(model, grads):
            peft.get_peft_model(model, LoraGAConfig(r=RANK, target_modules=TARGETS))
    assert _no_lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    # and the model is usable again
    with LoraGAContext(model, _fresh_grads(model)):
        pm = peft.get_peft_model(model, LoraGAConfig(r=RANK, target_modules=TARGETS))
    assert len(_lora_state(pm)) == 2 * len(TARGETS)


def test_wrong_shape_raises_with_conv1d_hint():
    model = tiny_llama()
    grads = _fresh_grads(model)
    grads["model.layers.0.mlp.down_proj"] = grads["model.layers.0.mlp.down_proj"].T.contiguous()
    with pytest.raises(
        LoraGAInitError,
        match=r"named_grad\['model\.layers\.0\.mlp\.down_proj'\] must have shape \(out, in\) = \(64, 128\), got \(128, 64\) \(Conv1D",
    ):
        with LoraGAContext(model, grads):
            peft.get_peft_model(model, LoraGAConfig(r=RANK, target_modules=TARGETS))
    assert _no_lora_layers(model)
    with pytest.raises(LoraGAInitError, match="2-D"):
        with LoraGAContext(model, {"model.layers.0.self_attn.q_proj": torch.zeros(3)}):
            pass


def test_rank_too_large_names_the_layer():
    model = tiny_llama()
    grads = _fresh_grads(model)
    with pytest.raises(
        LoraGARankError, match=r"'model\.layers\.0\.self_attn\.v_proj' \(32x64\).*use r <= 16"
    ):
        with LoraGAContext(model, grads):
            peft.get_peft_model(model, LoraGAConfig(r=20, target_modules=TARGETS))
    assert _no_lora_layers(model)


def test_model_not_given_to_the_context_raises():
    model, other = tiny_llama(), tiny_llama()
    with pytest.raises(LoraGAInitError, match="not part of the model given to LoraGAContext"):
        with LoraGAContext(model, _fresh_grads(model)):
            peft.get_peft_model(other, LoraGAConfig(r=RANK, target_modules=TARGETS))


def test_bad_arguments_and_save_without_init(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="origin_type"):
        estimate_gradient(model, make_lm_batches(1), origin_type="int4")
    with pytest.raises(ValueError, match="quant_type"):
        estimate_gradient(model, make_lm_batches(1), quant_type="awq")
    with LoraGAContext(model, _fresh_grads(model)):
        pm = peft.get_peft_model(model, LoraGAConfig(r=RANK, target_modules=TARGETS))
    with pytest.raises(TypeError, match="PeftModel"):
        estimate_gradient(pm, make_lm_batches(1))
    with pytest.raises(FileNotFoundError, match="save_loraga_model_init"):
        save_loraga_model_final(pm, tmp_path)
    with pytest.raises(TypeError, match="PeftModel"):
        save_loraga_model_init(tiny_llama(), tmp_path)
