"""LoRA-GA layers: PEFT LoRA layers whose ``lora_ga_init`` is loralab's, chosen by :class:`LoraGAConfig`.

How LoRA-GA plugs into PEFT (0.19+) without changing any PEFT class:

- :class:`~loralab.lora_ga.LoraGAConfig` registers these classes through PEFT's custom-module
  dispatch (``LoraConfig._register_custom_module``), so ``get_peft_model(model, LoraGAConfig(...))``
  builds :class:`LoraGALinear` for ``nn.Linear`` and GPT-2 ``Conv1D`` targets and
  ``LoraGALinear4bit`` / ``LoraGALinear8bitLt`` for bitsandbytes ones. A plain ``peft.LoraConfig``
  (PEFT's own LoRA-GA included) keeps PEFT's classes and behaviour.
- Each class is the matching PEFT LoRA layer with :meth:`~_LoraGALayerMixin.lora_ga_init`
  overridden: instead of PEFT's ``_peft_loraga_grad`` attribute (and its silent fallback to the
  default init when none is attached) the layer is recorded in the active :func:`lora_ga_session`
  with ``B = 0`` (the model still computes the base function), and raises without a session.
- :meth:`~_LoraGALayerMixin.update_layer` tells the session once PEFT has finished the layer (after
  its device/dtype move), so a session holding the gradients (``LoraGAContext``) writes ``A``, ``B``
  and ``W0'`` right there, while :func:`~loralab.lora_ga.get_lora_ga_model` estimates first and
  writes afterwards.

The layers compute exactly PEFT's LoRA (forward, merge, save keys are PEFT's own). Saved adapters
are plain LoRA (``save_lora_ga_adapter`` / ``save_lora_ga_model``) and load with bare PEFT.

Example:
    >>> import peft
    >>> from loralab.core.testing import tiny_llama
    >>> from loralab.lora_ga import LoraGAConfig, LoraGAInitError
    >>> try:
    ...     peft.get_peft_model(tiny_llama(), LoraGAConfig(r=4, target_modules=["q_proj"]))
    ... except LoraGAInitError as err:
    ...     print(str(err)[:52])
    a LoraGAConfig adapter is being created without grad
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from peft.tuners.lora.config import LoraGAConfig as _PeftLoraGAConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import Tensor, nn

from loralab.core.distributed import gathered_parameters
from loralab.core.quant import dequantize_weight, requantize_weight_
from loralab.core.sharding import (
    all_ranks_agree,
    is_dtensor,
    local_tensor,
    rows_of,
    write_rows_,
)
from loralab.core.targets import layer_kind
from loralab.lora_ga.maths import offset_weight

__all__ = [
    "LoraGAInitError",
    "LoraGALinear",
    "LoraGASettings",
    "custom_module_mapping",
    "lora_ga_session",
    "write_factors",
]


@dataclass
class LoraGASettings(_PeftLoraGAConfig):
    """PEFT's ``lora_ga_config`` sub-config, tagged as loralab's: loralab's LoRA-GA layers (built for a
    :class:`LoraGAConfig`) initialise an adapter with this sub-config themselves (inside
    :class:`~loralab.lora_ga.LoraGAContext` or :func:`~loralab.lora_ga.get_lora_ga_model`) and raise
    when no gradient is available, instead of PEFT's silent fallback to the default init."""

    dtype: str = field(default="fp32", metadata={"help": "dtype of A and B (LoraGAConfig.dtype)."})


class LoraGAInitError(RuntimeError):
    """A LoRA-GA adapter cannot be initialised (no gradient, missing or mis-shaped gradient, quantized estimate)."""


def write_factors(layer: LoraLayer, adapter: str, A: Tensor, B: Tensor, dtype: torch.dtype) -> None:
    """Store ``A``, ``B`` in ``dtype`` and offset the base weight by ``−s·B·A`` (paper Eq. 13).

    Quantized bases are dequantized, offset in float32 and re-quantized with their own settings
    (NF4 stays NF4). The initial factors are kept on the CPU as ``layer._lora_ga_init[adapter]`` for
    :func:`~loralab.lora_ga.save_lora_ga_adapter` (the rank-2r plain LoRA export).

    Under FSDP2 (``fully_shard``: ``DTensor`` row shards) every rank passes the same whole ``A``,
    ``B``: each writes its own rows of ``A``, ``B`` and of ``W0 − s·B·A``. A float base offsets its
    own shard from the factors alone (:func:`_offset_shard_`: no gather, no whole matrix); a 4-bit
    base is all-gathered and re-quantized (its codes are not split by rows; one layer at a time, a
    collective).
    """
    # the factors are Linear / Conv sub-modules and base an adaptable layer: all weights are Parameters
    lora_A = cast(nn.Parameter, layer.lora_A[adapter].weight)
    lora_B = cast(nn.Parameter, layer.lora_B[adapter].weight)
    base = layer.get_base_layer()
    s = float(layer.scaling[adapter])
    base_w = cast(nn.Parameter, base.weight)
    stored: list[Tensor] = []
    with torch.no_grad(), gathered_parameters([lora_A, lora_B, base_w], modifier_rank=0):
        for param, value in ((lora_A, A), (lora_B, B)):
            value = value.to(device=param.device, dtype=dtype)
            if is_dtensor(param):
                if param.dtype != dtype:
                    raise LoraGAInitError(
                        f"LoRA-GA factors are {param.dtype} in the FSDP2-sharded model (fully_shard keeps the "
                        f"dtype it sharded), but LoraGAConfig.dtype asks for {dtype}: set dtype to match"
                    )
                write_rows_(param, value)  # this rank's rows; every rank holds the same whole value
            elif param.dtype == dtype and param.shape == value.shape:
                param.copy_(value)  # in place: keeps DeepSpeed ZeRO-3's (gathered) storage valid
            else:
                param.data = value.contiguous()
            stored.append(value)
        if is_dtensor(base_w) and layer_kind(base) in ("linear", "conv1d"):
            _offset_shard_(base, stored[0], stored[1], s)
        else:
            # (out, in) float32 copy, whatever the storage (Linear, Conv1D, bnb; core reads a 4-bit
            # layer right even after bitsandbytes repacked it for its CPU kernel; FSDP2: gathered)
            w = dequantize_weight(base)
            # Offset with the factors as stored, so W0' x + s B (A x) = W0 x up to W0's rounding.
            requantize_weight_(base, offset_weight(w, stored[0], stored[1], s))
    store = layer.__dict__.setdefault("_lora_ga_init", {})
    store[adapter] = (
        stored[0].detach().to("cpu", copy=True),
        stored[1].detach().to("cpu", copy=True),
    )


def _offset_shard_(base: nn.Module, A: Tensor, B: Tensor, s: float) -> None:
    """``W0 − s·B·A`` on this rank's shard of an FSDP2 float weight only (the offset's rows are the
    shard's rows of ``B`` times ``A``; a ``Conv1D`` stores (in, out), so there the shard holds input
    columns: ``A``'s). The ranks check finiteness together, so that all raise or none does."""
    weight = cast(Tensor, base.weight)
    local = local_tensor(weight)
    rows = rows_of(weight)
    if layer_kind(base) == "conv1d":
        new = offset_weight(local.T, A[:, rows], B, s).T
    else:
        new = offset_weight(local, A, B[rows], s)
    if not all_ranks_agree(bool(torch.isfinite(new).all()), [weight]):
        raise ValueError(
            f"LoRA-GA's offset W0 - s*B*A of {type(base).__name__} ({weight.dtype}) has non-finite "
            "values on at least one rank"
        )
    local.copy_(new)


@dataclass
class Pending:
    """A LoRA layer PEFT asked to initialise with LoRA-GA (``B = 0`` until written)."""

    layer: LoraLayer
    adapter: str
    settings: LoraGASettings


@dataclass
class Session:
    """Records the LoRA-GA layers PEFT builds while it is active.

    ``check(layer, adapter, lora_config)`` runs when PEFT asks for the init (may raise; ``lora_config``
    is the whole ``LoraConfig`` PEFT builds the layer from); ``ready(pending)``
    runs once PEFT has finished the layer (after its device/dtype move).
    """

    check: Callable[[LoraLayer, str, Any], None] | None = None
    ready: Callable[[Pending], None] | None = None
    pending: list[Pending] = field(default_factory=list)


_SESSIONS: list[Session] = []

PRECOMPUTED = "_loralab_loraga_factors"
"""Attribute :func:`~loralab.lora_ga.preprocess_loraga` sets on each target: its ``(A, B)`` by PEFT's definition."""


def float_dtype(base: nn.Module) -> torch.dtype:
    """The float dtype PEFT gives a layer's adapters: the weight's, or a quantized layer's compute dtype."""
    kind = layer_kind(base)
    if kind in ("linear4bit", "linear8bit"):
        dtype = getattr(base, "compute_dtype", None)
        if dtype is None:
            from loralab.core.quant import quant_config_of

            dtype = quant_config_of(base).dtype
        return dtype if dtype is not None and dtype.is_floating_point else torch.float32
    dtype = cast(Tensor, base.weight).dtype
    return dtype if dtype.is_floating_point else torch.float32


@contextmanager
def lora_ga_session(
    check: Callable[[LoraLayer, str, Any], None] | None = None,
    ready: Callable[[Pending], None] | None = None,
) -> Iterator[Session]:
    """Within this block, LoRA-GA layers built from a :class:`LoraGAConfig` are recorded (``B = 0``)."""
    session = Session(check=check, ready=ready)
    _SESSIONS.append(session)
    try:
        yield session
    finally:
        _SESSIONS.remove(session)


_NO_SESSION = (
    "a LoraGAConfig adapter is being created without gradients: use loralab.lora_ga.get_lora_ga_model(model, "
    "config, batches), call peft.get_peft_model inside `with LoraGAContext(model, named_grad):`, or use "
    "loralab.lora_ga.preprocess_loraga with PEFT's own LoraConfig(init_lora_weights='lora_ga'). (loralab never "
    "falls back silently to the default init.) To load a saved adapter, save it with save_lora_ga_adapter / "
    "save_lora_ga_model / save_loraga_model_final, which write a plain LoRA config."
)


class _LoraGALayerMixin:
    """``lora_ga_init`` and ``update_layer`` of a LoRA-GA layer (mixed in before a PEFT LoRA layer class)."""

    def lora_ga_init(self, adapter_name: str, lora_ga_config: Any) -> None:
        layer: Any = self
        if not isinstance(lora_ga_config, LoraGASettings):
            # PEFT's own LoraConfig(init_lora_weights="lora_ga"): factors by PEFT's definition
            base = layer.get_base_layer()
            if PRECOMPUTED in base.__dict__:
                # from loralab.lora_ga.preprocess_loraga: B = 0 until update_layer writes the factors
                layer.reset_lora_parameters(adapter_name, init_lora_weights=True)
                layer.__dict__.setdefault("_lora_ga_precomputed", set()).add(adapter_name)
                return
            if hasattr(base, "_peft_loraga_grad"):
                # from peft.preprocess_loraga: PEFT's code, unchanged
                super().lora_ga_init(adapter_name, lora_ga_config)  # type: ignore[misc]
                return
            raise LoraGAInitError(
                f"LoRA-GA layer {self.__dict__.get('_lora_ga_target', '')!r} has no gradient: call "
                "loralab.lora_ga.preprocess_loraga(model, lora_config, train_step) on the model before "
                "get_peft_model, with the same lora_config (loralab never falls back to the default init)"
            )
        if not _SESSIONS:
            raise LoraGAInitError(_NO_SESSION)
        session = _SESSIONS[-1]
        if session.check is not None:
            # the whole LoraConfig PEFT is building with (update_layer below keeps it for this call)
            session.check(layer, adapter_name, layer.__dict__.get("_lora_ga_building"))
        # Until the init is finished the adapter is a no-op (B = 0): the model computes the base function.
        layer.reset_lora_parameters(adapter_name, init_lora_weights=True)
        layer.__dict__.setdefault("_lora_ga_recorded", set()).add(adapter_name)

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any
    ) -> None:
        self.__dict__["_lora_ga_building"] = config
        self.__dict__["_lora_ga_target"] = kwargs.get("target_name", "")
        try:
            super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)  # type: ignore[misc]
        finally:
            del self.__dict__["_lora_ga_building"]
        precomputed = self.__dict__.get("_lora_ga_precomputed", set())
        if adapter_name in precomputed:
            precomputed.discard(adapter_name)
            # after PEFT's device/dtype move, as PEFT's own init happens before it: A, B in the
            # base layer's float dtype (PEFT's choice), the offset from the values as stored
            base = self.get_base_layer()  # type: ignore[attr-defined]
            A, B = base.__dict__.pop(PRECOMPUTED)
            write_factors(self, adapter_name, A, B, float_dtype(base))  # type: ignore[arg-type]
            if is_dtensor(base.weight):
                # PEFT's flow on a model sharded before get_peft_model: the init is right (each rank
                # wrote its rows of W0'), but the new A, B are plain tensors outside every FSDP2 group
                warnings.warn(
                    f"get_peft_model added LoRA parameters to the FSDP2-sharded layer "
                    f"{self.__dict__.get('_lora_ga_target', '')!r}: FSDP2 neither shards them nor averages "
                    "their gradients across ranks. Before training, apply fully_shard to each adapter module "
                    "(lora_A[adapter] and lora_B[adapter] of every LoRA layer)",
                    stacklevel=2,
                )
            return
        recorded = self.__dict__.get("_lora_ga_recorded", set())
        if adapter_name not in recorded:
            return
        recorded.discard(adapter_name)
        # recorded only inside a session (lora_ga_init raises otherwise)
        session = _SESSIONS[-1]
        # a LoraGAConfig's fields as they are now (set after construction counts, never ignored)
        settings = config.lora_ga_settings() if hasattr(config, "lora_ga_settings") else None
        pending = Pending(self, adapter_name, settings or config.lora_ga_config)  # type: ignore[arg-type]
        session.pending.append(pending)
        if session.ready is not None:
            session.ready(pending)


class LoraGALinear(_LoraGALayerMixin, PeftLoraLinear):
    """PEFT's LoRA ``Linear`` (for ``nn.Linear`` and GPT-2 ``Conv1D`` bases) with loralab's LoRA-GA init."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: Any, **kwargs: Any
    ) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, LoraLayer) else base_layer
        # what PEFT's default dispatch does for these bases (custom dispatch bypasses it)
        is_conv1d = type(base).__name__ == "Conv1D"
        if is_conv1d and not config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
                stacklevel=2,
            )
            config.fan_in_fan_out = True
        elif not is_conv1d and config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                "Setting fan_in_fan_out to False.",
                stacklevel=2,
            )
            config.fan_in_fan_out = False
        super().__init__(
            base_layer, adapter_name, config=config, is_target_conv_1d_layer=is_conv1d, **kwargs
        )

    def __repr__(self) -> str:
        return "lora_ga." + nn.Module.__repr__(self)


def _bnb_classes() -> dict[type[nn.Module], type[nn.Module]]:
    """LoRA-GA layer classes for bitsandbytes 4/8-bit bases (empty without bitsandbytes)."""
    try:
        import bitsandbytes as bnb
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:  # pragma: no cover - bitsandbytes is an optional extra
        return {}
    mapping: dict[type[nn.Module], type[nn.Module]] = {}
    for bnb_cls, peft_cls, name in (
        (getattr(bnb.nn, "Linear4bit", None), getattr(peft_bnb, "Linear4bit", None), "Linear4bit"),
        (
            getattr(bnb.nn, "Linear8bitLt", None),
            getattr(peft_bnb, "Linear8bitLt", None),
            "Linear8bitLt",
        ),
    ):
        if bnb_cls is None or peft_cls is None:  # pragma: no cover - old bitsandbytes
            continue
        cls = type(
            f"LoraGA{name}",
            (_LoraGALayerMixin, peft_cls),
            {
                "__doc__": f"PEFT's LoRA ``{name}`` (bitsandbytes) with loralab's LoRA-GA init.",
                "__module__": __name__,
                "__repr__": lambda self: "lora_ga." + nn.Module.__repr__(self),
            },
        )
        globals()[cls.__name__] = cls
        mapping[bnb_cls] = cls
    return mapping


_MAPPING: dict[type[nn.Module], type[nn.Module]] | None = None


def custom_module_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    """``{base layer class: LoRA-GA layer class}`` for PEFT's dynamic dispatch (most specific first).

    bitsandbytes ``Linear4bit`` and ``Linear8bitLt`` come before ``nn.Linear`` (their parent class).
    """
    global _MAPPING
    if _MAPPING is None:
        from transformers.pytorch_utils import Conv1D

        mapping = _bnb_classes()
        mapping[Conv1D] = LoraGALinear
        mapping[nn.Linear] = LoraGALinear
        _MAPPING = mapping
    return dict(_MAPPING)


def is_lora_ga_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of loralab's LoRA-GA layer classes."""
    return isinstance(module, _LoraGALayerMixin)
