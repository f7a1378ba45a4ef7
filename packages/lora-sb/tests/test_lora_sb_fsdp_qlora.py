"""FSDP-QLoRA with LoRA-SB (2 CPU ranks, gloo): an NF4 base stored as bfloat16 codes, the init estimated
on a float copy streamed block by block (``offload=True``), the quantized ``PeftModel`` sharded with
FSDP2, then ``R`` trains.

Every rank ends with the one-process init (``B``, ``R``, ``A``), the training losses and the trained
``R`` equal one process on the global batch, and each error is raised on every rank before training,
naming what to do. One launch runs every mode (``lora_sb_fsdp_qlora_worker.py``).
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from loralab.core.testing import run_torchrun, save_tiny, tiny_llama

pytest.importorskip("bitsandbytes")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


q = _load("lora_sb_fsdp_qlora_worker")
w = q.w
WORKER = Path(__file__).with_name("lora_sb_fsdp_qlora_worker.py")

INIT_RTOL = 1e-5  # same gradients up to the reduction order (float32), as test_lora_sb_fsdp
LOSS_RTOL = 1e-5
TRAIN_RTOL = 1e-4  # relative to the size of R's change over the steps, as test_lora_sb_fsdp


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny(tiny_llama(), tmp_path_factory.mktemp("tiny_llama"), tokenizer=False)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, checkpoint):
    prefix = tmp_path_factory.mktemp("lora_sb_fsdp_qlora") / "run"
    run_torchrun(WORKER, prefix, checkpoint, timeout=900)
    return [torch.load(f"{prefix}.{r}.pt", weights_only=True) for r in (0, 1)]


def _cat(a, b):
    return [{k: torch.cat([x[k], y[k]]) for k in x} for x, y in zip(a, b)]


def _delta(f, layer):  # scaling is 1 (alpha = r)
    return f[f"{layer}.lora_B"] @ f[f"{layer}.lora_R"] @ f[f"{layer}.lora_A"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp_qlora_init_and_training_equal_one_process_on_every_rank(ranks, checkpoint):
    r0, r1 = ranks
    assert bool(r0["sharded_nf4"].all()) and bool(r1["sharded_nf4"].all())
    model = q.build(checkpoint, w.init_batches(0) + w.init_batches(1))
    ref = w.factors(model)
    layers = sorted({k.rsplit(".", 1)[0] for k in ref})
    assert len(layers) == 2 * len(w.TARGETS)
    assert r0["init"].keys() == r1["init"].keys() == ref.keys()
    for k in ref:  # identical on every rank: the same gathered gradient, the same seeded SVD
        assert torch.equal(r0["init"][k], r1["init"][k]), k
    for layer in layers:
        got, want = _delta(r0["init"], layer), _delta(ref, layer)
        assert (got - want).norm() <= INIT_RTOL * want.norm(), layer
    losses = q.train(model, _cat(w.train_batches(0), w.train_batches(1)))
    # FSDP2 averages the two micro-batches' gradients: the mean loss is one process's loss
    torch.testing.assert_close((r0["losses"] + r1["losses"]) / 2, losses, rtol=LOSS_RTOL, atol=0)
    final = w.final_r(model)
    init_r = {k: v for k, v in ref.items() if k.endswith("lora_R")}
    for out in ranks:
        for k in final:
            err = (out["final"][k] - final[k]).norm() / (final[k] - init_r[k]).norm()
            assert err < TRAIN_RTOL, (k, err.item())


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
            "(Linear4bit) stores its 4-bit codes as torch.bfloat16"
        )
        assert "BitsAndBytesConfig(bnb_4bit_quant_storage=torch.float16)" in msg
