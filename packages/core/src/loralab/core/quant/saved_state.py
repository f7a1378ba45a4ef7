"""Quantized weights restored exactly from what they saved: a layer's codes and statistics, a whole
model's state dict with bitsandbytes layers, and every 4-bit layer's statistics alone (for sharded
checkpoints that hold the codes elsewhere).

Example:
    >>> import torch, bitsandbytes as bnb
    >>> model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32)).to("cpu")
    >>> saved = quant_statistics(model)
    >>> load_quant_statistics_(model, saved)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
from torch import Tensor, nn

from loralab.core.modules import get_module, layer_kind
from loralab.core.modules import weight_parameter as _weight
from loralab.core.quant.layers import (
    QuantizationError,
    _out_in,
    _quant_state,
    is_quantized,
    quantized_layer_names,
)
from loralab.core.sharding import is_dtensor, local_tensor


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
        >>> from loralab.core.quant import dequantize_weight, requantize_weight_
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
        >>> from loralab.core.quant import dequantize_weight, requantize_weight_
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
        >>> from loralab.core.quant import dequantize_weight, requantize_weight_
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
