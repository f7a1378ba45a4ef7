"""Run by test_core_gradients.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

Each rank estimates on its own batches; the all-reduced result must be the mean over both ranks'
batches, identical on every rank, for the plain and the offloaded path.
"""

import sys

import torch
import torch.distributed as dist

from loralab.core.distributed import (
    all_reduce_mean_dict_,
    broadcast_,
    is_distributed,
    rank,
    world_size,
)
from loralab.core.gradients import estimate_gradients
from loralab.core.testing import make_lm_batches, tiny_llama


def main(out_prefix: str) -> None:
    dist.init_process_group("gloo")
    assert is_distributed() and world_size() == 2
    model = tiny_llama()
    batches = make_lm_batches(2, seed=100 + rank())  # different data per rank
    plain = estimate_gradients(model, batches, ["q_proj", "down_proj"], progress=False)
    off = estimate_gradients(
        model, batches, ["q_proj", "down_proj"], offload=True, device="cpu", progress=False
    )
    local = estimate_gradients(
        model, batches, ["q_proj", "down_proj"], reduce=False, progress=False
    )
    t = torch.full((2,), float(rank()))
    broadcast_(t, src=1)
    d = {"a": torch.full((3,), float(rank()))}
    all_reduce_mean_dict_(d)
    torch.save(
        {"plain": plain, "offload": off, "local": local, "broadcast": t, "dict_mean": d["a"]},
        f"{out_prefix}.{rank()}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
