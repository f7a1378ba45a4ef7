"""loralab.core.zero_views: where each parameter lies in DeepSpeed ZeRO's flat partitions.

The layouts are built here the way DeepSpeed builds them (ZeRO-1/2: parameters are views of one
padded flat buffer split evenly over the ranks; ZeRO-3: every parameter split evenly, the pieces
concatenated per sub-group, named ``"<first ds_id>_<last ds_id>"``). The real engines run in the
methods' multi-process tests (lora-pro: 2 CPU ranks, ZeRO-1/2/3 equal one process).
"""

from __future__ import annotations

import pytest
import torch

from loralab.core import zero_views
from loralab.core.zero_views import (
    GroupOriginals,
    ZeroLayoutError,
    full_shape,
    is_zero3_param,
    is_zero_partition,
    zero_partition,
)

SHAPES = [(2, 3), (5,), (3, 4)]  # 6 + 5 + 12 = 23 elements


def _stage12(world: int):
    """Parameters as views of one flat buffer padded to a multiple of ``world`` (DeepSpeed's bit16
    copy), and the fp32 master values of that buffer."""
    total = sum(torch.Size(s).numel() for s in SHAPES)
    padded = -(-total // world) * world
    buf = torch.zeros(padded)
    params, off = [], 0
    for s in SHAPES:
        n = torch.Size(s).numel()
        params.append(buf[off : off + n].view(s))
        off += n
    master = torch.arange(padded, dtype=torch.float64)
    return params, master


def _stage3_params(world: int, first_id: int = 7):
    params = []
    for j, s in enumerate(SHAPES):
        n = torch.Size(s).numel()
        c = -(-n // world)
        p = torch.nn.Parameter(torch.zeros(0))
        p.ds_id, p.ds_numel, p.ds_shape = first_id + j, n, torch.Size(s)
        p.ds_tensor = torch.zeros(c)
        p.ds_tensor.ds_numel = c
        p.ds_process_group = None
        params.append(p)
    return params


def _fake_world(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(zero_views, "_rank_world", lambda group: (rank, world))


def test_stage12_one_rank_gives_whole_matrices_and_writes_back():
    params, master = _stage12(1)
    zp = zero_partition(params, master)
    assert zp.stage == 2 and [pc.shape for pc in zp.pieces] == [torch.Size(s) for s in SHAPES]
    W = zp.wholes(master)
    assert torch.equal(W[id(params[2])], master[11:23].view(3, 4))
    new = torch.zeros_like(master)
    zp.write_(new, params[1], torch.full((5,), 2.0, dtype=torch.float64))
    assert torch.equal(new[6:11], torch.full((5,), 2.0, dtype=torch.float64))
    assert new[:6].abs().sum() == 0 and new[11:].abs().sum() == 0
    assert torch.equal(zp.local(master, params[0]), master[:6])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_stage12_spans_cover_every_element_once_at_deepspeeds_offsets(monkeypatch, world):
    params, master = _stage12(world)
    size = master.numel() // world
    seen = {id(p): torch.zeros(p.numel(), dtype=torch.int64) for p in params}
    for rank in range(world):
        _fake_world(monkeypatch, rank, world)
        part = master[rank * size : (rank + 1) * size]
        zp = zero_partition(params, part)
        for p in params:
            lo, hi = zp.local_range(p)
            seen[id(p)][lo:hi] += 1
            # element e of p lies at p's offset + e of the whole buffer
            off = p.storage_offset()
            assert torch.equal(zp.local(part, p), master[off + lo : off + hi])
            assert zp.holds(p) == (hi > lo)
    assert all(bool((s == 1).all()) for s in seen.values())


@pytest.mark.parametrize("world", [1, 2, 3])
def test_stage3_spans_split_every_parameter_evenly(monkeypatch, world):
    params = _stage3_params(world)
    for rank in range(world):
        _fake_world(monkeypatch, rank, world)
        flat = torch.zeros(sum(int(p.ds_tensor.ds_numel) for p in params))
        flat.ds_id = "7_9"
        zp = zero_partition(params, flat)
        assert zp.stage == 3
        at = 0
        for p in params:
            c, n = int(p.ds_tensor.ds_numel), p.ds_numel
            assert zp.local_range(p) == (min(rank * c, n), min((rank + 1) * c, n))
            assert zp.piece(p).spans[rank][2] == at
            at += c


def test_stage3_one_rank_wholes_and_sub_groups():
    params = _stage3_params(1)
    flat = torch.arange(17, dtype=torch.float32)
    flat.ds_id = "8_9"  # a sub-group: the last two parameters only
    zp = zero_partition(params, flat)
    assert params[1] in zp and params[0] not in zp
    W = zp.wholes(flat)
    assert torch.equal(W[id(params[2])], torch.arange(5, 17, dtype=torch.float32).view(3, 4))
    with pytest.raises(KeyError, match=r"shape \(0,\)"):
        zp.piece(params[0])
    with pytest.raises(ValueError, match="value has shape"):
        zp.write_(flat, params[1], torch.zeros(3))


def test_gather_to_and_scatter_from_one_rank_round_trip():
    params, master = _stage12(1)
    zp = zero_partition(params, master)
    whole = zp.gather_to(master, params[2], owner=0)
    assert torch.equal(whole, master[11:23].view(3, 4))
    out = torch.zeros_like(master)
    zp.scatter_from_(out, params[2], whole * 2, owner=0)
    assert torch.equal(out[11:23], master[11:23] * 2) and out[:11].abs().sum() == 0


def test_layout_errors_name_the_cause(monkeypatch):
    params, master = _stage12(1)
    with pytest.raises(ZeroLayoutError, match="1-D flat partition"):
        zero_partition(params, master.view(1, -1), "opt group 0")
    with pytest.raises(ZeroLayoutError, match="not views of one flat buffer"):
        zero_partition([torch.zeros(3), torch.zeros(2)], torch.zeros(5))
    with pytest.raises(ZeroLayoutError, match="had no parameters"):
        zero_partition([], torch.zeros(5))
    _fake_world(monkeypatch, 0, 2)
    with pytest.raises(ZeroLayoutError, match="smaller than the world"):
        zero_partition(params, master[:5])
    s3 = _stage3_params(1)
    _fake_world(monkeypatch, 0, 1)
    unnamed = torch.zeros(23)
    with pytest.raises(ZeroLayoutError, match="sub-group name"):
        zero_partition(s3, unnamed)
    foreign = torch.zeros(23)
    foreign.ds_id = "1_2"
    with pytest.raises(ZeroLayoutError, match="not built with"):
        zero_partition(s3, foreign)
    short = torch.zeros(20)
    short.ds_id = "7_9"
    with pytest.raises(ZeroLayoutError, match="swapped to NVMe"):
        zero_partition(s3, short)
    s3[0].ds_tensor.ds_numel = 1  # 1 element per rank cannot hold 6 elements on one rank
    bad = torch.zeros(18)
    bad.ds_id = "7_9"
    with pytest.raises(ZeroLayoutError, match="even split"):
        zero_partition(s3, bad)


def test_helpers():
    p = _stage3_params(1)[2]
    assert is_zero3_param(p) and not is_zero3_param(torch.zeros(2))
    assert full_shape(p) == torch.Size((3, 4)) and full_shape(torch.zeros(2, 5)) == (2, 5)
    w = torch.nn.Parameter(torch.zeros(2))
    assert not is_zero_partition([w], {id(w)})
    assert is_zero_partition([torch.zeros(4)], {id(w)})
    assert not is_zero_partition([], {id(w)})  # ZeRO-3 empties the list between its steps


def test_group_originals_follow_rebuilt_groups_and_refuse_unknown_ones():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=0.1)
    originals = GroupOriginals()
    originals.record(opt.param_groups[0], 0)
    old = list(opt.param_groups)
    opt.load_state_dict(opt.state_dict())  # torch rebuilds the group dicts
    with pytest.raises(KeyError, match="not built with"):
        originals.of(opt.param_groups[0])
    originals.carry_over(old, opt.param_groups)
    index, params = originals.of(opt.param_groups[0])
    assert index == 0 and params[0] is w


def test_flat_partition_returns_the_one_flat_tensor_and_refuses_anything_else():
    from loralab.core.zero_views import flat_partition

    flat = torch.zeros(6)
    assert flat_partition({"params": [flat]}, "g") is flat
    with pytest.raises(RuntimeError, match="g: expected one flat DeepSpeed ZeRO partition, got 2"):
        flat_partition({"params": [flat, flat]}, "g")


def test_zero3_cpu_offload_reads_and_nvme_offload_is_refused_naming_the_config_key(monkeypatch):
    # offload_param marks the partitions' final_location ("not-nvme" for the CPU); offload_optimizer
    # keeps the fp32 partition on the CPU while the parameters' partitions stay on the accelerator
    # (here: the meta device). Both read; NVMe (swapped out between uses) is refused
    offload_config = pytest.importorskip("deepspeed.runtime.zero.offload_config")

    _fake_world(monkeypatch, 0, 1)
    params = _stage3_params(1)
    flat = torch.zeros(23)
    flat.ds_id = "7_9"
    params[1].ds_tensor.final_location = "not-nvme"
    assert zero_partition(params, flat).flat is flat
    on_cpu = torch.zeros(23, device="meta")
    on_cpu.ds_id = "7_9"
    assert zero_partition(params, on_cpu).comm_device == torch.device(
        "meta"
    )  # one rank: no routing
    params[1].ds_tensor.final_location = offload_config.OffloadDeviceEnum.nvme
    with pytest.raises(
        ZeroLayoutError,
        match=r"opt group 0: .*offload to NVMe \(zero_optimization\.offload_param\.device nvme\).*"
        r"device: cpu",
    ):
        zero_partition(params, flat, "opt group 0: ")


def test_a_matrix_one_rank_holds_whole_moves_without_communication(monkeypatch):
    # ZeRO-1/2 over 2 ranks: most parameters lie on one rank (sole_holder), which then gathers and
    # scatters them locally; no process group exists here, so any collective would raise
    params, master = _stage12(2)
    size = master.numel() // 2
    holders = []
    for rank in range(2):
        _fake_world(monkeypatch, rank, 2)
        part = master[rank * size : (rank + 1) * size]
        zp = zero_partition(params, part)
        holders.append([zp.sole_holder(p) for p in params])
        for p, holder in zip(params, holders[-1]):
            if holder is None:
                continue
            got = zp.gather_to(part, p, owner=holder)
            mine = zp.scatter(p, None if got is None else got * 2, holder, torch.float64)
            if rank == holder:
                off = p.storage_offset()
                assert torch.equal(got.reshape(-1), master[off : off + p.numel()])
                assert torch.equal(mine, got.reshape(-1) * 2)
            else:
                assert got is None and mine.numel() == 0
    # every rank computes the same holders: 6 + 5 elements on rank 0, the (3, 4) one across both
    assert holders[0] == holders[1] == [0, 0, None]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_row_blocks_sum_to_the_whole_matrix_and_give_back_each_ranks_elements(monkeypatch, world):
    # the geometry of the projection algebra on element ranges: each rank's elements placed in the
    # rows they touch sum (over the ranks) to the whole matrix, every row is the "first row" of one
    # rank, and a row is shared exactly when a rank boundary falls inside it
    params, master = _stage12(world)
    size = master.numel() // world
    for p in params:
        if p.dim() != 2:
            continue
        m, n = p.shape
        total = torch.zeros(m, n, dtype=master.dtype)
        firsts = torch.zeros(m, dtype=torch.int64)
        touched = torch.zeros(m, dtype=torch.int64)
        for rank in range(world):
            _fake_world(monkeypatch, rank, world)
            part = master[rank * size : (rank + 1) * size]
            zp = zero_partition(params, part)
            rows = zp.row_span(p)
            block = zp.row_block(zp.local(part, p), p)
            assert block.shape == (rows.stop - rows.start, n)
            total[rows] += block
            firsts[zp.first_rows(p)] += 1
            touched[rows] += 1
            assert torch.equal(zp.from_row_block(block, p), zp.local(part, p))
            shared = zp.shared_rows(p)
        off = p.storage_offset()  # the master values of p: its place in the flat buffer
        assert torch.equal(total, master[off : off + m * n].view(m, n))
        assert bool((firsts == 1).all())
        assert shared == [i for i in range(m) if touched[i] > 1]


def test_from_row_block_refuses_a_block_of_other_rows(monkeypatch):
    params, master = _stage12(2)
    _fake_world(monkeypatch, 0, 2)
    zp = zero_partition(params, master[: master.numel() // 2])
    p = next(q for q in params if q.dim() == 2 and zp.holds(q))
    with pytest.raises(ValueError, match="this rank's rows"):
        zp.from_row_block(torch.zeros(p.shape[0] + 1, p.shape[1], dtype=master.dtype), p)


def test_element_helpers_refuse_the_wrong_number_of_elements(monkeypatch):
    # a value of another parameter's (or another rank's) size must not be placed silently
    params, master = _stage12(2)
    _fake_world(monkeypatch, 0, 2)
    zp = zero_partition(params, master[: master.numel() // 2])
    p = next(q for q in params if q.dim() == 2 and zp.holds(q))
    lo, hi = zp.local_range(p)
    wrong = torch.zeros(hi - lo + 1, dtype=master.dtype)
    with pytest.raises(ValueError, match=r"row_block: got \d+ elements, this rank holds"):
        zp.row_block(wrong, p)
    with pytest.raises(ValueError, match=r"gather_elements_to: got \d+ elements, this rank holds"):
        zp.gather_elements_to(wrong, p, owner=0)
    with pytest.raises(
        ValueError, match="reduce_scatter_sum: needs a 1-D tensor of a multiple of 2"
    ):
        zp.reduce_scatter_sum(torch.zeros(3))
