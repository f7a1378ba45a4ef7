"""loralab.lora_sb: LoRA-SB (arXiv 2411.19557) as a PEFT-compatible adapter.

``W = W0 + s·B·R·A`` with ``B``, ``A`` frozen and only the r×r ``R`` trained (LoRA-XS form),
initialised from the truncated SVD of ``ΔW̃ = −lr·sign(G)``, the approximate first full fine-tuning step.

Example:
    >>> from loralab.core.testing import tiny_llama, make_lm_batches
    >>> from loralab.lora_sb import LoraSBConfig, get_lora_sb_model
    >>> model = get_lora_sb_model(tiny_llama(), LoraSBConfig(r=4, target_modules=["q_proj", "v_proj"]),
    ...                           make_lm_batches(2), lr=1e-3, progress=False)
    >>> model.get_nb_trainable_parameters()[0]
    64
"""

from loralab.lora_sb.compat import estimate_and_process_grads_torch, find_and_initialize_grad
from loralab.lora_sb.config import LORA_SB_PEFT_TYPE, LoraSBConfig
from loralab.lora_sb.export import (
    convert_lora_sb_checkpoint,
    lora_sb_as_lora_state_dict,
    save_lora_sb_as_lora,
)
from loralab.lora_sb.layer import LoraSBLinear, LoraSBVariant, is_lora_sb_layer
from loralab.lora_sb.maths import equivalent_gradient, r_gradient, sb_factors, update_approximation
from loralab.lora_sb.model import (
    LoraSBInitError,
    get_lora_sb_model,
    initialize_from_updates_,
    initialize_lora_sb_weights,
    load_lora_sb_adapter,
    load_lora_sb_model,
    lora_sb_layers,
)

__version__ = "0.1.0"
__all__ = [
    "LORA_SB_PEFT_TYPE",
    "LoraSBConfig",
    "LoraSBInitError",
    "LoraSBLinear",
    "LoraSBVariant",
    "convert_lora_sb_checkpoint",
    "equivalent_gradient",
    "estimate_and_process_grads_torch",
    "find_and_initialize_grad",
    "get_lora_sb_model",
    "initialize_from_updates_",
    "initialize_lora_sb_weights",
    "is_lora_sb_layer",
    "load_lora_sb_adapter",
    "load_lora_sb_model",
    "lora_sb_as_lora_state_dict",
    "lora_sb_layers",
    "r_gradient",
    "save_lora_sb_as_lora",
    "sb_factors",
    "update_approximation",
]
