"""estimate_adapter_gradients: names, adapters off, one float-copy policy for quantized targets,
estimation models, one device/dtype rule on the plain and offload paths, and every error."""

import logging

import pytest
import torch
from torch import nn

import loralab.core.adapter_gradients as ag
from loralab.core import estimate_adapter_gradients
from loralab.core.gradients import GradientEstimationError, estimate_gradients
from loralab.core.quant import dequantized_copy, dtype_kwarg, is_quantized
from loralab.core.testing import make_lm_batches, save_tiny, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

RANK = 4
TARGETS = ["q_proj", "v_proj", "down_proj"]
NAMES = [
    f"model.layers.{i}.{m}"
    for i in range(2)
    for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
]
# fp32 sums of the same backward passes in another order (or through the block-wise path)
RTOL, ATOL = 1e-5, 1e-7


def _collect(model, batches, **kw):
    got = {}

    def consumer(name, grad):
        assert name not in got
        got[name] = grad

    order = estimate_adapter_gradients(model, batches, consumer, progress=False, **kw)
    assert order == list(got)
    return got


def _peft(model, targets=TARGETS, **kw):
    # init_lora_weights=False: B is random, so the adapters change the output (adapters-off must matter)
    cfg = peft.LoraConfig(
        r=RANK, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kw
    )
    return peft.get_peft_model(model, cfg)


def _flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_names_relative_to_base_and_adapters_off_with_nonzero_B():
    batches = make_lm_batches(2)
    want = estimate_gradients(tiny_llama(), batches, NAMES, progress=False)
    pm = _peft(tiny_llama())
    with torch.no_grad():  # the adapters really change the function (B != 0)
        assert (pm(**batches[0]).logits - tiny_llama()(**batches[0]).logits).abs().max() > 1e-3
    flags = _flags(pm)
    got = _collect(pm, batches)
    assert list(got) == NAMES  # module order, no "base_model.model." prefix
    for n in NAMES:
        assert got[n].dtype == torch.float32 and got[n].shape == want[n].shape
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6)
    # adapters on again, every flag as it was (LoRA trainable, base frozen)
    assert (
        _flags(pm) == flags
        and not pm.base_model.model.model.layers[0].self_attn.q_proj.disable_adapters
    )
    with torch.no_grad():
        assert (pm(**batches[0]).logits - tiny_llama()(**batches[0]).logits).abs().max() > 1e-3


def test_adapter_name_and_disabled_adapters_stay_disabled():
    batches = make_lm_batches(1)
    pm = _peft(tiny_llama(), targets=["q_proj"])
    pm.add_adapter(
        "other", peft.LoraConfig(r=RANK, target_modules=["v_proj"], init_lora_weights=False)
    )
    got = _collect(pm, batches, adapter_name="other")
    assert list(got) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    want = estimate_gradients(tiny_llama(), batches, list(got), progress=False)
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    layer.enable_adapters(False)
    _collect(pm, batches)
    assert layer.disable_adapters  # it was off before: left off


def test_plain_model_with_layer_names_conv1d():
    batches = make_lm_batches(2)
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    got = _collect(tiny_gpt2(), batches, layer_names=names)
    want = estimate_gradients(tiny_gpt2(), batches, names, progress=False)
    assert list(got) == names
    for n in names:
        assert got[n].shape == want[n].shape  # (out, in), Conv1D transposed from its storage
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)


def test_layer_names_on_a_peft_model_may_name_any_base_layer():
    batches = make_lm_batches(1)
    pm = _peft(tiny_llama(), targets=["q_proj"])
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]  # wrapped, and not
    got = _collect(pm, batches, layer_names=names)
    want = estimate_gradients(tiny_llama(), batches, names, progress=False)
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6)


def test_plain_and_offload_same_values_dtype_and_device():
    batches = make_lm_batches(2)
    plain = _collect(_peft(tiny_llama()), batches)
    off = _collect(_peft(tiny_llama()), batches, offload=True, device="cpu")
    assert list(off) == list(plain) or sorted(off) == sorted(
        plain
    )  # offload finishes last block first
    pm = _peft(tiny_llama())
    for n in plain:
        weight_device = pm.get_base_model().get_submodule(n).get_base_layer().weight.device
        assert plain[n].dtype == off[n].dtype == torch.float32
        assert plain[n].device == weight_device and off[n].device == torch.device("cpu")
        torch.testing.assert_close(off[n], plain[n], rtol=RTOL, atol=ATOL)


def test_offload_hands_gradients_on_the_compute_device(monkeypatch):
    # core's block-wise estimator finishes each gradient on the CPU; the consumer gets it on `device`
    # (the "meta" device stands for an accelerator on this CPU-only test machine)
    seen = {}

    def fake_estimate(model, batches, targets, *, consumer, offload, device, **kw):
        assert offload and device == torch.device("meta")
        for name, t in targets.items():
            consumer(name, torch.ones(t.shape, dtype=torch.float16))  # on the CPU, not fp32
        return {}

    monkeypatch.setattr(ag, "estimate_gradients", fake_estimate)
    pm = _peft(tiny_llama(), targets=["q_proj"])
    estimate_adapter_gradients(
        pm, [], lambda n, g: seen.__setitem__(n, g), offload=True, device="meta", progress=False
    )
    assert sorted(seen) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert all(g.device.type == "meta" and g.dtype == torch.float32 for g in seen.values())


def test_estimation_model():
    batches = make_lm_batches(2)
    pm = _peft(tiny_llama())
    other = tiny_llama(seed=3)  # another point: the gradients must be its own
    got = _collect(pm, batches, estimation_model=other)
    want = estimate_gradients(tiny_llama(seed=3), batches, NAMES, progress=False)
    for n in NAMES:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6)
    # a PEFT estimation model: same names, its adapters off too
    got = _collect(
        pm, batches, estimation_model=_peft(tiny_llama(seed=3)), offload=True, device="cpu"
    )
    for n in NAMES:
        torch.testing.assert_close(got[n], want[n], rtol=RTOL, atol=ATOL)


def test_errors():
    batches = make_lm_batches(1)
    pm = _peft(tiny_llama(), targets=["q_proj"])
    with pytest.raises(
        GradientEstimationError,
        match=r"LlamaForCausalLM has no layer hosting adapter 'default' \(adapters found: none\); .*layer_names",
    ):
        estimate_adapter_gradients(tiny_llama(), batches, print, progress=False)
    with pytest.raises(
        GradientEstimationError,
        match=r"no layer hosting adapter 'nope' \(adapters found: \['default'\]\)",
    ):
        estimate_adapter_gradients(pm, batches, print, adapter_name="nope", progress=False)
    with pytest.raises(
        ValueError, match=r"adapter_name .* or layer_names, not both; got adapter_name='default'"
    ):
        estimate_adapter_gradients(
            pm, batches, print, adapter_name="default", layer_names=["lm_head"]
        )
    with pytest.raises(ValueError, match="layer_names is empty"):
        estimate_adapter_gradients(pm, batches, print, layer_names=[])
    with pytest.raises(ValueError, match=r"layer_names lists \['lm_head'\] more than once"):
        estimate_adapter_gradients(pm, batches, print, layer_names=["lm_head", "lm_head"])
    with pytest.raises(
        TypeError, match="layer_names must be a sequence of layer names, got the string 'lm_head'"
    ):
        estimate_adapter_gradients(pm, batches, print, layer_names="lm_head")
    with pytest.raises(
        GradientEstimationError,
        match=r"model has no module 'base_model\.model\.lm_head' \(names are relative to the base model",
    ):
        estimate_adapter_gradients(pm, batches, print, layer_names=["base_model.model.lm_head"])
    with pytest.raises(
        GradientEstimationError,
        match=r"model's layer 'model\.embed_tokens' is a Embedding: .*Linear, Conv1D",
    ):
        estimate_adapter_gradients(pm, batches, print, layer_names=["model.embed_tokens"])
    with pytest.raises(
        GradientEstimationError,
        match=r"estimation_model has no module 'model\.layers\.0\.self_attn\.q_proj'",
    ):
        estimate_adapter_gradients(pm, batches, print, estimation_model=nn.Linear(2, 2))
    with pytest.raises(
        GradientEstimationError,
        match=r"estimation_model's layer 'model\.layers\.0\.self_attn\.q_proj' is \(out, in\) = \(96, 96\), the model's is \(64, 64\)",
    ):
        estimate_adapter_gradients(pm, batches, print, estimation_model=tiny_llama(hidden_size=96))
    pm.merge_adapter()
    with pytest.raises(
        GradientEstimationError,
        match=r"model's layer 'model\.layers\.0\.self_attn\.q_proj' has adapter weights merged .*unmerge_adapter",
    ):
        estimate_adapter_gradients(pm, batches, print, progress=False)


# --- quantized targets (bitsandbytes runs NF4 / int8 on the CPU) ----------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny(tiny_llama(), tmp_path_factory.mktemp("adapter_grads_llama"), tokenizer=False)


def _quantized(path, kind, compute_dtype=torch.float32):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if kind == "int8":
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        q = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=compute_dtype
        )
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=q, device_map="cpu", **{dtype_kwarg(): torch.float32}
    ).eval()


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(
    ("kind", "offload", "targets"),
    [("nf4", False, TARGETS), ("int8", False, ALL), ("nf4", True, TARGETS)],
)
def test_quantized_targets_estimate_on_float_copies(checkpoint, caplog, kind, offload, targets):
    """At the quantized model's own point: equal to estimating on core.quant.dequantized_copy.

    int8 adapts every layer here: a Linear8bitLt that is not a target keeps computing in int8 (its
    activations quantized too), which a whole float copy would not do; a 4-bit layer computes in
    its float compute dtype, so a subset of targets already matches."""
    batches = make_lm_batches(2)
    qmodel = _quantized(checkpoint, kind)
    names = [n for n, _ in qmodel.named_modules() if n.rsplit(".", 1)[-1] in targets]
    want = estimate_gradients(dequantized_copy(qmodel), batches, names, progress=False)
    pm = _peft(qmodel, targets=targets)
    bases = {n: pm.get_base_model().get_submodule(n).get_base_layer() for n in names}
    assert all(is_quantized(b) for b in bases.values())
    kw = {"offload": True, "device": "cpu"} if offload else {}
    with caplog.at_level(logging.INFO, logger="loralab.core.adapter_gradients"):
        got = _collect(pm, batches, **kw)
    assert sorted(got) == sorted(names)
    assert (
        f"estimating {len(names)} quantized layer(s) on float copies of their dequantized weights "
        "(torch.float32)" in caplog.text
    )
    for n in names:
        assert got[n].dtype == torch.float32
        torch.testing.assert_close(got[n], want[n], rtol=RTOL, atol=ATOL)
        # the quantized layers are back, the same objects
        assert pm.get_base_model().get_submodule(n).get_base_layer() is bases[n]


def test_quantized_estimation_model_is_refused(checkpoint):
    pm = _peft(tiny_llama(), targets=["q_proj"])
    with pytest.raises(
        GradientEstimationError,
        match=r"estimation_model's layer 'model\.layers\.0\.self_attn\.q_proj' is quantized \(Linear4bit\): .*float weights",
    ):
        estimate_adapter_gradients(
            pm, make_lm_batches(1), print, estimation_model=_quantized(checkpoint, "nf4")
        )


def test_float_copies_compute_in_the_layers_dtype(checkpoint, caplog):
    """A float32 model whose 4-bit layers compute in bfloat16 (QLoRA after PEFT's
    prepare_model_for_kbit_training): the float copies take float32 activations, compute in bfloat16
    as the 4-bit layers do, and the gradients still arrive as float32."""
    batches = make_lm_batches(2)
    qmodel = _quantized(checkpoint, "nf4", compute_dtype=torch.bfloat16)
    want = estimate_gradients(dequantized_copy(qmodel), batches, NAMES, progress=False)
    with caplog.at_level(logging.INFO, logger="loralab.core.adapter_gradients"):
        got = _collect(_peft(qmodel), batches)
    assert "(torch.bfloat16)" in caplog.text
    for n in NAMES:
        assert got[n].dtype == torch.float32
        # bfloat16 matmuls in the targets (8 mantissa bits) against the float32 copy
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0.05 * float(want[n].abs().max()))


def test_layers_that_would_cut_the_backward_run_as_float_copies(checkpoint, caplog, monkeypatch):
    """bitsandbytes' CPU repacking (AVX512-BF16 CPUs, after an inference forward) leaves a 4-bit layer
    without an input gradient; such a non-target layer is swapped for a float copy during the estimate.
    The repacking itself needs such a CPU: the detection is stood in for here."""
    cut = "model.layers.1.mlp.up_proj"  # not a target
    monkeypatch.setattr(ag, "_backward_cut", lambda m: m is qmodel.get_submodule(cut))
    batches = make_lm_batches(2)
    qmodel = _quantized(checkpoint, "nf4")
    original = qmodel.get_submodule(cut)
    want = estimate_gradients(dequantized_copy(qmodel), batches, NAMES, progress=False)
    seen = []

    def loss_fn(model, batch):
        seen.append(type(model.get_base_model().get_submodule(cut)).__name__)
        return model(**batch).loss

    with caplog.at_level(logging.INFO, logger="loralab.core.adapter_gradients"):
        got = _collect(_peft(qmodel), batches, loss_fn=loss_fn)
    # every forward of the estimate (one per batch on the hook path; the recording, glue and block
    # passes block-wise) ran the float copy
    assert seen and set(seen) == {"_FloatCopy"} and qmodel.get_submodule(cut) is original
    assert "1 other 4-bit layer(s) repacked by bitsandbytes for its CPU kernel" in caplog.text
    assert "estimating 6 quantized layer(s)" in caplog.text
    for n in NAMES:
        torch.testing.assert_close(got[n], want[n], rtol=RTOL, atol=ATOL)
