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
def test_ddp_accelerate_and_deepspeed_zero1_zero2_zero3_equal_one_process(lp, tmp_path):
    pytest.importorskip("deepspeed")
    prefix = tmp_path / "run"
    run_torchrun(WORKER, prefix, timeout=900)
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
        for engine in ("ddp", "accelerate", "zero1", "zero2", "zero2_attached", "zero3"):
            assert set(out[engine]) == set(ref), engine
            # round-off of the gradient averaging only: exact LoRA-Pro on the gathered layers
            assert _rel(out[engine], ref, init) < 1e-5, engine
        errors = out["errors"]
        for name in ("full_zero2", "full_zero3"):
            assert errors[name].startswith("NotImplementedError"), errors[name]
            assert "mode='full'" in errors[name] and "mode='efficient'" in errors[name]


def test_replaced_parameters_of_unknown_layout_raise_instead_of_training_plain_lora(lp):
    from loralab.core.zero_views import ZeroLayoutError

    model = lp.toy_peft(0, dtype=torch.float32)
    opt = LoraProAdamW(model, lr=LR)
    flat = torch.zeros(10, requires_grad=True)  # a flat tensor, but the parameters are not its views
    flat.grad = torch.ones(10)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(ZeroLayoutError, match="not views of one flat buffer"):
        opt.step()
    assert torch.equal(flat, torch.zeros(10))


def test_attach_deepspeed_is_optional_and_rejects_other_objects(lp):
    opt = LoraProAdamW(lp.toy_peft(0, dtype=torch.float32), lr=LR)
    with pytest.raises(TypeError, match=r"deepspeed\.initialize"):
        opt.attach_deepspeed(object())

    class Engine:  # what deepspeed.initialize returns: .optimizer is the ZeRO optimizer wrapping ours
        pass

    engine, zero = Engine(), Engine()
    engine.optimizer, zero.optimizer = zero, opt
    assert opt.attach_deepspeed(engine) is opt
    assert opt.attach_deepspeed(zero) is opt
