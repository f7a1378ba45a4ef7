"""loralab.lora_fa: LoRA-FA (Zhang et al., 2023, arXiv 2308.03303) — A frozen, B trained with the
closed-form correction ``g̃_B = (1/s²)·g_B·(A·Aᵀ)⁻¹``.

Example:
    >>> import peft
    >>> from loralab.core.testing import tiny_llama
    >>> from loralab.lora_fa import apply_lorafa_layers, create_lorafa_optimizer
    >>> model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    >>> optimizer = create_lorafa_optimizer(model, r=4, lora_alpha=8, lr=1e-3)
    >>> names = apply_lorafa_layers(model)  # optional: backward keeps X·Aᵀ, not X (activation memory)
"""

from loralab.lora_fa.compat import LoraFAOptimizer, create_lorafa_optimizer
from loralab.lora_fa.correction import correct_grads, correction_matrix, optimal_b_gradient
from loralab.lora_fa.layer import LoraFAVariant, apply_lorafa_layers, remove_lorafa_layers
from loralab.lora_fa.memory import SavedTensorStats, saved_tensor_bytes
from loralab.lora_fa.optimizer import LoraFAAdamW, LoraFAError

__version__ = "0.1.0"
__all__ = [
    "LoraFAAdamW",
    "LoraFAError",
    "LoraFAOptimizer",
    "LoraFAVariant",
    "SavedTensorStats",
    "apply_lorafa_layers",
    "correct_grads",
    "correction_matrix",
    "create_lorafa_optimizer",
    "optimal_b_gradient",
    "remove_lorafa_layers",
    "saved_tensor_bytes",
]
