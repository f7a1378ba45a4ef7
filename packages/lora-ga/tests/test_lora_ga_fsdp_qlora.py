"""FSDP-QLoRA with LoRA-GA (2 CPU ranks, gloo): an NF4 base stored as float32 codes, the init estimated
on a float copy streamed block by block (``offload=True``), the quantized ``PeftModel`` sharded with
FSDP2, then training.

Every rank ends with the one-process init (``A``, ``B`` and the re-quantized ``W0 − s·B·A``: the same
NF4 codes and statistics), and the training losses equal one process on the global batch. Each error
is raised on every rank before training, naming what to do. One launch runs every mode
(``lora_ga_fsdp_qlora_worker.py``).
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from loralab.core.testing import run_torchrun, save_tiny, tiny_llama
from loralab.lora_ga import get_lora_ga_model

pytest.importorskip("bitsandbytes")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


w = _load("lora_ga_fsdp_qlora_worker")
WORKER = Path(__file__).with_name("lora_ga_fsdp_qlora_worker.py")

# The ranks' gradient is the all-reduced mean of two means, one process's the mean of four batches:
# equal up to float32 rounding (~1e-7), which the SVD amplifies in the factors (as test_lora_ga_fsdp)
INIT_RTOL = 1e-4
# W0 − s·B·A is re-quantized from factors that differ by that rounding: the block scales differ by as
# much, and an entry at a code boundary may round to the neighbouring NF4 code (measured: none do)
MAX_FLIPPED = 1e-3  # fraction of the packed code bytes that differ from one process's
LOSS_RTOL = 1e-5  # measured: equal to float32 precision
# A, B after 3 AdamW steps, relative to their change: Adam divides by sqrt(v), which amplifies the
# gradients' rounding on entries whose gradient is near zero (measured: at most 1.2e-3)
FINAL_RTOL = 1e-2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny(tiny_llama(), tmp_path_factory.mktemp("tiny_llama"), tokenizer=False)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, checkpoint):
    prefix = tmp_path_factory.mktemp("lora_ga_fsdp_qlora") / "run"
    run_torchrun(WORKER, prefix, checkpoint, timeout=900)
    return [torch.load(f"{prefix}.{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.fixture(scope="module")
def single(checkpoint):
    """One process: all four estimation batches, then the global batches."""
    batches = w.init_batches(0) + w.init_batches(1)
    model = get_lora_ga_model(
        w.load_quantized(checkpoint), w.config(), batches, estimation_model=w.float_copy(checkpoint),
        offload=True, progress=False,
    )  # fmt: skip
    init = w.state(model)
    steps = [
        {k: torch.cat([a[k], b[k]]) for k in a}
        for a, b in zip(w.train_batches(0), w.train_batches(1))
    ]
    losses = w.train(model, steps)
    return init, losses, {k: v[:2] for k, v in w.state(model).items()}


def _bytes(t):  # float-stored NF4 codes hold NaN bit patterns: compare them as bytes
    return t.contiguous().view(torch.uint8)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp_qlora_init_and_training_equal_one_process_on_every_rank(ranks, single):
    r0, r1 = ranks
    init, losses, final = single
    assert bool(r0["sharded_nf4"].all()) and bool(r1["sharded_nf4"].all())
    assert r0["init"].keys() == r1["init"].keys() == init.keys()
    assert len(init) == 2 * len(w.TARGETS)
    for name in init:
        (A0, B0, W0, C0), (A1, B1, W1, C1) = r0["init"][name], r1["init"][name]
        # identical on every rank: the same gradients, the same SVD, the same re-quantization
        assert torch.equal(A0, A1) and torch.equal(B0, B1) and torch.equal(W0, W1), name
        assert torch.equal(_bytes(C0), _bytes(C1)), name
        A, B, W, C = init[name]
        assert (A0 - A).norm() <= INIT_RTOL * A.norm(), name
        assert (B0 - B).norm() <= INIT_RTOL * B.norm(), name
        assert (W0 - W).norm() <= INIT_RTOL * W.norm(), name
        flipped = (_bytes(C0) != _bytes(C)).float().mean().item()
        assert flipped <= MAX_FLIPPED, (name, flipped)
    # FSDP2 averages the two micro-batches' gradients: the mean loss is one process's loss
    torch.testing.assert_close((r0["losses"] + r1["losses"]) / 2, losses, rtol=LOSS_RTOL, atol=0)
    for name in final:
        for x, y, y0 in zip(r0["final"][name], final[name], init[name][:2]):
            assert (x - y).norm() <= FINAL_RTOL * (y - y0).norm(), name


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp_qlora_offset_is_the_requantized_w0_minus_sba(ranks, checkpoint):
    from loralab.core.quant import dequantize_weight

    quantized = w.load_quantized(checkpoint)
    s = w.ALPHA / w.RANK_R**0.5  # rsLoRA
    for name, (A, B, W0, _) in ranks[0]["init"].items():
        w0 = dequantize_weight(quantized.get_submodule(name))
        delta = -s * (B.double() @ A.double())
        err = ((W0.double() - w0.double()) - delta).norm() / delta.norm()
        # the NF4 rounding of W0 − s·B·A, relative to an offset here larger than W0 itself
        # (measured: 0.09 to 0.11); a lost offset or a wrong sign gives err >= 1
        assert err < 0.2, (name, err.item())


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp_qlora_errors_are_raised_on_every_rank_before_training(ranks):
    for out in ranks:
        msg = out["unused_error"]
        assert msg.startswith("GradientEstimationError: 1 target layer(s) received no gradient")
        assert "model.layers.0.spare" in msg
        msg = out["no_float_error"]
        assert msg.startswith("GradientEstimationError: ")
        assert (
            "quantized target layer(s) of an FSDP2-sharded model" in msg
            and "need a float copy" in msg
        )
        assert "estimation_model=loralab.core.quant.load_float_model_for_estimation" in msg
        msg = out["cast_error"]
        assert msg.startswith(
            "QuantizationError: base_model.model.model.layers.0.self_attn.q_proj.base_layer "
            "(Linear4bit) stores its 4-bit codes as torch.float32"
        )
        assert "BitsAndBytesConfig(bnb_4bit_quant_storage=torch.bfloat16)" in msg
