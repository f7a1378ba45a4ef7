"""bitsandbytes helpers, tested for real on the CPU (NF4, FP4 and int8 Linear8bitLt)."""

import logging

import pytest
import torch
from torch import nn

from loralab.core.gradients import GradientEstimationError, estimate_gradients
from loralab.core.quant import (
    QuantizationError,
    dequantize_weight,
    dequantized_copy,
    dtype_kwarg,
    is_quantized,
    load_float_model_for_estimation,
    load_quant_statistics_,
    load_quantized_weight_,
    load_state_dict_with_quantized_,
    quant_config_of,
    quant_kind,
    quant_statistics,
    quantized_layer_names,
    requantize_weight_,
)
from loralab.core.targets import find_targets, weight_matrix
from loralab.core.testing import make_lm_batches, save_tiny, tiny_llama

bnb = pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

IN, OUT = 128, 48
# NF4/FP4 absmax-per-block quantization of N(0, 1/IN)-ish weights: the error per entry is at most
# half a code step of the block's absmax; 0.2 * absmax is a generous, honest bound for 4 bits.
REL_4BIT = 0.2
# row-wise absmax / 127 step, rounding error <= half a step (fp16 cast adds ~1e-3 rel)
REL_INT8 = 1.0 / 127


def _float_linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT)


def _linear4bit(
    lin: nn.Linear,
    quant_type: str,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype=torch.float32,
):
    m = bnb.nn.Linear4bit(
        IN,
        OUT,
        bias=True,
        compute_dtype=compute_dtype,
        quant_type=quant_type,
        compress_statistics=double_quant,
    )
    m.weight = bnb.nn.Params4bit(
        lin.weight.data.clone(),
        requires_grad=False,
        quant_type=quant_type,
        blocksize=blocksize,
        compress_statistics=double_quant,
        module=m,
    )
    m.bias = nn.Parameter(lin.bias.data.clone())
    return m.to("cpu")


def _linear8bit(lin: nn.Linear):
    m = bnb.nn.Linear8bitLt(IN, OUT, bias=True, has_fp16_weights=False, threshold=0.0)
    m.weight = bnb.nn.Int8Params(
        lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False
    )
    m.bias = nn.Parameter(lin.bias.data.clone())
    return m.to("cpu")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_detect_dequantize_requantize(quant_type):
    lin = _float_linear()
    m = _linear4bit(lin, quant_type, blocksize=128, double_quant=True)
    assert is_quantized(m) and quant_kind(m) == quant_type
    spec = quant_config_of(m)
    assert (spec.blocksize, spec.double_quant, spec.compute_dtype) == (128, True, torch.float32)
    w = dequantize_weight(m)
    assert w.shape == (OUT, IN) and w.dtype == torch.float32
    # the dequantized matrix is what the layer actually multiplies by
    x = torch.randn(5, IN)
    torch.testing.assert_close(m(x), x @ w.T + m.bias, atol=1e-5, rtol=1e-5)
    # and close to the float weight within 4-bit error
    block_absmax = lin.weight.detach().abs().max()
    assert (w - lin.weight).abs().max() <= REL_4BIT * block_absmax
    # weight_matrix of a 4-bit layer is its dequantized weight
    torch.testing.assert_close(weight_matrix(m), w)

    # re-quantize a new float matrix: settings kept, values = quantizing that matrix directly
    new = torch.randn(OUT, IN) * 0.05
    requantize_weight_(m, new)
    assert quant_config_of(m) == spec
    ref = _linear4bit(nn.Linear(IN, OUT), quant_type, blocksize=128, double_quant=True)
    requantize_weight_(ref, new)
    direct = bnb.nn.Params4bit(
        new.clone(),
        requires_grad=False,
        quant_type=quant_type,
        blocksize=128,
        compress_statistics=True,
    ).to("cpu")
    expected = bnb.functional.dequantize_4bit(direct.data, direct.quant_state)
    torch.testing.assert_close(dequantize_weight(m), expected, atol=0, rtol=0)
    # round trip: dequantize → requantize is a fixed point of the quantizer, up to the 8-bit
    # re-quantization of the block scales (double quantization), measured ~3e-4 relative
    w2 = dequantize_weight(m)
    requantize_weight_(m, w2)
    torch.testing.assert_close(dequantize_weight(m), w2, atol=1e-6, rtol=2e-3)
    torch.testing.assert_close(m(x), x @ dequantize_weight(m).T + m.bias, atol=1e-5, rtol=1e-5)


def test_nf4_stays_nf4_with_non_default_settings():
    # bitsandbytes' Linear4bit default is fp4 / blocksize 64: a rebuild with defaults would lose these
    m = _linear4bit(
        _float_linear(), "nf4", blocksize=256, double_quant=False, compute_dtype=torch.bfloat16
    )
    requantize_weight_(m, dequantize_weight(m) * 2)
    spec = quant_config_of(m)
    assert (spec.kind, spec.blocksize, spec.double_quant, spec.compute_dtype) == (
        "nf4",
        256,
        False,
        torch.bfloat16,
    )


def test_int8_detect_dequantize_requantize():
    lin = _float_linear()
    m = _linear8bit(lin)
    assert is_quantized(m) and quant_kind(m) == "int8"
    w = dequantize_weight(m)
    row_absmax = lin.weight.detach().abs().amax(1, keepdim=True)
    assert ((w - lin.weight).abs() <= row_absmax * (0.5 * REL_INT8 + 2e-3)).all()
    x = torch.randn(5, IN)
    y = m(x)  # moves (CB, SCB) into layer.state: dequantize must still find the scales
    torch.testing.assert_close(dequantize_weight(m), w)
    # int8 matmul through fp16 inputs
    torch.testing.assert_close(y, x @ w.T + m.bias, atol=2e-2, rtol=2e-2)
    new = torch.randn(OUT, IN) * 0.05
    requantize_weight_(m, new)
    assert quant_kind(m) == "int8"
    w_new = dequantize_weight(m)
    assert ((w_new - new).abs() <= new.abs().amax(1, keepdim=True) * (0.5 * REL_INT8 + 2e-3)).all()
    torch.testing.assert_close(m(x), x @ w_new.T + m.bias, atol=2e-2, rtol=2e-2)


def test_float_layers_pass_through():
    lin = _float_linear()
    assert not is_quantized(lin) and quant_kind(lin) is None
    w = dequantize_weight(lin)
    assert w.data_ptr() != lin.weight.data_ptr()
    requantize_weight_(lin, w * 3)
    torch.testing.assert_close(lin.weight.detach(), w * 3)
    with pytest.raises(TypeError, match="not a quantized"):
        quant_config_of(lin)
    with pytest.raises(TypeError, match="not an adaptable layer"):
        dequantize_weight(nn.ReLU())


def test_requantize_errors():
    m = _linear4bit(_float_linear(), "nf4")
    with pytest.raises(ValueError, match=r"shape \(out, in\) = \(48, 128\)"):
        requantize_weight_(m, torch.zeros(IN, OUT))
    bad = torch.zeros(OUT, IN)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        requantize_weight_(m, bad)


def _saved(m: nn.Module, tmp_path) -> dict:
    """``m.state_dict()`` through torch.save / torch.load(weights_only=True), as a checkpoint holds it."""
    torch.save(m.state_dict(), tmp_path / "layer.pt")
    return torch.load(tmp_path / "layer.pt", weights_only=True)


@pytest.mark.parametrize(
    ("kind", "double_quant"), [("nf4", False), ("nf4", True), ("fp4", True), ("int8", False)]
)
def test_load_quantized_weight_restores_codes_and_statistics(tmp_path, kind, double_quant):
    def build(seed):
        lin = _float_linear(seed)
        return (
            _linear8bit(lin)
            if kind == "int8"
            else _linear4bit(lin, kind, double_quant=double_quant)
        )

    m = build(0)
    x = torch.randn(5, IN)
    m(x)  # int8: the first forward moves (CB, SCB) from the weight into layer.state
    requantize_weight_(m, dequantize_weight(m) * 1.5 + 0.01)  # a weight re-quantized after building
    saved, w_saved, y_saved = _saved(m, tmp_path), dequantize_weight(m), m(x)
    other = build(1)
    other(x)
    rest = {k: v for k, v in saved.items() if not k.startswith("weight.")}
    if kind != "int8":
        # why the helper exists: load_state_dict refuses the 4-bit statistics, and without them
        # (or with strict=False) copies the codes but keeps the layer's old block scales
        plain = build(1)
        with pytest.raises(
            RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"weight\.absmax\""
        ):
            plain.load_state_dict(saved)
        plain.load_state_dict(rest)
        assert not torch.equal(dequantize_weight(plain), w_saved)
    else:
        # int8 after its first forward: bitsandbytes refuses to load SCB
        with pytest.raises(RuntimeError, match="Loading a quantized checkpoint into non-quantized"):
            other.load_state_dict(saved)
    load_quantized_weight_(other, saved)
    other.load_state_dict(rest)  # bias, and the same codes again (int8: and SCB)
    assert torch.equal(dequantize_weight(other), w_saved)
    assert quant_config_of(other) == quant_config_of(m)
    torch.testing.assert_close(other(x), y_saved, atol=0, rtol=0)


def test_load_quantized_weight_errors(tmp_path):
    four, eight = _linear4bit(_float_linear(), "nf4"), _linear8bit(_float_linear())
    s4, s8 = _saved(four, tmp_path), _saved(eight, tmp_path)
    with pytest.raises(TypeError, match="Linear is not a quantized bitsandbytes layer"):
        load_quantized_weight_(_float_linear(), s4)
    with pytest.raises(QuantizationError, match="no 'weight' entry for Linear4bit"):
        load_quantized_weight_(four, {"bias": s4["bias"]})
    with pytest.raises(QuantizationError, match=r"a 4-bit layer needs weight\.absmax"):
        load_quantized_weight_(four, s8)
    with pytest.raises(QuantizationError, match="an int8 layer needs the row scales 'SCB'"):
        load_quantized_weight_(eight, s4)
    with pytest.raises(
        QuantizationError,
        match=r"the saved 4-bit weight is \(64, 128\), the layer's \(out, in\) is \(48, 128\)",
    ):
        load_quantized_weight_(four, _saved(_linear4bit_shape(64), tmp_path))
    bad = dict(s8, SCB=s8["SCB"][:-1])
    with pytest.raises(
        QuantizationError,
        match=r"the int8 layer's \(out, in\) is \(48, 128\); the entries are weight \(48, 128\) torch.int8 and SCB \(47,\)",
    ):
        load_quantized_weight_(eight, bad)


def test_quant_statistics_round_trip_and_errors():
    model = nn.Sequential(_linear4bit(_float_linear(), "nf4"), _linear4bit(_float_linear(), "nf4"))
    saved = quant_statistics(model)
    assert {k.split(".weight.")[0] for k in saved} == {"0", "1"}
    assert "0.weight" not in saved  # the codes are not statistics
    before = dequantize_weight(model[0])
    requantize_weight_(model[0], before * 3)
    load_quant_statistics_(model, saved)  # the codes are not restored: only the statistics are
    assert torch.equal(model[0].weight.quant_state.absmax, saved["0.weight.absmax"])
    with pytest.raises(QuantizationError, match="no statistics for the 4-bit layer 1"):
        load_quant_statistics_(model, {k: v for k, v in saved.items() if k.startswith("0.")})
    with pytest.raises(
        QuantizationError, match=r"entries of no 4-bit layer: \['2.weight.absmax'\]"
    ):
        load_quant_statistics_(model, {**saved, "2.weight.absmax": saved["0.weight.absmax"]})
    wider = nn.Sequential(_linear4bit_shape(64), _linear4bit_shape(64))
    with pytest.raises(
        QuantizationError,
        match=r"are for a \(64, 128\) weight, the layer's \(out, in\) is \(48, 128\)",
    ):
        load_quant_statistics_(model, quant_statistics(wider))
    assert quant_statistics(nn.Sequential(_float_linear())) == {}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_load_state_dict_with_quantized_restores_a_whole_model_strictly(tmp_path, kind):
    def build(seed):
        lin = _float_linear(seed)
        q = _linear8bit(lin) if kind == "int8" else _linear4bit(lin, kind, double_quant=True)
        return nn.Sequential(q, nn.ReLU(), nn.Linear(q.out_features, 3))

    model, x = build(0), torch.randn(5, IN)
    model(x)
    requantize_weight_(model[0], dequantize_weight(model[0]) * 1.5 + 0.01)
    saved, y_saved = _saved(model, tmp_path), model(x)
    other = build(1)
    other(x)
    load_state_dict_with_quantized_(other, saved)
    torch.testing.assert_close(other(x), y_saved, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match=r"missing keys \['2.bias'\]"):
        load_state_dict_with_quantized_(build(1), {k: v for k, v in saved.items() if k != "2.bias"})
    with pytest.raises(RuntimeError, match=r"unexpected keys \['extra'\]"):
        load_state_dict_with_quantized_(build(1), {**saved, "extra": torch.zeros(1)})
    no_weight = {k: v for k, v in saved.items() if not k.startswith("0.")}
    with pytest.raises(RuntimeError, match=r"missing keys \['0.weight'"):
        load_state_dict_with_quantized_(build(1), no_weight)


def _linear4bit_shape(out: int):
    m = bnb.nn.Linear4bit(IN, out, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    return m.to("cpu")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny(tiny_llama(), tmp_path_factory.mktemp("tiny_llama"), tokenizer=False)


def _load_quantized(path, **cfg):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    return AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=BitsAndBytesConfig(**cfg),
        device_map="cpu",
        **{dtype_kwarg(): torch.float32},
    )


def test_seed_flow_float_then_quantized(tiny_checkpoint):
    from transformers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    # 1. float copy from the checkpoint, estimate there
    float_model = load_float_model_for_estimation(tiny_checkpoint, cfg)
    assert not quantized_layer_names(float_model)
    torch.testing.assert_close(
        float_model.model.layers[0].mlp.up_proj.weight,
        tiny_llama().model.layers[0].mlp.up_proj.weight,
    )
    batches = make_lm_batches(2)
    grads = estimate_gradients(float_model, batches, ["q_proj"], progress=False)
    assert set(grads) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    # 2. the quantized model refuses full-weight estimation with a pointer to this module
    qmodel = _load_quantized(
        tiny_checkpoint,
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
    )
    assert len(quantized_layer_names(qmodel)) == 14
    assert {t.kind for t in find_targets(qmodel).values()} == {"linear4bit"}
    with pytest.raises(GradientEstimationError, match="load_float_model_for_estimation"):
        estimate_gradients(qmodel, batches, ["q_proj"], progress=False)
    # 3. from the quantized model: reload its float checkpoint (auto) or dequantize
    again = load_float_model_for_estimation(qmodel)
    torch.testing.assert_close(
        again.model.layers[1].self_attn.q_proj.weight,
        float_model.model.layers[1].self_attn.q_proj.weight,
    )
    deq = load_float_model_for_estimation(qmodel, source="dequantize")
    assert not quantized_layer_names(deq) and quantized_layer_names(qmodel)
    q = qmodel.model.layers[1].self_attn.q_proj
    torch.testing.assert_close(deq.model.layers[1].self_attn.q_proj.weight, dequantize_weight(q))
    # the dequantized copy computes what the quantized model computes
    b = batches[0]
    torch.testing.assert_close(deq(**b).loss, qmodel(**b).loss, atol=1e-4, rtol=1e-4)


def test_int8_model_loads_and_dequantizes(tiny_checkpoint):
    qmodel = _load_quantized(tiny_checkpoint, load_in_8bit=True)
    names = quantized_layer_names(qmodel)
    assert names and all(quant_kind(qmodel.get_submodule(n)) == "int8" for n in names)
    deq = dequantized_copy(qmodel)
    ref = tiny_llama().model.layers[0].mlp.down_proj.weight
    got = deq.model.layers[0].mlp.down_proj.weight
    assert ((got - ref).abs() <= ref.abs().amax(1, keepdim=True) * (0.5 * REL_INT8 + 2e-3)).all()


def test_load_float_errors(tiny_checkpoint):
    with pytest.raises(ValueError, match="bitsandbytes config"):
        load_float_model_for_estimation(tiny_checkpoint, {"quant_method": "gptq"})
    with pytest.raises(ValueError, match="already is a float model"):
        load_float_model_for_estimation(tiny_llama())
    with pytest.raises(ValueError, match="needs a loaded quantized model"):
        load_float_model_for_estimation(tiny_checkpoint, source="dequantize")
    with pytest.raises(ValueError, match="source must be"):
        load_float_model_for_estimation(tiny_checkpoint, source="nope")


@pytest.mark.parametrize(
    ("version", "expected"),
    [("4.45.2", "torch_dtype"), ("4.55.4", "torch_dtype"), ("4.56.0", "dtype"), ("5.0.0", "dtype")],
)
def test_dtype_kwarg_follows_transformers_version(monkeypatch, version, expected):
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    assert dtype_kwarg() == expected


@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_reads_survive_cpu_repacking(double_quant):
    # bitsandbytes >= 0.48 repacks a Linear4bit for its CPU kernel on the first eval-mode forward of an
    # input without grad (on CPUs with AVX512-BF16; forced below elsewhere); reads must give the same
    # weight and settings after.
    # the CPU kernel's layout needs out_features % 32 == 0
    torch.manual_seed(3)
    m = bnb.nn.Linear4bit(
        IN,
        64,
        bias=True,
        compute_dtype=torch.float32,
        quant_type="nf4",
        compress_statistics=double_quant,
    )
    m.weight = bnb.nn.Params4bit(
        torch.randn(64, IN) / IN**0.5,
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=double_quant,
        module=m,
    )
    m = m.to("cpu")
    w_before, spec_before = dequantize_weight(m), quant_config_of(m)
    x = torch.randn(4, IN)
    m.eval()
    with torch.no_grad():
        y = m(x)
    repacked = bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
    logging.getLogger(__name__).info(
        "bitsandbytes repacked the layer for the CPU kernel: %s", repacked
    )
    pack = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if not repacked and pack is not None:
        # without AVX512-BF16 the forward keeps the standard layout: repack the way it does on CPUs
        # with it, so the packed reads below are tested on every machine (no forward after this:
        # the packed kernel itself needs AVX512-BF16)
        m.weight.data, _ = pack(m.weight.data, m.weight.quant_state)
        repacked = bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
        assert repacked
    # 4-bit codes are exact; only the bf16 cast of the unfolded block scales may move a weight, by
    # at most bf16's relative step (2^-8) of that weight
    w_after = dequantize_weight(m)
    torch.testing.assert_close(w_after, w_before, atol=1e-6, rtol=2**-8)
    assert quant_config_of(m) == spec_before
    # the CPU kernel rounds x and W to bf16 (relative 2^-9 each): |error| <= 2^-7 * (|x| @ |W|^T)
    bound = 2**-7 * (x.abs() @ w_after.abs().T) + 1e-6
    assert ((y - (x @ w_after.T + m.bias)).abs() <= bound).all()
    # reading did not undo the layer's fast layout
    assert bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) == repacked
    # re-quantizing a packed layer keeps its original settings
    requantize_weight_(m, w_after * 0.5)
    assert quant_config_of(m) == spec_before
    torch.testing.assert_close(dequantize_weight(m), w_after * 0.5, atol=1e-6, rtol=0.2)


def test_float_targets_give_the_dequantized_models_gradients(tiny_checkpoint):
    from loralab.core.gradients import estimate_gradients_from_step
    from loralab.core.quant import float_targets

    model = _load_quantized(
        tiny_checkpoint,
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
    )
    ref = dequantized_copy(model)
    names = [n for n in quantized_layer_names(model) if n.endswith(("q_proj", "down_proj"))]
    q_before = {n: model.get_submodule(n) for n in names}
    batches = make_lm_batches(2)
    want = estimate_gradients(ref, batches, names, train=True, progress=False)
    with float_targets(model, names) as swapped:
        assert sorted(swapped) == sorted(names)
        # float nn.Linear layers (loralab adapts them as "linear"), not the bitsandbytes ones
        assert all(
            isinstance(model.get_submodule(n), nn.Linear)
            and find_targets(model, [n])[n].kind == "linear"
            for n in names
        )

        def train_step():
            for b in batches:
                model(**b).loss.backward()

        got = estimate_gradients_from_step(model, train_step, names)
    for n in names:
        assert model.get_submodule(n) is q_before[n]  # the quantized layers are back, unchanged
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)
