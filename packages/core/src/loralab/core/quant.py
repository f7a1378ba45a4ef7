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

import copy
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from loralab.core.modules import get_module, layer_kind, replace_module
from loralab.core.modules import weight_parameter as _weight
from loralab.core.sharding import is_dtensor, local_tensor, whole, write_rows_

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

logger = logging.getLogger(__name__)

QuantKind = Literal["nf4", "fp4", "int8"]


class QuantizationError(RuntimeError):
    """A quantized layer cannot be read or written (missing statistics, shape mismatch, no bitsandbytes)."""


@dataclass(frozen=True)
class QuantSpec:
    """How one bitsandbytes layer is quantized (what :func:`requantize_weight_` keeps)."""

    kind: QuantKind
    """``"nf4"``, ``"fp4"`` (``Linear4bit``) or ``"int8"`` (``Linear8bitLt``)."""
    blocksize: int | None
    """4-bit quantization block size (64 by default); ``None`` for int8 (row-wise scales)."""
    double_quant: bool
    """4-bit: the block scales are themselves quantized (QLoRA's double quantization)."""
    dtype: torch.dtype | None
    """Dtype the weight was quantized from, which is what dequantization returns (4-bit)."""
    compute_dtype: torch.dtype | None
    """Dtype of the layer's matmul (``Linear4bit.compute_dtype``); ``None`` for int8."""
    quant_storage: torch.dtype | None
    """Storage dtype of the packed 4-bit data (``torch.uint8`` unless FSDP-style storage is used)."""


def is_quantized(module: nn.Module) -> bool:
    """True for bitsandbytes ``Linear4bit`` (NF4/FP4, incl. ``LinearNF4``/``LinearFP4``) and ``Linear8bitLt``.

    An int8 layer that keeps float weights (``has_fp16_weights=True``) is *not* quantized.
    """
    kind = layer_kind(module)
    if kind == "linear4bit":
        return True
    if kind == "linear8bit":
        return module.weight.dtype == torch.int8
    return False


def quant_kind(module: nn.Module) -> QuantKind | None:
    """``"nf4"``, ``"fp4"``, ``"int8"``, or ``None`` for a layer that is not quantized."""
    if not is_quantized(module):
        return None
    if layer_kind(module) == "linear8bit":
        return "int8"
    return _quant_state(module).quant_type


def _quant_state(module: nn.Module) -> Any:
    w = _weight(module)
    qs = getattr(w, "quant_state", None)
    if qs is None and is_dtensor(w):
        # FSDP2 (fully_shard) replaced the Params4bit by a DTensor of its packed codes: the statistics
        # stay on the layer (Params4bit keeps module.quant_state in step; bitsandbytes' forward re-attaches
        # it to the gathered weight), so that is where a sharded layer's state is read and written.
        qs = getattr(module, "quant_state", None)
    if qs is None:
        raise QuantizationError(
            f"{type(module).__name__} has no quant_state: its weight was never quantized. Move the layer to a "
            "device (layer.to('cpu') or .cuda()) or load the model with a BitsAndBytesConfig first"
        )
    return qs


@contextmanager
def cpu_repacking_off(model: nn.Module) -> Iterator[int]:
    """bitsandbytes' CPU repacking off on every 4-bit layer of ``model`` inside the block (restored after);
    yields how many layers it covers.

    bitsandbytes (>= 0.48, CPUs with AVX512-BF16) repacks a ``Linear4bit``'s codes for its CPU kernel at
    the first eval-mode forward whose input needs no gradient, and a backward through a repacked layer
    gives no input gradient (bitsandbytes 0.50). A gradient estimate makes such forwards itself (the
    block boundaries under ``no_grad``, the layers before the first target), so a layer repacked there
    would cut the gradient of every target below it (seen on a Xeon with AVX512-BF16: targets with no
    gradient); every estimate runs inside this (``loralab.core.estimation.estimation_mode``). The
    plain 4-bit kernel computes the same function.

    Example:
        >>> from loralab.core.testing import tiny_llama
        >>> with cpu_repacking_off(tiny_llama()) as n:  # no bitsandbytes layer
        ...     n
        0
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    saved = [m.support_avx512bf16_for_cpu for m in layers]
    for m in layers:  # setattr: bitsandbytes' plain bool attribute, not a Module field
        setattr(m, "support_avx512bf16_for_cpu", False)  # noqa: B010
    try:
        yield len(layers)
    finally:
        for m, value in zip(layers, saved):
            setattr(m, "support_avx512bf16_for_cpu", value)  # noqa: B010


def _cpu_packed(qs: Any) -> bool:
    # bitsandbytes >= 0.48, on CPUs with AVX512-BF16: the first CPU forward of a Linear4bit in eval
    # mode on an input that does not require grad repacks the weight for its CPU kernel (another
    # nibble layout, nested absmax unfolded to bf16) and flags the quant_state. dequantize_4bit does
    # not understand that layout, so everything below reads the weight through the inverse.
    return bool(getattr(qs, "packing_format_for_cpu", False))


def _unpacked_4bit(module: nn.Module) -> tuple[Tensor, Any]:
    """(packed 4-bit data, quant_state) in bitsandbytes' standard layout, without touching the layer."""
    # an FSDP2-sharded 4-bit weight is all-gathered (a collective: every rank calls)
    data, qs = whole(_weight(module).data), _quant_state(module)
    if not _cpu_packed(qs):
        return data, qs
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    # The inverse rewrites the state it is given: hand it a copy so the layer keeps its fast layout.
    # A shallow copy is enough: the inverse and the lines below only rebind the state's attributes
    # (absmax, nested, dtype, flags), never write into its tensors, and a packed state has no
    # nested state2 left to share (a deep copy cloned every statistic on every read).
    # Its scale handling is lossy (re-quantizes unfolded scales) or wrong (leaves them transposed
    # when there was no double quantization), so take the scales the kernel really applies
    # ((blocks-per-row, out) in bf16 → flat float32) and only let it restore the nibble order.
    qs = copy.copy(qs)
    absmax = qs.absmax.T.reshape(-1).float()
    qs.original_nested = False
    data, qs = _convert_weight_packed_for_cpu_inverse(data, qs)
    qs.absmax, qs.nested = absmax, False
    return data, qs


def quant_config_of(module: nn.Module) -> QuantSpec:
    """The :class:`QuantSpec` of a quantized layer (raises ``TypeError`` for a float layer).

    The settings are the layer's own even after bitsandbytes repacked it for its CPU kernel (which
    unfolds double quantization and casts the scales to bf16 in the live state).
    """
    if not is_quantized(module):
        raise TypeError(f"{type(module).__name__} is not a quantized bitsandbytes layer")
    if layer_kind(module) == "linear8bit":
        return QuantSpec("int8", None, False, None, None, None)
    qs = _quant_state(module)
    packed = _cpu_packed(qs)
    return QuantSpec(
        kind=qs.quant_type,
        blocksize=int(qs.blocksize),
        double_quant=bool(qs.original_nested if packed else qs.nested),
        dtype=qs.original_dtype if packed else qs.dtype,
        compute_dtype=getattr(module, "compute_dtype", None),
        quant_storage=_quant_storage(module),
    )


def _quant_storage(module: nn.Module) -> torch.dtype:
    # Params4bit records it; under FSDP2 the weight is a DTensor of the codes (its dtype is the
    # storage), and bitsandbytes' CPU repacking views the codes as uint8 but remembers the original.
    w = _weight(module)
    storage = getattr(w, "quant_storage", None)
    if storage is None and is_dtensor(w):
        storage = w.dtype
    qs = getattr(w, "quant_state", None) or getattr(module, "quant_state", None)
    if qs is not None and _cpu_packed(qs):
        storage = getattr(qs, "original_storage_type", storage)
    return storage or getattr(module, "quant_storage", None) or torch.uint8


def _int8_scales(module: nn.Module) -> Tensor:
    # Linear8bitLt moves (CB, SCB) from the weight into module.state on its first forward.
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        raise QuantizationError(
            f"{type(module).__name__}: int8 row scales (SCB) not found on the weight nor in layer.state"
        )
    return scb


def dequantize_weight(module: nn.Module, dtype: torch.dtype | None = torch.float32) -> Tensor:
    """The layer's weight as a float (out, in) matrix (a new tensor, never a view of the storage).

    A 4-bit layer that bitsandbytes repacked for its CPU kernel (first inference forward in eval
    mode) is read through the inverse of that repacking, on a copy: the layer is left as it is.

    Args:
        module: a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (a float ``Linear``/``Conv1D`` is
            accepted too and simply returns a detached copy of its (out, in) weight; all-gathered
            when FSDP2 shards it, so every rank must call).
        dtype: result dtype (float32 by default; ``None`` keeps bitsandbytes' own output dtype).

    Example:
        >>> import torch
        >>> w = dequantize_weight(torch.nn.Linear(4, 3))
        >>> w.shape
        torch.Size([3, 4])
    """
    kind = layer_kind(module)
    if kind is None:
        raise TypeError(
            f"{type(module).__name__} is not an adaptable layer (Linear, Conv1D, bnb Linear4bit/Linear8bitLt)"
        )
    with torch.no_grad():
        # a float weight sharded by FSDP2 (fully_shard) is all-gathered (a collective: every rank calls)
        if kind == "linear":
            w = whole(_weight(module).detach()).clone()
        elif kind == "conv1d":
            w = whole(_weight(module).detach()).T.clone()
        elif kind == "linear8bit" and not is_quantized(module):
            w = _weight(module).detach().clone()
        elif kind == "linear8bit":
            import bitsandbytes.functional as bnbf

            w = bnbf.int8_vectorwise_dequant(_weight(module).data, _int8_scales(module))
        else:
            import bitsandbytes.functional as bnbf

            w = bnbf.dequantize_4bit(*_unpacked_4bit(module))
    w = w.detach()
    return w.to(dtype) if dtype is not None else w


def requantize_weight_(module: nn.Module, weight: Tensor) -> None:
    """Overwrite a layer's weight with the float (out, in) matrix ``weight``, in place.

    A quantized layer is re-quantized with its *own* settings (:func:`quant_config_of`: NF4 stays
    NF4, same blocksize, double quantization, quantization dtype, storage dtype; the layer's compute
    dtype is untouched) on the device it lives on. A float ``Linear``/``Conv1D`` simply gets the
    values copied in (in its storage layout and dtype; an FSDP2-sharded weight gets this rank's rows).
    An FSDP2-sharded 4-bit weight gets this rank's rows of the new codes and the layer the new
    statistics (every rank calls with the same ``weight``); the model must be resharded then (before
    its first forward, or after ``model.reshard()``), not gathered between a forward and its backward.

    Raises:
        ValueError: ``weight`` has the wrong shape or non-finite values.
    """
    kind = layer_kind(module)
    if kind is None:
        raise TypeError(
            f"{type(module).__name__} is not an adaptable layer (Linear, Conv1D, bnb Linear4bit/Linear8bitLt)"
        )
    expected = _out_in(module, kind)
    if tuple(weight.shape) != expected:
        raise ValueError(
            f"requantize_weight_: weight must have shape (out, in) = {expected} for {type(module).__name__}, got {tuple(weight.shape)}"
        )
    if not torch.isfinite(weight).all():
        raise ValueError(
            f"requantize_weight_: weight for {type(module).__name__} has non-finite values"
        )
    old = _weight(module)
    device = old.device
    with torch.no_grad():
        # write_rows_: an FSDP2-sharded float weight gets this rank's rows (no communication)
        if kind == "linear" or (kind == "linear8bit" and not is_quantized(module)):
            write_rows_(old, weight.to(old.dtype))
            return
        if kind == "conv1d":
            write_rows_(old, weight.T.to(old.dtype))
            return
        import bitsandbytes as bnb

        if kind == "linear8bit":
            # Int8Params quantizes row-wise (absmax per output row, through fp16) when it is moved
            # from the CPU to a device; do exactly that from a CPU float copy.
            # typed as the Parameter it is: bitsandbytes types Int8Params.to with a self bound to nn.Module
            new: nn.Parameter = bnb.nn.Int8Params(
                weight.detach().to("cpu", torch.float16).contiguous(),
                requires_grad=False,
                has_fp16_weights=False,
            )
            module.weight = new.to(device)
            state = getattr(module, "state", None)
            # drop the cached (CB, SCB) of the old weight; forward re-reads them
            if state is not None:
                state.CB = None
                state.SCB = None
            return
        spec = quant_config_of(module)
        if is_dtensor(old):
            _requantize_sharded_4bit_(module, weight, spec)
            return
        new4: nn.Parameter = bnb.nn.Params4bit(  # typed as Parameter: see Int8Params above
            weight.detach().to("cpu", spec.dtype or torch.float32).contiguous(),
            requires_grad=False,
            quant_type=spec.kind,
            blocksize=spec.blocksize,
            compress_statistics=spec.double_quant,
            quant_storage=spec.quant_storage or torch.uint8,
            # kind "linear4bit" (matched by class name) means module is a bnb Linear4bit
            module=cast(bnb.nn.Linear4bit, module),
        )
        module.weight = new4.to(device)  # Params4bit quantizes on its first move to a device


def _requantize_sharded_4bit_(module: nn.Module, weight: Tensor, spec: QuantSpec) -> None:
    """Re-quantize an FSDP2-sharded 4-bit weight: every rank quantizes the same whole matrix (the
    same codes and statistics: quantization is deterministic), writes its own rows of the packed
    codes into its shard and sets the layer's ``quant_state``, which bitsandbytes' forward attaches
    to the weight FSDP2 gathers. The parameter stays the DTensor FSDP2 manages (a new Params4bit
    in its place would detach the layer from FSDP2)."""
    import bitsandbytes.functional as bnbf

    old = _weight(module)
    local = local_tensor(old)
    codes, qs = bnbf.quantize_4bit(
        weight.detach().to(local.device, spec.dtype or torch.float32).contiguous(),
        blocksize=spec.blocksize,
        compress_statistics=spec.double_quant,
        quant_type=spec.kind,
        quant_storage=spec.quant_storage or torch.uint8,
    )
    if tuple(codes.shape) != tuple(old.shape) or codes.dtype != old.dtype:
        raise QuantizationError(  # pragma: no cover - the layer's own settings give its own layout
            f"requantize_weight_: the sharded 4-bit weight is {tuple(old.shape)} {old.dtype}, re-quantizing "
            f"gave {tuple(codes.shape)} {codes.dtype}"
        )
    write_rows_(old, codes)
    setattr(module, "quant_state", qs)  # noqa: B010 (nn.Module's attributes are typed Tensor | Module)


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


def load_quantized_weight_(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Restore a quantized bitsandbytes layer's weight exactly from the entries its own
    ``state_dict()`` wrote (keys relative to the layer), in place.

    ``torch.nn.Module.load_state_dict`` alone does not: a ``Linear4bit`` refuses its own
    ``weight.absmax``, ``weight.quant_map``, ``weight.nested_*``, ``weight.quant_state.*`` entries as
    unexpected keys, and with ``strict=False`` copies the packed codes but keeps the layer's own
    statistics, so a weight re-quantized after the layer was built (:func:`requantize_weight_`, a
    ReLoRA merge) dequantizes to other values; ``Linear8bitLt`` reloads its row scales (``SCB``) only
    while they still sit on the weight (before its first forward). This rebuilds the weight from the
    saved codes and statistics: 4-bit through ``Params4bit.from_prequantized`` (blocksize, double
    quantization, quantization dtype as saved), int8 as the saved codes and row scales. The layer's
    compute dtype is untouched. ``load_state_dict`` may then load the rest without the ``weight.*``
    statistics (it copies the same codes again).

    Args:
        module: a quantized ``Linear4bit`` / ``Linear8bitLt``.
        state: its entries: ``weight`` and, 4-bit, ``weight.absmax``, ``weight.quant_map``,
            ``weight.quant_state.bitsandbytes__<nf4|fp4>`` (plus ``weight.nested_*`` with double
            quantization); int8, ``SCB`` (``weight_format`` is ignored).

    Raises:
        TypeError: ``module`` is not a quantized bitsandbytes layer.
        QuantizationError: an entry is missing, or the entries are of the other kind or shape.

    Example:
        >>> import torch, bitsandbytes as bnb
        >>> layer = bnb.nn.Linear4bit(64, 32, quant_type="nf4", compute_dtype=torch.float32).to("cpu")
        >>> saved = {k: v.clone() for k, v in layer.state_dict().items()}
        >>> requantize_weight_(layer, dequantize_weight(layer) * 2)
        >>> load_quantized_weight_(layer, saved)
        >>> torch.equal(layer.weight.quant_state.absmax, saved["weight.absmax"])
        True
    """
    kind = layer_kind(module)
    if kind not in ("linear4bit", "linear8bit") or not is_quantized(module):
        raise TypeError(f"{type(module).__name__} is not a quantized bitsandbytes layer")
    if "weight" not in state:
        raise QuantizationError(
            f"load_quantized_weight_: no 'weight' entry for {type(module).__name__} (got {sorted(state)})"
        )
    out_in = _out_in(module, kind)
    device = _weight(module).device
    data = state["weight"].detach().to(device).clone()
    import bitsandbytes as bnb

    if kind == "linear4bit":
        stats = {
            k[len("weight.") :]: v.detach().clone()
            for k, v in state.items()
            if k.startswith("weight.")
        }
        if "absmax" not in stats or not any(k.startswith("quant_state.") for k in stats):
            raise QuantizationError(
                f"load_quantized_weight_: a 4-bit layer needs weight.absmax, weight.quant_map and "
                f"weight.quant_state.bitsandbytes__<type> entries, got {sorted(state)}"
            )
        new4: nn.Parameter = (
            bnb.nn.Params4bit.from_prequantized(  # typed as Parameter (see requantize)
                data=data,
                quantized_stats=stats,
                requires_grad=False,
                device=device,
                module=cast(bnb.nn.Linear4bit, module),  # kind "linear4bit": a bnb Linear4bit
            )
        )
        shape = tuple(new4.quant_state.shape)  # type: ignore[attr-defined]  # a bnb Params4bit
        if shape != out_in:
            raise QuantizationError(
                f"load_quantized_weight_: the saved 4-bit weight is {shape}, the layer's (out, in) is {out_in}"
            )
        module.weight = new4
        return
    if "SCB" not in state:
        raise QuantizationError(
            f"load_quantized_weight_: an int8 layer needs the row scales 'SCB', got {sorted(state)}"
        )
    scb = state["SCB"].detach().to(device).clone()
    if data.dtype != torch.int8 or tuple(data.shape) != out_in or tuple(scb.shape) != out_in[:1]:
        raise QuantizationError(
            f"load_quantized_weight_: the int8 layer's (out, in) is {out_in}; the entries are weight "
            f"{tuple(data.shape)} {data.dtype} and SCB {tuple(scb.shape)}"
        )
    # the layout Int8Params has after quantizing: CB is the weight's own storage, SCB on the weight
    new8: nn.Parameter = bnb.nn.Int8Params(
        data, requires_grad=False, has_fp16_weights=False, CB=data, SCB=scb
    )
    module.weight = new8
    st = getattr(module, "state", None)
    if st is not None:  # drop the cached (CB, SCB) of the old weight; forward re-reads them
        st.CB = None
        st.SCB = None


def _own_4bit_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # the bitsandbytes layers themselves, not a PEFT layer wrapping one (it reads as 4-bit too)
    layers = ((n, get_module(model, n)) for n in quantized_layer_names(model))
    return [
        (n, m) for n, m in layers if layer_kind(m) == "linear4bit" and "weight" in m._parameters
    ]


def quant_statistics(model: nn.Module) -> dict[str, Tensor]:
    """Every 4-bit layer's quantization statistics, as ``Linear4bit`` saves them next to its codes:
    ``{layer}.weight.absmax``, ``.quant_map``, ``.quant_state.bitsandbytes__<type>`` (plus
    ``.nested_*`` with double quantization). The codes themselves are not included.

    A checkpoint of a sharded model needs them separately: FSDP2 checkpoints a sharded ``Linear4bit``'s
    codes like any parameter, while its statistics live on the layer (``layer.quant_state``, the same on
    every rank), and a weight re-quantized after loading (LoRA-GA's offset ``W0 − s·B·A``, a ReLoRA
    merge) has statistics the original checkpoint does not. Restore them with
    :func:`load_quant_statistics_`.

    Example:
        >>> import torch, bitsandbytes as bnb
        >>> model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32)).to("cpu")
        >>> sorted(quant_statistics(model))  # Linear4bit's default: FP4, double quantization
        ['0.weight.absmax', '0.weight.nested_absmax', '0.weight.nested_quant_map', '0.weight.quant_map', '0.weight.quant_state.bitsandbytes__fp4']
    """
    out: dict[str, Tensor] = {}
    for name, module in _own_4bit_layers(model):
        for k, v in _quant_state(module).as_dict(packed=True).items():
            out[f"{name}.weight.{k}"] = v.detach().cpu().clone()
    return out


def load_quant_statistics_(model: nn.Module, stats: Mapping[str, Tensor]) -> None:
    """Set every 4-bit layer's statistics from :func:`quant_statistics`'s entries, in place (the codes
    are loaded separately). Strict: every 4-bit layer needs its entries, and every entry a layer.

    Raises:
        QuantizationError: a 4-bit layer without entries, or entries of no 4-bit layer (named).

    Example:
        >>> import torch, bitsandbytes as bnb
        >>> model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32)).to("cpu")
        >>> saved = quant_statistics(model)
        >>> requantize_weight_(model[0], dequantize_weight(model[0]) * 2)
        >>> load_quant_statistics_(model, saved)
        >>> torch.equal(model[0].weight.quant_state.absmax, saved["0.weight.absmax"])
        True
    """
    from bitsandbytes.functional import QuantState

    rest = dict(stats)
    for name, module in _own_4bit_layers(model):
        prefix = f"{name}.weight."
        own = {k[len(prefix) :]: rest.pop(k) for k in list(rest) if k.startswith(prefix)}
        if not own:
            raise QuantizationError(
                f"load_quant_statistics_: no statistics for the 4-bit layer {name}"
            )
        weight = _weight(module)
        qs = QuantState.from_dict(own, device=local_tensor(weight).device)
        if tuple(qs.shape) != _out_in(module, "linear4bit"):
            raise QuantizationError(
                f"load_quant_statistics_: the statistics of {name} are for a {tuple(qs.shape)} weight, "
                f"the layer's (out, in) is {_out_in(module, 'linear4bit')}"
            )
        if not is_dtensor(weight):
            weight.quant_state = qs  # type: ignore[attr-defined]  # a bnb Params4bit
        # bitsandbytes' forward re-attaches module.quant_state to the (gathered) weight
        setattr(module, "quant_state", qs)  # noqa: B010 (nn.Module's attributes are typed Tensor | Module)
    if rest:
        raise QuantizationError(
            f"load_quant_statistics_: entries of no 4-bit layer: {sorted(rest)[:10]}"
        )


_QUANTIZED_ENTRIES = ("weight", "SCB", "weight_format")
"""A bitsandbytes layer's own state-dict entries besides ``weight.*`` (int8's row scales and format)."""


def load_state_dict_with_quantized_(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """``model.load_state_dict(state)``, strict, for a model with bitsandbytes layers: each quantized
    layer's codes and statistics restored exactly (:func:`load_quantized_weight_`), the rest by torch.

    ``load_state_dict`` alone refuses a 4-bit layer's ``weight.absmax`` / ``weight.quant_state.*``
    entries as unexpected keys, and ``strict=False`` would keep stale statistics (and hide any other
    mismatch); here every key of ``state`` must belong to ``model`` and every key of ``model`` must be
    in ``state``, as with ``strict=True``.

    Raises:
        RuntimeError: keys missing from ``state`` or not in ``model`` (the first ten named).
        QuantizationError: a quantized layer's entries are incomplete or of another shape.

    Example:
        >>> import torch, bitsandbytes as bnb
        >>> model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32)).to("cpu")
        >>> saved = {k: v.clone() for k, v in model.state_dict().items()}
        >>> requantize_weight_(model[0], dequantize_weight(model[0]) * 2)
        >>> load_state_dict_with_quantized_(model, saved)
        >>> torch.equal(model[0].weight.quant_state.absmax, saved["0.weight.absmax"])
        True
    """
    rest = dict(state)
    restored: set[str] = set()
    for name in quantized_layer_names(model):
        prefix = name + "."
        own = {
            k[len(prefix) :]: rest.pop(k)
            for k in list(rest)
            if k.startswith(prefix)
            and (k[len(prefix) :] in _QUANTIZED_ENTRIES or k[len(prefix) :].startswith("weight."))
        }
        if own:  # a layer without entries stays missing (reported below)
            load_quantized_weight_(get_module(model, name), own)
            restored |= {prefix + k for k in own}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k not in restored]
    if missing or unexpected:
        raise RuntimeError(
            f"loading the state dict into {type(model).__name__}: "
            + (f"missing keys {missing[:10]}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected keys {list(unexpected)[:10]}" if unexpected else "")
        )


def _out_in(module: nn.Module, kind: str) -> tuple[int, int]:
    # the sizes are plain ints on every adaptable kind (Conv1D.nf, Linear.in/out_features)
    if kind == "conv1d":
        return (cast(int, module.nf), _weight(module).shape[0])
    return (cast(int, module.out_features), cast(int, module.in_features))


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of every quantized bitsandbytes layer of ``model``, in module order."""
    return [
        n
        for n, m in model.named_modules()
        if layer_kind(m) in ("linear4bit", "linear8bit") and is_quantized(m)
    ]


def dequantized_copy(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A deep copy of ``model`` with every quantized layer replaced by a float ``nn.Linear``.

    The copy's weights are exactly the *dequantized* weights, so gradients estimated on it are the
    gradients at the quantized model's own point (what the quantized model will train from). Use it
    when no float checkpoint is available; it holds a full float copy of the model in memory.
    """
    names = quantized_layer_names(model)
    # bitsandbytes' Linear4bit and Linear8bitLt both subclass nn.Linear
    qmods = {n: cast(nn.Linear, get_module(model, n)) for n in names}
    # deepcopy of bitsandbytes parameters is supported but wasteful; build the float layers first
    # and keep the quantized ones out of the copy.
    memo: dict[int, Any] = {}
    floats: dict[str, nn.Linear] = {}
    for n, m in qmods.items():
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = nn.Parameter(dequantize_weight(m, dtype), requires_grad=m.weight.requires_grad)
        if m.bias is not None:
            lin.bias = nn.Parameter(
                m.bias.detach().to(dtype).clone(), requires_grad=m.bias.requires_grad
            )
        floats[n] = lin
        memo[id(m)] = lin  # deepcopy puts the float layer wherever the quantized one was
    out = copy.deepcopy(model, memo)
    for n, lin in floats.items():
        if get_module(out, n) is not lin:  # pragma: no cover - deepcopy honoured the memo
            replace_module(out, n, lin)
    config = getattr(out, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        try:
            del config.quantization_config
        except AttributeError:  # pragma: no cover
            config.quantization_config = None
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if attr in vars(out):
            setattr(out, attr, False)
    if hasattr(out, "hf_quantizer"):
        setattr(out, "hf_quantizer", None)  # noqa: B010 (nn.Module's attributes are typed Tensor | Module)
    if "quantization_method" in vars(out):
        setattr(out, "quantization_method", None)  # noqa: B010
    # nn.Module.to, not PreTrainedModel.to: transformers refuses dtype casts of models it loaded in bnb
    nn.Module.to(out, dtype)
    return out


class _FloatCopy(nn.Linear):
    """A float stand-in for a bitsandbytes layer: computes in its weight's dtype and returns the
    input's dtype, as ``Linear4bit`` (input cast to ``compute_dtype``) and ``Linear8bitLt`` do, so it
    fits wherever the quantized layer did (e.g. float32 activations after PEFT's
    ``prepare_model_for_kbit_training`` into a bfloat16-compute layer)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


@contextmanager
def float_targets(
    model: nn.Module, names: Iterable[str], dtype: torch.dtype | None = None
) -> Iterator[dict[str, nn.Linear]]:
    """Within the block, the quantized layers among ``names`` are float ``nn.Linear`` copies (in place).

    Each bitsandbytes layer is swapped for an ``nn.Linear`` holding its *dequantized* weight (the
    point the quantized model trains from) in ``dtype`` (default: the layer's compute dtype, else the
    dtype it was quantized from, else float32), which computes in that dtype and returns its input's
    dtype (as the bitsandbytes layer does), so code that runs ``model`` itself (a user's training step) produces full-weight
    gradients for them; the quantized layers are put back on exit, unchanged. Holds the float
    copies of those layers only (not of the whole model). Yields ``{name: float layer}``.

    Example:
        >>> from loralab.core.testing import tiny_llama
        >>> model = tiny_llama()
        >>> with float_targets(model, ["model.layers.0.self_attn.q_proj"]) as swapped:
        ...     swapped  # a float model: nothing to swap
        {}
    """
    swapped: dict[str, tuple[nn.Module, nn.Linear]] = {}
    try:
        for name in names:
            m = get_module(model, name)
            if not (layer_kind(m) in ("linear4bit", "linear8bit") and is_quantized(m)):
                continue
            q = cast(nn.Linear, m)  # bitsandbytes' layers subclass nn.Linear
            dt = dtype or getattr(q, "compute_dtype", None) or quant_config_of(q).dtype
            if dt is None or not dt.is_floating_point:
                dt = torch.float32
            weight = dequantize_weight(q, dt)
            lin = _FloatCopy(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
            lin.weight = nn.Parameter(weight, requires_grad=False)
            if q.bias is not None:
                lin.bias = nn.Parameter(q.bias.detach().to(dt), requires_grad=False)
            replace_module(model, name, lin)
            swapped[name] = (q, lin)
        yield {n: lin for n, (_, lin) in swapped.items()}
    finally:
        for name, (original, _) in swapped.items():
            replace_module(model, name, original)


def load_float_model_for_estimation(
    name_or_path: str | os.PathLike[str] | nn.Module,
    quantization_config: Any = None,
    *,
    torch_dtype: torch.dtype = torch.float32,
    model_class: Any = None,
    source: Literal["auto", "checkpoint", "dequantize"] = "auto",
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """A float model of the same checkpoint as a (to-be-)quantized model, for gradient estimation.

    The seed's QLoRA flow: ``G = estimate_gradients(float_model, ..., offload=True)`` on this float
    model, then load the quantized model (same ``name_or_path`` + ``quantization_config``) and
    initialise its adapters from ``G``. This function is the first step.

    Args:
        name_or_path: a checkpoint (hub id or local directory), or an already loaded quantized
            model (its ``config._name_or_path`` names the checkpoint).
        quantization_config: the ``BitsAndBytesConfig`` the quantized model uses. Only checked here
            (the float model is loaded *without* it); it must be a bitsandbytes config.
        torch_dtype: dtype of the float weights (float32 by default; bfloat16 halves the memory).
        model_class: the ``transformers`` class to load with (default: the quantized model's class,
            else ``AutoModelForCausalLM``).
        source: ``"checkpoint"`` loads float weights from ``name_or_path``; ``"dequantize"`` (a
            quantized model only) returns :func:`dequantized_copy`; ``"auto"`` loads the checkpoint
            when it is a float checkpoint and otherwise dequantizes.
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``revision``, ``trust_remote_code``, …).

    Returns:
        The float model, on the CPU, in eval mode (pass ``offload=True`` to :func:`estimate_gradients`
        to stream its blocks through an accelerator).

    Example:
        >>> from transformers import BitsAndBytesConfig
        >>> bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        >>> float_model = load_float_model_for_estimation("path/to/llama", bnb_config)  # doctest: +SKIP
        >>> grads = estimate_gradients(float_model, batches, offload=True)  # doctest: +SKIP
    """
    if source not in ("auto", "checkpoint", "dequantize"):
        raise ValueError(f"source must be 'auto', 'checkpoint' or 'dequantize', got {source!r}")
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"torch_dtype must be a floating-point torch.dtype, got {torch_dtype!r}")
    if quantization_config is not None:
        _check_bnb_config(quantization_config)
    if isinstance(name_or_path, nn.Module):
        qmodel = name_or_path
        if not quantized_layer_names(qmodel):
            raise ValueError(
                f"{type(qmodel).__name__} has no quantized bitsandbytes layer: it already is a float model, "
                "estimate on it directly"
            )
        path = getattr(getattr(qmodel, "config", None), "_name_or_path", "") or ""
        if source == "dequantize" or (source == "auto" and not _is_float_checkpoint(path)):
            logger.info("float copy for estimation: dequantizing the quantized model's weights")
            return dequantized_copy(qmodel, torch_dtype).eval()
        if not path:
            raise ValueError(
                "the quantized model has no config._name_or_path to reload a float copy from; use source='dequantize'"
            )
        model_class = model_class or type(qmodel)
    else:
        if source == "dequantize":
            raise ValueError("source='dequantize' needs a loaded quantized model, got a path")
        path = os.fspath(name_or_path)
        if not _is_float_checkpoint(path):
            raise ValueError(
                f"{path!r} is a pre-quantized checkpoint (its config has a quantization_config): there are no float "
                "weights to load. Load the quantized model and pass it here (source='dequantize')"
            )
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    kwargs = {dtype_kwarg(): torch_dtype, "device_map": "cpu", **from_pretrained_kwargs}
    kwargs.pop("quantization_config", None)
    logger.info("loading float copy of %s in %s for gradient estimation", path, torch_dtype)
    model = model_class.from_pretrained(path, **kwargs)
    return model.eval()


def dtype_kwarg() -> str:
    """The name of ``from_pretrained``'s weight-dtype keyword in the installed transformers.

    transformers 4.56 renamed ``torch_dtype`` to ``dtype``: this returns ``"dtype"`` from 4.56 on
    and ``"torch_dtype"`` before, so one call works across the supported versions.

    Example:
        >>> import torch
        >>> from transformers import AutoModelForCausalLM
        >>> dtype_kwarg() in ("dtype", "torch_dtype")
        True
        >>> model = AutoModelForCausalLM.from_pretrained(path, **{dtype_kwarg(): torch.float32})  # doctest: +SKIP
    """
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _check_bnb_config(cfg: Any) -> None:
    method = getattr(cfg, "quant_method", None)
    method = getattr(method, "value", method)
    if isinstance(cfg, dict):
        method = cfg.get(
            "quant_method",
            "bitsandbytes" if cfg.get("load_in_4bit") or cfg.get("load_in_8bit") else None,
        )
    if method != "bitsandbytes":
        raise ValueError(
            f"quantization_config must be a bitsandbytes config (BitsAndBytesConfig), got {type(cfg).__name__} ({method!r})"
        )


def _is_float_checkpoint(path: str) -> bool:
    """False when the checkpoint's own config carries a quantization_config (pre-quantized weights)."""
    if not path:
        return False
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return False
    return getattr(cfg, "quantization_config", None) is None
