"""Run by test_core_sharding.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

A small model is sharded with FSDP2 (``fully_shard``); each rank runs backward on its own half of a
batch. The rank writes what the helpers of :mod:`loralab.core.sharding` return (whole parameters and
gradients, rows, gathered and summed matrices, the written-back update) for the test to compare with
one process on the whole batch.
"""

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

from loralab.core.distributed import end_process_group
from loralab.core.sharding import (
    all_ranks_agree,
    broadcast_from_first_,
    cols_of,
    gather_columns,
    gather_columns_packed,
    gather_rows,
    is_sharded,
    local_rows,
    local_tensor,
    rows_of,
    sum_columns_over_shards,
    sum_over_shards_,
    whole,
    whole_grad,
    whole_packed,
    write_rows_,
)

# rows 5 (uneven: 3 + 2), 1 (fewer rows than ranks: rank 1 holds none) and 4; columns 3 (2 + 1),
# 5 (3 + 2) and 1 (1 + 0) for the column blocks
SHAPES = [(5, 3), (1, 5), (4, 1)]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(i, o, bias=False) for o, i in SHAPES))


def batch() -> torch.Tensor:
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(1))


def main(prefix: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    net = model()
    for layer in net:
        fully_shard(layer)
    fully_shard(net)
    x = batch()[2 * rank : 2 * rank + 2]  # this rank's half: FSDP2 averages the gradients
    net(x).pow(2).sum().div(
        2
    ).backward()  # the mean over 4 rows = the mean of both halves' means ×2
    out: dict = {"rank": rank}
    blocks = []
    # every weight and gradient whole from one all-gather, mixed with plain tensors, equal to whole()
    plain = torch.arange(6.0).reshape(2, 3)
    mixed = [x for layer in net for x in (layer.weight, layer.weight.grad)] + [plain]
    packed_wholes = whole_packed(mixed)
    assert packed_wholes[-1] is plain
    out["whole_packed_equal"] = all(
        torch.equal(w, whole(t)) and w.is_contiguous() for w, t in zip(packed_wholes, mixed)
    )
    for i, layer in enumerate(net):
        p = layer.weight
        assert is_sharded(p) and is_sharded(p.grad)
        out[f"whole{i}"] = whole(p).clone()
        out[f"grad{i}"] = whole_grad(p).clone()
        rows = rows_of(p)
        out[f"rows{i}"] = torch.tensor([rows.start, rows.stop])
        assert local_tensor(p).shape[0] == rows.stop - rows.start
        assert torch.equal(local_rows(p, out[f"whole{i}"]), local_tensor(p))
        # projection algebra on row shards: Pᵀ·G = Σ_k P_kᵀ·G_k (all-reduce), G·Q locally + gather
        P = torch.arange(p.shape[0] * 2, dtype=torch.float32).reshape(p.shape[0], 2)
        out[f"PtG{i}"] = sum_over_shards_(local_rows(p, P).T @ local_tensor(p.grad), p).clone()
        # the same sum kept by column blocks (reduce-scatter), then gathered whole (all-gather)
        PtG_cols = sum_columns_over_shards(local_rows(p, P).T @ local_tensor(p.grad), p)
        cols = cols_of(p, p.shape[1])
        out[f"cols{i}"] = torch.tensor([cols.start, cols.stop])
        out[f"PtG_cols{i}"] = PtG_cols.clone()
        out[f"PtG_gathered{i}"] = gather_columns(PtG_cols, p, p.shape[1]).clone()
        blocks.append(PtG_cols)
        Q = torch.ones(p.shape[1], 2)
        out[f"GQ{i}"] = gather_rows(p, local_tensor(p.grad) @ Q).clone()
        update = torch.full(p.shape, float(i + 1)) + torch.arange(p.shape[0]).unsqueeze(1)
        write_rows_(p, update)
        out[f"written{i}"] = p.full_tensor().clone()
    # every layer's blocks whole from one all-gather (the layers share the mesh)
    packed = gather_columns_packed(blocks, net[0].weight, [layer.weight.shape[1] for layer in net])
    for i, value in enumerate(packed):
        out[f"PtG_packed{i}"] = value.clone()
    try:  # one buffer for every block: a block of another dtype is refused, not cast
        gather_columns_packed([blocks[0], blocks[1].double()], net[0].weight, [3, 3])
    except ValueError as e:
        out["packed_error"] = str(e)
    out["agree_true"] = all_ranks_agree(True, [net[0].weight])
    out["agree_false"] = all_ranks_agree(rank == 0, [net[0].weight])  # False on one rank only
    mine = torch.arange(6.0).reshape(2, 3) + 100 * rank  # each rank its own values
    out["broadcast"] = broadcast_from_first_(mine, net[0].weight).clone()
    out["broadcast_t"] = broadcast_from_first_((mine + 100 * rank).T, net[0].weight).clone()
    try:
        rows_of(distribute_tensor(torch.zeros(4, 4), net[0].weight.device_mesh, [Shard(1)]))
    except NotImplementedError as e:
        out["error"] = str(e)
    torch.save(out, f"{prefix}.{rank}.pt")
    end_process_group()  # not left to the interpreter's exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1])
