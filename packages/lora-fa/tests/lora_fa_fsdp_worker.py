"""Run by test_lora_fa_fsdp.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

Each rank trains the toy LoRA model of ``lora_fa_dist_worker`` (in float64) sharded with FSDP2
(``fully_shard`` on each LoRA layer, the head and the root) on its own half of every batch with
``create_lorafa_optimizer``, and writes the whole parameters, the size of its optimizer state, and the
error that ``correct_in_backward=True`` raises on sharded parameters.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
from lora_fa_dist_worker import ALPHA, LR, MICRO, RANK, WD, toy_batches, toy_peft

from loralab.core.distributed import end_process_group
from loralab.lora_fa import LoraFAError, create_lorafa_optimizer

STEPS = 3


def sharded_model():
    model = toy_peft(0).double()
    inner = model.base_model.model
    for name in ("lin1", "lin2", "head"):
        fully_shard(getattr(inner, name))
    fully_shard(model)
    return model


def main(prefix: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = sharded_model()
    opt = create_lorafa_optimizer(model, RANK, ALPHA, LR, weight_decay=WD)
    for b in toy_batches(STEPS, MICRO, seed=10 + rank):
        model(**{k: v.double() for k, v in b.items()}).backward()
        opt.step()
        opt.zero_grad()
    out: dict = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    out["state_numel"] = torch.tensor(
        sum(t.numel() for st in opt.state.values() for k, t in st.items() if k != "step")
    )
    try:
        create_lorafa_optimizer(sharded_model(), RANK, ALPHA, LR, correct_in_backward=True)
    except LoraFAError as e:
        out["error"] = str(e)
    torch.save(out, f"{prefix}.{rank}.pt")
    end_process_group()  # not left to the interpreter's exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1])
