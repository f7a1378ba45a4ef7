"""GaLore / GoLore under FSDP2 (``fully_shard``): the row-shard projection algebra in float64 against the
dense formulas (one process, shards emulated by splitting rows), the 2-rank run (gloo) against one
process on the whole batch, no whole weight gathered outside an SVD refresh, exact resume, and the
optimizers that refuse sharded parameters."""

import sys
from pathlib import Path

import pytest
import torch

from loralab.core.testing import run_torchrun
from loralab.golore.projector import (
    new_projector,
    project,
    project_back,
    reproject_first_moment,
    reproject_second_moment,
    transition_matrices,
)

sys.path.insert(0, str(Path(__file__).parent))
from golore_fsdp_worker import CONFIGS, STEPS, batches, groups, toy

WORKER = Path(__file__).with_name("golore_fsdp_worker.py")
# float64: the data-parallel mean of the gradients and the all-reduced Σ_k P_kᵀ·G_k change only the
# rounding (and through it the SVD's last bits); measured worst 6.7e-14 relative to the parameter
# change (proj_type full), 1.6e-15 to 6.7e-15 for the others
TOL = 1e-10
# how torch.chunk splits the toy's rows over 2 ranks (Shard(0))
ROWS = {13: [(0, 7), (7, 13)], 5: [(0, 3), (3, 5)], 3: [(0, 2), (2, 3)]}


# ---------------------------------------------------------------- shard algebra, one process
def _blocks(m: int, world: int) -> list[slice]:
    c = -(-m // world)
    return [slice(min(k * c, m), min((k + 1) * c, m)) for k in range(world)]


@pytest.mark.parametrize("side", ["left", "right", "full"])
@pytest.mark.parametrize(("m", "world"), [(13, 2), (5, 3), (2, 3)])  # (2, 3): an empty last shard
def test_row_block_algebra_equals_the_dense_formulas(side, m, world):
    g = torch.Generator().manual_seed(m * 10 + world)
    n, r = 6, 2
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    G2 = torch.randn(m, n, generator=g, dtype=torch.float64)
    old = new_projector(G, r, side, "svd")
    new = new_projector(G2, r, side, "svd")
    low_dense = project(G, old, side)
    blocks = _blocks(m, world)

    def rows(mats, s):  # what shard_projector keeps on the rank of rows s
        return mats if side == "right" else (mats[0][s], *mats[1:])

    # projection: right gives row blocks of G·Qᵀ, left/full partial sums of Pᵀ·G(·Qᵀ)
    parts = [project(G[s], rows(old, s), side) for s in blocks]
    if side == "right":
        got = torch.cat(parts)
    else:
        got = sum(parts)
    torch.testing.assert_close(got, low_dense, rtol=1e-12, atol=1e-12)
    # back-projection of the rank's low-rank block gives the rank's rows of the update
    back = project_back(low_dense, old, side)
    for s in blocks:
        low_k = low_dense[s] if side == "right" else low_dense
        torch.testing.assert_close(
            project_back(low_k, rows(old, s), side), back[s], rtol=1e-12, atol=1e-12
        )
    # change of basis: C = Σ_k P_new,kᵀ·P_old,k; D from the whole Q
    trans = [transition_matrices(rows(old, s), rows(new, s), side) for s in blocks]
    dense = transition_matrices(old, new, side)
    if side == "right":
        got_t = trans[0]
    else:
        got_t = (sum(t[0] for t in trans), *trans[0][1:])
    for a, b in zip(got_t, dense):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # moments carried into the new basis: row blocks (right) or the replicated matrix (left/full)
    m1, m2 = low_dense, low_dense.abs()
    for fn, mom in ((reproject_first_moment, m1), (reproject_second_moment, m2)):
        want = fn(mom, dense, side)
        if side == "right":
            got_m = torch.cat([fn(mom[s], got_t, side) for s in blocks])
        else:
            got_m = fn(mom, got_t, side)
        torch.testing.assert_close(got_m, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- 2 ranks against one process
def _one_process(name: str) -> tuple[dict, dict]:
    model = toy()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    cls, param_groups = groups(model, name)
    opt = cls(param_groups)
    for b0, b1 in zip(batches(10), batches(11)):
        opt.zero_grad()
        model(**{k: torch.cat([b0[k], b1[k]]) for k in b0}).backward()
        opt.step()
    return init, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("golore_fsdp") / "run"
    run_torchrun(WORKER, prefix, timeout=600)
    return [torch.load(f"{prefix}.{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.multiprocess
def test_fsdp2_two_ranks_equal_one_process(fsdp_ranks):
    for name in CONFIGS:
        init, ref = _one_process(name)
        for r, out in enumerate(fsdp_ranks):
            got = out[name]["params"]
            assert sorted(got) == sorted(ref)
            for n in ref:
                moved = (ref[n] - init[n]).norm()
                assert moved > 0, (name, n)
                err = ((got[n] - ref[n]).norm() / moved).item()
                assert err < TOL, (name, r, n, err)


@pytest.mark.multiprocess
def test_fsdp2_state_covers_the_rank_rows_only(fsdp_ranks):
    # right projection: (m_k, r) moments and the whole (r, n) Q; left: replicated (r, n) moments and
    # the rank's (m_k, r) rows of P; plain AdamW on the biases: the rank's rows
    for r, out in enumerate(fsdp_ranks):
        m_k = {m: b - a for m, ((a, b)) in ((m, ROWS[m][r]) for m in ROWS)}
        state = {k: tuple(v.tolist()) for k, v in out["galore_adamw"]["state"].items()}
        assert state["lin1.weight.exp_avg"] == (m_k[13], 2)
        assert state["lin1.weight.proj_right"] == (2, 6)
        assert state["lin2.weight.exp_avg"] == (2, 13)
        assert state["lin2.weight.proj_left"] == (m_k[5], 2)
        assert state["head.weight.exp_avg_sq"] == (2, 5)
        assert state["head.weight.proj_left"] == (m_k[3], 2)
        assert state["lin1.bias.exp_avg"] == (m_k[13],)
        full = {k: tuple(v.tolist()) for k, v in out["galore_adamw_torch_full"]["state"].items()}
        assert full["lin1.weight.exp_avg"] == (2, 2)
        assert full["lin1.weight.proj_left"] == (m_k[13], 2)
        assert full["lin1.weight.proj_right"] == (2, 6)


@pytest.mark.multiprocess
def test_fsdp2_gathers_one_gradient_per_matrix_only_at_svd_refreshes(fsdp_ranks):
    svd_refresh = [(13, 6), (5, 13), (3, 5)]  # every projected matrix, once, in order
    for out in fsdp_ranks:
        for name in CONFIGS:
            gathers, alive = out[name]["gathers"], out[name]["alive"]
            assert len(gathers) == STEPS
            random_from = 2 if name.startswith("golore") else None
            for step, shapes in enumerate(gathers):
                svd = step % 2 == 0 and (random_from is None or step < random_from)
                assert shapes == (svd_refresh if svd else []), (name, step, shapes)
            # each gathered gradient was freed before the next one was built
            assert alive == [0] * STEPS, (name, alive)


@pytest.mark.multiprocess
def test_fsdp2_state_dict_resume_is_exact(fsdp_ranks):
    for out in fsdp_ranks:
        got, want = out["resume"], out["galore_adamw"]["params"]
        assert all(torch.equal(got[n], want[n]) for n in want)


# ---------------------------------------------------------------- refusals
def test_8bit_and_adafactor_refuse_sharded_parameters(monkeypatch):
    from loralab.core import sharding
    from loralab.golore import GaLoreAdafactor, GaLoreAdamW, GoLoreAdamW8bit

    w = torch.nn.Parameter(torch.randn(8, 4))
    monkeypatch.setattr(
        sharding, "is_sharded", lambda t: t is w
    )  # stands in for a Shard(0) DTensor
    with pytest.raises(
        NotImplementedError,
        match=r"GoLoreAdamW8bit does not run on FSDP2-sharded parameters .*8-bit states .*"
        r"use optimizer='adamw'",
    ):
        GoLoreAdamW8bit([{"params": [w], "rank": 2}])
    with pytest.raises(
        NotImplementedError,
        match=r"GaLoreAdafactor does not run on FSDP2-sharded .*Adafactor's factored second "
        r"moments .*optimizer='adamw'",
    ):
        GaLoreAdafactor([{"params": [w], "rank": 2}])
    GaLoreAdamW([{"params": [w], "rank": 2}])  # the row-shard algebra: accepted
