"""Shared helpers for the lora-sb tests (tiny models and batches come from loralab.core.testing)."""

import pytest
import torch
from torch import nn

RANK = 4
LR = 1e-3


class TinyMLP(nn.Module):
    """A float64 two-layer regression net, for dense reference checks."""

    def __init__(
        self,
        n_in: int = 12,
        hidden: int = 16,
        n_out: int = 8,
        dtype: torch.dtype = torch.float64,
        seed: int = 0,
    ):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.fc1 = nn.Linear(n_in, hidden, dtype=dtype)
            self.fc2 = nn.Linear(hidden, n_out, dtype=dtype)

    def forward(self, x, labels=None):
        y = self.fc2(torch.tanh(self.fc1(x)))
        loss = None if labels is None else ((y - labels) ** 2).mean()
        return {"loss": loss, "logits": y}


def regression_batches(
    n: int, batch: int = 8, n_in: int = 12, n_out: int = 8, seed: int = 1, dtype=torch.float64
):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "x": torch.randn(batch, n_in, generator=g, dtype=dtype),
            "labels": torch.randn(batch, n_out, generator=g, dtype=dtype),
        }
        for _ in range(n)
    ]


@pytest.fixture
def mlp_factory():
    return TinyMLP


@pytest.fixture
def regression_data():
    return regression_batches
