"""Run by test_lora_fa_layer.py under ``torchrun --nproc-per-node 2`` (gloo, CPU): the memory-saving
layer under DeepSpeed ZeRO-3 (A partitioned across ranks; the custom autograd function
keeps the A parameter for backward, which ZeRO-3 must re-gather).

Two runs with ``create_lorafa_optimizer`` as DeepSpeed client optimizer on the same
data: PEFT's layers (A frozen; dropout drawn from a known seed sequence) and ours (same seeds). B after
``STEPS`` steps, gathered, or the error text is written to ``{prefix}.{rank}.pt``.
"""

import sys

import peft
import torch
import torch.distributed as dist
from torch import nn

from loralab.core.distributed import end_process_group
from loralab.lora_fa import create_lorafa_optimizer
from loralab.lora_fa import layer as lorafa_layer

IN, HID, OUT, RANK, ALPHA, DROPOUT = 16, 24, 8, 4, 8, 0.2
STEPS, MICRO, LR = 3, 4, 1e-2


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(IN, HID)
        self.lin2 = nn.Linear(HID, OUT)

    def forward(self, x, labels):
        return nn.functional.mse_loss(self.lin2(torch.relu(self.lin1(x))), labels)


class Seeds:
    def __init__(self):
        self.next = 100

    def __call__(self):
        self.next += 1
        return self.next


class MaskDropout(nn.Module):
    """PEFT-side dropout drawing the same masks as ours (``lorafa_dropout_mask`` from the same seeds)."""

    def __init__(self, p, seeds):
        super().__init__()
        self.p, self.seeds = p, seeds

    def forward(self, x):
        return (
            x * lorafa_layer.lorafa_dropout_mask(x.shape, x.dtype, x.device, self.p, self.seeds())
            if self.training
            else x
        )


def build(ours: bool) -> peft.PeftModel:
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["lin1", "lin2"], lora_dropout=DROPOUT
    )
    model = peft.get_peft_model(Toy(), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    seeds = Seeds()
    if ours:
        lorafa_layer.apply_lorafa_layers(model)
        lorafa_layer._draw_seed = seeds
    else:
        for module in model.modules():
            if isinstance(getattr(module, "lora_dropout", None), nn.ModuleDict):
                module.lora_dropout["default"] = MaskDropout(DROPOUT, seeds)
    return model


def main(prefix: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(10 + rank)
    batches = [
        {"x": torch.randn(MICRO, IN, generator=g), "labels": torch.randn(MICRO, OUT, generator=g)}
        for _ in range(STEPS)
    ]
    out = {}
    for stage in (3,):  # ZeRO-0 adds nothing for the layer beyond the single-process tests
        for kind in ("peft", "ours"):
            model = build(kind == "ours")
            opt = create_lorafa_optimizer(model, RANK, ALPHA, LR, correct_in_backward=stage > 0)
            config = {
                "train_micro_batch_size_per_gpu": MICRO,
                "zero_optimization": {"stage": stage},
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 10**9,
            }
            try:
                engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
                for b in batches:
                    engine.backward(engine(**b))
                    engine.step()
                params = [p for n, p in model.named_parameters() if "lora_" in n]
                with deepspeed.zero.GatheredParameters(params) if stage == 3 else torch.no_grad():
                    out[f"zero{stage}/{kind}"] = {
                        n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n
                    }
            except Exception as e:  # reported by the test with its message
                out[f"zero{stage}/{kind}"] = f"{type(e).__name__}: {e}"
    torch.save(out, f"{prefix}.{rank}.pt")
    dist.barrier()
    end_process_group()  # not left to the interpreter's exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1])
