"""The seed project's entry point (laihongphuc/lora_pro on GitHub): ``AdamWLoRAPro(params, lr, ..., T_max, scaling_factor)``.

Not the PyPI package ``lora-pro-adamw`` (import name ``lora_pro``), a different project: its
``LoRAProAdamW`` drop-in is :mod:`loralab.lora_pro.lora_pro_adamw`.

The seed's ``AdamWLoraPro`` is a plain class (not a ``torch.optim.Optimizer``) that takes
``model.parameters()``, keeps those with ``requires_grad`` and assumes they alternate ``A, B, A, B``
(PEFT's order when only LoRA factors are trainable), uses one ``scaling_factor`` for all layers, and
sets its own learning rate each step from a cosine schedule with restarts whose period doubles
(``T_max``). This drop-in keeps that constructor and behaviour so the seed's training loop runs with
only the import changed, but is a real optimizer (:class:`~loralab.lora_pro.LoraProAdamW`, efficient
mode, Sylvester ``X``): it validates the pairing instead of silently mis-pairing, and its state
round-trips through ``state_dict``.

Differences from the seed (documented, deliberate): the seed adjusts the gradients with ``X = 0``,
runs Adam, then re-splits the resulting equivalent update between A and B with the Sylvester ``X``;
we use the Sylvester ``X`` before Adam (the official efficient mode). Both give updates whose
first-order effect on W lies in the same LoRA tangent space; the factor split differs. The seed's
``pinv(BᵀB + eps·I)`` with an absolute jitter is replaced by the pseudo-inverse (exact at B = 0).
``L2_regularization=True`` adds ``λ·p`` to the gradients *instead of* decoupled decay (the seed
applied both).

Example:
    >>> import peft, torch
    >>> from loralab.core.testing import tiny_llama
    >>> model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    >>> opt = AdamWLoRAPro(model.parameters(), lr=1e-3, weight_decay=0.0, T_max=100, scaling_factor=2.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from loralab.core.lora_layers import LoraPair
from loralab.lora_pro.optimizer import LoraProAdamW

__all__ = ["AdamWLoRAPro", "AdamWLoraPro"]


def _pairs_from_alternating(params: list[Tensor], scaling: float) -> list[LoraPair]:
    if len(params) % 2:
        raise ValueError(
            f"AdamWLoRAPro expects trainable parameters alternating lora_A, lora_B (got {len(params)}, an odd number): "
            "freeze everything but the LoRA factors, or use LoraProAdamW(model) which pairs by module"
        )
    pairs = []
    for i in range(0, len(params), 2):
        A, B = params[i], params[i + 1]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"AdamWLoRAPro: trainable parameters {i} and {i + 1} (shapes {tuple(A.shape)}, {tuple(B.shape)}) are not a "
                "(lora_A (r, in), lora_B (out, r)) pair; the seed API needs them alternating A, B. "
                "Use LoraProAdamW(model) to pair by module and train other parameters too"
            )
        pairs.append(
            LoraPair(
                name=f"pair{i // 2}",
                # the seed API hands over bare tensors: there is no module, and nothing reads it
                module=None,  # type: ignore[arg-type]
                adapter="default",
                A=A,
                B=B,
                scaling=float(scaling),
            )
        )
    return pairs


class AdamWLoRAPro(LoraProAdamW):
    """Drop-in for the seed's ``AdamWLoraPro`` (same constructor; a real ``torch.optim.Optimizer``).

    Args:
        model_params: ``model.parameters()``; those with ``requires_grad`` must alternate A, B.
        lr: initial learning rate (the cosine schedule's peak).
        betas, eps: Adam's.
        weight_decay: decoupled, ``p ← p(1 − lr·λ)``.
        T_max: period of the seed's cosine-with-restarts schedule (doubles at each restart); ``None``
            or ``0`` keeps ``lr`` constant (use a torch LR scheduler instead).
        L2_regularization: add ``λ·p`` to the gradients instead of decoupled decay.
        scaling_factor: the LoRA scaling ``s = α/r`` of every layer.
    """

    def __init__(
        self,
        model_params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        eps: float = 1e-8,
        T_max: int | None = 1000,
        L2_regularization: bool = False,
        scaling_factor: float = 2.0,
    ) -> None:
        params = [p for p in model_params if p.requires_grad]
        if not params:
            raise ValueError("AdamWLoRAPro got no trainable parameters")
        if T_max is not None and (not isinstance(T_max, int) or T_max < 0):
            raise ValueError(f"T_max must be a non-negative int or None, got {T_max!r}")
        pairs = _pairs_from_alternating(params, scaling_factor)
        self.L2_regularization = bool(L2_regularization)
        self.l2 = weight_decay if L2_regularization else 0.0
        super().__init__(
            params,
            lr,
            betas,
            eps,
            0.0 if L2_regularization else weight_decay,
            mode="efficient",
            x_mode="sylvester",
            pairs=pairs,
        )
        for group in self.param_groups:
            group.setdefault("peak_lr", lr)
            group.setdefault("T_max", T_max or 0)
            group.setdefault("n_warmup_steps", 0)

    @property
    def lr(self) -> float:
        """The learning rate of the last step (the seed exposed ``optimizer.lr``)."""
        return float(self.param_groups[0]["lr"])

    def _seed_schedule(self, group: dict[str, Any]) -> None:
        # The seed's set_warmup(): lr = lr0·(½ + ½cos(π·n/T)), and at n == T the period doubles and n resets.
        if not group["T_max"]:
            return
        if group["n_warmup_steps"] == group["T_max"]:
            group["T_max"] *= 2
            group["n_warmup_steps"] = 0
        group["lr"] = group["peak_lr"] * (
            0.5 + 0.5 * math.cos(group["n_warmup_steps"] / group["T_max"] * math.pi)
        )
        group["n_warmup_steps"] += 1

    @torch.no_grad()
    # torch.optim.Optimizer.step types the closure's result as float; ours returns the loss Tensor
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._seed_schedule(group)
            if self.l2:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.add_(p, alpha=self.l2)
        super().step()
        return loss

    def zero_grad(self, set_to_none: bool = False) -> None:
        """The seed's default was ``set_to_none=False``."""
        super().zero_grad(set_to_none=set_to_none)


AdamWLoraPro = AdamWLoRAPro
"""The seed's own spelling."""
