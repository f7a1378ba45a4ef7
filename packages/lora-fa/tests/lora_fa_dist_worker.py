"""Run by test_lora_fa_distributed.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

Each rank trains a toy LoRA model (two LoRA layers + a ``modules_to_save`` head that gets plain AdamW)
on its own half of every batch through ``deepspeed.initialize(optimizer=create_lorafa_optimizer(...))``:

- ``zero0`` / ``zero1`` / ``zero2`` / ``zero3``: ZeRO stage 0-3, correction in ``step`` (the
  default; under ZeRO-1/2/3 on B's gradient gathered from DeepSpeed's flat partitions);
- ``zero2_backward`` / ``zero3_backward``: ``correct_in_backward=True`` (B's gradient corrected by
  a hook before DeepSpeed reduces and flattens it);
- ``zero3_offload``: ZeRO-3 with the optimizer and the parameters offloaded to the CPU.

Parameters (gathered for ZeRO-3) or the error text are written to ``{prefix}.{rank}.pt``.
"""

import sys

import peft
import torch
import torch.distributed as dist
from torch import nn

from loralab.core.distributed import end_process_group
from loralab.lora_fa import create_lorafa_optimizer

IN, HID, OUT, RANK, ALPHA = 16, 24, 8, 4, 8
STEPS, MICRO, LR, WD = 4, 4, 1e-2, 0.1


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(IN, HID)
        self.lin2 = nn.Linear(HID, HID)
        self.head = nn.Linear(HID, OUT)

    def forward(self, x, labels):
        y = self.head(torch.relu(self.lin2(torch.relu(self.lin1(x)))))
        return nn.functional.mse_loss(y, labels)


def toy_peft(seed=0):
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["lin1", "lin2"], modules_to_save=["head"]
    )
    return peft.get_peft_model(Toy(), config)


def toy_batches(n, batch, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        {"x": torch.randn(batch, IN, generator=g), "labels": torch.randn(batch, OUT, generator=g)}
        for _ in range(n)
    ]


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


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad or "lora_A" in n}


def main(prefix: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    batches = toy_batches(STEPS, MICRO, seed=10 + rank)
    out, errors = {}, {}
    runs = [
        ("zero0", 0, False),
        ("zero1", 1, False),
        ("zero2", 2, False),
        ("zero3", 3, False),
        ("zero2_backward", 2, True),
        ("zero3_backward", 3, True),
        ("zero3_offload", 3, False),
    ]
    for name, stage, in_backward in runs:
        model = toy_peft(0)
        opt = create_lorafa_optimizer(
            model, RANK, ALPHA, LR, weight_decay=WD, correct_in_backward=in_backward
        )
        try:
            config = ds_config(stage, offload=name.endswith("offload"))
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
            for b in batches:
                engine.backward(engine(**b))
                engine.step()
            params = trainable(model)
            with (
                deepspeed.zero.GatheredParameters(list(params.values()))
                if stage == 3
                else torch.no_grad()
            ):
                out[name] = {n: p.detach().clone() for n, p in params.items()}
        except (RuntimeError, NotImplementedError, ValueError) as e:
            errors[name] = f"{type(e).__name__}: {e}"
    out["errors"] = errors
    torch.save(out, f"{prefix}.{rank}.pt")
    dist.barrier()
    end_process_group()  # not left to the interpreter's exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1])
