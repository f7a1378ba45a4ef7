"""Same-shape projections batched (``loralab.golore.batching``): the same numbers as one matrix at a
time, whatever the number of matrices in the call, and few operators per step."""

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from loralab.golore import GaLoreAdamW, GaLoreSGD, batching
from loralab.golore.projector import project, project_back


def _q(n, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_project_and_add_back_equal_one_matrix_at_a_time(side):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(12, 9, generator=g, dtype=torch.float64) for _ in range(5)]
    mats = [_q(12, 3, k) if side == "left" else _q(9, 3, k).T.contiguous() for k in range(5)]
    lows = batching.project_batch(grads, mats, side)
    for g_, m, low in zip(grads, mats, lows):
        torch.testing.assert_close(low, project(g_, (m,), side), rtol=0, atol=1e-13)
    params = [torch.randn(12, 9, generator=g, dtype=torch.float64) for _ in range(5)]
    want = [p - 0.3 * project_back(low, (m,), side) for p, low, m in zip(params, lows, mats)]
    batching.add_back_batch_(params, lows, mats, side, -0.3)
    for p, w in zip(params, want):
        torch.testing.assert_close(p, w, rtol=0, atol=1e-13)


def test_chunks_bound_the_stacked_elements(monkeypatch):
    monkeypatch.setattr(batching, "BATCH_ELEMENTS", 100)
    assert [(s.start, s.stop) for s in batching.chunks(7, 30)] == [(0, 3), (3, 6), (6, 7)]
    assert [(s.start, s.stop) for s in batching.chunks(2, 500)] == [(0, 1), (1, 2)]
    assert batching.batchable(torch.zeros(5, 10), "left")
    assert not batching.batchable(torch.zeros(10, 10), "right")  # 2 * 100 > 100
    assert not batching.batchable(torch.zeros(5, 10), "full")
    assert not batching.batchable(torch.zeros(5, 10), None)


def _params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    return ps


SHAPES = [(16, 8)] * 3 + [(8, 16)] * 3 + [(12, 12)] * 2 + [(16,)] * 2


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreSGD])
@pytest.mark.parametrize("small", [True, False])
def test_one_parameter_at_a_time_equals_all_at_once(cls, small, monkeypatch):
    """The path of a matrix depends on its size only: stepping one parameter per call (a ZeRO owner
    rank, layer-wise stepping) gives bit for bit what one step over all of them gives."""
    if not small:  # every matrix over the batching limit: one addmm_ each
        monkeypatch.setattr(batching, "BATCH_ELEMENTS", 64)
    kw = {"momentum": 0.9} if cls is GaLoreSGD else {"weight_decay": 0.1}
    a, b = _params(SHAPES), _params(SHAPES)

    def groups(ps):
        return [
            {"params": ps[:8], "rank": 4, "update_proj_gap": 2, "scale": 0.5},
            {"params": ps[8:]},
        ]

    oa, ob = cls(groups(a), lr=1e-2, **kw), cls(groups(b), lr=1e-2, **kw)
    for step in range(3):  # a projector refresh at step 2 (gap 2)
        oa.step()
        for p in b:
            ob.step_parameter(p)
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb), (step, tuple(pa.shape))
            pa.grad = pb.grad = torch.randn(pa.shape, generator=torch.Generator().manual_seed(step))


def test_batched_step_equals_the_per_matrix_formula():
    """GaLore AdamW's update through the batched path, against the per-matrix formula in float64."""
    ps = _params([(16, 8)] * 4, seed=3)
    ps = [torch.nn.Parameter(p.detach().double()) for p in ps]
    for k, p in enumerate(ps):
        p.grad = torch.randn(
            p.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64
        )
    before = [p.detach().clone() for p in ps]
    opt = GaLoreAdamW([{"params": ps, "rank": 3, "scale": 0.25}], lr=0.1, svd_method="full")
    opt.step()
    for p, w in zip(ps, before):
        q = opt.state[p]["proj_right"]  # 16 x 8: right side, Q (3, 8)
        low = p.grad @ q.T
        m, v = 0.1 * low, 0.001 * low * low
        n = m / (v.sqrt() + 1e-6) * (0.001**0.5 / 0.1)  # transformers-style AdamW, step 1
        torch.testing.assert_close(p.detach(), w - 0.1 * 0.25 * (n @ q), rtol=0, atol=1e-12)


def test_operators_per_step_do_not_grow_with_the_number_of_matrices():
    """One bmm per shape group and direction, not one product per matrix (GPU steps were launch-bound)."""

    def count(n_layers):
        ps = _params([(16, 8)] * n_layers + [(8, 16)] * n_layers)
        opt = GaLoreAdamW([{"params": ps, "rank": 4, "update_proj_gap": 100}], lr=1e-3)
        opt.step()  # projectors
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step()
        names = [e.name for e in prof.events()]
        return names.count("aten::bmm"), names.count("aten::mm") + names.count("aten::addmm_")

    assert count(2) == count(6) == (4, 0)


def test_deepcopy_and_state_dict_unchanged_by_batching():
    """Projected gradients are views of one stacked tensor during the step only: the state holds
    tensors of each parameter's own shape."""
    ps = _params([(16, 8)] * 3)
    opt = GaLoreAdamW([{"params": ps, "rank": 4}], lr=1e-3)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        assert st["exp_avg"].shape == (16, 4) and st["exp_avg"].is_contiguous()
        assert st["exp_avg"].untyped_storage().nbytes() == 16 * 4 * 4
