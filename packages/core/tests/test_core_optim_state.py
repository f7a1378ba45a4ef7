"""check_state_dict: an optimizer state of another model, rank or mode is refused, naming the parameter."""

from __future__ import annotations

import pytest
import torch

from loralab.core.optim_state import check_state_dict


def _adamw(*shapes):
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = torch.optim.AdamW([{"params": params, "rank": 4}])
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


def _same(p, group):
    return {"exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}


def test_accepts_its_own_state():
    opt = _adamw((2, 3), (3,))
    check_state_dict(opt, opt.state_dict(), _same, settings=("rank",))


def test_refuses_other_shapes_naming_parameter_and_both_shapes():
    saved = _adamw((2, 3), (3,)).state_dict()
    with pytest.raises(
        ValueError,
        match=r"parameter 0 of param group 0 \(shape \(5, 3\)\).*'exp_avg' has shape \(2, 3\).*expects \(5, 3\)",
    ):
        check_state_dict(_adamw((5, 3), (3,)), saved, _same)


def test_refuses_other_setting_old_to_new():
    saved = _adamw((2, 3)).state_dict()
    opt = _adamw((2, 3))
    opt.param_groups[0]["rank"] = 8
    with pytest.raises(
        ValueError, match=r"saved with rank=4, this optimizer has rank=8 \(rank 4 → 8\)"
    ):
        check_state_dict(opt, saved, _same, settings=("rank",))


def test_refuses_other_group_and_parameter_counts():
    with pytest.raises(
        ValueError, match=r"param group 0 has 1 parameter\(s\) in the state, 2 in this"
    ):
        check_state_dict(_adamw((2, 3), (3,)), _adamw((2, 3)).state_dict(), _same)
    two = torch.optim.AdamW(
        [
            {"params": [torch.nn.Parameter(torch.zeros(1))]},
            {"params": [torch.nn.Parameter(torch.zeros(1))]},
        ]
    )
    with pytest.raises(ValueError, match=r"the state has 2 param group\(s\), this optimizer 1"):
        check_state_dict(_adamw((2, 3)), two.state_dict(), _same)


def test_refuses_what_is_not_a_state_dict():
    with pytest.raises(ValueError, match="not an optimizer state_dict"):
        check_state_dict(_adamw((2, 3)), {"exp_avg": 1}, _same)
