"""Layer-wise stepping (per-parameter hooks) equals normal stepping, with gradient accumulation."""

import copy

import pytest
import torch

from loralab.core.testing import make_lm_batches
from loralab.golore import GaLoreAdamW, GoLoreSGD
from loralab.golore.layerwise import register_layerwise_step

ACC = 2


@pytest.mark.parametrize("cls,kw", [(GaLoreAdamW, {}), (GoLoreSGD, {"momentum": 0.9})])
def test_layerwise_with_accumulation_equals_normal_steps(cls, kw, llama, split_groups):
    batches = make_lm_batches(6)
    ref_model, lw_model = copy.deepcopy(llama), copy.deepcopy(llama)
    sub = dict(rank=4, update_proj_gap=2)
    ref_opt = cls(split_groups(ref_model, **sub), lr=1e-3, **kw)
    lw_opt = cls(split_groups(lw_model, **sub), lr=1e-3, **kw)
    handle = register_layerwise_step(lw_opt, accumulation_steps=ACC)
    ref_model.train()
    lw_model.train()
    for k, b in enumerate(batches):
        (ref_model(**b).loss / ACC).backward()
        if (k + 1) % ACC == 0:
            ref_opt.step()
            ref_opt.zero_grad()
        (lw_model(**b).loss / ACC).backward()
        grads_left = [p.grad is not None for p in lw_model.parameters()]
        # gradients are freed on the stepping micro-batch and kept (accumulating) on the others
        assert not any(grads_left) if (k + 1) % ACC == 0 else all(grads_left)
        if (k + 1) % ACC == 0:
            lw_opt.step()  # the usual loop's call is a no-op here: no gradient is left to step
    handle.remove()
    for a, b in zip(ref_model.parameters(), lw_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # state_dict still one optimizer
    assert len(lw_opt.state_dict()["state"]) == len(list(lw_model.parameters()))


def test_layerwise_errors():
    lin = torch.nn.Linear(3, 3)
    with pytest.raises(TypeError, match=r"loralab\.golore optimizer"):
        register_layerwise_step(torch.optim.AdamW(lin.parameters()))
    with pytest.raises(ValueError, match="accumulation_steps"):
        register_layerwise_step(GaLoreAdamW(lin.parameters()), accumulation_steps=0)
