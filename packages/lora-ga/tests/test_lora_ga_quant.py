"""QLoRA flow on the CPU: estimate on the float checkpoint (block offload), initialise the bitsandbytes
NF4 / FP4 / int8 model, offset the dequantized W0 and re-quantize it with the layer's own settings."""

import logging

import pytest
import torch

from loralab.core.gradients import GradientEstimationError, estimate_gradients
from loralab.core.quant import (
    dequantize_weight,
    dequantized_copy,
    load_float_model_for_estimation,
    quant_config_of,
    quant_kind,
)
from loralab.core.targets import get_module
from loralab.core.testing import make_lm_batches, save_tiny, tiny_llama
from loralab.lora_ga import LoraGAConfig, get_lora_ga_model, lora_ga_factors

bnb = pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

RANK = 4
ALPHA = 8
TARGETS = ["q_proj", "v_proj", "down_proj"]
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny(tiny_llama(), tmp_path_factory.mktemp("ga_tiny_llama"), tokenizer=False)


def _load(path, kind):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind == "int8":
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=kind,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=q, device_map="cpu", dtype=torch.float32
    ).eval()


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.double()


def _requantized_reference(w, spec):
    """bitsandbytes' own quantize → dequantize of the float matrix ``w`` with the layer's settings."""
    if spec.kind == "int8":
        q = bnb.nn.Int8Params(w.to(torch.float16), requires_grad=False, has_fp16_weights=False).to(
            "cpu"
        )
        return bnb.functional.int8_vectorwise_dequant(q.data, q.SCB).float()
    q, st = bnb.functional.quantize_4bit(
        w.to(spec.dtype),
        blocksize=spec.blocksize,
        compress_statistics=spec.double_quant,
        quant_type=spec.kind,
    )
    return bnb.functional.dequantize_4bit(q, st).float()


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_quantized_init_keeps_quant_type_and_offsets_dequantized_weight(checkpoint, kind):
    qmodel = _load(checkpoint, kind)
    batches = make_lm_batches(2)
    names = [n for n, m in qmodel.named_modules() if n.split(".")[-1] in TARGETS]
    specs = {n: quant_config_of(get_module(qmodel, n)) for n in names}
    deq0 = {n: dequantize_weight(get_module(qmodel, n)) for n in names}
    float_model = load_float_model_for_estimation(checkpoint)
    G = estimate_gradients(
        float_model, batches, TARGETS, progress=False
    )  # the float-checkpoint gradient

    cfg = LoraGAConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, iters=2)
    pm = get_lora_ga_model(
        qmodel,
        cfg,
        batches,
        estimation_model=float_model,
        offload=True,
        device="cpu",
        progress=False,
    )

    s = ALPHA / RANK
    for n in names:
        layer = get_module(pm, PREFIX + n)
        base = layer.get_base_layer()
        # quant type and settings kept (the reference rebuilds the layer with defaults: NF4 -> FP4)
        assert quant_kind(base) == kind and quant_config_of(base) == specs[n], n
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        A_ref, B_ref = lora_ga_factors(G[n], RANK, scaling=s)  # factors of the *float* gradient
        torch.testing.assert_close(A, A_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(B, B_ref, atol=1e-5, rtol=0)
        # new storage = bitsandbytes' quantization of (dequantized W0 - s·B·A)
        expected = _requantized_reference(deq0[n] - s * B.detach() @ A.detach(), specs[n])
        torch.testing.assert_close(dequantize_weight(base), expected, atol=1e-6, rtol=0)
    # Step 0 moves only by the re-quantization error, which is of the size of the quantization error itself.
    base_q = _logits(_load(checkpoint, kind), batches[0])
    base_f = _logits(float_model, batches[0])
    step0 = (_logits(pm, batches[0]) - base_q).abs().max()
    quant_err = (base_q - base_f).abs().max()
    assert step0 <= 2 * quant_err, (step0, quant_err)


def test_init_after_a_cpu_forward(checkpoint):
    """bitsandbytes repacks 4-bit weights for its CPU kernel on the first eval forward (nested absmax
    unfolded, absmax in bf16); the init undoes that and re-quantizes with the original settings."""
    qmodel = _load(checkpoint, "nf4")
    batches = make_lm_batches(2)
    n = "model.layers.0.self_attn.q_proj"
    spec = quant_config_of(get_module(qmodel, n))
    base_q = _logits(qmodel, batches[0])  # may repack (CPUs with AVX512-BF16)
    float_model = load_float_model_for_estimation(checkpoint)
    pm = get_lora_ga_model(
        qmodel,
        LoraGAConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj"], iters=2),
        batches,
        estimation_model=float_model,
        progress=False,
    )
    base = get_module(pm, PREFIX + n).get_base_layer()
    assert quant_config_of(base) == spec
    step0 = (_logits(pm, batches[0]) - base_q).abs().max()
    assert step0 <= 2 * (base_q - _logits(float_model, batches[0])).abs().max()


def test_dequantized_copy_as_estimation_model(checkpoint):
    """Without a float checkpoint: estimate on the dequantized copy (the quantized model's own point)."""
    qmodel = _load(checkpoint, "nf4")
    batches = make_lm_batches(2)
    float_model = load_float_model_for_estimation(qmodel, source="dequantize")
    G = estimate_gradients(float_model, batches, ["q_proj"], progress=False)
    pm = get_lora_ga_model(
        qmodel,
        LoraGAConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj"], iters=2),
        batches,
        estimation_model=float_model,
        progress=False,
    )
    n = "model.layers.1.self_attn.q_proj"
    layer = get_module(pm, PREFIX + n)
    assert quant_kind(layer.get_base_layer()) == "nf4"
    A_ref, B_ref = lora_ga_factors(G[n], RANK, scaling=ALPHA / RANK)
    torch.testing.assert_close(layer.lora_A["default"].weight, A_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.lora_B["default"].weight, B_ref, atol=1e-5, rtol=0)


def test_given_gradients_on_quantized_model(checkpoint):
    qmodel = _load(checkpoint, "nf4")
    G = estimate_gradients(
        load_float_model_for_estimation(checkpoint), make_lm_batches(2), ["v_proj"], progress=False
    )
    pm = get_lora_ga_model(
        qmodel, LoraGAConfig(r=RANK, lora_alpha=ALPHA, target_modules=["v_proj"]), None, gradients=G
    )
    for n in G:
        assert quant_kind(get_module(pm, PREFIX + n).get_base_layer()) == "nf4"


def test_quantized_without_estimation_model_estimates_at_its_own_point(checkpoint):
    """No float checkpoint needed: the quantized targets are estimated on float copies of their
    dequantized weights (core's estimate_adapter_gradients), which equals estimating on a whole
    dequantized copy of the model; W0 is then offset and re-quantized as in the seed's flow."""
    qmodel = _load(checkpoint, "nf4")
    batches = make_lm_batches(2)
    names = [n for n, m in qmodel.named_modules() if n.split(".")[-1] in TARGETS]
    specs = {n: quant_config_of(get_module(qmodel, n)) for n in names}
    deq0 = {n: dequantize_weight(get_module(qmodel, n)) for n in names}
    G = estimate_gradients(dequantized_copy(qmodel), batches, names, progress=False)
    pm = get_lora_ga_model(
        qmodel,
        LoraGAConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, iters=2),
        batches,
        progress=False,
    )
    s = ALPHA / RANK
    for n in names:
        layer = get_module(pm, PREFIX + n)
        base = layer.get_base_layer()
        assert quant_kind(base) == "nf4" and quant_config_of(base) == specs[n], n
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        A_ref, B_ref = lora_ga_factors(G[n], RANK, scaling=s)
        torch.testing.assert_close(A, A_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(B, B_ref, atol=1e-5, rtol=0)
        expected = _requantized_reference(deq0[n] - s * B.detach() @ A.detach(), specs[n])
        torch.testing.assert_close(dequantize_weight(base), expected, atol=1e-6, rtol=0)


def test_quantized_estimation_model_is_refused(checkpoint):
    qmodel = _load(checkpoint, "nf4")
    with pytest.raises(
        GradientEstimationError,
        match=r"estimation_model's layer 'model\.layers\.0\.self_attn\.q_proj' is quantized \(Linear4bit\)",
    ):
        get_lora_ga_model(
            qmodel,
            LoraGAConfig(r=RANK, target_modules=TARGETS),
            make_lm_batches(1),
            estimation_model=_load(checkpoint, "nf4"),
            progress=False,
        )
    assert not any("lora_A" in n for n, _ in qmodel.named_modules())  # given back untouched
