"""bitsandbytes helpers: detect quantized layers, dequantize / re-quantize weights, float copies.

Gradient-initialised methods (LoRA-GA, LoRA-SB) need full-weight gradients, which a quantized layer
does not have. The LoRA-GA seed's flow for QLoRA is: estimate the gradients on a float copy of the
same checkpoint (with block-wise offload to bound memory), then load the quantized model, attach the
adapters from those gradients, and fold the init offset ``W0 ← W0 − s·B·A`` into the quantized base
weight by dequantize → subtract → re-quantize. This module gives each of those steps:

- :func:`is_quantized` / :func:`quant_kind` / :func:`quant_config_of`: what a layer is and how it
  is quantized (NF4 / FP4 / int8, blocksize, double quantization, compute dtype);
- :func:`dequantize_weight`: the weight as a float (out, in) matrix;
- :func:`requantize_weight_`: put a float (out, in) matrix back *with the layer's own settings*
  (an NF4 layer stays NF4 with its blocksize and double quantization: the LoRA-GA reference rebuilt
  the layer with the class defaults, which silently turns NF4 into FP4);
- :func:`load_quantized_weight_`: restore a quantized weight exactly (codes and statistics) from
  the layer's own ``state_dict()`` entries, which ``load_state_dict`` alone refuses (4-bit) or
  loads only before the first forward (int8); :func:`load_state_dict_with_quantized_` does it for a
  whole model's state dict (a checkpoint of a QLoRA run), strictly;
- :func:`quant_statistics` / :func:`load_quant_statistics_`: every 4-bit layer's statistics alone,
  for checkpoints that store the codes elsewhere (FSDP2's sharded checkpoint holds the codes only);
- :func:`load_float_model_for_estimation`: a float model of the same checkpoint (from its path or
  from a quantized model), and :func:`dequantized_copy` when no float checkpoint is at hand.

The modules: :mod:`~loralab.core.quant.layers` (one layer: kind, settings, dequantize /
re-quantize), :mod:`~loralab.core.quant.fsdp` (FSDP2's checks), :mod:`~loralab.core.quant.saved_state`
(exact restores from saved codes and statistics), :mod:`~loralab.core.quant.float_copies` (float
models and layers for estimation). Import from ``loralab.core.quant``.

Works on the CPU with bitsandbytes >= 0.45 (NF4, FP4 and int8 ``Linear8bitLt`` all run there).

Example:
    >>> import torch, bitsandbytes as bnb
    >>> from loralab.core.quant import dequantize_weight, quant_kind, requantize_weight_
    >>> layer = bnb.nn.Linear4bit(64, 32, quant_type="nf4", compute_dtype=torch.float32)
    >>> layer = layer.to("cpu")  # quantizes
    >>> quant_kind(layer)
    'nf4'
    >>> w = dequantize_weight(layer)  # (32, 64) float32
    >>> requantize_weight_(layer, w * 0.5)
    >>> quant_kind(layer)
    'nf4'
"""

from __future__ import annotations

from loralab.core.quant.float_copies import (
    dequantized_copy,
    dtype_kwarg,
    float_targets,
    load_float_model_for_estimation,
)
from loralab.core.quant.fsdp import (
    check_fsdp_quantized,
    check_fsdp_storage,
    fsdp2_shards_integer_storage,
)
from loralab.core.quant.layers import (
    QuantizationError,
    QuantKind,
    QuantSpec,
    cpu_repacking_off,
    dequantize_weight,
    is_quantized,
    quant_config_of,
    quant_kind,
    quantized_layer_names,
    requantize_weight_,
)
from loralab.core.quant.saved_state import (
    load_quant_statistics_,
    load_quantized_weight_,
    load_state_dict_with_quantized_,
    quant_statistics,
)

__all__ = [
    "QuantKind",
    "QuantSpec",
    "QuantizationError",
    "check_fsdp_quantized",
    "check_fsdp_storage",
    "cpu_repacking_off",
    "dequantize_weight",
    "dequantized_copy",
    "dtype_kwarg",
    "float_targets",
    "fsdp2_shards_integer_storage",
    "is_quantized",
    "load_float_model_for_estimation",
    "load_quant_statistics_",
    "load_quantized_weight_",
    "load_state_dict_with_quantized_",
    "quant_config_of",
    "quant_kind",
    "quant_statistics",
    "quantized_layer_names",
    "requantize_weight_",
]
