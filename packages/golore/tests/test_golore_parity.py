"""Parity with galore-torch 1.0 where the definitions coincide, and what the references do not do.

Where they coincide: ``projection="svd"``, ``reproject_moments=False``, ``adamw_style="hf"``,
exact SVD, same hyper-parameters. Tolerances are float32 round-off (the two compute the same formula
in a different operation order).
"""

import copy

import pytest
import torch

from loralab.golore import GaLoreAdamW
from loralab.golore.projector import projector_side

PROJ_TYPES = ["std", "reverse_std", "left", "right", "full"]
RANK = 4
ATOL = 2e-6  # parameters are O(0.02–1), lr 1e-3, float32


def _pair(llama, split_groups, galore_torch, proj_type, gap):
    ours_model, ref_model = copy.deepcopy(llama), copy.deepcopy(llama)
    kw = dict(rank=RANK, update_proj_gap=gap, scale=0.25, proj_type=proj_type)
    ours = GaLoreAdamW(
        split_groups(ours_model, **kw, reproject_moments=False, svd_method="full"),
        lr=1e-3,
        weight_decay=0.01,
    )
    ref = galore_torch.GaLoreAdamW(
        split_groups(ref_model, **kw), lr=1e-3, weight_decay=0.01, no_deprecation_warning=True
    )
    return ours_model, ours, ref_model, ref


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_trajectory_matches_galore_torch(proj_type, llama, lm_batches, split_groups, galore_torch):
    """Six steps from the same model; the projector is computed once (update_proj_gap > steps)."""
    ours_model, ours, ref_model, ref = _pair(llama, split_groups, galore_torch, proj_type, gap=100)
    for batch in lm_batches:
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            model.train()
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=name)


def _sync_from_reference(ours, ref, ours_model, ref_model):
    """Copy galore-torch's parameters and state into ours (its projector object → our tensors)."""
    with torch.no_grad():
        for a, b in zip(ours_model.parameters(), ref_model.parameters()):
            a.copy_(b)
    for pa, pb in zip(ours_model.parameters(), ref_model.parameters()):
        sb = ref.state.get(pb)
        if not sb:
            continue
        sa = ours.state[pa]
        sa["step"] = torch.tensor(float(sb["step"]))
        sa["exp_avg"], sa["exp_avg_sq"] = sb["exp_avg"].clone(), sb["exp_avg_sq"].clone()
        if "projector" in sb:
            pr = sb["projector"]
            side = projector_side(pb.shape, pr.proj_type)
            if side == "full":
                sa["proj_left"], sa["proj_right"] = (
                    pr.ortho_matrix[0].clone(),
                    pr.ortho_matrix[1].clone(),
                )
            else:
                sa[f"proj_{side}"] = pr.ortho_matrix.clone()


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_step_for_step_with_refreshes_matches_galore_torch(
    proj_type, llama, lm_batches, split_groups, galore_torch
):
    """Every step, including projector refreshes (every 2 steps), from the same state and gradient.

    Trajectories cannot be compared across many refreshes: with stale moments the result depends
    on the arbitrary signs LAPACK gives singular vectors, and a 1e-9 difference in a gradient can
    flip one (seen on this very model) — see test_reprojected_update_does_not_depend_on_svd_signs.
    """
    ours_model, ours, ref_model, ref = _pair(llama, split_groups, galore_torch, proj_type, gap=2)
    for k, batch in enumerate(lm_batches):
        if k:
            _sync_from_reference(ours, ref, ours_model, ref_model)
        ref_model.train()
        ref.zero_grad()
        ref_model(**batch).loss.backward()
        ours.zero_grad()
        for a, b in zip(ours_model.parameters(), ref_model.parameters()):
            a.grad = b.grad.clone()
        ours.step()
        ref.step()
        for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"step {k}: {name}")


def _two_subspace_steps(opt_factory):
    """Two steps on one (6, 4) weight whose gradients live in different row spaces, refresh each step."""
    w = torch.nn.Parameter(torch.zeros(6, 4, dtype=torch.float32))
    opt = opt_factory(w)
    g1 = torch.zeros(6, 4)
    g1[0, :] = torch.tensor([3.0, 1.0, 0.0, 0.0])
    g1[1, :] = torch.tensor([0.0, 1.0, 2.0, 0.0])
    g2 = torch.zeros(6, 4)
    g2[0, :] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    g2[2, :] = torch.tensor([0.0, 2.0, 0.0, 1.0])
    w.grad = g1
    opt.step()
    m1 = opt.state[w]["exp_avg"].clone()
    w.grad = g2
    opt.step()
    return opt, w, m1, g2


def test_galore_torch_never_reprojects_the_first_moment(galore_torch):
    """Its exp_avg after a subspace change is β₁·m_old + (1−β₁)·Q_newᵀ-projected g: m_old untouched."""
    opt, w, m1, g2 = _two_subspace_steps(
        lambda w: galore_torch.GaLoreAdamW(
            [{"params": [w], "rank": 2, "update_proj_gap": 1, "scale": 1.0, "proj_type": "right"}],
            no_deprecation_warning=True,
        )
    )
    q_new = opt.state[w]["projector"].ortho_matrix  # (r, n)
    stale = 0.9 * m1 + 0.1 * (g2 @ q_new.T)
    torch.testing.assert_close(opt.state[w]["exp_avg"], stale, atol=1e-6, rtol=0)


def test_ours_reprojects_the_first_moment():
    opt, w, m1, g2 = _two_subspace_steps(
        lambda w: GaLoreAdamW(
            [
                {
                    "params": [w],
                    "rank": 2,
                    "update_proj_gap": 1,
                    "scale": 1.0,
                    "proj_type": "right",
                    "svd_method": "full",
                }
            ]
        )
    )
    q_new = opt.state[w]["proj_right"]
    # the old basis is the SVD of g1
    q_old = torch.linalg.svd(
        torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.0, 1.0, 2.0, 0.0]]), full_matrices=False
    )[2][:2]
    carried = m1 @ q_old @ q_new.T
    torch.testing.assert_close(
        opt.state[w]["exp_avg"], 0.9 * carried + 0.1 * (g2 @ q_new.T), atol=1e-5, rtol=0
    )
    stale = 0.9 * m1 + 0.1 * (g2 @ q_new.T)
    assert (opt.state[w]["exp_avg"] - stale).abs().max() > 1e-2


def test_golore_reference_pattern_loses_the_reprojection():
    """GoLore's ``golore_torch/adamw.py`` (pkumelon/Golore @f89d9ff, lines ~95-101) re-projects with
    ``exp_avg = matrix.T @ (state["matrix"] @ exp_avg)``: a new local tensor, so the stored
    ``state["exp_avg"]`` stays in the old basis (and misses that step's update). The same Python
    pattern, restated on tensors, next to ours (``copy_`` into the state)."""
    state = {"exp_avg": torch.ones(2, 3), "matrix": torch.eye(4)[:, :2]}
    new = torch.eye(4)[:, 2:]
    exp_avg = state["exp_avg"]
    exp_avg = new.T @ (state["matrix"] @ exp_avg)  # the reference's statement
    exp_avg.mul_(0.9)
    assert torch.equal(state["exp_avg"], torch.ones(2, 3))  # stored state: not re-projected
    ours = {"exp_avg": torch.ones(2, 3)}
    ours["exp_avg"].copy_(new.T @ (state["matrix"] @ ours["exp_avg"]))
    assert torch.equal(ours["exp_avg"], torch.zeros(2, 3))  # orthogonal new subspace → carried to 0


@pytest.mark.parametrize("proj_type", ["right", "left"])
def test_rank_above_the_smaller_dimension_matches_galore_torch(proj_type, galore_torch):
    """A (2, 150) and a (150, 2) matrix with rank 3: the thin SVD has 2 singular vectors, which
    galore-torch keeps silently (``Vh[:rank]``, ``U[:, :rank]``); ours stepped into an error
    (the rank was clipped to the projected dimension only, 150) until 2026-12-05. (galore-torch
    itself fails here with ``reverse_std``: its back-projection picks the side from the low-rank
    gradient's shape, which is square; ours runs, see the next test.)"""
    torch.manual_seed(0)
    weights = [torch.randn(2, 150), torch.randn(150, 2)]
    ours_w = [torch.nn.Parameter(w.clone()) for w in weights]
    ref_w = [torch.nn.Parameter(w.clone()) for w in weights]
    kw = dict(rank=3, update_proj_gap=2, scale=0.25, proj_type=proj_type)
    ours = GaLoreAdamW(
        [{"params": ours_w, **kw, "reproject_moments": False, "svd_method": "full"}],
        lr=1e-2,
        weight_decay=0.01,
    )
    ref = galore_torch.GaLoreAdamW(
        [{"params": ref_w, **kw}], lr=1e-2, weight_decay=0.01, no_deprecation_warning=True
    )
    for step in range(3):
        targets = [
            torch.randn(w.shape, generator=torch.Generator().manual_seed(step)) for w in weights
        ]
        for ws, opt in ((ours_w, ours), (ref_w, ref)):
            opt.zero_grad()
            sum(((w - t) ** 2).sum() for w, t in zip(ws, targets)).backward()
            opt.step()
    for a, b in zip(ours_w, ref_w):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert ours.state[ours_w[0]]["exp_avg"].shape == ((2, 2) if proj_type == "right" else (2, 150))


def test_rank_above_the_smaller_dimension_with_reverse_std():
    w = torch.nn.Parameter(torch.randn(2, 150, generator=torch.Generator().manual_seed(0)))
    before = w.detach().clone()
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "proj_type": "reverse_std"}], lr=1e-2)
    (w**2).sum().backward()
    opt.step()
    assert opt.state[w]["proj_right"].shape == (2, 150)  # Q: 2 of the 150 directions
    assert torch.isfinite(w).all() and not torch.equal(w, before)
