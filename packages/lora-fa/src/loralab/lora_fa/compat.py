"""PEFT's ``create_lorafa_optimizer`` entry point, as a thin wrapper over :class:`LoraFAAdamW`.

Same signature and numerics as ``peft.optimizers.create_lorafa_optimizer`` (betas (0.9, 0.999),
``eps=1e-6``, transformers-style bias correction ``lr·√bc₂/bc₁``, weight decay applied after the step,
plain AdamW for every other trainable parameter), so switching is a one-line import change. The
scaling is each layer's own (``rank_pattern`` / ``alpha_pattern`` / rsLoRA, read from the PEFT layer),
as in PEFT ≥ 0.18; ``r`` and ``lora_alpha`` are only checked against the model's config.

What is better than PEFT's: see :mod:`loralab.lora_fa.optimizer` (pairing by module, cached
``(A·Aᵀ)⁻¹`` in float64 instead of a bf16 ``pinv`` per step, batched maths, tensor state that
resumes on the right device, errors instead of silent plain LoRA).

Example:
    >>> import peft, torch
    >>> from loralab.core.testing import tiny_llama
    >>> from loralab.lora_fa import create_lorafa_optimizer
    >>> model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    >>> opt = create_lorafa_optimizer(model, r=4, lora_alpha=8, lr=1e-3)
    >>> any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    False

Embedding adapters (``LoraConfig(target_modules=["embed_tokens", ...])``) are LoRA-FA layers too, as in
PEFT: ``lora_embedding_A`` (r, num_embeddings) frozen, ``lora_embedding_B`` (dim, r) corrected. PEFT
initialises an embedding adapter's A to zeros, so with A frozen it cannot learn (in PEFT as here);
a warning names such layers.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from torch import nn

from loralab.lora_fa.optimizer import LoraFAAdamW

__all__ = ["LoraFAOptimizer", "create_lorafa_optimizer"]

logger = logging.getLogger(__name__)

LoraFAOptimizer = LoraFAAdamW
"""Alias under PEFT's class name (``create_lorafa_optimizer``'s documented return type)."""


def _active_adapters(model: nn.Module) -> list[str]:
    config = getattr(model, "peft_config", None)
    if not isinstance(config, dict):
        return []
    active = getattr(model, "active_adapters", None)
    if active is None:
        active = getattr(model, "active_adapter", None)
    if isinstance(active, str):
        active = [active]
    return [a for a in (active or []) if a in config]


def create_lorafa_optimizer(
    model: nn.Module,
    r: int,
    lora_alpha: int,
    lr: float,
    weight_decay: float = 0.0,
    use_rslora: bool | None = None,
    **kwargs: Any,
) -> LoraFAAdamW:
    """Freeze every ``lora_A`` (and ``lora_embedding_A``) of ``model`` and return a :class:`LoraFAAdamW`.

    The optimizer holds the model's trainable parameters: each LoRA B (Linear, Conv1D,
    MultiheadAttention, ``target_parameters`` and embedding adapters, as PEFT's) gets LoRA-FA's
    corrected AdamW step, every other trainable parameter plain AdamW.

    Args:
        model: a ``PeftModel`` with LoRA adapters (the active adapter is the one trained).
        r, lora_alpha: the LoRA rank and alpha, as in PEFT's signature. The per-layer scaling is read
            from the layers themselves (so ``rank_pattern``/``alpha_pattern`` are honoured); a mismatch
            with the model's ``LoraConfig`` is logged as a warning.
        lr: learning rate.
        weight_decay: decoupled weight decay, applied after the Adam step (transformers' AdamW).
        use_rslora: ``None`` (read from the config) or a bool that must agree with every active
            adapter's ``use_rslora`` (PEFT raises the same error).
        **kwargs: passed to :class:`LoraFAAdamW` (``betas``, ``eps``, ``style``, ``ridge``,
            ``correct_in_backward`` for DeepSpeed ZeRO, ``check_finite``).

    Raises:
        ValueError: ``use_rslora`` disagrees with the model's config, or an invalid hyper-parameter.
        loralab.core.LoraPairError: the model has no LoRA layer.
        LoraFAError: a LoRA layer on a convolution (PEFT's LoRA-FA fails on those too).

    Example:
        >>> # see the module docstring
    """
    adapters = _active_adapters(model)
    # _active_adapters returned names only if model.peft_config is a dict
    configs = {a: cast(dict[str, Any], model.peft_config)[a] for a in adapters}
    if use_rslora is not None:
        mismatched = [
            a
            for a, c in configs.items()
            if bool(getattr(c, "use_rslora", False)) != bool(use_rslora)
        ]
        if mismatched:
            raise ValueError(
                f"use_rslora={use_rslora} was passed to create_lorafa_optimizer, but the active adapters {mismatched} "
                "have use_rslora set differently in their LoraConfig; configure rsLoRA through LoraConfig "
                "(the per-layer scaling is read from the model)."
            )
    for a, c in configs.items():
        if getattr(c, "r", r) != r or getattr(c, "lora_alpha", lora_alpha) != lora_alpha:
            logger.warning(
                "create_lorafa_optimizer(r=%s, lora_alpha=%s) differs from adapter %r's LoraConfig (r=%s, lora_alpha=%s); "
                "each layer's own scaling from the model is used",
                r,
                lora_alpha,
                a,
                getattr(c, "r", None),
                getattr(c, "lora_alpha", None),
            )
    for name, param in model.named_parameters():
        # PEFT's check is the substring "lora_A", which misses embedding adapters' lora_embedding_A:
        # PEFT leaves it requires_grad=True but never updates it (its step only moves the second
        # factor of each pair). Freezing it gives the same parameters without computing its gradient.
        if "lora_A" in name or "lora_embedding_A" in name:
            param.requires_grad_(False)
    kwargs.setdefault("betas", (0.9, 0.999))
    kwargs.setdefault("eps", 1e-6)
    kwargs.setdefault("style", "hf")
    adapter = adapters[0] if len(adapters) == 1 else None
    return LoraFAAdamW(model, lr=lr, weight_decay=weight_decay, adapter_name=adapter, **kwargs)
