"""Data parallel and DeepSpeed (2 CPU ranks, gloo): same parameters as one process on the whole batch."""

from pathlib import Path

import pytest
import torch

from loralab.core.testing import as_zero12_partition, run_torchrun
from loralab.lora_pro import LoraProAdamW

WORKER = Path(__file__).with_name("lora_pro_dist_worker.py")
STEPS, MICRO, LR = 4, 4, 1e-2  # as in the worker


def _single_process(lp, opt_factory, frozen=False):
    """One process, each step on the concatenation of both ranks' micro-batches."""
    b0 = lp.toy_batches(STEPS, batch=MICRO, seed=10, dtype=torch.float32)
    b1 = lp.toy_batches(STEPS, batch=MICRO, seed=11, dtype=torch.float32)
    model = lp.toy_peft(0, dtype=torch.float32)
    keep = {n for n, p in model.named_parameters() if frozen or p.requires_grad}
    init = {n: p.detach().clone() for n, p in model.named_parameters() if n in keep}
    opt = opt_factory(model)
    for x, y in zip(b0, b1):
        opt.zero_grad()
        model(**{k: torch.cat([x[k], y[k]]) for k in x}).backward()
        opt.step()
    return init, {n: p.detach() for n, p in model.named_parameters() if n in keep}


def _rel(got, ref, init):
    return max(((got[n] - ref[n]).norm() / (ref[n] - init[n]).norm()).item() for n in ref)


@pytest.mark.multiprocess
def test_ddp_accelerate_deepspeed_zero1_to_3_and_cpu_offload_equal_one_process_both_modes(
    lp, tmp_path
):
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
        for engine in (
            *("ddp", "accelerate", "zero1", "zero2", "zero2_attached", "zero3", "zero3_offload"),
        ):
            assert set(out[engine]) == set(ref), engine
            # round-off of the gradient averaging only: exact LoRA-Pro on the gathered layers
            assert _rel(out[engine], ref, init) < 1e-5, engine
    init, ref = _single_process(
        lp, lambda m: LoraProAdamW(m, lr=LR, weight_decay=0.1, mode="full"), frozen=True
    )
    lora = {n for n in ref if "lora_" in n}
    for out in ranks:
        for engine in ("full_zero2", "full_zero3", "full_zero3_offload"):
            assert set(out[engine]) == set(ref), engine
            assert _rel({n: out[engine][n] for n in lora}, {n: ref[n] for n in lora}, init) < 1e-5
            for n in ref:  # the rest, frozen base weights included (decayed): absolute
                torch.testing.assert_close(out[engine][n], ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_replaced_parameters_of_unknown_layout_raise_instead_of_training_plain_lora(lp):
    from loralab.core.zero_views import ZeroLayoutError

    model = lp.toy_peft(0, dtype=torch.float32)
    opt = LoraProAdamW(model, lr=LR)
    flat = torch.zeros(
        10, requires_grad=True
    )  # a flat tensor, but the parameters are not its views
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


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_zero12_partition_in_one_process_equals_the_plain_step(lp, mode):
    """The ZeRO path (layers found in the flat partition, gathered, adjusted; full mode's m×n state
    on the owner rank) against the plain path, 3 steps; the real engines run in the multi-process
    test above."""
    batches = lp.toy_batches(3, batch=8, seed=5, dtype=torch.float64)
    out = []
    for zero in (False, True):
        model = lp.toy_peft(0, dtype=torch.float64)
        opt = LoraProAdamW(model, lr=LR, weight_decay=0.1, mode=mode)
        if zero:
            trainable = [p for p in model.parameters() if p.requires_grad]
            hand_gradient, copy_back = as_zero12_partition(opt, trainable)
        for b in batches:
            model(**b).backward()
            if zero:
                hand_gradient()
            opt.step()
            opt.zero_grad()
            if zero:
                copy_back()
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    plain, zero = out
    for n in plain:  # the frozen base weights too (full mode decays them)
        torch.testing.assert_close(zero[n], plain[n], rtol=1e-12, atol=1e-12, msg=n)
