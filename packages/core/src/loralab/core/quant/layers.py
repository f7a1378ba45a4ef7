"""Quantized layers one at a time: what a bitsandbytes layer is, its weight as a float matrix, and
the weight put back with the layer's own settings (NF4 / FP4 / int8, blocksize, double quantization,
storage dtype), FSDP2-sharded 4-bit layers included.

Example:
    >>> import torch, bitsandbytes as bnb
    >>> layer = bnb.nn.Linear4bit(64, 32, quant_type="nf4", compute_dtype=torch.float32).to("cpu")
    >>> quant_config_of(layer).kind, quant_config_of(layer).blocksize
    ('nf4', 64)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from loralab.core.modules import layer_kind
from loralab.core.modules import weight_parameter as _weight
from loralab.core.sharding import is_dtensor, local_tensor, whole, write_rows_

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
