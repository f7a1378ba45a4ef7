"""Run by test_core_gradients.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

Each rank estimates on its own batches; the all-reduced result must be the mean over both ranks'
batches, identical on every rank, for the plain (hooks and block-wise) and the offloaded path.
"""

import sys

import torch
import torch.distributed as dist

from loralab.core.distributed import (
    all_reduce_mean_dict_,
    broadcast_,
    end_process_group,
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

    def collect(data, targets):
        got = {}
        out = estimate_gradients(
            model, data, targets, consumer=lambda n, g: got.__setitem__(n, g), progress=False
        )
        assert out == {}
        return got

    # with a consumer the default streams block-wise (the ranks agree after their first batch);
    # short batches, whose boundary activations stay under the sums the block-wise order saves
    short = make_lm_batches(2, batch_size=1, seq_len=4, seed=300 + rank())
    auto = collect(short, ["q_proj", "down_proj"])
    # rank 1's batches are longer: its boundary activations outweigh the q_proj sums the block-wise
    # order saves, rank 0's do not; both ranks must take the hook path together
    mixed = make_lm_batches(2, batch_size=1, seq_len=4 if rank() == 0 else 64, seed=200 + rank())
    declined = collect(mixed, ["q_proj"])
    t = torch.full((2,), float(rank()))
    broadcast_(t, src=1)
    d = {"a": torch.full((3,), float(rank()))}
    all_reduce_mean_dict_(d)
    torch.save(
        {
            "plain": plain,
            "offload": off,
            "local": local,
            "auto": auto,
            "auto_order": list(auto),
            "declined": declined,
            "declined_order": list(declined),
            "broadcast": t,
            "dict_mean": d["a"],
        },
        f"{out_prefix}.{rank()}.pt",
    )
    end_process_group()  # not left to the interpreter's exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1])
