"""load_state_dict of every GaLore/GoLore optimizer refuses a state of another model, rank or projection."""

from __future__ import annotations

import pytest
import torch

from loralab.golore import GaLoreAdamW, GaLoreSGD, GoLoreAdamW, GoLoreSGD

OPTIMIZERS = [GaLoreAdamW, GoLoreAdamW, GaLoreSGD, GoLoreSGD]
RANK = 4


def _trained(cls, out=16, inp=12, rank=RANK, proj_type="std"):
    torch.manual_seed(0)
    lin = torch.nn.Linear(inp, out)
    kw = {"momentum": 0.9} if cls in (GaLoreSGD, GoLoreSGD) else {}
    opt = cls(
        [{"params": [lin.weight], "rank": rank, "proj_type": proj_type}, {"params": [lin.bias]}],
        lr=1e-2,
        **kw,
    )
    lin(torch.randn(3, inp)).square().sum().backward()
    opt.step()
    return lin, opt


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_own_state_loads_and_steps(cls):
    _, opt = _trained(cls)
    lin, fresh = _trained(cls)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["rank"] == RANK
    lin(torch.randn(3, 12)).square().sum().backward()
    fresh.step()


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_state_of_another_rank_is_refused(cls):
    _, saved = _trained(cls, rank=8)
    _, opt = _trained(cls, rank=RANK)
    with pytest.raises(
        ValueError, match=r"param group 0: the state was saved with rank=8.*\(rank 8 → 4\)"
    ):
        opt.load_state_dict(saved.state_dict())
    assert opt.param_groups[0]["rank"] == RANK  # not switched


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_state_of_another_projection_is_refused(cls):
    _, saved = _trained(cls, proj_type="left")
    _, opt = _trained(cls, proj_type="right")
    with pytest.raises(ValueError, match=r"proj_type 'left' → 'right'"):
        opt.load_state_dict(saved.state_dict())


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_state_of_another_model_is_refused_naming_parameter_and_shapes(cls):
    _, saved = _trained(cls, out=20)
    _, opt = _trained(cls, out=16)
    # weight (16, 12), std projects the right side: moments (16, 4) against the saved (20, 4)
    with pytest.raises(
        ValueError,
        match=r"parameter 0 of param group 0 \(shape \(16, 12\)\): saved state '\w+' has shape \(20, 4\), this optimizer expects \(16, 4\)",
    ):
        opt.load_state_dict(saved.state_dict())
