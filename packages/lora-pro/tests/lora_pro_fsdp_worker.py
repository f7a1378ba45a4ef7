"""Run by test_lora_pro_fsdp.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

Each rank trains the toy LoRA model (rank 3: A's rows split 2 + 1 over the ranks) sharded with FSDP2
(``fully_shard`` on each LoRA layer, the head and the root) on its own half of every batch with
``LoraProAdamW`` in efficient and in full mode (weight decay on, so full mode's effective decay of the
frozen base weight runs on its shards too), and writes the whole parameters after the steps, the
base weights, and the size of its optimizer state.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
from conftest import toy_batches, toy_peft

from loralab.core.distributed import end_process_group
from loralab.lora_pro import LoraProAdamW

STEPS, MICRO, LR, WD = 3, 4, 1e-2, 0.1


def train(mode: str, rank: int) -> dict:
    model = toy_peft(0)  # float64
    inner = model.base_model.model
    for name in ("lin1", "lin2", "head"):
        fully_shard(getattr(inner, name))
    fully_shard(model)
    opt = LoraProAdamW(model, lr=LR, weight_decay=WD, mode=mode)
    for b in toy_batches(STEPS, batch=MICRO, seed=10 + rank):
        opt.zero_grad()
        model(**b).backward()
        opt.step()
    out = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    state = sum(t.numel() for st in opt.state.values() for k, t in st.items() if k != "step")
    out["state_numel"] = torch.tensor(state)
    return out


def main(prefix: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {mode: train(mode, rank) for mode in ("efficient", "full")}
    torch.save(out, f"{prefix}.{rank}.pt")
    end_process_group()  # not left to the interpreter's exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1])
