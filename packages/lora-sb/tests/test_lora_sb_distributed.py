"""LoRA-SB with 2 CPU ranks (gloo): accelerate (DDP), DeepSpeed ZeRO-2 (deepspeed.initialize), HF Trainer +
ZeRO-2, and DeepSpeed ZeRO-3 (the model partitioned by ``deepspeed.zero.Init`` before the init).

Each rank estimates the init on its own batches; loralab.core all-reduces the gradients, so every rank
must build the same factors, equal to a single process's init from the concatenated batches. Training
``R`` on per-rank micro-batches must then equal one process training on the global batch.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from loralab.core.testing import run_accelerate

WORKER = Path(__file__).with_name("lora_sb_dist_worker.py")
_spec = importlib.util.spec_from_file_location("lora_sb_dist_worker", WORKER)
w = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(w)

INIT_RTOL = 1e-5  # same gradients up to the all-reduce's summation order (float32)
TRAIN_RTOL = 1e-4  # relative to the size of R's change over the steps


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One 2-rank launch (accelerate's torchrun path) running every mode; returns ``load(mode)``."""
    pytest.importorskip("deepspeed")
    prefix = tmp_path_factory.mktemp("lora_sb_dist") / "run"
    # run_accelerate uses --multi_gpu, accelerate's torchrun launcher; Accelerator(cpu=True) in the
    # worker makes it multi-CPU with gloo (accelerate's --cpu multi-process launcher goes through mpirun).
    run_accelerate(WORKER, prefix, timeout=900)
    return lambda mode: [torch.load(f"{prefix}.{mode}.{r}.pt", weights_only=True) for r in (0, 1)]


def _cat(a, b):
    return [{k: torch.cat([x[k], y[k]]) for k in x} for x, y in zip(a, b)]


@pytest.fixture(scope="module")
def single_process():
    """One process: init from the concatenated init batches, train on the concatenated (global) batches."""

    def train(batches):
        model = w.build(_cat(w.init_batches(0), w.init_batches(1)))
        opt = w.make_optimizer(model)
        model.train()
        for batch in batches:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        return w.final_r(model)

    model = w.build(_cat(w.init_batches(0), w.init_batches(1)))
    return {
        "init": w.factors(model),
        "global": train(_cat(w.train_batches(0), w.train_batches(1))),
        # what training without gradient averaging would give
        "rank0_only": train(w.train_batches(0)),
    }


def _delta(f, layer):
    # scaling is 1 (alpha = r)
    return f[f"{layer}.lora_B"] @ f[f"{layer}.lora_R"] @ f[f"{layer}.lora_A"]


def _rel_change(got, ref, init):
    return max(((got[k] - ref[k]).norm() / (ref[k] - init[k]).norm()).item() for k in ref)


def _check(ranks, ref):
    r0, r1 = ranks
    layers = sorted({k.rsplit(".", 1)[0] for k in ref["init"]})
    assert len(layers) == 2 * len(w.TARGETS)
    # identical init on every rank (same all-reduced gradients, same local generator)
    assert r0["init"].keys() == r1["init"].keys() == ref["init"].keys()
    for k in r0["init"]:
        assert torch.equal(r0["init"][k], r1["init"][k]), k
    # ... equal to the single-process init from the concatenated batches
    for layer in layers:
        got, want = _delta(r0["init"], layer), _delta(ref["init"], layer)
        assert (got - want).norm() <= INIT_RTOL * want.norm(), layer
    # training steps equal one process on the global batch (and not one rank's batch alone)
    init_r = {k: v for k, v in ref["init"].items() if k.endswith("lora_R")}
    assert _rel_change(ref["rank0_only"], ref["global"], init_r) > 0.05
    for out in ranks:
        assert _rel_change(out["final"], ref["global"], init_r) < TRAIN_RTOL


@pytest.mark.multiprocess
def test_accelerate_two_cpu_processes(launched, single_process):
    _check(launched("accelerate"), single_process)


@pytest.mark.multiprocess
def test_deepspeed_zero2_two_ranks(launched, single_process):
    _check(launched("zero2"), single_process)


@pytest.mark.multiprocess
def test_hf_trainer_with_deepspeed_zero2_two_ranks(launched, single_process):
    _check(launched("trainer_zero2"), single_process)


@pytest.mark.multiprocess
def test_deepspeed_zero3_partitioned_base_two_ranks(launched, single_process):
    # the base model partitioned by zero.Init, then get_lora_sb_model, then stage-3 training
    ranks = launched("zero3")
    for out in ranks:
        assert out["base_partitioned"] and out["base_partitioned_after_init"]
        _check_gathered(out["gathered"])
    _check(ranks, single_process)


@pytest.mark.multiprocess
def test_deepspeed_zero3_factors_written_into_partitioned_parameters(launched, single_process):
    # the whole PeftModel partitioned (A, B, R too), then initialize_lora_sb_weights writes into it
    ranks = launched("zero3_peft")
    for out in ranks:
        assert out["factors_partitioned"] and out["factors_partitioned_after_init"]
        _check_gathered(out["gathered"])
    _check(ranks, single_process)


def _check_gathered(seen):
    # counted at every GatheredParameters entry: at most the largest block plus the embeddings, final
    # norm and head, never the whole model (the init's writes gather one layer)
    assert seen["gathers"] > 0 and 0 < seen["peak"] <= seen["bound"] < seen["total"], seen


@pytest.mark.multiprocess
def test_deepspeed_zero3_offload_equals_plain_and_hooked_model_is_refused(launched):
    for out in launched("zero3_peft"):
        # the same block-wise estimate with the boundary states on the CPU: the same init
        layers = sorted({k.rsplit(".", 1)[0] for k in out["init"]})
        for layer in layers:
            got, want = _delta(out["offload_init"], layer), _delta(out["init"], layer)
            assert (got - want).norm() <= INIT_RTOL * want.norm(), layer
        assert out["engine_error"].startswith(
            "TypeError: the gradient estimate got a model whose modules deepspeed.initialize has hooked"
        )
        assert "before deepspeed.initialize" in out["engine_error"]
