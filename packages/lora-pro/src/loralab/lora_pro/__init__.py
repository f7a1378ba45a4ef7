"""loralab.lora_pro: LoRA-Pro (arXiv 2407.18242) — AdamW on the LoRA gradients whose equivalent
full-weight gradient is closest to full fine-tuning's.

Native API: :class:`LoraProAdamW`, :func:`create_lora_pro_optimizer`, the pure maths in
:mod:`loralab.lora_pro.adjust`. Drop-ins: :class:`LoRAProAdamW` (PyPI ``lora-pro-adamw``, import name
``lora_pro``) and :class:`AdamWLoRAPro` (alias ``AdamWLoraPro``; the seed, laihongphuc/lora_pro).

Example:
    >>> import peft
    >>> from loralab.core.testing import tiny_llama
    >>> from loralab.lora_pro import create_lora_pro_optimizer
    >>> model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    >>> opt = create_lora_pro_optimizer(model, lr=1e-3)
"""

from loralab.lora_pro.adjust import (
    equivalent_gradient,
    lora_gradients,
    lora_pro_gradients,
    optimal_equivalent_gradient,
    solve_x,
)
from loralab.lora_pro.compat import AdamWLoRAPro, AdamWLoraPro
from loralab.lora_pro.factory import create_lora_pro_optimizer
from loralab.lora_pro.lora_pro_adamw import LoRAProAdamW
from loralab.lora_pro.optimizer import LoraProAdamW

__version__ = "0.1.0"
__all__ = [
    "AdamWLoRAPro",
    "AdamWLoraPro",
    "LoRAProAdamW",
    "LoraProAdamW",
    "create_lora_pro_optimizer",
    "equivalent_gradient",
    "lora_gradients",
    "lora_pro_gradients",
    "optimal_equivalent_gradient",
    "solve_x",
]
