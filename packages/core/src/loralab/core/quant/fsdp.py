"""FSDP2 (``fully_shard``) over bitsandbytes layers: what this torch can shard, and the checks that
keep sharded 4-bit codes intact (no cast of the codes as numbers, statistics on every layer).

Example:
    >>> from loralab.core.testing import tiny_llama
    >>> check_fsdp_storage(tiny_llama())  # no bitsandbytes layer
    0
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.core.modules import layer_kind
from loralab.core.quant.layers import QuantizationError


def fsdp2_shards_integer_storage() -> bool:
    """Whether this torch's FSDP2 can shard integer parameters (4-bit codes in ``torch.uint8``)."""
    # torch < 2.13: FSDP2 builds each sharded parameter as nn.Parameter(...) with requires_grad left
    # at its default True, which fails for integer tensors (pytorch/pytorch#177844): seen failing on
    # 2.11 (CUDA, benchmarks/cuda_fsdp_qlora.py), working on 2.13; 2.12 not checked, so refused
    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


def check_fsdp_storage(model: nn.Module) -> int:
    """Check, before ``fully_shard``, that this torch's FSDP2 can shard ``model``'s 4-bit codes.

    A ``Linear4bit`` stores its packed codes in ``bnb_4bit_quant_storage``; with an integer storage
    (``torch.uint8``, bitsandbytes' default) FSDP2 before torch 2.13 fails inside ``fully_shard``
    ("only Tensors of floating point dtype can require gradients"). Returns the number of 4-bit layers
    checked.

    Raises:
        QuantizationError: naming the first such layer and the storage to load with instead.

    Example:
        >>> from loralab.core.testing import tiny_llama
        >>> check_fsdp_storage(tiny_llama())  # no bitsandbytes layer
        0
    """
    layers = [(n, m) for n, m in model.named_modules() if layer_kind(m) == "linear4bit"]
    if fsdp2_shards_integer_storage():
        return len(layers)
    for name, layer in layers:
        storage = layer.weight.dtype
        if not storage.is_floating_point:
            raise QuantizationError(
                f"{name} (Linear4bit) stores its 4-bit codes as {storage}, which FSDP2 in torch "
                f"{torch.__version__} cannot shard (fixed in torch 2.13, pytorch/pytorch#177844). Load the "
                "model with BitsAndBytesConfig(bnb_4bit_quant_storage=torch.bfloat16) (FSDP-QLoRA's usual "
                "storage), or use torch >= 2.13"
            )
    return len(layers)


def check_fsdp_quantized(model: nn.Module) -> int:
    """Check, before it runs, that FSDP2 (``fully_shard``) can run ``model``'s bitsandbytes layers, and
    keep their codes intact. Returns the number of sharded 4-bit layers (0 without FSDP2 or bitsandbytes).

    FSDP2 shards a ``Linear4bit``'s packed codes (an ``(out·in / k, 1)`` tensor in the storage dtype,
    ``k`` codes per element) like any parameter and all-gathers them before each forward, as a plain
    tensor: the statistics stay on the layer (``layer.quant_state``) and bitsandbytes' forward
    re-attaches them. FSDP2 all-gathers parameters of mixed dtypes as bytes (checked on torch 2.13), so
    every storage dtype shards (``uint8``, and the float storages of
    ``BitsAndBytesConfig(bnb_4bit_quant_storage=...)`` that FSDP1 needed). What breaks is checked here:

    - a ``MixedPrecisionPolicy(param_dtype=...)`` other than a *float* storage dtype casts the codes as
      if they were numbers (bitsandbytes then fails on the wrong size, or computes garbage). Integer
      storage is never cast;
    - an int8 ``Linear8bitLt`` keeps its row scales on the weight, which FSDP2 replaces: not supported;
    - a layer sharded before it was quantized has no statistics to re-attach.

    It also turns off bitsandbytes' CPU kernel repacking on sharded layers
    (``support_avx512bf16_for_cpu = False``): on CPUs with AVX512-BF16 the first eval-mode forward
    rewrites the *gathered* codes and the layer's shared ``quant_state`` into another layout in place,
    and the next all-gather brings the original layout back under the rewritten state (wrong outputs).
    The plain 4-bit kernel computes the same function.

    Call it on every rank after ``fully_shard`` and before the first forward; loralab's
    ``shard=`` hooks (LoRA-GA, LoRA-SB) do. Uses FSDP2's internals (its parameter groups, checked on
    torch 2.13) and raises ``RuntimeError`` if they are gone.

    Raises:
        QuantizationError: one of the cases above, naming the layer and what to change.

    Example:
        >>> from loralab.core.testing import tiny_llama
        >>> check_fsdp_quantized(tiny_llama())  # no FSDP2, no bitsandbytes layer
        0
    """
    checked = 0
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if get_state is None:
            continue
        groups = getattr(get_state(), "_fsdp_param_groups", None)
        if groups is None:
            continue
        for group in groups:
            params = getattr(group, "fsdp_params", None)
            policy = getattr(group, "mp_policy", None)
            if params is None or policy is None:
                raise RuntimeError(
                    f"this torch {torch.__version__} changed FSDP2's internals that loralab reads to check "
                    "sharded bitsandbytes layers (FSDPParamGroup.fsdp_params / mp_policy)"
                )
            for fsdp_param in params:
                info = fsdp_param._module_info
                layer, pname = info.module, info.param_name
                kind = layer_kind(layer)
                if pname != "weight" or kind not in ("linear4bit", "linear8bit"):
                    continue
                name = _name_of(model, layer)
                if kind == "linear8bit":
                    if layer.weight.dtype == torch.int8:
                        raise QuantizationError(
                            f"{name} is a bitsandbytes int8 Linear8bitLt sharded by FSDP2: its row scales (SCB) "
                            "live on the weight FSDP2 replaces, which loralab does not support. Load the model "
                            "in 4 bits (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4')) or "
                            "do not shard this layer"
                        )
                    continue
                if getattr(layer, "quant_state", None) is None:
                    raise QuantizationError(
                        f"{name} (Linear4bit) was sharded by FSDP2 before it was quantized: it has no "
                        "quant_state. Load the model with a BitsAndBytesConfig (or move the layer to a device) "
                        "before fully_shard"
                    )
                storage = layer.weight.dtype
                cast_to = policy.param_dtype
                if cast_to is not None and cast_to != storage and storage.is_floating_point:
                    raise QuantizationError(
                        f"{name} (Linear4bit) stores its 4-bit codes as {storage} and FSDP2's "
                        f"MixedPrecisionPolicy(param_dtype={cast_to}) would cast them as numbers, corrupting "
                        f"them. Load with BitsAndBytesConfig(bnb_4bit_quant_storage={cast_to}) (or torch.uint8), "
                        "or shard without param_dtype"
                    )
                # why: see the docstring (the repacking rewrites the gathered codes and shared state)
                layer.support_avx512bf16_for_cpu = False
                checked += 1
    return checked


def _name_of(model: nn.Module, layer: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is layer), type(layer).__name__)
