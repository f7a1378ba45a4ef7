"""loralab.core: the machinery shared by every loralab method.

Targets (which layers), gradients (estimated, reduced, streamed, offloaded), bitsandbytes helpers
and low-rank linear algebra. Test helpers live in :mod:`loralab.core.testing`.

Example:
    >>> from loralab.core import estimate_gradients, find_targets, truncated_svd
    >>> from loralab.core.testing import tiny_llama, make_lm_batches
    >>> model = tiny_llama()
    >>> grads = estimate_gradients(model, make_lm_batches(2), ["q_proj"], progress=False)
    >>> U, S, Vh = truncated_svd(grads["model.layers.0.self_attn.q_proj"], 4)
"""

from loralab.core.adamw import (
    adamw_direction,
    adamw_step_,
    adamw_update_,
    check_adamw_hparams,
    fused_adamw_,
    fused_adamw_available,
)
from loralab.core.adapter_gradients import estimate_adapter_gradients
from loralab.core.distributed import (
    all_reduce_mean_,
    all_reduce_mean_dict_,
    gathered_parameters,
    gathered_zero3_model,
    is_distributed,
    is_main_process,
    rank,
    unwrap_model,
    world_size,
)
from loralab.core.gradients import GradientConsumer, GradientEstimationError, estimate_gradients
from loralab.core.linalg import (
    SVDResult,
    ridge_inverse,
    ridge_inverse_from_eigh,
    ridge_solve,
    solve_sylvester_from_eigh,
    solve_sylvester_psd,
    stiefel_sample,
    truncated_svd,
)
from loralab.core.lora_layers import LoraPair, LoraPairError, find_lora_pairs
from loralab.core.offload import DEFAULT_BLOCK_CLASSES, estimate_gradients_offloaded, find_blocks
from loralab.core.quant import (
    QuantizationError,
    dequantize_weight,
    dequantized_copy,
    dtype_kwarg,
    is_quantized,
    load_float_model_for_estimation,
    load_quantized_weight_,
    load_state_dict_with_quantized_,
    quant_kind,
    requantize_weight_,
)
from loralab.core.targets import (
    TargetLayer,
    TargetNotFoundError,
    find_all_linear_modules,
    find_targets,
    get_module,
    layer_kind,
    replace_module,
    to_storage_layout,
    weight_matrix,
)

__version__ = "0.1.0"
from loralab.core.zero3_fetch import fetching_zero3_parameters

__all__ = [
    "DEFAULT_BLOCK_CLASSES",
    "GradientConsumer",
    "GradientEstimationError",
    "LoraPair",
    "LoraPairError",
    "QuantizationError",
    "SVDResult",
    "TargetLayer",
    "TargetNotFoundError",
    "adamw_direction",
    "adamw_step_",
    "adamw_update_",
    "all_reduce_mean_",
    "all_reduce_mean_dict_",
    "check_adamw_hparams",
    "dequantize_weight",
    "dequantized_copy",
    "dtype_kwarg",
    "estimate_adapter_gradients",
    "estimate_gradients",
    "estimate_gradients_offloaded",
    "fetching_zero3_parameters",
    "find_all_linear_modules",
    "find_blocks",
    "find_lora_pairs",
    "find_targets",
    "fused_adamw_",
    "fused_adamw_available",
    "gathered_parameters",
    "gathered_zero3_model",
    "get_module",
    "is_distributed",
    "is_main_process",
    "is_quantized",
    "layer_kind",
    "load_float_model_for_estimation",
    "load_quantized_weight_",
    "load_state_dict_with_quantized_",
    "quant_kind",
    "rank",
    "replace_module",
    "requantize_weight_",
    "ridge_inverse",
    "ridge_inverse_from_eigh",
    "ridge_solve",
    "solve_sylvester_from_eigh",
    "solve_sylvester_psd",
    "stiefel_sample",
    "to_storage_layout",
    "truncated_svd",
    "unwrap_model",
    "weight_matrix",
    "world_size",
]
