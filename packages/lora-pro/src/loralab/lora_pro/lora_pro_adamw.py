"""``lora-pro-adamw``'s entry point (PyPI ``lora-pro-adamw`` 0.2.1, import name ``lora_pro``, by
bamps53): ``LoRAProAdamW(model, lr, weight_decay, betas, eps, find_peft, lorapro_mode, efficient_solver)``.

A different project from the seed (laihongphuc/lora_pro, :mod:`loralab.lora_pro.compat`). Same
constructor — names, positional order and defaults — so its README code runs with only the import
changed; the optimizer is :class:`~loralab.lora_pro.LoraProAdamW`, with every argument mapped:

- ``lorapro_mode`` → ``mode`` (``"full"``, its default, or ``"efficient"``; case-insensitive as there);
- ``efficient_solver`` → the efficient mode's ``x_mode``: ``"eig"`` solves the paper's Sylvester
  equation ``BᵀB·X + X·AAᵀ = C`` (``x_mode="sylvester"``); ``"vec"`` (its default) solves
  ``AAᵀ·X + X·BᵀB = C``, which is what its vec-trick computes (``x_mode="sylvester_swapped"``). In full
  mode it has no role, there as here: full mode always solves the paper's equation.
- ``weight_decay`` → decoupled decay of the LoRA factors by ``1 − lr·λ`` (``weight_decay_mode="factors"``,
  its rule in both modes) and ``torch.optim.AdamW``'s for every other trainable parameter;
- ``find_peft``: in ``lora-pro-adamw`` it only adds a fallback for modules with ``lora_A_default``
  attributes (no PEFT version has them); PEFT LoRA layers are found with either value, there as here.
  Models without PEFT LoRA layers raise :class:`loralab.core.LoraPairError`.

Where the numbers differ (see the README): its full mode keeps the second moment in bfloat16 (we use
float32: ≤ 2e-3 relative after a few steps); its efficient mode regularises with an absolute
``1e-6·I`` (we use pseudo-inverses; visible while B is still tiny after a fresh init); it uses α/r even
with ``use_rslora`` (we use the scaling PEFT's forward uses, α/√r); it always trains the adapter named
``"default"`` (we train the active one).

Example:
    >>> import peft, torch
    >>> model = peft.get_peft_model(
    ...     torch.nn.Sequential(torch.nn.Linear(32, 24, bias=False)),
    ...     peft.LoraConfig(target_modules=["0"], r=8, lora_alpha=16, lora_dropout=0.0, bias="none"),
    ... )
    >>> optimizer = LoRAProAdamW(model, lr=1e-3, weight_decay=0.0)
    >>> optimizer.param_groups[0]["mode"], optimizer.param_groups[0]["weight_decay_mode"]
    ('full', 'factors')
"""

from __future__ import annotations

from typing import cast

from torch import nn

from loralab.lora_pro.adjust import XMode
from loralab.lora_pro.optimizer import LoraProAdamW, Mode

__all__ = ["LoRAProAdamW"]

LORAPRO_MODES = ("full", "efficient")
EFFICIENT_SOLVERS: dict[str, XMode] = {"vec": "sylvester_swapped", "eig": "sylvester"}
EFFICIENT_JITTER = 1e-6
FULL_JITTER = 1e-8


class LoRAProAdamW(LoraProAdamW):
    """Drop-in for ``lora_pro.LoRAProAdamW`` (lora-pro-adamw 0.2.1): same constructor, a real
    ``torch.optim.Optimizer``.

    Args:
        model: the PEFT model (``lora-pro-adamw`` also takes the model, not parameters).
        lr: learning rate of every parameter.
        weight_decay: decoupled weight decay (LoRA factors ``× (1 − lr·λ)``, others as AdamW).
        betas, eps: Adam's.
        find_peft: accepted for compatibility (a bool; PEFT layers are found either way, as there).
        lorapro_mode: ``"full"`` (Adam on the m×n equivalent gradient) or ``"efficient"``.
        efficient_solver: ``"vec"`` or ``"eig"``: which ``X`` efficient mode uses (module docstring).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (e.g. ``model.parameters()``).
        ValueError: an unknown ``lorapro_mode`` / ``efficient_solver``, a non-bool ``find_peft`` or an
            invalid AdamW hyper-parameter.
        loralab.core.LoraPairError: the model has no PEFT LoRA layer.

    Example:
        >>> # see the module docstring
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        find_peft: bool = True,
        lorapro_mode: str = "full",
        efficient_solver: str = "vec",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"LoRAProAdamW takes the model itself (LoRAProAdamW(model, lr=...)), as lora-pro-adamw does, "
                f"got {type(model).__name__}"
            )
        if not isinstance(find_peft, bool):
            raise ValueError(f"find_peft must be a bool, got {find_peft!r}")
        mode = lorapro_mode.lower() if isinstance(lorapro_mode, str) else lorapro_mode
        if mode not in LORAPRO_MODES:
            raise ValueError(f"lorapro_mode must be 'full' or 'efficient', got {lorapro_mode!r}")
        solver = efficient_solver.lower() if isinstance(efficient_solver, str) else efficient_solver
        if solver not in EFFICIENT_SOLVERS:
            raise ValueError(f"efficient_solver must be 'vec' or 'eig', got {efficient_solver!r}")
        self.find_peft = find_peft
        self.lorapro_mode = mode
        self.efficient_solver = solver
        super().__init__(
            model,
            lr,
            betas,
            eps,
            weight_decay,
            mode=cast(Mode, mode),  # one of LORAPRO_MODES, checked above
            x_mode=EFFICIENT_SOLVERS[solver] if mode == "efficient" else "sylvester",
            # its absolute regularisation of BᵀB and AAᵀ: 1e-6 in efficient mode, 1e-8 in full mode
            jitter=EFFICIENT_JITTER if mode == "efficient" else FULL_JITTER,
            weight_decay_mode="factors",
        )
