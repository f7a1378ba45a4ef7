"""FSDP2 (``fully_shard``, 2 CPU ranks, gloo): the same parameters as one process on the whole batch."""

from pathlib import Path

import pytest
import torch

from loralab.core.testing import run_torchrun
from loralab.lora_pro import LoraProAdamW

WORKER = Path(__file__).with_name("lora_pro_fsdp_worker.py")
STEPS, MICRO, LR, WD = 3, 4, 1e-2, 0.1  # as in the worker
TOL = 1e-10  # float64: the data-parallel mean and the row-shard sums change only the rounding


def _one_process(lp, mode):
    b0 = lp.toy_batches(STEPS, batch=MICRO, seed=10)
    b1 = lp.toy_batches(STEPS, batch=MICRO, seed=11)
    model = lp.toy_peft(0)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = LoraProAdamW(model, lr=LR, weight_decay=WD, mode=mode)
    for x, y in zip(b0, b1):
        opt.zero_grad()
        model(**{k: torch.cat([x[k], y[k]]) for k in x}).backward()
        opt.step()
    state = sum(t.numel() for st in opt.state.values() for k, t in st.items() if k != "step")
    return init, {n: p.detach() for n, p in model.named_parameters()}, state


@pytest.mark.multiprocess
def test_fsdp2_efficient_and_full_mode_equal_one_process(lp, tmp_path):
    prefix = tmp_path / "run"
    run_torchrun(WORKER, prefix, timeout=600)
    ranks = [torch.load(f"{prefix}.{r}.pt", weights_only=True) for r in (0, 1)]
    for mode in ("efficient", "full"):
        init, ref, state = _one_process(lp, mode)
        moved = [n for n in ref if not torch.equal(ref[n], init[n])]
        # LoRA factors, the head and (full mode's effective weight decay) the base weights
        assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)
        assert any("base_layer" in n for n in moved) == (mode == "full")
        for out in ranks:
            got = out[mode]
            for n in ref:
                err = ((got[n] - ref[n]).norm() / (ref[n] - init[n]).norm().clamp_min(1e-30)).item()
                assert err < TOL or torch.equal(got[n], ref[n]), (mode, n, err)
        # each rank keeps the optimizer state of its own rows only: the two halves add up to one process
        assert sum(int(out[mode]["state_numel"]) for out in ranks) == state
