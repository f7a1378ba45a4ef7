"""Init options: block-wise offloaded estimation, a separate estimation model, num_batches, the seed's
quantized path and TensorBoard writer, and the missing-gradient errors of both faces."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loralab.core import estimate_gradients
from loralab.core.gradients import GradientEstimationError
from loralab.core.testing import make_lm_batches, tiny_llama
from loralab.lora_sb import (
    LoraSBConfig,
    LoraSBInitError,
    estimate_and_process_grads_torch,
    find_and_initialize_grad,
    get_lora_sb_model,
    initialize_from_updates_,
    lora_sb_layers,
    update_approximation,
)

RANK = 4
LR = 2e-4
TARGETS = ["q_proj", "v_proj", "down_proj"]
RTOL = 1e-4  # float32 round-off of the same gradients summed in another order


def _batches(n=2, seed=3):
    return make_lm_batches(n, seed=seed)


def _deltas(model):
    return {
        n: layer.get_delta_weight("default").double() for n, layer in lora_sb_layers(model).items()
    }


def _assert_same_init(a, b):
    da, db = _deltas(a), _deltas(b)
    assert da.keys() == db.keys() and da
    for name in da:
        assert (da[name] - db[name]).norm() <= RTOL * db[name].norm(), name


@pytest.fixture(scope="module")
def plain():
    return get_lora_sb_model(
        tiny_llama(),
        LoraSBConfig(r=RANK, target_modules=TARGETS),
        _batches(),
        lr=LR,
        progress=False,
    )


def test_offloaded_estimation_gives_the_same_init(plain):
    model = get_lora_sb_model(
        tiny_llama(),
        LoraSBConfig(r=RANK, target_modules=TARGETS),
        _batches(),
        lr=LR,
        offload=True,
        progress=False,
    )
    _assert_same_init(model, plain)


def test_estimation_model_and_num_batches(plain):
    # a separate float model of the same architecture (e.g. the float checkpoint of a 4-bit model)
    model = get_lora_sb_model(
        tiny_llama(),
        LoraSBConfig(r=RANK, target_modules=TARGETS),
        _batches(),
        lr=LR,
        estimation_model=tiny_llama(),
        progress=False,
    )
    _assert_same_init(model, plain)
    # num_batches=2 of 5 batches == the first 2 batches
    model = get_lora_sb_model(
        tiny_llama(),
        LoraSBConfig(r=RANK, target_modules=TARGETS),
        _batches(2) + _batches(3, seed=4),
        lr=LR,
        num_batches=2,
        progress=False,
    )
    _assert_same_init(model, plain)
    with pytest.raises(
        GradientEstimationError,
        match=r"estimation_model has no module 'model\.layers\.0\.self_attn\.q_proj'",
    ):
        get_lora_sb_model(
            tiny_llama(),
            LoraSBConfig(r=RANK, target_modules=TARGETS),
            _batches(),
            lr=LR,
            estimation_model=torch.nn.Linear(2, 2),
            progress=False,
        )


def test_missing_gradient_is_an_error_naming_the_layer():
    # the loss never reaches layer 1: core's estimator refuses, naming the layers
    def loss_fn(model, batch):
        inner = model.base_model.model if hasattr(model, "base_model") else model
        h = inner.model.embed_tokens(batch["input_ids"])
        return inner.model.layers[0].self_attn.q_proj(h).pow(2).mean()

    with pytest.raises(
        GradientEstimationError, match=r"received no gradient.*model\.layers\.1\.self_attn\.q_proj"
    ):
        get_lora_sb_model(
            tiny_llama(),
            LoraSBConfig(r=RANK, target_modules=["q_proj"]),
            _batches(),
            lr=LR,
            loss_fn=loss_fn,
            progress=False,
        )
    # updates given by hand: every target needs one, and the shapes must match
    model = get_peft_model(
        tiny_llama(), LoraSBConfig(r=RANK, target_modules=["q_proj"], sb_init="random")
    )
    with pytest.raises(
        LoraSBInitError,
        match=r"no gradient/update for 1 LoRA-SB target.*model\.layers\.1\.self_attn\.q_proj",
    ):
        initialize_from_updates_(model, {"model.layers.0.self_attn.q_proj": torch.ones(64, 64)})
    with pytest.raises(
        LoraSBInitError,
        match=r"update for 'model\.layers\.0\.self_attn\.q_proj' has shape \(3, 3\)",
    ):
        initialize_from_updates_(model, {"model.layers.0.self_attn.q_proj": torch.ones(3, 3)})
    with pytest.raises(LoraSBInitError, match="NaN/Inf"):
        initialize_from_updates_(
            model, {"model.layers.0.self_attn.q_proj": torch.full((64, 64), float("nan"))}
        )


class _Writer:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = value


def test_seed_writer_logs_each_layers_approximation_error():
    model = tiny_llama()
    named_grads = estimate_and_process_grads_torch(
        model, _batches(), LR, num_samples=4, target_modules=["q_proj"], progress=False
    )
    model = get_peft_model(model, LoraConfig(r=RANK, target_modules=["q_proj"]))
    writer = _Writer()
    find_and_initialize_grad(
        model,
        model.peft_config,
        "default",
        "svd",
        {"svd": {"rank": RANK}},
        writer=writer,
        named_grads=named_grads,
    )
    assert set(writer.scalars) == {
        f"lora_sb_init/model.layers.{i}.self_attn.q_proj/relative_error" for i in (0, 1)
    }
    for name in lora_sb_layers(model):
        delta = named_grads[f"{name}.weight"].double()
        best = torch.linalg.svdvals(delta)[RANK:].square().sum().sqrt() / delta.norm()
        assert best <= writer.scalars[f"lora_sb_init/{name}/relative_error"] <= best * (1 + 1e-3)


def test_seed_quant_flag_estimates_on_the_dequantized_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loralab.core.quant import dequantized_copy
    from loralab.core.testing import save_tiny

    path = save_tiny(tiny_llama(), tmp_path / "tiny", tokenizer=False)
    qcfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    qmodel = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=qcfg, device_map="cpu", dtype=torch.float32
    )
    want = estimate_gradients(
        dequantized_copy(qmodel, dtype=torch.float32), _batches(), ["q_proj"], progress=False
    )

    def estimate():
        return estimate_and_process_grads_torch(
            qmodel,
            _batches(),
            LR,
            num_samples=4,
            quant_flag=True,
            origin_type="fp32",
            target_modules=["q_proj"],
            progress=False,
        )

    got = estimate()
    assert set(got) == {f"{n}.weight" for n in want}
    for name, g in want.items():  # fresh model: exactly the dequantized weights' estimate
        assert torch.equal(got[f"{name}.weight"], update_approximation(g, LR))
    # An inference forward makes bitsandbytes 0.50 repack its CPU weights, after which a plain dequantize reads
    # wrong values; core's dequantize_weight undoes the repacking and the estimate stays (up to the bf16 scales).
    with torch.no_grad():
        qmodel(**_batches(1, seed=8)[0])
    again = estimate()
    for key, value in got.items():
        assert (again[key] == value).float().mean() > 0.98, key
    with pytest.raises(ValueError, match="origin_type must be one of"):
        estimate_and_process_grads_torch(
            qmodel, _batches(), LR, quant_flag=True, origin_type="int8"
        )
