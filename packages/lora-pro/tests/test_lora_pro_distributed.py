"""Data parallel and DeepSpeed (2 CPU ranks, gloo): same parameters as one process on the whole batch."""

from pathlib import Path

import pytest
import torch

from loralab.core.testing import run_torchrun
from loralab.lora_pro import LoraProAdamW

WORKER = Path(__file__).with_name("lora_pro_dist_worker.py")
STEPS, MICRO, LR = 4, 4, 1e-2  # as in the worker


def _single_process(lp, opt_factory):
    """One process, each step on the concatenation of both ranks' micro-batches."""
    b0 = lp.toy_batches(STEPS, batch=MICRO, seed=10, dtype=torch.float32)
    b1 = lp.toy_batches(STEPS, batch=MICRO, seed=11, dtype=torch.float32)
    model = lp.toy_peft(0, dtype=torch.float32)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = opt_factory(model)
    for x, y in zip(b0, b1):
        opt.zero_grad()
        model(**{k: torch.cat([x[k], y[k]]) for k in x}).backward()
        opt.step()
    return init, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _rel(got, ref, init):
    return max(((got[n] - ref[n]).norm() / (ref[n] - init[n]).norm()).item() for n in ref)


@pytest.mark.multiprocess
def test_ddp_accelerate_and_deepspeed_zero1_zero2_equal_one_process_and_zero3_is_refused(
    lp, tmp_path
):
    pytest.importorskip("deepspeed")
    prefix = tmp_path / "run"
    run_torchrun(WORKER, prefix, timeout=600)
    ranks = [torch.load(f"{prefix}.{r}.pt", weights_only=True) for r in (0, 1)]

    init, ref = _single_process(lp, lambda m: LoraProAdamW(m, lr=LR, weight_decay=0.1))
    _, plain = _single_process(
        lp,
        lambda m: torch.optim.AdamW(
            [p for p in m.parameters() if p.requires_grad], lr=LR, weight_decay=0.1
        ),
    )
    assert _rel(plain, ref, init) > 0.1  # plain LoRA training would be caught below
    for out in ranks:
        assert set(out["ddp"]) == set(ref) == set(out["zero2"])
        assert _rel(out["ddp"], ref, init) < 1e-5  # round-off of the gradient averaging only
        assert _rel(out["accelerate"], ref, init) < 1e-5
        assert _rel(out["zero2"], ref, init) < 1e-5  # gathered per-layer gradients: exact LoRA-Pro
        assert _rel(out["zero1"], ref, init) < 1e-5
        errors = out["errors"]
        assert (
            errors["zero2_unattached"].startswith("RuntimeError")
            and "attach_deepspeed" in errors["zero2_unattached"]
        )
        assert errors["zero3"].startswith("NotImplementedError") and "ZeRO-3" in errors["zero3"]


def test_replaced_parameters_without_attach_raise_instead_of_training_plain_lora(lp):
    model = lp.toy_peft(0, dtype=torch.float32)
    opt = LoraProAdamW(model, lr=LR)
    flat = torch.zeros(10, requires_grad=True)  # what DeepSpeed ZeRO-1/2 puts in the group
    flat.grad = torch.ones(10)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="attach_deepspeed"):
        opt.step()
    assert torch.equal(flat, torch.zeros(10))


def test_attach_deepspeed_rejects_other_objects(lp):
    opt = LoraProAdamW(lp.toy_peft(0, dtype=torch.float32), lr=LR)
    with pytest.raises(TypeError, match=r"deepspeed\.initialize"):
        opt.attach_deepspeed(object())

    class DeepSpeedZeroOptimizer_Stage3:  # DeepSpeed's class name is what is checked
        pass

    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        opt.attach_deepspeed(DeepSpeedZeroOptimizer_Stage3())
