"""LoRA-SB under FSDP2 (``fully_shard``, 2 CPU ranks, gloo): ``get_lora_sb_model(..., shard=...)``
initialises the sharded model (each rank writes its rows of ``B``, ``R``, ``A``), every rank equal to
one process initialising from the concatenated batches; training ``R`` then equals one process on the
global batch; a target that gets no gradient raises an error naming it on every rank.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from loralab.core.testing import run_torchrun


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


w = _load("lora_sb_dist_worker")
WORKER = Path(__file__).with_name("lora_sb_fsdp_worker.py")

INIT_RTOL = 1e-5  # same gradients up to the reduction order (float32), as under DDP
TRAIN_RTOL = 1e-4  # relative to the size of R's change over the steps


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("lora_sb_fsdp") / "run"
    run_torchrun(WORKER, prefix, timeout=600)
    return [torch.load(f"{prefix}.{r}.pt", weights_only=True) for r in (0, 1)]


def _cat(a, b):
    return [{k: torch.cat([x[k], y[k]]) for k in x} for x, y in zip(a, b)]


def _delta(f, layer):
    # scaling is 1 (alpha = r)
    return f[f"{layer}.lora_B"] @ f[f"{layer}.lora_R"] @ f[f"{layer}.lora_A"]


@pytest.mark.multiprocess
def test_fsdp2_init_and_training_equal_one_process_on_every_rank(ranks):
    r0, r1 = ranks
    assert bool(r0["sharded"]) and bool(r1["sharded"])
    model = w.build(_cat(w.init_batches(0), w.init_batches(1)))
    ref = w.factors(model)
    layers = sorted({k.rsplit(".", 1)[0] for k in ref})
    assert len(layers) == 2 * len(w.TARGETS)
    assert r0["init"].keys() == r1["init"].keys() == ref.keys()
    for k in ref:  # identical on every rank: the same gathered gradient, the same seeded SVD
        assert torch.equal(r0["init"][k], r1["init"][k]), k
    for layer in layers:
        got, want = _delta(r0["init"], layer), _delta(ref, layer)
        assert (got - want).norm() <= INIT_RTOL * want.norm(), layer
    opt = w.make_optimizer(model)
    model.train()
    for batch in _cat(w.train_batches(0), w.train_batches(1)):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    final = w.final_r(model)
    init_r = {k: v for k, v in ref.items() if k.endswith("lora_R")}
    for out in ranks:
        err = max(
            ((out["final"][k] - final[k]).norm() / (final[k] - init_r[k]).norm()).item()
            for k in final
        )
        assert err < TRAIN_RTOL, err


@pytest.mark.multiprocess
def test_fsdp2_target_without_gradient_raises_naming_it_on_every_rank(ranks):
    for out in ranks:
        msg = out["unused_error"]
        assert msg.startswith("GradientEstimationError: 1 target layer(s) received no gradient")
        assert "base_model.model.model.layers.0.spare" in msg and "FSDP2" in msg
