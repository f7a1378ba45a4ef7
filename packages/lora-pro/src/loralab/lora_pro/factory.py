"""``create_lora_pro_optimizer``: the native factory the runners' method registry calls."""

from __future__ import annotations

from peft import PeftModel

from loralab.lora_pro.adjust import XMode
from loralab.lora_pro.optimizer import LoraProAdamW, Mode

__all__ = ["create_lora_pro_optimizer"]


def create_lora_pro_optimizer(
    model: PeftModel,
    lr: float,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mode: Mode = "efficient",
    x_mode: XMode = "sylvester",
) -> LoraProAdamW:
    """A :class:`LoraProAdamW` over ``model``'s trainable parameters, with per-layer scaling from PEFT.

    Each LoRA layer's scaling is the one PEFT uses in its forward (α/r, α/√r with ``use_rslora``,
    after ``rank_pattern`` / ``alpha_pattern``); other trainable parameters get plain AdamW.

    Example:
        >>> import peft
        >>> from loralab.core.testing import tiny_llama
        >>> model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"]))
        >>> opt = create_lora_pro_optimizer(model, 1e-3)
        >>> opt.lora_pairs[0].scaling
        4.0
    """
    return LoraProAdamW(model, lr, betas, eps, weight_decay, mode=mode, x_mode=x_mode)
