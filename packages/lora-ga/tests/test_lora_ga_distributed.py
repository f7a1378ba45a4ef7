"""LoRA-GA's seed flow with 2 CPU ranks (gloo): accelerate, core offload, torchrun, DeepSpeed ZeRO-3
(``zero.Init`` and transformers' ZeRO-3 loading), the native API on a ZeRO-3 partitioned model, and the
``preprocess_loraga`` drop-in for PEFT's flow (plain and ZeRO-3 partitioned).

Each rank estimates on its own half of the batches; the gradients are averaged across ranks, so every
rank must initialise identically (A, B and the offset W0 bit for bit), and equal to one process
initialising from all the batches. One launch runs every mode (process start-up dominates the time);
see ``lora_ga_dist_worker.py``.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from loralab.core.testing import run_accelerate, save_tiny, tiny_llama
from loralab.lora_ga import get_lora_ga_model

WORKER = Path(__file__).with_name("lora_ga_dist_worker.py")
_spec = importlib.util.spec_from_file_location("lora_ga_dist_worker", WORKER)
w = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(w)

# mean of per-rank means vs one mean over all batches: the same gradient up to float32 rounding
# (~1e-7), which the SVD amplifies by 1/(singular-value gap) in the factors: measured 1.2e-5.
INIT_RTOL = 1e-4
MODES = ("accelerate", "offload", "torchrun", "zero3", "hf_zero3", "native_zero3")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """One 2-rank launch (accelerate's torchrun path, ``Accelerator(cpu=True)`` = gloo); both ranks' results."""
    pytest.importorskip("deepspeed")
    tmp = tmp_path_factory.mktemp("lora_ga_dist")
    prefix = tmp / "run"
    # for the transformers ZeRO-3 loading mode
    checkpoint = save_tiny(tiny_llama(), tmp / "ckpt", tokenizer=False)
    run_accelerate(WORKER, prefix, checkpoint, timeout=900)
    return [torch.load(f"{prefix}.{r}.pt", weights_only=True) for r in (0, 1)]


def _rel(got, want):
    return max(((x - y).norm() / y.norm()).item() for k in want for x, y in zip(got[k], want[k]))


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", MODES)
def test_every_rank_initialises_like_one_process_on_all_batches(ranks, mode):
    r0, r1 = ranks[0][mode], ranks[1][mode]
    assert r0.keys() == r1.keys() and len(r0) == 2 * len(w.TARGETS)
    for name in r0:  # identical on every rank: same all-reduced gradient, same deterministic SVD
        for x, y, what in zip(r0[name], r1[name], ("A", "B", "W0")):
            assert torch.equal(x, y), f"{mode} {name}: {what} differs between ranks"
    single = w.init_state(
        get_lora_ga_model(tiny_llama(), w.config(), list(w.loader()), progress=False)
    )
    assert _rel(r0, single) < INIT_RTOL
    # the reduction matters: rank 0's batches alone give another init
    alone = w.init_state(
        get_lora_ga_model(tiny_llama(), w.config(), w.rank_batches(0), progress=False)
    )
    assert _rel(alone, single) > 100 * INIT_RTOL


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["peft_flow", "peft_flow_zero3", "peft_flow_zero3_weight_svd"])
def test_peft_flow_drop_in_initialises_every_rank_like_one_process(ranks, mode):
    # PEFT's own preprocess_loraga would keep each rank's gradient; the drop-in all-reduces it (and
    # on a ZeRO-3 partitioned model fetches each module while train_step, the caller's loop, runs)
    scale = "weight_svd" if mode.endswith("weight_svd") else "stable"
    r0, r1 = ranks[0][mode], ranks[1][mode]
    assert r0.keys() == r1.keys() and len(r0) == 2 * len(w.TARGETS)
    for name in r0:
        for x, y, what in zip(r0[name], r1[name], ("A", "B", "W0")):
            assert torch.equal(x, y), f"{name}: {what} differs between ranks"
    single = w.init_state(w.peft_flow(tiny_llama(), list(w.loader()), scale=scale))
    assert _rel(r0, single) < INIT_RTOL
    alone = w.init_state(w.peft_flow(tiny_llama(), w.rank_batches(0), scale=scale))
    assert _rel(alone, single) > 100 * INIT_RTOL


@pytest.mark.multiprocess
def test_peft_flow_on_zero3_never_gathers_more_than_one_module(ranks):
    # counted at every GatheredParameters entry while train_step (the caller's loop) and
    # get_peft_model run: the largest single parameter (the embeddings or the head) at most
    largest = max(p.numel() for p in tiny_llama().parameters())
    for out in ranks:
        seen = out["peft_flow_zero3_gathered"]
        assert seen["gathers"] > 0 and 0 < seen["peak"] <= largest < seen["total"], seen


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["native_zero3", "hf_zero3"])
def test_zero3_estimate_never_gathers_more_than_one_block(ranks, mode):
    # counted at every GatheredParameters entry: at most the largest block plus the embeddings, final
    # norm and head, never the whole model (the init's writes gather one layer)
    for out in ranks:
        seen = out[f"{mode}_gathered"]
        assert seen["gathers"] > 0 and 0 < seen["peak"] <= seen["bound"] < seen["total"], seen


@pytest.mark.multiprocess
def test_zero3_estimate_with_uneven_batches_raises_on_every_rank(ranks):
    for out in ranks:
        assert out["uneven_error"].startswith(
            "GradientEstimationError: DeepSpeed ZeRO-3: this rank has"
        ), out["uneven_error"]
        assert "every rank needs the same number of batches" in out["uneven_error"]


@pytest.mark.multiprocess
def test_modes_agree_and_deepspeed_engine_is_refused(ranks):
    out = ranks[0]
    for mode in MODES[1:]:
        assert _rel(out[mode], out["accelerate"]) < INIT_RTOL, mode
    assert out["engine_error"].startswith(
        "TypeError: estimate_gradient got a model already wrapped by deepspeed.initialize"
    )
    assert "before deepspeed.initialize" in out["engine_error"]
