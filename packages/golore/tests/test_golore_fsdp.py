"""GaLore / GoLore under FSDP2 (``fully_shard``): the row-shard projection algebra and a left
projection's column-block state in float64 against the dense formulas (one process, shards emulated
by splitting rows and columns), the 2-rank run (gloo) against one process on the whole batch, the
state each rank holds, no whole weight gathered outside an SVD refresh, exact resume; and the
8-bit and Adafactor forms, which step each sharded parameter whole on an owner rank."""

import sys
from pathlib import Path

import pytest
import torch

from loralab.core.adamw import adamw_direction
from loralab.core.sharding import block_of
from loralab.core.testing import run_torchrun
from loralab.golore.projector import (
    new_projector,
    project,
    project_back,
    project_back_shard,
    project_shard,
    reproject_first_moment,
    reproject_second_moment,
    transition_matrices,
)

sys.path.insert(0, str(Path(__file__).parent))
from golore_fsdp_worker import CONFIGS, LAYERWISE, STEPS, batches, groups, toy

WORKER = Path(__file__).with_name("golore_fsdp_worker.py")
# float64: the data-parallel mean of the gradients and the all-reduced Σ_k P_kᵀ·G_k change only the
# rounding (and through it the SVD's last bits); measured worst 6.7e-14 relative to the parameter
# change (proj_type full), 1.6e-15 to 6.7e-15 for the others
TOL = 1e-10
# the forms whose update needs whole tensors: each sharded parameter stepped whole on its owner rank
OWNER_CONFIGS = ("galore_adamw8bit", "golore_adafactor", "galore_adafactor")
# their owners (least loaded by elements, in parameter order, per param group): matrices 13x6 -> 0,
# 5x13 -> 1, 3x5 -> 1; biases 13 -> 0, 5 -> 1, 3 -> 1
OWNERS = {"lin1": 0, "lin2": 1, "head": 1}
# how torch.chunk splits the toy's rows over 2 ranks (Shard(0))
ROWS = {13: [(0, 7), (7, 13)], 5: [(0, 3), (3, 5)], 3: [(0, 2), (2, 3)]}
# the same rule for the columns of a left projection's (r, n) moments
COLS = {13: [(0, 7), (7, 13)], 6: [(0, 3), (3, 6)], 5: [(0, 3), (3, 5)]}


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


@pytest.mark.parametrize(("m", "n", "world"), [(5, 13, 2), (4, 7, 3), (3, 2, 3)])
def test_left_projection_by_column_blocks_equals_the_dense_step(m, n, world):
    # A left projection under FSDP2: rank k holds rows G_k and P_k, receives its column block J_k of
    # Σ_k P_kᵀ·G_k (a reduce-scatter, emulated: sum then slice), keeps Adam's moments for J_k only,
    # carries them into a new basis with C·R (C acts from the left, columns stay separate) and
    # back-projects P_k·N with N gathered from the blocks (emulated: concatenation). (3, 2, 3): more
    # ranks than columns, the last rank's block is empty. Dense float64 reference: one matrix.
    gen = torch.Generator().manual_seed(m * 100 + n * 10 + world)
    r = 2
    grads = [torch.randn(m, n, generator=gen, dtype=torch.float64) for _ in range(3)]
    projs = [new_projector(grads[0], r, "left", "svd"), new_projector(grads[2], r, "left", "svd")]
    rows = [block_of(m, world, k) for k in range(world)]
    cols = [block_of(n, world, k) for k in range(world)]
    kw = dict(betas=(0.9, 0.999), eps=1e-8, style="hf")
    dense = {"exp_avg": torch.zeros(r, n, dtype=torch.float64)}
    dense["exp_avg_sq"] = torch.zeros_like(dense["exp_avg"])
    blocks = [{key: v[:, c].clone() for key, v in dense.items()} for c in cols]
    for step, G in enumerate(grads, start=1):
        mats = projs[0] if step < 3 else projs[1]
        if step == 3:  # a projector refresh: both moments carried into the new basis
            C = transition_matrices(projs[0], projs[1], "left")
            # C = Σ_k P_new,kᵀ·P_old,k (an all-reduce of (r, r)): whole on every rank
            C_sum = sum(
                transition_matrices((projs[0][0][s],), (projs[1][0][s],), "left")[0] for s in rows
            )
            torch.testing.assert_close(C_sum, C[0], rtol=1e-12, atol=1e-12)
            dense["exp_avg"] = reproject_first_moment(dense["exp_avg"], C, "left")
            dense["exp_avg_sq"] = reproject_second_moment(dense["exp_avg_sq"], C, "left")
            for b in blocks:
                b["exp_avg"] = reproject_first_moment(b["exp_avg"], C, "left")
                b["exp_avg_sq"] = reproject_second_moment(b["exp_avg_sq"], C, "left")
        low = project(G, mats, "left")
        (N,) = adamw_direction([low], [dense["exp_avg"]], [dense["exp_avg_sq"]], step=step, **kw)
        summed = sum(project(G[s], (mats[0][s],), "left") for s in rows)
        dirs = []
        for b, c in zip(blocks, cols):
            (d,) = adamw_direction(
                [summed[:, c]], [b["exp_avg"]], [b["exp_avg_sq"]], step=step, **kw
            )
            assert d.shape == (r, c.stop - c.start)
            dirs.append(d)
        gathered = torch.cat(dirs, dim=1)
        torch.testing.assert_close(gathered, N, rtol=1e-12, atol=1e-12)
        update = project_back(N, mats, "left")
        for s in rows:
            torch.testing.assert_close(
                project_back(gathered, (mats[0][s],), "left"), update[s], rtol=1e-12, atol=1e-12
            )
    for b, c in zip(blocks, cols):
        for key in dense:
            torch.testing.assert_close(b[key], dense[key][:, c], rtol=1e-12, atol=1e-12)


def test_project_shard_and_back_in_one_process_are_project_and_back():
    g = torch.randn(6, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for side in ("left", "right", "full"):
        mats = new_projector(g, 2, side, "svd")
        low = project_shard(g, mats, side, g)
        assert torch.equal(low, project(g, mats, side))
        assert torch.equal(project_back_shard(low, mats, side, g), project_back(low, mats, side))


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
    # right projection: (m_k, r) moments and the rank's column block of the (r, n) Q; left: the
    # rank's column block (torch.chunk's split of the n columns) of the (r, n) moments and its
    # (m_k, r) rows of P; full: the whole (r, r) moments, P's rows and Q's column block; plain AdamW
    # on the biases: the rank's rows
    for r, out in enumerate(fsdp_ranks):
        m_k = {m: b - a for m, ((a, b)) in ((m, ROWS[m][r]) for m in ROWS)}
        n_k = {n: b - a for n, ((a, b)) in ((n, COLS[n][r]) for n in COLS)}
        state = {k: tuple(v.tolist()) for k, v in out["galore_adamw"]["state"].items()}
        assert state["lin1.weight.exp_avg"] == (m_k[13], 2)
        assert state["lin1.weight.proj_right"] == (2, n_k[6])
        assert state["lin2.weight.exp_avg"] == (2, n_k[13])
        assert state["lin2.weight.exp_avg_sq"] == (2, n_k[13])
        assert state["lin2.weight.proj_left"] == (m_k[5], 2)
        assert state["head.weight.exp_avg"] == (2, n_k[5])
        assert state["head.weight.exp_avg_sq"] == (2, n_k[5])
        assert state["head.weight.proj_left"] == (m_k[3], 2)
        assert state["lin1.bias.exp_avg"] == (m_k[13],)
        golore = {k: tuple(v.tolist()) for k, v in out["golore_adamw"]["state"].items()}
        assert golore["lin2.weight.exp_avg_sq"] == (2, n_k[13])
        sgd = {k: tuple(v.tolist()) for k, v in out["galore_sgd"]["state"].items()}
        assert sgd["lin2.weight.momentum_buffer"] == (2, n_k[13])
        assert sgd["head.weight.momentum_buffer"] == (2, n_k[5])
        # reverse_std: lin1 (13×6) is projected on the left, lin2 (5×13) on the right
        rev = {k: tuple(v.tolist()) for k, v in out["golore_sgd_reverse"]["state"].items()}
        assert rev["lin1.weight.momentum_buffer"] == (2, n_k[6])
        assert rev["lin1.weight.proj_left"] == (m_k[13], 2)
        assert rev["lin2.weight.momentum_buffer"] == (m_k[5], 2)
        full = {k: tuple(v.tolist()) for k, v in out["galore_adamw_torch_full"]["state"].items()}
        assert full["lin1.weight.exp_avg"] == (2, 2)
        assert full["lin1.weight.proj_left"] == (m_k[13], 2)
        assert full["lin1.weight.proj_right"] == (2, n_k[6])


@pytest.mark.multiprocess
def test_fsdp2_gathers_one_gradient_per_matrix_only_at_svd_refreshes(fsdp_ranks):
    svd_refresh = [(13, 6), (5, 13), (3, 5)]  # every projected matrix, once, in order
    for out in fsdp_ranks:
        for name in (n for n in CONFIGS if n not in OWNER_CONFIGS):
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


# ---------------------------------------------------------------- owner-rank forms
@pytest.mark.multiprocess
def test_fsdp2_8bit_and_adafactor_keep_whole_state_on_the_owner_only(fsdp_ranks):
    # (the 2-rank results equal one process's: test_fsdp2_two_ranks_equal_one_process covers them)
    for name in OWNER_CONFIGS:
        for r, out in enumerate(fsdp_ranks):
            layers = {k.split(".")[0] for k in out[name]["state"]}
            assert layers == {layer for layer, owner in OWNERS.items() if owner == r}, (name, r)
            state = {k: tuple(v.tolist()) for k, v in out[name]["state"].items()}
            if r == 0 and name == "galore_adamw8bit":  # whole (r, n) / (m, r) shapes, not rows
                assert state["lin1.weight.proj_right"] == (2, 6)
                assert state["lin1.weight.state1"] == (13, 2)  # 8-bit moments (min_8bit_size 16)
                assert state["lin1.weight.absmax1"] == (1,)
            if r == 1 and name == "golore_adafactor":
                assert state["lin2.weight.exp_avg"] == (
                    2,
                    13,
                )  # 5x13: left projection, all 13 columns


@pytest.mark.multiprocess
def test_fsdp2_owner_forms_hold_one_whole_parameter_at_a_time(fsdp_ranks):
    # each step gathers every sharded parameter's weight and gradient, one parameter after the other;
    # alive = earlier gathered tensors still referenced at a gather: the weight while its gradient is
    # gathered (1). gloo's worker thread may still reference the previous parameter's broadcast buffer
    # for a moment after dist.broadcast returned (it drops the work after completing its future:
    # seen once in several runs), so 2 is tolerated; more would be a tensor kept by the optimizer
    shapes = [
        (13, 6),
        (13, 6),
        (5, 13),
        (5, 13),
        (3, 5),
        (3, 5),
        (13,),
        (13,),
        (5,),
        (5,),
        (3,),
        (3,),
    ]
    for out in fsdp_ranks:
        for name in OWNER_CONFIGS:
            assert out[name]["gathers"] == [shapes] * STEPS, name
            assert 1 <= max(out[name]["alive"]) <= 2, (name, out[name]["alive"])


@pytest.mark.multiprocess
def test_fsdp2_layerwise_stepping_equals_one_process(fsdp_ranks):
    # FSDP2 runs each sharded parameter's post-accumulate-grad hooks after its reduce-scatter: the
    # layer-wise step updates its rows there, the same as optimizer.step() in one process
    for name in LAYERWISE:
        init, ref = _one_process(name)
        for r, out in enumerate(fsdp_ranks):
            got = out["layerwise"][name]
            assert got["grads_left"] == [0] * STEPS, (name, got["grads_left"])  # every one freed
            for n in ref:
                moved = (ref[n] - init[n]).norm()
                err = ((got["params"][n] - ref[n]).norm() / moved).item()
                assert err < TOL, (name, r, n, err)
    for out in fsdp_ranks:
        assert out["layerwise_refusal"].startswith(
            "layer-wise stepping across processes needs every trained parameter sharded by FSDP2"
        ), out["layerwise_refusal"]
        assert "under DDP the gradient hook fires before the all-reduce" in out["layerwise_refusal"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["galore_adamw", "galore_adafactor"])
def test_fsdp2_a_failing_projector_raises_on_every_rank(fsdp_ranks, name):
    # a NaN in one rank's shard of a gradient: the SVD fails (on every rank for the row-shard
    # algebra, which gathers the gradient everywhere; on the owner alone for Adafactor / 8-bit):
    # both ranks raise, neither waits in a collective
    messages = [out["nan"][name] for out in fsdp_ranks]
    assert all(messages), messages
    assert any("has NaN/Inf values" in m for m in messages), messages
