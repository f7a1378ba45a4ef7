"""Whole-matrix views under FSDP2 (2 CPU ranks, gloo) and the identity in one process."""

import sys
from pathlib import Path

import pytest
import torch

from loralab.core import sharding
from loralab.core.sharding import (
    all_ranks_agree,
    block_of,
    broadcast_from_first_,
    cols_of,
    gather_columns,
    gather_rows,
    is_sharded,
    local_rows,
    local_tensor,
    rows_of,
    sum_columns_over_shards,
    sum_over_shards_,
    whole,
    whole_grad,
    write_rows_,
)
from loralab.core.testing import run_torchrun

sys.path.insert(0, str(Path(__file__).parent))
from sharding_worker import SHAPES, batch, model

WORKER = Path(__file__).with_name("sharding_worker.py")


def test_one_process_is_the_identity():
    p = torch.nn.Parameter(torch.randn(3, 2))
    p.grad = torch.randn(3, 2)
    assert not is_sharded(p) and not is_sharded(None)
    assert whole(p) is p and whole_grad(p) is p.grad and local_tensor(p) is p
    assert rows_of(p) == slice(0, 3)
    v = torch.randn(3, 2)
    assert torch.equal(local_rows(p, v), v)
    assert sum_over_shards_(v, p) is v and gather_rows(p, v) is v
    assert broadcast_from_first_(v, p) is v
    assert cols_of(p, 7) == slice(0, 7)
    assert sum_columns_over_shards(v, p) is v and gather_columns(v, p, 2) is v
    assert all_ranks_agree(False, [p]) is False and all_ranks_agree(True, [p]) is True
    write_rows_(p, v)
    assert torch.equal(p.detach(), v)
    q = torch.nn.Parameter(torch.zeros(2))
    assert whole_grad(q) is None


def test_local_rows_refuses_a_value_of_another_height():
    with pytest.raises(ValueError, match="value has 2 rows, the whole tensor 3"):
        local_rows(torch.zeros(3, 2), torch.zeros(2, 2))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [0, 1, 2, 5, 13])
def test_block_of_is_torch_chunk_split(size, world):
    # DTensor's Shard rule: torch.chunk's blocks, then empty blocks for the ranks left over
    chunks = torch.arange(size).chunk(world) if size else ()
    blocks = [block_of(size, world, k) for k in range(world)]
    for k, b in enumerate(blocks):
        want = chunks[k].tolist() if k < len(chunks) else []
        assert list(range(size))[b] == want, (size, world, k)
    assert sum(b.stop - b.start for b in blocks) == size


def test_block_of_refuses_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="0 <= rank < world, got size=4, world=2, rank=2"):
        block_of(4, 2, 2)
    with pytest.raises(ValueError, match="size=-1"):
        block_of(-1, 2, 0)


def test_column_helpers_refuse_what_is_not_a_matrix_or_not_this_ranks_block(monkeypatch):
    p = torch.zeros(4, 5)
    with pytest.raises(
        ValueError, match=r"sum_columns_over_shards needs a 2-D matrix, got shape \(5,\)"
    ):
        sum_columns_over_shards(torch.zeros(5), p)
    with pytest.raises(
        ValueError, match=r"gather_columns needs a 2-D matrix, got shape \(2, 1, 3\)"
    ):
        gather_columns(torch.zeros(2, 1, 3), p, 3)
    # stands in for a Shard(0) DTensor on rank 0 of 2: its block of 5 columns is 3 wide (checked
    # before any communication)
    monkeypatch.setattr(sharding, "is_sharded", lambda t: t is p)
    monkeypatch.setattr(sharding, "_world_rank", lambda t: (2, 0))
    assert cols_of(p, 5) == slice(0, 3)
    with pytest.raises(
        ValueError, match=r"block has 2 columns, its share of 5 is 3: got shape \(4, 2\)"
    ):
        gather_columns(torch.zeros(4, 2), p, 5)


@pytest.mark.multiprocess
def test_fsdp2_whole_matrices_equal_one_process(tmp_path):
    prefix = tmp_path / "run"
    run_torchrun(WORKER, prefix, timeout=600)
    ranks = [torch.load(f"{prefix}.{r}.pt", weights_only=True) for r in (0, 1)]

    net = model()  # one process, the whole batch
    net(batch()).pow(2).sum().div(4).backward()
    chunk_rows = {5: [(0, 3), (3, 5)], 1: [(0, 1), (1, 1)], 4: [(0, 2), (2, 4)]}
    for i, (layer, (m, n)) in enumerate(zip(net, SHAPES)):
        W, G = layer.weight.detach(), layer.weight.grad
        P = torch.arange(m * 2, dtype=torch.float32).reshape(m, 2)
        update = torch.full((m, n), float(i + 1)) + torch.arange(m).unsqueeze(1)
        for r, out in enumerate(ranks):
            assert torch.equal(out[f"whole{i}"], W)  # gathered exactly
            # the gradient is the data-parallel mean: equal up to the order of the sums
            torch.testing.assert_close(out[f"grad{i}"], G, rtol=1e-6, atol=1e-7)
            assert tuple(out[f"rows{i}"].tolist()) == chunk_rows[m][r]
            torch.testing.assert_close(out[f"PtG{i}"], P.T @ G, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(out[f"GQ{i}"], G @ torch.ones(n, 2), rtol=1e-6, atol=1e-6)
            # Pᵀ·G by column blocks (torch.chunk's split of the n columns: uneven, or empty on rank 1
            # for n = 1), and the blocks gathered whole again
            cols = block_of(n, 2, r)
            assert tuple(out[f"cols{i}"].tolist()) == (cols.start, cols.stop)
            torch.testing.assert_close(
                out[f"PtG_cols{i}"], (P.T @ G)[:, cols], rtol=1e-6, atol=1e-6
            )
            torch.testing.assert_close(out[f"PtG_gathered{i}"], P.T @ G, rtol=1e-6, atol=1e-6)
            assert torch.equal(out[f"PtG_packed{i}"], out[f"PtG_gathered{i}"])  # one all-gather
            assert torch.equal(out[f"written{i}"], update)
    for out in ranks:
        assert out["agree_true"] is True and out["agree_false"] is False
        # the first rank's values everywhere, a non-contiguous value too
        assert torch.equal(out["broadcast"], torch.arange(6.0).reshape(2, 3))
        assert torch.equal(out["broadcast_t"], torch.arange(6.0).reshape(2, 3).T)
        assert "Shard(dim=1)" in out["error"] and "Shard(0)" in out["error"]
        assert "must share dtype and device" in out["packed_error"]
        # whole_packed: every weight and gradient (uneven and empty row shards) as whole() gives it
        assert out["whole_packed_equal"] is True


def test_column_blocks_round_trip_and_refuse_mismatched_shapes():
    # every rank's regions written from whole matrices give the matrices back, whatever the padding
    from loralab.core.sharding import ColumnBlocks

    mats = [torch.arange(21.0).view(3, 7), torch.ones(2, 1), torch.zeros(4, 0)]
    blocks = ColumnBlocks([7, 1, 0], [3, 2, 4], world=3)
    buf = torch.full((3 * blocks.size,), float("nan"))
    for j, m in enumerate(mats):
        blocks.put_all(buf, j, m)
    for j, m in enumerate(mats):
        assert torch.equal(blocks.whole(buf, j), m)
        transposed = blocks.whole_transposed(buf, j)  # one copy, no padding read
        assert torch.equal(transposed, m.T) and transposed.is_contiguous()
        for k in range(3):
            cols = block_of(m.shape[1], 3, k)
            region = buf[k * blocks.size : (k + 1) * blocks.size]
            assert torch.equal(blocks.take(region, j, k), m[:, cols])
    with pytest.raises(ValueError, match="one width n and one height r per matrix"):
        ColumnBlocks([7, 1], [3], world=2)
    with pytest.raises(ValueError, match="world >= 1"):
        ColumnBlocks([7], [3], world=0)
