"""ReLoRaModel(quantize="4bit"|"8bit", use_double_quant=...): bitsandbytes-quantized frozen W on the CPU."""

import pytest
import torch

from loralab.core.quant import dequantize_weight, quant_config_of
from loralab.core.testing import make_lm_batches, tiny_llama
from loralab.golore import ReLoRaConfig, ReLoRaLinear, ReLoRaModel

RANK, SCALE = 4, 0.5
SETTINGS = [("4bit", False), ("4bit", True), ("8bit", False)]
FWD_ATOL = 1e-4  # same float32 values through bitsandbytes' matmul vs F.linear
# merge: W_eff is re-quantized, so the function moves by the quantization error of W_eff's
# entries (NF4: up to half a code step of the block absmax, ~0.3 % of the largest weight).
MERGE_RTOL = 0.05


def _wrap(quantize, dq, seed=0):
    return ReLoRaModel(
        tiny_llama(seed), r=RANK, lora_dropout=0, target_modules=["attn", "mlp"], scale=SCALE,
        quantize=quantize, use_double_quant=dq,
    )  # fmt: skip


def _layers(model):
    return [m for m in model.modules() if isinstance(m, ReLoRaLinear)]


@pytest.mark.parametrize(("quantize", "dq"), SETTINGS)
def test_forward_equals_dequantized_reference(quantize, dq):
    model = _wrap(quantize, dq)
    layer = _layers(model)[0]
    with torch.no_grad():
        layer.lora_A.weight.normal_()
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 5, layer.in_features)
    w = dequantize_weight(layer.base_layer)
    ref = x @ (w - SCALE * layer.lora_A.weight @ layer.lora_B.weight).T
    if layer.bias is not None:
        ref = ref + layer.bias
    torch.testing.assert_close(layer(x), ref, atol=FWD_ATOL, rtol=1e-4)
    assert layer.weight is None and layer.base_layer.weight.dtype in (torch.uint8, torch.int8)
    assert layer.lora_A.weight.dtype == torch.float32


@pytest.mark.parametrize(("quantize", "dq"), SETTINGS)
def test_training_decreases_loss_and_merge_keeps_function(quantize, dq):
    model = _wrap(quantize, dq)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = make_lm_batches(1)[0]
    specs = [quant_config_of(m.base_layer) for m in _layers(model)]
    losses = []
    for step in range(8):
        model._config.forward_type = step % 3 == 0
        loss = model(**batch).loss
        loss.backward()
        if step % 3 == 0:
            model.merge_and_reinit(opt, rand=step >= 3)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    # settings survive every re-quantization
    assert [quant_config_of(m.base_layer) for m in _layers(model)] == specs
    if quantize == "4bit":
        assert all(s.kind == "nf4" and s.double_quant is dq and s.blocksize == 64 for s in specs)
    # merge keeps the function: output before == after, within re-quantization error
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    model._config.forward_type = True
    model(**batch).loss.backward()
    model.merge_and_reinit(None)
    for m in _layers(model):
        assert torch.count_nonzero(m.trained_factor) == 0
    with torch.no_grad():
        after = model(**batch).logits
    err = (after - before).abs().max() / before.abs().max()
    assert err < MERGE_RTOL, err.item()


def test_quantized_save_reloads_with_same_settings(tmp_path):
    model = _wrap("4bit", True)
    batch = make_lm_batches(1)[0]
    model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
    model.save_pretrained(tmp_path)
    back = ReLoRaModel.from_pretrained(tmp_path)
    back.eval()
    assert all(quant_config_of(m.base_layer).double_quant for m in _layers(back))
    assert back._config.quantize == "4bit" and back._config.use_double_quant is True
    with torch.no_grad():
        out = back(**batch).logits
    # re-quantizing the dequantized NF4 values is exact up to the double-quantized scales
    assert (out - ref).abs().max() / ref.abs().max() < 1e-3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(quantize="4bits"), "quantize must be one of"),
        (dict(quantize=None, use_double_quant=True), "use_double_quant=True quantizes the NF4"),
        (dict(quantize="8bit", use_double_quant=True), "needs quantize='4bit'"),
        (
            dict(quantize="4bit", lora_only=True, keep_original_weights=False),
            "lora_only=True has no W",
        ),
        (dict(quantize="4bit", use_double_quant="yes"), "use_double_quant must be a bool"),
    ],
)
def test_bad_quantize_settings_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReLoRaConfig(r=4, **kwargs)


def _train(model, steps, gap=2, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = make_lm_batches(1)[0]
    for step in range(steps):
        model._config.forward_type = step % gap == 0
        model(**batch).loss.backward()
        if step % gap == 0:
            model.merge_and_reinit(opt, rand=False)
        opt.step()
        opt.zero_grad()
    return batch


@pytest.mark.parametrize(("quantize", "dq"), SETTINGS)
def test_state_dict_round_trip_after_merges(tmp_path, quantize, dq):
    """W re-quantized by merges: torch.save(state_dict) / load_state_dict(torch.load(weights_only=True))
    into a model built from other weights restores W's codes and scales exactly, and the next merge
    (re-quantization included) is the same."""
    model = _wrap(quantize, dq)
    batch = _train(model, 4)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = _wrap(quantize, dq, seed=1)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    for a, b in zip(_layers(model), _layers(fresh), strict=True):
        assert torch.equal(dequantize_weight(a.base_layer), dequantize_weight(b.base_layer))
        assert quant_config_of(a.base_layer) == quant_config_of(b.base_layer)
        assert torch.equal(a.lora_A.weight, b.lora_A.weight)
        assert torch.equal(a.lora_B.weight, b.lora_B.weight)
    for m in (model, fresh):
        m._config.forward_type = True
        m(**batch).loss.backward()
        m.merge_and_reinit(None)
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_full_gradient_holder_is_a_parameter_for_its_step():
    """On a forward_type step the zero matrix standing in for a quantized W is among the model's
    parameters (a multi-process loop's all-reduce averages its gradient), and gone after the merge."""
    model = _wrap("4bit", False)
    batch = make_lm_batches(1)[0]
    probes = lambda: [n for n, _ in model.named_parameters() if n.endswith("_grad_probe")]  # noqa: E731
    assert probes() == [] and "_grad_probe" not in "".join(model.state_dict())
    model._config.forward_type = True
    model(**batch).loss.backward()
    assert len(probes()) == len(_layers(model))
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("_grad_probe"))
    model.merge_and_reinit(None)
    assert probes() == []
