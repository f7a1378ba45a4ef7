"""Run by test_lora_pro_distributed.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

Each rank trains the toy LoRA model on its own half of every batch with ``LoraProAdamW`` (efficient
mode, LoRA layers + a plain-AdamW head) several ways, and writes its parameters: ``ddp`` (DDP),
``accelerate`` (``Accelerator.prepare``),
``zero1`` / ``zero2`` / ``zero3`` (DeepSpeed ZeRO-1 / 2 / 3: the optimizer finds its layers in the
flat partitions itself), ``zero2_attached`` (the optional ``attach_deepspeed`` call of older code) and ``full_zero2`` /
``full_zero3`` (``mode="full"``, every parameter); ``zero3_offload`` / ``full_zero3_offload``: ZeRO-3
with the optimizer and the parameters offloaded to the CPU.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from conftest import toy_batches, toy_peft

from loralab.core.distributed import end_process_group
from loralab.lora_pro import LoraProAdamW

STEPS, MICRO = 4, 4
LR = 1e-2


def ds_config(stage, offload=False):
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if offload:  # CPU offload of the optimizer state and the parameters; keep our optimizer
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        config["zero_optimization"]["offload_param"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def main(prefix: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    batches = toy_batches(STEPS, batch=MICRO, seed=10 + rank, dtype=torch.float32)
    out = {}

    model = toy_peft(0, dtype=torch.float32)
    opt = LoraProAdamW(model, lr=LR, weight_decay=0.1)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    for b in batches:
        opt.zero_grad()
        ddp(**b).backward()
        opt.step()
    out["ddp"] = params(model)

    # accelerate in the same launch (it reads torchrun's environment): DDP wrapper + AcceleratedOptimizer
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = toy_peft(0, dtype=torch.float32)
    wrapped, aopt = accelerator.prepare(model, LoraProAdamW(model, lr=LR, weight_decay=0.1))
    for b in batches:
        aopt.zero_grad()
        accelerator.backward(wrapped(**b))
        aopt.step()
    out["accelerate"] = params(model)

    for name, stage, attach in (
        ("zero1", 1, False),
        ("zero2", 2, False),
        ("zero2_attached", 2, True),
        ("zero3", 3, False),
        ("zero3_offload", 3, False),
    ):
        model = toy_peft(0, dtype=torch.float32)
        opt = LoraProAdamW(model, lr=LR, weight_decay=0.1)
        config = ds_config(stage, offload=name.endswith("offload"))
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        if attach:
            opt.attach_deepspeed(engine)
        for b in batches:
            engine.backward(engine(**b))
            engine.step()
        if stage == 3:
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                out[name] = params(model)
        else:
            out[name] = params(model)

    # full mode: the m×n Adam states on each layer's owner rank (weight decay of the effective weight)
    for name, stage in (("full_zero2", 2), ("full_zero3", 3), ("full_zero3_offload", 3)):
        model = toy_peft(0, dtype=torch.float32)
        opt = LoraProAdamW(model, lr=LR, weight_decay=0.1, mode="full")
        config = ds_config(stage, offload=name.endswith("offload"))
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        for b in batches:
            engine.backward(engine(**b))
            engine.step()
        with (
            deepspeed.zero.GatheredParameters(list(model.parameters()))
            if stage == 3
            else torch.no_grad()
        ):
            # every parameter: full mode also decays the frozen base weights
            out[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save(out, f"{prefix}.{rank}.pt")
    dist.barrier()
    end_process_group()  # not left to the interpreter's exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1])
