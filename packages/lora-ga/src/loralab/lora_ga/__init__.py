"""loralab.lora_ga: LoRA-GA (Wang, Yu & Li, 2024, arXiv 2407.05000). The public API lives here and nothing else."""

from loralab.lora_ga.config import LoraGAConfig
from loralab.lora_ga.maths import LoraGARankError, lora_ga_factors, lora_scaling, offset_weight
from loralab.lora_ga.model import LoraGAInitError, get_lora_ga_model
from loralab.lora_ga.peft_flow import preprocess_loraga
from loralab.lora_ga.save import (
    get_lora_ga_init_factors,
    load_lora_ga_model,
    plain_lora_config,
    save_lora_ga_adapter,
    save_lora_ga_model,
    set_lora_ga_init_factors,
)
from loralab.lora_ga.seed import (
    LoraGAContext,
    estimate_gradient,
    save_loraga_model_final,
    save_loraga_model_init,
)

__version__ = "0.1.0"
__all__ = [
    "LoraGAConfig",
    "LoraGAContext",
    "LoraGAInitError",
    "LoraGARankError",
    "estimate_gradient",
    "get_lora_ga_init_factors",
    "get_lora_ga_model",
    "load_lora_ga_model",
    "lora_ga_factors",
    "lora_scaling",
    "offset_weight",
    "plain_lora_config",
    "preprocess_loraga",
    "save_lora_ga_adapter",
    "save_lora_ga_model",
    "save_loraga_model_final",
    "save_loraga_model_init",
    "set_lora_ga_init_factors",
]
