"""Shared helpers of the lora-pro tests: a toy regression model and dense float64 references."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from torch import nn

IN, HID, OUT, RANK = 16, 12, 6, 3


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(IN, HID)
        self.lin2 = nn.Linear(HID, HID)
        self.head = nn.Linear(HID, OUT)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        y = self.head(torch.tanh(self.lin2(torch.tanh(self.lin1(x)))))
        return ((y - labels) ** 2).mean() if labels is not None else y


def toy_peft(seed: int = 0, dtype=torch.float64, *, b_random: bool = True, **cfg) -> nn.Module:
    torch.manual_seed(seed)
    config = dict(r=RANK, lora_alpha=6, target_modules=["lin1", "lin2"], modules_to_save=["head"])
    config.update(cfg)
    model = peft.get_peft_model(Toy(), peft.LoraConfig(**config)).to(dtype)
    # B = 0 at init makes the first steps degenerate; most reference tests want a generic point
    if b_random:
        g = torch.Generator().manual_seed(seed + 100)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) * 0.3)
    return model


def toy_batches(n: int, batch: int = 8, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "x": torch.randn(batch, IN, generator=g, dtype=torch.float64).to(dtype),
            "labels": torch.randn(batch, OUT, generator=g, dtype=torch.float64).to(dtype),
        }
        for _ in range(n)
    ]


def ref_adjust(A, B, gA, gB, s, x_mode="sylvester"):
    """Literal float64 transcription of Theorem 2.1 / 2.3 with pseudo-inverses (scipy-free)."""
    A, B, gA, gB = (t.double() for t in (A, B, gA, gB))
    BtB_inv = torch.linalg.pinv(B.T @ B, hermitian=True)
    AAt_inv = torch.linalg.pinv(A @ A.T, hermitian=True)
    r = A.shape[0]
    if x_mode == "sylvester":
        # vec trick: (I ⊗ BᵀB + (AAᵀ)ᵀ ⊗ I) vec(X) = vec(C), column-major vec
        C = -(1 / s**2) * BtB_inv @ gA @ A.T
        K = torch.kron(torch.eye(r, dtype=A.dtype), B.T @ B) + torch.kron(
            (A @ A.T).T.contiguous(), torch.eye(r, dtype=A.dtype)
        )
        X = (torch.linalg.pinv(K) @ C.T.reshape(-1)).reshape(r, r).T
    elif x_mode == "symmetry":
        X = -0.5 / s**2 * BtB_inv @ B.T @ gB @ (A @ A.T)
    else:
        X = torch.zeros(r, r, dtype=A.dtype)
    nA = (1 / s**2) * BtB_inv @ gA + X @ A
    nB = (1 / s**2) * (
        torch.eye(B.shape[0], dtype=A.dtype) - B @ BtB_inv @ B.T
    ) @ gB @ AAt_inv - B @ X
    return nA, nB


class RefAdam:
    """Dense AdamW (torch convention), bias correction from step 1."""

    def __init__(self, lr, betas=(0.9, 0.999), eps=1e-8, wd=0.0):
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, wd
        self.m, self.v, self.t = {}, {}, {}

    def direction(self, key, g):
        b1, b2 = self.betas
        self.t[key] = self.t.get(key, 0) + 1
        self.m[key] = b1 * self.m.get(key, torch.zeros_like(g)) + (1 - b1) * g
        self.v[key] = b2 * self.v.get(key, torch.zeros_like(g)) + (1 - b2) * g * g
        t = self.t[key]
        return (self.m[key] / (1 - b1**t)) / ((self.v[key] / (1 - b2**t)).sqrt() + self.eps)


def lora_modules(model):
    from loralab.core import find_lora_pairs

    return find_lora_pairs(model)


@pytest.fixture
def lp():
    """The helpers above as one namespace (tests import nothing from conftest under importlib mode)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        IN=IN,
        OUT=OUT,
        RANK=RANK,
        RefAdam=RefAdam,
        Toy=Toy,
        lora_modules=lora_modules,
        math=math,
        ref_adjust=ref_adjust,
        toy_batches=toy_batches,
        toy_peft=toy_peft,
    )
