"""DeepSpeed (2 CPU ranks, gloo, torchrun + deepspeed.initialize): the LoRA-FA client optimizer gives
the same parameters as one process on the whole batch under ZeRO-0/1/2/3 (correction in step, on the
gradients found in DeepSpeed's flat partitions) and ZeRO-2/3 with ``correct_in_backward=True``."""

import importlib.util
from pathlib import Path

import pytest
import torch

from loralab.core.testing import run_torchrun
from loralab.lora_fa import create_lorafa_optimizer

WORKER = Path(__file__).with_name("lora_fa_dist_worker.py")
TOL = 1e-5  # relative to the distance travelled: gradient-averaging round-off only (measured 2e-7 / 7e-7)


def _worker_module():
    spec = importlib.util.spec_from_file_location("lora_fa_dist_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _single_process(w, make_opt):
    """One process, each step on the concatenation of both ranks' micro-batches (same mean loss)."""
    b0, b1 = w.toy_batches(w.STEPS, w.MICRO, seed=10), w.toy_batches(w.STEPS, w.MICRO, seed=11)
    model = w.toy_peft(0)
    opt = make_opt(model)
    init = {n: p.detach().clone() for n, p in w.trainable(model).items()}
    for x, y in zip(b0, b1):
        model(**{k: torch.cat([x[k], y[k]]) for k in x}).backward()
        opt.step()
        opt.zero_grad()
    return init, {n: p.detach() for n, p in w.trainable(model).items()}


def _rel(got, ref, init):
    return max(
        ((got[n] - ref[n]).norm() / (ref[n] - init[n]).norm().clamp_min(1e-12)).item()
        for n in ref
        if "lora_A" not in n
    )


@pytest.mark.multiprocess
def test_deepspeed_zero0_to_3_and_cpu_offload_equal_one_process(tmp_path):
    pytest.importorskip("deepspeed")
    prefix = tmp_path / "run"
    run_torchrun(WORKER, prefix, timeout=900)
    ranks = [torch.load(f"{prefix}.{r}.pt", weights_only=True) for r in (0, 1)]

    w = _worker_module()
    init, ref = _single_process(
        w, lambda m: create_lorafa_optimizer(m, w.RANK, w.ALPHA, w.LR, weight_decay=w.WD)
    )
    _, plain = _single_process(
        w,
        lambda m: torch.optim.AdamW(
            [p for p in m.parameters() if p.requires_grad], lr=w.LR, weight_decay=w.WD, eps=1e-6
        ),
    )
    assert _rel(plain, ref, init) > 0.1  # plain LoRA (uncorrected B) would be caught
    for out in ranks:
        for run in (
            *("zero0", "zero1", "zero2", "zero3", "zero2_backward", "zero3_backward"),
            "zero3_offload",  # optimizer and parameters offloaded to the CPU
        ):
            assert set(out[run]) == set(ref), run
            for n in ref:
                if "lora_A" in n:  # A frozen and never touched
                    assert torch.equal(out[run][n], init[n]), (run, n)
            assert _rel(out[run], ref, init) < TOL, run
        assert out["errors"] == {}
