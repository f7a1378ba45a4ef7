"""FSDP2 (``fully_shard``, 2 CPU ranks, gloo): the same parameters as one process on the whole batch."""

import sys
from pathlib import Path

import pytest
import torch

from loralab.core.testing import run_torchrun
from loralab.lora_fa import create_lorafa_optimizer

sys.path.insert(0, str(Path(__file__).parent))
from lora_fa_dist_worker import ALPHA, LR, MICRO, RANK, WD, toy_batches, toy_peft

WORKER = Path(__file__).with_name("lora_fa_fsdp_worker.py")
STEPS = 3  # as in the worker
TOL = 1e-10  # float64: the data-parallel mean changes only the rounding


@pytest.mark.multiprocess
def test_fsdp2_equals_one_process_and_correct_in_backward_is_refused(tmp_path):
    prefix = tmp_path / "run"
    run_torchrun(WORKER, prefix, timeout=600)
    ranks = [torch.load(f"{prefix}.{r}.pt", weights_only=True) for r in (0, 1)]

    model = toy_peft(0).double()
    opt = create_lorafa_optimizer(model, RANK, ALPHA, LR, weight_decay=WD)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    for x, y in zip(toy_batches(STEPS, MICRO, seed=10), toy_batches(STEPS, MICRO, seed=11)):
        model(**{k: torch.cat([x[k], y[k]]).double() for k in x}).backward()
        opt.step()
        opt.zero_grad()
    ref = {n: p.detach() for n, p in model.named_parameters()}
    state = sum(t.numel() for st in opt.state.values() for k, t in st.items() if k != "step")
    assert any("lora_B" in n and not torch.equal(ref[n], init[n]) for n in ref)
    for out in ranks:
        for n in ref:
            err = ((out[n] - ref[n]).norm() / (ref[n] - init[n]).norm().clamp_min(1e-30)).item()
            assert err < TOL or torch.equal(out[n], ref[n]), (n, err)
        assert "correct_in_backward=True" in out["error"] and "fully_shard" in out["error"]
    # each rank keeps the optimizer state of its own rows only
    assert sum(int(out["state_numel"]) for out in ranks) == state
